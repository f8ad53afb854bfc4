"""The lifting plane: where each local-feature pixel sits in the world before dual lifting.

The plane passes through the point at depth |T_z| on the source camera's view axis, perpendicular
to it, and spans the image edge to edge (+-d/focal in camera x and y); docs/gagavatar.md (Lifting
plane) has the details.
"""

from __future__ import annotations

import torch


def plane_points(transform: torch.Tensor, size: int, focal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plane points (B, size*size, 3), row-major from the top-left pixel, and view directions (B, 3).

    transform: (B,3,4) [R | T] in the PyTorch3D row-vector convention x_cam = x_world R + T.
    """
    rot, trans = transform[:, :, :3], transform[:, :, 3]
    lin = torch.linspace(1.0, -1.0, size, dtype=transform.dtype, device=transform.device)
    y, x = torch.meshgrid(lin, lin, indexing="ij")  # pixel (i, j): x = lin[j], y = lin[i]
    rays = torch.stack([x / focal, y / focal, torch.ones_like(x)], dim=-1).reshape(-1, 3)
    world_rays = rays @ rot.transpose(1, 2)  # R r for every ray
    dirs = rot[:, :, 2]
    centers = -(rot @ trans[:, :, None])[:, :, 0]
    dist = (centers * dirs).sum(-1).abs()
    return centers[:, None] + dist[:, None, None] * world_rays, dirs


def source_planes(transform: torch.Tensor, size: int, focal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`plane_points` computed on the CPU, as the published data pipeline builds them, then moved to
    `transform`'s device.

    Why the CPU: the lifted Gaussians sit at plane point + position * normal, and a dense source
    holds thousands of overlapping Gaussians whose float32 depths tie or differ by an ulp, so their
    compositing order follows the last bit of the plane points. A GPU matmul rounds 92 % of them
    differently (by up to 1.9e-6); against the published render that alone costs 19 dB (85.6 -> 66.4
    dB, H100).
    """
    points, dirs = plane_points(transform.detach().cpu(), size, focal)
    return points.to(transform.device), dirs.to(transform.device)
