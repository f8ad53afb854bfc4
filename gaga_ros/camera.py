"""GAGAvatar's camera convention and its mapping to the rasterizer's (OpenCV, column-vector) one.

GAGAvatar stores a head pose as [R | T] with x_cam = x_world R + T (PyTorch3D row vectors, camera
+X left, +Y up, +Z forward), NDC focal 12 on a square crop. Rasterizers want a world-to-camera 4x4
in OpenCV axes (+x right, +y down, +z forward) and pixel intrinsics; see SPEC section 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gaga_ros.config import CROP_SIZE, FOCAL


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
        transform = np.asarray(transform, dtype=np.float64).reshape(3, 4)
        rot, trans = transform[:, :3], transform[:, 3]
        flip = np.diag([-1.0, -1.0, 1.0])
        viewmat = np.eye(4)
        viewmat[:3, :3] = flip @ rot.T
        viewmat[:3, 3] = flip @ trans
        f = focal * size / 2.0
        K = np.array([[f, 0, size / 2.0], [0, f, size / 2.0], [0, 0, 1]])
        return cls(viewmat.astype(np.float32), K.astype(np.float32), size, size)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Pixel positions (N, 2) of world points (N, 3), pixel centres at i + 0.5."""
        cam = points @ self.viewmat[:3, :3].T + self.viewmat[:3, 3]
        uv = cam @ self.K.T
        return uv[:, :2] / uv[:, 2:3]

    def depth(self, points: np.ndarray) -> np.ndarray:
        """Camera-space depth (N,) of world points (N, 3)."""
        return points @ self.viewmat[2, :3] + self.viewmat[2, 3]
