"""Fit FLAME to mediapipe landmarks, producing GAGAvatar tracker records (docs/flame.md).

Head pose lives in the camera, as in GAGAvatar_track: the global FLAME rotation stays 0 and the fit
solves [R | T] for focal 12 on the 512 head crop. Identity (shape) is estimated jointly over the first
frames and then held; expression, jaw, eyes and camera are solved per frame by a few
Levenberg-Marquardt iterations warm-started from the previous frame.

Why LM with a hand-written Jacobian: with global and neck pose at 0, every landmark is a barycentric
mix of three vertices skinned only by the jaw and eye joints, and shape and expression enter linearly
before skinning. The Jacobian of the ~140 pixel residuals in the ~65 per-frame parameters is then a
few small tensor products (no autograd graph, ~1 ms on one CPU core), and Gauss-Newton converges in
2-3 iterations from a warm start where a first-order optimiser needs tens of steps.

The jaw-line landmarks are FLAME's frontal contour, fixed on the mesh, not the yaw-dependent dynamic
contour: mediapipe's points are fixed mesh vertices too (they do not slide to the silhouette as a 2D
iBUG detector's do), and switching contour rows by whole degrees of yaw made the cost jump, which
trapped the solver at bin edges.

Priors are MAP-style, in units of squared crop pixels: a landmark residual of 1 px costs as much as
one standard deviation of a parameter's prior. Head rotation is only defined if shape and expression
cannot imitate it: a deformation that turns, shifts, scales or depth-shears the landmark set as a
whole projects like a head motion, and the synthetic model's random bases carry ~6 degrees of it (the
~9 degree error of the earlier fit). Such components are held near zero (GAUGE_SIGMA_PX).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gaga_ros.camera import frontal_transform, pixel_focal, principal_point
from gaga_ros.conventions import CAMERA_DISTANCE, CROP_SIZE, MESH_LANDMARKS
from gaga_ros.errors import InputError
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
_FRONTAL = torch.from_numpy(np.ascontiguousarray(frontal_transform()[:, :3]))
#: The crop camera in pixels (gaga_ros.camera): focal and principal point of the 512 head crop.
_PIXEL_FOCAL, _CENTRE = pixel_focal(CROP_SIZE), principal_point(CROP_SIZE)


class FitInputError(InputError):
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


#: Prior standard deviations (MAP weights are 1 / sigma^2 against 1 px landmark residuals). Shape and
#: expression coefficients are unit-variance by construction of FLAME's bases; jaw and eyes in radians.
SHAPE_SIGMA, EXPRESSION_SIGMA, JAW_SIGMA, EYE_SIGMA = 1.0, 1.0, 0.15, 0.25
#: Shape and expression may not move the landmark set rigidly (rotate, shift or scale it as a whole):
#: the RMS landmark displacement of such a component is held to about this many crop pixels. FLAME's
#: bases come from Procrustes-aligned scans and barely do so anyway; random bases (the synthetic model)
#: do, by ~6 degrees for a 0.5-sigma shape, which is then indistinguishable from head rotation.
GAUGE_SIGMA_PX = 0.1
#: Pull toward the previous frame (sigma of the frame-to-frame change): small changes are free, so the
#: fit follows motion, while noise along weakly observed directions no longer makes the fit wander.
TEMPORAL_SIGMA = {"expression": 0.5, "jaw": 0.05, "eyes": 0.1, "head": 0.05, "translation": 0.2}
#: Levenberg-Marquardt damping, relative to the normal matrix's diagonal: its start in the per-frame
#: and in the identity solve, the factor it shrinks by after a step that lowered the cost and grows by
#: after one that did not, and the floor added to the diagonal so that a parameter no residual reaches
#: leaves the system solvable.
LM_DAMPING_FRAMES, LM_DAMPING_IDENTITY = 1e-3, 1e-2
LM_SHRINK, LM_GROW, LM_DIAGONAL_FLOOR = 3.0, 4.0, 1e-9
#: Relative cost decrease of an accepted step under which a fit counts as converged.
LM_CONVERGED_GAIN = 1e-4
#: LM iterations of a cold start: first the camera alone, then every per-frame parameter.
COLD_STEPS = 5
#: Per-frame parameters in the order of the solver's vector; eyes are [left, right] axis-angle.
_BLOCKS = (("jaw", 3), ("eyes", 6), ("head", 3), ("translation", 3))


def rotation_derivative(rotvec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAME's rotations (N,3,3) and their derivatives (N,3,3,3) by each axis-angle component.

    The closed form of Gallego and Yezzi (J. Math. Imaging Vis., 2015); near zero it is [e_i]x.
    """
    rot = rodrigues(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    sq = (rotvec * rotvec).sum(-1)                                        # (N,)
    small = sq < 1e-10
    cross_rows = torch.cross(rotvec[:, None, :].expand(-1, 3, -1),
                             (eye - rot).transpose(1, 2), dim=-1)  # row i: theta x (I-R) e_i
    numer = (rotvec[:, :, None, None] * _skew(rotvec)[:, None]
             + _skew(cross_rows.reshape(-1, 3)).view(-1, 3, 3, 3))
    deriv = numer / torch.where(small, torch.ones_like(sq), sq)[:, None, None, None] @ rot[:, None]
    generators = _skew(eye).expand(rotvec.shape[0], -1, -1, -1)
    return rot, torch.where(small[:, None, None, None], generators, deriv)


def _skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices (N,3,3) of vectors (N,3)."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).view(*v.shape[:-1], 3, 3)


class FlameFitter:
    """Landmarks of a 512 head crop (B, 478, 2+) -> FlameFit per frame; keeps identity and warm start.

    Identity: the first call estimates it from its own frames (so a single photo gets a shape); once
    `identity_frames` frames have been seen it is re-estimated jointly over all of them and then held.
    One view leaves shape and head rotation entangled (a deeper nose reads like pitch); several views
    of a moving head separate them. n_shape: the leading shape components fitted (fewer is faster,
    but shape left out of the fit ends up in pose). steps: the most LM iterations per frame (it stops
    earlier once the fit stops improving); identity_steps: LM iterations of each identity estimate.
    """

    def __init__(self, assets: FlameAssets, embedding: MediapipeEmbedding | None = None, n_exp: int = 50,
                 steps: int = 3, identity_steps: int = 30, identity_frames: int = 8, n_shape: int = 300,
                 device: str = "cpu") -> None:
        if assets.landmarks is None and embedding is None:
            raise FitInputError("the FLAME model has no landmark embeddings and no mediapipe embedding "
                                "was given: use FLAME_with_eye.pt or pass mediapipe_landmark_embedding.npz")
        if min(steps, identity_steps, identity_frames) < 1:
            raise FitInputError(f"steps={steps}, identity_steps={identity_steps}, identity_frames="
                                f"{identity_frames}: accepted are integers >= 1")
        # float64: the tensors are tiny, so it costs nothing on CPU and spares casts around the solves
        flame = landmark_submodel(assets, None if embedding is None else embedding.faces, n_shape=n_shape)
        flame = flame.to(device=device, dtype=torch.float64)
        self.flame = flame
        self.embedding = embedding
        self.n_exp = min(n_exp, flame.n_exp)
        self.steps, self.identity_steps, self.identity_frames = steps, identity_steps, identity_frames
        if embedding is None:
            with_eyes = flame.lmk_full_faces.shape[0] == 70
            index = MEDIAPIPE_TO_IBUG68 + (MEDIAPIPE_IRIS_CENTRES if with_eyes else ())
            self.mediapipe_index = torch.tensor(index)
        else:
            self.mediapipe_index = torch.from_numpy(embedding.mediapipe_index)
        self._build_tables()
        dev: dict[str, Any] = {"device": flame.v_template.device, "dtype": flame.v_template.dtype}
        sizes = [self.n_exp] + [w for _, w in _BLOCKS]
        sigmas = [EXPRESSION_SIGMA, JAW_SIGMA, EYE_SIGMA, float("inf"), float("inf")]
        prior = torch.cat([torch.full((k,), s ** -2, **dev) for k, s in zip(sizes, sigmas, strict=True)])
        # with the camera held no expression can pass for head motion: the gauge term is then lifted
        self._plain_prior = torch.diag(prior)
        self._gauged_prior = self._plain_prior.clone()
        self._gauged_prior[:self.n_exp, :self.n_exp] += self._gauge(self._lmk_lin[:, 0, :, :self.n_exp])
        self._prior = self._gauged_prior
        self._shape_prior = (torch.eye(flame.n_shape, **dev) * SHAPE_SIGMA ** -2
                             + self._gauge(self._lmk_shape[:, 0]))
        names = ["expression"] + [name for name, _ in _BLOCKS]
        self._temporal = torch.cat([torch.full((k,), TEMPORAL_SIGMA[name] ** -2, **dev)
                                    for k, name in zip(sizes, names, strict=True)])
        self._frontal = _FRONTAL.to(**dev)
        self._camera: torch.Tensor | None = None  # head rotation and translation, when held
        self.reset()

    def _build_tables(self) -> None:
        """Collapse each possible landmark's three skinned corners into per-landmark linear tables.

        With root and neck unrotated, a landmark is p = G0 + sum_j (R_j - I)(G_j - s_j J_j) over the jaw
        and eye joints j, where G0 is the barycentric mix of the corners' pose-corrected rest positions,
        G_j the same mix weighted by each corner's skinning weight of joint j, and s_j the mix of those
        weights. G0 and G_j are linear in shape, expression and the pose feature vec(R - I), so a table
        row per landmark (4 channels x 3 coordinates) holds their coefficients.
        """
        f = self.flame
        if self.embedding is not None:
            faces = torch.from_numpy(self.embedding.faces).to(f.faces.device)
            bary = torch.from_numpy(self.embedding.bary).to(f.v_template)
        else:
            eyes = slice(68, 70 if self.mediapipe_index.shape[0] == 70 else 68)
            faces = torch.cat([f.lmk_dynamic_faces[0], f.lmk_static_faces, f.lmk_full_faces[eyes]])
            bary = torch.cat([f.lmk_dynamic_bary[0], f.lmk_static_bary, f.lmk_full_bary[eyes]])
        corners = f.faces[faces]                                              # (N,3) vertices
        n_vert, joints, scale, ns = f.v_template.shape[0], [2, 3, 4], f.scale, f.n_shape
        weights = f.lbs_weights[:, joints]
        channel = bary[..., None] * torch.cat([torch.ones_like(weights[:, :1]), weights], 1)[corners]
        pose_dirs = f.posedirs.T.reshape(n_vert, 3, -1)[:, :, 9:]          # the neck's 9 stay unused

        def mix(per_vertex: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nkh,nkc...->nhc...", channel, per_vertex[corners]) * scale

        self._lmk_rest = mix(f.v_template)                                    # (N,4,3)
        self._lmk_shape = mix(f.shapedirs[:, :, :ns])                         # (N,4,3,S)
        self._lmk_lin = mix(torch.cat([f.shapedirs[:, :, ns:ns + self.n_exp], pose_dirs], 2))  # (N,4,3,E+27)
        self._lmk_skin = channel[:, :, 1:].sum(1)                             # (N,3)
        # the joint channels as one (joint x coordinate, landmark x coefficient) matrix for the Jacobian
        self._lin_joints = self._lmk_lin[:, 1:].permute(1, 2, 0, 3).reshape(9, -1)
        self._shape_joints = self._lmk_shape[:, 1:].permute(1, 2, 0, 3).reshape(9, -1)
        reg = f.j_regressor[joints]
        self._joint_rest = reg @ f.v_template * scale                         # (3,3)
        self._joint_shape = torch.einsum("jv,vcl->jcl", reg, f.shapedirs[:, :, :ns]) * scale
        self._joint_exp = torch.einsum("jv,vcl->jcl", reg, f.shapedirs[:, :, ns:ns + self.n_exp]) * scale

    def _gauge(self, dirs: torch.Tensor) -> torch.Tensor:
        """Quadratic penalty (K,K) on the rigid part of K blend shapes' landmark displacements (L,3,K).

        The rigid part is the least-squares small rotation, shift and scale of the rest landmarks that
        best matches a displacement, each measured as the RMS landmark motion it causes.
        """
        rest = self._lmk_rest[:, 0]
        centred = rest - rest.mean(0)
        eye = torch.eye(3, dtype=rest.dtype, device=rest.device)
        depth = centred[:, 2:] * eye[:2, None]                               # x or y shifted by depth
        axes = eye[:, None].expand(3, *rest.shape)
        modes = torch.cat([torch.cross(axes, centred.expand(3, -1, -1), dim=-1), axes, centred[None],
                           depth])                                            # (9,L,3)
        modes = modes.reshape(modes.shape[0], -1)
        modes = modes / modes.norm(dim=1, keepdim=True) * rest.shape[0] ** 0.5    # unit RMS per landmark
        rigid = torch.linalg.lstsq(modes.T, dirs.reshape(-1, dirs.shape[-1])).solution  # (7,K)
        px_per_unit = _PIXEL_FOCAL / CAMERA_DISTANCE
        return rigid.T @ rigid * (px_per_unit / GAUGE_SIGMA_PX) ** 2

    def reset(self) -> None:
        """Forget identity and warm start (a new person)."""
        self.shape: torch.Tensor | None = None
        self.identity_held = False
        self._last: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (target, fit) until identity is held

    def hold_camera(self, transform: np.ndarray | None) -> None:
        """Keep every frame's camera at a known [R | T] (3x4) instead of fitting it; None fits it again.

        For landmarks whose head pose is known, e.g. a MESH-mode expression's, so that no expression
        motion is mistaken for head motion."""
        if transform is None:
            self._camera, self._prior = None, self._gauged_prior
            return
        from scipy.spatial.transform import Rotation

        t = np.asarray(transform, np.float64).reshape(3, 4)
        head = Rotation.from_matrix(_FRONTAL.double().numpy() @ t[:, :3].T).as_rotvec()
        like = self._joint_shape
        self._camera = torch.tensor(np.r_[head, t[:, 3]], dtype=like.dtype, device=like.device)
        self._prior = self._plain_prior

    def hold_identity(self, shapecode: np.ndarray) -> None:
        """Fit only per-frame parameters from now on, for a known identity (its leading n_shape
        coefficients); the next frame starts cold."""
        like = self._joint_shape
        shape = torch.zeros(self.flame.n_shape, dtype=like.dtype, device=like.device)
        known = torch.as_tensor(np.asarray(shapecode, np.float64)[:self.flame.n_shape])
        shape[:known.shape[0]] = known.to(shape)
        self._hold_identity(shape)
        self.identity_held, self._last, self._seen = True, None, []

    def _hold_identity(self, shape: torch.Tensor) -> None:
        """Fix the identity and fold it into the tables used per frame."""
        self.shape = shape[None]
        self._shapecode = np.zeros(300, np.float32)  # the records' copy, on the host once per identity
        self._shapecode[:shape.shape[0]] = shape.cpu().numpy()
        self._lmk_base = self._lmk_rest + self._lmk_shape @ shape
        self._joint_base = self._joint_rest + self._joint_shape @ shape

    @property
    def n_params(self) -> int:
        """Per-frame parameters: expression, jaw (3), eyes (6), head rotation (3), translation (3)."""
        return self.n_exp + 15

    # --- the model and its Jacobian ------------------------------------------------------------------

    def _through_joints(self, bend_rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """sum_j (R_j - I) G_j for joint-channel coefficients: (B,1,3,9) x (9, L*Q) -> (B,L,3,Q)."""
        batch, n_lmk = bend_rows.shape[0], self._lmk_rest.shape[0]
        out = bend_rows.reshape(batch * 3, 9) @ table
        return out.view(batch, 3, n_lmk, -1).transpose(1, 2)

    def _evaluate(self, x: torch.Tensor, target: torch.Tensor, shape: torch.Tensor | None,
                  jacobian: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Pixel residuals (B,2L) and, with jacobian, d residual / d x (B,2L,P).

        shape None uses the held identity; a shape tensor (identity fitting) also gives d / d shape.
        """
        batch, ne = x.shape[0], self.n_exp
        exp, jaw, eyes, head, trans = torch.split(x, [ne, 3, 6, 3, 3], dim=1)
        rot, drot = rotation_derivative(torch.cat([jaw, eyes, head], 1).reshape(-1, 3))
        rot, drot = rot.view(batch, 4, 3, 3), drot.view(batch, 4, 3, 3, 3)  # jaw, left, right eye, head
        bend = rot[:, :3] - torch.eye(3, dtype=x.dtype, device=x.device)
        n_lmk = self._lmk_rest.shape[0]
        if shape is None:
            base, joints = self._lmk_base, self._joint_base
        else:
            base = self._lmk_rest + self._lmk_shape @ shape
            joints = self._joint_rest + self._joint_shape @ shape
        coef = torch.cat([exp, bend.reshape(batch, 27)], 1)
        lin = self._lmk_lin.view(-1, coef.shape[1])
        chan = base + (lin @ coef.T).T.view(batch, n_lmk, 4, 3)              # (B,L,4,3)
        joints = joints + (self._joint_exp @ exp.T).permute(2, 0, 1)        # (B,3,3)
        skin = self._lmk_skin.expand(batch, -1, -1)                           # (B,L,3)
        arm = chan[:, :, 1:] - skin[..., None] * joints[:, None]              # (B,L,3,3)
        bend_rows = bend.permute(0, 2, 1, 3).reshape(batch, 1, 3, 9)          # [c, (j,d)]
        points = chan[:, :, 0] + (bend_rows @ arm.reshape(batch, n_lmk, 9, 1))[..., 0]
        cam_rot = rot[:, 3].transpose(1, 2) @ self._frontal
        cam = points @ cam_rot + trans[:, None]
        inv_z = 1 / cam[..., 2:]
        pred = _CENTRE - _PIXEL_FOCAL * cam[..., :2] * inv_z  # gaga_ros.camera.project_points
        residual = (pred - target).reshape(batch, -1)
        if not jacobian:
            return residual, None, None

        def to_pixels(d_cam: torch.Tensor) -> torch.Tensor:
            """d camera point (B,L,3,Q) -> d pixel (B,2L,Q): u = c - f X/Z, v = c - f Y/Z."""
            d = _PIXEL_FOCAL * inv_z[..., None] * (cam[..., :2, None] * inv_z[..., None] * d_cam[:, :, 2:]
                                                  - d_cam[:, :, :2])
            return d.reshape(batch, 2 * n_lmk, -1)

        normal = self._lmk_lin[:, 0] + self._through_joints(bend_rows, self._lin_joints)  # (B,L,3,Q)
        bent_exp = (bend @ self._joint_exp).reshape(batch, 3, -1)           # (B,j,3*E)
        d_exp = normal[..., :ne] - (skin @ bent_exp).view(batch, n_lmk, 3, ne)
        dfeat = drot[:, :3].reshape(batch, 3, 3, 9)                         # [j, m, vec(dR)]
        d_rot = (torch.einsum("blcjq,bjmq->blcjm", normal[..., ne:].reshape(batch, n_lmk, 3, 3, 9), dfeat)
                 + torch.einsum("bjmcd,bljd->blcjm", drot[:, :3], arm)).reshape(batch, n_lmk, 3, 9)
        to_cam = cam_rot.transpose(1, 2)[:, None]
        d_cam_rot = drot[:, 3].transpose(2, 3) @ self._frontal               # (B,m,3,3)
        d_head = (points[:, None] @ d_cam_rot).permute(0, 2, 3, 1)           # (B,L,3,m)
        d_trans = torch.eye(3, dtype=x.dtype, device=x.device).expand(batch, n_lmk, 3, 3)
        jac = to_pixels(torch.cat([to_cam @ torch.cat([d_exp, d_rot], -1), d_head, d_trans], -1))
        if shape is None:
            return residual, jac, None
        bent_shape = (bend @ self._joint_shape).reshape(batch, 3, -1)
        d_shape = (self._lmk_shape[:, 0] + self._through_joints(bend_rows, self._shape_joints)
                   - (skin @ bent_shape).view(batch, n_lmk, 3, -1))
        return residual, jac, to_pixels(to_cam @ d_shape)

    # --- solvers --------------------------------------------------------------------------------------

    def _cost(self, residual: torch.Tensor, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        cost = residual.pow(2).sum(-1) + ((x @ self._prior) * x).sum(-1)
        return cost if prev is None else cost + (self._temporal * (x - prev).pow(2)).sum(-1)

    def _solve_frames(self, x: torch.Tensor, target: torch.Tensor, prev: torch.Tensor | None, steps: int,
                      active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """LM on each frame's own parameters (identity fixed); returns (x, residual)."""
        temporal = torch.zeros_like(self._temporal) if prev is None else self._temporal
        anchor = x if prev is None else prev
        residual, jac, _ = self._evaluate(x, target, None, jacobian=True)
        assert jac is not None  # asked for: narrows the type
        cost = self._cost(residual, x, prev)
        damping = torch.full_like(cost, LM_DAMPING_FRAMES)
        keep = None if active is None else active.to(x)
        for it in range(steps):
            hess = jac.transpose(1, 2) @ jac + self._prior + torch.diag(temporal)
            grad = ((jac.transpose(1, 2) @ residual[..., None])[..., 0] + x @ self._prior
                    + temporal * (x - anchor))
            if keep is not None:  # frozen parameters: zero step
                hess = hess * (keep[:, None] * keep) + torch.diag(1 - keep)
                grad = grad * keep
            diag = torch.diagonal(hess, dim1=1, dim2=2)
            hess = hess + torch.diag_embed(damping[:, None] * diag + LM_DIAGONAL_FLOOR)
            cand = x - torch.linalg.solve(hess, grad)
            last = it == steps - 1
            cand_residual, cand_jac, _ = self._evaluate(cand, target, None, jacobian=not last)
            cand_cost = self._cost(cand_residual, cand, prev)
            better = cand_cost < cost
            gain = (cost - cand_cost) / cost.clamp(min=1e-12)
            x = torch.where(better[:, None], cand, x)
            residual = torch.where(better[:, None], cand_residual, residual)
            if cand_jac is not None:  # every step but the last
                jac = torch.where(better[:, None, None], cand_jac, jac)
            cost = torch.where(better, cand_cost, cost)
            damping = torch.where(better, damping / LM_SHRINK, damping * LM_GROW)
            if bool((better & (gain < LM_CONVERGED_GAIN)).all()):  # further steps would not move the fit
                break
        return x, residual

    def _solve_identity(self, x: torch.Tensor, target: torch.Tensor,
                        steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LM on the shared shape and every frame's parameters at once; returns (x, shape, residual).

        The normal equations are solved by eliminating each frame's block first (Schur complement),
        so a step costs one shape-sized solve however many frames there are.
        """
        assert self.shape is not None  # held (the mean shape at least) before any solve
        shape = self.shape[0].clone()

        def total(residual: torch.Tensor, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
            return self._cost(residual, x, None).sum() + shape @ self._shape_prior @ shape

        residual, jac, jac_shape = self._evaluate(x, target, shape, True)
        assert jac is not None and jac_shape is not None  # asked for: narrows the types
        cost, damping = total(residual, x, shape), LM_DAMPING_IDENTITY
        for _ in range(steps):
            js_t, jf_t = jac_shape.transpose(1, 2), jac.transpose(1, 2)
            h_ss = (js_t @ jac_shape).sum(0) + self._shape_prior
            h_ff = jf_t @ jac + self._prior                                   # (B,P,P)
            h_sf = js_t @ jac                                                 # (B,S,P)
            g_s = (js_t @ residual[..., None]).sum(0)[:, 0] + self._shape_prior @ shape
            g_f = (jf_t @ residual[..., None])[..., 0] + x @ self._prior
            h_ss = h_ss + torch.diag(damping * torch.diagonal(h_ss) + LM_DIAGONAL_FLOOR)
            h_ff = h_ff + torch.diag_embed(damping * torch.diagonal(h_ff, dim1=1, dim2=2)
                                           + LM_DIAGONAL_FLOOR)
            chol = torch.linalg.cholesky(h_ff)
            fs = torch.cholesky_solve(torch.cat([h_sf.transpose(1, 2), g_f[..., None]], 2), chol)
            schur = h_ss - (h_sf @ fs[..., :-1]).sum(0)
            d_shape = torch.linalg.solve(schur, -(g_s - (h_sf @ fs[..., -1:]).sum(0)[:, 0]))
            cand_shape = shape + d_shape
            cand = x - fs[..., -1] - (fs[..., :-1] @ d_shape[:, None])[..., 0]
            cand_residual, cand_jac, cand_jac_shape = self._evaluate(cand, target, cand_shape, True)
            assert cand_jac is not None and cand_jac_shape is not None
            cand_cost = total(cand_residual, cand, cand_shape)
            if cand_cost < cost:
                gain = float((cost - cand_cost) / cost)
                x, shape, residual, jac, jac_shape = cand, cand_shape, cand_residual, cand_jac, cand_jac_shape
                cost, damping = cand_cost, damping / LM_SHRINK
                if gain < LM_CONVERGED_GAIN:
                    break
            else:
                damping *= LM_GROW
        return x, shape, residual

    def _initial(self, target: torch.Tensor) -> torch.Tensor:
        """Neutral frontal parameters, the camera placed so the landmarks' centre and spread match."""
        x = torch.zeros(target.shape[0], self.n_params, dtype=target.dtype, device=target.device)
        x[:, -1] = CAMERA_DISTANCE
        residual, _, _ = self._evaluate(x, target, None, jacobian=False)
        pred = residual.view_as(target) + target
        spread = lambda p: (p - p.mean(1, keepdim=True)).norm(dim=-1).mean(1)  # noqa: E731
        z = CAMERA_DISTANCE * spread(pred) / spread(target).clamp(min=1.0)
        off = _CENTRE - torch.stack([target.mean(1), pred.mean(1)])  # (2,B,2) from centre
        x[:, -3:-1] = (off[0] * z[:, None] - off[1] * CAMERA_DISTANCE) / _PIXEL_FOCAL
        x[:, -1] = z
        return x

    # --- public -----------------------------------------------------------------------------------------

    def fit(self, landmarks: np.ndarray) -> list[FlameFit]:
        """Fit a batch of consecutive frames (the first calls also estimate the identity, see the class).

        Frames of one batch are solved in parallel, each warm-started from (and pulled toward) the
        last frame of the previous call.
        """
        points = np.asarray(landmarks, dtype=np.float32)
        if points.ndim == 2:
            points = points[None]
        if (points.ndim != 3 or points.shape[0] < 1 or points.shape[1] != MESH_LANDMARKS
                or points.shape[2] < 2 or not np.isfinite(points[:, :, :2]).all()):
            raise FitInputError(f"landmarks have shape {points.shape} (or non-finite values): accepted is "
                                f"finite (B, {MESH_LANDMARKS}, 2 or 3) mediapipe pixels on the "
                                f"{CROP_SIZE}x{CROP_SIZE} head crop, B >= 1")
        device = self._lmk_rest.device
        target = torch.from_numpy(points[:, :, :2]).to(device, torch.float64)
        target = target[:, self.mediapipe_index.to(device)]
        batch = target.shape[0]
        with torch.no_grad():
            rigid = torch.zeros(self.n_params, dtype=torch.bool, device=device)
            rigid[-6:] = True
            free = None if self._camera is None else ~rigid
            if self._last is None:
                # a cold start: camera alone, then all per-frame parameters, then identity too unless
                # it is held (the mean shape until then)
                if self.shape is None:
                    self._hold_identity(torch.zeros_like(self._joint_shape[0, 0]))
                x = self._initial(target)
                if self._camera is None:
                    x, _ = self._solve_frames(x, target, None, COLD_STEPS, active=rigid)
                else:
                    x[:, -6:] = self._camera
                x, residual = self._solve_frames(x, target, None, COLD_STEPS, active=free)
                if not self.identity_held:
                    x, shape, residual = self._solve_identity(x, target, self.identity_steps)
                    self._hold_identity(shape)
            else:
                prev = self._last.expand(batch, -1)
                x, residual = self._solve_frames(prev.clone(), target, prev, self.steps, active=free)
            if not self.identity_held:
                self._seen.append((target, x))
                if sum(t.shape[0] for t, _ in self._seen) >= self.identity_frames:
                    x, residual = self._final_identity(batch)
        self._last = x[-1:].clone()
        error = residual.view(batch, -1, 2).norm(dim=-1).mean(1)
        x_host, error_host = x.cpu(), error.tolist()  # one transfer for the whole batch
        return [self._record(x_host[i], error_host[i]) for i in range(batch)]

    def _final_identity(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-estimate identity over every frame seen so far, hold it; this call's frames refitted."""
        target = torch.cat([t for t, _ in self._seen])
        x, shape, residual = self._solve_identity(torch.cat([x for _, x in self._seen]), target,
                                                  self.identity_steps)
        self._hold_identity(shape)
        self.identity_held, self._seen = True, []
        return x[-batch:], residual[-batch:]

    def _record(self, x: torch.Tensor, error: float) -> FlameFit:
        """One frame's record from its parameter vector, already on the host."""
        exp, jaw, eyes, head, trans = torch.split(x, [self.n_exp, 3, 6, 3, 3])
        rotation = rodrigues(head[None])[0].T @ _FRONTAL.to(x)
        transform = torch.cat([rotation, trans[:, None]], dim=1)
        expcode = np.zeros(100, np.float32)
        expcode[:self.n_exp] = exp.numpy()
        return FlameFit(shapecode=self._shapecode.copy(), expcode=expcode,
                        posecode=np.concatenate([np.zeros(3, np.float32), jaw.numpy()]).astype(np.float32),
                        eyecode=eyes.numpy().astype(np.float32),
                        transform_matrix=transform.numpy().astype(np.float32),
                        landmark_error_px=error)
