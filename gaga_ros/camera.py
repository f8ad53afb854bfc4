"""The one camera convention: GAGAvatar's [R | T] head cameras and their OpenCV form for rasterizers.

GAGAvatar stores a head pose as [R | T] with x_cam = x_world R + T (row vectors, camera +X left, +Y up,
+Z forward), NDC focal 12 on a square crop. Rasterizers and OpenCV want a world-to-camera matrix in
OpenCV axes (+x right, +y down, +z forward) and pixel intrinsics. Every pixel coordinate in this
package is continuous with pixel i covering [i, i + 1), so its centre is at i + 0.5 and the
principal point of a square image of `size` pixels is size / 2 (docs/camera.md says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gaga_ros.conventions import CAMERA_DISTANCE, CROP_SIZE, FOCAL

if TYPE_CHECKING:  # torch is only needed by callers that pass tensors; importing it costs a second
    import torch

#: OpenCV camera axes (x right, y down) from GAGAvatar's (x left, y up); z is shared.
FLIP = np.diag([-1.0, -1.0, 1.0])


def pixel_focal(size: int = CROP_SIZE, focal: float = FOCAL) -> float:
    """Focal length in pixels of an NDC `focal` on a square image of `size` pixels."""
    return focal * size / 2.0


def principal_point(size: int = CROP_SIZE) -> float:
    """Pixel coordinate of the optical axis on both image axes: the image centre, size / 2."""
    return size / 2.0


def intrinsics(size: int = CROP_SIZE, focal: float = FOCAL) -> np.ndarray:
    """The pixel intrinsics K (3, 3) float64 of the GAGAvatar camera on a square image."""
    f, c = pixel_focal(size, focal), principal_point(size)
    return np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])


def frontal_transform(distance: float = CAMERA_DISTANCE) -> np.ndarray:
    """The camera [R | T] (3, 4) float32 that looks at the canonical head from the front."""
    return np.array([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, distance]], dtype=np.float32)


def to_opencv(transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rotation (3, 3), translation (3,)) float64 of x_cv = rotation x + translation for a [R | T]."""
    t = np.asarray(transform, dtype=np.float64).reshape(3, 4)
    return FLIP @ t[:, :3].T, FLIP @ t[:, 3]


def from_opencv(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """The GAGAvatar [R | T] (3, 4) float64 of an OpenCV world-to-camera rotation and translation."""
    rot, trans = np.asarray(rotation, np.float64), np.asarray(translation, np.float64).reshape(3)
    return np.column_stack([rot.T @ FLIP, FLIP @ trans])


def project_points(points: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor,
                   size: int = CROP_SIZE, focal: float = FOCAL) -> torch.Tensor:
    """Pixels (B, L, 2) of world points (B, L, 3) through cameras [R | T] given as rotation (3, 3) or
    (B, 3, 3) and translation (B, 3): u right, v down, the same pixels as Camera.project."""
    cam = points @ rotation + translation[:, None]
    return principal_point(size) - pixel_focal(size, focal) * cam[..., :2] / cam[..., 2:]


def viewmats(transforms: torch.Tensor) -> torch.Tensor:
    """Camera.from_transform's viewmat for a batch of [R | T] (B, 3, 4), on their device: (B, 4, 4)."""
    out = transforms.new_zeros(*transforms.shape[:-2], 4, 4)
    out[..., :3, :3] = transforms[..., :, :3].transpose(-1, -2)
    out[..., :3, 3] = transforms[..., :, 3]
    out[..., :2, :] *= -1
    out[..., 3, 3] = 1.0
    return out


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in OpenCV convention: viewmat maps world to camera (column vectors)."""

    viewmat: np.ndarray  # (4, 4) float32
    K: np.ndarray  # (3, 3) float32
    width: int
    height: int

    @classmethod
    def from_transform(cls, transform: np.ndarray, size: int = CROP_SIZE,
                       focal: float = FOCAL) -> Camera:
        """The camera of a GAGAvatar [R | T] (3x4) for a square image of `size` pixels."""
        rot, trans = to_opencv(transform)
        viewmat = np.eye(4)
        viewmat[:3, :3], viewmat[:3, 3] = rot, trans
        return cls(viewmat.astype(np.float32), intrinsics(size, focal).astype(np.float32), size, size)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Pixel positions (N, 2) of world points (N, 3), pixel centres at i + 0.5."""
        cam = points @ self.viewmat[:3, :3].T + self.viewmat[:3, 3]
        uv = cam @ self.K.T
        return uv[:, :2] / uv[:, 2:3]

    def depth(self, points: np.ndarray) -> np.ndarray:
        """Camera-space depth (N,) of world points (N, 3)."""
        return points @ self.viewmat[2, :3] + self.viewmat[2, 3]
