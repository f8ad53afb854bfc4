"""Mesh-mode tracking speed: MeshTracker.update on obama.mp4 frames given as 512x512 RGB.

Per-frame time includes mediapipe FaceMesh (refined), the head box and crop window, the head fit and
the One Euro smoothing (not the crop's pixels, which the tracker cuts only when asked). Also times the
stages alone. Run: python bench/tracking_bench.py [--frames N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np
from record import timed_ms, write

from gaga_ros.crop import crop_head, crop_window, head_box
from gaga_ros.tracking.landmarks import FaceLandmarker
from gaga_ros.tracking.mesh_tracker import MeshTracker, fit_head

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
OUT = ROOT / "bench" / "results" / "tracking.json"
WARMUP = 10


def square_512(bgr: np.ndarray) -> np.ndarray:
    """Centre square of a BGR image, resized to 512x512 RGB, like a webcam stream."""
    h, w = bgr.shape[:2]
    s = min(h, w)
    sq = bgr[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return cv2.cvtColor(cv2.resize(sq, (512, 512), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def load_frames(n: int) -> list[np.ndarray]:
    """Up to n frames of obama.mp4, centre-square-cropped and resized to 512x512 RGB."""
    cap = cv2.VideoCapture(str(MEDIA / "obama.mp4"))
    frames = []
    while len(frames) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(square_512(bgr))
    cap.release()
    if not frames:
        raise SystemExit(f"no frames read from {MEDIA / 'obama.mp4'}")
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=240)
    args = parser.parse_args()
    frames = load_frames(args.frames)
    load_before = os.getloadavg()[0]
    stamps = [int(i * 1e9 / 24) for i in range(len(frames))]

    with MeshTracker() as tracker:
        found = []
        full = timed_ms(lambda i: found.append(tracker.update(frames[i], stamps[i]) is not None),
                        range(len(frames)), WARMUP)
    with FaceLandmarker() as lm:
        faces = []
        mp_ms = timed_ms(lambda f: faces.append(lm.detect(f)), frames, WARMUP)
    crops = [crop_window(head_box(f[0].points)).to_crop(f[0].points) for f in faces if f]
    fit_ms = timed_ms(fit_head, crops, WARMUP)
    cut_ms = timed_ms(lambda f: crop_head(f[0], head_box(f[1][0].points)),
                      [(fr, fc) for fr, fc in zip(frames, faces, strict=True) if fc], WARMUP)

    rows = {
        "tracking mesh per frame (median ms)": float(np.median(full)),
        "tracking mesh per frame (p90 ms)": float(np.percentile(full, 90)),
        "tracking mesh fps": float(1000 / np.median(full)),
        "mediapipe FaceMesh refined (median ms)": float(np.median(mp_ms)),
        "fit_head cold (median ms)": float(np.median(fit_ms)),
        "crop_head 512 INTER_AREA (median ms)": float(np.median(cut_ms)),
        "frames with a face": f"{sum(found)}/{len(found)}",
        # Other processes share the cores: a 1-minute load above the core count inflates every time.
        "load average (1 min) before / after": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
    }
    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"{name:<{width}}  {value:.2f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    write(OUT, {"results": rows, "frames": len(frames), "warmup": WARMUP, "input": "obama.mp4, 512x512 RGB"})


if __name__ == "__main__":
    main()
