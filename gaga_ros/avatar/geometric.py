"""The asset-free geometric avatar: one photo lifted onto its FaceMesh into mesh-bound Gaussians.

A GAGAvatar-like dual lifting without learned weights. The forward lift puts one Gaussian on every
head pixel of the crop (subsampled to `grid`), at the depth of the fitted FaceMesh where the pixel
hits it, else on a head ellipsoid fitted to the mesh; the backward lift closes the head behind with a
second layer on the ellipsoid's back half, coloured by mirroring the front. Gaussians are bound to
mesh triangles (gaga_ros.avatar.deform) so expressions move them; a dark mouth interior and the eye
openings are bound to triangles that the avatar adds across the mouth and the eyes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from gaga_ros.avatar.base import CAMERA_FIXED, Avatar, Binding, content_id, photo_landmarker, source_face
from gaga_ros.avatar.deform import Rest, anchors, deform, matrix_to_quat, quat_to_matrix, stretched
from gaga_ros.blendshapes import rotation
from gaga_ros.camera import Camera, frontal_transform
from gaga_ros.conventions import CROP_SIZE
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression, ExpressionError, FaceModel
from gaga_ros.faces.conversion import FaceConverter
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, FACE_LANDMARKS, REGIONS, TRIANGLES
from gaga_ros.gaussians import Gaussians
from gaga_ros.image import to_uint8

#: Head ellipsoid of the canonical face (centre, radii), canonical units; scaled to each source.
HEAD_CENTRE = np.array([0.0, 0.02, -0.02])
HEAD_RADII = np.array([0.40, 0.62, 0.50])
#: Nearly black: a dark red interior under a dark moustache read, to mediapipe, as a closed mouth
#: (bench/TRANSFER_NOTES.md).
MOUTH_COLOUR = (0.05, 0.02, 0.02)
TEETH_COLOUR = (0.78, 0.75, 0.68)
#: How far behind the lips (canonical units) the source's own mouth pixels, the added teeth and
#: the dark interior sit, front to back: deep enough that mouth corners hide them when lips close,
#: shallow enough that a turned head does not show the interior beside the opening (at 0.07 it read,
#: to mediapipe, as a turn on a three-quarter photo and as a nod on a pitched one;
#: bench/TRANSFER_NOTES.md).
SOURCE_MOUTH_DEPTH, TEETH_DEPTH, MOUTH_DEPTH = 0.02, 0.03, 0.04
#: Seams between the face mesh, the ellipsoid and the torso: the mesh-to-ellipsoid depth step fades
#: over SEAM_BLEND of the crop; the torso repeats the SEAM_BAND (of the crop) above the chin line,
#: SEAM_DEPTH (canonical units) further back.
SEAM_BLEND, SEAM_BAND, SEAM_DEPTH = 0.05, 0.08, 0.3
#: Shares of the head's motion (Binding.follow): the torso's pixels take 1 (of its roll and shift only,
#: roll_in_camera) next to the head falling to 0 at FOLLOW_SPAN (canonical units, scaled to the
#: source's face) from it, and every off-mesh pixel falls to 0 over FOLLOW_EDGE of the crop at its
#: sides and bottom, which hold still (nothing beyond them to show). Where the share changes the layer
#: stretches, and its Gaussians grow by that stretch so they do not part into lines. Hard-fixed, the
#: torso tore from a rolling head as a black wedge at the crop's edge (bench/TRANSFER_NOTES.md, sixth
#: and seventh passes).
FOLLOW_SPAN, FOLLOW_EDGE = 0.3, 0.15
#: Off-mesh pixels below the mouth nearer than this (fraction of the crop) to the jaw line, and how far
#: they are set back (face-size units).
CHIN_REACH, CHIN_SETBACK = 0.04, 0.06
#: Darkening of the mirrored back layer, which the source photo never saw.
BACK_SHADE = 0.8
#: Lifted pixels per side of the head crop: the default, and the accepted range.
GRID, GRID_RANGE = 192, (32, CROP_SIZE)
#: Render sizes accepted, pixels per side.
RENDER_SIZES = (16, 4096)
#: Opacity of every lifted Gaussian on a surface (below 1: the rasterizers clamp alpha there anyway).
OPACITY = 0.99
#: The person matte above which a pixel off the face mesh is lifted, and the rise of the matte over
#: which its opacity ramps from 0 to OPACITY (soft hair and shoulder edges).
MATTE_KEEP, MATTE_RAMP = 0.3, 0.4
#: Size of a front Gaussian (its sigma) as a fraction of the lifted pixel it covers, and how much of
#: the depth step to its neighbours it is thickened by along the view ray, clamped to this range of
#: its sigma.
FRONT_SIGMA, THICKEN, THICKNESS_RANGE = 0.6, 0.6, (0.5, 4.0)
#: Fewest hair pixels (above the eyes, off the mesh) whose median colour paints the back of the head.
HAIR_MIN_PIXELS = 20
#: Back layer: spacing of its Gaussians in lifted pixels at the head's depth, their sigma as a
#: fraction of it, the matte a mirrored pixel needs to give its colour, and the blur (crop pixels) of
#: the colours it mirrors.
BACK_SPACING, BACK_SIGMA, BACK_MATTE, BACK_BLUR_PX = 1.6, 0.75, 0.5, 6
#: How far behind the front layer (fraction of the head's depth radius) the back layer stays, and the
#: window (lifted pixels) over which the front layer's deepest point counts.
BACK_CLEARANCE, BACK_REACH = 0.1, 9
#: Mouth interior: lattice steps per mouth triangle side, the barycentric weight of the upper lip
#: above which a point is teeth, and the sigma of its Gaussians (canonical units).
MOUTH_STEPS, TEETH_WEIGHT, MOUTH_SIGMA = 8, 0.9, 0.012


def _zipper(upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Triangles closing the opening between two contours that run corner to corner.

    Each triangle's first edge runs along a contour, so its tangent frame stays defined when the
    opening closes to a line.
    """
    if upper[0] != lower[0] or upper[-1] != lower[-1] or len(upper) != len(lower):
        raise ValueError("contours must share both corners and have equal lengths")
    rows = [(upper[0], upper[1], lower[1])]
    for k in range(1, len(upper) - 2):
        rows += [(upper[k], upper[k + 1], lower[k]), (lower[k], lower[k + 1], upper[k + 1])]
    rows.append((upper[-2], upper[-1], lower[-2]))
    tris = np.array(rows, np.int64)
    corners = CANONICAL_VERTICES[tris]
    normal_z = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])[:, 2]
    flip = normal_z < 0  # wind outwards (+z) by swapping the first two, keeping the contour edge first
    tris[flip] = tris[flip][:, [1, 0, 2]]
    return tris


def _opening_triangles() -> dict[str, np.ndarray]:
    inner = REGIONS["mouth_inner"]
    mouth_upper = inner[:11]
    mouth_lower = np.r_[inner[0], inner[11:][::-1], inner[10]]
    return {
        "mouth": _zipper(mouth_upper, mouth_lower),
        "left_eye": _zipper(REGIONS["left_eye_upper"], REGIONS["left_eye_lower"]),
        "right_eye": _zipper(REGIONS["right_eye_upper"], REGIONS["right_eye_lower"]),
    }


_OPENINGS = _opening_triangles()
#: Avatar triangles: the face surface, then the mouth opening, then the two eye openings.
AVATAR_TRIANGLES = np.concatenate([TRIANGLES.astype(np.int64), _OPENINGS["mouth"],
                                   _OPENINGS["left_eye"], _OPENINGS["right_eye"]])
_MOUTH = np.arange(len(TRIANGLES), len(TRIANGLES) + len(_OPENINGS["mouth"]))
_LIPS = np.union1d(REGIONS["lips_upper"], REGIONS["lips_lower"])
_EYES = np.arange(_MOUTH[-1] + 1, len(AVATAR_TRIANGLES))
#: Vertices that expressions never move (forehead, temples, upper nose: above the eyes, farther than
#: STEADY_MARGIN canonical units from the eyes and brows): hair, ears, neck and the back of the head
#: follow these.
STEADY_MARGIN = 0.1
_MOBILE = np.concatenate([REGIONS[k] for k in ("left_eye_upper", "left_eye_lower", "right_eye_upper",
                                                 "right_eye_lower", "left_eyebrow", "right_eyebrow")])
_STEADY = np.flatnonzero((CANONICAL_VERTICES[:FACE_LANDMARKS, 1] > 0.0) & (np.linalg.norm(
    CANONICAL_VERTICES[:FACE_LANDMARKS, None] - CANONICAL_VERTICES[None, _MOBILE], axis=2).min(1)
    > STEADY_MARGIN))


def _teeth(binding: Binding) -> torch.Tensor:
    """(N,) bool: Gaussians of the mouth interior that are teeth (_Lifter.mouth's rule: on a mouth
    opening triangle, with more than TEETH_WEIGHT of their barycentric weight on the upper lip)."""
    triangle = binding.triangle
    in_mouth = (triangle >= int(_MOUTH[0])) & (triangle <= int(_MOUTH[-1]))
    upper = torch.from_numpy(np.isin(AVATAR_TRIANGLES, REGIONS["mouth_inner"][:11])).to(triangle.device)
    rows = torch.where(in_mouth, triangle, 0)
    weight_up = (binding.barycentric * upper[rows].to(binding.barycentric.dtype)).sum(1)
    return in_mouth & (weight_up > TEETH_WEIGHT)


def _lid_colour(avatar: Avatar) -> torch.Tensor:
    """(3,) median colour of the Gaussians on the skin around the upper lids' edges."""
    edges = np.concatenate([REGIONS["left_eye_upper"], REGIONS["right_eye_upper"]])
    on_lids = torch.isin(avatar.binding.triangle,
                         torch.from_numpy(np.flatnonzero(np.isin(TRIANGLES, edges).any(1))).to(avatar.device))
    colours = avatar.gaussians.colors[on_lids] if bool(on_lids.any()) else avatar.gaussians.colors
    return colours.median(0).values


def face_size(vertices: np.ndarray) -> float:
    """RMS distance of the face landmarks from their centroid: the scale of a face."""
    v = np.asarray(vertices, np.float64)[:FACE_LANDMARKS]
    return float(np.sqrt(((v - v.mean(0)) ** 2).sum(1).mean()))


def rebase_transform(driver: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Camera that shows the source moved as the driver moved away from frontal_transform().

    The driver's head rotation D = R_driver R_frontal^T is applied before the source camera
    (R = D R_source), and its shift from the frontal translation, re-expressed in the source camera,
    is added to the source's translation; a frontal driver gives the source photo's own camera.
    """
    frontal = frontal_transform().astype(np.float64)
    src = np.asarray(source, np.float64).reshape(3, 4)
    d = np.asarray(driver, np.float64).reshape(3, 4)
    to_source = frontal[:, :3].T @ src[:, :3]
    out = np.column_stack([d[:, :3] @ to_source, src[:, 3] + (d[:, 3] - frontal[:, 3]) @ to_source])
    return out.astype(np.float32)


def roll_in_camera(source: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The head's roll from camera `source` to `new` (3x4 transforms, as Camera's), as a rotation
    of the source camera's space (3x3, column vectors), without its turn or nod.

    The head turns about the canonical origin. Its roll is the twist about its own forward axis
    (canonical z) of its rotation between the two cameras: atan2 of that matrix's antisymmetric and
    trace parts in x and y, exact, and 0 for a pure turn or nod.
    """
    src = np.asarray(source, np.float64).reshape(3, 4)[:, :3]
    head = src @ np.asarray(new, np.float64).reshape(3, 4)[:, :3].T  # in its own frame
    roll = np.arctan2(head[1, 0] - head[0, 1], head[0, 0] + head[1, 1])
    return (src.T @ rotation("z", roll) @ src).astype(np.float32)


@dataclass
class Prepared:
    """What the geometric backend derives once per avatar to render it (Avatar.prepared)."""

    rest: Rest  # the deformation's rest pose (gaga_ros.avatar.deform)
    delta_scale: float  # the source's face size over the canonical one: expression motion scales by it
    teeth: torch.Tensor  # (N,) bool: the added teeth, which never grow with the mouth opening
    eyes: torch.Tensor  # (N,) bool: what the photo shows between the lids, gone when they close
    lid_colour: torch.Tensor  # (3,): what the eyes fade to as they close


class GeometricAvatar:
    """Photo -> mesh-bound RGB Gaussian head (AvatarBackend).

    FLAME-mode expressions are converted to MESH mode through the FLAME model in `models_dir`
    (None: $GAGA_ROS_MODELS or ./models); without one they are refused, saying how to get it.
    """

    name = "geometric"

    def __init__(self, grid: int = GRID, device: torch.device | str = "cpu",
                 raster_backend: str = "auto", background: tuple[float, float, float] = (0, 0, 0),
                 models_dir: str | None = None):
        if not GRID_RANGE[0] <= int(grid) <= GRID_RANGE[1]:
            raise InputError(f"grid {grid!r}: accepted is {GRID_RANGE[0]}..{GRID_RANGE[1]} lifted pixels "
                             "per side")
        self.grid = int(grid)
        self.device = torch.device(device)
        self.raster_backend = raster_backend
        self.background = torch.tensor(background, dtype=torch.float32)
        self.models_dir = models_dir
        self._converter: FaceConverter | None = None  # built on the first FLAME-mode expression (~1 s)
        self._landmarker: Any = None  # a FaceLandmarker, made on the first photo (mediapipe loads then)
        self._segmenter: Any = None

    # ---- reconstruction -------------------------------------------------------------------------

    def reconstruct(self, rgb: np.ndarray) -> Avatar:
        """Lift one photo into an avatar; NoFaceError if it holds no usable face."""
        from gaga_ros.tracking.mesh_tracker import fit_head

        if self._landmarker is None:
            self._landmarker = photo_landmarker()
        source = source_face(rgb, self._landmarker)
        crop = source.crop
        fit = fit_head(source.points, size=CROP_SIZE)
        neutral = np.asarray(fit.canonical_points, np.float64)
        layers = _Lifter(crop.image, self._matte(crop.image), neutral,
                         np.asarray(fit.transform, np.float64), self.grid).layers()
        arrays = {k: np.concatenate([layer[k] for layer in layers]) for k in layers[0]}
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in arrays.items()}
        gaussians = Gaussians(t["means"].float(), t["quats"].float(), t["scales"].float(),
                              t["opacities"].float(), t["colors"].float())
        binding = Binding(t["triangle"].long(), t["barycentric"].float(), t["offset"].float(),
                          t["follow"].float())
        avatar_id = content_id(crop.image.tobytes() + f"{self.name}:{self.grid}".encode())
        return Avatar(self.name, avatar_id, gaussians, binding,
                      torch.from_numpy(neutral.astype(np.float32)).to(self.device),
                      torch.from_numpy(AVATAR_TRIANGLES).to(self.device),
                      np.asarray(fit.transform, np.float32), warnings=source.notes)

    def _matte(self, crop: np.ndarray) -> np.ndarray:
        """Soft person matte (H, W) in [0, 1] of the crop (mediapipe selfie segmentation)."""
        from mediapipe.python.solutions import selfie_segmentation

        if self._segmenter is None:
            self._segmenter = selfie_segmentation.SelfieSegmentation(model_selection=0)
        mask = self._segmenter.process(crop).segmentation_mask
        return np.clip(np.asarray(mask, np.float32), 0.0, 1.0)

    # ---- rendering ------------------------------------------------------------------------------

    def to_mesh(self, expression: Expression) -> Expression:
        """The expression in MESH mode: FLAME-mode ones through the FLAME model's landmarks."""
        if expression.face_model is FaceModel.MESH:
            return expression
        if self._converter is None:
            try:
                self._converter = FaceConverter.from_models(self.models_dir)
            except FileNotFoundError as exc:
                raise ExpressionError(f"the geometric backend renders FLAME-mode expressions through "
                                      f"a FLAME model: {exc}") from None
        return self._converter.to_mesh(expression)

    def driven_vertices(self, avatar: Avatar, expression: Expression) -> torch.Tensor:
        """The source's mesh moved by the expression's motion (never its shape), canonical frame."""
        expression = self.to_mesh(expression)
        delta = torch.from_numpy(expression.vertices - CANONICAL_VERTICES).to(avatar.device)
        return avatar.neutral_vertices + self.prepared(avatar).delta_scale * delta

    def prepared(self, avatar: Avatar) -> Prepared:
        """The avatar's Prepared state, derived on its first frame."""
        if not isinstance(avatar.prepared, Prepared):
            scale = face_size(avatar.neutral_vertices.cpu().numpy()) / face_size(CANONICAL_VERTICES)
            eyes = torch.isin(avatar.binding.triangle, torch.from_numpy(_EYES).to(avatar.device))
            avatar.prepared = Prepared(Rest(avatar), scale, _teeth(avatar.binding), eyes,
                                       _lid_colour(avatar))
        return avatar.prepared

    def scene(self, avatar: Avatar, expression: Expression,
              size: int = CROP_SIZE) -> tuple[Gaussians, Camera]:
        """The deformed Gaussians and the camera that show `avatar` driven by `expression`."""
        if not RENDER_SIZES[0] <= int(size) <= RENDER_SIZES[1]:
            raise InputError(f"render size {size!r}: accepted is {RENDER_SIZES[0]}..{RENDER_SIZES[1]} "
                             "pixels per side")
        expression = self.to_mesh(expression)
        prepared = self.prepared(avatar)
        vertices = self.driven_vertices(avatar, expression)
        pose = prepared.rest.pose(vertices, avatar.triangles)
        means, quats, growth = deform(avatar, vertices, prepared.rest, prepared.eyes, pose)
        transform = rebase_transform(expression.transform, avatar.source_transform)
        fixed = avatar.binding.triangle == CAMERA_FIXED
        src = torch.from_numpy(avatar.source_transform.astype(np.float32)).to(avatar.device)
        new = torch.from_numpy(transform).to(avatar.device)
        partial = avatar.binding.follow < 1
        stretch = None
        if bool(partial.any()):
            # What does not wholly follow the head (the torso, the crop's edges) stays where the
            # source camera saw it but for its share of the head's motion: the head's turn undone
            # for the rest of it.
            cam = avatar.gaussians.means[partial] @ src[:, :3] + src[:, 3]
            still = (cam - new[:, 3]) @ new[:, :3].T
            follow = avatar.binding.follow[partial]
            # the torso's share is of the head's roll and shift alone: shoulders do not turn with a
            # shake of the head, and a torso that did cost the transfer bench's yaw 0.03
            # (bench/TRANSFER_NOTES.md, seventh pass)
            moved, torso = means[partial], fixed[partial]
            if bool(torso.any()):
                spin = torch.from_numpy(roll_in_camera(avatar.source_transform, transform)).to(avatar.device)
                moved[torso] = ((cam[torso] - src[:, 3]) @ spin.T) @ new[:, :3].T
            means[partial] = follow[:, None] * moved + (1 - follow[:, None]) * still
            # Where the share falls off it stretches the layer by about the gap over FOLLOW_SPAN.
            bending = (follow > 0) & (follow < 1)
            stretch = 1 + bending * (moved - still).norm(dim=1) / (FOLLOW_SPAN * prepared.delta_scale)
        if bool(fixed.any()):  # the torso keeps the orientation the source camera saw
            turn = (new[:, :3] @ src[:, :3].T).expand(int(fixed.sum()), 3, 3)
            quats[fixed] = matrix_to_quat(turn @ quat_to_matrix(quats[fixed]))
        # Teeth bound to a mouth that is closed in the photo would grow with the opening's area
        # (up to STRETCH_RANGE's 3x) and cover the dark interior, so that the opening reads as closed.
        shrunk = growth.clamp(max=1.0)
        growth = torch.where(prepared.teeth, shrunk, growth)
        g = avatar.gaussians
        # The photo's eye between the lids (no eyeball behind them here) shrinks as they close and fades
        # to the lids' skin by the opening's area, so a blink shows a closed eye, not a squashed iris.
        opened = shrunk[:, None]  # eyes and teeth are apart: the teeth's clamp leaves the eyes' as it was
        lid = prepared.lid_colour
        colors = torch.where(prepared.eyes[:, None], lid + (g.colors - lid) * opened, g.colors)
        scales = g.scales * growth[:, None]
        if stretch is not None:
            scales[partial] = scales[partial] * stretch[:, None]
        # An eye opened past the photo's lids stretches its content upward, not evenly (no stripes).
        wide, wide_quats, wide_scales = stretched(avatar, vertices, prepared.rest, pose, prepared.eyes)
        quats[wide], scales[wide] = wide_quats, wide_scales
        gaussians = Gaussians(means, quats, scales, g.opacities, colors)
        return gaussians, Camera.from_transform(transform, int(size))

    def render(self, avatar: Avatar, expression: Expression, size: int = CROP_SIZE) -> np.ndarray:
        """RGB uint8 (size, size, 3) image of the avatar driven by `expression`."""
        from gaga_ros.render.rasterize import rasterize

        gaussians, camera = self.scene(avatar, expression, size)
        result = rasterize(gaussians, camera, self.background.to(avatar.device), self.raster_backend)
        image = to_uint8(result.image)
        return image.cpu().numpy()


@dataclass(frozen=True)
class _FrontView:
    """What the forward lift saw that the backward lift reuses."""

    hair_colour: np.ndarray | None  # median RGB of the hair above the eyes; None: too little hair
    face_pixels: np.ndarray  # (grid, grid) bool: lifted pixels on the face mesh
    depth: np.ndarray  # (grid, grid) deepest lifted pixel within BACK_REACH // 2 pixels, -inf: none


class _Lifter:
    """Dual lifting of one head crop onto its fitted mesh (numpy, float64, runs once per photo)."""

    def __init__(self, crop: np.ndarray, matte: np.ndarray, neutral: np.ndarray,
                 transform: np.ndarray, grid: int):
        self.crop, self.matte, self.neutral, self.grid = crop, matte, neutral, grid
        self.camera = Camera.from_transform(transform, CROP_SIZE)
        rot, trans = transform[:, :3], transform[:, 3]
        self.eye = -trans @ rot.T  # camera centre in the canonical frame
        self.scale = scale = face_size(neutral) / face_size(CANONICAL_VERTICES)
        self.centre = HEAD_CENTRE * scale + neutral[:FACE_LANDMARKS].mean(0) - scale * (
            CANONICAL_VERTICES[:FACE_LANDMARKS].mean(0))
        self.radii = HEAD_RADII * scale
        self.pixel = CROP_SIZE / grid  # crop pixels per lifted pixel
        self.focal = float(self.camera.K[0, 0])
        # Nearest steady vertex and one triangle holding it, for points off the face surface.
        self.vertex_triangle = np.full(len(neutral), -1, np.int64)
        self.vertex_corner = np.zeros(len(neutral), np.int64)
        for f, tri in enumerate(TRIANGLES):
            for k, v in enumerate(tri):
                self.vertex_triangle[v], self.vertex_corner[v] = f, k

    def layers(self) -> list[dict[str, np.ndarray]]:
        front, seen = self.front()
        return [front, self.back(seen), self.mouth()]

    # -- geometry helpers

    def _rays(self, uv: np.ndarray) -> np.ndarray:
        """Unit world directions (N,3) of the rays through crop pixels uv (N,2)."""
        k = self.camera.K.astype(np.float64)
        cam = np.stack([(uv[:, 0] - k[0, 2]) / k[0, 0], (uv[:, 1] - k[1, 2]) / k[1, 1],
                        np.ones(len(uv))], 1)
        world = cam @ self.camera.viewmat[:3, :3].astype(np.float64)  # R^T applied to rows
        return world / np.linalg.norm(world, axis=1, keepdims=True)

    def _unproject(self, uv: np.ndarray, depth: np.ndarray) -> np.ndarray:
        k, view = self.camera.K.astype(np.float64), self.camera.viewmat.astype(np.float64)
        cam = np.stack([(uv[:, 0] - k[0, 2]) / k[0, 0] * depth, (uv[:, 1] - k[1, 2]) / k[1, 1] * depth,
                        depth], 1)
        return (cam - view[:3, 3]) @ view[:3, :3]

    def _ellipsoid_depth(self, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Camera depth of each ray's first hit on the head ellipsoid, and whether it hit; a miss
        gets the depth of the ray's closest approach to the ellipsoid centre."""
        d = self._rays(uv) / self.radii
        o = (self.eye - self.centre) / self.radii
        a, b, c = (d * d).sum(1), 2 * (d @ o), o @ o - 1
        disc = b * b - 4 * a * c
        hit = disc > 0
        s = np.where(hit, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), -b / (2 * a))
        points = self.eye + s[:, None] * self._rays(uv)
        return self.camera.depth(points.astype(np.float32)).astype(np.float64), hit

    def _raster(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per lifted pixel: the avatar triangle it sees (-1: none), its barycentrics, its depth."""
        g = self.grid
        xy = self.camera.project(self.neutral.astype(np.float32)).astype(np.float64) / self.pixel
        depth = self.camera.depth(self.neutral.astype(np.float32)).astype(np.float64)
        tri_id = np.full((g, g), -1, np.int64)
        zbuf = np.full((g, g), np.inf)
        bary = np.zeros((g, g, 3))
        for f, (a, b, c) in enumerate(AVATAR_TRIANGLES):
            p0, p1, p2 = xy[a], xy[b], xy[c]
            lo = np.maximum(np.floor(np.minimum(np.minimum(p0, p1), p2) - 0.5).astype(int), 0)
            hi = np.minimum(np.ceil(np.maximum(np.maximum(p0, p1), p2) - 0.5).astype(int), g - 1)
            if (hi < lo).any():
                continue
            ys, xs = np.mgrid[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
            px, py = xs + 0.5 - p0[0], ys + 0.5 - p0[1]
            e1, e2 = p1 - p0, p2 - p0
            den = e1[0] * e2[1] - e2[0] * e1[1]
            if abs(den) < 1e-9:
                continue
            w1 = (px * e2[1] - e2[0] * py) / den
            w2 = (e1[0] * py - px * e1[1]) / den
            w0 = 1 - w1 - w2
            inside = (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6)
            z = w0 * depth[a] + w1 * depth[b] + w2 * depth[c]
            win = inside & (z < zbuf[ys, xs])
            yy, xx = ys[win], xs[win]
            zbuf[yy, xx], tri_id[yy, xx] = z[win], f
            bary[yy, xx] = np.stack([w0[win], w1[win], w2[win]], 1)
        return tri_id, bary, zbuf

    def _bind_nearest(self, points: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bind points to the nearest of the candidate vertices: (triangle, one-hot barycentric)."""
        from scipy.spatial import cKDTree

        candidates = candidates[self.vertex_triangle[candidates] >= 0]
        _, idx = cKDTree(self.neutral[candidates]).query(points)
        vertex = candidates[idx]
        bary = np.zeros((len(points), 3))
        bary[np.arange(len(points)), self.vertex_corner[vertex]] = 1.0
        return self.vertex_triangle[vertex], bary

    def _facing(self, points: np.ndarray) -> np.ndarray:
        """Quaternions (N,4) turning each Gaussian's local z towards the source camera."""
        d = self.eye - points
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        t = np.cross(np.array([0.0, 1.0, 0.0]), d)
        t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        frames = torch.from_numpy(np.stack([t, np.cross(d, t), d], -1))
        return matrix_to_quat(frames).numpy()

    # -- layers

    def front(self) -> tuple[dict[str, np.ndarray], _FrontView]:
        """Forward lift: one Gaussian per head pixel, on the mesh or the head ellipsoid; and what it
        saw of the hair and the face, for the backward lift."""
        g = self.grid
        colours = cv2.resize(self.crop, (g, g), interpolation=cv2.INTER_AREA) / 255.0
        matte = cv2.resize(self.matte, (g, g), interpolation=cv2.INTER_AREA)
        tri_id, bary, zbuf = self._raster()
        keep = (matte > MATTE_KEEP) | (tri_id >= 0)
        ys, xs = np.nonzero(keep)
        uv = np.stack([xs + 0.5, ys + 0.5], 1) * self.pixel
        tri, b = tri_id[ys, xs], bary[ys, xs]
        ell_depth, ell_hit = self._ellipsoid_depth(uv)
        on_mesh = tri >= 0
        depth = np.where(on_mesh, zbuf[ys, xs], ell_depth + self._seam_correction(
            tri_id, zbuf, ys, xs, ell_depth))
        # What the source shows inside its mouth (teeth, tongue) follows the nearest lip, set back
        # behind the lips so that a closing mouth hides it rather than smearing it over the skin.
        in_mouth = np.isin(tri, _MOUTH)
        depth[in_mouth] += SOURCE_MOUTH_DEPTH * self.scale
        points = self._unproject(uv, depth)
        triangle, barycentric = tri.copy(), b.copy()
        if in_mouth.any():
            triangle[in_mouth], barycentric[in_mouth] = self._bind_nearest(points[in_mouth], _LIPS)
        off = ~on_mesh
        jaw_uv = self.camera.project(self.neutral[REGIONS["jaw"]].astype(np.float32)).astype(np.float64)
        chin_v = jaw_uv[:, 1].max()
        body = off & ~ell_hit & (uv[:, 1] > chin_v)
        head_off = off & ~body
        # Off the mesh just below the jaw line is the photo's chin where the fitted mesh ends above
        # it. It stays with the steady upper face (so the face's outline holds still while the mouth
        # moves), set back so that the chin, which an opening jaw moves down and back, covers it
        # rather than letting it show through as a dark line.
        mouth_v = self.camera.project(self.neutral[REGIONS["mouth_inner"]].astype(np.float32))[:, 1].max()
        reach = np.linalg.norm(uv[:, None] - jaw_uv[None], axis=2).min(1)
        chin = head_off & (uv[:, 1] > mouth_v) & (reach < CHIN_REACH * CROP_SIZE)
        if chin.any():
            points[chin] = self._unproject(uv[chin], depth[chin] + CHIN_SETBACK * self.scale)
        if head_off.any():
            triangle[head_off], barycentric[head_off] = self._bind_nearest(points[head_off], _STEADY)
        triangle[body] = CAMERA_FIXED
        barycentric[body] = 0.0
        follow = self._follow(keep, ys, xs, body, on_mesh, uv)
        sigma = FRONT_SIGMA * self.pixel * depth / self.focal
        # Thicken along the view ray where depth changes fast between neighbours (hair and cheeks
        # seen at a grazing angle), so a turned head shows no gaps between the layers of pixels.
        image = np.full((g + 2, g + 2), np.nan)
        image[ys + 1, xs + 1] = depth
        steps = [np.abs(image[ys + 1 + dy, xs + 1 + dx] - depth)
                 for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))]
        step = np.nan_to_num(np.fmax.reduce(steps), nan=0.0)  # fmax: an isolated pixel has no step
        thickness = np.clip(THICKEN * step, THICKNESS_RANGE[0] * sigma, THICKNESS_RANGE[1] * sigma)
        hair = off & ~body & (uv[:, 1] < self.camera.project(
            self.neutral[REGIONS["left_iris"]].astype(np.float32))[:, 1].min())
        from scipy import ndimage

        front_depth = np.full((g, g), -np.inf)
        front_depth[ys, xs] = depth
        seen = _FrontView(np.median(colours[ys[hair], xs[hair]], axis=0) if hair.sum() > HAIR_MIN_PIXELS
                          else None, tri_id >= 0, ndimage.maximum_filter(front_depth, size=BACK_REACH))
        opacity = np.where(on_mesh, 1.0, np.clip((matte[ys, xs] - MATTE_KEEP) / MATTE_RAMP, 0, 1)) * OPACITY
        # The neck again, fixed to the torso and set back, so the torso shows no gap
        # when the head lifts or turns above it.
        fill = off & ~body & (uv[:, 1] > chin_v - SEAM_BAND * CROP_SIZE)
        fill_points = self._unproject(uv[fill], depth[fill] + SEAM_DEPTH * self.scale)
        triangle = np.r_[triangle, np.full(fill.sum(), CAMERA_FIXED)]
        follow = np.r_[follow, np.zeros(fill.sum())]  # the fill stays: it shows what the head uncovers
        barycentric = np.r_[barycentric, np.zeros((fill.sum(), 3))]
        points = np.r_[points, fill_points]
        return {
            "means": points, "quats": self._facing(points),
            "scales": np.r_[np.stack([sigma, sigma, thickness], 1),
                            np.stack([sigma[fill]] * 3, 1)],
            "opacities": np.r_[opacity, opacity[fill]],
            "colors": np.r_[colours[ys, xs], colours[ys[fill], xs[fill]]], "triangle": triangle,
            "barycentric": barycentric, "offset": np.zeros(len(points)), "follow": follow,
        }, seen

    def _follow(self, keep: np.ndarray, ys: np.ndarray, xs: np.ndarray, body: np.ndarray,
                on_mesh: np.ndarray, uv: np.ndarray) -> np.ndarray:
        """Each lifted pixel's share of the head's motion (Binding.follow; see FOLLOW_SPAN)."""
        from scipy import ndimage

        head = np.zeros_like(keep)
        head[ys[~body], xs[~body]] = True
        centre_depth = self.camera.depth(self.centre[None].astype(np.float32))[0]
        units = self.pixel * centre_depth / self.focal  # canonical units per lifted pixel at the head
        apart = ndimage.distance_transform_edt(~head)[ys, xs] * units
        share = np.where(body, np.clip(1 - apart / (FOLLOW_SPAN * self.scale), 0, 1), 1.0)
        border = np.minimum(np.minimum(uv[:, 0], CROP_SIZE - uv[:, 0]), CROP_SIZE - uv[:, 1])
        share *= np.clip(border / (FOLLOW_EDGE * CROP_SIZE), 0, 1)
        return np.where(on_mesh, 1.0, share)

    def _seam_correction(self, tri_id: np.ndarray, zbuf: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                         ell_depth: np.ndarray) -> np.ndarray:
        """Depth offsets for off-mesh pixels that make the ellipsoid meet the mesh edge: the
        mesh-to-ellipsoid step at the nearest mesh pixel, fading out over SEAM_BLEND of the crop."""
        from scipy import ndimage

        g = self.grid
        ell = np.zeros((g, g))
        ell[ys, xs] = ell_depth
        mesh = tri_id >= 0
        step = np.where(mesh, zbuf - ell, 0.0)
        dist, (iy, ix) = ndimage.distance_transform_edt(~mesh, return_indices=True)
        fade = np.exp(-((dist / (SEAM_BLEND * g)) ** 2))
        return (step[iy, ix] * fade)[ys, xs]

    def back(self, seen: _FrontView) -> dict[str, np.ndarray]:
        """Backward lift: the ellipsoid's far half, coloured by mirroring the front through the
        head's mid-plane, so a turned head shows no hole."""
        centre_depth = self.camera.depth(self.centre[None].astype(np.float32))[0]
        spacing = BACK_SPACING * self.pixel * centre_depth / self.focal
        area = 4 * np.pi * (np.prod(self.radii) ** (2 / 3))
        n = int(area / spacing**2)
        k = np.arange(n) + 0.5
        z = 1 - 2 * k / n
        phi = np.pi * (1 + 5**0.5) * k
        r = np.sqrt(1 - z * z)
        unit = np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)
        view = (self.eye - self.centre) / np.linalg.norm(self.eye - self.centre)
        unit = unit[unit @ view < 0]  # the half the source camera did not see
        points = self.centre + unit * self.radii
        # Near the silhouette the far half reaches the front layer's depth, and there it showed in
        # front of the face's sides as grey lines even in the source's own view: such points go
        # back along their ray, BACK_CLEARANCE of the depth radius behind the front layer.
        own = self.camera.project(points.astype(np.float32)).astype(np.float64)
        cell = np.clip((own / self.pixel).astype(int), 0, self.grid - 1)
        behind = seen.depth[cell[:, 1], cell[:, 0]] + BACK_CLEARANCE * self.radii[2]
        close = np.isfinite(behind) & (self.camera.depth(points.astype(np.float32)) < behind)
        points[close] = self._unproject(own[close], behind[close])
        mirrored = points - 2 * ((points - self.centre) @ view)[:, None] * view
        uv = self.camera.project(mirrored.astype(np.float32))
        inside = ((uv >= 0) & (uv < CROP_SIZE - 1)).all(1)
        points, uv = points[inside], uv[inside]
        px = uv.astype(int)
        keep = self.matte[px[:, 1], px[:, 0]] > BACK_MATTE
        points, px = points[keep], px[keep]
        blurred = cv2.GaussianBlur(self.crop, (0, 0), BACK_BLUR_PX) / 255.0
        colours = blurred[px[:, 1], px[:, 0]]
        if seen.hair_colour is not None:  # a face seen from behind is hair, not a mirrored face
            g = self.grid
            on_face = seen.face_pixels[(px[:, 1] * g) // CROP_SIZE, (px[:, 0] * g) // CROP_SIZE]
            colours[on_face] = seen.hair_colour
        triangle, barycentric = self._bind_nearest(points, _STEADY)
        sigma = np.full(len(points), BACK_SIGMA * spacing)
        return {
            "means": points, "quats": self._facing(points), "scales": np.stack([sigma] * 3, 1),
            "opacities": np.full(len(points), OPACITY), "colors": colours * BACK_SHADE,
            "triangle": triangle, "barycentric": barycentric, "offset": np.zeros(len(points)),
            "follow": np.ones(len(points)),
        }

    def mouth(self) -> dict[str, np.ndarray]:
        """A dark mouth interior with upper teeth, behind the lips, spanning the mouth opening."""
        steps = MOUTH_STEPS
        i, j = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1), indexing="ij")
        ok = i + j <= steps
        grid = np.stack([steps - i[ok] - j[ok], i[ok], j[ok]], 1) / steps  # barycentric lattice
        triangle = np.repeat(_MOUTH, len(grid))
        barycentric = np.tile(grid, (len(_MOUTH), 1))
        scale = face_size(self.neutral) / face_size(CANONICAL_VERTICES)
        offset = np.zeros(len(triangle))
        binding = Binding(torch.from_numpy(triangle), torch.from_numpy(barycentric),
                          torch.from_numpy(offset), torch.ones(len(triangle)))
        teeth = _teeth(binding).numpy()
        colours = np.where(teeth[:, None], TEETH_COLOUR, MOUTH_COLOUR)
        on_opening = anchors(torch.from_numpy(self.neutral), torch.from_numpy(AVATAR_TRIANGLES),
                             binding).numpy()
        # Set back along the head's -z, not the opening's normal: a pinched mouth folds the
        # opening triangles, and a normal offset would then push the interior out past the lips.
        depth = np.where(teeth, TEETH_DEPTH, MOUTH_DEPTH) * scale
        points = on_opening - depth[:, None] * np.array([0.0, 0.0, 1.0])
        sigma = np.full(len(points), MOUTH_SIGMA * scale)
        return {
            "means": points, "quats": self._facing(points), "scales": np.stack([sigma] * 3, 1),
            "opacities": np.full(len(points), OPACITY), "colors": colours, "triangle": triangle,
            "barycentric": barycentric, "offset": offset, "follow": np.ones(len(points)),
        }
