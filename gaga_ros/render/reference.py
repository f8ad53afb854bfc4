"""Slow float64 reference rasterizer for tests: gsplat's own torch projection, no tiles.

It checks the compiled backends against the plain definition: every pixel blends every projected
Gaussian in depth order with gsplat's classic-mode rules. Projection is gsplat's pure-torch
`_fully_fused_projection`, fed covariances from the raw quaternions; nothing is culled by extent.
"""

from __future__ import annotations

import torch
from gsplat.cuda._torch_impl import _fully_fused_projection

from gaga_ros.render.covariance import raw_quat_covariance
from gaga_ros.render.rasterize import ALPHA_MAX, ALPHA_MIN, T_MIN


def render(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
           colors: torch.Tensor, viewmat: torch.Tensor, intrinsics: torch.Tensor, width: int,
           height: int, background: torch.Tensor, near_plane: float,
           eps2d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (H,W,C) and alpha (H,W), float32, from CPU tensors; cost O(N * H * W)."""
    f64 = torch.float64
    covars = raw_quat_covariance(quats.to(f64), scales.to(f64))
    _, means2d, depths, conics, _ = _fully_fused_projection(
        means.to(f64), covars, viewmat.to(f64)[None], intrinsics.to(f64)[None], width, height,
        eps2d=eps2d, near_plane=near_plane)
    means2d, depths, conics = means2d[0], depths[0], conics[0]
    keep = torch.nonzero(depths > near_plane).flatten()
    keep = keep[torch.sort(depths[keep], stable=True).indices]

    ys, xs = torch.meshgrid(torch.arange(height, dtype=f64) + 0.5, torch.arange(width, dtype=f64) + 0.5,
                            indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    trans = torch.ones(pixels.shape[0], dtype=f64)
    done = torch.zeros(pixels.shape[0], dtype=torch.bool)
    out = torch.zeros(pixels.shape[0], colors.shape[1], dtype=f64)
    for g in keep.tolist():
        d = means2d[g] - pixels
        a, b, c = conics[g]
        sigma = 0.5 * (a * d[:, 0] ** 2 + c * d[:, 1] ** 2) + b * d[:, 0] * d[:, 1]
        alpha = torch.clamp(opacities[g].double() * torch.exp(-sigma), max=ALPHA_MAX)
        use = ~done & (sigma >= 0) & (alpha >= ALPHA_MIN)
        next_t = trans * (1 - alpha)
        stop = use & (next_t <= T_MIN)
        done |= stop
        use &= ~stop
        out += torch.where(use, alpha * trans, 0.0)[:, None] * colors[g].double()
        trans = torch.where(use, next_t, trans)
    out += trans[:, None] * background.double()
    return (out.reshape(height, width, -1).float(), (1 - trans).reshape(height, width).float())
