"""Every driver drives every avatar backend through the real nodes over DDS: with the synthetic FLAME
and a tiny GAGAvatar in a temporary models folder, reconstruction and render pick GAGAvatar and
render FLAME-mode expressions and MESH-mode drivers (the scripted driver, mesh tracking of a real
clip); with FLAME alone, FLAME-mode expressions drive the geometric avatar."""

from contextlib import contextmanager

import numpy as np
from conftest import start_node, stop_process, wait_for
from test_gagavatar_backend import make_models_dir


@contextmanager
def gagavatar_graph(ros_node, tmp_path):
    """Reconstruction and render on the tiny GAGAvatar; yields (avatar message, frames received,
    the render process) once the avatar is latched."""
    from sensor_msgs.msg import Image

    from gaga_ros.msg import GaussianAvatar
    from gaga_ros.nodes import qos

    models = make_models_dir(tmp_path / "models")
    common = {"models_dir": str(models), "gagavatar_config": "tiny"}
    avatars: list[GaussianAvatar] = []
    frames: list[Image] = []
    ros_node.create_subscription(GaussianAvatar, "/avatar/model", avatars.append, qos.LATCHED)
    ros_node.create_subscription(Image, "/avatar/image", frames.append, qos.FRAMES)
    recon = start_node("reconstruction", params={**common, "backend": "auto"}, tmp_path=tmp_path)
    render = start_node("render", params={**common, "device": "cpu", "size": 128}, tmp_path=tmp_path)
    try:
        assert wait_for(lambda: avatars, timeout=150), stop_process(recon)
        assert avatars[0].backend == "gagavatar" and avatars[0].feature_dim == 32
        yield avatars[0], frames, render
    finally:
        stop_process(render)
        stop_process(recon)


def test_gagavatar_nodes_render_flame_expressions(ros_node, tmp_path):
    from gaga_ros.expression import Expression, FaceModel
    from gaga_ros.msg import Expression as ExpressionMsg
    from gaga_ros.nodes import qos
    from gaga_ros.nodes.expression_msg import to_msg

    pub = ros_node.create_publisher(ExpressionMsg, "/avatar/expression", qos.EXPRESSIONS)
    with gagavatar_graph(ros_node, tmp_path) as (avatar, frames, render):
        transform = np.asarray(avatar.source_transform, np.float32)

        def send():
            expr = Expression(FaceModel.FLAME, transform=transform, jaw_pose=[0.2, 0, 0])
            pub.publish(to_msg(expr, ros_node.get_clock().now().to_msg()))
            return len(frames) >= 3

        assert wait_for(send, timeout=120, interval=0.5), stop_process(render)
        assert frames[0].width == 128 and frames[0].encoding == "rgb8"


def test_gagavatar_nodes_render_mesh_drivers(ros_node, tmp_path, media_dir):
    """The default scripted driver and mesh tracking of a real clip (obama.mp4) both send MESH mode;
    the GAGAvatar render node converts them to FLAME and renders them. Each driver runs alone, and
    only frames stamped after it started count (a frame carries its expression's stamp)."""
    from gaga_ros.nodes import stamps

    drivers = {"scripted": [("driver", {})],
               "mesh tracking": [("capture", {"source": str(media_dir / "obama.mp4"), "rate": 15.0}),
                                 ("tracking", {"mode": "mesh"})]}
    with gagavatar_graph(ros_node, tmp_path) as (_, frames, render):
        for label, nodes in drivers.items():
            start = ros_node.get_clock().now().nanoseconds

            def mine() -> list:
                return [f for f in list(frames) if stamps.to_ns(f.header.stamp) > start]  # noqa: B023

            procs = [start_node(name, params=params, tmp_path=tmp_path) for name, params in nodes]
            try:
                if not wait_for(lambda: len(mine()) >= 3, timeout=150, interval=0.2):  # noqa: B023
                    logs = "\n".join(stop_process(p) for p in [render, *procs])
                    raise AssertionError(f"no GAGAvatar frames while {label} drove:\n{logs}")
            finally:
                for proc in procs:
                    stop_process(proc)
            assert mine()[0].width == 128 and mine()[0].encoding == "rgb8"


def test_flame_stream_drives_the_geometric_avatar(ros_node, tmp_path, monkeypatch):
    """FLAME-mode expressions (a FLAME tracker, JSON, another robot) drive the asset-free avatar:
    with only FLAME in the models folder the reconstruction picks the geometric backend, and the
    render node converts FLAME to mesh; the frames change with the expression."""
    from sensor_msgs.msg import Image

    from gaga_ros.expression import Expression, FaceModel
    from gaga_ros.faces.synthetic_flame import write_synthetic_flame
    from gaga_ros.msg import Expression as ExpressionMsg
    from gaga_ros.msg import GaussianAvatar
    from gaga_ros.nodes import qos, stamps
    from gaga_ros.nodes.expression_msg import to_msg
    from gaga_ros.nodes.image_msg import from_msg

    models = tmp_path / "models"
    write_synthetic_flame(models / "flame", seed=0)
    monkeypatch.setenv("GAGA_ROS_MODELS", str(models))  # the render node's geometric backend reads it
    avatars: list[GaussianAvatar] = []
    frames: dict[int, Image] = {}
    ros_node.create_subscription(GaussianAvatar, "/avatar/model", avatars.append, qos.LATCHED)
    ros_node.create_subscription(Image, "/avatar/image",
                                 lambda m: frames.setdefault(stamps.to_ns(m.header.stamp), m), qos.FRAMES)
    pub = ros_node.create_publisher(ExpressionMsg, "/avatar/expression", qos.EXPRESSIONS)
    recon = start_node("reconstruction", params={"backend": "auto", "grid": 64}, tmp_path=tmp_path)
    render = start_node("render", params={"device": "cpu", "size": 128}, tmp_path=tmp_path)
    try:
        assert wait_for(lambda: avatars, timeout=150), stop_process(recon)
        assert avatars[0].backend == "geometric"

        def shown(expr: Expression) -> np.ndarray:
            """Publish until the frame stamped with this expression's stamp arrives."""
            stamp = ros_node.get_clock().now().to_msg()
            ns = stamps.to_ns(stamp)
            ok = wait_for(lambda: pub.publish(to_msg(expr, stamp)) or ns in frames, timeout=120, interval=0.5)
            assert ok, stop_process(render)
            return from_msg(frames[ns]).astype(np.float64)

        neutral = shown(Expression(FaceModel.FLAME))
        again = shown(Expression(FaceModel.FLAME))
        opened = shown(Expression(FaceModel.FLAME, jaw_pose=[0.3, 0, 0], expression=np.full(10, 2.0)))
        noise = np.abs(again - neutral).mean()
        assert np.abs(opened - neutral).mean() > 0.5 + 5 * noise, (noise, np.abs(opened - neutral).mean())
    finally:
        stop_process(render)
        stop_process(recon)
