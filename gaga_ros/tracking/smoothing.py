"""One Euro filter (Casiez, Roussel, Vogel, CHI 2012) on numpy arrays, element-wise.

A low-pass filter whose cutoff rises with speed: still signals are smoothed hard (little jitter),
fast motions pass with little lag. Written here because it is ~20 lines and the PyPI packages
implementing it are scalar-only or unmaintained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gaga_ros.errors import InputError


@dataclass(frozen=True)
class OneEuroSettings:
    """min_cutoff (Hz), beta (per unit of the signal per second) and d_cutoff (Hz) of a OneEuroFilter."""

    min_cutoff: float
    beta: float
    d_cutoff: float

    def __post_init__(self) -> None:
        if not (self.min_cutoff > 0 and self.d_cutoff > 0 and self.beta >= 0):
            raise InputError(f"One Euro settings min_cutoff={self.min_cutoff}, beta={self.beta}, "
                             f"d_cutoff={self.d_cutoff}: accepted are positive cutoffs (Hz) and beta >= 0")


#: The mesh tracker's filter of the landmark motion (canonical units; the face spans about 1.1), chosen
#: at the clips' own frame rates (bench/TRANSFER_NOTES.md, "The motion filter at the camera's rate"): a
#: low still cutoff keeps a still face steadier than 1.5/3/1 did, and the speed term, fed by a quicker
#: speed estimate, opens fast enough that a 4-frame blink at 30 fps keeps 98 % of its depth (78 %).
FACE_SMOOTHING = OneEuroSettings(min_cutoff=0.3, beta=30.0, d_cutoff=3.0)
#: The eyelids' own filter (the 32 lid vertices of the motion): a slow widening of the eyes, as when
#: the driver looks up, moves the lids too slowly to open FACE_SMOOTHING's speed term and lagged by
#: about half a second. Lid jitter costs little to see (an eye opening steady to 0.1 % of the eye's
#: width on a still face with sensor noise, under 0.1 px at 512), and this follows the driver's eye
#: opening nearly as the raw landmarks do (r 0.924-0.961 on the three clips against 0.898-0.940;
#: TRANSFER_NOTES, fifth pass).
LID_SMOOTHING = OneEuroSettings(min_cutoff=0.5, beta=100.0, d_cutoff=3.0)
#: The mesh tracker's filter of the head's rotation (an axis-angle in radians). A still cutoff of
#: 1 Hz, not 0.3, because the render must stay on a slowly drifting head (self-reenactment lost 0.1 dB
#: at 0.3). A speed gain of 10 (5 before) lets nods through with less lag: pose correlation with the
#: driver's measured pitch 0.776 -> 0.790 (head_turns) and 0.533 -> 0.566 (expressive), for a still
#: head's jitter of 0.026 degree a frame instead of 0.024 (raw landmarks: 0.155). A gain of 20 gave a
#: little more (0.792, 0.592) but a speaking head's median turn between frames rose to 0.50 degree from
#: 0.39 (raw: 0.66), jitter let through while it moves (TRANSFER_NOTES, fifth pass).
HEAD_SMOOTHING = OneEuroSettings(min_cutoff=1.0, beta=10.0, d_cutoff=2.0)
#: Its filter of the head's shift (GAGAvatar units): the former head filter, since a faster one let a
#: speaking head's distance jump by a tenth of a unit between frames.
SHIFT_SMOOTHING = OneEuroSettings(min_cutoff=1.0, beta=5.0, d_cutoff=2.0)


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2 * np.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Filter arrays of a fixed shape over time; timestamps in seconds.

    min_cutoff (Hz): cutoff when still; lower means less jitter, more lag. beta: how fast the cutoff
    rises with speed (per unit of the signal per second). d_cutoff (Hz): cutoff of the speed estimate.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        self.retune(OneEuroSettings(float(min_cutoff), float(beta), float(d_cutoff)))
        self.reset()

    @classmethod
    def of(cls, settings: OneEuroSettings) -> OneEuroFilter:
        """A filter with these settings."""
        return cls(settings.min_cutoff, settings.beta, settings.d_cutoff)

    def retune(self, settings: OneEuroSettings) -> None:
        """New settings, same state: the output stays continuous."""
        self.min_cutoff, self.beta, self.d_cutoff = settings.min_cutoff, settings.beta, settings.d_cutoff

    def reset(self) -> None:
        """Forget the history; the next sample passes unfiltered."""
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """The filtered value of sample x taken at time t (seconds)."""
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or self._x.shape != x.shape:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), float(t)
            return x.copy()
        assert self._t is not None and self._dx is not None  # set together with self._x
        dt = float(t) - self._t
        if dt <= 0:  # repeated or out-of-order stamp: keep the state, report the current estimate
            return self._x.copy()
        dx = (x - self._x) / dt
        self._dx = self._dx + _alpha(self.d_cutoff, dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x = self._x + _alpha(cutoff, dt) * (x - self._x)
        self._t = float(t)
        return self._x.copy()
