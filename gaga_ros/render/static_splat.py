"""gsplat 1.5.3's classic rasterization without a host sync, so it can be captured in a CUDA graph.

`gsplat.rasterization` counts the tile intersections on the device and reads the count on the host
to size its buffers (`intersect_tile` in gsplat's csrc/Intersect.cpp), so every call waits for the
GPU and cannot be captured. `StaticRasterizer` keeps gsplat's projection (`fully_fused_projection`,
opacity-aware radii as `rasterization` passes them) and its per-tile compositing kernel
(`rasterize_to_pixels`), and replaces the tile lists in between by a fixed-size version:

1. each image's Gaussians sorted by depth (a segmented sort of N floats per image);
2. two Triton passes over gsplat's tile rectangle of every Gaussian in that order (count, then
   write), keeping only the tiles whose pixel centres the Gaussian's alpha can reach >= 1/255;
3. one stable sort of the 16-bit (image, tile) keys, which keeps the depth order inside each tile;
   tile offsets by binary search.

Step 2 drops only Gaussians that gsplat's kernel skips anyway (alpha < 1/255 at every pixel of the
tile, tested on the tile's box of pixel centres with a small margin), and the rest keep gsplat's
order (depth, then index), so the image is gsplat's image bit for bit. Unused buffer entries keep
the key -1 and sort to the front, before every tile's range, so the compositor never reads them (its
last tile ends at the buffer's end). Intersections past the capacity are dropped; `total` holds the
needed count on the device, for the caller to check after its own sync and grow the buffer.
"""

from __future__ import annotations

import math

import torch

from gaga_ros.errors import InputError
from gaga_ros.render.rasterize import ALPHA_MIN, EPS2D, NEAR_PLANE, TILE_SIZE

#: Index of the 6 upper-triangle entries of a 3x3 covariance, gsplat's `covars` layout.
TRIU = ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])
#: Slack on the exponent when culling a tile: e^0.05 = 1.05x the alpha threshold, far more than the
#: rounding of gsplat's float sigma and __expf.
CULL_MARGIN = 0.05
_BLOCK = 128


def triu6(covars: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) symmetric covariances -> (..., 6) upper triangles (gsplat's covars layout)."""
    return covars[..., TRIU[0], TRIU[1]]


def project(means: torch.Tensor, covars6: torch.Tensor, opacities: torch.Tensor, viewmats: torch.Tensor,
            Ks: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, ...]:
    """gsplat's projection as `rasterization` calls it, one camera per image: radii (I,N,2),
    means2d (I,N,2), depths (I,N), conics (I,N,3)."""
    from gsplat.cuda._wrapper import fully_fused_projection

    radii, means2d, depths, conics, _ = fully_fused_projection(
        means, covars6, None, None, viewmats, Ks, width, height, eps2d=EPS2D, near_plane=NEAR_PLANE,
        opacities=opacities)
    return radii[:, 0], means2d[:, 0], depths[:, 0], conics[:, 0]


def _tile_pass_kernel():
    """The Triton kernel, built on first use (Triton is only needed on the GPU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def tile_pass(order_ptr, means_ptr, radii_ptr, conics_ptr, opac_ptr, count_ptr, start_ptr, keys_ptr,
                  ids_ptr, total, per_image, tw, th, capacity, margin, alpha_min,
                  TILE: tl.constexpr, EMIT: tl.constexpr, BLOCK: tl.constexpr):
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = j < total
        g = tl.load(order_ptr + j, mask=live, other=0)
        rx = tl.load(radii_ptr + 2 * g, mask=live, other=0)
        ry = tl.load(radii_ptr + 2 * g + 1, mask=live, other=0)
        mx = tl.load(means_ptr + 2 * g, mask=live, other=0.0)
        my = tl.load(means_ptr + 2 * g + 1, mask=live, other=0.0)
        ca = tl.load(conics_ptr + 3 * g, mask=live, other=1.0)
        cb = tl.load(conics_ptr + 3 * g + 1, mask=live, other=0.0)
        cc = tl.load(conics_ptr + 3 * g + 2, mask=live, other=1.0)
        opac = tl.load(opac_ptr + g, mask=live, other=1.0)
        # gsplat's intersect_tile_kernel rectangle (its float-to-unsigned casts saturate at 0).
        inv = 1.0 / TILE
        tx, ty = mx * inv, my * inv
        trx, try_ = rx.to(tl.float32) * inv, ry.to(tl.float32) * inv
        x0 = tl.minimum(tl.maximum(tl.floor(tx - trx), 0.0), tw * 1.0).to(tl.int32)
        x1 = tl.minimum(tl.maximum(tl.ceil(tx + trx), 0.0), tw * 1.0).to(tl.int32)
        y0 = tl.minimum(tl.maximum(tl.floor(ty - try_), 0.0), th * 1.0).to(tl.int32)
        y1 = tl.minimum(tl.maximum(tl.ceil(ty + try_), 0.0), th * 1.0).to(tl.int32)
        w = tl.maximum(x1 - x0, 1)
        n = tl.where(live & (rx > 0) & (ry > 0), (x1 - x0) * (y1 - y0), 0)
        # The compositor skips the Gaussian where 0.5 d^T conic d > log(opacity / ALPHA_MIN).
        limit = tl.log(opac / alpha_min) + margin
        image = (g // per_image).to(tl.int32)
        if EMIT:
            pos = tl.load(start_ptr + j, mask=live, other=0)
        else:
            hits = tl.zeros([BLOCK], dtype=tl.int32)
        for t in range(0, tl.max(n, axis=0)):
            cx = x0 + t % w
            cy = y0 + t // w
            # Offsets mean - pixel centre over the tile's pixel centres.
            dxl = mx - (cx * TILE + TILE - 0.5)
            dxh = mx - (cx * TILE + 0.5)
            dyl = my - (cy * TILE + TILE - 0.5)
            dyh = my - (cy * TILE + 0.5)
            # Minimum of the convex quadratic over that box: 0 inside, else on one of its edges.
            ya = tl.minimum(tl.maximum(-cb * dxl / cc, dyl), dyh)
            yb = tl.minimum(tl.maximum(-cb * dxh / cc, dyl), dyh)
            xa = tl.minimum(tl.maximum(-cb * dyl / ca, dxl), dxh)
            xb = tl.minimum(tl.maximum(-cb * dyh / ca, dxl), dxh)
            qa = 0.5 * (ca * dxl * dxl + cc * ya * ya) + cb * dxl * ya
            qb = 0.5 * (ca * dxh * dxh + cc * yb * yb) + cb * dxh * yb
            qc = 0.5 * (ca * xa * xa + cc * dyl * dyl) + cb * xa * dyl
            qd = 0.5 * (ca * xb * xb + cc * dyh * dyh) + cb * xb * dyh
            q = tl.minimum(tl.minimum(qa, qb), tl.minimum(qc, qd))
            q = tl.where((dxl <= 0) & (dxh >= 0) & (dyl <= 0) & (dyh >= 0), 0.0, q)
            hit = (t < n) & (q <= limit)
            if EMIT:
                keep = hit & (pos < capacity)
                key = image * (tw * th) + cy * tw + cx
                tl.store(keys_ptr + pos, key.to(keys_ptr.dtype.element_ty), mask=keep)
                tl.store(ids_ptr + pos, g.to(tl.int32), mask=keep)
                pos += hit.to(tl.int64)
            else:
                hits += hit.to(tl.int32)
        if not EMIT:
            tl.store(count_ptr + j, hits, mask=live)

    return tile_pass


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _tile_pass_kernel()
    return _KERNEL


def key_dtype(images: int, width: int, height: int) -> torch.dtype:
    """16-bit (image, tile) keys when they fit (two radix passes), else 32-bit."""
    tiles = math.ceil(width / TILE_SIZE) * math.ceil(height / TILE_SIZE)
    return torch.int16 if images * tiles < 2 ** 15 else torch.int32


class TileLists:
    """Depth-ordered, culled tile lists of fixed size `capacity` for `images` views of `gaussians`."""

    def __init__(self, images: int, gaussians: int, width: int, height: int, capacity: int,
                 device: torch.device) -> None:
        self.images, self.gaussians, self.width, self.height = images, gaussians, width, height
        self.tw, self.th = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
        dtype = key_dtype(images, width, height)
        self._tile_starts = torch.arange(images * self.tw * self.th, device=device).to(dtype)
        self._grid = (math.ceil(images * gaussians / _BLOCK),)
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        """New buffers of `capacity` entries (a CUDA graph that used the old ones must be recaptured)."""
        if capacity <= 0:
            raise InputError(f"capacity must be positive, got {capacity}")
        device, dtype = self._tile_starts.device, self._tile_starts.dtype
        self.capacity = capacity
        self._keys = torch.empty(capacity, dtype=dtype, device=device)
        self._ids = torch.zeros(capacity, dtype=torch.int32, device=device)

    def counts(self, radii: torch.Tensor, means2d: torch.Tensor, depths: torch.Tensor, conics: torch.Tensor,
               opacities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth order (I*N,) int64 (flat ids) and each ordered Gaussian's tile count (I*N,) int32."""
        n = self.gaussians
        rank = torch.sort(depths, dim=1, stable=True)[1]
        order = (rank + torch.arange(self.images, device=rank.device)[:, None] * n).reshape(-1)
        counts = torch.empty(self.images * n, dtype=torch.int32, device=rank.device)
        _kernel()[self._grid](order, means2d, radii, conics, opacities, counts, counts, self._keys, self._ids,
                              self.images * n, n, self.tw, self.th, self.capacity, CULL_MARGIN, ALPHA_MIN,
                              TILE=TILE_SIZE, EMIT=False, BLOCK=_BLOCK)
        return order, counts

    def __call__(self, radii: torch.Tensor, means2d: torch.Tensor, depths: torch.Tensor, conics: torch.Tensor,
                 opacities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tile offsets (I,th,tw) int32, flat Gaussian ids (capacity,) int32 in compositing order,
        and the needed count () int64 (more than `capacity`: the lists lost entries)."""
        order, counts = self.counts(radii, means2d, depths, conics, opacities)
        end = torch.cumsum(counts, 0, dtype=torch.int64)
        start = end - counts
        self._keys.fill_(-1)
        _kernel()[self._grid](order, means2d, radii, conics, opacities, counts, start, self._keys, self._ids,
                              self.images * self.gaussians, self.gaussians, self.tw, self.th, self.capacity,
                              CULL_MARGIN, ALPHA_MIN, TILE=TILE_SIZE, EMIT=True, BLOCK=_BLOCK)
        sorted_keys, perm = torch.sort(self._keys, stable=True)
        offsets = torch.searchsorted(sorted_keys, self._tile_starts).int()
        return offsets.reshape(self.images, self.th, self.tw), self._ids[perm], end[-1]


class StaticRasterizer:
    """gsplat classic rasterization of `images` views of `gaussians` each, into fixed buffers.

    Every call reads and writes tensors of fixed shapes with no host sync, so calls can be captured
    in a CUDA graph. `capacity` is the tile-list size for all images together.
    """

    def __init__(self, images: int, gaussians: int, width: int, height: int, capacity: int,
                 device: torch.device) -> None:
        self.width, self.height = width, height
        self.lists = TileLists(images, gaussians, width, height, capacity, device)
        self.total: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.lists.capacity

    def resize(self, capacity: int) -> None:
        """A tile list of `capacity` entries (recapture any CUDA graph of this rasterizer)."""
        self.lists.resize(capacity)

    def __call__(self, means: torch.Tensor, covars6: torch.Tensor, opacities: torch.Tensor,
                 colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor) -> torch.Tensor:
        """Feature images (I,H,W,C) for means (I,N,3), covars6 (I,N,6), opacities (I,N), colors
        (I,N,C), one camera per image: viewmats (I,1,4,4), Ks (I,1,3,3). Sets `total`."""
        from gsplat.cuda._wrapper import rasterize_to_pixels

        radii, means2d, depths, conics = project(means, covars6, opacities, viewmats, Ks, self.width,
                                                 self.height)
        offsets, ids, self.total = self.lists(radii, means2d, depths, conics, opacities)
        image, _ = rasterize_to_pixels(means2d, conics, colors, opacities, self.width, self.height,
                                       TILE_SIZE, offsets, ids)
        return image

    @torch.no_grad()
    def needed(self, means: torch.Tensor, covars6: torch.Tensor, opacities: torch.Tensor,
               viewmats: torch.Tensor, Ks: torch.Tensor) -> torch.Tensor:
        """(I,) tile-list entries each image needs (arguments as `__call__`)."""
        radii, means2d, depths, conics = project(means, covars6, opacities, viewmats, Ks, self.width,
                                                 self.height)
        counts = self.lists.counts(radii, means2d, depths, conics, opacities)[1]
        return counts.reshape(self.lists.images, -1).sum(dim=1)


def required_capacity(total: int, margin: float = 1.5) -> int:
    """Tile-list size for `total` entries with room for expressions that cover more tiles."""
    return max(1 << 16, int(total * margin))
