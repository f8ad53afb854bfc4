"""MESH <-> FLAME expressions, so every driver drives every avatar backend.

The two face models meet through a registration, built once per FLAME model: FLAME's identity and
camera are fitted to the canonical mediapipe face (a few views of it), then each of the 478 canonical
landmarks is embedded on the fitted FLAME surface (a face index and barycentric coordinates, the
`MediapipeEmbedding` form; FLAME's own mediapipe embedding wins where it is given) with the residual
kept as a constant offset in the canonical frame. Both directions use the same embedding and
offsets, so they invert each other wherever FLAME can represent the mesh's motion:

- MESH -> FLAME projects the offset-corrected landmarks through the frontal camera onto the 512
  head crop and fits FLAME expression, jaw and eyes with the FLAME tracker's solver (`FlameFitter`,
  identity and camera held), warm-started from the previous frame. The camera is not fitted: the
  mesh's camera is known, and the FLAME camera is it composed with the registration, so no
  expression motion can leak into head motion, and a turned head does not change the fit.
- FLAME -> MESH evaluates FLAME at the embedded landmarks only, maps them into the canonical frame
  and re-expresses the FLAME camera for that frame.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gaga_ros.camera import frontal_transform, project_points
from gaga_ros.conventions import MESH_LANDMARKS
from gaga_ros.expression import MAX_COEFF, Expression, ExpressionError, FaceModel
from gaga_ros.faces.flame import Flame
from gaga_ros.faces.flame_assets import FlameAssets, load_flame_assets
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, FACE_LANDMARKS, REGIONS
from gaga_ros.tracking.flame_fitter import FlameFitter, MediapipeEmbedding, landmark_submodel

#: Views of the canonical face the identity is fitted over, (yaw, pitch) in degrees: one view
#: leaves shape and head rotation entangled (a deeper nose reads like pitch), turned views part them.
REGISTRATION_VIEWS = ((0, 0), (25, 0), (-25, 0), (0, 15), (0, -15))
#: Landmarks the MESH -> FLAME fit uses: those of the named regions (lips, eyes, irises, brows, nose,
#: jaw, lower face, face oval). The cheeks' and forehead's interior points more than double the cost
#: per frame and add little: expressions move the regions. FLAME -> MESH still gives all 478.
FIT_LANDMARKS = np.unique(np.concatenate(list(REGIONS.values()))).astype(np.int64)
#: FLAME joints of the eyeballs (left, right): iris landmarks are embedded on these.
_EYE_JOINTS = (3, 4)
#: Canonical landmarks of the two irises (mediapipe's refined points after the 468 face ones).
_IRIS = np.arange(FACE_LANDMARKS, MESH_LANDMARKS)


@dataclass(frozen=True)
class Registration:
    """The canonical mediapipe face on one FLAME model.

    A FLAME point p maps to the canonical frame as p rotation + translation; a canonical landmark i is
    the embedded FLAME point plus offset[i]. shape is the FLAME identity of the canonical face.
    """

    shape: np.ndarray            # (n_shape,) float32
    embedding: MediapipeEmbedding  # 478 rows, mediapipe_index = 0..477
    offset: np.ndarray           # (478, 3) float32, canonical frame
    rotation: np.ndarray         # (3, 3) float64
    translation: np.ndarray      # (3,) float64
    fit_error_px: float          # mean landmark error of the identity fit, crop pixels


def project(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Points (N, 3) through a GAGAvatar camera [R | T] to 512 crop pixels (N, 2), as the fitter sees."""
    cam = torch.as_tensor(np.asarray(transform, np.float64).reshape(3, 4))
    world = torch.as_tensor(np.asarray(points, np.float64))[None]
    return project_points(world, cam[:, :3], cam[None, :, 3])[0].numpy()


def _turn(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Head rotation (row-vector convention, x' = x D) by yaw about +y then pitch about +x."""
    y, p = np.radians(yaw_deg), np.radians(pitch_deg)
    yaw = np.array([[np.cos(y), 0, -np.sin(y)], [0, 1, 0], [np.sin(y), 0, np.cos(y)]])
    pitch = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])
    return yaw @ pitch


def register(assets: FlameAssets, embedding: MediapipeEmbedding | None = None) -> Registration:
    """Fit FLAME to the canonical face and embed its 478 landmarks on the fitted surface (~1 s)."""
    front = frontal_transform().astype(np.float64)
    views = [np.column_stack([_turn(*v) @ front[:, :3], front[:, 3]]) for v in REGISTRATION_VIEWS]
    pixels = np.stack([project(CANONICAL_VERTICES, v) for v in views])
    fitter = FlameFitter(assets, embedding, identity_frames=len(views))
    fits = fitter.fit(pixels)
    fit = fits[0]  # the frontal view
    shape = fit.shapecode[:fitter.flame.n_shape].astype(np.float32)
    # x_cam = p R_f + T_f = (p A + b) R_front + T_front, so A = R_f R_front^T, b = (T_f - T_front) R_front^T
    rotation = fit.transform_matrix[:, :3].astype(np.float64) @ front[:, :3].T
    translation = (fit.transform_matrix[:, 3] - front[:, 3]) @ front[:, :3].T
    flame = Flame(assets)
    with torch.no_grad():
        neutral = flame(shape=torch.from_numpy(shape)[None])[0].double().numpy()
    neutral = neutral @ rotation + translation
    faces, bary = _embed_nearest(neutral, assets)
    if embedding is not None:  # FLAME's own correspondence where it has one
        faces[embedding.mediapipe_index], bary[embedding.mediapipe_index] = embedding.faces, embedding.bary
    dense = MediapipeEmbedding(faces, bary.astype(np.float32), np.arange(MESH_LANDMARKS))
    on_surface = np.einsum("lkc,lk->lc", neutral[assets.faces[faces]], bary)
    offset = (CANONICAL_VERTICES - on_surface).astype(np.float32)
    return Registration(shape, dense, offset, rotation, translation,
                        float(np.mean([f.landmark_error_px for f in fits])))


def _embed_nearest(vertices: np.ndarray, assets: FlameAssets) -> tuple[np.ndarray, np.ndarray]:
    """Per canonical landmark: the FLAME triangle with the nearest centroid (the head's for face
    landmarks, the eyeball's on the same side for iris ones) and the barycentric coordinates of the
    landmark's projection onto its plane, clamped into the triangle. Exactness does not matter:
    the offset keeps whatever the surface point misses."""
    from scipy.spatial import cKDTree

    joint = assets.lbs_weights.argmax(1)[assets.faces]            # (F, 3) dominant joint per corner
    on_eye = [np.flatnonzero((joint == j).all(1)) for j in _EYE_JOINTS]
    head = np.flatnonzero(~np.isin(joint, _EYE_JOINTS).any(1))
    centroids = vertices[assets.faces].mean(1)
    faces = np.zeros(MESH_LANDMARKS, np.int64)
    face_rows = np.setdiff1d(np.arange(MESH_LANDMARKS), _IRIS)
    groups = [(face_rows, head)]
    if all(len(e) for e in on_eye):  # FLAME with eyes: irises on the eyeball of their side (+x: left)
        left = CANONICAL_VERTICES[_IRIS, 0] > 0
        groups += [(_IRIS[left], on_eye[0]), (_IRIS[~left], on_eye[1])]
    else:
        groups[0] = (np.arange(MESH_LANDMARKS), head)
    for rows, candidates in groups:
        faces[rows] = candidates[cKDTree(centroids[candidates]).query(CANONICAL_VERTICES[rows])[1]]
    a, b, c = (vertices[assets.faces[faces, k]] for k in range(3))
    e1, e2, d = b - a, c - a, CANONICAL_VERTICES - a
    g11, g12, g22 = (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)
    r1, r2 = (d * e1).sum(1), (d * e2).sum(1)
    det = np.maximum(g11 * g22 - g12 * g12, 1e-18)
    w1, w2 = (g22 * r1 - g12 * r2) / det, (g11 * r2 - g12 * r1) / det
    bary = np.clip(np.stack([1 - w1 - w2, w1, w2], 1), 0, None)
    return faces, bary / bary.sum(1, keepdims=True)


class FaceConverter:
    """Both directions for one FLAME model. MESH -> FLAME keeps a warm start, so one converter
    serves one expression stream (a jump between streams only costs a colder first frame).

    steps: the most Levenberg-Marquardt iterations per frame; n_exp: FLAME expression coefficients
    fitted (the FLAME tracker's 50).
    """

    def __init__(self, assets: FlameAssets, embedding: MediapipeEmbedding | None = None,
                 steps: int = 3, n_exp: int = 50) -> None:
        self.registration = reg = register(assets, embedding)
        dense = reg.embedding
        fitted = MediapipeEmbedding(dense.faces[FIT_LANDMARKS], dense.bary[FIT_LANDMARKS], FIT_LANDMARKS)
        self.fitter = FlameFitter(assets, fitted, n_exp=n_exp, steps=steps)
        self.fitter.hold_identity(reg.shape)
        self._front = frontal_transform().astype(np.float64)
        self.fitter.hold_camera(self._flame_camera(self._front))
        self._landmarks = landmark_submodel(assets, reg.embedding.faces)
        self._corners = self._landmarks.faces[torch.from_numpy(reg.embedding.faces)]
        self._bary = torch.from_numpy(reg.embedding.bary)
        self._shape = torch.from_numpy(reg.shape)[None]
        #: mean landmark error of the latest MESH -> FLAME fit, 512 crop pixels
        self.last_error_px = 0.0

    @classmethod
    def from_models(cls, models_dir: str | Path | None = None, **kwargs) -> FaceConverter:
        """The converter for the FLAME model in the models folder; FileNotFoundError says how to get it."""
        from gaga_ros.assets import find_assets

        status = find_assets(models_dir)
        if status.flame is None:
            raise FileNotFoundError(
                "converting between MESH and FLAME expressions needs a FLAME model, missing: "
                f"{status.explain()}")
        embedding = MediapipeEmbedding.load(status.mediapipe_embedding) if status.mediapipe_embedding \
            else None
        return cls(load_flame_assets(status.flame, status.flame_landmarks), embedding, **kwargs)

    def reset(self) -> None:
        """Forget the warm start (a new stream)."""
        self.fitter.hold_identity(self.registration.shape)

    def to_flame(self, expression: Expression) -> Expression:
        """A MESH-mode expression as FLAME expression, jaw, eyes and camera (FLAME-mode as is)."""
        if expression.face_model is FaceModel.FLAME:
            return expression
        pixels = project(expression.vertices - self.registration.offset, self._front)
        fit = self.fitter.fit(pixels)[0]
        self.last_error_px = fit.landmark_error_px
        transform = self._flame_camera(expression.transform).astype(np.float32)
        return replace(expression, face_model=FaceModel.FLAME, transform=transform,
                       expression=np.clip(fit.expcode[:self.fitter.n_exp], -MAX_COEFF, MAX_COEFF),
                       jaw_pose=fit.posecode[3:],
                       neck_pose=np.zeros(3, np.float32), eye_pose=fit.eyecode, vertices=None)

    def _flame_camera(self, transform: np.ndarray) -> np.ndarray:
        """The FLAME camera of a canonical-frame camera [R | T]: x_cam = (p A + b) R + T."""
        reg, cam = self.registration, np.asarray(transform, np.float64).reshape(3, 4)
        return np.column_stack([reg.rotation @ cam[:, :3], reg.translation @ cam[:, :3] + cam[:, 3]])

    def to_mesh(self, expression: Expression) -> Expression:
        """A FLAME-mode expression as the 478 canonical landmarks and the camera of the canonical
        frame (MESH-mode as is)."""
        if expression.face_model is FaceModel.MESH:
            return expression
        reg = self.registration
        t = lambda a: torch.as_tensor(np.asarray(a, np.float32))[None]  # noqa: E731
        with torch.no_grad():
            vertices = self._landmarks(shape=self._shape,
                                       expression=t(expression.expression_padded(self._landmarks.n_exp)),
                                       jaw_pose=t(expression.jaw_pose), neck_pose=t(expression.neck_pose),
                                       eye_pose=t(expression.eye_pose))[0]
            points = torch.einsum("lkc,lk->lc", vertices[self._corners], self._bary).double().numpy()
        canonical = points @ reg.rotation + reg.translation + reg.offset
        # x_cam = p R_f + T_f with p = (x - b) A^T: the canonical camera is [A^T R_f | T_f - b A^T R_f]
        flame_cam = np.asarray(expression.transform, np.float64)
        rotation = reg.rotation.T @ flame_cam[:, :3]
        transform = np.column_stack([rotation, flame_cam[:, 3] - reg.translation @ rotation])
        try:
            return replace(expression, face_model=FaceModel.MESH, transform=transform.astype(np.float32),
                           vertices=canonical.astype(np.float32))
        except ExpressionError as exc:
            raise ExpressionError(f"this FLAME expression has no mesh equivalent: {exc}") from None
