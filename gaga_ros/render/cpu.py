"""Compiled CPU rasterizer (numba) with gsplat 1.5.3's classic-mode semantics.

Robots without a GPU still need a live head, and gsplat cannot composite on CPU. This is gsplat's
pipeline on CPU threads: EWA projection with the Jacobian's x/z, y/z clamped to the field of view
plus 30 %, +eps2d on the 2D covariance, an opacity-aware per-axis extent, 16x16 tiles whose depth-
sorted lists come from a counting pass and a prefix sum, then per-tile front-to-back compositing
(alpha = min(0.999, o exp(-sigma)), skip alpha < 1/255, stop before transmittance reaches 1e-4).
Covariances come from the raw, non-normalised quaternions (see covariance.py).

Geometry (projection, alpha, transmittance) runs in float64 so that threshold decisions are
reproducible; colours accumulate in float32. The sort key is the exception: it is gsplat's float32
camera depth reproduced bit for bit (nvcc's fused multiply-adds, see `_gsplat_depth`), because dense
scenes hold overlapping Gaussians a few float32 ulps apart in depth, and a different rounding swaps
their compositing order (on the 180k GAGAvatar reference Gaussians a float64 key left 3 % of depths
off by an ulp and moved the image by 1.2e-3 relative). gsplat's "sigma < 0" skip never fires here:
the conic is positive definite (eps2d > 0). A Gaussian only visits the pixels of its own extent
inside a tile, which is exact: outside that extent its alpha is below 1/255 and gsplat skips it too.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, parallel_chunksize, prange

from gaga_ros.render.rasterize import ALPHA_MAX, ALPHA_MIN, T_MIN
from gaga_ros.render.rasterize import TILE_SIZE as TILE

MAX_EXTENT = 3.33


@njit(cache=True, fastmath=False)
def _f32(value):
    return np.float64(np.float32(value))


@njit(cache=True, fastmath=False)
def _gsplat_depth(v, px, py, pz):
    """Camera z as gsplat's CUDA computes it in float32: fma(r22, z, fma(r20, x, r21 y)) + t_z.
    Each float64 step is exact before its rounding to float32 (products of two floats fit)."""
    return _f32(_f32(v[2, 2] * pz + _f32(v[2, 0] * px + _f32(v[2, 1] * py))) + v[2, 3])


@njit(parallel=True, cache=True, fastmath=False)
def project(means, quats, scales, opacities, viewmat, intrinsics, width, height, near_plane, eps2d):
    """Screen means (N,2), conics (N,3), depths (N,; gsplat's float32 value) and radii (N,2; 0 =
    culled), all float64."""
    n = means.shape[0]
    xy = np.zeros((n, 2))
    conics = np.zeros((n, 3))
    depths = np.zeros(n)
    radii = np.zeros((n, 2), dtype=np.int32)
    fx, fy = intrinsics[0, 0], intrinsics[1, 1]
    cx, cy = intrinsics[0, 2], intrinsics[1, 2]
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    v = viewmat
    for i in prange(n):
        px, py, pz = np.float64(means[i, 0]), np.float64(means[i, 1]), np.float64(means[i, 2])
        x = v[0, 0] * px + v[0, 1] * py + v[0, 2] * pz + v[0, 3]
        y = v[1, 0] * px + v[1, 1] * py + v[1, 2] * pz + v[1, 3]
        z = v[2, 0] * px + v[2, 1] * py + v[2, 2] * pz + v[2, 3]
        depth = _gsplat_depth(v, px, py, pz)
        if not (depth >= near_plane and depth <= 1e10):
            continue
        opacity = np.float64(opacities[i])
        if opacity < ALPHA_MIN:
            continue
        # World covariance is M M^T with M = R(q) diag(s), R evaluated on the raw quaternion.
        w, qx, qy, qz = (np.float64(quats[i, 0]), np.float64(quats[i, 1]),
                         np.float64(quats[i, 2]), np.float64(quats[i, 3]))
        sx, sy, sz = np.float64(scales[i, 0]), np.float64(scales[i, 1]), np.float64(scales[i, 2])
        r00, r01, r02 = 1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - w * qz), 2 * (qx * qz + w * qy)
        r10, r11, r12 = 2 * (qx * qy + w * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - w * qx)
        r20, r21, r22 = 2 * (qx * qz - w * qy), 2 * (qy * qz + w * qx), 1 - 2 * (qx * qx + qy * qy)
        # Jacobian rows, J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]], times the view rotation.
        tx = z * min(lim_x_pos, max(-lim_x_neg, x / z))
        ty = z * min(lim_y_pos, max(-lim_y_neg, y / z))
        ax, az = fx / z, -fx * tx / (z * z)
        by, bz = fy / z, -fy * ty / (z * z)
        u0, u1, u2 = (ax * v[0, 0] + az * v[2, 0], ax * v[0, 1] + az * v[2, 1],
                      ax * v[0, 2] + az * v[2, 2])
        w0, w1, w2 = (by * v[1, 0] + bz * v[2, 0], by * v[1, 1] + bz * v[2, 1],
                      by * v[1, 2] + bz * v[2, 2])
        # Rows of J V_R R diag(s); the 2D covariance is their Gram matrix.
        a0 = (u0 * r00 + u1 * r10 + u2 * r20) * sx
        a1 = (u0 * r01 + u1 * r11 + u2 * r21) * sy
        a2 = (u0 * r02 + u1 * r12 + u2 * r22) * sz
        b0 = (w0 * r00 + w1 * r10 + w2 * r20) * sx
        b1 = (w0 * r01 + w1 * r11 + w2 * r21) * sy
        b2 = (w0 * r02 + w1 * r12 + w2 * r22) * sz
        ca = a0 * a0 + a1 * a1 + a2 * a2 + eps2d
        cb = a0 * b0 + a1 * b1 + a2 * b2
        cc = b0 * b0 + b1 * b1 + b2 * b2 + eps2d
        det = ca * cc - cb * cb
        if not det > 0:
            continue
        extent = min(MAX_EXTENT, math.sqrt(2.0 * math.log(opacity / ALPHA_MIN)))
        rx = math.ceil(extent * math.sqrt(ca))
        ry = math.ceil(extent * math.sqrt(cc))
        if rx <= 0 and ry <= 0:
            continue
        mx = fx * x / z + cx
        my = fy * y / z + cy
        if mx + rx <= 0 or mx - rx >= width or my + ry <= 0 or my - ry >= height:
            continue
        xy[i, 0] = mx
        xy[i, 1] = my
        conics[i, 0] = cc / det
        conics[i, 1] = -cb / det
        conics[i, 2] = ca / det
        depths[i] = depth
        radii[i, 0] = rx
        radii[i, 1] = ry
    return xy, conics, depths, radii


@njit(cache=True, fastmath=False)
def _tile_range(centre, radius, n_tiles):
    lo = min(max(0, int(math.floor((centre - radius) / TILE))), n_tiles)
    hi = min(max(0, int(math.ceil((centre + radius) / TILE))), n_tiles)
    return lo, hi


@njit(cache=True, fastmath=False)
def bin_tiles(xy, depths, radii, tiles_x, tiles_y):
    """Per-tile Gaussian lists, front to back: offsets (tiles+1,) into ids (intersections,)."""
    visible = np.nonzero((radii[:, 0] > 0) | (radii[:, 1] > 0))[0]
    # Stable, so equal depths keep index order as gsplat's radix sort does.
    order = visible[np.argsort(depths[visible], kind="mergesort")]
    counts = np.zeros(tiles_x * tiles_y + 1, dtype=np.int64)
    for g in order:
        x0, x1 = _tile_range(xy[g, 0], radii[g, 0], tiles_x)
        y0, y1 = _tile_range(xy[g, 1], radii[g, 1], tiles_y)
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                counts[ty * tiles_x + tx + 1] += 1
    offsets = np.cumsum(counts)
    cursor = offsets[:-1].copy()
    ids = np.empty(offsets[-1], dtype=np.int64)
    for g in order:
        x0, x1 = _tile_range(xy[g, 0], radii[g, 0], tiles_x)
        y0, y1 = _tile_range(xy[g, 1], radii[g, 1], tiles_y)
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                t = ty * tiles_x + tx
                ids[cursor[t]] = g
                cursor[t] += 1
    return offsets, ids


@njit(parallel=True, cache=True, fastmath=False)
def composite(xy, conics, radii, opacities, colors, offsets, ids, tiles_x, tiles_y, background,
              image, alpha):
    """Front-to-back blending of each tile's list into image (H,W,C) and alpha (H,W)."""
    height, width, channels = image.shape
    n_tiles = tiles_x * tiles_y
    for tile in prange(n_tiles):
        ox = (tile % tiles_x) * TILE
        oy = (tile // tiles_x) * TILE
        tw = min(TILE, width - ox)
        th = min(TILE, height - oy)
        # trans 0 marks a finished pixel; final then holds its last transmittance (> 1e-4).
        trans = np.ones(TILE * TILE)
        final = np.zeros(TILE * TILE)
        acc = np.zeros((TILE * TILE, channels), dtype=np.float32)
        n_done = 0
        for k in range(offsets[tile], offsets[tile + 1]):
            if n_done == tw * th:
                break
            g = ids[k]
            mx, my = xy[g, 0], xy[g, 1]
            ca, cb, cc = conics[g, 0], conics[g, 1], conics[g, 2]
            opacity = np.float64(opacities[g])
            # Rows of the Gaussian's extent inside the tile; in each, only the pixel centres where
            # sigma <= log(o / ALPHA_MIN) (the alpha test) can pass: an interval of dx.
            sigma_max = math.log(opacity / ALPHA_MIN) + 1e-9
            step_ratio = math.exp(-ca)
            inv_ca = 1.0 / ca
            y0 = max(oy, int(math.ceil(my - radii[g, 1] - 0.5)))
            y1 = min(oy + th, int(math.floor(my + radii[g, 1] - 0.5)) + 1)
            for py in range(y0, y1):
                dy = my - (py + 0.5)
                disc = (cb * cb - ca * cc) * dy * dy + 2.0 * ca * sigma_max
                if disc < 0:
                    continue
                half = math.sqrt(disc) * inv_ca
                centre = mx + cb * dy * inv_ca
                x0 = max(ox, int(math.ceil(centre - half - 0.5 - 1e-6)))
                x1 = min(ox + tw, int(math.floor(centre + half - 0.5 + 1e-6)) + 1)
                if x0 >= x1:
                    continue
                # sigma is quadratic along the row, so exp(-sigma) follows a product recurrence:
                # two exps per row instead of one per pixel (relative drift ~1e-15 over a tile).
                dx = mx - (x0 + 0.5)
                gauss = math.exp(-(0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy))
                step = math.exp(-(0.5 * ca - ca * dx - cb * dy))
                row = (py - oy) * TILE - ox
                for px in range(x0, x1):
                    p = row + px
                    a = min(ALPHA_MAX, opacity * gauss)
                    gauss *= step
                    step *= step_ratio
                    t = trans[p]
                    if t == 0.0 or a < ALPHA_MIN:
                        continue
                    next_t = t * (1.0 - a)
                    if next_t <= T_MIN:
                        final[p] = t
                        trans[p] = 0.0
                        n_done += 1
                        continue
                    vis = np.float32(a * t)
                    for c in range(channels):
                        acc[p, c] += vis * colors[g, c]
                    trans[p] = next_t
        for ly in range(th):
            for lx in range(tw):
                p = ly * TILE + lx
                t = trans[p] if trans[p] > 0.0 else final[p]
                for c in range(channels):
                    image[oy + ly, ox + lx, c] = acc[p, c] + np.float32(t) * background[c]
                alpha[oy + ly, ox + lx] = 1.0 - t


def render(means: np.ndarray, quats: np.ndarray, scales: np.ndarray, opacities: np.ndarray,
           colors: np.ndarray, viewmat: np.ndarray, intrinsics: np.ndarray, width: int, height: int,
           background: np.ndarray, near_plane: float, eps2d: float) -> tuple[np.ndarray, np.ndarray]:
    """Image (H,W,C) float32 and alpha (H,W) float32 of float32 C-contiguous Gaussian arrays."""
    xy, conics, depths, radii = project(means, quats, scales, opacities,
                                        viewmat.astype(np.float64), intrinsics.astype(np.float64),
                                        width, height, near_plane, eps2d)
    tiles_x, tiles_y = -(-width // TILE), -(-height // TILE)
    offsets, ids = bin_tiles(xy, depths, radii, tiles_x, tiles_y)
    image = np.empty((height, width, colors.shape[1]), dtype=np.float32)
    alpha = np.empty((height, width), dtype=np.float32)
    # Tiles differ widely in cost (face vs. empty border): hand them out a few at a time.
    with parallel_chunksize(2):
        composite(xy, conics, radii, opacities, colors, offsets, ids, tiles_x, tiles_y, background,
                  image, alpha)
    return image, alpha
