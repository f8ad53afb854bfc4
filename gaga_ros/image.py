"""RGB images as the package passes them around: the one check of an image and the one way back to bytes.

An image is a C-contiguous (H, W, 3) uint8 numpy array in RGB order. Float images (renders, model
outputs) in [0, 1] come back to bytes through `to_uint8`, which rounds to the nearest level with
ties to even (torch.round, as numpy's): exact in float32, where adding 0.5 before truncating rounds
twice (a value just below k + 0.5 can become k + 1), and the rule the GPU fast path already used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gaga_ros.errors import InputError

if TYPE_CHECKING:  # torch is only needed by callers that pass tensors; importing it costs a second
    import torch


class ImageError(InputError):
    """An image that cannot be used; the message says why and what is accepted."""


def check_rgb(image: np.ndarray, min_side: int = 1, error: type[ImageError] = ImageError) -> np.ndarray:
    """The image as a C-contiguous (H, W, 3) uint8 array, at least min_side pixels each way, or
    `error` (an ImageError; a caller's own kind, e.g. the stream's FrameError) saying what is accepted."""
    if not isinstance(image, np.ndarray):
        raise error(f"image is a {type(image).__name__}: accepted is a numpy (H, W, 3) uint8 RGB "
                         "array")
    if image.dtype != np.uint8:
        raise error(f"image dtype is {image.dtype} (shape {image.shape}): accepted is uint8 RGB "
                         "(0-255) of shape (H, W, 3)")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < max(min_side, 1):
        size = f"at least {min_side}x{min_side} pixels" if min_side > 1 else "at least one pixel"
        raise error(f"image shape is {image.shape}: accepted is an (H, W, 3) uint8 RGB array of "
                         f"{size}")
    return np.ascontiguousarray(image)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Levels 0-255 (uint8) of a float image in [0, 1] (values outside are clamped), same shape and
    device, rounded to nearest with ties to even."""
    import torch  # already loaded: the caller holds a tensor

    return (image.clamp(0, 1) * 255).round_().to(torch.uint8)
