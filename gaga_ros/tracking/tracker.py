"""What a tracker is to its callers, and the one place that makes one.

Both trackers (mesh mode: gaga_ros.tracking.mesh_tracker, FLAME mode: flame_tracker) turn camera
frames into expressions, report their health as a TrackingState, relearn the driver's reference on
request and release mediapipe on close. `make_tracker` chooses and builds one from a mode and the
models folder, for the tracking node and for anything else that tracks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from gaga_ros.errors import InputError
from gaga_ros.expression import Expression
from gaga_ros.tracking.smoothing import FACE_SMOOTHING, OneEuroSettings

#: Tracking modes: mesh (asset-free), flame (needs a FLAME model), auto (flame when one is present).
TRACKING_MODES = ("mesh", "flame", "auto")


@dataclass(frozen=True)
class TrackingState:
    """Health of the tracker after its latest frame (mirrors msg/TrackingStatus.msg)."""

    face_found: bool
    confidence: float
    face_lost_seconds: float
    message: str


class Tracker(Protocol):
    """Camera frames in, expressions out."""

    @property
    def status(self) -> TrackingState:
        """Whether a face is tracked, its confidence and how long it has been lost."""
        ...

    def update(self, rgb: np.ndarray, stamp_ns: int) -> Expression | None:
        """Track one RGB frame taken at stamp_ns; None when no face is found."""
        ...

    def reset_reference(self) -> None:
        """Relearn the driver from the next frames (a new person, or a new neutral face)."""
        ...

    def set_smoothing(self, settings: OneEuroSettings) -> None:
        """Retune the temporal smoothing live, where the tracker's smoothing has these settings."""
        ...

    def close(self) -> None:
        """Release mediapipe."""
        ...


def nearest_rotation(m: np.ndarray) -> np.ndarray:
    """The rotation nearest a 3x3 matrix (an average or a smoothed rotation), by SVD."""
    u, _, vt = np.linalg.svd(m)
    return u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt


def resolve_mode(mode: str, models_dir: str | Path | None = None) -> str:
    """mesh or flame for a requested mode; auto is flame when a FLAME model is in models_dir."""
    from gaga_ros.assets import find_assets

    if mode not in TRACKING_MODES:
        raise InputError(f"mode {mode!r}: accepted are {', '.join(TRACKING_MODES)}")
    if mode != "auto":
        return mode
    return "flame" if find_assets(models_dir).flame else "mesh"


def make_tracker(mode: str, models_dir: str | Path | None = None, *, min_confidence: float = 0.5,
                 flame_steps: int = 3, smoothing: OneEuroSettings = FACE_SMOOTHING,
                 reference_frames: int = 15) -> Tracker:
    """The tracker of a mode (see resolve_mode). FLAME mode reads the FLAME model (and FLAME's
    mediapipe embedding when present) from models_dir and raises FileNotFoundError without it; the
    landmark smoothing and reference_frames are mesh mode's."""
    from gaga_ros.assets import find_assets

    if resolve_mode(mode, models_dir) == "mesh":
        from gaga_ros.tracking.mesh_tracker import MeshTracker

        return MeshTracker(smoothing=smoothing, reference_frames=reference_frames,
                           min_confidence=min_confidence)
    import torch

    from gaga_ros.faces.flame_assets import load_flame_assets
    from gaga_ros.tracking.flame_fitter import MediapipeEmbedding
    from gaga_ros.tracking.flame_tracker import FlameTracker

    torch.set_num_threads(1)  # a few small solves per frame: threads cost more than they give
    status = find_assets(models_dir)
    if status.flame is None:
        raise FileNotFoundError(f"tracking mode flame needs a FLAME model.\n{status.explain()}")
    embedding = MediapipeEmbedding.load(status.mediapipe_embedding) if status.mediapipe_embedding else None
    return FlameTracker(load_flame_assets(status.flame, status.flame_landmarks), embedding,
                        min_confidence=min_confidence, steps=flame_steps)
