"""One error base for the package (gaga_ros/errors.py); one image check and conversion (gaga_ros/image.py)."""

import importlib
import inspect
import pkgutil

import numpy as np
import pytest
import torch

import gaga_ros
from gaga_ros.errors import GagaError, InputError, UnavailableError
from gaga_ros.image import ImageError, check_rgb, to_uint8


def _core_error_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(gaga_ros.__path__, "gaga_ros."):
        if info.name.startswith(("gaga_ros.nodes", "gaga_ros.cli")) or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == info.name and issubclass(cls, Exception)
                    and (name.endswith("Error") or name == "LicenceNotAccepted")):
                found[name] = cls
    return found


def test_every_core_error_is_a_gaga_error_and_refusals_stay_value_errors():
    classes = _core_error_classes()
    assert {"ExpressionError", "CropError", "ImageError", "NoFaceError", "CaptureError", "FrameError",
            "StreamConfigError", "FastRenderError"} <= set(classes)
    outside = sorted(n for n, c in classes.items() if not issubclass(c, GagaError))
    assert not outside, f"errors without the package base: {outside}"
    not_input = sorted(n for n, c in classes.items() if not issubclass(c, ValueError))
    assert not_input == ["CaptureError", "GagaError", "JanusError", "UnavailableError"], not_input
    assert issubclass(InputError, ValueError) and issubclass(UnavailableError, RuntimeError)


@pytest.mark.parametrize("image,words", [
    ([[0, 0, 0]], "numpy"), (np.zeros((8, 8, 3), np.float32), "dtype"), (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((0, 8, 3), np.uint8), "at least one pixel"), (np.zeros((8, 8, 3), np.uint8), "at least 16x16"),
])
def test_check_rgb_says_what_is_accepted(image, words):
    with pytest.raises(ImageError, match=words) as exc:
        check_rgb(image, min_side=16 if words == "at least 16x16" else 1)
    assert "accepted" in str(exc.value)


def test_to_uint8_rounds_to_nearest_ties_to_even_and_clamps():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.2, 1.2, (64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(x)).numpy(),
                                  np.round(np.clip(x, 0, 1) * np.float32(255)).astype(np.uint8))
    ties = torch.tensor([0.5, 1.5, 2.5, 253.5], dtype=torch.float64) / 255
    assert to_uint8(ties).tolist() == [0, 2, 2, 254]
