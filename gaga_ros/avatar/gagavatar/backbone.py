"""DINOv2 ViT (B/14 in the published model), written out so its state-dict keys match GAGAvatar.pt.

Own module rather than torch.hub or timm: the hub needs network access and timm renames keys; this
one registers exactly `cls_token, pos_embed, mask_token, patch_embed.proj, blocks.i.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm` (docs/gagavatar.md, Encoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gaga_ros.errors import InputError

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection to tokens."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with biased qkv and output projections."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP with exact GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual gain (DINOv2 LayerScale)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1 Attn(LN x); x += ls2 MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT without registers; returns the final-normed patch tokens of the last four blocks."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: int) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # training-only, kept for the key layout
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four (B, grid*grid, dim) token maps: blocks depth-4..depth-1 through the shared final norm,
        cls token dropped. Token t is grid cell (t // grid, t % grid)."""
        tokens = self.patch_embed(x)
        if tokens.shape[1] != self.grid ** 2:
            raise InputError(f"backbone expects a {self.grid * self.patch_embed.proj.stride[0]}^2 image "
                             f"({self.grid}^2 patches), got {tuple(x.shape[-2:])}")
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        first = len(self.blocks) - 4
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i >= first:
                outputs.append(self.norm(tokens)[:, 1:])
        return outputs
