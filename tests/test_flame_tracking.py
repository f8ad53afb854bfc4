"""FLAME-mode expressions flow from a real video through the tracking node (synthetic FLAME asset)."""

import numpy as np
from conftest import start_node, stop_process, wait_for

from gaga_ros.faces.synthetic_flame import write_synthetic_flame


def test_tracking_node_flame_mode_on_video(ros_node, media_dir, tmp_path):
    from gaga_ros.msg import Expression as ExpressionMsg
    from gaga_ros.nodes import qos

    files = write_synthetic_flame(tmp_path / "models" / "flame", seed=0)
    files.pt.rename(tmp_path / "models" / "flame" / "FLAME_with_eye.pt")
    got: list[ExpressionMsg] = []
    ros_node.create_subscription(ExpressionMsg, "/avatar/expression", got.append, qos.EXPRESSIONS)
    tracking = start_node("tracking", params={"mode": "flame", "models_dir": str(tmp_path / "models"),
                                              "flame_steps": 10}, tmp_path=tmp_path)
    capture = start_node("capture", params={"source": str(media_dir / "obama.mp4"), "rate": 10.0},
                         tmp_path=tmp_path)
    try:
        assert wait_for(lambda: len(got) >= 5, timeout=180), stop_process(tracking)
    finally:
        stop_process(capture)
        log = stop_process(tracking)
    for msg in got:
        assert msg.face_model == ExpressionMsg.FACE_MODEL_FLAME and len(msg.vertices) == 0
        assert 0 < len(msg.expression) <= 100 and np.all(np.isfinite(msg.expression))
        rot = np.asarray(msg.transform).reshape(3, 4)[:, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-4)
        assert 5 < msg.transform[11] < 15, "camera distance near GAGAvatar's ~9"
        assert msg.header.stamp.sec > 0
    assert "cannot start" not in log


def test_tracking_node_flame_mode_without_asset_says_how(tmp_path):
    proc = start_node("tracking", params={"mode": "flame", "models_dir": str(tmp_path)}, tmp_path=tmp_path)
    proc.wait(timeout=60)
    out = proc.stdout.read()
    assert proc.returncode == 2 and "fetch-assets" in out
