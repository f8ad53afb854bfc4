"""sensor_msgs/Image <-> numpy RGB without cv_bridge (which PyPI does not carry for ROS 2)."""

from __future__ import annotations

import numpy as np
from sensor_msgs.msg import Image

#: Encodings accepted on input, with their channel count.
ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
#: Largest image accepted on input (pixels): 8K UHD.
MAX_PIXELS = 7680 * 4320


class ImageMessageError(ValueError):
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
    channels = ENCODINGS.get(msg.encoding)
    if channels is None:
        raise ImageMessageError(f"unsupported encoding {msg.encoding!r}: accepted are "
                                f"{', '.join(ENCODINGS)}")
    if msg.width == 0 or msg.height == 0:
        raise ImageMessageError(f"empty image ({msg.width}x{msg.height}): accepted are images of "
                                "at least 1x1 pixels")
    if msg.width * msg.height > MAX_PIXELS:
        raise ImageMessageError(f"image {msg.width}x{msg.height} exceeds {MAX_PIXELS} pixels")
    row = msg.width * channels
    if msg.step < row or len(msg.data) < msg.step * msg.height:
        raise ImageMessageError(f"image data holds {len(msg.data)} bytes, expected step {msg.step} x "
                                f"height {msg.height} with step >= {row}")
    buf = np.frombuffer(msg.data, dtype=np.uint8, count=msg.step * msg.height)
    img = buf.reshape(msg.height, msg.step)[:, :row].reshape(msg.height, msg.width, channels)
    if msg.encoding == "mono8":
        return np.repeat(img, 3, axis=2)
    if msg.encoding.startswith("bgr"):
        img = img[:, :, 2::-1]
    return np.ascontiguousarray(img[:, :, :3])
