"""The feature encoder (`base_model`): DINOv2 tokens fused DPT-style into a local plane + global vector.

docs/gagavatar.md, Encoder. Quirks kept on purpose: the global vector is the top-left *patch* token (not cls),
each level concatenates the antialiased, normalised input image in front of its features, and the
fusion blocks upsample with align_corners=True.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gaga_ros.avatar.gagavatar.backbone import DinoVisionTransformer
from gaga_ros.avatar.gagavatar.sizes import GagaSizes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Features(NamedTuple):
    """Encoder outputs: local (B,C,P,P) plane, global (B,D) vector, the four (B,N,D) token maps."""

    local: torch.Tensor
    global_: torch.Tensor
    tokens: list[torch.Tensor]


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), both 3x3 with bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """out = RCU2(in0 [+ RCU1(in1)]), upsampled (align_corners=True) to `size` or x2, then 1x1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(channels, channels, 1)
        self.resConfUnit1 = ResidualConvUnit(channels)  # unused by refinenet[0]; kept for the key layout
        self.resConfUnit2 = ResidualConvUnit(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: int | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        out_size = (size, size) if size is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class FeatureEncoder(nn.Module):
    """The `base_model` of GAGAvatar: frozen DINOv2 plus the multi-scale fusion head."""

    def __init__(self, cfg: GagaSizes) -> None:
        super().__init__()
        dim, feat = cfg.embed_dim, cfg.fusion_channels
        self.dino_model = DinoVisionTransformer(cfg.image_size, cfg.patch_size, dim, cfg.depth,
                                                cfg.num_heads, cfg.mlp_ratio)
        self.dino_model.requires_grad_(False)
        c = cfg.project_channels
        self.projects = nn.ModuleList(nn.Conv2d(dim, ch, 1) for ch in c)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], 4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], 3, stride=2, padding=1),
        ])
        self.layer_rn = nn.ModuleList(nn.Conv2d(3 + ch, feat, 3, padding=1, bias=False) for ch in c)
        self.refinenet = nn.ModuleList(FusionBlock(feat) for _ in range(4))
        self.output_conv = nn.Conv2d(feat, feat, 3, padding=1)
        self.grid = cfg.grid
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    mean: torch.Tensor  # buffers (declared for the type checker)
    std: torch.Tensor

    def forward(self, image: torch.Tensor) -> Features:
        """Encode a (B,3,S,S) image in [0,1] (S = cfg.image_size)."""
        image = (image - self.mean) / self.std
        tokens = self.dino_model(image)
        g = self.grid
        rn = []
        for i, t in enumerate(tokens):
            x = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], g, g)
            x = self.resize_layers[i](self.projects[i](x))
            small = F.interpolate(image, size=x.shape[-2:], mode="bilinear", align_corners=False,
                                  antialias=True).detach()
            rn.append(self.layer_rn[i](torch.cat([small, x], dim=1)))
        p = self.refinenet[0](rn[3], size=g)
        p = self.refinenet[1](p, rn[2], size=2 * g)
        p = self.refinenet[2](p, rn[1], size=4 * g)
        p = self.refinenet[3](p, rn[0])
        return Features(self.output_conv(p), tokens[-1][:, 0], tokens)
