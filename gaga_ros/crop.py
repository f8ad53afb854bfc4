"""The GAGAvatar head crop (docs/crop.md): a square around the head box, zero-padded, resized to 512.

GAGAvatar boxes come from a head detector (VGGHead); here the box comes from FaceMesh landmarks. The
face oval stops at the upper forehead and just inside the ears, so head_box extends it: HEAD_SIDE of its
width on each side (ears) and HEAD_TOP of its height upwards (skull and hair), nothing below the chin.
The factors are set on the canonical face: for a frontal face the box centre falls on the eyes (the
canonical origin) and the 1.65 crop then puts the camera about 9.3 units away, GAGAvatar's usual
distance (its novel-view helper uses 9.3; the tracker's initial distance is 9.01).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gaga_ros.conventions import CROP_SCALE, CROP_SIZE
from gaga_ros.errors import InputError
from gaga_ros.faces.mediapipe_mesh import REGIONS
from gaga_ros.image import check_rgb

#: Fraction of the face-oval width added on each side (ears).
HEAD_SIDE = 0.10
#: Fraction of the face-oval height added above it (top of the skull).
HEAD_TOP = 0.40



class CropError(InputError):
    """A box or image that cannot be cropped; the message says what is accepted."""


def head_box(points_xy: np.ndarray) -> np.ndarray:
    """Head box (x0, y0, x1, y1) in pixels from FaceMesh landmarks (N >= 468, x/y[/z] pixel columns)."""
    pts = np.asarray(points_xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] < 468 or pts.shape[1] < 2 or not np.isfinite(pts[:, :2]).all():
        raise CropError(f"landmarks of shape {pts.shape}: accepted are >= 468 finite FaceMesh points "
                        "as (N, 2) or (N, 3) pixel coordinates")
    oval = pts[REGIONS["face_oval"], :2]
    (x0, y0), (x1, y1) = oval.min(0), oval.max(0)
    w, h = x1 - x0, y1 - y0
    return np.array([x0 - HEAD_SIDE * w, y0 - HEAD_TOP * h, x1 + HEAD_SIDE * w, y1])


def square_box(box: np.ndarray, scale: float = CROP_SCALE) -> np.ndarray:
    """Square (x0, y0, x1, y1) around the box centre with side scale * sqrt(w * h)."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.size != 4 or not np.isfinite(b).all() or b[2] <= b[0] or b[3] <= b[1]:
        raise CropError(f"box {b.tolist()}: accepted is a finite (x0, y0, x1, y1) with x1 > x0, y1 > y0")
    if not scale > 0:
        raise CropError(f"scale {scale!r}: accepted is a positive factor (GAGAvatar uses 1.65)")
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    half = scale * np.sqrt((b[2] - b[0]) * (b[3] - b[1])) / 2
    return np.array([cx - half, cy - half, cx + half, cy + half])


@dataclass(frozen=True)
class CropWindow:
    """Where a square crop sits in its source image, and the map between their pixels."""

    origin: tuple[int, int]  # source pixel (x0, y0) of the crop's top-left corner
    side: int  # crop side in source pixels
    size: int  # crop side in crop pixels

    @property
    def zoom(self) -> float:
        """Crop pixels per source pixel."""
        return self.size / self.side

    def to_crop(self, points_px: np.ndarray) -> np.ndarray:
        """Map source pixel coordinates (N, 2|3) to crop pixels; a z column is scaled like x and y."""
        pts = np.array(points_px, dtype=np.float64)
        pts[..., 0] -= self.origin[0]
        pts[..., 1] -= self.origin[1]
        return pts * self.zoom

    def to_image(self, points_crop: np.ndarray) -> np.ndarray:
        """Inverse of to_crop."""
        pts = np.array(points_crop, dtype=np.float64) / self.zoom
        pts[..., 0] += self.origin[0]
        pts[..., 1] += self.origin[1]
        return pts


@dataclass(frozen=True)
class HeadCrop(CropWindow):
    """A square head crop: its pixels (size, size, 3) uint8 and its window in the source image."""

    image: np.ndarray


def crop_window(box: np.ndarray, size: int = CROP_SIZE, scale: float = CROP_SCALE) -> CropWindow:
    """The integer crop square of `scale` around a head box, without cutting any pixels."""
    if int(size) <= 0:
        raise CropError(f"size {size!r}: accepted is a positive number of pixels")
    x0, y0, x1, _ = square_box(box, scale)
    return CropWindow((int(x0), int(y0)), max(int(x1) - int(x0), 1), int(size))


def crop_head(image: np.ndarray, box: np.ndarray, size: int = CROP_SIZE,
              scale: float = CROP_SCALE) -> HeadCrop:
    """Crop the square of `scale` around a head box (integer-truncated, zero-padded) and resize it."""
    image = check_rgb(image)
    win = crop_window(box, size, scale)
    (x0, y0), side = win.origin, win.side
    h, w = image.shape[:2]
    canvas = np.zeros((side, side, 3), np.uint8)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    interp = cv2.INTER_AREA if side > win.size else cv2.INTER_LINEAR
    out = cv2.resize(canvas, (win.size, win.size), interpolation=interp)
    return HeadCrop(win.origin, win.side, win.size, out)
