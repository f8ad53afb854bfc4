"""Hardening: no single message, request or transition stops a node, and refusals are explained.

The graph runs as real processes over DDS (tests/test_faults.py: Graph, Observer), fed by real rclpy
publishers and service clients in this process. The bounded fuzz run at the end covers every input:
each subscribed message type, the services, and the bridge's HTTP and data-channel inputs; a longer
run is bench/fuzz_bench.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import wait_for
from test_faults import Graph, Observer

from gaga_ros.camera import frontal_transform
from gaga_ros.expression import Expression, ExpressionError, FaceModel


@pytest.fixture(scope="module")
def graph(tmp_path_factory, media_dir):
    from fuzzing import graph_params

    work = tmp_path_factory.mktemp("hardening")
    g = Graph(work, graph_params(work, media_dir))
    obs = Observer()
    g.start_all()
    try:
        assert obs.serving(timeout=180), "\n".join(f"--- {n}\n{g.log(n)[-1500:]}" for n in g.procs)
        assert wait_for(lambda: all(obs.status(n)[0] >= 0 for n in g.procs), timeout=30), obs.diag
        yield g, obs
    finally:
        g.stop()
        obs.close()


def alive(g: Graph) -> list[str]:
    """Names of the nodes whose process has exited (empty when all run)."""
    return [n for n, p in g.procs.items() if p.poll() is not None]


def stamped(msg, sec: int, nanosec: int = 0):
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
    return msg


# ---- core ranges ------------------------------------------------------------------------------

def mesh_expression(**kw) -> Expression:
    from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES

    return Expression(face_model=FaceModel.MESH, vertices=kw.pop("vertices", CANONICAL_VERTICES), **kw)


@pytest.mark.parametrize("case", ["vertices 3e38", "camera at z = 0", "camera behind the head",
                                  "coefficient 1e6"])
def test_finite_but_absurd_expressions_are_refused_with_the_range(case):
    from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES

    behind = frontal_transform()
    behind[2, 3] = -9.0
    make = {
        "vertices 3e38": lambda: mesh_expression(vertices=np.full_like(CANONICAL_VERTICES, 3e38)),
        "camera at z = 0": lambda: mesh_expression(transform=frontal_transform(0.0)),
        "camera behind the head": lambda: mesh_expression(transform=behind),
        "coefficient 1e6": lambda: Expression(face_model=FaceModel.FLAME, expression=np.array([1e6])),
    }[case]
    with pytest.raises(ExpressionError) as err:
        make()
    assert "accepted" in str(err.value) and any(c.isdigit() for c in str(err.value)), err.value
    mesh_expression()  # the valid neighbour still passes


def test_every_node_is_guarded():
    """Each node executable's class runs its callbacks under a Guard (gaga_ros/nodes/guard.py)."""
    import importlib
    import inspect
    import pkgutil

    import gaga_ros.nodes
    from gaga_ros.nodes.guard import Guarded

    nodes = {}
    for info in pkgutil.iter_modules(gaga_ros.nodes.__path__):
        module = importlib.import_module(f"gaga_ros.nodes.{info.name}")
        if hasattr(module, "main"):
            nodes[info.name] = [c for _, c in inspect.getmembers(module, inspect.isclass)
                                if c.__module__ == module.__name__ and c.__name__.endswith("Node")]
    assert len(nodes) >= 8, nodes
    for name, classes in nodes.items():
        assert classes and all(issubclass(c, Guarded) for c in classes), (name, classes)


@pytest.mark.parametrize("case", ["means 1e6", "negative scale", "scale 1e4", "opacity 2", "zero quaternion",
                                  "follow -1"])
def test_finite_but_absurd_avatars_are_refused_with_the_range(case):
    from gaga_ros.avatar.base import Avatar, AvatarError
    from gaga_ros.avatar.geometric import GeometricAvatar
    from gaga_ros.source import default_source

    fields = GeometricAvatar(grid=32).reconstruct(default_source()).to_arrays()
    Avatar.from_arrays(fields)  # the valid one passes
    name, index, value = {"means 1e6": ("means", 0, 1e6), "negative scale": ("scales", 1, -0.01),
                          "scale 1e4": ("scales", 2, 1e4), "opacity 2": ("opacities", 0, 2.0),
                          "zero quaternion": ("quats", slice(0, 4), 0.0),
                          "follow -1": ("binding_follow", 0, -1.0)}[case]
    fields[name] = fields[name].copy()
    fields[name][index] = value
    with pytest.raises(AvatarError) as err:
        Avatar.from_arrays(fields)
    assert name in str(err.value) and "accepted" in str(err.value), err.value


# ---- one message ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_negative_stamp_on_every_topic_stops_nothing(graph, media_dir):
    """The reproduced crash: sec = -1 on /avatar/expression, /avatar/image and /camera/image_raw."""
    from sensor_msgs.msg import Image

    from gaga_ros.driver import ScriptedDriver
    from gaga_ros.msg import Expression as ExpressionMsg
    from gaga_ros.nodes import qos
    from gaga_ros.nodes.expression_msg import to_msg as expression_to_msg
    from gaga_ros.nodes.image_msg import to_msg as image_to_msg
    from gaga_ros.source import load_image

    g, obs = graph
    face = load_image(media_dir / "monroe.jpg")[::4, ::4].copy()
    expr = expression_to_msg(ScriptedDriver().expression_at(0.5), obs.node.get_clock().now().to_msg())
    pubs = {"/avatar/expression": (obs.publisher(ExpressionMsg, "/avatar/expression", qos.EXPRESSIONS),
                                   stamped(expr, -1)),
            "/avatar/image": (obs.publisher(Image, "/avatar/image", qos.FRAMES),
                              image_to_msg(np.zeros((64, 64, 3), np.uint8), stamped(expr, -1).header.stamp,
                                           "x")),
            "/camera/image_raw": (obs.publisher(Image, "/camera/image_raw", qos.FRAMES), None)}
    assert wait_for(lambda: all(p.get_subscription_count() > 0 for p, _ in pubs.values()), timeout=20)
    tracked = int(obs.status("tracking")[2].get("expressions", 0))
    for _ in range(5):
        for topic, (pub, msg) in pubs.items():
            if topic == "/camera/image_raw":
                msg = image_to_msg(face, stamped(expr, -1).header.stamp, "camera")
            pub.publish(msg)
        time.sleep(0.2)  # pacing for the one-slot mailboxes, so each message is handled
    assert not alive(g), {n: g.log(n)[-2000:] for n in alive(g)}
    assert obs.serving(timeout=20), "frames stopped"
    # the tracking worker is alive: a face with a negative stamp still becomes an expression
    assert wait_for(lambda: int(obs.status("tracking")[2].get("expressions", 0)) > tracked, timeout=20), \
        obs.status("tracking")
    assert not alive(g), {n: g.log(n)[-2000:] for n in alive(g)}


@pytest.mark.slow
def test_refused_messages_turn_diagnostics_warn_with_the_reason(graph):
    from sensor_msgs.msg import Image

    from gaga_ros.nodes import qos

    g, obs = graph
    pub = obs.publisher(Image, "/avatar/image", qos.FRAMES)
    bad = Image(width=4, height=4, encoding="bayer_rggb8", step=4, data=bytes(16))
    before = {n: int(obs.status(n)[2].get("refused_inputs", 0)) for n in ("recorder", "bridge")}

    def refused(node: str) -> bool:
        pub.publish(bad)
        level, message, values = obs.status(node)
        return level == 1 and "bayer_rggb8" in message and int(values.get("refused_inputs", 0)) > before[node]

    assert wait_for(lambda: refused("recorder"), timeout=20, interval=0.2), obs.status("recorder")
    assert wait_for(lambda: refused("bridge"), timeout=20, interval=0.2), obs.status("bridge")
    assert not alive(g)


# ---- lifecycle and services ---------------------------------------------------------------------

def change_state(obs, node: str, transition_id: int = 0, label: str = ""):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    req = ChangeState.Request(transition=Transition(id=transition_id, label=label))
    return obs.call(ChangeState, f"/{node}/change_state", req, timeout=30)


@pytest.mark.slow
def test_transitions_that_are_not_allowed_are_refused_and_the_state_kept(graph):
    from lifecycle_msgs.msg import Transition

    g, obs = graph
    refused = int(obs.status("render")[2].get("refused_inputs", 0))
    resp = change_state(obs, "render", label="activate")  # already active
    assert resp is not None and not resp.success
    assert obs.serving(timeout=20), "render stopped serving after a refused activate"
    results: list[bool] = []
    calls = [threading.Thread(target=lambda: results.append(
        change_state(obs, "render", Transition.TRANSITION_DEACTIVATE).success)) for _ in range(2)]
    for t in calls:
        t.start()
    for t in calls:
        t.join(60)
    assert sorted(results) == [False, True], results  # one deactivates, the other is refused
    assert change_state(obs, "render", label="activate").success
    assert obs.serving(timeout=30)
    assert "activate is not allowed while active" in g.log("render"), g.log("render")[-2000:]
    assert wait_for(lambda: int(obs.status("render")[2].get("refused_inputs", 0)) >= refused + 2,
                    timeout=10), obs.status("render")  # the refused activate and deactivate
    assert not alive(g)


@pytest.mark.slow
def test_set_source_on_an_inactive_node_is_refused(graph):
    from gaga_ros.srv import SetSource

    g, obs = graph
    assert change_state(obs, "reconstruction", label="deactivate").success
    try:
        resp = obs.call(SetSource, "/avatar/set_source", SetSource.Request(path="monroe.jpg"), timeout=60)
        assert resp is not None and not resp.success
        assert "not active" in resp.message and "activate" in resp.message, resp.message
    finally:
        assert change_state(obs, "reconstruction", label="activate").success
    assert obs.serving() and not alive(g)


# ---- a worker that dies ---------------------------------------------------------------------

WORKER_NODE = textwrap.dedent("""
    import threading
    from gaga_ros.nodes.diagnostics import OK, Diagnostics
    from gaga_ros.nodes.guard import GuardedNode
    from gaga_ros.nodes.runtime import spin

    class Doomed(GuardedNode):
        def __init__(self):
            super().__init__("doomed")
            self.diagnostics = Diagnostics(self, lambda: (OK, "fine", {}))
            self.go = threading.Event()
            self.create_subscription(__import__("std_msgs.msg").msg.Empty, "/doomed/go",
                                     lambda m: self.go.set(), 1)
            self.guard.worker("doomed", self.work)

        def work(self):
            self.go.wait()
            raise RuntimeError("a bug in the worker")

    spin(Doomed)
""")


@pytest.mark.slow
def test_a_worker_that_dies_says_error_and_ends_the_process(tmp_path):
    from std_msgs.msg import Empty

    from gaga_ros.nodes.guard import EXIT_WORKER_DIED

    obs = Observer()
    proc = subprocess.Popen([sys.executable, "-c", WORKER_NODE], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: obs.status("doomed")[0] == 0, timeout=60), obs.diag
        pub = obs.publisher(Empty, "/doomed/go", 1)
        assert wait_for(lambda: pub.get_subscription_count() > 0, timeout=20)
        pub.publish(Empty())
        assert proc.wait(30) == EXIT_WORKER_DIED
        assert wait_for(lambda: obs.status("doomed")[0] == 2, timeout=10), obs.status("doomed")
        assert "worker doomed died" in obs.status("doomed")[1]
        assert "a bug in the worker" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        obs.close()


# ---- the fuzzer -------------------------------------------------------------------------------

#: Examples per input in CI (bench/fuzz_bench.py runs many more).
FUZZ_EXAMPLES = int(os.environ.get("GAGA_FUZZ_EXAMPLES", "40"))


@pytest.mark.slow
def test_fuzz_every_input_of_the_running_graph(graph, media_dir):
    from fuzzing import csrf_headers, run_all

    g, obs = graph
    report = run_all(g, obs, FUZZ_EXAMPLES, media_dir, lambda: csrf_headers(g))
    assert not alive(g), {n: g.log(n)[-3000:] for n in alive(g)}
    for target, row in report.items():
        assert row["sent"] > 0, (target, row)
        assert row["unexplained"] == 0, (target, row)
    assert obs.serving(timeout=30), "frames stopped after the fuzz run"
