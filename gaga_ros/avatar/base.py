"""What every avatar backend shares: the Avatar value, its message-shaped arrays, and the protocol."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from gaga_ros.conventions import CROP_SCALE, CROP_SIZE
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression
from gaga_ros.gaussians import Gaussians

if TYPE_CHECKING:  # crop and mediapipe load on the first photo, not with the avatar types
    from gaga_ros.crop import HeadCrop
    from gaga_ros.tracking.landmarks import FaceLandmarker

#: binding_triangle value of a Gaussian that follows no triangle and stays fixed in the source
#: camera's view (the torso below the head): it moves with neither expression nor head pose.
CAMERA_FIXED = 2**32 - 1


class NoFaceError(InputError):
    """A source photo without one usable face; the message says what was found and what is needed."""


#: Smallest face accepted in a source photo, as the face-oval width in pixels (FaceMesh is
#: unreliable below).
MIN_FACE_PX = 40
#: Faces looked for in a source photo (the largest is used) and the detection confidence they need.
PHOTO_FACES, PHOTO_MIN_CONFIDENCE = 4, 0.5


@dataclass(frozen=True)
class SourceFace:
    """The face a backend reconstructs from a photo: its head crop and its landmarks on the crop."""

    crop: HeadCrop
    points: np.ndarray  # (478, 3) float32 FaceMesh landmarks in crop pixels (z scaled like x)
    notes: tuple[str, ...]  # what the avatar should say about the choice (several faces)


def photo_landmarker() -> FaceLandmarker:
    """The FaceMesh that finds faces in source photos (still images, up to PHOTO_FACES faces)."""
    from gaga_ros.tracking.landmarks import FaceLandmarker

    return FaceLandmarker(static_image_mode=True, max_faces=PHOTO_FACES,
                          min_confidence=PHOTO_MIN_CONFIDENCE)


def source_face(rgb: np.ndarray, landmarker: FaceLandmarker) -> SourceFace:
    """Photo -> its largest face (by face-oval width) -> the GAGAvatar head crop around it, for
    every backend; NoFaceError without a face at least MIN_FACE_PX wide."""
    from gaga_ros.crop import crop_head, head_box
    from gaga_ros.faces.mediapipe_mesh import REGIONS
    from gaga_ros.source import as_rgb

    rgb = as_rgb(rgb)
    faces = landmarker.detect(rgb)
    if not faces:
        raise NoFaceError("no face found in the photo; accepted is a photo with one clearly "
                          f"visible face at least {MIN_FACE_PX} pixels wide")
    widths = [np.ptp(f.points[REGIONS["face_oval"], 0]) for f in faces]
    face = faces[int(np.argmax(widths))]
    notes: tuple[str, ...] = ()
    if len(faces) > 1:
        notes = (f"{len(faces)} faces found; used the largest",)
        warnings.warn(notes[0], stacklevel=3)
    if max(widths) < MIN_FACE_PX:
        raise NoFaceError(f"the face is only {max(widths):.0f} pixels wide; accepted are faces "
                          f"at least {MIN_FACE_PX} pixels wide")
    crop = crop_head(rgb, head_box(face.points[:, :2]), size=CROP_SIZE, scale=CROP_SCALE)
    return SourceFace(crop, crop.to_crop(face.points).astype(np.float32), notes)


#: Largest |coordinate| of a Gaussian centre accepted: the head spans about one unit around the
#: origin and the camera sits 9 away, so anything beyond 20 is no part of a head in view.
MAX_EXTENT = 20.0
#: Largest Gaussian standard deviation accepted: five head sizes (geometric avatars stay below 0.1).
MAX_SCALE = 5.0


class AvatarError(InputError):
    """Avatar arrays that do not describe a consistent avatar (e.g. a malformed message)."""


def _within(name: str, values: np.ndarray, low: float, high: float, what: str) -> None:
    if values.size and (values.min() < low or values.max() > high):
        raise AvatarError(f"{name} spans [{values.min():.3g}, {values.max():.3g}]: accepted are {what} "
                          f"within [{low}, {high}]")


@dataclass
class Binding:
    """How each Gaussian follows the driving mesh (torch tensors on the avatar's device).

    Gaussian i moves with the anchor point sum_k barycentric[i,k] * v[triangle[i,k]] +
    offset[i] * n, n the barycentric blend of the vertex normals, and turns with the triangle's
    frame; its neutral position is the avatar's `means`. triangle == CAMERA_FIXED: see there.
    follow[i] in [0, 1] is the share of all that motion (the head's and its triangle's) it takes, of
    the head's roll and shift only for a CAMERA_FIXED one (a torso does not turn with the head): 0
    keeps it where the source camera saw it, and shares between let the torso and hair beside the
    head bend with it rather than tear from it (usually 1 for bound Gaussians, 0 for fixed ones).
    """

    triangle: torch.Tensor  # (N,) int64
    barycentric: torch.Tensor  # (N, 3) float32
    offset: torch.Tensor  # (N,) float32
    follow: torch.Tensor  # (N,) float32

    def to(self, device: torch.device | str) -> Binding:
        return Binding(self.triangle.to(device), self.barycentric.to(device), self.offset.to(device),
                       self.follow.to(device))


@dataclass
class Avatar:
    """A reconstructed head: neutral Gaussians in the canonical frame plus how they follow the mesh."""

    backend: str
    avatar_id: str
    gaussians: Gaussians
    binding: Binding
    neutral_vertices: torch.Tensor  # (V, 3) float32, the source's own neutral mesh
    triangles: torch.Tensor  # (F, 3) int64
    source_transform: np.ndarray  # (3, 4) float32, camera of the source photo
    extra: bytes = b""
    #: Human-readable notes about the reconstruction (e.g. "3 faces found, used the largest").
    warnings: tuple[str, ...] = ()
    #: What the rendering backend derived from the fields above, in that backend's own type (the
    #: geometric backend's rest pose, GAGAvatar's source); set and read by the backend alone, never
    #: serialised, not carried by to().
    prepared: object = field(default=None, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.gaussians.device

    def __len__(self) -> int:
        return len(self.gaussians)

    def to(self, device: torch.device | str) -> Avatar:
        """The same avatar with every tensor on `device`."""
        return Avatar(self.backend, self.avatar_id, self.gaussians.to(device), self.binding.to(device),
                      self.neutral_vertices.to(device), self.triangles.to(device),
                      self.source_transform, self.extra, self.warnings)

    def to_arrays(self) -> dict:
        """The fields of msg/GaussianAvatar.msg (all but header), as flat float32/uint32 arrays."""
        g = self.gaussians

        def flat(t: torch.Tensor, dtype) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().numpy().reshape(-1).astype(dtype))

        return {
            "avatar_id": self.avatar_id,
            "backend": self.backend,
            "num_gaussians": len(g),
            "feature_dim": int(g.colors.shape[1]),
            "means": flat(g.means, np.float32),
            "quats": flat(g.quats, np.float32),
            "scales": flat(g.scales, np.float32),
            "opacities": flat(g.opacities, np.float32),
            "features": flat(g.colors, np.float32),
            "binding_triangle": flat(self.binding.triangle, np.uint32),
            "binding_barycentric": flat(self.binding.barycentric, np.float32),
            "binding_offset": flat(self.binding.offset, np.float32),
            "binding_follow": flat(self.binding.follow, np.float32),
            "neutral_vertices": flat(self.neutral_vertices, np.float32),
            "triangles": flat(self.triangles, np.uint32),
            "source_transform": np.asarray(self.source_transform, np.float32).reshape(12).copy(),
            "extra": np.frombuffer(self.extra, np.uint8).copy(),
        }

    @classmethod
    def from_arrays(cls, fields: dict, device: torch.device | str = "cpu") -> Avatar:
        """Rebuild an avatar from to_arrays() output (or a message's fields); checks every size."""
        missing = sorted(set(_MESSAGE_FIELDS) - set(fields))
        if missing:
            raise AvatarError(f"avatar arrays lack {missing}; accepted are the fields of "
                              "GaussianAvatar.msg")
        n, c = int(fields["num_gaussians"]), int(fields["feature_dim"])
        if c not in (3, 32):
            raise AvatarError(f"feature_dim {c}: accepted are 3 (RGB) and 32 (neural features)")

        def arr(name: str, dtype, per: int | None, allow_empty: bool = False) -> np.ndarray:
            a = np.asarray(fields[name]).reshape(-1)
            if allow_empty and a.size == 0:
                return a.astype(dtype)
            if per is not None and a.size != n * per:
                raise AvatarError(f"{name} has {a.size} values; with num_gaussians={n} accepted is "
                                  f"{n}*{per}={n * per}")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise AvatarError(f"{name} contains NaN or infinite values")
            return a.astype(dtype)

        means = arr("means", np.float32, 3).reshape(n, 3)
        quats = arr("quats", np.float32, 4).reshape(n, 4)
        scales = arr("scales", np.float32, 3).reshape(n, 3)
        opacities = arr("opacities", np.float32, 1)
        _within("means", means, -MAX_EXTENT, MAX_EXTENT, "world units (the camera sits 9 from the head)")
        _within("scales", scales, 0.0, MAX_SCALE, "linear standard deviations")
        _within("opacities", opacities, 0.0, 1.0, "opacities")
        if n and np.min(np.einsum("ij,ij->i", quats, quats)) < 1e-12:
            raise AvatarError("quats holds a zero quaternion: accepted are rotations (w, x, y, z) of "
                              "non-zero length")
        features = arr("features", np.float32, c).reshape(n, c)
        tri = arr("binding_triangle", np.int64, 1, allow_empty=True)
        bary = arr("binding_barycentric", np.float32, 3, allow_empty=True)
        offset = arr("binding_offset", np.float32, 1, allow_empty=True)
        follow = arr("binding_follow", np.float32, 1, allow_empty=True)
        if tri.size == 0:  # static avatar: every Gaussian keeps its place in the source view
            tri = np.full(n, CAMERA_FIXED, np.int64)
            bary, offset = np.zeros((n, 3), np.float32), np.zeros(n, np.float32)
        if follow.size == 0:  # what is bound to the mesh follows it, the rest stays
            follow = (tri != CAMERA_FIXED).astype(np.float32)
        if bary.size != 3 * n or offset.size != n or follow.size != n:
            raise AvatarError("binding arrays must be all empty or all sized by num_gaussians")
        _within("binding_follow", follow, 0.0, 1.0, "shares of the head's motion")
        verts = np.asarray(fields["neutral_vertices"], np.float32).reshape(-1)
        faces = np.asarray(fields["triangles"]).reshape(-1).astype(np.int64)
        if verts.size % 3 or faces.size % 3:
            raise AvatarError(f"neutral_vertices ({verts.size}) and triangles ({faces.size}) must "
                              "hold whole triples")
        n_verts, n_faces = verts.size // 3, faces.size // 3
        if faces.size and faces.max() >= n_verts:
            raise AvatarError(f"triangles index vertex {faces.max()} but there are {n_verts}")
        bound = tri != CAMERA_FIXED
        if bound.any() and tri[bound].max() >= n_faces:
            raise AvatarError(f"binding_triangle names triangle {tri[bound].max()} but there are "
                              f"{n_faces}")
        transform = np.asarray(fields["source_transform"], np.float32).reshape(-1)
        if transform.size != 12:
            raise AvatarError(f"source_transform has {transform.size} values; accepted is 12")

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        gaussians = Gaussians(t(means), t(quats), t(scales), t(opacities), t(features))
        extra = np.asarray(fields["extra"], np.uint8).tobytes()
        return cls(str(fields["backend"]), str(fields["avatar_id"]), gaussians,
                   Binding(t(tri), t(bary.reshape(n, 3)), t(offset), t(follow)),
                   t(verts.reshape(n_verts, 3)), t(faces.reshape(n_faces, 3)),
                   transform.reshape(3, 4), extra)


_MESSAGE_FIELDS = ("avatar_id", "backend", "num_gaussians", "feature_dim", "means", "quats", "scales",
                   "opacities", "features", "binding_triangle", "binding_barycentric",
                   "binding_offset", "binding_follow", "neutral_vertices", "triangles",
                   "source_transform", "extra")


class AvatarBackend(Protocol):
    """One way to turn a photo into an avatar and an expression into an image of it."""

    name: str

    def reconstruct(self, rgb: np.ndarray) -> Avatar:
        """Build an avatar from one RGB uint8 photo; raises NoFaceError without a usable face."""
        ...

    def render(self, avatar: Avatar, expression: Expression, size: int = 512) -> np.ndarray:
        """The avatar driven by `expression`, as an RGB uint8 (size, size, 3) image."""
        ...


def content_id(data: bytes) -> str:
    """Stable short id of some content (the avatar's source crop), for cache keys across nodes."""
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]

