"""A built-in scripted driver: a deterministic looping performance as MESH-mode expressions.

Lets the avatar move with no camera (demos, tests, a robot idling). Two performances: "show" (the
demo: speaking, smiling, nodding, turning) and "idle" (what a face does while nobody drives it:
blinking, breathing sway, a faint smile now and then; the telepresence loop's face between
operators). Each action is a named displacement field of gaga_ros.blendshapes (the ones robots
command by name); head motion is a
rotation of frontal_transform().
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from gaga_ros.blendshapes import JAW_OPEN, displacement, head_rotation
from gaga_ros.camera import frontal_transform
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES

#: Seconds of each scripted segment, in loop order.
SEGMENTS = (("speak", 3.0), ("smile", 2.0), ("nod", 2.0), ("turn", 3.0), ("speak_turn", 3.0))
PERIOD = sum(d for _, d in SEGMENTS)
#: Head motion of the nod and turn segments, radians.
NOD_PITCH = np.radians(12.0)
TURN_YAW = np.radians(30.0)
PERFORMANCES = ("show", "idle")
#: The idle performance's sway: (amplitude radians, frequency Hz) of yaw and pitch, smile strength.
IDLE_YAW, IDLE_PITCH = (np.radians(4.0), 0.11), (np.radians(2.0), 0.23)
IDLE_SMILE = 0.2


class ScriptedDriver:
    """Loops speaking, smiling, nodding and turning (blinking throughout) at `fps`; seed varies
    the speech rhythm. Deterministic: the same (fps, seed, t) always gives the same expression."""

    def __init__(self, fps: float = 30.0, seed: int = 0, performance: str = "show"):
        if not fps > 0:
            raise InputError(f"fps {fps!r}: accepted is a positive frame rate")
        if performance not in PERFORMANCES:
            raise InputError(f"performance {performance!r}: accepted are {', '.join(PERFORMANCES)}")
        self.fps, self.performance = float(fps), performance
        rng = np.random.default_rng(seed)
        # Speech: a sum of incommensurate sines with seeded phases reads as syllables.
        self._speech_freq = np.array([3.1, 4.7, 1.9]) * rng.uniform(0.85, 1.15, 3)
        self._speech_phase = rng.uniform(0, 2 * np.pi, 3)
        self._blink_times = np.sort(rng.uniform(0, PERIOD, 5))

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
        if self.performance == "idle":
            out["yaw"] = IDLE_YAW[0] * np.sin(2 * np.pi * IDLE_YAW[1] * t)
            out["pitch"] = IDLE_PITCH[0] * np.sin(2 * np.pi * IDLE_PITCH[1] * t + 1.0)
            out["smile"] = IDLE_SMILE * (envelope if name == "smile" else 0.0)
        elif name.startswith("speak"):
            s = np.sin(self._speech_freq * t + self._speech_phase)
            out["jaw"] = JAW_OPEN * envelope * float(np.clip(0.45 + 0.35 * s[0] + 0.25 * s[1], 0, 1))
        if self.performance == "show":
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
        vertices = CANONICAL_VERTICES + displacement({
            "jawOpen": w["jaw"] / JAW_OPEN, "mouthSmileLeft": w["smile"], "mouthSmileRight": w["smile"],
            "eyeBlinkLeft": w["blink"], "eyeBlinkRight": w["blink"]})
        head = head_rotation(w["yaw"], w["pitch"])  # column-vector rotation
        transform = frontal_transform()
        transform[:, :3] = head.T @ transform[:, :3]  # row-vector convention: x_cam = (x head^T) R
        return Expression(FaceModel.MESH, transform=transform.astype(np.float32),
                          stamp_ns=int(round(t * 1e9)), vertices=vertices.astype(np.float32))

    def __iter__(self) -> Iterator[Expression]:
        """Frames at `fps` forever (slice with itertools.islice)."""
        return (self.expression_at(i / self.fps) for i in itertools.count())
