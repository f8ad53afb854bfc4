"""Every custom interface round-trips through real DDS; the graph description and launch file hold."""

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, wait_for

from gaga_ros import graph


def _roundtrip(node, msg_type, msg, qos):
    got = []
    node.create_subscription(msg_type, "/test/roundtrip", got.append, qos)
    pub = node.create_publisher(msg_type, "/test/roundtrip", qos)
    assert wait_for(lambda: (pub.publish(msg) or True) and len(got) > 0, timeout=10, interval=0.2)
    return got[0]


def test_expression_roundtrip(ros_node):
    from gaga_ros.msg import Expression
    from gaga_ros.nodes import qos

    msg = Expression(face_model=Expression.FACE_MODEL_MESH, confidence=0.75)
    msg.header.stamp.sec, msg.header.frame_id = 123, "cam"
    msg.expression = np.arange(100, dtype=np.float32).tolist()
    msg.jaw_pose = np.array([0.1, 0, 0], np.float32)
    msg.eye_pose = np.arange(6, dtype=np.float32)
    msg.vertices = np.linspace(-1, 1, 478 * 3, dtype=np.float32).tolist()
    msg.transform = np.arange(12, dtype=np.float32)
    out = _roundtrip(ros_node, Expression, msg, qos.EXPRESSIONS)
    assert out.header.stamp.sec == 123 and out.header.frame_id == "cam"
    assert out.face_model == Expression.FACE_MODEL_MESH and out.confidence == pytest.approx(0.75)
    np.testing.assert_array_equal(out.expression, msg.expression)
    np.testing.assert_array_equal(out.vertices, msg.vertices)
    np.testing.assert_array_equal(out.transform, msg.transform)
    np.testing.assert_array_equal(out.eye_pose, msg.eye_pose)


def test_gaussian_avatar_roundtrip_latched(ros_node):
    """A subscriber that joins after publication still gets the avatar (transient-local)."""
    from gaga_ros.msg import GaussianAvatar
    from gaga_ros.nodes import qos

    n = 5000
    rng = np.random.default_rng(0)
    msg = GaussianAvatar(avatar_id="abc", backend="geometric", num_gaussians=n, feature_dim=3)
    msg.means = rng.normal(size=n * 3).astype(np.float32).tolist()
    msg.features = rng.random(n * 3, dtype=np.float32).tolist()
    msg.binding_triangle = rng.integers(0, 900, n).astype(np.uint32).tolist()
    msg.extra = b"\x01\x02"
    pub = ros_node.create_publisher(GaussianAvatar, "/test/avatar", qos.LATCHED)
    pub.publish(msg)
    got = []
    ros_node.create_subscription(GaussianAvatar, "/test/avatar", got.append, qos.LATCHED)
    assert wait_for(lambda: got, timeout=10)
    out = got[0]
    assert out.avatar_id == "abc" and out.num_gaussians == n
    np.testing.assert_array_equal(out.means, msg.means)
    np.testing.assert_array_equal(out.binding_triangle, msg.binding_triangle)
    assert bytes(out.extra) == b"\x01\x02"


def test_tracking_status_roundtrip(ros_node):
    from gaga_ros.msg import TrackingStatus
    from gaga_ros.nodes import qos

    msg = TrackingStatus(face_found=False, confidence=0.0, face_lost_seconds=2.5, message="no face")
    out = _roundtrip(ros_node, TrackingStatus, msg, qos.LATCHED)
    assert not out.face_found and out.face_lost_seconds == pytest.approx(2.5) and out.message == "no face"


def test_set_source_service_roundtrip(ros_node):
    from gaga_ros.srv import SetSource

    def handle(req, resp):
        resp.success = req.path == "me.jpg" and req.image.width == 4
        resp.message, resp.avatar_id = f"got {req.path}", "id42"
        return resp

    ros_node.create_service(SetSource, "/test/set_source", handle)
    client = ros_node.create_client(SetSource, "/test/set_source")
    assert client.wait_for_service(timeout_sec=10)
    req = SetSource.Request(path="me.jpg")
    req.image.width = 4
    future = client.call_async(req)
    assert wait_for(future.done, timeout=10)
    resp = future.result()
    assert resp.success and resp.message == "got me.jpg" and resp.avatar_id == "id42"


def test_graph_description_is_valid():
    for driver in graph.DRIVERS:
        args = {"driver": driver, "video": "x.mp4"}
        specs = graph.telepresence(args)
        names = [s.name for s in specs]
        assert len(names) == len(set(names))
        assert {"gaga_reconstruction", "gaga_render"} <= set(names)
        for spec in specs:
            assert importlib.util.find_spec(f"gaga_ros.nodes.{spec.module}") is not None, spec.module
    assert [s.name for s in graph.telepresence()][0] == "gaga_driver"
    assert all(s.name == f"gaga_{s.module}" and s.namespace == "" for s in graph.telepresence())
    with pytest.raises(ValueError, match="unknown launch arguments"):
        graph.telepresence({"bogus": "1"})
    with pytest.raises(ValueError, match="driver"):
        graph.telepresence({"driver": "telepathy"})
    topic = graph.telepresence({"driver": "topic", "camera_transport": "compressed"})
    assert "gaga_capture" not in [s.name for s in topic]
    assert next(s for s in topic if s.name == "gaga_tracking").parameters == {
        "camera_transport": "compressed", "mode": "auto"}
    video = graph.telepresence({"driver": "video", "video": "x.mp4", "tracking": "flame"})
    assert next(s for s in video if s.name == "gaga_tracking").parameters == {"mode": "flame"}
    with pytest.raises(ValueError, match="tracking 'landmarks' is not one of mesh, flame, auto"):
        graph.telepresence({"driver": "webcam", "tracking": "landmarks"})
    with pytest.raises(ValueError, match="driver:=topic"):
        graph.telepresence({"driver": "video", "video": "x.mp4", "camera_transport": "compressed"})
    placed = graph.telepresence({"namespace": "/robot1/", "port": "8081"})
    assert {s.qualified for s in placed} >= {"/robot1/gaga_render", "/robot1/gaga_bridge"}
    assert next(s for s in placed if s.module == "bridge").parameters == {"port": 8081}
    assert next(s for s in graph.telepresence() if s.module == "bridge").parameters == {"port": 8080}
    fleet_served = graph.telepresence({"namespace": "robot1", "render": "false"})  # a fleet node renders it
    assert "gaga_render" not in [s.name for s in fleet_served] and "gaga_reconstruction" in [
        s.name for s in fleet_served]
    with pytest.raises(ValueError, match="namespace '1robot': accepted are names"):
        graph.telepresence({"namespace": "1robot"})
    with pytest.raises(ValueError, match="port 'http': accepted is a TCP port"):
        graph.telepresence({"port": "http"})
    for profile in ("demo", "gpu", "kiosk"):
        assert graph.profile_file(profile).is_file()
    with pytest.raises(ValueError, match="known are"):
        graph.profile_file("nope")


def test_node_parameters_are_what_a_launch_gives():
    """A profile's parameters overlaid by the graph's: what tests and benches that start the nodes
    themselves use, so a default in either reaches them."""
    loop = graph.node_parameters(graph.telepresence({"driver": "operator", "port": "8081"}), "demo")
    assert loop["render"] == {"device": "cpu", "size": 256}  # the profile's alone
    assert loop["bridge"]["port"] == 8081 and loop["bridge"]["host"] == "127.0.0.1"  # the graph's wins
    assert loop["bridge"]["operator_drives"] is True and loop["bridge"]["operator_fps"] == 15.0
    assert loop["tracking"] == {"min_confidence": 0.5, "mode": "auto"}
    assert set(loop) == {s.module for s in graph.telepresence({"driver": "operator"})}
    assert graph.node_parameters(graph.telepresence(), "kiosk")["render"]["size"] == 512
    with pytest.raises(ValueError, match="known are"):
        graph.node_parameters(graph.telepresence(), "nope")


def test_launch_file_static():
    """The launch file builds its nodes from gaga_ros.graph (so the graph is written once)."""
    source = (REPO / "launch" / "telepresence.launch.py").read_text()
    tree = ast.parse(source)
    funcs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    assert "graph.telepresence" in source and "graph.profile_file" in source
    assert "Node(" not in source.replace("LifecycleNode", "").replace("kind(", "") or "kind(" in source


def test_launch_file_loads_with_launch_ros():
    if importlib.util.find_spec("launch_ros") is None:
        pytest.skip("launch_ros is not installed (it is not on PyPI); checked statically above")
    from launch import LaunchContext
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    desc = PythonLaunchDescriptionSource(str(Path(REPO / "launch" / "telepresence.launch.py")))
    assert desc.get_launch_description(LaunchContext()) is not None


#: Import name -> rosdep key (package.xml) of what the package imports from outside the standard library.
ROSDEP_KEYS = {"numpy": "python3-numpy", "yaml": "python3-yaml", "aiohttp": "python3-aiohttp",
               "cv2": "python3-opencv", "PIL": "python3-pil", "scipy": "python3-scipy",
               "skimage": "python3-skimage", "rclpy": "rclpy", "sensor_msgs": "sensor_msgs",
               "std_msgs": "std_msgs", "diagnostic_msgs": "diagnostic_msgs", "geometry_msgs": "geometry_msgs",
               "rcl_interfaces": "rcl_interfaces",
               "std_srvs": "std_srvs", "lifecycle_msgs": "lifecycle_msgs", "rosgraph_msgs": "rosgraph_msgs",
               "builtin_interfaces": "builtin_interfaces",
               "ament_index_python": "ament_index_python", "launch": "launch", "launch_ros": "launch_ros"}
#: Import name -> pip distribution (requirements-core.txt) of the pip-only dependencies
#: (package.xml says why).
PIP_ONLY = {"torch": "torch", "gsplat": "gsplat", "mediapipe": "mediapipe", "aiortc": "aiortc", "av": "av",
            "numba": "numba", "mcap": "mcap", "mcap_ros2": "mcap-ros2-support"}
#: Imported only when present: a progress bar; Triton, which torch's CUDA wheels install and only
#: the GPU rasterization path (gaga_ros/render/static_splat.py) imports.
OPTIONAL = {"tqdm", "triton"}


def _third_party_imports() -> set[str]:
    names = set()
    for path in [*(REPO / "gaga_ros").rglob("*.py"), *(REPO / "launch").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"gaga_ros"}


def test_package_xml_declares_every_import():
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3"
    deps = {e.text for e in root if e.tag in ("depend", "exec_depend")}
    assert "rosidl_default_runtime" in deps
    requirements = (REPO / "requirements-core.txt").read_text().splitlines()
    pinned = {line.split("==")[0].lower() for line in requirements if "==" in line}
    for name in sorted(_third_party_imports() - OPTIONAL):
        if name in PIP_ONLY:
            assert PIP_ONLY[name] in pinned, f"{name}: pin {PIP_ONLY[name]} in requirements-core.txt"
        else:
            assert name in ROSDEP_KEYS, f"{name}: add its rosdep key to package.xml and ROSDEP_KEYS"
            assert ROSDEP_KEYS[name] in deps, f"{name}: package.xml lacks <exec_depend>{ROSDEP_KEYS[name]}"
    maint = root.find("maintainer")
    assert maint is not None and "@" in maint.get("email", "")
