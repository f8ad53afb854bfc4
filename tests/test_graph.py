"""The demo graph runs over real DDS: scripted driver -> reconstruction -> render -> /avatar/image."""

import signal
import subprocess
import sys
import time

import numpy as np
from conftest import start_node, stop_process, wait_for

from gaga_ros.driver import PERIOD


def _seconds(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def test_demo_graph_publishes_avatar_frames(ros_node, tmp_path):
    from sensor_msgs.msg import Image

    from gaga_ros.msg import GaussianAvatar
    from gaga_ros.nodes import qos
    from gaga_ros.nodes.image_msg import from_msg

    frames: list[Image] = []
    models: list[GaussianAvatar] = []
    ros_node.create_subscription(Image, "/avatar/image", frames.append, qos.FRAMES)
    ros_node.create_subscription(GaussianAvatar, "/avatar/model", models.append, qos.LATCHED)
    record = tmp_path / "demo.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "gaga_ros.cli", "demo", "--record", str(record),
                             "bridge:=false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait for frames that span one loop of the scripted performance (it turns the head 30 degrees),
    # not for a frame count: on a loaded machine ten frames can fall in a quiet stretch of it.
    def one_loop() -> bool:
        return len(frames) >= 10 and _seconds(frames[-1]) - _seconds(frames[0]) >= PERIOD

    try:
        ok = wait_for(one_loop, timeout=240, interval=0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert ok, f"{len(frames)} frames from the demo graph; it said:\n{out[-3000:]}"
    # one Ctrl-C: every node stops cleanly (a node that needed SIGKILL or printed a traceback fails)
    assert proc.returncode == 0 and "did not stop cleanly" not in out and "Traceback" not in out, out[-3000:]
    assert models and models[0].backend == "geometric" and models[0].num_gaussians > 10000
    images = [from_msg(f) for f in frames]
    assert all(img.shape == (256, 256, 3) for img in images)  # the demo profile's render size
    centre = np.stack([img[64:192, 64:192] for img in images]).astype(np.float32)
    assert centre.mean() > 40, "the avatar's face should fill the centre of the frame"
    moved = np.abs(centre - centre[0]).mean(axis=(1, 2, 3)).max()
    assert moved > 2.0, f"the avatar should move over one loop (largest change {moved:.2f} grey levels)"
    stamps = [_seconds(f) for f in frames]
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False))
    assert abs(time.time() - stamps[-1]) < 10, "stamps are the driver's (wall clock) capture times"
    assert record.is_file() and record.stat().st_size > 1000


def test_render_node_gets_latched_avatar_after_restart(ros_node, tmp_path):
    """A render node started after the avatar was published still receives it (transient-local)."""
    from diagnostic_msgs.msg import DiagnosticArray

    from gaga_ros.msg import GaussianAvatar
    from gaga_ros.nodes import qos

    models: list[GaussianAvatar] = []
    status: dict[str, str] = {}
    ros_node.create_subscription(GaussianAvatar, "/avatar/model", models.append, qos.LATCHED)
    ros_node.create_subscription(
        DiagnosticArray, "/diagnostics",
        lambda m: status.update({s.name: s.message for s in m.status}), 10)
    recon = start_node("reconstruction", tmp_path=tmp_path)
    render = None
    try:
        assert wait_for(lambda: models, timeout=120), stop_process(recon)
        render = start_node("render", params={"device": "cpu", "size": 128}, tmp_path=tmp_path)
        name = "gaga_ros: gaga_render"
        assert wait_for(lambda: status.get(name) == "rendering"
                        or "waiting" not in status.get(name, "waiting"), timeout=60), status
        stop_process(render)
        status.clear()
        render = start_node("render", params={"device": "cpu", "size": 128}, tmp_path=tmp_path)
        assert wait_for(lambda: "gaga_ros: gaga_render" in status
                        and "waiting" not in status["gaga_ros: gaga_render"], timeout=60), status
    finally:
        if render is not None:
            stop_process(render)
        stop_process(recon)


def test_replay_graph_drives_avatar_from_recording(ros_node, tmp_path):
    """`gaga-ros launch replay path:=rec.mcap` renders /avatar/image from recorded expressions."""
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image

    from gaga_ros.driver import ScriptedDriver
    from gaga_ros.nodes import qos
    from gaga_ros.nodes.expression_msg import to_msg
    from gaga_ros.record import Recorder

    path = tmp_path / "rec.mcap"
    driver = ScriptedDriver(fps=30)
    with Recorder(path) as rec:
        rec.add_topic("/avatar/expression", "gaga_ros/msg/Expression")
        for i in range(90):
            msg = to_msg(driver.expression_at(i / 30), ros_node.get_clock().now().to_msg())
            rec.write("/avatar/expression", serialize_message(msg), 1_000_000_000 + i * 33_333_333)
    frames: list[Image] = []
    ros_node.create_subscription(Image, "/avatar/image", frames.append, qos.FRAMES)
    proc = subprocess.Popen([sys.executable, "-m", "gaga_ros.cli", "launch", "replay", f"path:={path}",
                             "loop:=true", "bridge:=false"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        ok = wait_for(lambda: len(frames) >= 5, timeout=150, interval=0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert ok, out[-3000:]


def test_two_namespaced_graphs_side_by_side(ros_node, media_dir):
    """Two telepresence graphs in one ROS graph (namespace:=, port:=): each has its own avatar, topics
    and page, and nothing crosses between them."""
    from sensor_msgs.msg import Image
    from test_bad_input import http_get, http_post
    from test_faults import free_port

    from gaga_ros.msg import GaussianAvatar, NamedExpression
    from gaga_ros.nodes import qos
    from gaga_ros.nodes.image_msg import from_msg

    spaces = {"r1": free_port(), "r2": free_port()}
    frames = {ns: [] for ns in (*spaces, "")}
    models = {ns: [] for ns in spaces}
    named = {ns: [] for ns in spaces}
    for ns in frames:
        ros_node.create_subscription(Image, f"{'/' + ns if ns else ''}/avatar/image", frames[ns].append,
                                     qos.FRAMES)
    for ns in spaces:
        ros_node.create_subscription(GaussianAvatar, f"/{ns}/avatar/model", models[ns].append, qos.LATCHED)
        ros_node.create_subscription(NamedExpression, f"/{ns}/avatar/named_expression", named[ns].append,
                                     qos.EXPRESSIONS)
    sources = {"r1": [], "r2": [f"source:={media_dir / 'monroe.jpg'}"]}
    procs = {ns: subprocess.Popen([sys.executable, "-m", "gaga_ros.cli", "launch", "telepresence",
                                   f"namespace:={ns}", f"port:={port}", *sources[ns]],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for ns, port in spaces.items()}
    outs = {}
    try:
        def pages_up() -> bool:
            return all(http_get(f"http://127.0.0.1:{port}/kiosk")[0] == 200 for port in spaces.values())

        ok = wait_for(lambda: all(len(frames[ns]) >= 3 and models[ns] for ns in spaces), 300, 0.2)
        ok = ok and wait_for(lambda: _quietly(pages_up), 120, 0.5)
        if ok:
            for ns, port in spaces.items():  # each page publishes into its own namespace only
                body = b'{"named": {"jawOpen": 1.0}, "hold_s": 0.5}'
                assert http_post(f"http://127.0.0.1:{port}/expression", body)[0] == 200
                assert wait_for(lambda ns=ns: len(named[ns]) == 1, 30), named
            assert {ns: len(v) for ns, v in named.items()} == {"r1": 1, "r2": 1}
    finally:
        for ns, proc in procs.items():
            proc.send_signal(signal.SIGINT)
            outs[ns] = proc.communicate(timeout=30)[0]
    assert ok, {ns: out[-2000:] for ns, out in outs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {ns: out[-2000:] for ns, out in outs.items()}
    assert not frames[""], "nothing is published outside the namespaces"
    assert models["r1"][0].avatar_id != models["r2"][0].avatar_id  # two people, one avatar each
    r1, r2 = (from_msg(frames[ns][-1]).astype(np.float32) for ns in spaces)
    assert np.abs(r1 - r2).mean() > 10, "each namespace shows its own face"


def _quietly(predicate) -> bool:
    """predicate(), False while the server is not up yet (connection refused)."""
    try:
        return predicate()
    except OSError:
        return False


def test_a_node_honours_namespace_and_remapping(ros_node):
    """Relative names: `__ns` moves a node's topics, and a remap rule renames one of them."""
    from gaga_ros.msg import Expression
    from gaga_ros.nodes import qos

    got = {"/rr/face_cmd": [], "/rr/avatar/expression": [], "/avatar/expression": []}
    for topic, seen in got.items():
        ros_node.create_subscription(Expression, topic, seen.append, qos.EXPRESSIONS)
    proc = start_node("driver", "-r", "__ns:=/rr", "-r", "avatar/expression:=face_cmd")
    try:
        assert wait_for(lambda: len(got["/rr/face_cmd"]) >= 3, timeout=120), stop_process(proc)
        assert ros_node.count_publishers("/rr/avatar/expression") == 0
        assert ros_node.count_publishers("/avatar/expression") == 0
    finally:
        stop_process(proc)
    assert not got["/rr/avatar/expression"] and not got["/avatar/expression"]
