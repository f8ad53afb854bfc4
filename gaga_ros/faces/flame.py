"""The FLAME head model as a batched torch layer, reproducing GAGAvatar's use of it (docs/flame.md).

Linear blend skinning follows the published code exactly, quirks included: Rodrigues adds 1e-8 to
each axis-angle component before the norm, pose correctives use the 4 non-root joints, and vertices
are multiplied by 5.0 after skinning (camera translations are in these units).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gaga_ros.conventions import FLAME_SCALE
from gaga_ros.errors import InputError
from gaga_ros.faces.flame_assets import FLAME_JOINTS, FLAME_SHAPE_BASIS, FlameAssets, load_flame_assets


class FlameInputError(InputError):
    """FLAME parameters of the wrong shape or batch size; the message says what is accepted."""


def rodrigues(rotvec: torch.Tensor) -> torch.Tensor:
    """Axis-angle (N,3) to rotation matrices (N,3,3), with the published 1e-8 offset in the angle."""
    angle = torch.norm(rotvec + 1e-8, dim=1, keepdim=True)
    axis = rotvec / angle
    sin = torch.sin(angle)[:, :, None]
    cos = torch.cos(angle)[:, :, None]
    x, y, z = axis.unbind(1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + sin * k + (1 - cos) * (k @ k)


class Flame(nn.Module):
    """FLAME with eyes: shape, expression and 5 joint rotations to vertices (B, V, 3), times 5.0.

    Joints are 0 global, 1 neck, 2 jaw, 3 left eye, 4 right eye; every pose is axis-angle (B,3).
    Coefficient tensors may be shorter than n_shape / n_exp: missing trailing values count as 0.
    """

    # The buffers registered in __init__, declared for the type checker (nn.Module's __getattr__
    # would otherwise type them Tensor | Module).
    faces: torch.Tensor
    v_template: torch.Tensor
    shapedirs: torch.Tensor
    posedirs: torch.Tensor
    j_regressor: torch.Tensor
    parents: torch.Tensor
    lbs_weights: torch.Tensor
    lmk_static_faces: torch.Tensor
    lmk_static_bary: torch.Tensor
    lmk_dynamic_faces: torch.Tensor
    lmk_dynamic_bary: torch.Tensor
    lmk_full_faces: torch.Tensor
    lmk_full_bary: torch.Tensor

    def __init__(self, assets: FlameAssets, n_shape: int = FLAME_SHAPE_BASIS, n_exp: int = 100,
                 scale: float = FLAME_SCALE) -> None:
        super().__init__()
        if not 0 <= n_shape <= FLAME_SHAPE_BASIS:
            raise FlameInputError(f"n_shape={n_shape}: accepted are 0..{FLAME_SHAPE_BASIS}")
        if not 0 <= n_exp:
            raise FlameInputError(f"n_exp={n_exp}: accepted are 0..100")
        self.n_shape = n_shape
        self.n_exp = min(n_exp, assets.n_expression_basis)
        self.scale = float(scale)
        self.source = assets.source
        sd = assets.shapedirs
        exp_start = FLAME_SHAPE_BASIS
        basis = np.concatenate([sd[:, :, :n_shape], sd[:, :, exp_start:exp_start + self.n_exp]], 2)
        n_vert = assets.v_template.shape[0]
        buffers = {
            "faces": torch.from_numpy(assets.faces),
            "v_template": torch.from_numpy(assets.v_template),
            "shapedirs": torch.from_numpy(np.ascontiguousarray(basis)),
            # (V*3, P) transposed to (P, V*3): pose features multiply it on the left.
            "posedirs": torch.from_numpy(assets.posedirs.reshape(n_vert * 3, -1).T.copy()),
            "j_regressor": torch.from_numpy(assets.j_regressor),
            "parents": torch.from_numpy(assets.parents),
            "lbs_weights": torch.from_numpy(assets.lbs_weights),
        }
        lmk = assets.landmarks
        self.has_landmarks = lmk is not None
        if lmk is not None:
            buffers.update({
                "lmk_static_faces": torch.from_numpy(lmk.static_faces),
                "lmk_static_bary": torch.from_numpy(lmk.static_bary),
                "lmk_dynamic_faces": torch.from_numpy(lmk.dynamic_faces),
                "lmk_dynamic_bary": torch.from_numpy(lmk.dynamic_bary),
                "lmk_full_faces": torch.from_numpy(lmk.full_faces),
                "lmk_full_bary": torch.from_numpy(lmk.full_bary),
            })
        for name, value in buffers.items():
            self.register_buffer(name, value.contiguous(), persistent=False)
        self._parent_list = assets.parents.tolist()

    @classmethod
    def from_file(cls, path: str | Path, landmarks_path: str | Path | None = None, **kwargs) -> Flame:
        """Load FLAME_with_eye.pt or a FLAME .pkl (see `load_flame_assets`)."""
        return cls(load_flame_assets(path, landmarks_path), **kwargs)

    @property
    def n_vertices(self) -> int:
        """Vertices of the mesh (5023 for FLAME)."""
        return self.v_template.shape[0]

    def forward(self, shape: torch.Tensor | None = None, expression: torch.Tensor | None = None,
                global_pose: torch.Tensor | None = None, neck_pose: torch.Tensor | None = None,
                jaw_pose: torch.Tensor | None = None, eye_pose: torch.Tensor | None = None,
                batch_size: int | None = None) -> torch.Tensor:
        """Posed vertices (B, V, 3) times the scale; None parameters are zeros.

        shape (B,<=n_shape), expression (B,<=n_exp), global/neck/jaw pose (B,3), eye_pose (B,6) as
        [left eye, right eye].
        """
        given = {"shape": shape, "expression": expression, "global_pose": global_pose,
                 "neck_pose": neck_pose, "jaw_pose": jaw_pose, "eye_pose": eye_pose}
        sizes = {k: v.shape[0] for k, v in given.items() if isinstance(v, torch.Tensor) and v.ndim == 2}
        batch = batch_size if batch_size is not None else next(iter(sizes.values()), 1)
        betas = torch.cat([self._param("shape", shape, self.n_shape, batch, pad=True),
                           self._param("expression", expression, self.n_exp, batch, pad=True)], dim=1)
        pose = torch.cat([self._param("global_pose", global_pose, 3, batch),
                          self._param("neck_pose", neck_pose, 3, batch),
                          self._param("jaw_pose", jaw_pose, 3, batch),
                          self._param("eye_pose", eye_pose, 6, batch)], dim=1)
        return self.lbs(betas, pose) * self.scale

    def forward_codes(self, shapecode: torch.Tensor, expcode: torch.Tensor, posecode: torch.Tensor,
                      eyecode: torch.Tensor | None = None) -> torch.Tensor:
        """GAGAvatar's call: posecode (B,6) = [global(3), jaw(3)], neck 0, eyecode (B,6)."""
        posecode = self._param("posecode", posecode, 6, shapecode.shape[0] if shapecode.ndim == 2 else 1)
        return self(shape=shapecode, expression=expcode, global_pose=posecode[:, :3],
                    jaw_pose=posecode[:, 3:], eye_pose=eyecode)

    def _param(self, name: str, value: torch.Tensor | None, width: int, batch: int,
               pad: bool = False) -> torch.Tensor:
        device, dtype = self.v_template.device, self.v_template.dtype
        if value is None:
            return torch.zeros(batch, width, device=device, dtype=dtype)
        value = torch.as_tensor(value)
        ok_width = value.shape[-1] <= width if pad else value.shape[-1] == width
        if value.ndim != 2 or value.shape[0] != batch or not ok_width:
            want = f"(B, <= {width})" if pad else f"(B, {width})"
            raise FlameInputError(f"{name} has shape {tuple(value.shape)}: accepted is {want} with the "
                                  f"batch size B={batch} shared by all parameters")
        value = value.to(device=device, dtype=dtype)
        if value.shape[1] < width:
            value = torch.nn.functional.pad(value, (0, width - value.shape[1]))
        return value

    def lbs(self, betas: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """Unscaled linear blend skinning: betas (B, n_shape+n_exp), pose (B, 15) in joint order."""
        batch = betas.shape[0]
        v_shaped = self.v_template + torch.einsum("bl,vcl->bvc", betas, self.shapedirs)
        joints = torch.einsum("jv,bvc->bjc", self.j_regressor, v_shaped)
        rot = rodrigues(pose.reshape(-1, 3)).view(batch, FLAME_JOINTS, 3, 3)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(batch, -1)
        v_posed = v_shaped + (pose_feature @ self.posedirs).view(batch, -1, 3)
        # World transform of each joint: G_i = G_parent [R_i | J_i - J_parent].
        world = []
        for i, parent in enumerate(self._parent_list):
            offset = joints[:, i] if parent < 0 else joints[:, i] - joints[:, parent]
            local = torch.cat([rot[:, i], offset[:, :, None]], dim=2)
            if parent < 0:
                world.append(local)
            else:
                g = world[parent]
                world.append(torch.cat([g[:, :, :3] @ local[:, :, :3],
                                        g[:, :, :3] @ local[:, :, 3:] + g[:, :, 3:]], dim=2))
        g = torch.stack(world, dim=1)                                   # (B, J, 3, 4)
        # Remove the rest-pose joint location: A_i = G_i - [0 | G_i (J_i, 0)].
        t = g[..., 3] - (g[..., :3] @ joints[..., None])[..., 0]
        a = torch.cat([g[..., :3], t[..., None]], dim=3).reshape(batch, FLAME_JOINTS, 12)
        per_vertex = (self.lbs_weights @ a).view(batch, -1, 3, 4)      # (B, V, 3, 4)
        return (per_vertex[..., :3] @ v_posed[..., None])[..., 0] + per_vertex[..., 3]

    # --- landmarks ------------------------------------------------------------------------------

    def landmarks(self, vertices: torch.Tensor, kind: str = "full", global_pose: torch.Tensor | None = None,
                  neck_pose: torch.Tensor | None = None) -> torch.Tensor:
        """Landmarks (B, L, 3) on posed vertices by barycentric interpolation.

        kind "full": the file's full set (70 with eyes, or 68); "static": the 51 inner-face iBUG points;
        "ibug68": the 17 contour points picked by head yaw (global and neck pose) then the 51 static ones.
        """
        if not self.has_landmarks:
            raise FlameInputError(f"{self.source} has no landmark embeddings: use FLAME_with_eye.pt, or load "
                                  "the .pkl with landmarks_path=landmark_embedding.npy")
        if vertices.ndim != 3 or vertices.shape[1:] != (self.n_vertices, 3):
            raise FlameInputError(f"vertices have shape {tuple(vertices.shape)}: accepted is "
                                  f"(B, {self.n_vertices}, 3)")
        if kind == "full":
            return self._interpolate(vertices, self.lmk_full_faces, self.lmk_full_bary)
        if kind == "static":
            return self._interpolate(vertices, self.lmk_static_faces, self.lmk_static_bary)
        if kind == "ibug68":
            batch = vertices.shape[0]
            bins = self.contour_bins(self._param("global_pose", global_pose, 3, batch),
                                     self._param("neck_pose", neck_pose, 3, batch))
            contour = self._interpolate(vertices, self.lmk_dynamic_faces[bins], self.lmk_dynamic_bary[bins])
            return torch.cat([contour, self.landmarks(vertices, "static")], dim=1)
        raise FlameInputError(f"landmark kind {kind!r}: accepted are 'full', 'static', 'ibug68'")

    def contour_bins(self, global_pose: torch.Tensor, neck_pose: torch.Tensor) -> torch.Tensor:
        """Row of the dynamic embedding per item: yaw in whole degrees, 0..39 for yaw >= 0, 40..78 below."""
        like: dict[str, Any] = {"dtype": self.v_template.dtype, "device": self.v_template.device}
        rot = rodrigues(torch.as_tensor(global_pose, **like)) @ rodrigues(torch.as_tensor(neck_pose, **like))
        cos_pitch = torch.sqrt(rot[:, 0, 0] ** 2 + rot[:, 1, 0] ** 2)
        yaw = torch.round(torch.rad2deg(torch.atan2(-rot[:, 2, 0], cos_pitch))).long()
        yaw = yaw.clamp(max=39)
        return torch.where(yaw >= 0, yaw, (39 - yaw).clamp(max=78))

    def _interpolate(self, vertices: torch.Tensor, faces_idx: torch.Tensor,
                     bary: torch.Tensor) -> torch.Tensor:
        """Barycentric points; faces_idx (L,) or (B,L), bary (L,3) or (B,L,3)."""
        corners = self.faces[faces_idx]                                 # (L,3) or (B,L,3)
        if corners.ndim == 2:
            tri = vertices[:, corners]                                  # (B, L, 3, 3)
            return torch.einsum("blkc,lk->blc", tri, bary.to(vertices.dtype))
        batch_idx = torch.arange(vertices.shape[0], device=vertices.device)[:, None, None]
        tri = vertices[batch_idx, corners]
        return torch.einsum("blkc,blk->blc", tri, bary.to(vertices.dtype))
