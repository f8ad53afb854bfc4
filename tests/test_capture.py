"""The capture node publishes a real video over real DDS to a subscriber in another process."""

import time

import numpy as np
import pytest
from conftest import start_node, stop_process, wait_for

from gaga_ros.capture import CaptureError, FrameSource


def test_capture_node_publishes_video_at_rate(ros_node, media_dir, tmp_path):
    from sensor_msgs.msg import Image

    from gaga_ros.nodes import qos
    from gaga_ros.nodes.image_msg import from_msg

    received: list[tuple[float, Image]] = []
    ros_node.create_subscription(Image, "/camera/image_raw",
                                 lambda m: received.append((time.monotonic(), m)), qos.FRAMES)
    rate = 20.0
    proc = start_node("capture", params={"source": str(media_dir / "obama.mp4"), "rate": rate,
                                         "frame_id": "test_cam"}, tmp_path=tmp_path)
    try:
        assert wait_for(lambda: len(received) >= 70, timeout=40), (
            f"only {len(received)} frames; node said:\n{stop_process(proc)}")
    finally:
        log = stop_process(proc)
    msgs = [m for _, m in received]
    first = from_msg(msgs[0])
    assert first.ndim == 3 and first.shape[2] == 3 and first.std() > 10  # a real picture
    assert all(m.encoding == "rgb8" and m.header.frame_id == "test_cam" for m in msgs)
    assert len({(m.width, m.height) for m in msgs}) == 1
    stamps = np.array([m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in msgs])
    assert np.all(np.diff(stamps) > 0), "stamps must increase"
    # rate from the stamps over the steady part (skip start-up), within 10% of the configured rate
    steady = stamps[10:]
    measured = (len(steady) - 1) / (steady[-1] - steady[0])
    assert abs(measured - rate) / rate < 0.10, f"measured {measured:.2f} Hz, log:\n{log}"
    arrivals = np.array([t for t, _ in received[10:]])
    assert abs((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) - rate) / rate < 0.10


def test_capture_node_refuses_missing_source(tmp_path):
    proc = start_node("capture", params={"source": str(tmp_path / "nope.mp4")}, tmp_path=tmp_path)
    proc.wait(timeout=30)
    out = proc.stdout.read()
    assert proc.returncode == 2
    assert "does not exist" in out and "accepted" in out


def test_frame_sources(media_dir, tmp_path):
    import cv2

    video = FrameSource(str(media_dir / "obama.mp4"), loop=False)
    frames = 0
    while video.read() is not None:
        frames += 1
    assert frames > 30
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), i * 50, np.uint8))
    folder = FrameSource(str(tmp_path), loop=True)
    values = [int(folder.read()[0, 0, 0]) for _ in range(4)]
    assert values == [0, 50, 100, 0]
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(CaptureError, match="cannot be decoded"):
        FrameSource(str(tmp_path / "broken.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptureError, match="holds no images"):
        FrameSource(str(tmp_path / "empty"))
