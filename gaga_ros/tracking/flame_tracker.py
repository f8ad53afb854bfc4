"""Camera frames -> FLAME-mode Expressions: mediapipe landmarks on the 1.65x head crop, a FLAME fit
warm-started from the previous frame, and GAGAvatar_track's smoothing (docs/flame.md).

Per frame: mediapipe FaceMesh (~8 ms at 512 on one CPU core), then a few Levenberg-Marquardt steps
(~5-10 ms); identity is estimated over the first `identity_frames` frames and then held.
"""

from __future__ import annotations

import time

import numpy as np

from gaga_ros.conventions import CROP_SCALE, CROP_SIZE
from gaga_ros.crop import crop_window, head_box
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.flame_assets import FlameAssets
from gaga_ros.tracking.flame_fitter import FlameFit, FlameFitter, MediapipeEmbedding
from gaga_ros.tracking.landmarks import FaceLandmarker
from gaga_ros.tracking.smoothing import OneEuroSettings
from gaga_ros.tracking.tracker import TrackingState, nearest_rotation

#: EMA weights of the published video tracker: new = a * current + (1 - a) * previous.
POSE_ALPHA, EYE_ALPHA, BOX_ALPHA = 0.6, 0.7, 0.03


def _ema(prev: np.ndarray | None, cur: np.ndarray, alpha: float) -> np.ndarray:
    return cur if prev is None else alpha * cur + (1 - alpha) * prev


class FlameTracker:
    """Identity held after the first frames (the fitter's); expression, jaw, eyes, pose per frame.

    steps: the most LM iterations per frame (3 suffice from a warm start; more only cost time).
    """

    def __init__(self, assets: FlameAssets, embedding: MediapipeEmbedding | None = None,
                 min_confidence: float = 0.5, steps: int = 3, device: str = "cpu",
                 identity_frames: int = 8) -> None:
        self.landmarker = FaceLandmarker(static_image_mode=False, max_faces=1, min_confidence=min_confidence)
        self.fitter = FlameFitter(assets, embedding, steps=steps, identity_frames=identity_frames,
                                  device=device)
        #: the last frame's stage times, crop-pixel landmarks and raw (unsmoothed) fit, for diagnostics
        self.timings_ms: dict[str, float] = {}
        self.last_landmarks: np.ndarray | None = None
        self.last_fit: FlameFit | None = None
        self._box: np.ndarray | None = None
        self._smooth: dict[str, np.ndarray] = {}
        self._last_seen: float | None = None
        self.status = TrackingState(False, 0.0, 0.0, "waiting for the first frame")

    def reset(self) -> None:
        """A new person: forget the identity and the smoothing state."""
        self.fitter.reset()
        self._box, self._smooth = None, {}

    def update(self, rgb: np.ndarray, stamp_ns: int) -> Expression | None:
        """The FLAME-mode expression of this frame, or None when no face is seen."""
        now, started = time.monotonic(), time.perf_counter()
        faces = self.landmarker.detect(rgb)
        self.timings_ms = {"landmarks": (time.perf_counter() - started) * 1e3}
        if not faces:
            lost = 0.0 if self._last_seen is None else now - self._last_seen
            self.status = TrackingState(False, 0.0, lost, "no face in view")
            self._smooth = {}
            return None
        face = faces[0]
        self._last_seen = now
        self._box = _ema(self._box, head_box(face.points[:, :2]), BOX_ALPHA if self._box is not None else 1)
        window = crop_window(self._box, CROP_SIZE, CROP_SCALE)
        started = time.perf_counter()
        self.last_landmarks = window.to_crop(face.points)
        fit = self.fitter.fit(self.last_landmarks)[0]
        self.timings_ms["fit"] = (time.perf_counter() - started) * 1e3
        self.last_fit = fit
        s = self._smooth
        # the rotation nearest the smoothed matrix: the published tracker smooths a 6-D rotation form
        rot = _ema(s.get("rot"), fit.transform_matrix[:, :3], POSE_ALPHA)
        s["rot"] = nearest_rotation(rot).astype(np.float32)
        s["trans"] = _ema(s.get("trans"), fit.transform_matrix[:, 3], POSE_ALPHA)
        s["eyes"] = _ema(s.get("eyes"), fit.eyecode, EYE_ALPHA)
        confidence = float(face.score) / (1.0 + (fit.landmark_error_px / 16.0) ** 2)
        self.status = TrackingState(True, confidence, 0.0, "tracking")
        return Expression(FaceModel.FLAME, transform=np.concatenate([s["rot"], s["trans"][:, None]], 1),
                          stamp_ns=stamp_ns, expression=fit.expcode, jaw_pose=fit.posecode[3:6],
                          eye_pose=s["eyes"], confidence=min(max(confidence, 0.0), 1.0))

    def set_smoothing(self, settings: OneEuroSettings) -> None:
        """The published tracker's EMA weights are fixed; One Euro settings apply to mesh mode only."""

    def reset_reference(self) -> None:
        self.reset()

    def close(self) -> None:
        self.landmarker.close()
