"""The scripted driver: deterministic, looping, smooth, and every action actually happens."""

import itertools

import numpy as np
import pytest

from gaga_ros.camera import frontal_transform
from gaga_ros.driver import ScriptedDriver
from gaga_ros.expression import FaceModel
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, REGIONS

INNER = REGIONS["mouth_inner"]
UPPER_LIP, LOWER_LIP = 13, 14  # inner-lip midpoints


def angle_deg(transform: np.ndarray) -> float:
    rel = transform[:, :3] @ frontal_transform()[:, :3].T
    return float(np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1, 1))))


def frames(driver: ScriptedDriver):
    n = int(round(driver.period * driver.fps))
    return [driver.expression_at(i / driver.fps) for i in range(n)]


@pytest.fixture(scope="module")
def loop():
    return frames(ScriptedDriver(fps=30, seed=0))


def test_expressions_are_valid_mesh_mode(loop):
    for e in loop[::15]:
        assert e.face_model is FaceModel.MESH
        assert e.vertices.shape == (478, 3) and e.vertices.dtype == np.float32
        e.validate()


def test_deterministic_and_looping():
    a, b = ScriptedDriver(seed=3), ScriptedDriver(seed=3)
    for t in (0.0, 1.234, 7.5, 12.9):
        np.testing.assert_array_equal(a.expression_at(t).vertices, b.expression_at(t).vertices)
        np.testing.assert_allclose(a.expression_at(t + a.period).vertices, a.expression_at(t).vertices,
                                   atol=1e-5)
        np.testing.assert_allclose(a.expression_at(t + a.period).transform, a.expression_at(t).transform,
                                   atol=1e-5)
    other = ScriptedDriver(seed=4)
    assert not np.allclose(other.expression_at(1.234).vertices, a.expression_at(1.234).vertices)


def test_iteration_follows_fps():
    driver = ScriptedDriver(fps=25)
    stamps = [e.stamp_ns for e in itertools.islice(driver, 4)]
    assert stamps == [0, 40_000_000, 80_000_000, 120_000_000]
    with pytest.raises(ValueError, match="fps"):
        ScriptedDriver(fps=0)


def test_every_action_happens(loop):
    v = CANONICAL_VERTICES
    gap0 = v[UPPER_LIP, 1] - v[LOWER_LIP, 1]
    gaps = np.array([e.vertices[UPPER_LIP, 1] - e.vertices[LOWER_LIP, 1] for e in loop]) - gap0
    assert gaps.max() > 0.08  # speaking opens the mouth by a good part of the lip height
    assert (gaps > 0.02).sum() > 30  # repeatedly, not in one frame
    corner = 291  # the subject's left mouth corner
    lift = np.array([e.vertices[corner, 1] - v[corner, 1] for e in loop])
    widen = np.array([e.vertices[corner, 0] - v[corner, 0] for e in loop])
    assert lift.max() > 0.025 and widen.max() > 0.03  # smiling: up and out
    upper, lower = REGIONS["left_eye_upper"][4], REGIONS["left_eye_lower"][4]
    opening = np.array([e.vertices[upper, 1] - e.vertices[lower, 1] for e in loop])
    assert opening.min() < 0.15 * (v[upper, 1] - v[lower, 1])  # blinking closes the eye
    assert (opening > 0.9 * (v[upper, 1] - v[lower, 1])).mean() > 0.8  # eyes mostly open
    angles = np.array([angle_deg(e.transform) for e in loop])
    assert 25 < angles.max() < 35  # turning
    rot = [e.transform[:, :3] @ frontal_transform()[:, :3].T for e in loop]
    pitch = np.array([np.degrees(np.arcsin(np.clip(r[1, 2], -1, 1))) for r in rot])
    yaw = np.array([np.degrees(np.arcsin(np.clip(r[0, 2], -1, 1))) for r in rot])
    assert np.abs(pitch).max() > 8 and np.abs(yaw).max() > 25  # nodding and turning


def test_motion_is_smooth_including_the_loop_seam(loop):
    verts = np.stack([e.vertices for e in loop] + [loop[0].vertices])
    step = np.abs(np.diff(verts, axis=0)).max(axis=(1, 2))
    # Blinks are the fastest motion: the lid crosses ~0.07 units in a few frames.
    assert step.max() < 0.03
    angles = np.array([angle_deg(e.transform) for e in loop] + [angle_deg(loop[0].transform)])
    assert np.abs(np.diff(angles)).max() < 3.0  # at most 90 degrees per second
