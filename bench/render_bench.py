"""Rasterizer speed on a head-like scene: CPU backend at 256 and 512 px, gsplat at 512 when CUDA is there.

The scene is 35k small Gaussians (1-3 px footprints at 256 px) on an ellipsoid shell the size of
GAGAvatar's FLAME head (x5), seen from the frontal camera. Prints a table and writes
bench/results/render.json. Run: python bench/render_bench.py [--frames 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from record import write

from gaga_ros.camera import Camera, frontal_transform
from gaga_ros.gaussians import Gaussians
from gaga_ros.render import rasterize

RESULTS = Path(__file__).resolve().parent / "results" / "render.json"


def head_scene(n: int = 35_000, channels: int = 32, seed: int = 0) -> Gaussians:
    """Gaussians on an ellipsoid shell (0.45 x 0.6 x 0.5 half-axes) around the origin."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    shell = 1.0 + 0.03 * torch.randn(n, 1, generator=g)
    means = direction * torch.tensor([0.45, 0.6, 0.5]) * shell
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = 0.004 + 0.008 * torch.rand(n, 3, generator=g)
    opacities = 0.3 + 0.7 * torch.rand(n, generator=g)
    colors = torch.rand(n, channels, generator=g)
    return Gaussians(means, quats, scales, opacities, colors)


def time_render(gaussians: Gaussians, camera: Camera, backend: str, frames: int) -> dict:
    """Median and spread of `frames` renders after two warm-up renders."""
    sync = torch.cuda.synchronize if gaussians.device.type == "cuda" else (lambda: None)
    for _ in range(2):
        rasterize(gaussians, camera, backend=backend)
    sync()
    times, cpu_times = [], []
    for _ in range(frames):
        start, cpu_start = time.perf_counter(), time.process_time()
        rasterize(gaussians, camera, backend=backend)
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    times.sort()
    median = times[len(times) // 2]
    # CPU seconds of all threads per frame: a check on wall times taken on a busy machine.
    cpu_median = sorted(cpu_times)[len(cpu_times) // 2]
    return {"median_ms": 1e3 * median, "min_ms": 1e3 * times[0], "max_ms": 1e3 * times[-1],
            "fps": 1.0 / median, "cpu_ms_per_frame": 1e3 * cpu_median}


def first_call_seconds() -> dict:
    """Time of the first CPU render in a fresh process: JIT from scratch or from numba's cache."""
    code = ("import time, torch; from bench.render_bench import head_scene, frontal_transform, Camera;"
            "from gaga_ros.render import rasterize; g = head_scene(2000, 3); "
            "c = Camera.from_transform(frontal_transform(), size=64); t = time.perf_counter(); "
            "rasterize(g, c, backend='cpu'); print(time.perf_counter() - t)")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "bench")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                         text=True, check=True)
    return {"first_call_s": float(run.stdout.strip())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--gaussians", type=int, default=35_000)
    args = parser.parse_args()

    rows = []
    rows.append({"name": "CPU first call, fresh process (numba cache state as found)",
                 **first_call_seconds()})
    rows.append({"name": "CPU first call, fresh process (cache warm)", **first_call_seconds()})
    for channels in (32, 3):
        scene = head_scene(args.gaussians, channels)
        for size in (256, 512):
            camera = Camera.from_transform(frontal_transform(), size=size)
            rows.append({"name": f"CPU render {size}", "channels": channels, "size": size,
                         "gaussians": len(scene), **time_render(scene, camera, "cpu", args.frames)})
    if torch.cuda.is_available():
        camera = Camera.from_transform(frontal_transform(), size=512)
        for channels in (32, 3):
            scene = head_scene(args.gaussians, channels).to("cuda")
            rows.append({"name": "gsplat render 512", "channels": channels, "size": 512,
                         "gaussians": len(scene), **time_render(scene, camera, "gsplat", args.frames)})

    print(f"{'benchmark':<62} {'C':>3} {'median ms':>10} {'min ms':>8} {'fps':>8} {'cpu ms':>8}")
    for row in rows:
        if "first_call_s" in row:
            print(f"{row['name']:<62} {'':>3} {1e3 * row['first_call_s']:>10.1f}")
        else:
            print(f"{row['name']:<62} {row['channels']:>3} {row['median_ms']:>10.2f} {row['min_ms']:>8.2f} "
                  f"{row['fps']:>8.1f} {row['cpu_ms_per_frame']:>8.1f}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    write(RESULTS, {"frames": args.frames, "rows": rows})


if __name__ == "__main__":
    main()
