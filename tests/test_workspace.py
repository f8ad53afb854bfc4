"""The ROS 2 user's journey with the real tools (upstream launch, launch_ros, ros2cli; test.sh installs
them): colcon build in a workspace with the Python install on, `ros2 launch`, `ros2 topic hz`,
`ros2 run`, `ros2 param describe`, `ros2 lifecycle get`, one Ctrl-C. The static launch-file check for
machines without the tools is tests/test_interfaces.py."""

import os
import re
import signal
import subprocess

import pytest
from conftest import wait_for
from ros2_workspace import Workspace, interrupt, tools_missing, wait_for_line

from gaga_ros import cli, graph
from gaga_ros.nodes.render import PARAMS as RENDER_PARAMS

LAUNCH = "ros2 launch gaga_ros telepresence.launch.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    missing = tools_missing()
    if missing:
        pytest.fail(missing)
    ws = Workspace(tmp_path_factory.mktemp("ros2_ws"))
    ws.copy_sources()
    result = ws.build()
    assert result.returncode == 0, f"colcon build failed:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    yield ws
    ws.run("ros2 daemon stop")  # the verbs started one for this run's domain; leave nothing behind


def test_one_executable_per_node(workspace):
    listed = re.search(r"set\(GAGA_ROS_NODES ([^)]*)\)", (workspace.src / "CMakeLists.txt").read_text())
    assert listed and listed.group(1).split() == list(cli.NODES)
    installed = workspace.root / "install" / "gaga_ros" / "lib" / "gaga_ros"
    assert all((installed / node).is_file() for node in cli.NODES)
    where = workspace.run("python -c 'import gaga_ros.cli, gaga_ros.msg; print(gaga_ros.cli.__file__)'")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(workspace.root / "install")), "the workspace's package is the one used"


def test_launch_arguments_are_described_and_unknown_ones_refused(workspace):
    shown = workspace.run(f"{LAUNCH} --show-args")
    assert shown.returncode == 0, shown.stderr
    for name, (_, description) in graph.ARGUMENTS.items():
        assert f"'{name}'" in shown.stdout and description.split(":")[0] in shown.stdout, name
    typo = workspace.run(f"{LAUNCH} bogus:=1 bridge:=false", timeout=120)
    assert typo.returncode != 0
    assert "unknown launch arguments ['bogus']" in typo.stdout + typo.stderr


def test_ros2_launch_runs_the_graph_and_stops_on_one_ctrl_c(workspace, tmp_path):
    """In a namespace: every node and topic under /robot1, the profile still applied."""
    log = tmp_path / "launch.log"
    launch = workspace.start(f"{LAUNCH} bridge:=false namespace:=robot1", log)
    try:
        hz_log = tmp_path / "hz.log"
        hz = workspace.start("ros2 topic hz /robot1/avatar/image --window 5", hz_log)
        try:
            assert wait_for_line(hz_log, "average rate", timeout=300, proc=launch), (
                f"no /avatar/image rate:\n{hz_log.read_text()[-2000:]}\n{log.read_text()[-4000:]}")
        finally:
            interrupt(hz)
        state = workspace.run("ros2 lifecycle get /robot1/gaga_render --spin-time 10")
        assert state.stdout.startswith("active"), state.stdout + state.stderr
        size = next(p for p in RENDER_PARAMS if p.name == "size")
        described = workspace.run("ros2 param describe /robot1/gaga_render size --spin-time 10")
        assert "Type: integer" in described.stdout and size.description in described.stdout, described.stdout
        profiled = workspace.run("ros2 param get /robot1/gaga_render size --spin-time 10")
        assert "Integer value is: 256" in profiled.stdout, profiled.stdout  # config/demo.yaml's, via /**
        topics = workspace.run("ros2 topic list --spin-time 5").stdout.split()
        assert "/robot1/avatar/model" in topics and "/avatar/image" not in topics, topics

        run_log = tmp_path / "run.log"
        driver = workspace.start("ros2 run gaga_ros driver --ros-args -r __node:=second_driver -p rate:=5.0",
                                 run_log)
        def listed() -> bool:  # a loaded machine may take a while to import torch and mediapipe
            return "/second_driver" in workspace.run("ros2 node list --spin-time 5").stdout.split()

        try:
            assert wait_for(listed, timeout=180, interval=1.0), run_log.read_text()
        finally:
            assert interrupt(driver) == 0, run_log.read_text()
        assert "Traceback" not in run_log.read_text()

        # a node that dies (here: killed) is started again; one stopped by Ctrl-C is not
        started = re.search(r"\[driver-1\]: process started with pid \[(\d+)\]", log.read_text())
        assert started, log.read_text()[-4000:]
        os.kill(int(started.group(1)), signal.SIGKILL)
        assert wait_for_line(log, "/robot1/gaga_driver exited with code -9; starting it again", timeout=60,
                             proc=launch)
        assert wait_for(lambda: len(re.findall(r"\[driver-\d+\]: process started", log.read_text())) == 2,
                        timeout=60), log.read_text()[-3000:]  # launch numbers its processes in one series
        def answers() -> bool:  # the new process serves its parameters (a killed one's discovery
            # entry can linger in `ros2 node list`, but it answers no service)
            try:
                got = workspace.run("ros2 param get /robot1/gaga_driver rate", timeout=60)
                return "Double value is" in got.stdout
            except subprocess.TimeoutExpired:
                return False

        assert wait_for(answers, timeout=180, interval=1.0), log.read_text()[-3000:]
    finally:
        code = interrupt(launch)
    text = log.read_text()
    assert code == 0, text[-4000:]
    for spec in graph.telepresence({"bridge": "false"}):
        finished = rf"\[{spec.module}-\d+\]: process has finished cleanly"
        assert re.search(finished, text), (spec.name, text[-4000:])
    died = re.findall(r"\[([a-z_]+-\d+)\]: process has died", text)
    assert died == ["driver-1"] and "Traceback" not in text, text[-4000:]  # only the killed one
    assert "SIGTERM" not in text, "a node needed launch's escalation to stop"
