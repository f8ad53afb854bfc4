"""The ROS 2 user's first minutes, timed with the real tools: `colcon build` of this package in a
clean workspace (Python install on), `ros2 launch` to the first /avatar/image, and one Ctrl-C to the
launch's exit (every node stopped); the same Ctrl-C on the pip path's `gaga-ros launch telepresence`.

    .venv/bin/python bench/workspace_bench.py            # needs scripts/ros2_tools.sh (test.sh runs it)

Prints a table and writes bench/results/workspace.json (or --out). First frame is measured by a
`ros2 topic echo --once` started with the launch, so it includes that tool's own start-up (~2 s here);
the launch's demo profile renders on the CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ros2_workspace import Workspace, interrupt, tools_missing, wait_for_line  # noqa: E402

#: Prints the first /avatar/image's frame_id; the type is given so it may start before the publisher.
FIRST_FRAME = ("ros2 topic echo --once --qos-profile sensor_data /avatar/image sensor_msgs/msg/Image "
               "--field header.frame_id")


def measure(root: Path) -> dict:
    ws = Workspace(root)
    ws.copy_sources()
    t0 = time.perf_counter()
    build = ws.build()
    build_s = time.perf_counter() - t0
    if build.returncode != 0:
        raise SystemExit(f"colcon build failed:\n{build.stdout[-3000:]}")
    echo_log, launch_log = root / "echo.log", root / "launch.log"
    t0 = time.perf_counter()
    launch = ws.start("ros2 launch gaga_ros telepresence.launch.py bridge:=false", launch_log)
    echo = ws.start(FIRST_FRAME, echo_log)
    try:
        if not wait_for_line(echo_log, "avatar_camera", timeout=600, proc=echo):
            raise SystemExit(f"no /avatar/image:\n{echo_log.read_text()}\n{launch_log.read_text()[-3000:]}")
        first_frame_s = time.perf_counter() - t0
    finally:
        if echo.poll() is None:
            interrupt(echo)
    time.sleep(5)  # let it run a little, as a user would, before the Ctrl-C
    t0 = time.perf_counter()
    code = interrupt(launch)
    stop_s = time.perf_counter() - t0
    log = launch_log.read_text()
    figures = {"workspace build s": round(build_s, 1), "ros2 launch first frame s": round(first_frame_s, 1),
               "ros2 launch stop s": round(stop_s, 2), "ros2 launch exit code": code,
               "nodes finished cleanly": log.count("process has finished cleanly"),
               "nodes died": log.count("process has died")}
    return figures | gaga_ros_launch_stop(ws, root)


def gaga_ros_launch_stop(ws: Workspace, root: Path) -> dict:
    """The pip path's `gaga-ros launch telepresence`: first frame, then one Ctrl-C."""
    log, echo_log = root / "gaga_ros_launch.log", root / "echo2.log"
    command = [sys.executable, "-m", "gaga_ros.cli", "launch", "telepresence", "bridge:=false"]
    out = open(log, "w")  # noqa: SIM115 - the child writes it until it exits
    launch = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    echo = ws.start(FIRST_FRAME, echo_log)
    try:
        if not wait_for_line(echo_log, "avatar_camera", timeout=600, proc=echo):
            raise SystemExit(f"no /avatar/image from gaga-ros launch:\n{echo_log.read_text()}\n"
                             f"{log.read_text()[-3000:]}")
    finally:
        if echo.poll() is None:
            interrupt(echo)
    time.sleep(5)
    t0 = time.perf_counter()
    code = interrupt(launch)
    return {"gaga-ros launch stop s": round(time.perf_counter() - t0, 2), "gaga-ros launch exit code": code,
            "gaga-ros nodes not stopped cleanly": log.read_text().count("did not stop cleanly")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "workspace.json")
    ns = parser.parse_args()
    missing = tools_missing()
    if missing:
        raise SystemExit(missing)
    with tempfile.TemporaryDirectory(prefix="gaga_ros_ws_") as tmp:
        figures = measure(Path(tmp))
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    write(ns.out, {"figures": figures})


if __name__ == "__main__":
    main()
