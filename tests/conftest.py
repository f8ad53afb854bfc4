"""Shared test fixtures: media paths, DDS isolation, and markers for GPU/slow tests."""

import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
REFERENCE = REPO.parent / "shared" / "reference"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; runs on the GPU machine, skipped in CI")
    config.addinivalue_line("markers", "slow: takes more than ~20 s")
    # Every test run talks DDS on its own random domain, localhost only, so parallel runs and other
    # ROS traffic on the machine never cross. Subprocesses inherit it.
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random().randint(1, 101)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the GPU machine (see README, Testing)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def media_dir() -> Path:
    if not MEDIA.is_dir():
        pytest.fail(f"test media missing: expected {MEDIA} (the shared/ folder beside the repo)")
    return MEDIA


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference vectors missing: expected {REFERENCE}")
    return REFERENCE
