"""StyleUNet neural renderer (`upsampler`): 32-channel splat image -> RGB (docs/gagavatar.md).

A UNet encoder gives skips and a style code; a StyleGAN2 decoder (one shared w for every layer,
no blur, no runtime equalised-lr) is modulated by spatial SFT scale/shift maps from the UNet decoder
at every level. Noise: fresh N(0,1) per call as published, or the stored `noises.noise{j}` maps.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from gaga_ros.avatar.gagavatar.sizes import GagaSizes

SLOPE = 0.2
DEMOD_EPS = 1e-8


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, SLOPE)


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class ResBlock(nn.Module):
    """lrelu(conv1) -> resample -> lrelu(conv2), plus a bias-free 1x1 skip of the resampled input."""

    def __init__(self, cin: int, cout: int, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _lrelu(self.conv2(_resize(_lrelu(self.conv1(x)), self.factor)))
        return h + self.skip(_resize(x, self.factor))


class ModulatedConv2d(nn.Module):
    """Per-sample modulated (and optionally demodulated) conv; `upsample` resizes x2 first."""

    def __init__(self, cin: int, cout: int, kernel: int, style_dim: int, demodulate: bool,
                 upsample: bool = False) -> None:
        super().__init__()
        self.demodulate = demodulate
        self.upsample = upsample
        self.modulation = nn.Linear(style_dim, cin)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, kernel, kernel) / math.sqrt(cin * kernel ** 2))
        nn.init.ones_(self.modulation.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, cin = x.shape[:2]
        weight = self.weight * self.modulation(w).view(b, 1, cin, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + DEMOD_EPS)
        if self.upsample:
            x = _resize(x, 2.0)
        cout, k = weight.shape[1], weight.shape[-1]
        out = F.conv2d(x.reshape(1, b * cin, *x.shape[2:]), weight.reshape(b * cout, cin, k, k),
                       padding=k // 2, groups=b)
        return out.view(b, cout, *out.shape[2:])


class StyleConv(nn.Module):
    """sqrt(2) * ModConv, + noise_strength * noise, + bias, then LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, cout, 3, style_dim, demodulate=True, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        out = self.modulated_conv(x, w) * math.sqrt(2.0)
        if noise is None:
            noise = out.new_empty(out.shape[0], 1, *out.shape[2:]).normal_()
        return _lrelu(out + self.weight * noise + self.bias)


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, + bias, + the previous RGB upsampled x2."""

    def __init__(self, cin: int, style_dim: int) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        out = self.modulated_conv(x, w) + self.bias
        return out if previous is None else out + _resize(previous, 2.0)


class ConstantInput(nn.Module):
    """The learned 4x4 starting map of the StyleGAN decoder."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, 4, 4))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class NormStyleCode(nn.Module):
    """x / sqrt(mean(x^2) + 1e-8) over the style features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class StyleGANDecoder(nn.Module):
    """StyleGAN2 synthesis with SFT (out * scale + shift) after every upsampling conv."""

    def __init__(self, size: int, channels: dict[int, int], style_dim: int, mlp_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [NormStyleCode()]
        for _ in range(mlp_layers):
            layers += [nn.Linear(style_dim, style_dim), nn.LeakyReLU(SLOPE)]
        self.style_mlp = nn.Sequential(*layers)
        self.constant_input = ConstantInput(channels[4])
        self.style_conv1 = StyleConv(channels[4], channels[4], style_dim)
        self.to_rgb1 = ToRGB(channels[4], style_dim)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        levels = int(math.log2(size)) - 2
        for j in range(2 * levels + 1):
            r = 2 ** ((j + 5) // 2)
            self.noises.register_buffer(f"noise{j}", torch.randn(1, 1, r, r))
        cin = channels[4]
        for k in range(levels):
            cout = channels[8 * 2 ** k]
            self.style_convs.append(StyleConv(cin, cout, style_dim, upsample=True))
            self.style_convs.append(StyleConv(cout, cout, style_dim))
            self.to_rgbs.append(ToRGB(cout, style_dim))
            cin = cout

    def modulated_convs(self) -> list[nn.Module]:
        """Every layer's modulated conv, in the order of `styles`."""
        layers = [self.style_conv1, self.to_rgb1, *self.style_convs, *self.to_rgbs]
        return [cast(nn.Module, layer.modulated_conv) for layer in layers]

    def styles(self, w: torch.Tensor) -> list[torch.Tensor]:
        """What each layer's modulated conv takes, in `modulated_convs` order: here w for all."""
        return [w] * (2 + len(self.style_convs) + len(self.to_rgbs))

    def forward(self, code: torch.Tensor, conditions: list[tuple[torch.Tensor, torch.Tensor]],
                randomize_noise: bool) -> torch.Tensor:
        styles = self.styles(self.style_mlp(code))
        convs, rgbs = styles[2:2 + len(self.style_convs)], styles[2 + len(self.style_convs):]
        n = len(self.style_convs) + 1
        noise = [None] * n if randomize_noise else [getattr(self.noises, f"noise{j}") for j in range(n)]
        out = self.style_conv1(self.constant_input(code.shape[0]), styles[0], noise[0])
        rgb = self.to_rgb1(out, styles[1], None)
        for k, (scale, shift) in enumerate(conditions):
            out = self.style_convs[2 * k](out, convs[2 * k], noise[2 * k + 1])
            out = out * scale + shift
            out = self.style_convs[2 * k + 1](out, convs[2 * k + 1], noise[2 * k + 2])
            rgb = self.to_rgbs[k](out, rgbs[k], rgb)
        return rgb


def _condition(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(SLOPE),
                         nn.Conv2d(ch, 2 * ch, 3, padding=1))


class StyleUNet(nn.Module):
    """The `upsampler`: UNet encoder/decoder conditioning a StyleGAN2 decoder; sigmoid RGB out."""

    def __init__(self, cfg: GagaSizes) -> None:
        super().__init__()
        size = cfg.render_size
        self.size = size
        levels = int(math.log2(size)) - 2
        res = [size // 2 ** i for i in range(levels + 1)]  # size ... 4
        unet = {r: min(cfg.refiner_max, cfg.refiner_base * (size // r)) for r in res}
        decoder = {r: 2 * unet[r] for r in res if r >= 8} | {4: 2 * unet[8]}
        self.conv_body_first = nn.Conv2d(cfg.gaussian_channels, unet[size], 1)
        self.conv_body_down = nn.ModuleList(ResBlock(unet[r], unet[r // 2], 0.5) for r in res[:-1])
        self.final_conv = nn.Conv2d(unet[4], unet[4], 3, padding=1)
        up = res[::-1][:-1]  # 4 ... size/2: input resolution of each up block
        self.conv_body_up = nn.ModuleList(ResBlock(unet[r], unet[2 * r], 2.0) for r in up)
        self.toRGB = nn.ModuleList(nn.Conv2d(unet[2 * r], 3, 1) for r in up)  # unused side outputs
        self.final_linear = nn.Linear(unet[4] * 16, cfg.style_dim)
        self.stylegan_decoder = StyleGANDecoder(size, decoder, cfg.style_dim, cfg.style_mlp_layers)
        self.condition_scale = nn.ModuleList(_condition(unet[2 * r]) for r in up)
        self.condition_shift = nn.ModuleList(_condition(unet[2 * r]) for r in up)

    def forward(self, x: torch.Tensor, randomize_noise: bool = True) -> torch.Tensor:
        """(B, C, H, W) feature image -> (B, 3, size, size) RGB in (0, 1)."""
        if x.shape[-1] < self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = _lrelu(self.final_conv(feat))
        code = self.final_linear(feat.flatten(1))
        conditions = []
        for k, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[-1 - k])
            conditions.append((self.condition_scale[k](feat), self.condition_shift[k](feat)))
        rgb = self.stylegan_decoder(code, conditions, randomize_noise)
        return rgb.sigmoid()
