"""sensor_msgs/Image and CompressedImage <-> numpy RGB without cv_bridge (which PyPI does not carry
for ROS 2). Input accepts what cv_bridge users publish: its 8-bit colour and mono encodings, the
OpenCV-style 8UC3/8UC1 (BGR/grey, cv_bridge's convention), YUV 4:2:2 from USB cameras, and JPEG/PNG
CompressedImage (image_transport's `compressed`)."""

from __future__ import annotations

import io

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from gaga_ros.errors import InputError

#: Encodings accepted on input, with their bytes per pixel.
ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8UC3": 3, "8UC1": 1,
             "yuv422_yuy2": 2, "uyvy": 2, "yuv422": 2}
#: YUV 4:2:2 byte orders: ROS's `yuv422` is UYVY (sensor_msgs image_encodings), `yuv422_yuy2` YUYV.
_YUV422 = {"yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2, "uyvy": cv2.COLOR_YUV2RGB_UYVY,
           "yuv422": cv2.COLOR_YUV2RGB_UYVY}
#: Largest image accepted on input (pixels): 8K UHD.
MAX_PIXELS = 7680 * 4320


class ImageMessageError(InputError):
    """An Image message that cannot be read; the message says what is accepted."""


def to_msg(rgb: np.ndarray, stamp, frame_id: str) -> Image:
    """An rgb8 Image message that holds a copy of `rgb` (H, W, 3) uint8."""
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def from_msg(msg: Image) -> np.ndarray:
    """RGB uint8 (H, W, 3) from an Image in any accepted encoding; raises ImageMessageError."""
    depth = ENCODINGS.get(msg.encoding)
    if depth is None:
        raise ImageMessageError(f"unsupported encoding {msg.encoding!r}: accepted are "
                                f"{', '.join(ENCODINGS)}")
    if msg.width == 0 or msg.height == 0:
        raise ImageMessageError(f"empty image ({msg.width}x{msg.height}): accepted are images of "
                                "at least 1x1 pixels")
    if msg.width * msg.height > MAX_PIXELS:
        raise ImageMessageError(f"image {msg.width}x{msg.height} exceeds {MAX_PIXELS} pixels")
    row = msg.width * depth
    if msg.step < row or len(msg.data) < msg.step * msg.height:
        raise ImageMessageError(f"image data holds {len(msg.data)} bytes, expected step {msg.step} x "
                                f"height {msg.height} with step >= {row}")
    if msg.encoding in _YUV422 and msg.width % 2:
        raise ImageMessageError(f"{msg.encoding} image of odd width {msg.width}: 4:2:2 pairs pixels")
    buf = np.frombuffer(msg.data, dtype=np.uint8, count=msg.step * msg.height)
    img = buf.reshape(msg.height, msg.step)[:, :row].reshape(msg.height, msg.width, depth)
    if msg.encoding in _YUV422:
        return cv2.cvtColor(img, _YUV422[msg.encoding])
    if depth == 1:
        return np.repeat(img, 3, axis=2)
    if msg.encoding.startswith("bgr") or msg.encoding == "8UC3":
        img = img[:, :, 2::-1]
    return np.ascontiguousarray(img[:, :, :3])


def from_compressed(msg: CompressedImage) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a JPEG or PNG CompressedImage; raises ImageMessageError.

    The size is read from the header before decoding, so a small file that claims a huge image is
    refused without allocating it."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    data = bytes(msg.data)
    try:
        with PILImage.open(io.BytesIO(data)) as probe:
            width, height, kind = probe.width, probe.height, probe.format
    except PILImage.DecompressionBombError:
        raise ImageMessageError(f"compressed image claims a size that exceeds {MAX_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageMessageError(f"compressed image ({len(data)} bytes, format {msg.format!r}) is not a "
                                f"readable JPEG or PNG: {exc}") from None
    if kind not in ("JPEG", "PNG"):
        raise ImageMessageError(f"compressed image is {kind}: accepted are JPEG and PNG")
    if width * height > MAX_PIXELS:
        raise ImageMessageError(f"image {width}x{height} exceeds {MAX_PIXELS} pixels")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageMessageError(f"compressed {kind} image ({len(data)} bytes) could not be decoded")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def to_rgb(msg: Image | CompressedImage) -> np.ndarray:
    """RGB uint8 from either message type (the tracking node takes raw or compressed input)."""
    return from_compressed(msg) if isinstance(msg, CompressedImage) else from_msg(msg)
