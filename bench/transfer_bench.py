"""Expression transfer through the real nodes: how well the asset-free avatar follows a driver.

capture (a clip) -> tracking (mesh) -> render, with reconstruction building the avatar from a photo of
someone else (cross-identity), all as separate processes over DDS. This process subscribes to the
driving frames (/camera/image_raw) and the rendered ones (/avatar/image), pairs them by header stamp
(the render node stamps each image with its expression's, i.e. its camera frame's, stamp), and runs
mediapipe on both. Per pair it measures mouth opening, eye opening, head yaw and head pitch; the
figure is the Pearson correlation of each over time. Identity: the pose-free landmark shape of each
render is compared with the source photo's and with its driving frame's.

    .venv/bin/python bench/transfer_bench.py                 # the three clips, 160 pairs each
    .venv/bin/python bench/transfer_bench.py --pairs 60      # quicker

The capture node reads every frame of the clip at --rate, stamped as it is read: below real time (the
default) the tracker and the renderer see each frame; at the clip's own rate (--rate 30) they see it
as a camera's stream, with the tracker's filter at its real time step and the renderer dropping what
it cannot keep up with (pairs are matched by stamp, so a dropped frame is only not measured).
Writes bench/results/transfer.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from record import write

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
sys.path.insert(0, str(REPO / "tests"))

#: (driving clip, source photo): every clip driven onto someone else's face.
PAIRS = (("head_turns.mp4", "monroe.jpg"), ("expressive.mp4", "portrait_bw.jpg"),
         ("obama.mp4", "painting_three_quarter.jpg"))
#: mediapipe FaceMesh indices: inner lips, eyelids and eye corners, for the openings.
UPPER_LIP, LOWER_LIP = 13, 14
EYES = ((159, 145, 33, 133), (386, 374, 362, 263))  # (upper lid, lower lid, corner, corner)
SIGNALS = ("mouth", "eyes", "yaw", "pitch")
#: No new pair for this long after the first one: the clip has ended.
IDLE_END_S = 15.0
#: The goal of issue 16 for each signal.
GOAL = 0.85


def similarity(points: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Rotation, scale and translation taking `reference` onto `points` (least squares, Umeyama)."""
    mp, mr = points.mean(0), reference.mean(0)
    p, r = points - mp, reference - mr
    u, s, vt = np.linalg.svd(p.T @ r)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.diag([1.0, 1.0, d])
    rot = u @ fix @ vt
    scale = float((s * np.diag(fix)).sum() / (r**2).sum())
    return rot, scale, mp - scale * mr @ rot.T


def measure(points: np.ndarray, canonical: np.ndarray) -> dict[str, float]:
    """The four signals of one face (478 pixel landmarks, y down) against the canonical mesh (y up)."""
    pts = points[:468].astype(np.float64) * np.array([1.0, -1.0, -1.0])  # to y up, z toward viewer
    rot, scale, _ = similarity(pts, canonical[:468])
    yaw = float(np.degrees(np.arcsin(np.clip(rot[0, 2], -1, 1))))
    pitch = float(np.degrees(np.arctan2(-rot[1, 2], rot[2, 2])))
    eye_open = np.mean([np.linalg.norm(pts[a] - pts[b]) / np.linalg.norm(pts[c] - pts[d])
                        for a, b, c, d in EYES])
    return {"mouth": float(np.linalg.norm(pts[UPPER_LIP] - pts[LOWER_LIP]) / scale), "eyes": float(eye_open),
            "yaw": yaw, "pitch": pitch}


def pose_free(points: np.ndarray, canonical: np.ndarray) -> np.ndarray:
    """Landmarks with the head pose, size and position removed (in canonical units)."""
    pts = points[:468].astype(np.float64) * np.array([1.0, -1.0, -1.0])
    rot, scale, trans = similarity(pts, canonical[:468])
    return ((pts - trans) @ rot) / scale


def run_pair(clip: str, photo: str, pairs: int, rate: float, size: int, workdir: Path,
             landmarks_dir: Path | None = None, tracking: dict | None = None) -> dict:
    from sensor_msgs.msg import Image
    from test_faults import Graph, Observer

    from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES
    from gaga_ros.nodes import qos, stamps
    from gaga_ros.nodes.image_msg import from_msg
    from gaga_ros.source import load_image
    from gaga_ros.tracking.landmarks import FaceLandmarker

    params = {"capture": {"source": str(MEDIA / clip), "rate": rate, "loop": False},
              "tracking": tracking or {},
              "reconstruction": {"grid": 192, "source_path": str(MEDIA / photo)},
              "render": {"device": "cpu", "size": size}}
    graph = Graph(workdir, params)
    obs = Observer()
    driving: dict[int, np.ndarray] = {}
    rendered: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    def keep(store: dict):
        def on_image(msg: Image) -> None:
            with lock:
                store[stamps.to_ns(msg.header.stamp)] = from_msg(msg)
        return on_image

    obs.node.create_subscription(Image, "/camera/image_raw", keep(driving), qos.FRAMES)
    obs.node.create_subscription(Image, "/avatar/image", keep(rendered), qos.FRAMES)
    # the graph starts once the avatar is built, so the first driving frames are not lost
    graph.start("reconstruction")
    graph.start("render")
    graph.start("tracking")
    if not _wait(lambda: obs.avatar_ids, 180):
        raise RuntimeError(f"no avatar from {photo}:\n{graph.log('reconstruction')[-2000:]}")
    graph.start("capture")
    t0 = time.monotonic()
    try:
        last, count = time.monotonic(), 0
        while time.monotonic() - t0 < 3 * 60 + pairs / rate * 2:
            time.sleep(0.5)
            with lock:
                n = len(set(driving) & set(rendered))
            if n != count:
                last, count = time.monotonic(), n
            if n >= pairs or (n and time.monotonic() - last > IDLE_END_S):  # done, or the clip ended
                break
    finally:
        graph.stop()
        obs.close()
    with lock:
        stamps_paired = sorted(set(driving) & set(rendered))[:pairs]
    canonical = CANONICAL_VERTICES.astype(np.float64)
    stamps_measured: list[int] = []
    rows, shapes, landmarks = [], [], []
    with FaceLandmarker(static_image_mode=True) as landmarker:
        source_faces = landmarker.detect(load_image(MEDIA / photo))
        source_shape = pose_free(source_faces[0].points, canonical)
        for stamp in stamps_paired:
            a, b = landmarker.detect(driving[stamp]), landmarker.detect(rendered[stamp])
            if not a or not b:
                continue
            stamps_measured.append(stamp)
            rows.append((measure(a[0].points, canonical), measure(b[0].points, canonical)))
            landmarks.append((a[0].points, b[0].points))
            shapes.append((pose_free(a[0].points, canonical), pose_free(b[0].points, canonical)))
    corr = {}
    for name in SIGNALS:
        drv = np.array([r[0][name] for r in rows])
        ren = np.array([r[1][name] for r in rows])
        corr[name] = float(np.corrcoef(drv, ren)[0, 1]) if len(rows) > 2 and drv.std() > 0 and ren.std() > 0 \
            else float("nan")
    to_source = float(np.mean([np.linalg.norm(r - source_shape, axis=1).mean() for _, r in shapes]))
    to_driver = float(np.mean([np.linalg.norm(r - d, axis=1).mean() for d, r in shapes]))
    if landmarks_dir is not None:  # the measured faces, to compare other measures offline
        np.savez_compressed(landmarks_dir / f"{Path(clip).stem}.npz", source=source_faces[0].points,
                            stamps=np.array(stamps_measured), landmarks=np.array(landmarks))
    return {"clip": clip, "photo": photo, "driving_frames": len(driving), "rendered_frames": len(rendered),
            "pairs_rendered": len(stamps_paired), "pairs_measured": len(rows),
            "correlation": corr, "identity_distance_to_source": to_source,
            "identity_distance_to_driver": to_driver,
            "signal_std_driver": {n: float(np.std([r[0][n] for r in rows])) for n in SIGNALS},
            "signal_std_render": {n: float(np.std([r[1][n] for r in rows])) for n in SIGNALS}}


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=160, help="driving/rendered pairs per clip")
    parser.add_argument("--rate", type=float, default=6.0, help="capture rate (Hz), below real time")
    parser.add_argument("--size", type=int, default=512, help="rendered image side")
    parser.add_argument("--only", default="", help="run only the clip with this name")
    parser.add_argument("--tracking", action="append", default=[], metavar="NAME=NUMBER",
                        help="a tracking node parameter, e.g. --tracking min_cutoff=1.5 (repeatable)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="folder for each clip's measured landmarks (driving, rendered) as .npz")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "transfer.json")
    args = parser.parse_args()
    from gaga_ros.graph import dds_environment

    # shared-memory transport for the nodes and this observer, as `gaga-ros launch` sets it: over
    # UDP, best-effort 512x512 frames arrive fragmented and many are lost
    os.environ.update(dds_environment(dict(os.environ)))
    tracking = {}
    for item in args.tracking:
        name, _, value = item.partition("=")
        try:
            tracking[name] = float(value)
        except ValueError:
            parser.error(f"--tracking {item!r}: accepted is NAME=NUMBER, e.g. min_cutoff=1.5")
    results = []
    for clip, photo in PAIRS:
        if args.only and args.only != clip:
            continue
        with tempfile.TemporaryDirectory(prefix="gaga_transfer_") as tmp:
            t0 = time.monotonic()
            r = run_pair(clip, photo, args.pairs, args.rate, args.size, Path(tmp), args.keep, tracking)
            r["seconds"] = round(time.monotonic() - t0, 1)
        results.append(r)
        print(f"{clip:16} <- {photo:28} pairs {r['pairs_measured']:4d}  "
              + "  ".join(f"{n} {r['correlation'][n]:+.3f}" for n in SIGNALS)
              + f"  identity: source {r['identity_distance_to_source']:.4f} driver "
                f"{r['identity_distance_to_driver']:.4f}", flush=True)
    worst = {n: min(results, key=lambda r: np.nan_to_num(r["correlation"][n], nan=-2)) for n in SIGNALS}
    print("\nworst clip per signal (goal >= 0.85):")
    for n, r in worst.items():
        print(f"  transfer {n} correlation: {r['correlation'][n]:.3f} ({r['clip']})")
    write(args.out, {"rate_hz": args.rate, "size": args.size, "tracking": tracking, "goal": GOAL,
                     "results": results})


if __name__ == "__main__":
    main()
