"""The gaga-ros command: start the graph without `ros2 launch`, run one node, fetch assets.

    gaga-ros demo [--seconds N]                 the built-in demo (CPU, no downloads)
    gaga-ros launch telepresence [arg:=value]   the same graph as telepresence.launch.py
    gaga-ros node <name> [--ros-args ...]       one node (what launch files execute)
    gaga-ros launch replay path:=rec.mcap       drive the avatar from a recording (record:=rec.mcap)
    gaga-ros demo namespace:=robot1 port:=8081  the demo under /robot1 (one more beside it)
    gaga-ros assets                             which licensed model files are present
    gaga-ros fetch-assets                       download GAGAvatar weights + FLAME (asks first)
    gaga-ros janus [--port 8088]                a loopback Janus for sfu:=janus (many viewers)
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

NODES = ("capture", "tracking", "reconstruction", "render", "bridge", "driver", "recorder", "bag", "voice",
         "fleet")
#: Seconds the nodes get to stop cleanly after one Ctrl-C before they are killed: what `ros2 launch`
#: allows a process before its SIGKILL (5 s after SIGINT, 5 more after SIGTERM). On two loaded cores
#: the six interpreters of the demo took more than 5 s to stop cleanly (a clean-clone CI run).
STOP_GRACE_S = 10.0


def run_node(name: str, ros_args: list[str]) -> None:
    """Run one node in this process."""
    if name not in NODES:
        sys.exit(f"gaga-ros node: unknown node {name!r}; known are {', '.join(NODES)}")
    try:
        module = importlib.import_module(f"gaga_ros.nodes.{name}")
    except KeyboardInterrupt:  # Ctrl-C while torch & co. load: stop as quietly as after loading,
        os._exit(0)  # without waiting on threads that a half-imported library may have started
    module.main(["gaga-ros", *ros_args])


def _die_with_parent() -> None:
    """In a child before exec: the kernel sends it SIGTERM (a clean stop) if the supervisor dies,
    since a child in its own session no longer gets the terminal's signals."""
    import ctypes

    pr_set_pdeathsig = 1  # prctl(2)
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Starts each node as its own process (real DDS between them) and restarts any that dies.

    Children run in their own session, so a terminal's Ctrl-C reaches only the supervisor, which
    sends each node exactly one SIGINT (a node takes a second one as "kill now"); a second Ctrl-C
    while they stop kills them.
    """

    def __init__(self, specs, params_file: Path, restart: bool = True) -> None:
        self.specs = specs
        self.params_file = params_file
        self.restart = restart
        self.tmp = tempfile.TemporaryDirectory(prefix="gaga_ros_launch_")
        self.procs: dict[str, subprocess.Popen] = {}
        from gaga_ros.graph import dds_environment

        self.env = {**os.environ, **dds_environment(dict(os.environ))}
        self.restarts: dict[str, int] = {}

    def _command(self, spec) -> list[str]:
        overrides = Path(self.tmp.name) / f"{spec.qualified.strip('/').replace('/', '.')}.yaml"
        overrides.write_text(yaml.safe_dump({spec.qualified: {"ros__parameters": spec.parameters}}))
        cmd = [sys.executable, "-m", "gaga_ros.cli", "node", spec.module, "--ros-args",
               "-r", f"__node:={spec.name}", "--params-file", str(self.params_file)]
        if spec.namespace:
            cmd[-2:-2] = ["-r", f"__ns:={spec.namespace}"]
        if spec.parameters:
            cmd += ["--params-file", str(overrides)]
        return cmd

    def _spawn(self, spec) -> subprocess.Popen:
        return subprocess.Popen(self._command(spec), env=self.env, start_new_session=True,
                                preexec_fn=_die_with_parent)

    def start(self) -> None:
        for spec in self.specs:
            self.procs[spec.qualified] = self._spawn(spec)
            print(f"[gaga-ros] started {spec.qualified} (pid {self.procs[spec.qualified].pid})", flush=True)

    def poll(self) -> None:
        from gaga_ros.nodes.runtime import EXIT_CANNOT_START

        for spec in self.specs:
            key = spec.qualified
            code = self.procs[key].poll()
            if code is None:
                continue
            if code == EXIT_CANNOT_START or not self.restart:
                raise SystemExit(f"[gaga-ros] {key} exited with code {code}")
            n = self.restarts[key] = self.restarts.get(key, 0) + 1
            print(f"[gaga-ros] {key} exited with code {code}; restarting ({n})", flush=True)
            self.procs[key] = self._spawn(spec)

    def stop(self) -> None:
        """One SIGINT to each node, SIGKILL to those still running after STOP_GRACE_S or a second Ctrl-C."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
        except KeyboardInterrupt:
            print("[gaga-ros] second Ctrl-C: killing the nodes", flush=True)
            for proc in self.procs.values():
                proc.kill()
        for name, proc in self.procs.items():
            if proc.wait() != 0:
                print(f"[gaga-ros] {name} did not stop cleanly (exit code {proc.returncode})", flush=True)
        self.tmp.cleanup()


def launch(graph_name: str, launch_args: dict[str, str], seconds: float = 0.0) -> None:
    """Start a graph from gaga_ros.graph and supervise it until Ctrl-C or `seconds` have passed."""
    from gaga_ros import graph

    if graph_name not in graph.GRAPHS:
        sys.exit(f"gaga-ros launch: unknown graph {graph_name!r}; known are {', '.join(graph.GRAPHS)}")
    profile = launch_args.pop("profile", "demo")
    try:
        params_file = graph.profile_file(profile)
        specs = graph.GRAPHS[graph_name](launch_args)
    except ValueError as exc:
        sys.exit(f"gaga-ros launch: {exc}")
    sup = Supervisor(specs, params_file)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t_end = time.monotonic() + seconds if seconds > 0 else float("inf")
    try:
        sup.start()
        while time.monotonic() < t_end:
            sup.poll()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop()


def _launch_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition(":=")
        if not sep:
            sys.exit(f"gaga-ros launch: expected name:=value, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node"] and len(argv) >= 2:
        run_node(argv[1], argv[2:])
        return
    parser = argparse.ArgumentParser(prog="gaga-ros", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the built-in demo: astronaut driven by a scripted driver")
    demo.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: Ctrl-C)")
    demo.add_argument("--record", default="out/demo.mp4", help="mp4 of /avatar/image ('' to skip)")
    demo.add_argument("args", nargs="*", help="more launch arguments, name:=value")
    lau = sub.add_parser("launch", help="start a graph: telepresence, replay or capture")
    lau.add_argument("graph")
    lau.add_argument("args", nargs="*", help="launch arguments, name:=value")
    lau.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: Ctrl-C)")
    sub.add_parser("node", help="run one node: gaga-ros node <name> [--ros-args ...]")
    for name, text in (("assets", "which licensed model files are present, and what works without"),
                       ("fetch-assets", "show the FLAME licence, then download the published files")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--models", default=None, help="models folder (default: ./models or "
                         "$GAGA_ROS_MODELS)")
    janus = sub.add_parser("janus", help="start a loopback Janus for the bridge's sfu:=janus (minimal "
                           "configuration, the room secret from GAGA_ROS_JANUS_SECRET)")
    janus.add_argument("--dir", default="janus-conf", help="where the configuration is written")
    janus.add_argument("--port", type=int, default=8088, help="HTTP API port on 127.0.0.1")
    janus.add_argument("--room", type=int, default=1234, help="VideoRoom number")
    ns = parser.parse_args(argv)
    if ns.command == "demo":
        args = {"record": str(Path(ns.record).resolve()) if ns.record else "", **_launch_args(ns.args)}
        if args["record"]:
            print(f"[gaga-ros] recording /avatar/image to {args['record']}", flush=True)
        launch("telepresence", args, ns.seconds)
    elif ns.command == "launch":
        launch(ns.graph, _launch_args(ns.args), ns.seconds)
    elif ns.command in ("assets", "fetch-assets"):
        from gaga_ros import assets

        try:
            if ns.command == "assets":
                print(assets.find_assets(ns.models).explain())
            else:
                assets.fetch_assets(ns.models)
        except (assets.LicenceNotAccepted, assets.DownloadError) as exc:
            sys.exit(f"gaga-ros {ns.command}: {exc}")
    elif ns.command == "janus":
        run_janus(Path(ns.dir), ns.port, ns.room)
    else:
        parser.error("gaga-ros node <name> [--ros-args ...]")


def run_janus(folder: Path, port: int, room: int) -> None:
    """Write gaga_ros.stream.janus.minimal_config and become that Janus (exec)."""
    import shutil

    from gaga_ros.stream.janus import SfuConfigError, SfuSettings, minimal_config

    secret = os.environ.get("GAGA_ROS_JANUS_SECRET", "")
    try:
        SfuSettings(f"http://127.0.0.1:{port}/janus", room, secret)
        command = minimal_config(folder.resolve(), port, secret, room)
    except SfuConfigError as exc:
        sys.exit(f"gaga-ros janus: {exc} (GAGA_ROS_JANUS_SECRET)")
    if shutil.which("janus") is None:
        sys.exit("gaga-ros janus: janus is not installed: apt-get install janus")
    print(f"[gaga-ros] Janus on http://127.0.0.1:{port}/janus, room {room}, configuration in {folder}",
          flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
