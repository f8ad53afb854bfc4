"""The GAGAvatar backend in the graph (tiny config, synthetic FLAME): reconstruction and render
nodes pick it from the models folder and render FLAME-mode expressions over real DDS."""

import numpy as np
from conftest import start_node, stop_process, wait_for
from test_gagavatar_backend import make_models_dir


def test_gagavatar_nodes_render_flame_expressions(ros_node, tmp_path):
    from sensor_msgs.msg import Image

    from gaga_ros.expression import Expression, FaceModel
    from gaga_ros.msg import Expression as ExpressionMsg
    from gaga_ros.msg import GaussianAvatar
    from gaga_ros.nodes import qos
    from gaga_ros.nodes.expression_msg import to_msg

    models = make_models_dir(tmp_path / "models")
    common = {"models_dir": str(models), "gagavatar_config": "tiny"}
    avatars: list[GaussianAvatar] = []
    frames: list[Image] = []
    ros_node.create_subscription(GaussianAvatar, "/avatar/model", avatars.append, qos.LATCHED)
    ros_node.create_subscription(Image, "/avatar/image", frames.append, qos.FRAMES)
    pub = ros_node.create_publisher(ExpressionMsg, "/avatar/expression", qos.EXPRESSIONS)
    recon = start_node("reconstruction", params={**common, "backend": "auto"}, tmp_path=tmp_path)
    render = start_node("render", params={**common, "device": "cpu", "size": 128}, tmp_path=tmp_path)
    try:
        assert wait_for(lambda: avatars, timeout=150), stop_process(recon)
        assert avatars[0].backend == "gagavatar" and avatars[0].feature_dim == 32
        transform = np.asarray(avatars[0].source_transform, np.float32)

        def send():
            expr = Expression(FaceModel.FLAME, transform=transform, jaw_pose=[0.2, 0, 0])
            pub.publish(to_msg(expr, ros_node.get_clock().now().to_msg()))
            return len(frames) >= 3

        assert wait_for(send, timeout=120, interval=0.5), stop_process(render)
        assert frames[0].width == 128 and frames[0].encoding == "rgb8"
    finally:
        stop_process(render)
        stop_process(recon)
