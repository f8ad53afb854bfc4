"""FLAME-mode tracking of a real video: FlameTracker alone, then through the tracking node.

The FLAME asset is the synthetic one (the real model is licensed), so these check that real mediapipe
landmarks drive valid FLAME-mode expressions, not their accuracy: the synthetic head's landmark
layout differs from a real face (a rigid fit to obama.mp4 is ~13 px off), so its fitted pose on a
real face is not meaningful (it tilts the head by 20-60 degrees and moves the camera to 4-8 units
to match proportions; with the real FLAME the distance is ~9).
"""

import cv2
import numpy as np
import pytest
import torch
from conftest import start_node, stop_process, wait_for

from gaga_ros.conventions import CROP_SIZE
from gaga_ros.expression import FaceModel
from gaga_ros.faces.synthetic_flame import make_synthetic_flame, write_synthetic_flame
from gaga_ros.tracking.flame_tracker import FlameTracker


@pytest.fixture(scope="module")
def obama_frames(media_dir):
    cap = cv2.VideoCapture(str(media_dir / "obama.mp4"))
    frames = []
    while len(frames) < 24:
        ok, bgr = cap.read()
        assert ok, "obama.mp4 has fewer than 24 frames"
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


@pytest.mark.usefixtures("one_torch_thread")
def test_tracker_on_real_video_gives_valid_flame_expressions(obama_frames):
    tracker = FlameTracker(make_synthetic_flame(0), identity_frames=4)
    try:
        outs, shapes = [], []
        for i, frame in enumerate(obama_frames):
            outs.append(tracker.update(frame, stamp_ns=i * 41_666_667))
            shapes.append(tracker.fitter.shape.clone())
        assert all(o is not None for o in outs), "a face in every frame of obama.mp4"
        assert all(torch.equal(shapes[3], s) for s in shapes[4:]), "identity held after 4 frames"
        for i, out in enumerate(outs):
            assert out.face_model == FaceModel.FLAME and out.stamp_ns == i * 41_666_667
            assert out.expression.shape == (100,) and np.isfinite(out.expression).all()
            rot = out.transform[:, :3]
            np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-4)
            assert 2 < out.transform[2, 3] < 15, "the head in front of the camera"
            assert 0 < out.confidence <= 1
        # the fit follows the real landmarks to a few crop pixels (mediapipe and iBUG points differ)
        assert tracker.last_fit.landmark_error_px < 0.02 * CROP_SIZE
        assert tracker.timings_ms["landmarks"] > 0 and tracker.timings_ms["fit"] > 0
        assert tracker.update(np.zeros((480, 640, 3), np.uint8), stamp_ns=10**10) is None
        assert not tracker.status.face_found and tracker.status.message == "no face in view"
    finally:
        tracker.close()


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
        assert 2 < msg.transform[11] < 15, "the head in front of the camera (see the module docstring)"
        assert msg.header.stamp.sec > 0
    assert "cannot start" not in log


def test_tracking_node_flame_mode_without_asset_says_how(tmp_path):
    proc = start_node("tracking", params={"mode": "flame", "models_dir": str(tmp_path)}, tmp_path=tmp_path)
    proc.wait(timeout=60)
    out = proc.stdout.read()
    assert proc.returncode == 2 and "fetch-assets" in out
