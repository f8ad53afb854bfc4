"""Self-reenactment of the geometric avatar on obama.mp4, plus the same motion on the astronaut.

Source = the video's first frame; driver = each `--step`-th later frame through MeshTracker. The
render is compared with the real frame's head crop inside the face oval: PSNR, SSIM (scikit-image)
and landmark error (mediapipe on the render vs on the real crop, mean over the 468 face landmarks,
divided by the inter-ocular distance). Also times reconstruction and rendering. Writes
bench/results/reenactment.json and bench/results/reenactment_sheet.png (real | self | astronaut).
Run: python bench/reenactment_bench.py [--step 5] [--max-frames 100] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from record import stats, timed_ms, write
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gaga_ros.avatar.geometric import GeometricAvatar
from gaga_ros.camera import Camera
from gaga_ros.conventions import CROP_SIZE
from gaga_ros.driver import ScriptedDriver
from gaga_ros.faces.mediapipe_mesh import FACE_LANDMARKS, REGIONS
from gaga_ros.source import default_source
from gaga_ros.tracking.landmarks import FaceLandmarker
from gaga_ros.tracking.mesh_tracker import MeshTracker

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
VIDEO = ROOT.parent.parent / "shared" / "media" / "obama.mp4"
IRIS_CENTRES = (468, 473)


def face_mask(points_xy: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(points_xy[REGIONS["face_oval"]].astype(np.int32)), 1)
    return mask.astype(bool)


def landmark_error(landmarker: FaceLandmarker, render: np.ndarray, real: np.ndarray) -> float | None:
    """Mean landmark distance render vs real, in inter-ocular distances (None: a face is missed)."""
    a, b = landmarker.detect(render), landmarker.detect(real)
    if not a or not b:
        return None
    pa, pb = a[0].points[:FACE_LANDMARKS, :2], b[0].points[:, :2]
    iod = np.linalg.norm(pb[IRIS_CENTRES[0]] - pb[IRIS_CENTRES[1]])
    return float(np.linalg.norm(pa - pb[:FACE_LANDMARKS], axis=1).mean() / iod)


def render_speed(backend: GeometricAvatar, avatar, size: int, frames: int = 30) -> dict:
    """Deform + rasterize + readback of scripted frames; min is the unloaded-machine figure."""
    driver = ScriptedDriver()
    expressions = [driver.expression_at(t) for t in np.linspace(0, driver.period, frames)]
    sync = torch.cuda.synchronize if avatar.device.type == "cuda" else None
    ms = stats(timed_ms(lambda e: backend.render(avatar, e, size), expressions[:2] + expressions, 2, sync))
    return {"size": size, **ms, "fps": 1e3 / ms["median_ms"], "fps_at_min": 1e3 / ms["min_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=VIDEO)
    parser.add_argument("--step", type=int, default=5)
    parser.add_argument("--max-frames", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids OpenMP thrash on a busy 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raster = "gsplat" if args.device.startswith("cuda") else "cpu"
    backend = GeometricAvatar(device=args.device, raster_backend=raster)
    cap = cv2.VideoCapture(str(args.video))
    ok, frame = cap.read()
    if not ok:
        sys.exit(f"cannot read {args.video}")
    start = time.perf_counter()
    avatar = backend.reconstruct(np.ascontiguousarray(frame[:, :, ::-1]))
    reconstruct_s = time.perf_counter() - start
    astronaut = backend.reconstruct(default_source())
    tracker = MeshTracker()
    tracker.update(np.ascontiguousarray(frame[:, :, ::-1]), 0)
    landmarker = FaceLandmarker(static_image_mode=True)
    rows, sheet = [], []
    index = 0
    while len(rows) < args.max_frames:
        ok, frame = cap.read()
        if not ok:
            break
        index += 1
        rgb = np.ascontiguousarray(frame[:, :, ::-1])
        expression = tracker.update(rgb, int(index * 1e9 / 24))
        if expression is None or not tracker.reference_ready or index % args.step:
            continue
        real = tracker.last_crop.image
        fit = tracker.last_fit
        render = backend.render(avatar, expression, CROP_SIZE)
        xy = Camera.from_transform(fit.transform, CROP_SIZE).project(fit.canonical_points)
        mask = face_mask(xy, CROP_SIZE)
        psnr = peak_signal_noise_ratio(real[mask], render[mask])
        ssim_map = structural_similarity(real, render, channel_axis=2, data_range=255, full=True)[1]
        ssim = float(ssim_map.mean(2)[mask].mean())
        lmk = landmark_error(landmarker, render, real)
        rows.append({"frame": index, "psnr": float(psnr), "ssim": ssim, "landmark_error": lmk})
        if len(sheet) < 8 and len(rows) % 2 == 1:
            cross = backend.render(astronaut, expression, 256)
            small = [cv2.resize(im, (256, 256), interpolation=cv2.INTER_AREA) for im in (real, render)]
            sheet.append(np.concatenate(small + [cross], 1))
        print(f"frame {index:4d}  PSNR {psnr:6.2f}  SSIM {ssim:.3f}  landmarks "
              f"{'-' if lmk is None else f'{lmk:.3f}'}", flush=True)
    tracker.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if sheet:
        cv2.imwrite(str(RESULTS / "reenactment_sheet.png"), np.concatenate(sheet, 0)[:, :, ::-1])
    lmks = [r["landmark_error"] for r in rows if r["landmark_error"] is not None]
    speed = [render_speed(backend, avatar, s) for s in (256, 512)]
    summary = {
        "self-reenactment PSNR": float(np.mean([r["psnr"] for r in rows])),
        "self-reenactment SSIM": float(np.mean([r["ssim"] for r in rows])),
        "self-reenactment landmark error": float(np.mean(lmks)) if lmks else None,
        "frames": len(rows),
        "landmark misses": len(rows) - len(lmks),
        "gaussians": len(avatar),
        "reconstruct_s": reconstruct_s,
        "render": speed,
    }
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    name = "reenactment.json" if raster == "cpu" else "reenactment_gpu.json"
    write(RESULTS / name, {"summary": summary, "device": device, "torch_threads": torch.get_num_threads(),
                           "rows": rows})
    print(f"\n{'metric':34s} value")
    for key in ("self-reenactment PSNR", "self-reenactment SSIM", "self-reenactment landmark error"):
        print(f"{key:34s} {summary[key]:.4f}" if summary[key] is not None else f"{key:34s} -")
    for s in speed:
        print(f"render {s['size']}x{s['size']} ({device}){'':10s} median {s['median_ms']:.1f} ms "
              f"({s['fps']:.1f} fps), min {s['min_ms']:.1f} ms ({s['fps_at_min']:.1f} fps)")
    print(f"(1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"reconstruct{'':23s} {reconstruct_s:.2f} s, {len(avatar)} Gaussians")


if __name__ == "__main__":
    main()
