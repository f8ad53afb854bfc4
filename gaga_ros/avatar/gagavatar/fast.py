"""The GAGAvatar frame path at GPU speed: static buffers, captured graphs, one readback per frame.

`GAGAvatar.render` is the plain reference: it builds a Camera on the host, concatenates the
Gaussians, recomputes their covariances and runs the StyleUNet eagerly in float32, one source at a
time. `FastRenderer` keeps every slot's Gaussians in preallocated buffers (covariances computed once
per source), writes only the 5023 expression positions and the camera per frame, and replays two
CUDA graphs: rasterization of all slots (`gaga_ros.render.static_splat`: gsplat's stages with a
fixed-size intersection buffer, so no host sync and the same image as `gsplat.rasterization`) and
the StyleUNet (fp16 autocast by default, channels_last, optional torch.compile with inductor's
freezing), whose last step writes the uint8 image that one non-blocking copy moves into pinned host
memory.

The refiner copy runs its modulated convolutions unfused (StyleGAN2's non-fused form: scale the
input by the style, one shared-weight conv, scale the output by the demodulation), which is the same
function and lets a batch of styles run as one ordinary convolution instead of a grouped one; all
its layers' styles come from one matrix product of w instead of 23 small ones.
`reference=True` switches back to `GAGAvatar.render` for every slot.

Slots (a fleet of avatars on one GPU): the renderer is built for a fixed number of slots, e.g.
`FastRenderer(model, [source, None, None, None], compile_mode="default")` (None: a free slot), and
its graphs cover all of them; each `render(vertices (N,5023,3), transforms (N,3,4) or one (3,4))`
returns the N images at once. Every call renders every slot, free or not, at the cost of a full
slot. A join, `set_source(slot, source)`, copies the source's Gaussians and covariances into the
slot's buffers: 1.0-1.1 ms on the H200 (`fast join (set_source)` in bench/fast_bench.py), no graph
recaptured. A leave, `clear_slot(slot)`, zeroes the slot's opacities: its Gaussians are culled in
projection and the slot shows the refiner's output for an empty splat. Only when a frame needs
more tile intersections than the buffer holds (sized at the first frame: 1.5x the busiest slot's
count, for every slot) is the rasterization graph recaptured with a larger buffer (one warm-up
call and a capture, not timed yet; the refiner graph stays) and the frame rendered again, so no
frame loses Gaussians.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TypeAlias, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaga_ros.avatar.gagavatar.model import GagaSource, GAGAvatar
from gaga_ros.avatar.gagavatar.refiner import DEMOD_EPS, ModulatedConv2d, StyleGANDecoder, StyleUNet
from gaga_ros.camera import intrinsics, viewmats
from gaga_ros.conventions import FLAME_VERTICES
from gaga_ros.errors import InputError
from gaga_ros.image import to_uint8
from gaga_ros.render.covariance import raw_quat_covariance
from gaga_ros.render.static_splat import StaticRasterizer, required_capacity, triu6

#: fp32: strict float32; tf32: float32 storage, TF32 matrix units; bf16/fp16: autocast refiner.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
Array: TypeAlias = torch.Tensor | np.ndarray


class FastRenderError(InputError):
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


class _SharedStyleDecoder(StyleGANDecoder):
    """The decoder with every layer's style from one matrix product of w: the same maps as its 23
    separate modulation Linears, in one kernel instead of 23 (a few microseconds each at batch 1)."""

    def share_styles(self) -> None:
        """Move the layers' modulation weights into one Linear; each layer then takes its style."""
        convs = self.modulated_convs()
        linears = [cast(nn.Linear, c.modulation) for c in convs]
        self.style_sizes = [m.out_features for m in linears]
        weight = torch.cat([m.weight.data for m in linears])
        rows, cols = weight.shape
        self.style_bank = nn.Linear(cols, rows, device=weight.device, dtype=weight.dtype)
        self.style_bank.weight.data = weight
        self.style_bank.bias.data = torch.cat([m.bias.data for m in linears])
        for conv in convs:
            conv.modulation = nn.Identity()

    def styles(self, w: torch.Tensor) -> list[torch.Tensor]:
        return list(self.style_bank(w).split(self.style_sizes, dim=1))


def fast_refiner(upsampler: StyleUNet) -> nn.Module:
    """A copy of the StyleUNet computing the same function in fewer kernels: unfused modulated convs,
    one style product, channels_last conv weights."""
    refiner = copy.deepcopy(upsampler)
    for parent in list(refiner.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ModulatedConv2d):
                setattr(parent, name, _UnfusedModulatedConv2d(child))
    refiner.stylegan_decoder.__class__ = _SharedStyleDecoder  # overrides `styles` only
    cast(_SharedStyleDecoder, refiner.stylegan_decoder).share_styles()
    for module in refiner.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return refiner


def _compiled(module: nn.Module, mode: str) -> Callable[..., torch.Tensor]:
    """torch.compile in `mode`, compiling with inductor's freezing: the refiner copy's weights never
    change, so its weight-only work (their fp16 casts under autocast, the demodulation sums) is folded
    once at compile time instead of running every frame (bench/FAST_NOTES.md). torch.compile's
    `options` do not reach freezing (torch 2.11: dynamo reads it while tracing), so each call runs under
    a config patch; it matters only for the call that compiles (a CUDA graph's replays skip this)."""
    import torch._inductor.config as inductor

    compiled = torch.compile(module, mode=mode)

    def call(*args: object, **kwargs: object) -> torch.Tensor:
        with inductor.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


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


def _captured(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
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

    model: a GAGAvatar in eval mode; sources: one GagaSource per slot (all from this model), None
    for a slot that starts free (at least one must be a source).
    precision: refiner arithmetic (PRECISIONS); cuda_graph: replay rasterization and refiner from
    CUDA graphs; compile_mode: torch.compile mode for the refiner (None: eager kernels), e.g.
    "default"; encoder_precision: arithmetic of `reconstruct`.
    reference=True: every call goes through GAGAvatar.render (float32, any device).
    """

    def __init__(self, model: GAGAvatar, sources: GagaSource | Sequence[GagaSource], *,
                 precision: str = "fp16", cuda_graph: bool = True, compile_mode: str | None = None,
                 encoder_precision: str = "tf32", reference: bool = False) -> None:
        if not isinstance(model, GAGAvatar):
            raise FastRenderError(f"model must be a GAGAvatar, got {type(model).__name__}")
        sources = [sources] if isinstance(sources, GagaSource) else list(sources)
        if not all(s is None or isinstance(s, GagaSource) for s in sources):
            raise FastRenderError("sources must be one GagaSource or a sequence of GagaSource or None")
        if not any(isinstance(s, GagaSource) for s in sources):
            raise FastRenderError("sources must hold at least one GagaSource (None marks a free slot)")
        for p in (precision, encoder_precision):
            if p not in PRECISIONS:
                raise FastRenderError(f"unknown precision {p!r}; accepted: {', '.join(PRECISIONS)}")
        self.model, self.reference, self.batch = model, reference, len(sources)
        self.precision, self.encoder_precision, self.cuda_graph = precision, encoder_precision, cuda_graph
        self.size = model.cfg.render_size
        self._sources: list[GagaSource | None] = list(sources)
        self._encoder_graph: torch.cuda.CUDAGraph | None = None
        if reference:
            return
        if model.device.type != "cuda":
            raise FastRenderError(f"the fast path needs the model on a CUDA device, got {model.device}; "
                                  "use reference=True on the CPU")
        import gsplat  # noqa: F401  (fail here, not on the first frame, when it is missing)

        dev, b, size = model.device, self.batch, self.size
        first = next(s for s in sources if s is not None)
        n, channels = len(first.opacities), first.colors.shape[1]
        self._means = torch.zeros(b, n, 3, device=dev)
        self._covars = torch.zeros(b, n, 6, device=dev)
        self._opacities = torch.empty(b, n, device=dev)
        self._colors = torch.zeros(b, n, channels, device=dev)
        for slot, source in enumerate(sources):
            if source is None:
                self.clear_slot(slot)
            else:
                self.set_source(slot, source)
        self._means[:, :FLAME_VERTICES] = 0.0
        self._transforms = torch.zeros(b, 3, 4, device=dev)
        self._transforms[:, :, :3] = torch.eye(3, device=dev)
        self._view = torch.zeros(b, 1, 4, 4, device=dev)
        self._view[..., 3, 3] = 1.0
        K = torch.as_tensor(intrinsics(size, model.cfg.focal), device=dev, dtype=torch.float32)
        self._K = K.expand(b, 1, 3, 3).contiguous()
        self._splat = torch.zeros(b, channels, size, size, device=dev).contiguous(
            memory_format=torch.channels_last)  # (B,C,H,W) view of gsplat's (B,H,W,C) layout
        self._rgb = torch.empty(b, 3, size, size, device=dev)
        self._u8 = torch.empty(b, size, size, 3, dtype=torch.uint8, device=dev)
        self._host = [torch.empty(b, size, size, 3, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self._turn = 0
        self._copied = torch.cuda.Event()
        self._total = torch.zeros((), dtype=torch.int64, device=dev)
        self._total_host = torch.zeros((), dtype=torch.int64).pin_memory()
        refiner = fast_refiner(model.upsampler)
        self._refiner = _compiled(refiner, compile_mode) if compile_mode else refiner
        self._rasterizer: StaticRasterizer | None = None  # sized at the first frame
        self._raster_graph: torch.cuda.CUDAGraph | None = None
        self._refine_graph = _captured(self._refine) if cuda_graph else None

    @property
    def capacity(self) -> int:
        """Tile-list entries the rasterization buffer holds (0 before the first frame)."""
        return self._rasterizer.capacity if self._rasterizer is not None else 0

    @torch.no_grad()
    def set_source(self, slot: int, source: GagaSource) -> None:
        """Put `source` in `slot` (a join): its Gaussians and covariances are copied into the slot's
        buffers; no graph is recaptured."""
        self._check_slot(slot)
        if not isinstance(source, GagaSource):
            raise FastRenderError(f"source must be a GagaSource, got {type(source).__name__}")
        if self.reference:
            self._sources[slot] = source
            return
        if tuple(source.colors.shape) != tuple(self._colors.shape[1:]):
            raise FastRenderError(f"source has {tuple(source.colors.shape)} Gaussian colours, the slots "
                                  f"hold {tuple(self._colors.shape[1:])}; use sources of one model")
        self._sources[slot] = source
        self._means[slot, FLAME_VERTICES:] = source.local_means
        self._covars[slot] = triu6(raw_quat_covariance(source.quats, source.scales))
        self._opacities[slot] = source.opacities
        self._colors[slot] = source.colors

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Free `slot` (a leave): its Gaussians are made transparent; the slot renders an empty splat
        through the refiner until the next `set_source`."""
        self._check_slot(slot)
        self._sources[slot] = None
        if not self.reference:
            self._opacities[slot] = 0.0

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int | np.integer) or not 0 <= slot < self.batch:
            raise FastRenderError(f"slot must be in 0..{self.batch - 1}, got {slot!r}")

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
            out = GagaSource.from_groups(groups, transform[0], dtype=torch.float32)
        self._enc_out = (out.local_means, out.quats, out.scales, out.opacities, out.colors)

    @torch.no_grad()
    def frame(self, vertices: Array, transforms: Array) -> torch.Tensor:
        """Refined RGB (B,3,H,W) float32 in [0,1] on the model's device for FLAME `vertices`
        (B,5023,3) and cameras `transforms` (B,3,4) ((5023,3)/(3,4) when B is 1; one (3,4) is
        shared by all slots). Fast mode returns a static buffer, overwritten by the next call.
        A free slot (`clear_slot`) gives the refiner's empty image (reference mode: zeros)."""
        vertices, transforms = self._inputs(vertices, transforms)
        if self.reference:
            return torch.cat([self._reference_frame(s, v, t)
                              for s, v, t in zip(self._sources, vertices, transforms, strict=True)])
        self._render_checked(readback=False)
        return self._rgb

    @torch.no_grad()
    def render(self, vertices: Array, transforms: Array) -> np.ndarray:
        """Images (B,H,W,3) uint8 on the host, round(255 * frame()). Fast mode: a view of pinned
        memory, valid until the second call after this one (two buffers alternate)."""
        vertices, transforms = self._inputs(vertices, transforms)
        if self.reference:
            rgb = torch.cat([self._reference_frame(s, v, t)
                             for s, v, t in zip(self._sources, vertices, transforms, strict=True)])
            return to_uint8(rgb).permute(0, 2, 3, 1).cpu().numpy()
        images = self._render_checked(readback=True)
        assert images is not None  # a readback returns the images
        return images

    def _reference_frame(self, source: GagaSource | None, vertices: torch.Tensor,
                         transform: torch.Tensor) -> torch.Tensor:
        if source is None:
            return torch.zeros(1, 3, self.size, self.size, device=vertices.device)
        return self.model.render(source, vertices, transform).refined

    def _inputs(self, vertices: Array, transforms: Array) -> tuple[torch.Tensor, torch.Tensor]:
        """Checks the shapes; fast mode also writes them into the static input buffers."""
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
        t = t.expand(self.batch, 3, 4)
        if not self.reference:
            self._means[:, :FLAME_VERTICES].copy_(v)
            self._transforms.copy_(t)
        return v, t

    def _render_checked(self, readback: bool) -> np.ndarray | None:
        """Renders the frame in the input buffers; again with a larger tile-list buffer if it
        overflowed (so no frame loses Gaussians)."""
        rasterizer = self._rasterizer or self._build_rasterizer()
        while True:
            self._replay()
            host = None
            if readback:
                host = self._host[self._turn]
                host.copy_(self._u8, non_blocking=True)
            self._total_host.copy_(self._total, non_blocking=True)
            self._copied.record()
            self._copied.synchronize()
            total = int(self._total_host)
            if total <= rasterizer.capacity:
                break
            self._raster_graph = None  # it writes the buffers that resize replaces
            rasterizer.resize(required_capacity(total))
            self._capture_raster()
        if host is None:
            return None
        self._turn ^= 1
        return host.numpy()

    def _replay(self) -> None:
        for graph, eager in ((self._raster_graph, self._rasterize), (self._refine_graph, self._refine)):
            if graph is not None:
                graph.replay()
            else:
                eager()

    @torch.no_grad()
    def _build_rasterizer(self) -> StaticRasterizer:
        """Size the tile-list buffer from this frame: 1.5x the busiest slot's count, for every slot
        (a joining avatar of similar size fits without a recapture)."""
        self._write_view()
        n, dev = self._means.shape[1], self._means.device
        probe = StaticRasterizer(self.batch, n, self.size, self.size, 1, dev)
        per_slot = probe.needed(self._means, self._covars, self._opacities, self._view, self._K)
        busiest = max(int(per_slot.max()), 1 << 14)
        self._rasterizer = StaticRasterizer(self.batch, n, self.size, self.size,
                                            required_capacity(busiest * self.batch), dev)
        self._capture_raster()
        return self._rasterizer

    def _capture_raster(self) -> None:
        if self.cuda_graph:
            self._raster_graph = _captured(self._rasterize, warmup=1)

    def _write_view(self) -> None:
        self._view[:, 0].copy_(viewmats(self._transforms))  # on the device, inside the graph

    def _rasterize(self) -> None:
        rasterizer = self._rasterizer
        assert rasterizer is not None  # built before the first frame (_render_checked)
        self._write_view()
        image = rasterizer(self._means, self._covars, self._opacities, self._colors, self._view, self._K)
        self._splat.permute(0, 2, 3, 1).copy_(image)
        assert rasterizer.total is not None  # set by the call above
        self._total.copy_(rasterizer.total)

    def _refine(self) -> None:
        with precision_mode(self.precision):
            rgb = self._refiner(self._splat, randomize_noise=self.model.cfg.randomize_noise)
        self._rgb.copy_(rgb.float().clamp(0, 1))
        self._u8.copy_(to_uint8(self._rgb).permute(0, 2, 3, 1))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0,1] (inf when equal)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
