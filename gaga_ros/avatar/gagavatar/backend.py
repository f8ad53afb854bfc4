"""The GAGAvatar model behind the AvatarBackend interface that the nodes share.

An avatar of this backend carries the reconstructed source as Gaussian arrays in the model's own
order: the first 5023 are the expression group (placed on the driven FLAME vertices each frame,
their neutral means are the source's FLAME mesh), the rest are the lifted local groups, which stay
fixed in the head frame. `extra` holds the source's FLAME identity (shapecode, float32). Per frame
only FLAME and the camera change; the encoder never runs again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gaga_ros.assets import find_assets
from gaga_ros.avatar.base import Avatar, Binding, content_id, photo_landmarker, source_face
from gaga_ros.avatar.gagavatar.checkpoint import load_state_dict_strict, read_state_dict
from gaga_ros.avatar.gagavatar.model import GagaFrame, GagaSource, GAGAvatar, source_image
from gaga_ros.avatar.gagavatar.sizes import FULL, TINY
from gaga_ros.conventions import CROP_SIZE, FLAME_VERTICES
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.conversion import FaceConverter
from gaga_ros.faces.flame import Flame
from gaga_ros.faces.flame_assets import FlameAssets, load_flame_assets
from gaga_ros.gaussians import Gaussians
from gaga_ros.image import to_uint8
from gaga_ros.tracking.flame_fitter import MediapipeEmbedding

if TYPE_CHECKING:  # the fast path loads with its first frame (it needs CUDA and gsplat)
    from gaga_ros.avatar.gagavatar.fast import FastRenderer

CONFIGS = {"full": FULL, "tiny": TINY}
#: torch.compile modes for the fast path's refiner ("": eager kernels, CUDA graphs captured in seconds).
#: "default" fuses the refiner's pointwise work (about 2x faster at batch 16) for about 75 s of
#: compiling per batch size on the first frame (bench/FAST_NOTES.md); modes that bring their own CUDA
#: graphs ("reduce-overhead") would clash with the fast path's.
COMPILE_MODES = ("", "default", "max-autotune-no-cudagraphs")


@dataclass
class GagaPrepared:
    """What this backend derives once per avatar to render it (Avatar.prepared): the source on the
    device, the FLAME identity (1, shape coefficients) and, once the fast path rendered it, the
    avatar's FastRenderer."""

    source: GagaSource
    shape: torch.Tensor
    fast: FastRenderer | None = None


class GagaAvatarBackend:
    """Photo -> GAGAvatar source (cached on the device); expression -> refined image.

    MESH-mode expressions (the scripted driver, mesh tracking) are converted to FLAME first by the
    backend's own converter, whose warm start follows the one stream the backend renders.
    """

    name = "gagavatar"

    def __init__(self, model: GAGAvatar, flame_assets: FlameAssets, device: str | torch.device = "cpu",
                 fast: bool = True, compile_mode: str | None = None,
                 mediapipe_embedding: MediapipeEmbedding | None = None):
        self.device = torch.device(device)
        #: On CUDA, render through FastRenderer (CUDA graphs, fp16 refiner); False: the reference path.
        self.fast = fast and self.device.type == "cuda"
        if (compile_mode or "") not in COMPILE_MODES:
            raise InputError(f"compile mode {compile_mode!r}: accepted are "
                             f"{', '.join(repr(m) for m in COMPILE_MODES)}")
        self.compile_mode = compile_mode or None
        self.model = model.to(self.device).eval()
        self.flame_assets = flame_assets
        self.flame = Flame(flame_assets).to(self.device)
        self.mediapipe_embedding = mediapipe_embedding
        self._converter: FaceConverter | None = None  # built on the first MESH-mode expression (~1 s)
        self._landmarker: Any = None  # a FaceLandmarker, made on the first photo (mediapipe loads then)

    @classmethod
    def load(cls, models_dir: str | Path | None = None, config: str = "full", weights: str | Path = "",
             device: str | torch.device = "cpu", fast: bool = True, compile_mode: str = ""
             ) -> GagaAvatarBackend:
        """Weights and FLAME from the models folder (see `gaga-ros assets`); clear errors if missing."""
        if config not in CONFIGS:
            raise InputError(f"config {config!r}: accepted are {', '.join(CONFIGS)}")
        status = find_assets(models_dir)
        found = Path(weights) if weights else status.gagavatar
        if found is None or status.flame is None:
            raise FileNotFoundError(status.explain())
        model = GAGAvatar(CONFIGS[config])
        load_state_dict_strict(model, read_state_dict(found))
        embedding = (MediapipeEmbedding.load(status.mediapipe_embedding) if status.mediapipe_embedding
                     else None)
        return cls(model, load_flame_assets(status.flame, status.flame_landmarks), device, fast,
                   compile_mode, mediapipe_embedding=embedding)

    def stream(self) -> GagaAvatarBackend:
        """A backend for one more expression stream that shares this one's model (no second copy of
        the weights) but has its own MESH -> FLAME converter, whose warm start follows that stream."""
        return GagaAvatarBackend(self.model, self.flame_assets, self.device, self.fast, self.compile_mode,
                                 self.mediapipe_embedding)

    # ---- reconstruction -------------------------------------------------------------------------

    def reconstruct(self, rgb: np.ndarray) -> Avatar:
        """Crop the head, fit FLAME (identity + camera), encode once; NoFaceError without a face."""
        from gaga_ros.tracking.flame_fitter import FlameFitter

        if self._landmarker is None:
            self._landmarker = photo_landmarker()
        source = source_face(rgb, self._landmarker)
        fit = FlameFitter(self.flame_assets, device=str(self.device)).fit(source.points)[0]
        return self.reconstruct_crop(source.crop.image, fit.transform_matrix, fit.shapecode, source.notes)

    def reconstruct_crop(self, crop: np.ndarray, transform: np.ndarray, shapecode: np.ndarray,
                         warnings: tuple[str, ...] = ()) -> Avatar:
        """Encode a 512 head crop whose FLAME camera and identity are known (once per source)."""
        transform = np.asarray(transform, np.float32).reshape(3, 4)
        image = source_image(crop, self.model.cfg.image_size).to(self.device)
        source = self.model.reconstruct(image, transform)
        shape = torch.as_tensor(np.asarray(shapecode, np.float32), device=self.device).reshape(1, -1)
        neutral = self.flame(shape=shape)[0]
        gaussians = Gaussians(torch.cat([neutral, source.local_means]), source.quats, source.scales,
                              source.opacities, source.colors)
        static = Binding(torch.empty(0, dtype=torch.long), torch.empty(0, 3), torch.empty(0), torch.empty(0))
        avatar = Avatar(self.name, content_id(np.ascontiguousarray(crop).tobytes() + b"gagavatar"),
                        gaussians, static, neutral, self.flame.faces.long(), transform,
                        extra=shape.cpu().numpy().astype(np.float32).tobytes(), warnings=warnings)
        avatar.prepared = GagaPrepared(source, shape)
        return avatar

    # ---- rendering ------------------------------------------------------------------------------

    def source(self, avatar: Avatar) -> GagaSource:
        """The avatar's GagaSource on this backend's device (what a FastRenderer slot holds)."""
        return self.prepared(avatar).source

    def flame_inputs(self, avatars: Sequence[Avatar], expressions: Sequence[Expression]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """FLAME vertices (K, 5023, 3) and cameras (K, 3, 4), on the device, that FastRenderer.render
        takes for K avatars each driven by its expression (MESH-mode ones converted first), in one
        FLAME pass: a fleet's batch costs one pass instead of one per avatar (bench/FAST_NOTES.md)."""
        expressions = [self.to_flame(e) for e in expressions]
        transforms = torch.as_tensor(np.stack([np.asarray(e.transform, np.float32) for e in expressions]),
                                     device=self.device)
        return self._vertices(avatars, expressions), transforms

    def prepared(self, avatar: Avatar) -> GagaPrepared:
        """The avatar's GagaPrepared state: made by reconstruction, or from the avatar's arrays on its
        first frame (an avatar that arrived as a message)."""
        if not isinstance(avatar.prepared, GagaPrepared):
            if len(avatar) <= FLAME_VERTICES or avatar.gaussians.colors.shape[1] != 32:
                raise InputError(f"avatar {avatar.avatar_id} is not a GAGAvatar source: expected more "
                                 f"than {FLAME_VERTICES} Gaussians with 32 features")
            g = avatar.gaussians.to(self.device)
            source = GagaSource(g.means[FLAME_VERTICES:], g.quats, g.scales, g.opacities, g.colors,
                                torch.as_tensor(avatar.source_transform, device=self.device))
            shape = torch.from_numpy(np.frombuffer(avatar.extra, np.float32).copy()).to(self.device)
            avatar.prepared = GagaPrepared(source, shape[None])
        return avatar.prepared

    @torch.no_grad()
    def frame(self, avatar: Avatar, expression: Expression) -> GagaFrame:
        """The model's outputs (splat, coarse, refined) for the source's identity with the driver's
        FLAME expression, jaw, eyes and camera (the driver's shape never enters)."""
        expression = self.to_flame(expression)
        return self.model.render(self.prepared(avatar).source, self._vertices([avatar], [expression])[0],
                                 expression.transform)

    def to_flame(self, expression: Expression) -> Expression:
        """The expression in FLAME mode: MESH-mode ones are fitted (see gaga_ros.faces.conversion)."""
        if expression.face_model is FaceModel.FLAME:
            return expression
        if self._converter is None:
            self._converter = FaceConverter(self.flame_assets, self.mediapipe_embedding)
        return self._converter.to_flame(expression)

    def _vertices(self, avatars: Sequence[Avatar], expressions: Sequence[Expression]) -> torch.Tensor:
        """FLAME (K, 5023, 3): each source's shape with its FLAME-mode expression's jaw and eyes."""
        shape = torch.cat([self.prepared(a).shape for a in avatars])

        def rows(values) -> torch.Tensor:  # one host -> device copy per parameter, not per avatar
            return torch.as_tensor(np.stack([np.asarray(v, np.float32) for v in values]), device=self.device)

        exp = rows(e.expression_padded(self.flame.n_exp) for e in expressions)
        return self.flame(shape=shape, expression=exp, jaw_pose=rows(e.jaw_pose for e in expressions),
                          eye_pose=rows(e.eye_pose for e in expressions))

    def _fast(self, avatar: Avatar) -> FastRenderer:
        """The avatar's FastRenderer, built (graphs captured) on its first frame."""
        prepared = self.prepared(avatar)
        if prepared.fast is None:
            from gaga_ros.avatar.gagavatar.fast import FastRenderer

            prepared.fast = FastRenderer(self.model, prepared.source, compile_mode=self.compile_mode)
        return prepared.fast

    def render(self, avatar: Avatar, expression: Expression, size: int = CROP_SIZE) -> np.ndarray:
        """RGB uint8 (size, size, 3) of the refined frame."""
        expression = self.to_flame(expression)
        if self.fast and size == self.model.cfg.render_size:
            return self._fast(avatar).render(self._vertices([avatar], [expression]),
                                             expression.transform)[0].copy()
        refined = self.frame(avatar, expression).refined
        if refined.shape[-1] != size:
            refined = torch.nn.functional.interpolate(refined, size=(size, size), mode="bilinear",
                                                      antialias=True, align_corners=False)
        image = to_uint8(refined[0]).permute(1, 2, 0)
        return image.cpu().numpy()
