"""Named displacement fields on the canonical FaceMesh: a subset of the ARKit-52 blendshapes.

One place for every way the face moves by name: the scripted driver performs with them and robots
command them (gaga_ros.named). Each field is the displacement of all 478 canonical landmarks at
weight 1, built from the named regions with a Gaussian falloff around the landmarks that move, so a
weighted sum of fields added to any MESH-mode expression's vertices moves only the named region.
Left and Right are the face's own: +x of the canonical frame, which the viewer sees on the right.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, REGIONS

#: Falloff radius of the displacement fields around moving landmarks, canonical units.
FALLOFF = 0.06
#: Jaw opening at jawOpen = 1, radians about the jaw hinge (a wide-open speaking mouth).
JAW_OPEN = 0.28
#: Jaw hinge (canonical frame): below the ears, behind the face.
JAW_PIVOT = np.array([0.0, -0.12, -0.25])
#: Eye rotation at eyeLook* = 1, radians (about the eye's comfortable range, as ARKit's 1.0).
EYE_LOOK_MAX = np.radians(30.0)
#: Eyeball radius, canonical units (12 mm x 5): an eye turned by a rotates its iris by r sin(a).
EYEBALL_RADIUS = 0.06

#: A one-sided field fades to nothing over this distance past the midline (canonical units), so a
#: Left name never moves the right half and the midline shows no crease.
MIDLINE_BLEND = 0.03

SIDES = {"Left": "left", "Right": "right"}
#: The supported names, grouped as the README lists them.
NAMES = ("jawOpen", "mouthClose", "mouthFunnel", "mouthPucker",
         "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
         "eyeBlinkLeft", "eyeBlinkRight",
         "browInnerUp", "browDownLeft", "browDownRight", "browOuterUpLeft", "browOuterUpRight",
         "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight",
         "eyeLookUpLeft", "eyeLookUpRight", "eyeLookDownLeft", "eyeLookDownRight")


def falloff_field(handles: np.ndarray, displacement: np.ndarray, radius: float = FALLOFF,
                  exclude: np.ndarray | None = None) -> np.ndarray:
    """(478,3) displacement that moves `handles` by `displacement` (K,3) and their surroundings
    with a Gaussian falloff of `radius`; `exclude` vertices stay put."""
    v = CANONICAL_VERTICES
    d2 = ((v[:, None] - v[handles][None]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * radius**2))
    field = (w @ displacement) / np.maximum(w.sum(1, keepdims=True), 1e-12)
    field *= w.max(1, keepdims=True)
    field[handles] = displacement
    if exclude is not None:
        field[exclude] = 0.0
    return field.astype(np.float32)


def rotation(axis: str, angle: float) -> np.ndarray:
    """The 3x3 column-vector rotation by `angle` radians about canonical axis x, y or z."""
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def head_rotation(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """Column-vector head rotation in the canonical frame: yaw + turns the face toward +x (the
    viewer's right), pitch + tilts it up, roll + tilts the top of the head toward +x."""
    return rotation("y", yaw) @ rotation("x", -pitch) @ rotation("z", -roll)


def jaw_field() -> np.ndarray:
    """Displacement per radian of jaw opening: the lower face turns about the jaw hinge."""
    v = CANONICAL_VERTICES.astype(np.float64)
    lower = np.union1d(REGIONS["lower_face"], REGIONS["lips_lower"])
    inner = REGIONS["mouth_inner"]
    lower = np.setdiff1d(lower, inner[:11])  # the upper inner lip stays with the upper face
    small = 0.05
    moved = (v - JAW_PIVOT) @ rotation("x", small).T + JAW_PIVOT - v
    weight = np.zeros(len(v))
    weight[lower] = 1.0
    # Blend the rest smoothly by distance to the moving set (cheeks follow partly).
    d2 = ((v[:, None] - v[lower][None]) ** 2).sum(-1).min(1)
    weight = np.maximum(weight, np.exp(-d2 / (2 * FALLOFF**2)))
    weight[inner[:11]] = 0.0
    weight[REGIONS["lips_upper"]] = np.minimum(weight[REGIONS["lips_upper"]], 0.15)
    return (moved * weight[:, None] / small).astype(np.float32)


def _side(indices: np.ndarray, side: str) -> np.ndarray:
    """The landmarks of `indices` on the face's left (+x) or right (-x)."""
    x = CANONICAL_VERTICES[indices, 0]
    return indices[x > 0] if side == "left" else indices[x < 0]


def _one_side(field: np.ndarray, side: str) -> np.ndarray:
    """`field` faded out across the midline toward the other side."""
    toward = CANONICAL_VERTICES[:, 0] * (1.0 if side == "left" else -1.0)
    return (field * np.clip(1.0 + toward / MIDLINE_BLEND, 0.0, 1.0)[:, None]).astype(np.float32)


def _corners(side: str) -> np.ndarray:
    """Outer and inner mouth corner of one side."""
    return _side(np.array([61, 291, 78, 308]), side)


def _smile(side: str) -> np.ndarray:
    """Mouth corner up and out, cheek lifted a little."""
    corners = _corners(side)
    out = np.sign(CANONICAL_VERTICES[corners, 0])[:, None]
    disp = np.concatenate([out * 0.045, np.full((len(corners), 1), 0.035),
                           np.full((len(corners), 1), -0.01)], 1)
    return falloff_field(corners, disp)


def _frown(side: str) -> np.ndarray:
    """Mouth corner down and a little out."""
    corners = _corners(side)
    out = np.sign(CANONICAL_VERTICES[corners, 0])[:, None]
    disp = np.concatenate([out * 0.01, np.full((len(corners), 1), -0.035),
                           np.zeros((len(corners), 1))], 1)
    return falloff_field(corners, disp)


def _blink(side: str) -> np.ndarray:
    """Closed eye: each upper-lid landmark moves onto the lower lid."""
    v = CANONICAL_VERTICES
    upper, lower = REGIONS[f"{side}_eye_upper"], REGIONS[f"{side}_eye_lower"]
    handles = upper[1:-1]
    disp = v[lower[1:-1]] - v[handles]
    return falloff_field(handles, disp, 0.03, lower)


def _lips() -> np.ndarray:
    return np.union1d(REGIONS["lips_upper"], REGIONS["lips_lower"])


def _pucker() -> np.ndarray:
    """Lips drawn toward the mouth's centre and pushed forward."""
    lips = _lips()
    v = CANONICAL_VERTICES[lips]
    disp = np.stack([-0.35 * v[:, 0], np.zeros(len(lips)), np.full(len(lips), 0.025)], 1)
    return falloff_field(lips, disp, 0.03)


def _funnel() -> np.ndarray:
    """Lips pushed forward and apart into an open ring, corners drawn in a little."""
    lips = _lips()
    v = CANONICAL_VERTICES[lips]
    up = np.isin(lips, REGIONS["lips_upper"])
    disp = np.stack([-0.15 * v[:, 0], np.where(up, 0.015, -0.02), np.full(len(lips), 0.02)], 1)
    return falloff_field(lips, disp, 0.03)


def _close() -> np.ndarray:
    """Lower lip up onto the upper one against an open jaw (jawOpen + mouthClose: closed lips)."""
    lower = REGIONS["lips_lower"]
    return falloff_field(lower, -JAW_OPEN * jaw_field()[lower], 0.015)


def _eye_contours() -> np.ndarray:
    return np.concatenate([REGIONS[f"{s}_eye_{h}"] for s in ("left", "right") for h in ("upper", "lower")]
                          + [REGIONS["left_iris"], REGIONS["right_iris"]])


def _brow(sides: tuple[str, ...], lift: float, inner: bool | None, inward: float = 0.0) -> np.ndarray:
    """Brows moved up by `lift` (down if negative): weighted toward the inner ends (inner True), the
    outer ends (False) or evenly (None); `inward` draws them toward the midline."""
    handles, disp = [], []
    for side in sides:
        brow = REGIONS[f"{side}_eyebrow"]
        ax = np.abs(CANONICAL_VERTICES[brow, 0])
        t = (ax - ax.min()) / np.ptp(ax)  # 0 at the inner end, 1 at the outer
        w = np.ones_like(t) if inner is None else (1 - t if inner else t)
        out = np.sign(CANONICAL_VERTICES[brow, 0])
        handles.append(brow)
        disp.append(np.stack([-out * inward * w, lift * w, np.zeros_like(w)], 1))
    return falloff_field(np.concatenate(handles), np.concatenate(disp), 0.04, _eye_contours())


def _look(side: str, direction: str) -> np.ndarray:
    """One eye turned by EYE_LOOK_MAX: the iris moves fully, the lids' inner points with it (most at
    the middle, none at the corners), so what the eye opening shows slides toward `direction`."""
    shift = EYEBALL_RADIUS * np.sin(EYE_LOOK_MAX)
    out = 1.0 if side == "left" else -1.0  # +x is the left eye's outer side
    step = {"Out": (out, 0.0), "In": (-out, 0.0), "Up": (0.0, 1.0), "Down": (0.0, -1.0)}[direction]
    field = np.zeros_like(CANONICAL_VERTICES)
    move = np.array([step[0], step[1], 0.0]) * shift
    for half in ("upper", "lower"):
        contour = REGIONS[f"{side}_eye_{half}"]
        taper = np.sin(np.pi * np.linspace(0, 1, len(contour)))
        field[contour] = taper[:, None] * move
    field[REGIONS[f"{side}_iris"]] = move
    return field.astype(np.float32)


@functools.cache
def fields() -> dict[str, np.ndarray]:
    """Every name's (478,3) float32 displacement at weight 1 (built once, ~10 ms)."""
    out = {"jawOpen": JAW_OPEN * jaw_field(), "mouthClose": _close(), "mouthFunnel": _funnel(),
           "mouthPucker": _pucker(), "browInnerUp": _brow(("left", "right"), 0.03, True)}
    for name, side in SIDES.items():
        sided = {"mouthSmile": _smile(side), "mouthFrown": _frown(side), "eyeBlink": _blink(side),
                 "browDown": _brow((side,), -0.025, None, inward=0.008),
                 "browOuterUp": _brow((side,), 0.03, False),
                 **{f"eyeLook{d}": _look(side, d) for d in ("In", "Out", "Up", "Down")}}
        out.update({f"{action}{name}": _one_side(f, side) for action, f in sided.items()})
    for f in out.values():
        f.setflags(write=False)  # shared by every caller
    return {name: out[name] for name in NAMES}


def displacement(weights: Mapping[str, float]) -> np.ndarray:
    """(478,3) float32 sum of the named fields at their weights (names from NAMES)."""
    table = fields()
    out = np.zeros_like(CANONICAL_VERTICES)
    for name, w in weights.items():
        if w:
            out += np.float32(w) * table[name]
    return out


def eye_angles(weights: Mapping[str, float]) -> np.ndarray:
    """(left yaw, left pitch, right yaw, right pitch), radians, of the eyeLook* weights: yaw + toward
    +x (the viewer's right), pitch + up."""
    def w(name: str) -> float:
        return float(weights.get(name, 0.0))

    left_yaw = w("eyeLookOutLeft") - w("eyeLookInLeft")
    right_yaw = w("eyeLookInRight") - w("eyeLookOutRight")
    left_pitch = w("eyeLookUpLeft") - w("eyeLookDownLeft")
    right_pitch = w("eyeLookUpRight") - w("eyeLookDownRight")
    return EYE_LOOK_MAX * np.array([left_yaw, left_pitch, right_yaw, right_pitch])
