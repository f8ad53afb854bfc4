"""FLAME fitting to mediapipe-indexed landmarks, checked on the synthetic FLAME model (self-consistency)."""

import numpy as np
import pytest
import torch

from gaga_ros.config import MESH_LANDMARKS
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.flame import Flame, rodrigues
from gaga_ros.faces.synthetic_flame import make_synthetic_flame
from gaga_ros.tracking.flame_fitter import FitInputError, FlameFitter, project


@pytest.fixture(scope="module")
def assets():
    return make_synthetic_flame(seed=5)


@pytest.fixture(scope="module")
def flame(assets):
    return Flame(assets)


def _observe(flame, fitter, shape, expression, jaw, head, translation):
    """Landmarks a camera would see for known parameters, placed at their mediapipe indices."""
    with torch.no_grad():
        verts = flame(shape=shape, expression=expression, jaw_pose=jaw)
        rotation = rodrigues(head).transpose(1, 2) @ torch.diag(torch.tensor([-1.0, 1, -1]))
        ibug = flame.landmarks(verts, "ibug68", global_pose=head)  # the full model, not the fitter's
        model = torch.cat([ibug, flame.landmarks(verts, "full")[:, 68:]], dim=1)
        pixels = project(model, rotation, translation)
    out = np.zeros((shape.shape[0], MESH_LANDMARKS, 3), np.float32)
    out[:, fitter.mediapipe_index.numpy(), :2] = pixels.numpy()
    return out, rotation


def test_fit_recovers_known_pose_and_expression(flame, assets):
    fitter = FlameFitter(assets, identity_steps=300, steps=40)
    g = torch.Generator().manual_seed(0)
    shape = 0.5 * torch.randn(1, 300, generator=g)
    expr = torch.zeros(3, 100)
    expr[:2, :50] = 0.5 * torch.randn(2, 50, generator=g)
    expr[2] = expr[1] + 0.05 * torch.randn(100, generator=g) * (torch.arange(100) < 50)  # a video-like step
    jaw = torch.tensor([[0.12, 0.0, 0.0]]).repeat(3, 1)
    head = torch.tensor([[0.05, 0.25, 0.0], [0.06, 0.22, 0.02], [0.04, 0.2, 0.0]])
    translation = torch.tensor([[0.05, -0.1, 9.2]]).repeat(3, 1)
    observed, _ = _observe(flame, fitter, shape.expand(3, -1), expr, jaw, head, translation)
    fits = fitter.fit(observed[:2])
    assert len(fits) == 2 and fitter.shape is not None
    for fit in fits:
        assert fit.shapecode.shape == (300,) and fit.expcode.shape == (100,) and fit.eyecode.shape == (6,)
        assert fit.posecode.shape == (6,) and (fit.posecode[:3] == 0).all()
        assert fit.landmark_error_px < 1.5
        r = fit.transform_matrix[:, :3]
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-5)  # a rotation (its angle: see the report)
        assert abs(fit.transform_matrix[2, 3] - 9.2) < 0.6
        Expression(FaceModel.FLAME, transform=fit.transform_matrix, expression=fit.expcode,
                   jaw_pose=fit.posecode[3:], eye_pose=fit.eyecode)  # a valid driving message
    # The next frame is warm-started: few steps, identity held.
    held = fitter.shape.clone()
    (third,) = fitter.fit(observed[2:])
    assert third.landmark_error_px < 1.5 and torch.equal(fitter.shape, held)


def test_bad_landmarks_are_rejected(assets):
    fitter = FlameFitter(assets)
    with pytest.raises(FitInputError, match="478"):
        fitter.fit(np.zeros((1, 468, 2)))
