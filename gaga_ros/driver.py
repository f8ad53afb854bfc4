"""A built-in scripted driver: a deterministic looping performance as MESH-mode expressions.

Lets the avatar move with no camera (demos, tests, a robot idling). Each action is a smooth
displacement field on the canonical FaceMesh, built from the named regions with a Gaussian falloff
around the landmarks that move; head motion is a rotation of frontal_transform().
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from gaga_ros.expression import Expression, FaceModel, frontal_transform
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, REGIONS

#: Seconds of each scripted segment, in loop order.
SEGMENTS = (("speak", 3.0), ("smile", 2.0), ("nod", 2.0), ("turn", 3.0), ("speak_turn", 3.0))
PERIOD = sum(d for _, d in SEGMENTS)
#: Falloff radius of the displacement fields around moving landmarks, canonical units.
FALLOFF = 0.06
#: Largest jaw opening, radians about the jaw hinge.
JAW_OPEN = 0.28
#: Jaw hinge (canonical frame): below the ears, behind the face.
JAW_PIVOT = np.array([0.0, -0.12, -0.25])
NOD_PITCH = np.radians(12.0)
TURN_YAW = np.radians(30.0)


def _falloff_field(handles: np.ndarray, displacement: np.ndarray, radius: float = FALLOFF,
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


def _rotation(axis: str, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _jaw_field() -> np.ndarray:
    """Displacement per radian of jaw opening: the lower face turns about the jaw hinge."""
    v = CANONICAL_VERTICES.astype(np.float64)
    lower = np.union1d(REGIONS["lower_face"], REGIONS["lips_lower"])
    inner = REGIONS["mouth_inner"]
    lower = np.setdiff1d(lower, inner[:11])  # the upper inner lip stays with the upper face
    small = 0.05
    moved = (v - JAW_PIVOT) @ _rotation("x", small).T + JAW_PIVOT - v
    weight = np.zeros(len(v))
    weight[lower] = 1.0
    # Blend the rest smoothly by distance to the moving set (cheeks follow partly).
    d2 = ((v[:, None] - v[lower][None]) ** 2).sum(-1).min(1)
    weight = np.maximum(weight, np.exp(-d2 / (2 * FALLOFF**2)))
    weight[inner[:11]] = 0.0
    weight[REGIONS["lips_upper"]] = np.minimum(weight[REGIONS["lips_upper"]], 0.15)
    return (moved * weight[:, None] / small).astype(np.float32)


def _smile_field() -> np.ndarray:
    """Displacement of a full smile: mouth corners up and out, cheeks lifted a little."""
    corners = np.array([61, 291, 78, 308])
    side = np.sign(CANONICAL_VERTICES[corners, 0])[:, None]
    disp = np.concatenate([side * 0.045, np.full((4, 1), 0.035), np.full((4, 1), -0.01)], 1)
    return _falloff_field(corners, disp)


def _blink_field() -> np.ndarray:
    """Displacement of closed eyes: each upper-lid landmark moves onto the lower lid."""
    v = CANONICAL_VERTICES
    handles, disp = [], []
    for side in ("left", "right"):
        upper, lower = REGIONS[f"{side}_eye_upper"], REGIONS[f"{side}_eye_lower"]
        for k, idx in enumerate(upper[1:-1], start=1):
            handles.append(idx)
            disp.append(v[lower[k]] - v[idx])
    exclude = np.concatenate([REGIONS[f"{s}_eye_lower"] for s in ("left", "right")])
    return _falloff_field(np.array(handles), np.array(disp), 0.03, exclude)


class ScriptedDriver:
    """Loops speaking, smiling, nodding and turning (blinking throughout) at `fps`; seed varies
    the speech rhythm. Deterministic: the same (fps, seed, t) always gives the same expression."""

    def __init__(self, fps: float = 30.0, seed: int = 0):
        if not fps > 0:
            raise ValueError(f"fps {fps!r}: accepted is a positive frame rate")
        self.fps = float(fps)
        rng = np.random.default_rng(seed)
        # Speech: a sum of incommensurate sines with seeded phases reads as syllables.
        self._speech_freq = np.array([3.1, 4.7, 1.9]) * rng.uniform(0.85, 1.15, 3)
        self._speech_phase = rng.uniform(0, 2 * np.pi, 3)
        self._blink_times = np.sort(rng.uniform(0, PERIOD, 5))
        self._jaw, self._smile, self._blink = _jaw_field(), _smile_field(), _blink_field()

    @property
    def period(self) -> float:
        """Seconds before the performance repeats."""
        return PERIOD

    def weights(self, t: float) -> dict[str, float]:
        """Action strengths at time t: jaw (radians), smile, blink in [0,1], pitch, yaw (radians)."""
        t = float(t) % PERIOD
        ends = np.cumsum([d for _, d in SEGMENTS])
        k = min(int(np.searchsorted(ends, t, side="right")), len(SEGMENTS) - 1)
        name, duration = SEGMENTS[k]
        start = ends[k] - duration
        phase = (t - start) / duration  # 0..1 within the segment
        envelope = np.sin(np.pi * phase) ** 2  # eases in and out, so the loop is seamless
        out = {"jaw": 0.0, "smile": 0.0, "blink": 0.0, "pitch": 0.0, "yaw": 0.0}
        if name.startswith("speak"):
            s = np.sin(self._speech_freq * t + self._speech_phase)
            out["jaw"] = JAW_OPEN * envelope * float(np.clip(0.45 + 0.35 * s[0] + 0.25 * s[1], 0, 1))
        if name == "smile":
            out["smile"] = envelope
        if name == "nod":
            out["pitch"] = NOD_PITCH * envelope * np.sin(2 * np.pi * 2 * phase)
        if name in ("turn", "speak_turn"):
            out["yaw"] = TURN_YAW * np.sin(2 * np.pi * phase)
        blink = np.exp(-(((t - self._blink_times) / 0.07) ** 2)).max()
        out["blink"] = float(np.clip(blink * 1.2, 0, 1))
        return out

    def expression_at(self, t: float) -> Expression:
        """The MESH-mode expression at time t seconds (looping every `period`)."""
        w = self.weights(t)
        vertices = (CANONICAL_VERTICES + w["jaw"] * self._jaw + w["smile"] * self._smile
                    + w["blink"] * self._blink)
        head = _rotation("y", w["yaw"]) @ _rotation("x", -w["pitch"])  # column-vector rotation
        transform = frontal_transform()
        transform[:, :3] = head.T @ transform[:, :3]  # row-vector convention: x_cam = (x head^T) R
        return Expression(FaceModel.MESH, transform=transform.astype(np.float32),
                          stamp_ns=int(round(t * 1e9)), vertices=vertices.astype(np.float32))

    def __iter__(self) -> Iterator[Expression]:
        """Frames at `fps` forever (slice with itertools.islice)."""
        return (self.expression_at(i / self.fps) for i in itertools.count())
