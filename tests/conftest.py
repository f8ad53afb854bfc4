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
    from gaga_ros.graph import dds_environment

    os.environ.update(dds_environment(dict(os.environ)))  # what gaga-ros launch gives its nodes


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the GPU machine (see README, Testing)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after: small ops thrash with several OpenMP threads
    on a busy 2-core machine, and a thread count left behind changes later tests' float sums."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture
def ros_node():
    """A real rclpy node spinning in a background thread, for subscribing and publishing in tests."""
    import threading

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    rclpy.init()
    node = rclpy.create_node(f"test_{random.randint(0, 1 << 30)}")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield node
    executor.shutdown()
    thread.join(timeout=10)  # before the context goes: its next wait set would fail under it
    node.destroy_node()
    rclpy.shutdown()


def start_node(name: str, *ros_args: str, params: dict | None = None, tmp_path: Path | None = None):
    """Start `gaga-ros node <name>` in its own process (real DDS between processes)."""
    import subprocess
    import sys

    import yaml

    cmd = [sys.executable, "-m", "gaga_ros.cli", "node", name, "--ros-args", *ros_args]
    if params:
        path = (tmp_path or Path(os.environ.get("TMPDIR", "/tmp"))) / f"{name}_params.yaml"
        path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
        cmd += ["--params-file", str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_process(proc) -> str:
    """Stop a node process with SIGINT and return what it printed."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.stdout.read() if proc.stdout else ""


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
