"""Mesh-bound Gaussians: move and turn each Gaussian with the triangle it is bound to.

Vectorised torch on the avatar's device. A Gaussian follows its anchor (a barycentric point on its
triangle pushed along the blended vertex normal), so deformed mean = neutral mean + anchor motion;
this reproduces the neutral avatar exactly and keeps far-bound points (hair) from swinging.
"""

from __future__ import annotations

import warnings

import torch

from gaga_ros.avatar.base import CAMERA_FIXED, Avatar, Binding
from gaga_ros.errors import InputError

#: Bounds of the per-Gaussian growth factor: stretched skin (a closing lid) grows to stay closed.
STRETCH_RANGE = (0.5, 3.0)
_EPS = 1e-12


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """(V, 3) unit area-weighted vertex normals of a mesh (triangles counter-clockwise outside)."""
    corners = vertices[triangles]
    face = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals.index_add_(0, triangles[:, k], face)
    return normals / normals.norm(dim=1, keepdim=True).clamp_min(_EPS)


def anchors(vertices: torch.Tensor, triangles: torch.Tensor, binding: Binding) -> torch.Tensor:
    """Anchor points (N,3) of bound Gaussians on a mesh; CAMERA_FIXED entries read triangle 0."""
    tri = triangles[torch.where(binding.triangle == CAMERA_FIXED, 0, binding.triangle)]
    bary = binding.barycentric[..., None]
    normal = (vertex_normals(vertices, triangles)[tri] * bary).sum(1)
    normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return (vertices[tri] * bary).sum(1) + binding.offset[:, None] * normal


def triangle_frames(vertices: torch.Tensor, triangles: torch.Tensor,
                    normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal frames (F,3,3; columns tangent, bitangent, normal) and areas (F,) of triangles.

    The normal is the mean of the vertex normals, so slivers (a closed mouth) keep a stable frame;
    the tangent follows the first edge, which runs along a contour for the opening triangles.
    """
    corners = vertices[triangles]
    normal = normals[triangles].sum(1)
    normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(_EPS)
    edge = corners[:, 1] - corners[:, 0]
    tangent = edge - (edge * normal).sum(1, keepdim=True) * normal
    tangent = tangent / tangent.norm(dim=1, keepdim=True).clamp_min(_EPS)
    frame = torch.stack([tangent, torch.linalg.cross(normal, tangent), normal], dim=-1)
    area = torch.linalg.cross(edge, corners[:, 2] - corners[:, 0]).norm(dim=1) / 2
    return frame, area


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton products a*b of (w,x,y,z) quaternions (rotation b, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(N,3,3) rotations of (w,x,y,z) quaternions (normalised first)."""
    w, x, y, z = (q / q.norm(dim=1, keepdim=True).clamp_min(_EPS)).unbind(1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], 1).reshape(-1, 3, 3)


def matrix_to_quat(m: torch.Tensor) -> torch.Tensor:
    """(N,4) unit (w,x,y,z) quaternions of rotation matrices (N,3,3), stable for every angle."""
    m00, m11, m22 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    # Four candidate solutions; each is accurate where its leading component is large.
    cands = torch.stack([
        torch.stack([1 + m00 + m11 + m22, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0],
                     m[:, 1, 0] - m[:, 0, 1]], 1),
        torch.stack([m[:, 2, 1] - m[:, 1, 2], 1 + m00 - m11 - m22, m[:, 0, 1] + m[:, 1, 0],
                     m[:, 0, 2] + m[:, 2, 0]], 1),
        torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0], 1 - m00 + m11 - m22,
                     m[:, 1, 2] + m[:, 2, 1]], 1),
        torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1],
                     1 - m00 - m11 + m22], 1),
    ], 1)  # (N, 4 candidates, 4)
    best = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22,
                        1 - m00 - m11 + m22], 1).argmax(1)
    q = cands[torch.arange(m.shape[0], device=m.device), best]
    q = q / q.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return q * torch.where(q[:, :1] < 0, -1.0, 1.0)


def stretched(avatar: Avatar, vertices: torch.Tensor, rest: Rest, pose: Pose,
              rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gaussians of `rows` (N,) bool whose triangles grew past their rest area, shaped by their
    triangle's whole in-plane deformation: indices (K,), quats (K,4) and scales (K,3). `pose` is
    rest.pose(vertices, avatar.triangles), which deform takes too (computed once per frame).

    deform's growth is isotropic: right for skin, which stretches about evenly, but an opening that
    widens (an eye opened past the photo's lids) stretches along one direction, so its rows of
    Gaussians part and show as stripes. Here each covariance goes through J = F' [A 0; 0 1] F^T, with
    F, F' the triangle's rest and current frames and A the 2x2 map of its edges, A's singular values
    kept in STRETCH_RANGE (a photo's closed eye has a degenerate rest triangle). It costs a 3x3
    eigendecomposition per Gaussian, so it is meant for a few hundred, not the whole avatar.
    """
    triangles = avatar.triangles
    _, frames, areas = pose
    tri = rest.triangle[rows]
    grew = areas[tri] > rest.area[tri]
    index = torch.nonzero(rows).squeeze(1)[grew]
    if not len(index):  # nothing opened past its rest: the common case
        return index, avatar.gaussians.quats[:0], avatar.gaussians.scales[:0]
    tri = tri[grew]
    frame, corners = frames[tri], vertices[triangles[tri]]
    rest_corners = avatar.neutral_vertices[triangles[tri]]

    def in_plane(c: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return (f.transpose(1, 2) @ torch.stack([c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]], -1))[:, :2]

    before, after = in_plane(rest_corners, rest.frame[tri]), in_plane(corners, frame)
    flat = torch.linalg.det(before).abs() <= _EPS
    eye = torch.eye(2, device=vertices.device).expand(len(tri), 2, 2)
    a = after @ torch.linalg.inv(torch.where(flat[:, None, None], eye, before))
    u, sigma, vh = torch.linalg.svd(torch.where(flat[:, None, None], eye, a))
    a = u @ torch.diag_embed(sigma.clamp(*STRETCH_RANGE)) @ vh
    jac = torch.eye(3, device=vertices.device).repeat(len(tri), 1, 1)
    jac[:, :2, :2] = a
    jac = frame @ jac @ rest.frame[tri].transpose(1, 2)
    g = avatar.gaussians
    rot = jac @ quat_to_matrix(g.quats[index])
    cov = rot @ torch.diag_embed(g.scales[index] ** 2) @ rot.transpose(1, 2)
    variance, axes = torch.linalg.eigh((cov + cov.transpose(1, 2)) / 2)
    axes = axes * torch.where(torch.linalg.det(axes) < 0, -1.0, 1.0)[:, None, None]
    return index, matrix_to_quat(axes), variance.clamp_min(_EPS).sqrt()


#: A mesh's pose as Rest.pose gives it: anchors (N,3), triangle frames (F,3,3) and areas (F,).
Pose = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Rest:
    """Per-avatar constants of the deformation, built once: the barycentric weights as a sparse
    CSR (N, V) matrix (anchors are then sparse products, ~10x faster than gathers on CPU) and the
    neutral anchors, frames and areas."""

    def __init__(self, avatar: Avatar):
        b = avatar.binding
        self.fixed = b.triangle == CAMERA_FIXED
        self.triangle = torch.where(self.fixed, 0, b.triangle)
        rows = torch.arange(len(b.triangle), device=avatar.device)[~self.fixed].repeat_interleave(3)
        cols = avatar.triangles[b.triangle[~self.fixed]].reshape(-1)
        weights = torch.sparse_coo_tensor(torch.stack([rows, cols]), b.barycentric[~self.fixed].reshape(-1),
                                          (len(b.triangle), len(avatar.neutral_vertices)),
                                          check_invariants=True).coalesce()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is used plainly here
            warnings.simplefilter("ignore", UserWarning)
            self.weights = weights.to_sparse_csr()
        self.offset = b.offset[:, None]
        self.anchor, self.frame, self.area = self.pose(avatar.neutral_vertices, avatar.triangles)

    def pose(self, vertices: torch.Tensor, triangles: torch.Tensor) -> Pose:
        normals = vertex_normals(vertices, triangles)
        blend = self.weights @ normals
        blend = blend / blend.norm(dim=1, keepdim=True).clamp_min(_EPS)
        anchor = self.weights @ vertices + self.offset * blend
        return (anchor, *triangle_frames(vertices, triangles, normals))


def deform(avatar: Avatar, vertices: torch.Tensor, rest: Rest | None = None,
           vanishing: torch.Tensor | None = None,
           pose: Pose | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means (N,3), quats (N,4) and growth factors (N,) of the avatar's Gaussians on mesh `vertices`.

    `vertices` (V,3) is the deformed mesh in the canonical frame (same topology as the neutral one).
    Quaternions turn with the rotation from each triangle's rest frame to its deformed frame;
    growth is sqrt of the triangle's area ratio, so Gaussians on stretched skin keep covering it.
    CAMERA_FIXED Gaussians are returned unchanged (growth 1). `rest` is Rest(avatar), which a
    caller that deforms the avatar every frame builds once (None: built here). `vanishing` (N,) bool
    marks Gaussians that fill an opening (an eye between its lids): below their triangle's rest area
    they shrink in proportion to it, without STRETCH_RANGE's floor, so a closed opening shows nothing.
    `pose` is rest.pose(vertices, avatar.triangles) when the caller has it already (None: computed).
    """
    vertices = torch.as_tensor(vertices, dtype=torch.float32, device=avatar.device)
    if vertices.shape != avatar.neutral_vertices.shape:
        raise InputError(f"deform needs vertices of shape {tuple(avatar.neutral_vertices.shape)}, "
                         f"got {tuple(vertices.shape)}")
    rest = Rest(avatar) if rest is None else rest
    anchor, frame, area = rest.pose(vertices, avatar.triangles) if pose is None else pose
    g = avatar.gaussians
    means = g.means + anchor - rest.anchor  # CAMERA_FIXED rows have no weights: zero motion
    turn = matrix_to_quat(frame @ rest.frame.transpose(1, 2))
    quats = quat_multiply(turn[rest.triangle], g.quats)
    ratio = torch.where(rest.area > 1e-8, area / rest.area.clamp_min(1e-8), torch.ones_like(area))
    growth = ratio.sqrt().clamp(*STRETCH_RANGE)[rest.triangle]
    if vanishing is not None:
        growth = torch.where(vanishing, torch.minimum(growth, ratio.clamp(max=1.0)[rest.triangle]), growth)
    fixed = rest.fixed
    quats = torch.where(fixed[:, None], g.quats, quats)
    growth = torch.where(fixed, torch.ones_like(growth), growth)
    return means, quats, growth
