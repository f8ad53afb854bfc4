"""The camera convention (docs/camera.md): a known point lands on the pixel it should, everywhere.

Pixel coordinates are continuous with pixel i covering [i, i + 1). A convention slip of half a pixel
moves a centroid by 0.5 px, ten times the tolerances below.
"""

import numpy as np
import pytest
import torch

from gaga_ros.camera import (
    Camera,
    from_opencv,
    frontal_transform,
    intrinsics,
    principal_point,
    project_points,
    to_opencv,
    viewmats,
)
from gaga_ros.crop import crop_head
from gaga_ros.gaussians import Gaussians
from gaga_ros.render import rasterize


def _turned(yaw_deg: float, shift: tuple[float, float, float]) -> np.ndarray:
    y = np.radians(yaw_deg)
    turn = np.array([[np.cos(y), 0, -np.sin(y)], [0, 1, 0], [np.sin(y), 0, np.cos(y)]])
    t = frontal_transform().astype(np.float64)
    return np.column_stack([turn @ t[:, :3], t[:, 3] + np.array(shift)])


def _centroid(weights: np.ndarray) -> np.ndarray:
    """Weighted mean (x, y) of pixel centres i + 0.5 of an (H, W) image."""
    ys, xs = np.mgrid[:weights.shape[0], :weights.shape[1]] + 0.5
    return np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()


def test_optical_axis_meets_the_image_centre():
    for size in (32, 512):
        camera = Camera.from_transform(frontal_transform(), size)
        on_axis = np.array([[0.0, 0.0, 0.0]], np.float32)  # the frontal camera looks at the origin
        np.testing.assert_allclose(camera.project(on_axis), [[size / 2, size / 2]], atol=1e-4)
        assert principal_point(size) == size / 2
    k = intrinsics(512)
    assert k[0, 0] == k[1, 1] == 3072.0 and k[0, 2] == k[1, 2] == 256.0


def test_rasterized_point_lands_where_the_camera_projects_it():
    """A small Gaussian's rendered centroid is Camera.project of its centre (CPU rasterizer)."""
    size = 48
    camera = Camera.from_transform(_turned(10.0, (0.05, -0.02, 0.3)), size)
    for point in ([0.031, 0.017, 0.05], [-0.05, -0.04, 0.0]):
        mean = np.array([point], np.float32)
        scale = 1.2 * camera.depth(mean)[0] / camera.K[0, 0]  # about 1.2 px
        g = Gaussians(torch.from_numpy(mean), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), scale),
                      torch.tensor([0.5]), torch.ones(1, 3))
        image = rasterize(g, camera, torch.zeros(3), backend="cpu").image[..., 0].numpy()
        uv = camera.project(mean)[0]
        assert 8 < uv.min() and uv.max() < size - 8, "the test point must be well inside the image"
        np.testing.assert_allclose(_centroid(image), uv, atol=0.05)


def test_torch_projection_and_view_matrices_match_the_camera():
    rng = np.random.default_rng(0)
    transforms = np.stack([_turned(yaw, tuple(rng.normal(0, 0.2, 3))) for yaw in (-30, 0, 25)])
    points = rng.normal(0, 0.3, (3, 20, 3))
    t = torch.from_numpy(transforms)
    uv = project_points(torch.from_numpy(points), t[:, :, :3], t[:, :, 3]).numpy()
    views = viewmats(t).numpy()
    for i, transform in enumerate(transforms):
        camera = Camera.from_transform(transform)
        np.testing.assert_allclose(uv[i], camera.project(points[i].astype(np.float32)), atol=2e-3)
        np.testing.assert_allclose(views[i], camera.viewmat, atol=1e-6)
        np.testing.assert_allclose(from_opencv(*to_opencv(transform)), transform, atol=1e-12)


@pytest.mark.parametrize("side", [40, 300], ids=["enlarged", "reduced"])
def test_crop_maps_a_source_pixel_to_where_to_crop_says(side):
    """A bright 7x7 source block: its centroid in the crop is to_crop of the centre pixel's centre
    (i + 0.5). The block, not one pixel, so a reduced crop spreads it over several pixels."""
    image = np.zeros((400, 400, 3), np.uint8)
    x, y = 187, 203
    image[y - 3:y + 4, x - 3:x + 4] = 255
    box = np.array([x - side / 2 + 3.3, y - side / 2 - 5.1, x + side / 2 + 3.3, y + side / 2 - 5.1])
    crop = crop_head(image, box, size=128, scale=1.0)
    expected = crop.to_crop(np.array([[x + 0.5, y + 0.5]]))[0]
    np.testing.assert_allclose(_centroid(crop.image[..., 0].astype(np.float64)), expected, atol=0.05)
