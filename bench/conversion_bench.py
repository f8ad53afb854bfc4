"""MESH <-> FLAME expression conversion: cost per frame and fit quality on a real clip's tracked stream.

The stream: obama.mp4 through the mesh tracker (MeshTracker, its own cost excluded), as the GAGAvatar
backend receives it from mesh tracking. Conversion uses the synthetic FLAME asset (the real FLAME is
licensed and absent here): the cost is representative (the fit's tables have the same size for real
FLAME), the fit quality is a self-check of what the synthetic model can follow, not of real FLAME.

- mesh to flame: FaceConverter.to_flame per frame, warm-started from the previous frame (the first
  frame, a cold start, is reported alone), one torch thread, median and p90.
- flame to mesh: FaceConverter.to_mesh on those FLAME expressions.
- landmark residual: the fit's mean landmark error (the fitted landmarks, 512 crop pixels through the
  frontal camera), and the round trip MESH -> FLAME -> MESH over all 478 landmarks in the same pixels,
  beside the stream's own motion from the neutral face (what the conversion has to carry).
- registration: the one-off cost of a converter (FLAME identity fitted to the canonical face).

Run: python bench/conversion_bench.py [--frames N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from record import write
from tracking_bench import load_frames  # the same 512x512 obama frames

from gaga_ros.camera import frontal_transform
from gaga_ros.faces.conversion import FaceConverter, project
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES
from gaga_ros.faces.synthetic_flame import make_synthetic_flame
from gaga_ros.tracking.mesh_tracker import MeshTracker

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "conversion.json"
FPS = 25.0  # obama.mp4's frame rate: the stamps the tracker's filters see


def tracked_stream(frames: list[np.ndarray]) -> list:
    """Mesh-mode expressions of the frames in which the tracker found a face."""
    with MeshTracker() as tracker:
        out = [tracker.update(frame, int(i * 1e9 / FPS)) for i, frame in enumerate(frames)]
    return [e for e in out if e is not None]


def frontal_px(vertices: np.ndarray) -> np.ndarray:
    return project(vertices, frontal_transform())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300, help="obama.mp4 frames")
    args = parser.parse_args()
    load_before = os.getloadavg()
    stream = tracked_stream(load_frames(args.frames))
    torch.set_num_threads(1)
    started = time.perf_counter()
    converter = FaceConverter(make_synthetic_flame(0))
    registration_ms = (time.perf_counter() - started) * 1000
    to_flame, to_mesh, fit_px, round_trip_px, motion_px = [], [], [], [], []
    neutral_px = frontal_px(CANONICAL_VERTICES)
    for mesh in stream:
        t0 = time.perf_counter()
        flame = converter.to_flame(mesh)
        t1 = time.perf_counter()
        back = converter.to_mesh(flame)
        t2 = time.perf_counter()
        to_flame.append((t1 - t0) * 1000)
        to_mesh.append((t2 - t1) * 1000)
        fit_px.append(converter.last_error_px)
        seen = frontal_px(mesh.vertices)
        round_trip_px.append(float(np.linalg.norm(frontal_px(back.vertices) - seen, axis=1).mean()))
        motion_px.append(float(np.linalg.norm(seen - neutral_px, axis=1).mean()))
    cold_ms, warm = to_flame[0], np.array(to_flame[1:])
    to_mesh, fit_px = np.array(to_mesh), np.array(fit_px)
    round_trip_px, motion_px = np.array(round_trip_px), np.array(motion_px)

    rows: dict[str, object] = {
        "mesh to flame ms (median, warm, 1 thread)": float(np.median(warm)),
        "mesh to flame p90 ms": float(np.percentile(warm, 90)),
        "mesh to flame first frame (cold) ms": float(cold_ms),
        "flame to mesh ms (median)": float(np.median(to_mesh)),
        "flame to mesh p90 ms": float(np.percentile(to_mesh, 90)),
        "fit landmark residual mean / p90 px": f"{fit_px.mean():.2f} / {np.percentile(fit_px, 90):.2f}",
        "round trip 478 landmarks mean / p90 px": f"{round_trip_px.mean():.2f} / "
                                                  f"{np.percentile(round_trip_px, 90):.2f}",
        "stream motion from neutral mean / p90 px": f"{motion_px.mean():.2f} / "
                                                    f"{np.percentile(motion_px, 90):.2f}",
        "round trip / motion (mean over frames)": float(round_trip_px.mean() / motion_px.mean()),
        "registration (once per converter) ms": float(registration_ms),
        "registration identity fit error px": float(converter.registration.fit_error_px),
        "frames converted": f"{len(stream)} of {args.frames} (a face tracked)",
        "load average (1 min) before / after": f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f}",
    }
    print("MESH <-> FLAME on the SYNTHETIC FLAME asset: cost representative, fit quality a self-check")
    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"{name:<{width}}  {value:.3f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    write(OUT, {
        "results": rows,
        "pixels": "512 head crop through the frontal camera (focal 12), mean over the landmarks",
        "asset": "synthetic FLAME (seed 0): fit quality is a self-check only",
        "input": f"obama.mp4, {args.frames} frames at 512x512, MeshTracker defaults",
        "load_average_before": load_before,
    })


if __name__ == "__main__":
    main()
