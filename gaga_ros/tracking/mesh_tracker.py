"""Mesh-mode tracking: FaceMesh landmarks -> GAGAvatar head pose + identity-free canonical landmarks.

Per frame: landmarks on the full frame, a GAGAvatar head crop around them (crop.py), a rigid head fit in
the crop's camera (gaga_ros.camera: focal 3072 px on 512), the landmarks brought into the canonical head
frame (the rigid motion left in them moved into the pose, the strain the pose leaves in them dropped),
and motion relative to the driver's own reference (its first confident frames: their mean pose, and the
landmarks of the most closed-mouthed third), smoothed with One Euro filters. The output drives an
avatar of another person: it carries motion, not shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gaga_ros.camera import from_opencv, frontal_transform, intrinsics, to_opencv
from gaga_ros.conventions import CAMERA_DISTANCE, CROP_SCALE, CROP_SIZE, MESH_LANDMARKS
from gaga_ros.crop import CropWindow, HeadCrop, crop_head, crop_window, head_box
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, FACE_LANDMARKS, REGIONS
from gaga_ros.tracking.landmarks import FaceLandmarker
from gaga_ros.tracking.smoothing import (
    FACE_SMOOTHING,
    HEAD_SMOOTHING,
    LID_SMOOTHING,
    SHIFT_SMOOTHING,
    OneEuroFilter,
    OneEuroSettings,
)
from gaga_ros.tracking.tracker import TrackingState, nearest_rotation

#: Landmarks that move little with expression (forehead, nose, cheeks, eye corners): the rigid fit uses
#: these only, so a smile or an open jaw does not tilt the head.
_MOVING = ("lips_upper", "lips_lower", "lower_face", "left_eye_upper", "left_eye_lower",
           "right_eye_upper", "right_eye_lower", "left_eyebrow", "right_eyebrow")
#: The eye corners (33, 133, 362, 263) stay: blinks do not move them.
RIGID = np.union1d(np.setdiff1d(np.arange(FACE_LANDMARKS), np.concatenate([REGIONS[r] for r in _MOVING])),
                   [33, 133, 362, 263]).astype(np.int32)
#: The eyelids' vertices, which LID_SMOOTHING filters instead of the face's `smoothing`.
_LIDS = np.unique(np.concatenate([REGIONS[r] for r in ("left_eye_upper", "left_eye_lower", "right_eye_upper",
                                                        "right_eye_lower")]))
#: Reprojection error (pixels on the 512 crop) at which fit quality halves the confidence. A different
#: person's face fits the canonical one to ~5-7 px, a broken fit is off by tens of pixels.
RMSE_HALF = 16.0


class FitError(InputError):
    """Landmarks that cannot be fitted; the message says what is accepted."""


@dataclass(frozen=True)
class HeadFit:
    """A rigid head fit in the crop camera."""

    transform: np.ndarray  # (3, 4) GAGAvatar [R | T]: x_cam = x_canonical R + T
    canonical_points: np.ndarray  # (478, 3) this face's landmarks in the canonical head frame
    rmse_px: float  # reprojection error of the canonical face's rigid landmarks, crop pixels


def _umeyama_rotation(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Similarity dst ~ s R src + t (least squares, Umeyama 1991), returned as (R, s, t)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a)
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d) / (a**2).sum())
    return rot, scale, mu_d - scale * rot @ mu_s


def fit_head(crop_points: np.ndarray, size: int = CROP_SIZE,
             guess: np.ndarray | None = None) -> HeadFit:
    """Fit the canonical head to FaceMesh landmarks given in crop pixels (x, y, z scaled like x).

    A similarity fit of mediapipe's 3-D points gives the start, cv2.solvePnP refines the pose in the
    GAGAvatar camera (focal 12 in NDC). `guess` (a previous transform) skips the start.
    """
    pts = np.asarray(crop_points, dtype=np.float64)
    if pts.shape != (MESH_LANDMARKS, 3) or not np.isfinite(pts).all():
        raise FitError(f"crop_points of shape {pts.shape}: accepted are ({MESH_LANDMARKS}, 3) finite "
                       "FaceMesh landmarks in crop pixels")
    K = intrinsics(size)
    f, c = K[0, 0], K[0, 2]
    model = CANONICAL_VERTICES.astype(np.float64)
    centred = pts - np.array([c, c, 0.0])
    if guess is None:
        rot_cv, scale, shift = _umeyama_rotation(model[RIGID], centred[RIGID])
        tvec = np.array([shift[0] / scale, shift[1] / scale, f / scale])
    else:
        rot_cv, tvec = to_opencv(guess)
    rvec = cv2.Rodrigues(rot_cv)[0]
    # OpenCV accepts None (no distortion) where its type hints want an array.
    ok, rvec, tvec = cv2.solvePnP(  # type: ignore[call-overload]
        model[RIGID], pts[RIGID, :2].copy(), K, None, rvec, tvec.reshape(3, 1),
        useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or tvec[2, 0] <= 0:
        raise FitError("no head pose in front of the camera fits these landmarks")
    rot_cv, tvec = cv2.Rodrigues(rvec)[0], tvec[:, 0]
    projected = cv2.projectPoints(model[RIGID], rvec, tvec, K, None)[0][:, 0]  # type: ignore[call-overload]
    rmse = float(np.sqrt(((projected - pts[RIGID, :2]) ** 2).sum(1).mean()))
    # Back-project every landmark along its pixel ray, at mediapipe's depth (pixels -> units at the head
    # distance), registered so the rigid landmarks' mean depth matches the fitted canonical face.
    px_per_unit = f / tvec[2]
    model_depth = (model[RIGID] @ rot_cv[2] + tvec[2]).mean()
    depth = pts[:, 2] / px_per_unit
    depth += model_depth - depth[RIGID].mean()
    cam = np.column_stack([centred[:, 0] * depth / f, centred[:, 1] * depth / f, depth])
    canonical = (cam - tvec) @ rot_cv
    transform = from_opencv(rot_cv, tvec).astype(np.float32)
    return HeadFit(transform, canonical.astype(np.float32), rmse)


#: Mid inner-lip landmarks (upper, lower), and the share of the reference frames, those with the
#: least gap between them, whose landmarks make the driver's neutral face.
INNER_LIPS, CLOSED_SHARE = (13, 14), 1 / 3


def _neutral_points(frames: list[np.ndarray]) -> np.ndarray:
    """The driver's neutral landmarks: the mean of the reference frames with the most closed mouth.

    A neutral face has closed lips. A driver who speaks while the reference is taken would otherwise
    leave a mean opening in it, and every closed mouth after it would close the avatar's lips past
    each other (bench/TRANSFER_NOTES.md).
    """
    upper, lower = INNER_LIPS
    gaps = np.array([f[upper, 1] - f[lower, 1] for f in frames])
    closed = np.argsort(gaps, kind="stable")[:max(1, round(len(frames) * CLOSED_SHARE))]
    return np.mean([frames[k] for k in closed], axis=0)


def _register(points: np.ndarray, rot: np.ndarray, trans: np.ndarray,
              reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move the rigid motion left in head-frame landmarks into the head pose, and drop the strain.

    solvePnP fits the canonical face, not the driver's, to 2-D landmarks, so part of a nod or a turn
    stays in the back-projected landmarks as a rotation of the whole face; a renderer then shows it
    as a warp of the face, not as a turn of the head. The rigid landmarks' best rotation onto the
    driver's reference (Kabsch) is folded into the pose. The back-projection also strains the face in
    proportion to the pose (on head_turns.mp4 ~0.9 % of the depth in height per degree of pitch), which
    mediapipe reads on a render as a pitch against the pose's own (bench/TRANSFER_NOTES.md): the
    landmarks are mapped by the rigid landmarks' best linear map onto the reference, which takes out
    both.
    """
    mu_p, mu_r = points[RIGID].mean(0), reference[RIGID].mean(0)
    centred, target = points[RIGID] - mu_p, reference[RIGID] - mu_r
    q = nearest_rotation(centred.T @ target)  # (p - mu_p) q ~ reference - mu_r
    linear = np.linalg.lstsq(centred, target, rcond=None)[0]  # (p - mu_p) linear ~ reference - mu_r
    shift = mu_r - mu_p @ q
    # x_cam = p rot + trans = (p q + shift) q^T rot + trans - shift q^T rot
    new_rot = q.T @ rot
    return (points - mu_p) @ linear + mu_r, new_rot, trans - shift @ new_rot


class MeshTracker:
    """Camera frames -> smoothed mesh-mode Expressions, relative to the driver's own reference.

    One Euro filters smooth the vertex motion (`smoothing`, canonical units; the eyelids have their
    own, LID_SMOOTHING), the head's rotation (`head_smoothing`, an axis-angle in radians) and its shift
    (SHIFT_SMOOTHING, in units).
    """

    #: One Euro settings of the crop box (in units of the box side, per second).
    BOX_FILTER = OneEuroSettings(min_cutoff=0.5, beta=2.0, d_cutoff=1.0)

    def __init__(self, smoothing: OneEuroSettings = FACE_SMOOTHING, reference_frames: int = 15,
                 min_confidence: float = 0.5, crop_size: int = CROP_SIZE, crop_scale: float = CROP_SCALE,
                 distance: float = CAMERA_DISTANCE, head_smoothing: OneEuroSettings = HEAD_SMOOTHING):
        if int(reference_frames) < 1:
            raise InputError(f"reference_frames {reference_frames!r}: accepted is a positive integer")
        self.landmarker = FaceLandmarker(static_image_mode=False, max_faces=1, min_confidence=min_confidence)
        self.reference_frames = int(reference_frames)
        self.min_confidence = float(min_confidence)
        self.crop_size, self.crop_scale = int(crop_size), float(crop_scale)
        self._front = frontal_transform(distance)
        self._filters = {"motion": OneEuroFilter.of(smoothing), "lids": OneEuroFilter.of(LID_SMOOTHING),
                         "rot": OneEuroFilter.of(head_smoothing), "trans": OneEuroFilter.of(SHIFT_SMOOTHING)}
        self._box_filter = OneEuroFilter.of(self.BOX_FILTER)
        self._last: tuple[np.ndarray, np.ndarray, CropWindow] | None = None
        self._last_crop: HeadCrop | None = None
        self.last_fit: HeadFit | None = None
        self._last_seen: float | None = None
        self._state = TrackingState(False, 0.0, 0.0, "waiting for the first frame")
        self.reset_reference()

    def reset_reference(self) -> None:
        """Start collecting the driver's reference (neutral face and pose) again from the next frames."""
        self._ref_points: list[np.ndarray] = []
        self._ref_rots: list[np.ndarray] = []
        self._ref_trans: list[np.ndarray] = []
        self._reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._reset_filters()

    def _reset_filters(self) -> None:
        for flt in self._filters.values():
            flt.reset()
        self._box_filter.reset()
        self._box_unit: float | None = None
        self._guess: np.ndarray | None = None

    @property
    def status(self) -> TrackingState:
        """Whether a face is tracked, its confidence and how long it has been lost."""
        return self._state

    @property
    def last_window(self) -> CropWindow | None:
        """Where the latest tracked frame's head crop lies (cheap; no pixels are cut)."""
        return None if self._last is None else self._last[2]

    @property
    def last_crop(self) -> HeadCrop | None:
        """The latest tracked frame's head crop, cut on first access (resizing costs ~10 ms on 2 cores).

        The tracker keeps a reference to the frame, not a copy: read it before refilling that buffer.
        """
        if self._last_crop is None and self._last is not None:
            rgb, box, _ = self._last
            self._last_crop = crop_head(rgb, box, self.crop_size, self.crop_scale)
        return self._last_crop

    @property
    def reference_ready(self) -> bool:
        """True once the reference averages `reference_frames` confident frames."""
        return len(self._ref_points) >= self.reference_frames

    def update(self, rgb: np.ndarray, stamp_ns: int) -> Expression | None:
        """Track one RGB frame taken at stamp_ns; None when no face is found."""
        t = stamp_ns * 1e-9
        faces = self.landmarker.detect(rgb)
        if not faces:
            return self._lost(t, "no face in view")
        face = faces[0]
        box = head_box(face.points)
        if self._box_unit is None:  # filter the box in units of its side when tracking began
            self._box_unit = float(np.sqrt((box[2] - box[0]) * (box[3] - box[1])))
        box = self._box_filter(box / self._box_unit, t) * self._box_unit
        window = crop_window(box, self.crop_size, self.crop_scale)
        try:
            fit = fit_head(window.to_crop(face.points), self.crop_size, self._guess)
        except ValueError:
            return self._lost(t, "landmarks found but no head pose fits them")
        self._last = (rgb, box, window)
        self._last_crop = None
        self.last_fit, self._guess = fit, fit.transform
        quality = 1.0 / (1.0 + (fit.rmse_px / RMSE_HALF) ** 2)
        confidence = float(np.clip(face.score * quality, 0.0, 1.0))
        rot, trans = fit.transform[:, :3].astype(np.float64), fit.transform[:, 3].astype(np.float64)
        points = fit.canonical_points.astype(np.float64)
        if self._reference is not None:
            points, rot, trans = _register(points, rot, trans, self._reference[0])
        if not self.reference_ready and confidence >= self.min_confidence:
            self._ref_points.append(points)
            self._ref_rots.append(rot)
            self._ref_trans.append(trans)
            self._reference = (_neutral_points(self._ref_points),
                               nearest_rotation(np.mean(self._ref_rots, axis=0)),
                               np.mean(self._ref_trans, axis=0))
        if self._reference is None:
            return self._lost(t, "face found, confidence too low to take a reference", found=True,
                              confidence=confidence)
        ref_points, ref_rot, ref_trans = self._reference
        # Head-frame motion: x R_t = (x D) R_ref, so D = R_t R_ref^T; the avatar gets x D R_front.
        delta = cv2.Rodrigues(rot @ ref_rot.T)[0][:, 0]
        shift = (trans - ref_trans) @ ref_rot.T @ self._front[:, :3]
        raw = points - ref_points
        motion = self._filters["motion"](raw, t)
        motion[_LIDS] = self._filters["lids"](raw[_LIDS], t)
        delta = self._filters["rot"](delta, t)
        shift = self._filters["trans"](shift, t)
        transform = np.column_stack([cv2.Rodrigues(delta)[0] @ self._front[:, :3],
                                     self._front[:, 3] + shift])
        self._last_seen = t
        message = "tracking" if self.reference_ready else "tracking (taking the driver's reference)"
        self._state = TrackingState(True, confidence, 0.0, message)
        return Expression(face_model=FaceModel.MESH, transform=transform, stamp_ns=int(stamp_ns),
                          vertices=CANONICAL_VERTICES + motion, confidence=confidence)

    def _lost(self, t: float, message: str, found: bool = False,
              confidence: float = 0.0) -> Expression | None:
        """No expression for this frame (None), with the tracker's state saying why."""
        lost = 0.0 if self._last_seen is None else max(t - self._last_seen, 0.0)
        if not found:
            self._reset_filters()
        self._state = TrackingState(found, confidence, lost, message)
        return None

    def set_smoothing(self, settings: OneEuroSettings) -> None:
        """Retune the landmark motion's One Euro filter live (its state is kept: motion stays continuous)."""
        self._filters["motion"].retune(settings)

    def close(self) -> None:
        """Release mediapipe."""
        self.landmarker.close()

    def __enter__(self) -> MeshTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
