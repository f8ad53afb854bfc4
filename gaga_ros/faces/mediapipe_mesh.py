"""The mediapipe FaceMesh face model: a canonical neutral face, its triangles and named regions.

Canonical head frame (shared with Expression.msg's mesh mode): +x the subject's left, +y up, +z out of
the face, units FLAME metres x 5 (iris centres 0.31 apart). The origin lies on the symmetry plane, at
the height of the iris centres and 0.45 units (9 cm) behind the nose tip, about the middle of the head,
so the frontal camera frontal_transform() looks at the head centre. The data file is measured, not
licensed: see scripts/make_canonical_mesh.py (FaceMesh on skimage's public-domain astronaut photo,
frontalised by the face's mirror symmetry and mirror-averaged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mediapipe.python.solutions import face_mesh_connections as fmc

_DATA = np.load(Path(__file__).parent / "data" / "canonical_mesh.npz")

#: (478, 3) float32 neutral landmarks in the canonical head frame (468 face + 2 x 5 iris).
CANONICAL_VERTICES: np.ndarray = _DATA["vertices"].astype(np.float32)
#: (F, 3) int32 surface triangles over the 468 face landmarks, counter-clockwise seen from outside.
TRIANGLES: np.ndarray = _DATA["triangles"].astype(np.int32)
#: (478,) int32 mirror partner of each landmark (itself on the midline).
MIRROR: np.ndarray = _DATA["mirror"].astype(np.int32)
#: Number of face landmarks the triangles cover (the rest are iris points).
FACE_LANDMARKS = 468


def _chains(edges: frozenset, start: int, end: int) -> tuple[list[int], list[int]]:
    """The two paths from `start` to `end` around a closed contour given as an edge set."""
    nbrs: dict[int, list[int]] = {}
    for a, b in edges:
        nbrs.setdefault(a, []).append(b)
        nbrs.setdefault(b, []).append(a)
    paths = []
    for first in nbrs[start]:
        path, prev = [start, first], start
        while path[-1] != end:
            nxt = next(n for n in nbrs[path[-1]] if n != prev)
            prev = path[-1]
            path.append(nxt)
        paths.append(path)
    return paths[0], paths[1]


def _split(edges: frozenset, corners: tuple[int, int], upper_member: int) -> tuple[np.ndarray, np.ndarray]:
    """(upper, lower) halves of a closed contour, each ordered corner to corner."""
    a, b = _chains(edges, *corners)
    upper, lower = (a, b) if upper_member in a else (b, a)
    return np.array(upper, np.int32), np.array(lower, np.int32)


def _indices(edges: frozenset) -> np.ndarray:
    return np.array(sorted({i for e in edges for i in e}), np.int32)


def _oval_order() -> np.ndarray:
    """Face oval as one closed loop starting at the forehead (landmark 10)."""
    a, b = _chains(fmc.FACEMESH_FACE_OVAL, 10, 152)
    return np.array(a + b[::-1][1:-1], np.int32)


def _regions() -> dict[str, np.ndarray]:
    inner_lips = _inner_lip_edges()
    outer_up, outer_low = _split(fmc.FACEMESH_LIPS - inner_lips, (61, 291), 0)
    inner_up, inner_low = _split(inner_lips, (78, 308), 13)
    verts = CANONICAL_VERTICES[:FACE_LANDMARKS, :2]
    # Vertices between the outer and inner lip contours join the lip of their nearest inner contour point.
    outer, inner = np.r_[outer_up, outer_low[::-1]], np.r_[inner_up, inner_low[::-1]]
    between = _inside(verts, outer) & ~_inside(verts, inner)
    contour = np.r_[outer_up, outer_low, inner_up, inner_low]
    extra = np.setdiff1d(np.flatnonzero(between), contour)
    d_up = np.linalg.norm(verts[extra, None] - verts[inner_up[1:-1]][None], axis=2).min(1)
    d_low = np.linalg.norm(verts[extra, None] - verts[inner_low[1:-1]][None], axis=2).min(1)
    lips_upper = np.unique(np.r_[outer_up, inner_up, extra[d_up <= d_low]])
    lips_lower = np.unique(np.r_[outer_low, inner_low, extra[d_up > d_low]])
    oval = _oval_order()
    corner_y = CANONICAL_VERTICES[[61, 291], 1].mean()
    jaw = oval[CANONICAL_VERTICES[oval, 1] < corner_y]
    below = np.flatnonzero(CANONICAL_VERTICES[:FACE_LANDMARKS, 1] < corner_y)
    left_up, left_low = _split(fmc.FACEMESH_LEFT_EYE, (362, 263), 386)
    right_up, right_low = _split(fmc.FACEMESH_RIGHT_EYE, (133, 33), 159)
    regions = {
        "lips_upper": lips_upper,
        "lips_lower": lips_lower,
        "mouth_inner": np.r_[inner_up, inner_low[1:-1][::-1]].astype(np.int32),
        "jaw": jaw,
        "lower_face": np.setdiff1d(below, lips_upper).astype(np.int32),
        "left_eye_upper": left_up,
        "left_eye_lower": left_low,
        "right_eye_upper": right_up,
        "right_eye_lower": right_low,
        "left_iris": np.r_[473, _indices(fmc.FACEMESH_LEFT_IRIS)].astype(np.int32),
        "right_iris": np.r_[468, _indices(fmc.FACEMESH_RIGHT_IRIS)].astype(np.int32),
        "left_eyebrow": _indices(fmc.FACEMESH_LEFT_EYEBROW),
        "right_eyebrow": _indices(fmc.FACEMESH_RIGHT_EYEBROW),
        "nose": _indices(fmc.FACEMESH_NOSE),
        "face_oval": oval,
    }
    return {name: idx.astype(np.int32) for name, idx in regions.items()}


def _inner_lip_edges() -> frozenset:
    """The inner lip contour (the mouth opening), the FACEMESH_LIPS loop through landmarks 78 and 308."""
    loops: list[set[int]] = []
    for a, b in fmc.FACEMESH_LIPS:
        hits = [s for s in loops if a in s or b in s]
        merged = {a, b}.union(*hits)
        loops = [s for s in loops if s not in hits] + [merged]
    inner = next(s for s in loops if 13 in s)
    return frozenset(e for e in fmc.FACEMESH_LIPS if e[0] in inner)


def _inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Whether 2-D points lie inside the polygon through the given landmark indices (even-odd rule)."""
    poly = CANONICAL_VERTICES[polygon, :2]
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = ((y0 > y) != (y1 > y)) & (x < x0 + (y - y0) * (x1 - x0) / np.where(y1 == y0, 1e-12, y1 - y0))
    return crosses.sum(1) % 2 == 1


#: Named landmark index groups. Contours ('*_upper', '*_lower', 'mouth_inner', 'face_oval', 'jaw') are
#: ordered along the contour; eye halves and lip contours run corner to corner. 'jaw' is the face-oval
#: outline below the mouth corners; 'lower_face' every face landmark below them except the upper lip.
REGIONS: dict[str, np.ndarray] = _regions()
