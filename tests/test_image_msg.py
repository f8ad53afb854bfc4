"""Images as ROS users send them: cv_bridge's encodings, YUV 4:2:2 from USB cameras, and JPEG/PNG
CompressedImage (camera_transport:=compressed), on a real face, then through the tracking node."""

import zlib

import av
import cv2
import numpy as np
import pytest
from conftest import start_node, stop_process, wait_for
from sensor_msgs.msg import CompressedImage, Image

from gaga_ros.nodes.image_msg import ENCODINGS, ImageMessageError, from_compressed, from_msg


@pytest.fixture(scope="module")
def face(media_dir) -> np.ndarray:
    """monroe.jpg as RGB, cropped to an even width (4:2:2 pairs pixels)."""
    rgb = cv2.cvtColor(cv2.imread(str(media_dir / "monroe.jpg")), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb[:, : rgb.shape[1] // 2 * 2])


def _message(pixels: np.ndarray, encoding: str) -> Image:
    h, w = pixels.shape[:2]
    data = np.ascontiguousarray(pixels).tobytes()
    return Image(height=h, width=w, encoding=encoding, step=len(data) // h, data=data)


def _encode(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """What a camera driver or cv_bridge user would put in the message, made independently of
    image_msg (FFmpeg's swscale for YUV, OpenCV's channel order for 8UC3)."""
    if encoding in ("yuv422_yuy2", "uyvy", "yuv422"):
        yuyv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuyv422").to_ndarray()
        quads = yuyv.reshape(rgb.shape[0], rgb.shape[1] // 2, 4)  # Y0 U Y1 V
        if encoding != "yuv422_yuy2":
            quads = quads[:, :, [1, 0, 3, 2]]  # U Y0 V Y1
        return quads.reshape(rgb.shape[0], rgb.shape[1], 2)
    if encoding in ("bgr8", "8UC3"):
        return rgb[:, :, ::-1]
    if encoding in ("rgba8", "bgra8"):
        colour = rgb if encoding == "rgba8" else rgb[:, :, ::-1]
        return np.dstack([colour, np.full(rgb.shape[:2], 255, np.uint8)])
    if encoding in ("mono8", "8UC1"):
        return rgb[:, :, 1]
    return rgb


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_accepted_encoding_gives_the_face_back(face, encoding):
    back = from_msg(_message(_encode(face, encoding), encoding))
    assert back.shape == face.shape and back.dtype == np.uint8
    if encoding in ("mono8", "8UC1"):
        assert np.array_equal(back, np.repeat(face[:, :, 1:2], 3, axis=2))
    elif "yuv" in encoding or encoding == "uyvy":
        # 4:2:2 halves the chroma and swscale's and OpenCV's YUV matrices differ by rounding
        assert np.abs(back.astype(int) - face).mean() < 4.0, encoding
    else:
        assert np.array_equal(back, face), encoding


def test_yuv_odd_width_and_unknown_encodings_refused_with_the_list(face):
    odd = _message(np.zeros((4, 5, 2), np.uint8), "yuv422_yuy2")
    with pytest.raises(ImageMessageError, match="odd width"):
        from_msg(odd)
    with pytest.raises(ImageMessageError, match="accepted are .*8UC3.*yuv422_yuy2"):
        from_msg(_message(face, "bayer_rggb8"))


def test_compressed_jpeg_and_png_decode_and_bad_ones_are_refused(face):
    for ext in (".jpg", ".png"):
        ok, data = cv2.imencode(ext, face[:, :, ::-1])
        back = from_compressed(CompressedImage(format=ext[1:], data=data.tobytes()))
        assert back.shape == face.shape
        assert np.abs(back.astype(int) - face).mean() < (3.0 if ext == ".jpg" else 1e-9)
    with pytest.raises(ImageMessageError, match="not a readable JPEG or PNG"):
        from_compressed(CompressedImage(format="jpeg", data=b"\xff\xd8 not a jpeg"))
    # a PNG header that claims 100000 x 100000 pixels: refused before anything is allocated
    ok, small = cv2.imencode(".png", face[:8, :8])
    huge = bytearray(small.tobytes())
    huge[16:24] = (100_000).to_bytes(4, "big") * 2
    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")  # IHDR's checksum, redone
    with pytest.raises(ImageMessageError, match="exceeds"):
        from_compressed(CompressedImage(format="png", data=bytes(huge)))
    ok, bmp = cv2.imencode(".bmp", face[:8, :8])
    with pytest.raises(ImageMessageError, match="accepted are JPEG and PNG"):
        from_compressed(CompressedImage(format="bmp", data=bmp.tobytes()))


def test_tracking_node_reads_compressed_camera_images(ros_node, face, tmp_path):
    from gaga_ros.msg import Expression as ExpressionMsg
    from gaga_ros.nodes import qos

    got: list[ExpressionMsg] = []
    ros_node.create_subscription(ExpressionMsg, "/avatar/expression", got.append, qos.EXPRESSIONS)
    camera = ros_node.create_publisher(CompressedImage, "/camera/image_raw/compressed", qos.FRAMES)
    tracking = start_node("tracking", params={"camera_transport": "compressed"}, tmp_path=tmp_path)
    ok, jpeg = cv2.imencode(".jpg", face[:, :, ::-1])

    def send_and_check() -> bool:
        msg = CompressedImage(format="jpeg", data=jpeg.tobytes())
        msg.header.stamp = ros_node.get_clock().now().to_msg()
        camera.publish(msg)
        return len(got) >= 3

    try:
        assert wait_for(send_and_check, timeout=120, interval=0.1), stop_process(tracking)
    finally:
        log = stop_process(tracking)
    assert got[0].face_model == ExpressionMsg.FACE_MODEL_MESH and len(got[0].vertices) == 478 * 3, log
