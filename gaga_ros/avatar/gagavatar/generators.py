"""GAGAvatar's Gaussian generators and the harmonic view-direction encoding (docs/gagavatar.md).

The expression branch (`VertexGaussianGenerator`) gives one Gaussian per FLAME vertex; the dual-
lifting heads (`PlaneGaussianGenerator`) give one per feature-plane pixel, pushed along the plane
normal forwards (l0) or backwards (l1). Quirks kept on purpose: the vertex rotations are normalised
over the *vertex* axis, and the plane colours get their sigmoid on the last spatial axis (columns
0..2 only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCALE_MAX = 0.05


@dataclass
class GaussianGroup:
    """A batch of Gaussians as the generators emit them: (B,N,C) tensors; positions for local groups."""

    colors: torch.Tensor
    opacities: torch.Tensor
    scales: torch.Tensor
    rotations: torch.Tensor
    xyz: torch.Tensor | None
    positions: torch.Tensor | None = None


class HarmonicEncoding(nn.Module):
    """pytorch3d HarmonicEmbedding(n, omega0=1, logspace, append_input): [sin(a), cos(a), d], where
    a = d_c * 2^k in coordinate-major order (c outer, k inner)."""

    def __init__(self, harmonics: int) -> None:
        super().__init__()
        self.register_buffer("frequencies", 2.0 ** torch.arange(harmonics, dtype=torch.float32),
                             persistent=False)

    frequencies: torch.Tensor  # a buffer (declared for the type checker)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        a = (d[..., None] * self.frequencies).flatten(-2)
        # pytorch3d's cos is sin(a + pi/2); kept for bit-level agreement.
        return torch.cat([torch.cat([a, a + 0.5 * math.pi], dim=-1).sin(), d], dim=-1)


def _head(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, cout))


class VertexGaussianGenerator(nn.Module):
    """`gs_generator_g`: per-vertex features + global feature -> MLP -> one Gaussian per vertex."""

    def __init__(self, cin: int, hidden: int, direction_dim: int, head_hidden: int, channels: int) -> None:
        super().__init__()
        self.feature_layers = nn.Sequential(
            nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        width = hidden + direction_dim
        self.color_layers = _head(width, head_hidden, channels)
        self.opacity_layers = _head(width, head_hidden, 1)
        self.scale_layers = _head(width, head_hidden, 3)
        self.rotation_layers = _head(width, head_hidden, 4)

    def forward(self, vertex_features: torch.Tensor, global_feature: torch.Tensor,
                direction: torch.Tensor, points: torch.Tensor | None) -> GaussianGroup:
        """vertex_features (V,F), global_feature (B,D), direction (B,E); points (B,V,3) become xyz
        (None at reconstruction: each driven frame brings its own)."""
        b, v = global_feature.shape[0], vertex_features.shape[0]
        x = torch.cat([vertex_features[None].expand(b, -1, -1),
                       global_feature[:, None].expand(-1, v, -1)], dim=-1)
        x = self.feature_layers(x)
        x = torch.cat([x, direction[:, None].expand(-1, v, -1)], dim=-1)
        colors = self.color_layers(x)
        colors = torch.cat([colors[..., :3].sigmoid(), colors[..., 3:]], dim=-1)
        # Normalised over the vertex axis (dim 1), as published: quaternions are not unit length.
        rotations = F.normalize(self.rotation_layers(x), dim=1)
        return GaussianGroup(colors=colors, opacities=self.opacity_layers(x).sigmoid(),
                             scales=self.scale_layers(x).sigmoid() * SCALE_MAX, rotations=rotations,
                             xyz=points)


class PlaneGaussianGenerator(nn.Module):
    """`gs_generator_l0/l1`: conv head on the local plane; lifts each pixel by +-position along n."""

    def __init__(self, cin: int, hidden: int, channels: int, sign: float) -> None:
        super().__init__()
        self.channels = channels
        self.sign = sign
        self.gaussian_conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, channels + 9, 1))

    def forward(self, local: torch.Tensor, direction: torch.Tensor, plane_points: torch.Tensor,
                plane_dirs: torch.Tensor) -> GaussianGroup:
        """local (B,C,P,P), direction (B,E), plane_points (B,P*P,3), plane_dirs (B,3)."""
        b, _, h, w = local.shape
        x = torch.cat([local, direction[:, :, None, None].expand(-1, -1, h, w)], dim=1)
        x = self.gaussian_conv(x)
        c = self.channels
        colors = x[:, :c]
        # Published quirk: the sigmoid lands on the last (width) axis, i.e. on columns 0..2 only.
        colors = torch.cat([colors[..., :3].sigmoid(), colors[..., 3:]], dim=-1)
        rotations = F.normalize(x[:, c + 4:c + 8], dim=1)
        fields = [colors, x[:, c:c + 1].sigmoid(), x[:, c + 1:c + 4].sigmoid() * SCALE_MAX, rotations,
                  x[:, c + 8:c + 9].sigmoid()]
        colors, opacities, scales, rotations, positions = (
            f.permute(0, 2, 3, 1).reshape(b, h * w, f.shape[1]) for f in fields)
        xyz = plane_points + self.sign * positions * plane_dirs[:, None]
        return GaussianGroup(colors=colors, opacities=opacities, scales=scales, rotations=rotations,
                             xyz=xyz, positions=positions)
