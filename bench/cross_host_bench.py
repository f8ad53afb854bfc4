"""Cross-host bench: the graph split over three "hosts" (network namespaces on one Linux machine).

Hosts a (10.200.0.1, tracking / driver side), b (.2, reconstruction + render) and c (.3, viewer side)
hang off one Linux bridge in a fourth namespace, like three machines on a switch. DDS runs as it
would between machines: ROS_AUTOMATIC_DISCOVERY_RANGE=SUBNET (multicast discovery on 239.255.0.1,
routed over the veth), and FASTDDS_BUILTIN_TRANSPORTS=UDPv4 so Fast DDS cannot take its
shared-memory shortcut (the namespaces share /dev/shm) and every byte crosses the veth links.

Measured (all hosts share the kernel clock, so stamp -> receive time is a true one-way latency):
  - expression latency a -> c: driver's header stamp to the probe's receive time, median ms;
  - image throughput a -> c: 512x512 rgb8 Image frames published at 30 Hz, received fps (and, as a
    baseline, the same stream within host a over loopback UDP: the Python publisher and subscriber,
    not the link, bound it on a small machine);
  - compressed image kB per frame: /avatar/image/compressed from the render node on b (default
    size 512, default JPEG quality 85), received on c.

Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN for `ip netns`).

    python bench/cross_host_bench.py [--seconds 8]
    python bench/cross_host_bench.py probe --seconds N --topics /a,/b    (runs inside a namespace)
    python bench/cross_host_bench.py images --seconds N                  (runs inside a namespace)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from record import write

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.200.0"
IMAGE_TOPIC = "/bench/image"
TYPES = {"/avatar/expression": "gaga_ros.msg:Expression", "/avatar/image": "sensor_msgs.msg:Image",
         "/avatar/image/compressed": "sensor_msgs.msg:CompressedImage", IMAGE_TOPIC: "sensor_msgs.msg:Image"}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetnsLan:
    """Network namespaces joined by veth links to one bridge: hosts on a private /24, multicast on."""

    def __init__(self, hosts: list[str]) -> None:
        tag = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"
        self.switch = f"gsw{tag}"
        self.ns = {h: f"g{h}{tag}" for h in hosts}
        self.addr = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(hosts)}
        self.dev = {h: f"v{h}{tag}"[:15] for h in hosts}
        self.created: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        ip("netns", "add", self.switch)
        self.created.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for h, ns in self.ns.items():
            ip("netns", "add", ns)
            self.created.append(ns)
            dev, peer = self.dev[h], f"p{self.dev[h]}"[:15]
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", self.switch)
            ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "multicast", "on", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)  # DDS discovery multicast

    def prefix(self, host: str) -> list[str]:
        """Command prefix that runs a program on `host`."""
        return ["ip", "netns", "exec", self.ns[host]]

    def rx_bytes(self, host: str) -> int:
        """Bytes received on the host's link (proof that traffic crossed the 'network')."""
        out = subprocess.run(["ip", "netns", "exec", self.ns[host], "cat",
                              f"/sys/class/net/{self.dev[host]}/statistics/rx_bytes"],
                             check=True, capture_output=True, text=True).stdout
        return int(out)

    def close(self) -> None:
        """Delete every namespace made (their veth links go with them)."""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


PROFILE_VARS = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")


def dds_env(domain: int) -> dict[str, str]:
    """Environment for nodes on the LAN: its own domain, discovery over the subnet, UDP only (no
    same-host shared-memory profile: the hosts share /dev/shm, which would bypass the links)."""
    base = {k: v for k, v in os.environ.items() if k not in PROFILE_VARS}
    return {**base, "ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET",
            "FASTDDS_BUILTIN_TRANSPORTS": "UDPv4", "PYTHONUNBUFFERED": "1"}


def start_on(lan: NetnsLan, host: str, env: dict[str, str], *argv: str, params: dict | None = None,
             tmp: Path | None = None) -> subprocess.Popen:
    """Start `python <argv>` on a host; `params` go into a --params-file for gaga-ros nodes."""
    cmd = [*lan.prefix(host), sys.executable, *argv]
    if params:
        path = (tmp or Path("/tmp")) / f"{host}_{argv[-1]}_{random.randint(0, 1 << 30)}.yaml"
        path.write_text(json.dumps({"/**": {"ros__parameters": params}}))
        cmd += ["--ros-args", "--params-file", str(path)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def node_on(lan: NetnsLan, host: str, env: dict[str, str], name: str, params: dict | None = None,
            tmp: Path | None = None) -> subprocess.Popen:
    """A gaga-ros node on a host."""
    return start_on(lan, host, env, "-m", "gaga_ros.cli", "node", name, params=params, tmp=tmp)


def stop(proc: subprocess.Popen, timeout: float = 10) -> str:
    """SIGINT, wait, and return what the process printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def probe(seconds: float, topics: list[str], wait_first: float) -> dict:
    """Subscribe to topics for `seconds` after the first message (or `wait_first` s without any)."""
    import importlib

    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    rclpy.init()
    node = rclpy.create_node(f"probe_{os.getpid()}")
    seen: dict[str, list[tuple[float, float, int]]] = {t: [] for t in topics}

    def on_msg(topic: str, msg) -> None:
        now = time.time()
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        seen[topic].append((now, stamp, len(msg.data) if hasattr(msg, "data") else 0))

    for topic in topics:
        module, name = TYPES[topic].split(":")
        cls = getattr(importlib.import_module(module), name)
        qos = (QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE) if name == "Expression"
               else qos_profile_sensor_data)
        node.create_subscription(cls, topic, lambda m, t=topic: on_msg(t, m), qos)
    start = time.monotonic()
    first: float | None = None
    while True:
        rclpy.spin_once(node, timeout_sec=0.05)
        now = time.monotonic()
        if first is None and any(seen.values()):
            first = now
        if (first is None and now - start > wait_first) or (first is not None and now - first > seconds):
            break
    node.destroy_node()
    rclpy.shutdown()
    return {t: summarize(v) for t, v in seen.items()}


def summarize(rows: list[tuple[float, float, int]]) -> dict:
    """Count, fps over the receive span, median/p95 stamp->receive latency (ms), mean bytes."""
    if not rows:
        return {"count": 0}
    recv = sorted(r[0] for r in rows)
    lat = sorted((r[0] - r[1]) * 1e3 for r in rows)
    span = recv[-1] - recv[0]
    return {"count": len(rows), "fps": (len(rows) - 1) / span if span > 0 else 0.0,
            "latency_ms_median": lat[len(lat) // 2], "latency_ms_p95": lat[int(len(lat) * 0.95)],
            "bytes_mean": sum(r[2] for r in rows) / len(rows)}


def publish_images(seconds: float, size: int = 512, rate: float = 30.0) -> None:
    """512x512 rgb8 frames like /avatar/image on IMAGE_TOPIC at `rate`, stamped at publish time."""
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node(f"images_{os.getpid()}")
    pub = node.create_publisher(Image, IMAGE_TOPIC, qos_profile_sensor_data)
    frames = [np.random.default_rng(i).integers(0, 256, (size, size, 3), np.uint8).tobytes()
              for i in range(4)]
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        msg = Image(height=size, width=size, encoding="rgb8", step=size * 3, data=frames[i % 4])
        msg.header.stamp = node.get_clock().now().to_msg()
        pub.publish(msg)
        i += 1
        time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    node.destroy_node()
    rclpy.shutdown()


def last_json(out: str) -> dict:
    """The last line of a probe's output that parses as JSON."""
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no result from the probe; it said:\n{out[-2000:]}")


def run(seconds: float) -> dict:
    """Both phases on a fresh 3-host LAN; returns the results."""
    domain = random.randint(120, 200)
    env = dds_env(domain)
    lan = NetnsLan(["a", "b", "c"])
    procs: list[subprocess.Popen] = []
    try:
        # Phase 0: the same image stream within host a (loopback UDP): what Python does without a link.
        p = start_on(lan, "a", env, str(Path(__file__)), "probe", "--seconds", str(seconds),
                     "--topics", IMAGE_TOPIC)
        procs = [p, start_on(lan, "a", env, str(Path(__file__)), "images", "--seconds", str(seconds + 15))]
        phase0 = last_json(p.communicate(timeout=seconds + 60)[0])
        stop(procs[1])
        # Phase 1: expressions and raw frames from a to c, nothing else loading the CPU.
        rx0 = lan.rx_bytes("c")
        p = start_on(lan, "c", env, str(Path(__file__)), "probe", "--seconds", str(seconds),
                     "--topics", f"/avatar/expression,{IMAGE_TOPIC}")
        procs = [p, node_on(lan, "a", env, "driver"),
                  start_on(lan, "a", env, str(Path(__file__)), "images", "--seconds", str(seconds + 15))]
        phase1 = last_json(p.communicate(timeout=seconds + 60)[0])
        rx1 = lan.rx_bytes("c")
        for proc in procs[1:]:
            stop(proc)
        # Phase 2: the real render node on b (default size and JPEG quality) driven from a.
        procs = [node_on(lan, "a", env, "driver"), node_on(lan, "b", env, "reconstruction"),
                 node_on(lan, "b", env, "render", params={"device": "cpu"})]
        p = start_on(lan, "c", env, str(Path(__file__)), "probe", "--seconds", str(seconds),
                     "--topics", "/avatar/image/compressed", "--wait-first", "240")
        procs.append(p)
        phase2 = last_json(p.communicate(timeout=seconds + 300)[0])
    finally:
        for proc in procs:
            stop(proc)
        lan.close()
    expr, img, jpg = phase1["/avatar/expression"], phase1[IMAGE_TOPIC], phase2["/avatar/image/compressed"]
    return {
        "hosts": "one kernel, 3 network namespaces + a bridge",
        "cross-host expression latency ms": round(expr["latency_ms_median"], 2),
        "cross-host expression latency p95 ms": round(expr["latency_ms_p95"], 2),
        "cross-host expression rate hz": round(expr["fps"], 1),
        "cross-host image fps": round(img["fps"], 1),
        "cross-host image latency ms": round(img["latency_ms_median"], 2),
        "same-host image fps (baseline, UDP loopback)": round(phase0[IMAGE_TOPIC]["fps"], 1),
        "compressed image kB per frame": round(jpg["bytes_mean"] / 1000, 1),
        "compressed frames received": jpg["count"],
        "bytes received by host c in phase 1 (MB)": round((rx1 - rx0) / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=("bench", "probe", "images"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--topics", default="/avatar/expression")
    parser.add_argument("--wait-first", type=float, default=60.0, help="probe: give up without a message")
    ns = parser.parse_args()
    if ns.mode == "probe":
        print(json.dumps(probe(ns.seconds, ns.topics.split(","), ns.wait_first)), flush=True)
        return
    if ns.mode == "images":
        publish_images(ns.seconds)
        return
    results = run(ns.seconds)
    for key, value in results.items():
        print(f"{key:<45} {value}")
    write(REPO / "bench" / "results" / "cross_host.json", results)


if __name__ == "__main__":
    main()
