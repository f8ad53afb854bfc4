"""Fit FLAME to mediapipe landmarks, producing GAGAvatar tracker records (SPEC section 8).

Head pose lives in the camera, as in GAGAvatar_track: the global FLAME rotation stays 0 and the fit
solves [R | T] for focal 12 on the 512 head crop. Identity (shape) is estimated once from the first
batch of frames and then held; expression, jaw, eyes and camera are solved per frame with a few Adam
steps warm-started from the previous frame. Adam rather than Gauss-Newton: it needs no Jacobian code
and a handful of steps suffices from a warm start.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gaga_ros.config import CAMERA_DISTANCE, CROP_SIZE, FOCAL, MESH_LANDMARKS
from gaga_ros.faces.flame import Flame, rodrigues
from gaga_ros.faces.flame_assets import FlameAssets

#: mediapipe FaceMesh indices nearest the 68 iBUG points (contour, brows, nose, eyes, mouth), a widely
#: used approximate correspondence; then the right and left iris centres for FLAME's two eye landmarks.
MEDIAPIPE_TO_IBUG68 = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87,
)
MEDIAPIPE_IRIS_CENTRES = (468, 473)
#: Frontal camera rotation (GAGAvatar convention, row-vector): camera +X is the subject's right.
_FRONTAL = torch.tensor([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])


class FitInputError(ValueError):
    """Landmarks of the wrong shape; the message says what is accepted."""


@dataclass
class MediapipeEmbedding:
    """FLAME's own mediapipe correspondence (mediapipe_landmark_embedding.npz from the FLAME release)."""

    faces: np.ndarray          # (L,) FLAME face per landmark
    bary: np.ndarray           # (L, 3)
    mediapipe_index: np.ndarray  # (L,) which of the 478 mediapipe landmarks

    @classmethod
    def load(cls, path: str | Path) -> MediapipeEmbedding:
        """Read lmk_face_idx, lmk_b_coords and landmark_indices from the .npz."""
        with np.load(path, allow_pickle=False) as npz:
            missing = {"lmk_face_idx", "lmk_b_coords", "landmark_indices"} - set(npz.files)
            if missing:
                raise FitInputError(f"{path}: missing {sorted(missing)}; expected FLAME's "
                                    "mediapipe_landmark_embedding.npz")
            return cls(npz["lmk_face_idx"].astype(np.int64), npz["lmk_b_coords"].astype(np.float32),
                       npz["landmark_indices"].astype(np.int64))


@dataclass
class FlameFit:
    """One frame in GAGAvatar's tracker convention, plus the fit's landmark error in crop pixels."""

    shapecode: np.ndarray         # (300,)
    expcode: np.ndarray           # (100,)
    posecode: np.ndarray          # (6,) [0, 0, 0, jaw]
    eyecode: np.ndarray           # (6,)
    transform_matrix: np.ndarray  # (3, 4)
    landmark_error_px: float


def landmark_submodel(assets: FlameAssets, extra_faces: np.ndarray | None = None, n_shape: int = 300,
                      n_exp: int = 100) -> Flame:
    """FLAME reduced to the landmark triangles' vertices, exact for landmarks and ~50x cheaper.

    Joints depend on all vertices, but linearly: J = J_reg v_template + (J_reg shapedirs) beta, so they
    are carried as 5 extra "vertices" whose template and blend shapes are those products.
    """
    lmk = assets.landmarks
    groups = [] if lmk is None else [lmk.static_faces, lmk.dynamic_faces.ravel(), lmk.full_faces]
    if extra_faces is not None:
        groups.append(extra_faces)
    used = np.unique(assets.faces[np.concatenate(groups)])
    remap = np.full(assets.v_template.shape[0], -1, np.int64)
    remap[used] = np.arange(used.size)
    n, j = used.size, assets.j_regressor.shape[0]
    joint_template = assets.j_regressor @ assets.v_template
    joint_dirs = np.einsum("jv,vcl->jcl", assets.j_regressor, assets.shapedirs)
    weights = np.concatenate([assets.lbs_weights[used], np.eye(j, dtype=np.float32)])
    reduced = replace(
        assets, faces=np.where(remap[assets.faces] < 0, 0, remap[assets.faces]),
        v_template=np.concatenate([assets.v_template[used], joint_template]),
        shapedirs=np.concatenate([assets.shapedirs[used], joint_dirs]),
        posedirs=np.concatenate([assets.posedirs[used],
                                 np.zeros((j, *assets.posedirs.shape[1:]), np.float32)]),
        j_regressor=np.concatenate([np.zeros((j, n), np.float32), np.eye(j, dtype=np.float32)], 1),
        lbs_weights=weights, source=f"{assets.source} (landmark vertices)")
    return Flame(reduced, n_shape=n_shape, n_exp=n_exp)


def project(points: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """GAGAvatar camera projection to crop pixels: (B,L,3) world -> (B,L,2), u right, v down."""
    cam = points @ rotation + translation[:, None]
    pixel_focal = FOCAL * CROP_SIZE / 2
    centre = (CROP_SIZE - 1) / 2
    return torch.stack([centre - pixel_focal * cam[..., 0] / cam[..., 2],
                        centre - pixel_focal * cam[..., 1] / cam[..., 2]], dim=-1)


class FlameFitter:
    """Landmarks of a 512 head crop (B, 478, 2+) -> FlameFit per frame; keeps identity and warm start."""

    def __init__(self, assets: FlameAssets, embedding: MediapipeEmbedding | None = None, n_exp: int = 50,
                 steps: int = 30, identity_steps: int = 300, lr: float = 0.02, device: str = "cpu") -> None:
        if assets.landmarks is None and embedding is None:
            raise FitInputError("the FLAME model has no landmark embeddings and no mediapipe embedding "
                                "was given: use FLAME_with_eye.pt or pass mediapipe_landmark_embedding.npz")
        flame = landmark_submodel(assets, None if embedding is None else embedding.faces).to(device)
        self.flame = flame
        self.embedding = embedding
        self.n_exp = min(n_exp, flame.n_exp)
        self.steps, self.identity_steps, self.lr = steps, identity_steps, lr
        if embedding is None:
            with_eyes = flame.lmk_full_faces.shape[0] == 70
            index = MEDIAPIPE_TO_IBUG68 + (MEDIAPIPE_IRIS_CENTRES if with_eyes else ())
            self.mediapipe_index = torch.tensor(index)
        else:
            self.mediapipe_index = torch.from_numpy(embedding.mediapipe_index)
        self.reset()

    def reset(self) -> None:
        """Forget identity and warm start (a new person)."""
        self.shape: torch.Tensor | None = None
        self._last: dict[str, torch.Tensor] | None = None

    def _model_landmarks(self, verts: torch.Tensor, head_rot: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            faces = torch.from_numpy(self.embedding.faces).to(verts.device)
            bary = torch.from_numpy(self.embedding.bary).to(verts.device)
            return self.flame._interpolate(verts, faces, bary)
        ibug = self.flame.landmarks(verts, "ibug68", global_pose=head_rot.detach())
        if self.mediapipe_index.shape[0] == 70:
            ibug = torch.cat([ibug, self.flame.landmarks(verts, "full")[:, 68:]], dim=1)
        return ibug

    def _solve(self, target: torch.Tensor, params: dict[str, torch.Tensor], steps: int,
               fit_shape: bool) -> torch.Tensor:
        names = [n for n in params if fit_shape or n != "shape"]
        for n in names:
            params[n].requires_grad_(True)
        optim = torch.optim.Adam([params[n] for n in names], lr=self.lr)
        prev = {k: v.detach().clone() for k, v in params.items()}
        for _ in range(steps):
            optim.zero_grad()
            pred = self._predict(params)
            err = (pred - target).pow(2).sum(-1).mean()  # squared crop pixels
            reg = (1e-4 * params["expression"].pow(2).sum() + 1e-4 * params["shape"].pow(2).sum()
                   + 1e-3 * params["eyes"].pow(2).sum() + 1e-3 * params["jaw"].pow(2).sum())
            if not fit_shape:   # stay near the warm start: steadier on a still face
                reg = reg + 1e-4 * sum((params[n] - prev[n]).pow(2).sum() for n in ("expression", "jaw"))
            (err + reg / target.shape[0]).backward()
            optim.step()
        for n in names:
            params[n].requires_grad_(False)
        return (self._predict(params) - target).norm(dim=-1).mean(dim=1)

    def _predict(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = p["expression"].shape[0]
        verts = self.flame(shape=p["shape"].expand(batch, -1), expression=p["expression"],
                           jaw_pose=p["jaw"], eye_pose=p["eyes"])
        rotation = self._rotation(p["head"])
        return project(self._model_landmarks(verts, p["head"]), rotation, p["translation"])

    @staticmethod
    def _rotation(head: torch.Tensor) -> torch.Tensor:
        """Camera rotation for a head rotated by `head` (axis-angle): x_cam = (R_h x) R0 = x R_h^T R0."""
        return rodrigues(head).transpose(1, 2) @ _FRONTAL.to(head)

    def fit(self, landmarks: np.ndarray) -> list[FlameFit]:
        """Fit a batch of consecutive frames; the first call also fixes the identity."""
        points = np.asarray(landmarks, dtype=np.float32)
        if points.ndim == 2:
            points = points[None]
        if points.ndim != 3 or points.shape[1] != MESH_LANDMARKS or points.shape[2] < 2:
            raise FitInputError(f"landmarks have shape {points.shape}: accepted is "
                                f"(B, {MESH_LANDMARKS}, 2 or 3) mediapipe pixels on the "
                                f"{CROP_SIZE}x{CROP_SIZE} head crop")
        device = self.flame.v_template.device
        target = torch.from_numpy(points[:, :, :2]).to(device)[:, self.mediapipe_index.to(device)]
        batch = target.shape[0]
        first = self.shape is None
        if first:
            self.shape = torch.zeros(1, self.flame.n_shape, device=device)
        start = self._last or {
            "expression": torch.zeros(1, self.n_exp, device=device), "jaw": torch.zeros(1, 3, device=device),
            "eyes": torch.zeros(1, 6, device=device), "head": torch.zeros(1, 3, device=device),
            "translation": torch.tensor([[0.0, 0.0, CAMERA_DISTANCE]], device=device)}
        params = {k: v.expand(batch, -1).clone() for k, v in start.items()}
        params["shape"] = self.shape.clone()
        if first:
            # the per-frame parameters first, then identity with them
            self._solve(target, params, self.identity_steps // 3, fit_shape=False)
            error = self._solve(target, params, self.identity_steps, fit_shape=True)
            self.shape = params["shape"].detach()
        else:
            error = self._solve(target, params, self.steps, fit_shape=False)
        self._last = {k: v[-1:].detach().clone() for k, v in params.items() if k != "shape"}
        return [self._record(params, i, float(error[i])) for i in range(batch)]

    def _record(self, p: dict[str, torch.Tensor], i: int, error: float) -> FlameFit:
        rotation = self._rotation(p["head"][i:i + 1])[0]
        transform = torch.cat([rotation, p["translation"][i][:, None]], dim=1)
        expcode = np.zeros(100, np.float32)
        expcode[:self.n_exp] = p["expression"][i].cpu().numpy()
        shapecode = np.zeros(300, np.float32)
        shapecode[:self.flame.n_shape] = self.shape[0].cpu().numpy()
        return FlameFit(shapecode=shapecode, expcode=expcode,
                        posecode=np.concatenate([np.zeros(3, np.float32), p["jaw"][i].cpu().numpy()]),
                        eyecode=p["eyes"][i].cpu().numpy().astype(np.float32),
                        transform_matrix=transform.cpu().numpy().astype(np.float32),
                        landmark_error_px=error)
