"""The driving signal of an avatar, as a plain validated value (the ROS message's core twin)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from gaga_ros.camera import frontal_transform
from gaga_ros.conventions import MAX_EXPRESSION_COEFFS, MESH_LANDMARKS
from gaga_ros.errors import InputError


class FaceModel(IntEnum):
    """Which face model produced an expression (values match Expression.msg)."""

    FLAME = 0
    MESH = 1


class ExpressionError(InputError):
    """An expression that cannot drive an avatar; the message says what is accepted."""


#: Largest head translation accepted, in GAGAvatar units (the camera sits about 9 away).
MAX_TRANSLATION = 100.0
#: Largest joint rotation accepted, radians (a full turn).
MAX_ROTATION = 2 * np.pi
#: Nearest head accepted, camera-space depth of the head's origin. The head reaches about one unit
#: from its origin (FLAME scaled by FLAME_SCALE), so at 2 all of it is in front of the camera; the
#: frontal camera sits at CAMERA_DISTANCE = 9.
MIN_DEPTH = 2.0
#: Largest mesh landmark coordinate accepted. Canonical landmarks span about +-0.55 and tracked ones
#: about +-0.65 (measured on the shared clips); 2 leaves room for any real face and refuses nonsense.
MAX_VERTEX = 2.0
#: Largest FLAME expression coefficient accepted (fitted ones stay within a few units).
MAX_COEFF = 10.0


@dataclass
class Expression:
    """One driving frame; see msg/Expression.msg for each field's meaning and units."""

    face_model: FaceModel
    transform: np.ndarray = field(default_factory=frontal_transform)
    stamp_ns: int = 0
    frame_id: str = ""
    expression: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    jaw_pose: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    neck_pose: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    eye_pose: np.ndarray = field(default_factory=lambda: np.zeros(6, np.float32))
    vertices: np.ndarray | None = None
    confidence: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ExpressionError naming the first field that is malformed, and what is accepted."""
        try:
            self.face_model = FaceModel(int(self.face_model))
        except ValueError:
            raise ExpressionError(
                f"unknown face_model {self.face_model!r}: accepted are "
                f"{FaceModel.FLAME.value} (FLAME) and {FaceModel.MESH.value} (mesh)") from None
        self.transform = _array("transform", self.transform, (3, 4), flat_ok=12)
        self.expression = _array("expression", self.expression, None)
        if self.expression.ndim != 1 or self.expression.size > MAX_EXPRESSION_COEFFS:
            raise ExpressionError(
                f"expression has shape {self.expression.shape}: accepted is a flat array of 0 to "
                f"{MAX_EXPRESSION_COEFFS} FLAME coefficients")
        _bounded("expression", self.expression, MAX_COEFF, "FLAME coefficients")
        self.jaw_pose = _array("jaw_pose", self.jaw_pose, (3,))
        self.neck_pose = _array("neck_pose", self.neck_pose, (3,))
        self.eye_pose = _array("eye_pose", self.eye_pose, (6,))
        if self.vertices is not None and np.size(self.vertices) == 0:
            self.vertices = None
        if self.vertices is not None:
            self.vertices = _array("vertices", self.vertices, (MESH_LANDMARKS, 3),
                                   flat_ok=MESH_LANDMARKS * 3)
            _bounded("vertices", self.vertices, MAX_VERTEX, "canonical landmark coordinates")
        if self.face_model is FaceModel.MESH and self.vertices is None:
            raise ExpressionError(
                f"mesh-mode expression without vertices: accepted are {MESH_LANDMARKS}x3 "
                "canonical landmarks")
        rot = self.transform[:, :3]
        if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-2) or np.linalg.det(rot) < 0:
            raise ExpressionError(
                "transform's 3x3 part is not a rotation (R R^T = I, det R = +1): accepted is "
                "[R | T] in the GAGAvatar camera convention")
        if np.abs(self.transform[:, 3]).max() > MAX_TRANSLATION:
            raise ExpressionError(
                f"transform translation {self.transform[:, 3].tolist()} is absurd: accepted is "
                f"|T| <= {MAX_TRANSLATION} (a head about 9 units from the camera)")
        if self.transform[2, 3] < MIN_DEPTH:
            raise ExpressionError(
                f"transform puts the head {self.transform[2, 3]:.3g} units in front of the camera: "
                f"accepted is T_z >= {MIN_DEPTH} (the camera in front of the face; frontal is 9)")
        for name in ("jaw_pose", "neck_pose", "eye_pose"):
            if np.abs(getattr(self, name)).max() > MAX_ROTATION:
                raise ExpressionError(
                    f"{name} has a rotation above {MAX_ROTATION:.2f} rad: accepted are axis-angle "
                    "vectors of at most one turn")
        if not (np.isfinite(self.confidence) and 0.0 <= self.confidence <= 1.0):
            raise ExpressionError(f"confidence {self.confidence!r} is outside [0, 1]")

    def expression_padded(self, n: int = MAX_EXPRESSION_COEFFS) -> np.ndarray:
        """FLAME expression coefficients padded with zeros to length n."""
        out = np.zeros(n, np.float32)
        out[: self.expression.size] = self.expression[:n]
        return out


def _bounded(name: str, arr: np.ndarray, limit: float, what: str) -> None:
    if arr.size and np.abs(arr).max() > limit:
        raise ExpressionError(f"{name} reaches {np.abs(arr).max():.3g}: accepted are {what} within "
                              f"+-{limit}")


def _array(name: str, value, shape: tuple[int, ...] | None, flat_ok: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ExpressionError(f"{name} is not numeric: accepted are arrays of numbers") from None
    if shape is not None:
        if flat_ok is not None and arr.size == flat_ok:
            arr = arr.reshape(shape)
        if arr.shape != shape:
            raise ExpressionError(
                f"{name} has shape {arr.shape} ({arr.size} values): accepted is {shape}")
    if not np.all(np.isfinite(arr)):
        raise ExpressionError(f"{name} contains NaN or infinite values: accepted are finite numbers")
    return arr
