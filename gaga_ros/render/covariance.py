"""3D covariances from raw quaternions, the way the published GAGAvatar kernel builds them.

gsplat normalises quaternions before use; GAGAvatar's global Gaussians carry quaternions of norm
about 0.03, which the published kernel does not normalise (docs/gagavatar.md, Rasterizer). Every
backend therefore receives Sigma = R(q) diag(s^2) R(q)^T with R evaluated on the raw q.
"""

from __future__ import annotations

import torch


def raw_quat_rotation(quats: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) matrices of the unit-quaternion formula applied to raw (w, x, y, z) quaternions."""
    w, x, y, z = quats.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def raw_quat_covariance(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) world covariances R(q) diag(s^2) R(q)^T from raw quaternions and linear scales."""
    m = raw_quat_rotation(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)
