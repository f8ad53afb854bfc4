"""A set of 3D Gaussians: the one scene type that avatars produce and rasterizers consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaga_ros.errors import InputError


@dataclass
class Gaussians:
    """N anisotropic Gaussians on one device.

    means (N,3) world positions; quats (N,4) rotations (w,x,y,z), need not be unit;
    scales (N,3) per-axis standard deviations (linear); opacities (N,) in [0,1];
    colors (N,C) RGB in [0,1] (C=3) or neural features (C=32).
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor

    def __post_init__(self) -> None:
        n = self.means.shape[0]
        expected = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise InputError(f"Gaussians.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected {shape}")
        if self.colors.ndim != 2 or self.colors.shape[0] != n:
            raise InputError(f"Gaussians.colors has shape {tuple(self.colors.shape)}, expected ({n}, C)")

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device: torch.device | str) -> Gaussians:
        return Gaussians(*(t.to(device) for t in (self.means, self.quats, self.scales,
                                                  self.opacities, self.colors)))
