"""The assembled GAGAvatar: reconstruct a source once, then render driven frames cheaply.

Reconstruction runs the encoder and all three generators on the source image and caches every
Gaussian attribute on the model's device (`GagaSource`). A driven frame only swaps in its FLAME
vertices as the positions of the 5023 expression Gaussians, picks the camera, rasterizes the 32-
channel features and refines them with the StyleUNet (docs/gagavatar.md, Gaussians).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaga_ros.avatar.gagavatar.checkpoint import DEFAULT_PATH, load_state_dict_strict, read_state_dict
from gaga_ros.avatar.gagavatar.fusion import FeatureEncoder, Features
from gaga_ros.avatar.gagavatar.generators import (
    GaussianGroup,
    HarmonicEncoding,
    PlaneGaussianGenerator,
    VertexGaussianGenerator,
)
from gaga_ros.avatar.gagavatar.lifting import source_planes
from gaga_ros.avatar.gagavatar.refiner import StyleUNet
from gaga_ros.avatar.gagavatar.sizes import FULL, GagaSizes
from gaga_ros.camera import Camera
from gaga_ros.conventions import FLAME_VERTICES
from gaga_ros.errors import InputError
from gaga_ros.gaussians import Gaussians
from gaga_ros.render.rasterize import rasterize


class GagaInputError(InputError):
    """An image, transform or vertex array given to GAGAvatar has the wrong shape, type or range."""


@dataclass
class GagaSource:
    """A reconstructed source, on the model's device: all Gaussian attributes in the published order
    [expression 5023, l0, l1], plus the lifted positions of the local groups."""

    local_means: torch.Tensor  # (N_local, 3)
    quats: torch.Tensor  # (N, 4) raw (w,x,y,z); the expression group's are not unit length
    scales: torch.Tensor  # (N, 3)
    opacities: torch.Tensor  # (N,)
    colors: torch.Tensor  # (N, 32)
    transform: torch.Tensor  # (3, 4) the source camera [R | T]

    @classmethod
    def from_groups(cls, groups: list[GaussianGroup], transform: torch.Tensor, item: int = 0,
                    dtype: torch.dtype | None = None) -> GagaSource:
        """Batch item `item` of the generators' [expression, l0, l1] groups (gaussian_groups) seen by
        `transform` (3,4): the one assembly of GAGAvatar's Gaussians, for reconstruction, the fast
        path's encoder and training. Each group's tensors are cast to `dtype` (None: kept) before
        they are joined; the expression group's positions are left out (each frame brings its own)."""

        def part(t: torch.Tensor) -> torch.Tensor:
            return t[item] if dtype is None else t[item].to(dtype)

        quats, scales, opacities, colors = (torch.cat([part(getattr(g, name)) for g in groups])
                                            for name in ("rotations", "scales", "opacities", "colors"))
        local_means = torch.cat([part(_positions(g)) for g in groups[1:]])
        return cls(local_means, quats, scales, opacities[:, 0], colors, transform)

    def frame_gaussians(self, vertices: torch.Tensor) -> Gaussians:
        """All Gaussians of one frame: the expression group sits at `vertices` (5023, 3)."""
        return Gaussians(torch.cat([vertices, self.local_means]), self.quats, self.scales,
                         self.opacities, self.colors)


def _positions(group: GaussianGroup) -> torch.Tensor:
    """A lifted group's Gaussian positions (every local group carries them)."""
    assert group.xyz is not None, "a lifted Gaussian group without positions"
    return group.xyz


@dataclass
class GagaFrame:
    """A rendered frame: splat = raw 32-channel rasterization (B,32,H,W); coarse = its channels 0..2
    and refined = the StyleUNet output, both (B,3,H,W) clamped to [0,1]."""

    splat: torch.Tensor
    coarse: torch.Tensor
    refined: torch.Tensor


class GAGAvatar(nn.Module):
    """GAGAvatar with the published module tree and state-dict keys (docs/gagavatar.md)."""

    def __init__(self, cfg: GagaSizes = FULL) -> None:
        super().__init__()
        self.cfg = cfg
        channels, direction = cfg.gaussian_channels, cfg.direction_dim
        self.base_model = FeatureEncoder(cfg)
        self.harmo_encoder = HarmonicEncoding(cfg.harmonics)
        self.head_base = nn.Parameter(torch.randn(FLAME_VERTICES, cfg.vertex_feature_dim) * 0.02)
        self.gs_generator_g = VertexGaussianGenerator(cfg.vertex_feature_dim + cfg.embed_dim,
                                                      cfg.vertex_hidden, direction, cfg.head_hidden,
                                                      channels)
        self.gs_generator_l0 = PlaneGaussianGenerator(cfg.fusion_channels + direction, cfg.conv_hidden,
                                                      channels, +1.0)
        self.gs_generator_l1 = PlaneGaussianGenerator(cfg.fusion_channels + direction, cfg.conv_hidden,
                                                      channels, -1.0)
        self.upsampler = StyleUNet(cfg)

    @classmethod
    def from_checkpoint(cls, path: str | Path = DEFAULT_PATH,
                        device: str | torch.device = "cpu") -> GAGAvatar:
        """The published model with the weights of GAGAvatar.pt, in eval mode on `device`."""
        model = cls(FULL)
        load_state_dict_strict(model, read_state_dict(path))
        return model.to(device).eval()

    @property
    def device(self) -> torch.device:
        return self.head_base.device

    def gaussian_groups(self, features: Features, transform: torch.Tensor,
                        vertices: torch.Tensor | None = None,
                        planes: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[GaussianGroup]:
        """[expression, l0, l1] groups of a batch of encoded sources seen by `transform` (B,3,4);
        `planes` = `self.planes(transform)` when given (a CUDA graph cannot build them on the CPU)."""
        points, dirs = planes if planes is not None else self.planes(transform)
        direction = self.harmo_encoder(dirs)
        return [self.gs_generator_g(self.head_base, features.global_, direction, vertices),
                self.gs_generator_l0(features.local, direction, points, dirs),
                self.gs_generator_l1(features.local, direction, points, dirs)]

    def planes(self, transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lifting-plane points (B,P*P,3) and normals (B,3) of cameras (B,3,4), built on the CPU as
        published (see lifting.source_planes) and returned on `transform`'s device."""
        return source_planes(transform, self.cfg.plane_size, self.cfg.focal)

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor, transform: torch.Tensor | np.ndarray) -> GagaSource:
        """Encode one source: image (3,S,S) or (1,3,S,S) RGB in [0,1] (S = cfg.image_size, 518
        published) and its camera [R | T] (3,4). The result stays on the model's device."""
        image = self._source_image(image)
        transform = self._transforms(transform, 1)
        return GagaSource.from_groups(self.gaussian_groups(self.base_model(image), transform), transform[0])

    @torch.no_grad()
    def render(self, source: GagaSource, vertices: torch.Tensor | np.ndarray,
               transform: torch.Tensor | np.ndarray, backend: str = "auto") -> GagaFrame:
        """Render FLAME `vertices` (5023,3) or (B,5023,3) (GAGAvatar units, x5) seen by `transform`
        (3,4) or (B,3,4); `backend` is the rasterizer's (see gaga_ros.render.rasterize)."""
        vertices = self._vertices(vertices)
        transforms = self._transforms(transform, vertices.shape[0]).cpu().numpy()
        size = self.cfg.render_size
        splats = []
        for verts, cam in zip(vertices, transforms, strict=True):
            camera = Camera.from_transform(cam, size, self.cfg.focal)
            result = rasterize(source.frame_gaussians(verts), camera, backend=backend)
            splats.append(result.image.permute(2, 0, 1))
        splat = torch.stack(splats).to(self.device)
        refined = self.upsampler(splat, randomize_noise=self.cfg.randomize_noise)
        return GagaFrame(splat, splat[:, :3].clamp(0, 1), refined.clamp(0, 1))

    def _source_image(self, image: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            raise GagaInputError(f"source image must be a float tensor (3,{s},{s}) in [0,1], got "
                                 f"{getattr(image, 'dtype', type(image).__name__)}; see source_image()")
        if image.ndim == 3:
            image = image[None]
        if tuple(image.shape) != (1, 3, s, s):
            raise GagaInputError(f"source image must have shape (3,{s},{s}) or (1,3,{s},{s}), got "
                                 f"{tuple(image.shape)}; see source_image() for resizing a crop")
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise GagaInputError("source image values must be finite and in [0,1]")
        return image.to(self.device, torch.float32)

    def _transforms(self, transform: torch.Tensor | np.ndarray, batch: int) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(transform.cpu() if isinstance(transform, torch.Tensor) else transform),
                            dtype=torch.float32)
        if t.shape == (3, 4):
            t = t[None]
        if t.ndim != 3 or t.shape[1:] != (3, 4) or t.shape[0] not in (1, batch):
            raise GagaInputError(f"transform must be [R | T] of shape (3,4) or ({batch},3,4), got "
                                 f"{tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise GagaInputError("transform must be finite")
        return t.expand(batch, 3, 4).to(self.device)

    def _vertices(self, vertices: torch.Tensor | np.ndarray) -> torch.Tensor:
        v = torch.as_tensor(vertices, dtype=torch.float32)
        if v.ndim == 2:
            v = v[None]
        if v.ndim != 3 or v.shape[1:] != (FLAME_VERTICES, 3):
            raise GagaInputError(f"FLAME vertices must have shape ({FLAME_VERTICES},3) or "
                                 f"(B,{FLAME_VERTICES},3), got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise GagaInputError("FLAME vertices must be finite")
        return v.to(self.device)


def source_image(crop: np.ndarray | torch.Tensor, size: int = FULL.image_size) -> torch.Tensor:
    """A head crop (H,W,3) uint8 RGB or float in [0,1] as the model input (3,size,size): bilinear,
    antialiased resize as the published pipeline does (512 -> 518)."""
    x = torch.as_tensor(np.asarray(crop))
    if x.ndim != 3 or x.shape[-1] != 3:
        raise GagaInputError(f"crop must be an RGB image (H,W,3), got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = x.permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].clamp(0, 1)
