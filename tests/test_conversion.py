"""MESH <-> FLAME conversion in the core (synthetic FLAME): exact where FLAME can follow the mesh,
head pose carried through the registration, and a clear error without a FLAME model."""

import numpy as np
import pytest

from gaga_ros.camera import frontal_transform
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.conversion import FaceConverter, project
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, REGIONS
from gaga_ros.faces.synthetic_flame import make_synthetic_flame

CHIN = 152


@pytest.fixture(scope="module")
def converter():
    return FaceConverter(make_synthetic_flame(seed=0))


def flame(converter, **fields) -> Expression:
    """A FLAME-mode expression seen by the camera that sees the canonical face frontally."""
    camera = converter.to_flame(Expression(FaceModel.MESH, vertices=CANONICAL_VERTICES)).transform
    return Expression(FaceModel.FLAME, transform=camera, **fields)


def frontal_px(vertices: np.ndarray) -> np.ndarray:
    return project(vertices, frontal_transform())


def open_jaw_mesh(angle: float) -> np.ndarray:
    """The canonical face with its lower face turned down about a hinge below the ears."""
    lower = np.setdiff1d(np.union1d(np.union1d(REGIONS["lips_lower"], REGIONS["lower_face"]), REGIONS["jaw"]),
                         REGIONS["mouth_inner"][:11])
    pivot = np.array([0.0, -0.12, -0.25])
    c, s = np.cos(angle), np.sin(angle)
    turn = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # +angle: the chin goes down and back
    out = CANONICAL_VERTICES.copy()
    out[lower] = (out[lower] - pivot) @ turn.T + pivot
    return out


def test_neutral_face_is_neutral_flame_and_back(converter):
    converter.reset()
    neutral = Expression(FaceModel.MESH, vertices=CANONICAL_VERTICES, stamp_ns=7, confidence=0.9)
    out = converter.to_flame(neutral)
    assert out.face_model is FaceModel.FLAME and out.stamp_ns == 7 and out.confidence == pytest.approx(0.9)
    assert np.abs(out.expression).max() < 1e-3 and np.abs(out.jaw_pose).max() < 1e-3
    back = converter.to_mesh(out)
    assert back.face_model is FaceModel.MESH
    # the registration's offsets make the neutral exact, up to float32
    assert np.abs(back.vertices - CANONICAL_VERTICES).max() < 1e-4
    assert np.abs(back.transform - frontal_transform()).max() < 1e-4


def test_round_trip_is_exact_where_flame_can_follow(converter):
    """FLAME -> MESH -> FLAME -> MESH: the mesh is one FLAME can make, so the fit finds it again.

    Bound: 0.5 px mean in the frontal 512 crop (measured ~0.1; the fit's priors pull slightly toward
    neutral) and 0.02 canonical units mean in 3-D (measured ~0.008: the fit sees the landmarks in
    the image, so motion along the view direction is only constrained through FLAME's bases), with
    motions up to ~0.2 units (70 px)."""
    rng = np.random.default_rng(1)
    for _ in range(3):
        truth = flame(converter, expression=0.8 * rng.normal(size=50), jaw_pose=[0.15, 0, 0],
                      eye_pose=[0.1, 0.05, 0, 0.1, 0.05, 0])
        mesh = converter.to_mesh(truth)
        converter.reset()
        fitted = converter.to_flame(mesh)
        again = converter.to_mesh(fitted)
        motion = np.linalg.norm(mesh.vertices - CANONICAL_VERTICES, axis=1).max()
        assert motion > 0.1, "the test expression must move the face"
        px = np.linalg.norm(frontal_px(again.vertices) - frontal_px(mesh.vertices), axis=1)
        assert px.mean() < 0.5, px.mean()
        assert np.linalg.norm(again.vertices - mesh.vertices, axis=1).mean() < 0.02
        assert fitted.jaw_pose == pytest.approx(truth.jaw_pose, abs=0.02)
        assert fitted.eye_pose == pytest.approx(truth.eye_pose, abs=0.01)


def test_open_jaw_mesh_gives_a_jaw_opening(converter):
    converter.reset()
    opened = converter.to_mesh(flame(converter, jaw_pose=[0.25, 0, 0]))
    converter.reset()
    fitted = converter.to_flame(opened)
    assert fitted.jaw_pose[0] == pytest.approx(0.25, abs=0.02)
    assert np.abs(fitted.jaw_pose[1:]).max() < 0.02
    # A jaw opened the mediapipe way (about a hinge below the ears) by 0.1 rad: the synthetic FLAME
    # has no lips and its jaw moves both of them, so it follows with its expression bases; the chin
    # must still go down, by a good part (measured: 47%).
    converter.reset()
    mesh = Expression(FaceModel.MESH, vertices=open_jaw_mesh(0.1))
    back = converter.to_mesh(converter.to_flame(mesh))
    drop_in = CANONICAL_VERTICES[CHIN, 1] - mesh.vertices[CHIN, 1]
    drop_out = CANONICAL_VERTICES[CHIN, 1] - back.vertices[CHIN, 1]
    assert drop_in > 0.05 and drop_out > 0.3 * drop_in, (drop_in, drop_out)


def test_head_pose_goes_through_the_camera_not_the_expression(converter):
    """A turned head changes only the camera: the same motion gives the same FLAME expression, and
    the camera maps back exactly."""
    yaw = np.radians(30)
    turn = np.array([[np.cos(yaw), 0, -np.sin(yaw)], [0, 1, 0], [np.sin(yaw), 0, np.cos(yaw)]])
    front = frontal_transform()
    turned = np.column_stack([turn @ front[:, :3], front[:, 3] + [0.3, -0.2, 1.0]])
    vertices = open_jaw_mesh(0.1)
    converter.reset()
    a = converter.to_flame(Expression(FaceModel.MESH, vertices=vertices))
    converter.reset()
    b = converter.to_flame(Expression(FaceModel.MESH, transform=turned, vertices=vertices))
    assert np.abs(a.expression - b.expression).max() < 1e-4
    assert np.abs(a.transform - b.transform).max() > 0.1
    assert np.abs(converter.to_mesh(b).transform - turned).max() < 1e-4


def test_warm_start_follows_a_stream(converter):
    """Frame after frame of a closing jaw, each fit warm-started from the last, stays on the motion."""
    converter.reset()
    for angle in np.linspace(0.2, 0.0, 6):
        mesh = converter.to_mesh(flame(converter, jaw_pose=[angle, 0, 0]))
        fitted = converter.to_flame(mesh)
        assert fitted.jaw_pose[0] == pytest.approx(angle, abs=0.03)
        assert converter.last_error_px < 0.5


def test_without_flame_the_error_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch-assets") as exc:
        FaceConverter.from_models(tmp_path)
    assert "FLAME" in str(exc.value) and "flame/FLAME_with_eye.pt" in str(exc.value)
