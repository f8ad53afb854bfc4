"""The graph split over three hosts talks over DDS across a real (virtual) network.

Hosts are network namespaces joined by veth links to a bridge (bench/cross_host_bench.py,
NetnsLan): each has only its own loopback and a 10.200.0.x/24 address, DDS discovers peers by
multicast over the subnet, and shared memory is off (FASTDDS_BUILTIN_TRANSPORTS=UDPv4), so what
arrives crossed the links; the link byte counters confirm it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cross_host_bench import NetnsLan, dds_env, last_json, node_on, start_on, stop  # noqa: E402

BENCH = str(Path(__file__).resolve().parents[1] / "bench" / "cross_host_bench.py")


@pytest.fixture(scope="module")
def lan():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    try:
        net = NetnsLan(["a", "b", "c"])
    except FileNotFoundError:
        pytest.skip("the `ip` tool is missing: apt-get install -y iproute2")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    yield net
    net.close()


@pytest.fixture(scope="module")
def env():
    return dds_env(int(os.environ["ROS_DOMAIN_ID"]))


def probe(lan, env, host: str, topics: str, seconds: float, wait_first: float = 60):
    return start_on(lan, host, env, BENCH, "probe", "--seconds", str(seconds), "--topics", topics,
                    "--wait-first", str(wait_first))


def test_expressions_cross_from_host_a_to_host_b(lan, env):
    rx0 = lan.rx_bytes("b")
    p = probe(lan, env, "b", "/avatar/expression", seconds=3)
    driver = node_on(lan, "a", env, "driver")
    try:
        out = p.communicate(timeout=90)[0]
    finally:
        driver_out = stop(driver)
    got = last_json(out)["/avatar/expression"]
    assert got["count"] >= 0.7 * 30 * 3, (got, driver_out[-2000:])
    assert 25 < got["fps"] < 35  # the driver's 30 Hz, kept across the link
    assert 0 < got["latency_ms_median"] < 100, got  # same kernel clock: a true one-way latency
    # every expression (1434 float32 vertices) went over b's veth link, not shared memory
    assert lan.rx_bytes("b") - rx0 > got["count"] * 1434 * 4


def test_rendered_images_cross_from_host_b_to_host_c(lan, env, tmp_path):
    """Driver on a -> render on b (with reconstruction) -> /avatar/image on c."""
    rx0 = lan.rx_bytes("c")
    p = probe(lan, env, "c", "/avatar/image", seconds=3, wait_first=240)
    procs = [node_on(lan, "a", env, "driver"), node_on(lan, "b", env, "reconstruction"),
             node_on(lan, "b", env, "render", params={"device": "cpu", "size": 128}, tmp=tmp_path)]
    try:
        out = p.communicate(timeout=300)[0]
    finally:
        logs = [stop(proc) for proc in procs]
    got = last_json(out)["/avatar/image"]
    assert got["count"] >= 3, (got, [log[-1500:] for log in logs])
    assert got["bytes_mean"] == 128 * 128 * 3
    # stamp = the driver's capture time on a, so this spans a -> b, the render, and b -> c
    assert 0 < got["latency_ms_median"] < 3000, got
    assert lan.rx_bytes("c") - rx0 > got["count"] * 128 * 128 * 3
