"""A synthetic, licence-free model in FLAME's exact format, so FLAME code is tested without FLAME.

The geometry is plausible rather than realistic: an ellipsoid head that narrows into an open neck,
two eyeballs, a jaw region on the lower front, random smooth shape/expression bases and pose
correctives that only touch the vertices their joint moves. Shapes and index layout match FLAME 2020
(5023 vertices, 9976 faces, 5 joints, 300 shape + 100 expression bases, 51/79x17/70 landmarks).
It is written both in GAGAvatar's FLAME_with_eye.pt layout and as a FLAME-2020-style .pkl whose
arrays are pickled as `chumpy.ch.Ch` objects, like the official files.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gaga_ros.faces.flame_assets import FLAME_JOINTS, FlameAssets, LandmarkEmbedding, save_flame_with_eye

# Mesh layout (chosen so the counts equal FLAME's exactly): a head of one top pole plus 74 rings of 60
# vertices, open at the neck, then two closed eyeballs of 17 rings x 17 plus 2 poles each.
HEAD_RINGS, HEAD_SEGMENTS = 74, 60
EYE_RINGS, EYE_SEGMENTS = 17, 17
HEAD_VERTICES = 1 + HEAD_RINGS * HEAD_SEGMENTS
EYE_VERTICES = EYE_RINGS * EYE_SEGMENTS + 2
#: Vertex ranges of the two eyeballs: left eye (+x, joint 3) then right eye (-x, joint 4).
LEFT_EYE = range(HEAD_VERTICES, HEAD_VERTICES + EYE_VERTICES)
RIGHT_EYE = range(HEAD_VERTICES + EYE_VERTICES, HEAD_VERTICES + 2 * EYE_VERTICES)

# Head shape in FLAME metres: +x subject's left, +y up, +z out of the face.
_AXES = np.array([0.075, 0.105, 0.095])
_NECK_POLAR = 0.72 * np.pi
_EYE_CENTRES = np.array([[0.032, 0.025, 0.068], [-0.032, 0.025, 0.068]])
_EYE_RADIUS = 0.0125


def _head() -> tuple[np.ndarray, np.ndarray]:
    polar = np.linspace(0.03 * np.pi, 0.97 * np.pi, HEAD_RINGS)
    azimuth = np.linspace(0, 2 * np.pi, HEAD_SEGMENTS, endpoint=False)
    spread = np.sin(np.minimum(polar, _NECK_POLAR))           # the neck keeps the width it starts with
    height = np.where(polar < _NECK_POLAR, _AXES[1] * np.cos(polar),
                      _AXES[1] * np.cos(_NECK_POLAR) - 0.1 * (polar - _NECK_POLAR))
    s, a = np.meshgrid(spread, azimuth, indexing="ij")
    rings = np.stack([_AXES[0] * s * np.sin(a), np.broadcast_to(height[:, None], s.shape),
                      _AXES[2] * s * np.cos(a)], axis=-1).reshape(-1, 3)
    verts = np.concatenate([[[0.0, _AXES[1], 0.0]], rings])
    return verts, _ring_faces(HEAD_RINGS, HEAD_SEGMENTS, top=0, first=1, bottom=None)


def _eyeball(centre: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """A sphere with its poles on the z axis: vertex 0 is the front pole (the pupil)."""
    polar = np.linspace(0, np.pi, EYE_RINGS + 2)[1:-1]
    azimuth = np.linspace(0, 2 * np.pi, EYE_SEGMENTS, endpoint=False)
    p, a = np.meshgrid(polar, azimuth, indexing="ij")
    rings = np.stack([np.sin(p) * np.cos(a), np.sin(p) * np.sin(a), np.cos(p)], -1).reshape(-1, 3)
    unit = np.concatenate([[[0, 0, 1.0]], rings, [[0, 0, -1.0]]])
    faces = _ring_faces(EYE_RINGS, EYE_SEGMENTS, top=0, first=1, bottom=EYE_VERTICES - 1)
    return centre + _EYE_RADIUS * unit, faces + offset


def _ring_faces(rings: int, segments: int, top: int, first: int, bottom: int | None) -> np.ndarray:
    """Triangles of a pole fan, the quads between rings, and an optional closing fan."""
    j = np.arange(segments)
    nxt = (j + 1) % segments
    faces = [np.stack([np.full(segments, top), first + j, first + nxt], 1)]
    for r in range(rings - 1):
        a, b = first + r * segments, first + (r + 1) * segments
        faces += [np.stack([a + j, b + j, b + nxt], 1), np.stack([a + j, b + nxt, a + nxt], 1)]
    if bottom is not None:
        last = first + (rings - 1) * segments
        faces.append(np.stack([np.full(segments, bottom), last + nxt, last + j], 1))
    return np.concatenate(faces)


def _ramp(x: np.ndarray, start: float, end: float) -> np.ndarray:
    """0 at start, 1 at end, linear between; exactly 0 beyond start."""
    return np.clip((x - start) / (end - start), 0.0, 1.0)


def _weights(verts: np.ndarray) -> np.ndarray:
    x, y, z = verts[:HEAD_VERTICES].T
    root = _ramp(y, -0.10, -0.13)
    jaw = _ramp(y, -0.03, -0.045) * _ramp(z, 0.02, 0.04) * _ramp(y, -0.10, -0.085)
    w = np.zeros((len(verts), FLAME_JOINTS))
    w[:HEAD_VERTICES, 0], w[:HEAD_VERTICES, 2] = root, jaw
    w[:HEAD_VERTICES, 1] = 1 - root - jaw
    w[LEFT_EYE, 3] = 1.0
    w[RIGHT_EYE, 4] = 1.0
    return w


def _j_regressor(verts: np.ndarray) -> np.ndarray:
    reg = np.zeros((FLAME_JOINTS, len(verts)))
    head = verts[:HEAD_VERTICES]
    reg[0, HEAD_VERTICES - HEAD_SEGMENTS:HEAD_VERTICES] = 1.0          # root: the bottom ring
    ring_y = head[1::HEAD_SEGMENTS, 1]
    neck_ring = int(np.argmin(np.abs(ring_y + 0.08)))
    reg[1, 1 + neck_ring * HEAD_SEGMENTS:1 + (neck_ring + 1) * HEAD_SEGMENTS] = 1.0
    for side in (1, -1):                                                 # jaw: below both ears
        near = np.argsort(np.linalg.norm(head - [side * 0.07, -0.03, -0.005], axis=1))[:8]
        reg[2, near] = 1.0
    reg[3, LEFT_EYE] = 1.0
    reg[4, RIGHT_EYE] = 1.0
    return reg / reg.sum(1, keepdims=True)


def _smooth_fields(rng: np.random.Generator, points: np.ndarray, count: int, amplitude: float) -> np.ndarray:
    """`count` random smooth displacement fields (V,3,count), finer and weaker as the index grows."""
    n = np.arange(count)
    freq = rng.normal(size=(count, 3)) * (8.0 + 0.4 * n)[:, None]
    phase = rng.uniform(0, 2 * np.pi, count)
    direction = rng.normal(size=(3, count))
    wave = np.sin(points @ freq.T + phase)                               # (V, count)
    return wave[:, None, :] * direction[None] * (amplitude / np.sqrt(1 + n / 10))


def _blend_shapes(rng: np.random.Generator, verts: np.ndarray) -> np.ndarray:
    shape = _smooth_fields(rng, verts, 300, 0.004)
    for eye, centre in ((LEFT_EYE, _EYE_CENTRES[0]), (RIGHT_EYE, _EYE_CENTRES[1])):
        # eyeballs follow the shape rigidly: the displacement of the nearest head point
        nearest = np.argmin(np.linalg.norm(verts[:HEAD_VERTICES] - centre, axis=1))
        shape[eye] = shape[nearest]
    expr = _smooth_fields(rng, verts, 100, 0.006)
    x, y, z = verts.T
    face = _ramp(z, 0.0, 0.04) * _ramp(y, 0.06, 0.03) * _ramp(y, -0.10, -0.08)
    expr *= face[:, None, None]
    expr[HEAD_VERTICES:] = 0.0
    return np.concatenate([shape, expr], 2)


def _ibug68_layout() -> np.ndarray:
    """The 68 iBUG landmarks on a unit frontal face (u right-of-image = subject's left, v up)."""
    a = np.linspace(-np.pi / 2, np.pi / 2, 17)
    contour = np.stack([0.85 * np.sin(a), -0.05 - 0.75 * np.cos(a)], 1)
    arch = 0.45 + 0.05 * np.sin(np.linspace(0, np.pi, 5))
    brows = np.concatenate([np.stack([np.linspace(-0.75, -0.15, 5), arch], 1),
                            np.stack([np.linspace(0.15, 0.75, 5), arch], 1)])
    nose = np.concatenate([np.stack([np.zeros(4), np.linspace(0.3, -0.05, 4)], 1),
                           np.stack([np.linspace(-0.2, 0.2, 5), np.full(5, -0.15)], 1)])

    def ellipse(cx, cy, w, h, n, start):
        t = start + np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([cx - w / 2 * np.cos(t), cy + h / 2 * np.sin(t)], 1)

    eyes = np.concatenate([ellipse(-0.4, 0.25, 0.3, 0.1, 6, 0), ellipse(0.4, 0.25, 0.3, 0.1, 6, 0)])
    mouth = np.concatenate([ellipse(0, -0.45, 0.45, 0.15, 12, 0), ellipse(0, -0.45, 0.3, 0.05, 8, 0)])
    return np.concatenate([contour, brows, nose, eyes, mouth])


def _nearest_faces(verts: np.ndarray, faces: np.ndarray, targets: np.ndarray) -> np.ndarray:
    head_faces = np.flatnonzero(faces.max(1) < HEAD_VERTICES)
    centroids = verts[faces[head_faces]].mean(1)
    d = np.linalg.norm(centroids[None] - targets[:, None], axis=2)
    return head_faces[np.argmin(d, axis=1)]


def _on_surface(uv: np.ndarray) -> np.ndarray:
    """Points of the frontal layout projected onto the head ellipsoid."""
    x, y = uv[:, 0] * 0.068, uv[:, 1] * 0.085 + 0.004
    z = _AXES[2] * np.sqrt(np.clip(1 - (x / _AXES[0]) ** 2 - (y / _AXES[1]) ** 2, 0.02, None))
    return np.stack([x, y, z], 1)


def _landmarks(rng: np.random.Generator, verts: np.ndarray, faces: np.ndarray) -> LandmarkEmbedding:
    points = _on_surface(_ibug68_layout())
    full = _nearest_faces(verts, faces, points)

    def bary(*shape: int) -> np.ndarray:
        return rng.dirichlet([4.0, 4.0, 4.0], size=shape).astype(np.float32)

    # The eyes: the first fan triangle of each eyeball, weighted entirely on its front pole (pupil).
    eye_faces = np.flatnonzero((faces[:, 0] == RIGHT_EYE.start) | (faces[:, 0] == LEFT_EYE.start))
    eye_faces = eye_faces[[np.argmax(faces[eye_faces, 0] == RIGHT_EYE.start),
                           np.argmax(faces[eye_faces, 0] == LEFT_EYE.start)]]
    full_bary = np.concatenate([bary(68), np.tile(np.array([[1, 0, 0]], np.float32), (2, 1))])
    # Dynamic contour: row b is yaw b degrees (b <= 39) or -(b - 39) degrees; the contour turns half as far.
    yaw = np.deg2rad(np.where(np.arange(79) <= 39, np.arange(79), 39 - np.arange(79)))
    dynamic = []
    for angle in yaw:
        c, s = np.cos(-angle / 2), np.sin(-angle / 2)
        rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        dynamic.append(_nearest_faces(verts, faces, points[:17] @ rot.T))
    return LandmarkEmbedding(
        static_faces=full[17:68].astype(np.int64), static_bary=full_bary[17:68].copy(),
        dynamic_faces=np.stack(dynamic).astype(np.int64), dynamic_bary=bary(79, 17),
        full_faces=np.concatenate([full, eye_faces]).astype(np.int64), full_bary=full_bary,
    )


def make_synthetic_flame(seed: int = 0) -> FlameAssets:
    """A random FLAME-format model; the same seed gives the same arrays."""
    rng = np.random.default_rng(seed)
    head_v, head_f = _head()
    left_v, left_f = _eyeball(_EYE_CENTRES[0], LEFT_EYE.start)
    right_v, right_f = _eyeball(_EYE_CENTRES[1], RIGHT_EYE.start)
    verts = np.concatenate([head_v, left_v, right_v])
    faces = np.concatenate([head_f, left_f, right_f]).astype(np.int64)
    weights = _weights(verts)
    posedirs = rng.normal(size=(len(verts), 3, 9 * (FLAME_JOINTS - 1))) * 0.002
    for joint in range(1, FLAME_JOINTS):                    # correctives only where the joint acts
        posedirs[weights[:, joint] == 0, :, 9 * (joint - 1):9 * joint] = 0.0
    return FlameAssets(
        faces=faces,
        v_template=verts.astype(np.float32),
        shapedirs=_blend_shapes(rng, verts).astype(np.float32),
        posedirs=posedirs.astype(np.float32),
        j_regressor=_j_regressor(verts).astype(np.float32),
        parents=np.array([-1, 0, 1, 1, 1], np.int64),
        lbs_weights=weights.astype(np.float32),
        landmarks=_landmarks(rng, verts, faces),
        source=f"<synthetic FLAME, seed {seed}>",
    )


# --- writing ------------------------------------------------------------------------------------------

@contextmanager
def _fake_chumpy() -> Iterator[type]:
    """A module named chumpy.ch with a class Ch, present only while pickling."""
    if "chumpy" in sys.modules:
        raise RuntimeError("a real chumpy is imported; the synthetic pickle needs the name for its stand-in")
    package, module = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    ch = type("Ch", (), {"__module__": "chumpy.ch"})
    module.__dict__["Ch"], package.__dict__["ch"] = ch, module  # modules made at run time
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = package, module
    try:
        yield ch
    finally:
        del sys.modules["chumpy.ch"], sys.modules["chumpy"]


def write_flame_pkl(assets: FlameAssets, path: str | Path) -> Path:
    """Write assets like FLAME 2020's generic_model.pkl: chumpy arrays, a scipy csc J_regressor."""
    from scipy.sparse import csc_matrix

    path = Path(path)
    kintree = np.stack([assets.parents, np.arange(FLAME_JOINTS)]).astype(np.uint32)  # root parent wraps
    with _fake_chumpy() as ch:
        def chumpy(array: np.ndarray) -> object:
            obj = ch()
            obj.__dict__.update({"x": np.asarray(array, np.float64), "_dirty_vars": set(), "_itr": None,
                                 "_depends_on_deps": {}})
            return obj

        joints = assets.j_regressor.astype(np.float64) @ assets.v_template.astype(np.float64)
        data = {
            "f": assets.faces.astype(np.uint32), "v_template": chumpy(assets.v_template),
            "shapedirs": chumpy(assets.shapedirs), "posedirs": assets.posedirs.astype(np.float64),
            "J_regressor": csc_matrix(assets.j_regressor.astype(np.float64)), "kintree_table": kintree,
            "weights": chumpy(assets.lbs_weights), "J": chumpy(joints),
            "bs_style": "lbs", "bs_type": "lrotmin",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as stream:
            pickle.dump(data, stream, protocol=2)
    return path


def write_landmark_embedding(landmarks: LandmarkEmbedding, path: str | Path) -> Path:
    """Write DECA's landmark_embedding.npy layout (a pickled dict; 68 full landmarks, no eyes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, {  # type: ignore[arg-type]  # a dict is pickled as a 0-d object array, as DECA's is
        "static_lmk_faces_idx": landmarks.static_faces, "static_lmk_bary_coords": landmarks.static_bary,
        "dynamic_lmk_faces_idx": landmarks.dynamic_faces, "dynamic_lmk_bary_coords": landmarks.dynamic_bary,
        "full_lmk_faces_idx": landmarks.full_faces[None, :68],
        "full_lmk_bary_coords": landmarks.full_bary[None, :68],
    }, allow_pickle=True)
    return path


@dataclass
class SyntheticFlameFiles:
    """Paths of one synthetic model written in every supported format."""

    pt: Path
    pkl: Path
    landmarks: Path


def write_synthetic_flame(directory: str | Path, seed: int = 0) -> SyntheticFlameFiles:
    """Write FLAME_with_eye.pt, generic_model.pkl and landmark_embedding.npy for one synthetic model."""
    directory = Path(directory)
    assets = make_synthetic_flame(seed)
    assert assets.landmarks is not None  # the synthetic model always has them
    return SyntheticFlameFiles(
        pt=save_flame_with_eye(assets, directory / "FLAME_with_eye.pt"),
        pkl=write_flame_pkl(assets, directory / "generic_model.pkl"),
        landmarks=write_landmark_embedding(assets.landmarks, directory / "landmark_embedding.npy"),
    )
