"""The GAGAvatar frame path at GPU speed: static buffers, a captured refiner, one readback per frame.

`GAGAvatar.render` is the plain reference: it builds a Camera on the host, concatenates the
Gaussians, recomputes their covariances and runs the StyleUNet eagerly in float32, one source at a
time. `FastRenderer` keeps every source's Gaussians in preallocated per-slot buffers (covariances
computed once per source), writes only the 5023 expression positions and the view matrix per
frame, rasterizes all slots in one batched gsplat call, and replays the StyleUNet from a CUDA graph
(fp16 autocast by default, channels_last, optional torch.compile) whose last step writes the uint8 image
that one non-blocking copy moves into pinned host memory. gsplat itself still synchronises once per
call (it sizes its tile-intersection buffer on the host), so rasterization stays outside the graph.

The refiner copy runs its modulated convolutions unfused (StyleGAN2's non-fused form: scale the
input by the style, one shared-weight conv, scale the output by the demodulation), which is the same
function and lets a batch of styles run as one ordinary convolution instead of a grouped one.
`reference=True` switches back to `GAGAvatar.render` for every slot.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaga_ros.avatar.gagavatar.model import GagaSource, GAGAvatar
from gaga_ros.avatar.gagavatar.refiner import DEMOD_EPS, ModulatedConv2d
from gaga_ros.camera import Camera
from gaga_ros.config import FLAME_VERTICES
from gaga_ros.render.covariance import raw_quat_covariance
from gaga_ros.render.rasterize import EPS2D, NEAR_PLANE

#: fp32: strict float32; tf32: float32 storage, TF32 matrix units; bf16/fp16: autocast refiner.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
Array: TypeAlias = torch.Tensor | np.ndarray


class FastRenderError(ValueError):
    """The model, sources, options or per-frame inputs cannot be used by the fast frame path."""


class _UnfusedModulatedConv2d(nn.Module):
    """ModulatedConv2d computed as input scaling + shared conv + output demodulation (same maths)."""

    def __init__(self, conv: ModulatedConv2d) -> None:
        super().__init__()
        self.modulation = conv.modulation
        self.weight = conv.weight
        self.demodulate = conv.demodulate
        self.upsample = conv.upsample

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.modulation(w)  # (B, cin)
        weight = self.weight[0]  # (cout, cin, k, k)
        x = x * style[:, :, None, None].to(x.dtype)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        out = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
        if self.demodulate:
            energy = style.float().pow(2) @ weight.float().pow(2).sum(dim=(2, 3)).t()  # (B, cout)
            out = out * torch.rsqrt(energy + DEMOD_EPS)[:, :, None, None].to(out.dtype)
        return out


def fast_refiner(upsampler: nn.Module) -> nn.Module:
    """A copy of the StyleUNet with unfused modulated convs and channels_last conv weights."""
    refiner = copy.deepcopy(upsampler)
    for parent in list(refiner.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ModulatedConv2d):
                setattr(parent, name, _UnfusedModulatedConv2d(child))
    for module in refiner.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return refiner


@contextlib.contextmanager
def precision_mode(precision: str) -> Iterator[None]:
    """TF32 flags and cudnn autotuning for `precision`, restored on exit."""
    if precision not in PRECISIONS:
        raise FastRenderError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    try:
        if precision in _AUTOCAST:
            with torch.autocast("cuda", dtype=_AUTOCAST[precision], cache_enabled=False):
                yield
        else:
            yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def _captured(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `fn` (which reads and writes only static buffers), after side-stream warm-up."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph


class FastRenderer:
    """Renders B avatar slots per call, expression in -> 512x512 image out.

    model: a GAGAvatar in eval mode; sources: one GagaSource per slot (all from this model).
    precision: refiner arithmetic (PRECISIONS); cuda_graph: replay the refiner from a CUDA graph;
    compile_mode: torch.compile mode for the refiner (None: eager kernels), e.g.
    "max-autotune-no-cudagraphs"; encoder_precision: arithmetic of `reconstruct`.
    reference=True: every call goes through GAGAvatar.render (float32, any device).
    """

    def __init__(self, model: GAGAvatar, sources: GagaSource | Sequence[GagaSource], *,
                 precision: str = "fp16", cuda_graph: bool = True, compile_mode: str | None = None,
                 encoder_precision: str = "tf32", reference: bool = False) -> None:
        if not isinstance(model, GAGAvatar):
            raise FastRenderError(f"model must be a GAGAvatar, got {type(model).__name__}")
        sources = [sources] if isinstance(sources, GagaSource) else list(sources)
        if not sources or not all(isinstance(s, GagaSource) for s in sources):
            raise FastRenderError("sources must be one GagaSource or a non-empty sequence of them")
        for p in (precision, encoder_precision):
            if p not in PRECISIONS:
                raise FastRenderError(f"unknown precision {p!r}; accepted: {', '.join(PRECISIONS)}")
        self.model, self.reference, self.batch = model, reference, len(sources)
        self.precision, self.encoder_precision = precision, encoder_precision
        self.size = model.cfg.render_size
        self._sources = sources
        self._encoder_graph: torch.cuda.CUDAGraph | None = None
        if reference:
            return
        if model.device.type != "cuda":
            raise FastRenderError(f"the fast path needs the model on a CUDA device, got {model.device}; "
                                  "use reference=True on the CPU")
        import gsplat  # noqa: F401  (fail here, not on the first frame, when it is missing)

        dev, b, size = model.device, self.batch, self.size
        n, channels = len(sources[0].opacities), sources[0].colors.shape[1]
        self._means = torch.empty(b, n, 3, device=dev)
        self._covars = torch.empty(b, n, 3, 3, device=dev)
        self._opacities = torch.empty(b, n, device=dev)
        self._colors = torch.empty(b, n, channels, device=dev)
        for slot, source in enumerate(sources):
            self.set_source(slot, source)
        self._view = torch.zeros(b, 1, 4, 4, device=dev)
        self._view[..., 3, 3] = 1.0
        camera = Camera.from_transform(np.eye(3, 4), size, model.cfg.focal)
        self._K = torch.as_tensor(camera.K, device=dev).expand(b, 1, 3, 3).contiguous()
        self._splat = torch.zeros(b, channels, size, size, device=dev).contiguous(
            memory_format=torch.channels_last)  # (B,C,H,W) view of gsplat's (B,H,W,C) layout
        self._rgb = torch.empty(b, 3, size, size, device=dev)
        self._u8 = torch.empty(b, size, size, 3, dtype=torch.uint8, device=dev)
        self._host = [torch.empty(b, size, size, 3, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self._turn = 0
        self._copied = torch.cuda.Event()
        refiner = fast_refiner(model.upsampler)
        self._refiner = torch.compile(refiner, mode=compile_mode) if compile_mode else refiner
        self._graph = _captured(self._refine) if cuda_graph else None

    @torch.no_grad()
    def set_source(self, slot: int, source: GagaSource) -> None:
        """Put `source` in `slot`: its Gaussians and covariances are copied into the slot's buffers."""
        if not 0 <= slot < self.batch:
            raise FastRenderError(f"slot must be in 0..{self.batch - 1}, got {slot}")
        if not isinstance(source, GagaSource):
            raise FastRenderError(f"source must be a GagaSource, got {type(source).__name__}")
        self._sources[slot] = source
        if self.reference:
            return
        if tuple(source.colors.shape) != tuple(self._colors.shape[1:]):
            raise FastRenderError(f"source has {tuple(source.colors.shape)} Gaussian colours, the slots "
                                  f"hold {tuple(self._colors.shape[1:])}; use sources of one model")
        self._means[slot, FLAME_VERTICES:] = source.local_means
        self._covars[slot] = raw_quat_covariance(source.quats, source.scales)
        self._opacities[slot] = source.opacities
        self._colors[slot] = source.colors

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor, transform: Array) -> GagaSource:
        """GAGAvatar.reconstruct in `encoder_precision`, replayed from a CUDA graph after the first
        call (reference mode: the plain model). The result is fresh tensors, safe to keep."""
        if self.reference:
            return self.model.reconstruct(image, transform)
        image = self.model._source_image(image)
        transform = self.model._transforms(transform, 1)
        inputs = (image, transform, *self.model.planes(transform))  # planes: on the CPU, outside the graph
        if self._encoder_graph is None:
            self._enc_in = tuple(t.clone() for t in inputs)
            self._encoder_graph = _captured(self._encode, warmup=2)
        for buffer, value in zip(self._enc_in, inputs, strict=True):
            buffer.copy_(value)
        self._encoder_graph.replay()
        local_means, quats, scales, opacities, colors = (t.clone() for t in self._enc_out)
        return GagaSource(local_means, quats, scales, opacities, colors, transform[0].clone())

    def _encode(self) -> None:
        model, (image, transform, points, dirs) = self.model, self._enc_in
        with precision_mode(self.encoder_precision):
            groups = model.gaussian_groups(model.base_model(image), transform, planes=(points, dirs))
            fields = [torch.cat([getattr(g, f)[0].float() for g in groups])
                      for f in ("rotations", "scales", "opacities", "colors")]
            local_means = torch.cat([g.xyz[0].float() for g in groups[1:]])
        self._enc_out = (local_means, fields[0], fields[1], fields[2][:, 0], fields[3])

    @torch.no_grad()
    def frame(self, vertices: Array, transforms: Array) -> torch.Tensor:
        """Refined RGB (B,3,H,W) float32 in [0,1] on the model's device for FLAME `vertices`
        (B,5023,3) and cameras `transforms` (B,3,4) ((5023,3)/(3,4) when B is 1; one (3,4) is
        shared by all slots). Fast mode returns a static buffer, overwritten by the next call."""
        vertices, transforms = self._inputs(vertices, transforms)
        if self.reference:
            return torch.cat([self.model.render(s, v, t).refined
                              for s, v, t in zip(self._sources, vertices, transforms, strict=True)])
        self._rasterize(vertices, transforms)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._refine()
        return self._rgb

    @torch.no_grad()
    def render(self, vertices: Array, transforms: Array) -> np.ndarray:
        """Images (B,H,W,3) uint8 on the host, round(255 * frame()). Fast mode: a view of pinned
        memory, valid until the second call after this one (two buffers alternate)."""
        rgb = self.frame(vertices, transforms)
        if self.reference:
            return _to_uint8(rgb).permute(0, 2, 3, 1).cpu().numpy()
        host = self._host[self._turn]
        self._turn ^= 1
        host.copy_(self._u8, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()
        return host.numpy()

    def _inputs(self, vertices, transforms) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.model.device
        v = torch.as_tensor(vertices, dtype=torch.float32, device=device)
        t = torch.as_tensor(transforms, dtype=torch.float32, device=device)
        if v.ndim == 2:
            v = v[None]
        if tuple(v.shape) != (self.batch, FLAME_VERTICES, 3):
            raise FastRenderError(f"vertices must have shape ({self.batch},{FLAME_VERTICES},3) for "
                                  f"{self.batch} slot(s), got {tuple(v.shape)}")
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[1:] != (3, 4) or t.shape[0] not in (1, self.batch):
            raise FastRenderError(f"transforms must be [R | T] of shape (3,4) or ({self.batch},3,4), got "
                                  f"{tuple(t.shape)}")
        return v, t.expand(self.batch, 3, 4)

    def _rasterize(self, vertices: torch.Tensor, transforms: torch.Tensor) -> None:
        import gsplat

        self._means[:, :FLAME_VERTICES].copy_(vertices)
        # Camera.from_transform on the device: rows 0 and 1 of [R^T | T] flipped (OpenCV axes).
        self._view[:, 0, :3, :3].copy_(transforms[:, :, :3].transpose(1, 2))
        self._view[:, 0, :3, 3].copy_(transforms[:, :, 3])
        self._view[:, 0, :2].neg_()
        image, _, _ = gsplat.rasterization(
            self._means, None, None, self._opacities, self._colors, self._view, self._K, self.size,
            self.size, near_plane=NEAR_PLANE, eps2d=EPS2D, sh_degree=None, packed=False,
            rasterize_mode="classic", covars=self._covars)
        self._splat.permute(0, 2, 3, 1).copy_(image[:, 0])

    def _refine(self) -> None:
        with precision_mode(self.precision):
            rgb = self._refiner(self._splat, randomize_noise=self.model.cfg.randomize_noise)
        self._rgb.copy_(rgb.float().clamp(0, 1))
        self._u8.copy_(_to_uint8(self._rgb).permute(0, 2, 3, 1))


def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb * 255.0).round_().to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0,1] (inf when equal)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
