"""Differentiable splatting of GAGAvatar's 32-channel Gaussians, for training.

`gaga_ros.render.rasterize` serves inference and detaches its inputs. Training needs gradients:
on CUDA this calls gsplat 1.5.3 `rasterization` with the same settings as inference (docs/gagavatar.md:
classic mode, near 0.2, eps2d 0.3, covariances from the raw quaternions), whose backward pass is
gsplat's own. On the CPU there is no gsplat kernel, so a pure-torch compositor stands in for tests
and smoke runs: gsplat's torch projection, then front-to-back alpha blending over a square window of
at most `max_radius` pixels around each Gaussian's centre. That window truncates large footprints, so
the CPU path is an approximation: real training runs on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch

from gaga_ros.camera import Camera
from gaga_ros.gaussians import Gaussians
from gaga_ros.render.covariance import raw_quat_covariance
from gaga_ros.render.rasterize import ALPHA_MAX, ALPHA_MIN, EPS2D, NEAR_PLANE

#: Half side (pixels) of the CPU compositor's window around each Gaussian.
CPU_MAX_RADIUS = 6


def splat(gaussians: Gaussians, camera: Camera, max_radius: int = CPU_MAX_RADIUS) -> torch.Tensor:
    """Feature image (C, H, W) over a zero background, differentiable in every Gaussian field."""
    # The Gaussians' dtype: float32 in training (gsplat needs it), float64 where tests check the maths.
    dtype = gaussians.means.dtype
    viewmat = torch.as_tensor(np.asarray(camera.viewmat), dtype=dtype, device=gaussians.device)
    intrinsics = torch.as_tensor(np.asarray(camera.K), dtype=dtype, device=gaussians.device)
    covars = raw_quat_covariance(gaussians.quats, gaussians.scales)
    if gaussians.device.type == "cuda":
        import gsplat

        image, _, _ = gsplat.rasterization(
            gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.colors,
            viewmat[None], intrinsics[None], camera.width, camera.height, near_plane=NEAR_PLANE,
            eps2d=EPS2D, sh_degree=None, packed=False, rasterize_mode="classic", covars=covars)
        return image[0].permute(2, 0, 1)
    return _torch_splat(gaussians, covars, viewmat, intrinsics, camera.width, camera.height, max_radius)


def _torch_splat(g: Gaussians, covars: torch.Tensor, viewmat: torch.Tensor, intrinsics: torch.Tensor,
                 width: int, height: int, max_radius: int) -> torch.Tensor:
    from gsplat.cuda._torch_impl import _fully_fused_projection

    radii, means2d, depths, conics, _ = _fully_fused_projection(
        g.means, covars, viewmat[None], intrinsics[None], width, height, eps2d=EPS2D,
        near_plane=NEAR_PLANE)
    radii, means2d, depths, conics = radii[0], means2d[0], depths[0], conics[0]
    visible = torch.nonzero((radii > 0).all(-1)).flatten()
    visible = visible[torch.sort(depths[visible].detach(), stable=True).indices]  # front to back
    n = visible.numel()
    channels = g.colors.shape[1]
    if n == 0:
        return g.colors.new_zeros(channels, height, width)
    centre, conic, opacity = means2d[visible], conics[visible], g.opacities[visible]

    offsets = torch.arange(-max_radius, max_radius + 1, device=centre.device)
    base = centre.detach().floor().long()
    px = (base[:, 0, None, None] + offsets[None, None, :]).expand(n, offsets.numel(), -1).reshape(n, -1)
    py = (base[:, 1, None, None] + offsets[None, :, None]).expand(n, -1, offsets.numel()).reshape(n, -1)
    dx = centre[:, 0:1] - (px + 0.5)
    dy = centre[:, 1:2] - (py + 0.5)
    sigma = 0.5 * (conic[:, 0:1] * dx * dx + conic[:, 2:3] * dy * dy) + conic[:, 1:2] * dx * dy
    alpha = torch.clamp(opacity[:, None] * torch.exp(-sigma), max=ALPHA_MAX)
    keep = ((px >= 0) & (px < width) & (py >= 0) & (py < height) & (sigma >= 0)
            & (alpha >= ALPHA_MIN)).detach()
    rank = torch.arange(n, device=centre.device)[:, None].expand_as(px)[keep]
    pixel = (py * width + px)[keep]
    alpha = alpha[keep]
    order = torch.argsort(pixel * n + rank)  # by pixel, then front to back; keys are unique
    pixel, rank, alpha = pixel[order], rank[order], alpha[order]

    # Transmittance before each Gaussian = exp(sum of log(1 - alpha) of the earlier ones at that pixel),
    # an exclusive cumulative sum within each pixel's run (float64: the running sum gets large).
    log_t = torch.log1p(-alpha).double()
    total = torch.cumsum(log_t, 0)
    first = torch.ones_like(pixel, dtype=torch.bool)
    first[1:] = pixel[1:] != pixel[:-1]
    start = torch.cummax(torch.where(first, torch.arange(pixel.numel(), device=pixel.device), 0), 0).values
    before = total - log_t - (total[start] - log_t[start])
    weights = alpha * torch.exp(before).float()
    image = _Blend.apply(weights, g.colors[visible], pixel, rank, height * width)
    return image.T.reshape(channels, height, width)


class _Blend(torch.autograd.Function):
    """image[p] = sum over pairs k at pixel p of weights[k] * colors[rank[k]], in chunks of pairs.

    Written out because torch.sparse.mm's backward densifies and runs ~10x slower on the CPU.
    """

    CHUNK = 1 << 19

    @staticmethod
    def forward(ctx, weights: torch.Tensor, colors: torch.Tensor, pixel: torch.Tensor, rank: torch.Tensor,
                pixels: int) -> torch.Tensor:
        ctx.save_for_backward(weights, colors, pixel, rank)
        out = colors.new_zeros(pixels, colors.shape[1])
        for s in range(0, weights.numel(), _Blend.CHUNK):
            e = s + _Blend.CHUNK
            out.index_add_(0, pixel[s:e], weights[s:e, None] * colors[rank[s:e]])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, colors, pixel, rank = ctx.saved_tensors
        grad_w = torch.empty_like(weights)
        grad_c = torch.zeros_like(colors)
        for s in range(0, weights.numel(), _Blend.CHUNK):
            e = s + _Blend.CHUNK
            g = grad[pixel[s:e]]
            grad_w[s:e] = (g * colors[rank[s:e]]).sum(1)
            grad_c.index_add_(0, rank[s:e], g * weights[s:e, None])
        return grad_w, grad_c, None, None, None
