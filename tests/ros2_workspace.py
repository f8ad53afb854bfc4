"""This package in a colcon workspace, driven with the real ROS 2 tools (`ros2 launch`, `ros2 topic`, ...).

The tools come from scripts/ros2_tools.sh (test.sh runs it); the ROS 2 underlay is the venv's PyPI
wheels, found as a ROS install is: AMENT_PREFIX_PATH and CMAKE_PREFIX_PATH name the venv, its bin/
leads PATH, then the workspace's install/setup.bash is sourced. Shared by tests/test_workspace.py
and bench/workspace_bench.py.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tools_missing() -> str | None:
    """Why the ROS 2 tools cannot run here, or None when they can."""
    bin_dir = Path(sys.executable).parent
    for tool in ("ros2", "colcon"):
        if not (bin_dir / tool).is_file():
            return f"{bin_dir / tool} is missing: run scripts/ros2_tools.sh (scripts/test.sh does)"
    return None


class Workspace:
    """A colcon workspace holding a copy of this repository's tracked files as src/gaga_ros."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.src = self.root / "src" / "gaga_ros"
        prefix = str(Path(sys.prefix))
        self.env = {**os.environ, "AMENT_PREFIX_PATH": prefix, "CMAKE_PREFIX_PATH": prefix,
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1"}  # logs complete up to the last line, even after a kill
        # The venv's editable gaga_ros must not hide the workspace's: nothing on PYTHONPATH but setup.bash's.
        self.env.pop("PYTHONPATH", None)
        self._ptys: list[int] = []

    def copy_sources(self) -> None:
        """What `git clone` would put in src/: the tracked files of the working tree."""
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
        for name in filter(None, files.decode().split("\0")):
            source, target = REPO / name, self.src / name
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())
                target.chmod(source.stat().st_mode)

    def build(self) -> subprocess.CompletedProcess:
        """`colcon build --packages-select gaga_ros` with the Python install on (the ROS user's build)."""
        return subprocess.run(
            ["colcon", "build", "--packages-select", "gaga_ros", "--event-handlers", "console_direct+",
             "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
            cwd=self.root, env=self.env, capture_output=True, text=True)

    def command(self, line: str) -> list[str]:
        """A bash command line run after `source install/setup.bash`, as a ROS user types it."""
        return ["bash", "-c", f"source {shlex.quote(str(self.root / 'install' / 'setup.bash'))} && {line}"]

    def run(self, line: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(line), cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, line: str, log: Path) -> subprocess.Popen:
        """Start a long-running command (ros2 launch, ros2 run) as a terminal would, output in `log`.

        It runs in its own session (the test's signals stay out of it) with a pseudo-terminal on
        stdin, so `ros2 launch` behaves as typed at a prompt (interactive: it relies on the terminal's
        Ctrl-C reaching its nodes rather than sending its own); `exec` makes the tool the process."""
        out = open(log, "w")  # noqa: SIM115 - the child writes it until it exits
        leader, follower = os.openpty()
        try:
            return subprocess.Popen(self.command(f"exec {line}"), cwd=self.root, env=self.env, stdin=follower,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            os.close(follower)
            self._ptys.append(leader)  # held open while the tool runs: a closed terminal is a hang-up


def interrupt(proc: subprocess.Popen, timeout: float = 60) -> int:
    """A terminal's Ctrl-C: SIGINT to the whole process group (the tool and the nodes it started, so
    each node gets exactly one); the tool's exit code."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_line(log: Path, text: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Wait until `text` appears in the log file (or the process ends)."""
    from conftest import wait_for

    def seen() -> bool:
        return text in log.read_text(errors="replace")

    wait_for(lambda: seen() or (proc is not None and proc.poll() is not None), timeout, interval=0.2)
    return seen()
