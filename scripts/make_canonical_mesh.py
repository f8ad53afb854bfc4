"""Generate gaga_ros/faces/data/canonical_mesh.npz: a symmetric neutral FaceMesh face and its triangles.

mediapipe 0.10.21 ships no canonical face model, so the neutral face is measured: FaceMesh (refined,
478 landmarks) on scikit-image's public-domain astronaut photo, frontalised by the face's own mirror
symmetry, mirror-averaged, and scaled to FLAME metres x 5. Triangles are the 3-cliques of mediapipe's
tessellation edges, consistently oriented. Run: python scripts/make_canonical_mesh.py
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from pathlib import Path

import numpy as np
import skimage.data
from mediapipe.python.solutions import face_mesh
from mediapipe.python.solutions import face_mesh_connections as fmc
from scipy.optimize import linear_sum_assignment

OUT = Path(__file__).resolve().parents[1] / "gaga_ros" / "faces" / "data" / "canonical_mesh.npz"
#: Distance between the iris centres in FLAME metres x 5 (a 62 mm adult pupil distance).
INTER_OCULAR = 0.31
#: The canonical origin sits this far behind the nose tip (9 cm, about mid-way to the ears).
ORIGIN_BEHIND_NOSE = 0.45
NOSE_TIP, FOREHEAD, CHIN = 1, 10, 152
RIGHT_IRIS, LEFT_IRIS = 468, 473
#: Known mirror pairs (subject's right, subject's left) that seed the symmetry search.
SEED_PAIRS = [(33, 263), (133, 362), (61, 291), (234, 454), (468, 473)]


def measure_landmarks() -> np.ndarray:
    """Landmarks of the astronaut photo in a right-handed frame: x right, y up, z toward the viewer."""
    image = skimage.data.astronaut()
    with face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True) as mesh:
        faces = mesh.process(image).multi_face_landmarks
    if not faces:
        raise RuntimeError("FaceMesh found no face on skimage.data.astronaut()")
    width = image.shape[1]
    pts = np.array([[p.x * width, p.y * image.shape[0], p.z * width] for p in faces[0].landmark])
    return pts * np.array([1.0, -1.0, -1.0])


def mirror_pairs(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror partner of every landmark and the symmetry plane's unit normal (toward subject's left)."""
    pairs = np.array(SEED_PAIRS)
    mirror = np.arange(len(pts))
    for _ in range(5):
        normal = (pts[pairs[:, 1]] - pts[pairs[:, 0]]).mean(0)
        normal /= np.linalg.norm(normal)
        centre = ((pts[pairs[:, 0]] + pts[pairs[:, 1]]) / 2).mean(0)
        reflected = pts - 2 * ((pts - centre) @ normal)[:, None] * normal
        for group in (np.arange(468), np.arange(468, 478)):
            cost = np.linalg.norm(reflected[group][:, None] - pts[group][None], axis=2)
            rows, cols = linear_sum_assignment(cost)
            mirror[group[rows]] = group[cols]
        side = (pts - centre) @ normal
        left = np.flatnonzero((mirror != np.arange(len(pts))) & (side > 0))
        pairs = np.stack([mirror[left], left], 1)
    return mirror, normal


def triangles(points: np.ndarray) -> np.ndarray:
    """Faces of the tessellation graph, oriented consistently with normals out of the face (+z)."""
    edges = {tuple(sorted(e)) for e in fmc.FACEMESH_TESSELATION}
    nbrs: dict[int, set[int]] = {}
    for a, b in edges:
        nbrs.setdefault(a, set()).add(b)
        nbrs.setdefault(b, set()).add(a)
    tris = {tuple(sorted((a, b, c))) for a, b in edges for c in nbrs[a] & nbrs[b]}
    # A 3-cycle whose three edges all border a third triangle is not a face but a hole's outline.
    count = Counter(e for t in tris for e in itertools.combinations(t, 2))
    tris = sorted(t for t in tris if not all(count[e] == 3 for e in itertools.combinations(t, 2)))
    count = Counter(e for t in tris for e in itertools.combinations(t, 2))
    if max(count.values()) > 2:
        raise RuntimeError("tessellation is not a manifold after removing non-face 3-cycles")
    by_edge: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tris):
        for e in itertools.combinations(t, 2):
            by_edge.setdefault(e, []).append(i)
    oriented: dict[int, tuple[int, int, int]] = {}
    for seed in range(len(tris)):
        if seed in oriented:
            continue
        oriented[seed] = tris[seed]
        queue = deque([seed])
        while queue:
            t = oriented[queue.popleft()]
            for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
                for j in by_edge[tuple(sorted((a, b)))]:
                    if j not in oriented:
                        c = (set(tris[j]) - {a, b}).pop()
                        oriented[j] = (b, a, c)  # the shared edge runs the other way in the neighbour
                        queue.append(j)
    faces = np.array([oriented[i] for i in range(len(tris))], dtype=np.int32)
    v = points[faces]
    normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    if normals[:, 2].sum() < 0:
        faces = faces[:, ::-1]
    return np.ascontiguousarray(faces)


def canonical_vertices(pts: np.ndarray) -> np.ndarray:
    """Frontalise by the symmetry plane, mirror-average, scale and move the origin to the head centre."""
    mirror, x_axis = mirror_pairs(pts)
    up = pts[FOREHEAD] - pts[CHIN]
    y_axis = up - (up @ x_axis) * x_axis
    y_axis /= np.linalg.norm(y_axis)
    rot = np.stack([x_axis, y_axis, np.cross(x_axis, y_axis)])
    v = pts @ rot.T
    flipped = v[mirror] * np.array([-1.0, 1.0, 1.0])
    v = (v + flipped) / 2
    v[:, 0] -= v[:, 0].mean()
    v *= INTER_OCULAR / np.linalg.norm(v[LEFT_IRIS] - v[RIGHT_IRIS])
    eyes_y = (v[LEFT_IRIS, 1] + v[RIGHT_IRIS, 1]) / 2
    v -= np.array([0.0, eyes_y, v[NOSE_TIP, 2] - ORIGIN_BEHIND_NOSE])
    return v.astype(np.float32), mirror


def main() -> None:
    verts, mirror = canonical_vertices(measure_landmarks())
    faces = triangles(verts)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, vertices=verts, triangles=faces, mirror=mirror.astype(np.int32))
    print(f"wrote {OUT}: {len(verts)} vertices, {len(faces)} triangles, "
          f"{int((mirror == np.arange(len(mirror))).sum())} on the midline")


if __name__ == "__main__":
    main()
