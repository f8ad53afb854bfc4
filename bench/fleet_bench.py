"""The fleet render node through the real ROS graph: N namespaced avatars, expressions in -> images out.

One fleet node process (`gaga-ros node fleet`) serves namespaces fleet0..fleet{N-1}; this process
publishes each namespace's avatar (latched) and its expressions at --rate Hz, stamped when sent, and
reads every namespace's avatar/image over DDS (raw, so reading 1000 images/s costs only the copy). Per
N, after every avatar showed a frame and --warmup seconds more: aggregate frames/s received, per-avatar
frames/s (least and most), and expression-to-image latency (receive time minus the expression's
stamp, which the image carries) median and p95; the node's own round time from its /diagnostics.
A fresh fleet node per N. Prints a table and writes bench/results/fleet_<device>.json.

Avatars: geometric (the astronaut, reconstructed here; needs mediapipe) or gagavatar (the astronaut's
crop encoded with a frontal camera; no mediapipe). Without --models-dir, gagavatar runs on a synthetic
FLAME and random weights of the chosen size written to a temporary folder: speed is the same as with
the published weights, the pictures are not.

CPU (the 2-core VM): python bench/fleet_bench.py --n 1,2,4 --device cpu --seconds 10
GPU machine (CPython 3.12, no registry): here, `bash scripts/device_wheels.sh` puts the cp312 ROS 2
wheels and gsplat in .whl/ and mediapipe in .whl_mp/ (too much for one call's carry together); there,
two device calls back to back (the second within the 30 s the machine stays warm):
  carry [".whl"]:    bash scripts/device_setup.sh .whl
  carry [".whl_mp"]: py=$(bash scripts/device_setup.sh .whl_mp) && $py bench/fleet_bench.py \
                       --n 1,4,16 --device cuda --backend gagavatar --seconds 15 --rate 90
scripts/device_setup.sh makes a venv over the machine's torch with the wheels and this package's
interfaces built by colcon. With .whl/gsplat_cuda.so.xz (bench/fast_device.sh leaves one) gsplat
loads prebuilt; without it the first batch builds gsplat's CUDA extension (about 80 s, once).
The GPU test of the fleet runs the same way: $py -m pytest -m gpu tests/test_fleet.py.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from record import write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def make_avatar(backend: str, device: str, models_dir: Path, config: str, grid: int):
    """The avatar every namespace shows (one reconstruction; each namespace gets its own copy)."""
    from gaga_ros.source import default_source

    if backend == "geometric":
        from gaga_ros.avatar.geometric import GeometricAvatar

        return GeometricAvatar(grid=grid, raster_backend="cpu").reconstruct(default_source())
    import cv2

    from gaga_ros.avatar.gagavatar.backend import GagaAvatarBackend
    from gaga_ros.expression import frontal_transform

    gaga = GagaAvatarBackend.load(models_dir, config, device=device)
    crop = cv2.resize(default_source(), (512, 512))
    return gaga.reconstruct_crop(crop, frontal_transform(9.0), np.zeros(300, np.float32)).to("cpu")


def synthetic_models(root: Path, config: str) -> Path:
    """A models folder with the synthetic FLAME and random GAGAvatar weights of size `config`."""
    import torch

    from gaga_ros.avatar.gagavatar.backend import CONFIGS
    from gaga_ros.avatar.gagavatar.model import GAGAvatar
    from gaga_ros.faces.synthetic_flame import write_synthetic_flame

    write_synthetic_flame(root / "flame", seed=0)
    flame = root / "flame" / "FLAME_with_eye.pt"
    if not flame.exists():
        next((root / "flame").glob("*.pt")).rename(flame)
    torch.manual_seed(0)
    (root / "gagavatar").mkdir(parents=True, exist_ok=True)
    torch.save({"model": GAGAvatar(CONFIGS[config]).state_dict()}, root / "gagavatar" / "GAGAvatar.pt")
    return root


def expressions(backend: str, avatar, count: int) -> list:
    """A loop of `count` driving frames: the scripted performance (mesh), or a talking jaw (FLAME)."""
    from gaga_ros.driver import ScriptedDriver
    from gaga_ros.expression import Expression, FaceModel

    if backend == "geometric":
        driver = ScriptedDriver()
        return [driver.expression_at(i / 30) for i in range(count)]
    return [Expression(FaceModel.FLAME, transform=avatar.source_transform,
                       jaw_pose=[0.15 + 0.15 * np.sin(i / 4), 0, 0]) for i in range(count)]


class Probe:
    """This process's node: avatars and expressions out, images and the fleet's diagnostics in."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.experimental import EventsExecutor

        rclpy.init()
        self.node = rclpy.create_node(f"fleet_bench_{os.getpid()}")
        self.lock = threading.Lock()
        self.received: dict[str, list[tuple[int, int]]] = {}  # ns -> (receive ns, stamp ns)
        self.models, self.exprs = {}, {}
        self.round_ms: list[float] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        # C++ dispatch, as the fleet node's, so that a thousand images a second do not queue in here;
        # spun in steps (its spin() in a thread starved this process's other threads, seen).
        self.executor = EventsExecutor()
        self.executor.add_node(self.node)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        while not self.stop.is_set():
            self.executor.spin_once(timeout_sec=0.1)

    def _on_diag(self, msg) -> None:
        for s in msg.status:
            if s.name == "gaga_ros: gaga_fleet":
                values = {kv.key: kv.value for kv in s.values}
                if "round_ms" in values:
                    self.round_ms.append(float(values["round_ms"]))

    def add(self, ns: str) -> None:
        from sensor_msgs.msg import Image

        from gaga_ros.msg import Expression as ExpressionMsg
        from gaga_ros.msg import GaussianAvatar
        from gaga_ros.nodes import qos

        if ns in self.models:
            return
        self.received[ns] = []
        self.models[ns] = self.node.create_publisher(GaussianAvatar, f"/{ns}/avatar/model", qos.LATCHED)
        self.exprs[ns] = self.node.create_publisher(ExpressionMsg, f"/{ns}/avatar/expression",
                                                    qos.EXPRESSIONS)
        self.node.create_subscription(Image, f"/{ns}/avatar/image",
                                      lambda data, ns=ns: self._on_image(ns, data), qos.FRAMES, raw=True)

    def _on_image(self, ns: str, data: bytes) -> None:
        now = time.time_ns()
        sec, nanosec = struct.unpack_from("<iI", data, 4)  # CDR: 4-byte encapsulation, then the stamp
        with self.lock:
            self.received[ns].append((now, sec * 10**9 + nanosec))

    def close(self) -> None:
        import rclpy

        self.stop.set()
        self.thread.join()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown()


def start_fleet(spaces: list[str], args, models_dir: Path, tmp: Path) -> subprocess.Popen:
    import yaml

    params = {"device": args.device, "size": args.size, "namespaces": spaces, "slots": len(spaces),
              "models_dir": str(models_dir), "gagavatar_config": args.config, "compile": args.compile}
    path = tmp / f"fleet_{len(spaces)}.yaml"
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    log = open(tmp / f"fleet_{len(spaces)}.log", "w")  # noqa: SIM115 - the node writes it until it exits
    return subprocess.Popen([sys.executable, "-m", "gaga_ros.cli", "node", "fleet", "--ros-args",
                             "--params-file", str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def measure(n: int, probe: Probe, avatar_msg, frames: list, args, models_dir: Path, tmp: Path) -> dict:
    from gaga_ros.nodes.expression_msg import to_msg
    from gaga_ros.nodes.stamps import from_ns

    spaces = [f"fleet{i}" for i in range(n)]
    for ns in spaces:
        probe.add(ns)
        probe.models[ns].publish(avatar_msg)
    msgs = [to_msg(e, from_ns(0)) for e in frames]
    proc = start_fleet(spaces, args, models_dir, tmp)
    stop = threading.Event()
    sent = [0]

    def send() -> None:  # every namespace at --rate Hz, each expression stamped as it leaves
        period, i, t_next = 1.0 / args.rate, 0, time.monotonic()
        while not stop.is_set():
            msg = msgs[i % len(msgs)]
            for ns in spaces:
                msg.header.stamp = from_ns(time.time_ns())
                probe.exprs[ns].publish(msg)
            sent[0] += len(spaces)
            i += 1
            t_next += period
            stop.wait(max(0.0, t_next - time.monotonic()))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + args.start_timeout
        while not all(probe.received[ns] for ns in spaces):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"N={n}: not every avatar showed a frame; the node said:\n"
                                   + (tmp / f"fleet_{n}.log").read_text()[-3000:])
            time.sleep(0.2)
        time.sleep(args.warmup)
        t0, sent0, rounds0 = time.time_ns(), sent[0], len(probe.round_ms)
        time.sleep(args.seconds)
        t1, sent1 = time.time_ns(), sent[0]
    finally:
        stop.set()
        sender.join()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    with probe.lock:
        window = {ns: [(r, s) for r, s in probe.received[ns] if t0 <= r < t1] for ns in spaces}
        for ns in spaces:
            probe.received[ns].clear()
    span = (t1 - t0) / 1e9
    latency = np.array([(r - s) / 1e6 for got in window.values() for r, s in got])
    per = [len(got) / span for got in window.values()]
    rounds = probe.round_ms[rounds0:]
    return {"n": n, "offered_fps": (sent1 - sent0) / span, "fps": sum(per), "per_avatar_fps_min": min(per),
            "per_avatar_fps_max": max(per), "frames": int(sum(len(g) for g in window.values())),
            "latency_ms_median": float(np.median(latency)) if latency.size else None,
            "latency_ms_p95": float(np.percentile(latency, 95)) if latency.size else None,
            "round_ms_median": float(np.median(rounds)) if rounds else None, "seconds": span}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="1,4,16", help="avatar counts, comma-separated")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="geometric", choices=("geometric", "gagavatar"))
    parser.add_argument("--config", default="full", choices=("full", "tiny"), help="gagavatar size")
    parser.add_argument("--compile", default="", help="gagavatar: the fleet node's refiner compile mode")
    parser.add_argument("--models-dir", default="", help="licensed models (default: synthetic, see above)")
    parser.add_argument("--size", type=int, default=0, help="image side (default: 512, 256 on the CPU)")
    parser.add_argument("--grid", type=int, default=96, help="geometric avatar: lifted pixels per side")
    parser.add_argument("--rate", type=float, default=30.0, help="expressions per second per avatar")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per N")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after the first frames")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds for every avatar's first frame (gsplat's first build is slow)")
    parser.add_argument("--out", default="", help="results file (default bench/results/fleet_<device>.json)")
    args = parser.parse_args()
    args.size = args.size or (256 if args.device == "cpu" else 512)
    counts = [int(x) for x in args.n.split(",")]
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 101)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    from gaga_ros.graph import dds_environment

    os.environ.update(dds_environment(dict(os.environ)))  # shared memory between the two processes
    from gaga_ros.nodes.avatar_msg import to_msg
    from gaga_ros.nodes.stamps import from_ns

    with tempfile.TemporaryDirectory(prefix="fleet_bench_") as tmp_name:
        tmp = Path(tmp_name)
        models = Path(args.models_dir) if args.models_dir else tmp / "models"
        if args.backend == "gagavatar" and not args.models_dir:
            synthetic_models(models, args.config)
        avatar = make_avatar(args.backend, args.device, models, args.config, args.grid)
        avatar_msg = to_msg(avatar, from_ns(time.time_ns()))
        frames = expressions(args.backend, avatar, 90)
        probe = Probe()
        try:
            rows = [measure(n, probe, avatar_msg, frames, args, models, tmp) for n in counts]
        finally:
            probe.close()
    print(f"fleet node, {args.backend} {args.size}px on {args.device}, {args.rate:g} expressions/s "
          "per avatar")
    print(f"{'N':>3} {'offered/s':>10} {'frames/s':>9} {'per avatar':>15} {'latency med':>12} {'p95':>8} "
          f"{'round ms':>9}")
    for r in rows:
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        print(f"{r['n']:>3} {r['offered_fps']:>10.1f} {r['fps']:>9.1f} "
              f"{r['per_avatar_fps_min']:>7.1f}-{r['per_avatar_fps_max']:<7.1f} "
              f"{fmt(r['latency_ms_median']):>12} {fmt(r['latency_ms_p95']):>8} "
              f"{fmt(r['round_ms_median']):>9}")
    write(Path(args.out) if args.out else RESULTS / f"fleet_{args.device}.json",
          {"device": args.device, "backend": args.backend, "config": args.config, "size": args.size,
           "rate_hz": args.rate, "results": rows})


if __name__ == "__main__":
    main()
