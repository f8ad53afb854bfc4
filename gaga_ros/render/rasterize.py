"""One rasterization entry point over the backends: gsplat on CUDA, compiled CPU, slow reference.

Every backend reproduces gsplat 1.5.3 `rasterization(rasterize_mode="classic", near_plane=0.2,
eps2d=0.3, sh_degree=None, packed=False)` with covariances from the raw quaternions, which is the
published GAGAvatar rasterizer up to its 0.99 alpha clamp (docs/gagavatar.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gaga_ros.camera import Camera
from gaga_ros.errors import InputError
from gaga_ros.gaussians import Gaussians
from gaga_ros.render.covariance import raw_quat_covariance

NEAR_PLANE = 0.2
EPS2D = 0.3
#: Compositing cut-offs of gsplat's classic mode, shared by every backend: a Gaussian adds nothing
#: where alpha < ALPHA_MIN, alpha is clamped to ALPHA_MAX, and a pixel stops before its transmittance
#: reaches T_MIN. Tiles are TILE_SIZE pixels square.
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
TILE_SIZE = 16
BACKENDS = ("auto", "gsplat", "cpu", "reference")


class RenderInputError(InputError):
    """The Gaussians, camera, background or backend cannot be rendered as given."""


@dataclass(frozen=True)
class RenderResult:
    """A rendered view on the Gaussians' device: image (H,W,C) float32 and alpha (H,W) float32."""

    image: torch.Tensor
    alpha: torch.Tensor


def rasterize(gaussians: Gaussians, camera: Camera, background: torch.Tensor | None = None,
              backend: str = "auto") -> RenderResult:
    """Render `gaussians` seen by `camera`; `background` (C,) fills where transmittance remains.

    backend: "auto" (gsplat for CUDA Gaussians, else "cpu"), "gsplat", "cpu" or "reference".
    """
    backend = _resolve_backend(gaussians, backend)
    _check_camera(camera)
    channels = gaussians.colors.shape[1]
    device = gaussians.device
    if background is None:
        background = torch.zeros(channels, device=device)
    _check_background(background, channels, device)
    if backend == "gsplat":
        return _render_gsplat(gaussians, camera, background)
    if backend == "cpu":
        from gaga_ros.render import cpu

        means, quats, scales, opacities, colors = (
            _f32_numpy(t) for t in (gaussians.means, gaussians.quats, gaussians.scales,
                                    gaussians.opacities, gaussians.colors))
        pixels, coverage = cpu.render(means, quats, scales, opacities, colors, camera.viewmat, camera.K,
                                      camera.width, camera.height, _f32_numpy(background), NEAR_PLANE,
                                      EPS2D)
        return RenderResult(torch.from_numpy(pixels), torch.from_numpy(coverage))
    from gaga_ros.render import reference

    image, alpha = reference.render(
        gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.colors,
        torch.from_numpy(np.asarray(camera.viewmat)), torch.from_numpy(np.asarray(camera.K)),
        camera.width, camera.height, background, NEAR_PLANE, EPS2D)
    return RenderResult(image, alpha)


def _resolve_backend(gaussians: Gaussians, backend: str) -> str:
    if not isinstance(gaussians, Gaussians):
        raise RenderInputError(f"expected a gaga_ros.gaussians.Gaussians, got {type(gaussians).__name__}")
    if backend not in BACKENDS:
        raise RenderInputError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    tensors = {"means": gaussians.means, "quats": gaussians.quats, "scales": gaussians.scales,
               "opacities": gaussians.opacities, "colors": gaussians.colors}
    for name, t in tensors.items():
        if t.device != gaussians.device:
            raise RenderInputError(f"Gaussians.{name} is on {t.device} but means are on "
                                   f"{gaussians.device}; all fields must share one device")
        if not t.is_floating_point():
            raise RenderInputError(f"Gaussians.{name} has dtype {t.dtype}; a floating dtype is required")
    on_cuda = gaussians.device.type == "cuda"
    if backend == "auto":
        backend = "gsplat" if on_cuda else "cpu"
    if backend == "gsplat" and not on_cuda:
        raise RenderInputError(f"backend 'gsplat' needs Gaussians on a CUDA device, got {gaussians.device}; "
                               "use backend 'cpu' or move them with Gaussians.to('cuda')")
    if backend in ("cpu", "reference") and gaussians.device.type != "cpu":
        raise RenderInputError(f"backend {backend!r} needs Gaussians on the CPU, got {gaussians.device}; "
                               "use backend 'gsplat' or Gaussians.to('cpu')")
    return backend


def _check_camera(camera: Camera) -> None:
    if not isinstance(camera, Camera):
        raise RenderInputError(f"expected a gaga_ros.camera.Camera, got {type(camera).__name__}")
    if np.shape(camera.viewmat) != (4, 4) or np.shape(camera.K) != (3, 3):
        raise RenderInputError(f"camera needs viewmat (4,4) and K (3,3), got {np.shape(camera.viewmat)} "
                               f"and {np.shape(camera.K)}")
    for name in ("width", "height"):
        value = getattr(camera, name)
        if not isinstance(value, int | np.integer) or value <= 0:
            raise RenderInputError(f"camera.{name} must be a positive integer, got {value!r}")


def _check_background(background: torch.Tensor, channels: int, device: torch.device) -> None:
    if not isinstance(background, torch.Tensor) or tuple(background.shape) != (channels,):
        shape = tuple(background.shape) if isinstance(background, torch.Tensor) else type(background)
        raise RenderInputError(f"background must be a tensor of shape ({channels},) to match the "
                               f"colours, got {shape}")
    if background.device != device:
        raise RenderInputError(f"background is on {background.device} but the Gaussians are on {device}")


def _f32_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _render_gsplat(gaussians: Gaussians, camera: Camera, background: torch.Tensor) -> RenderResult:
    import gsplat

    device = gaussians.device
    means, quats, scales, opacities, colors = (
        t.detach().float().contiguous() for t in (gaussians.means, gaussians.quats, gaussians.scales,
                                                  gaussians.opacities, gaussians.colors))
    viewmat = torch.as_tensor(np.asarray(camera.viewmat), dtype=torch.float32, device=device)
    intrinsics = torch.as_tensor(np.asarray(camera.K), dtype=torch.float32, device=device)
    image, alpha, _ = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmat[None], intrinsics[None],
        camera.width, camera.height, near_plane=NEAR_PLANE, eps2d=EPS2D, sh_degree=None,
        packed=False, rasterize_mode="classic", covars=raw_quat_covariance(quats, scales),
        backgrounds=background.float()[None])
    return RenderResult(image[0], alpha[0, ..., 0])
