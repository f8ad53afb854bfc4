"""Training data: build tracked 512x512 head crops from videos, and serve (source, target) pairs.

On-disk layout, one folder per video under the dataset root (random access by memory map):
  <root>/dataset.json                 mode, videos and the drop report of the latest build
  <root>/<video_id>/frames.bin         JPEG crops back to back (offsets in records.npz)
  <root>/<video_id>/records.npz        per kept frame: frame, offset, length, bbox (4), transform (3,4),
                                       landmarks (478,3) crop px; FLAME mode adds shapecode, expcode,
                                       posecode, eyecode (docs/flame.md's tracker record)
  <root>/<video_id>/vertices.npy       (N, 5023, 3) float32 FLAME vertices x5 per kept frame
  <root>/<video_id>/index.json         written last: the video is complete
While a video is in progress its frames go to frames.bin and one JSON line each to progress.jsonl,
so an interrupted build resumes after the last written frame.

Tracking modes. "flame": FaceMesh landmarks -> FlameFitter (gaga_ros.tracking.flame_fitter) on the
user's FLAME model; vertices are FLAME of the fitted codes, as GAGAvatar trains. "mesh": the rigid
FaceMesh head fit (gaga_ros.tracking.mesh_tracker.fit_head) gives the camera, and the vertices are a
STAND-IN: the synthetic FLAME-format mesh (gaga_ros.faces.synthetic_flame, seed 0) with zero shape,
expression and pose, the same for every frame. It lets the pipeline run end to end without licensed
assets, but carries no expression: faithful training needs FLAME mode.
The crop follows docs/crop.md with the box from FaceMesh (gaga_ros.crop) EMA-smoothed with alpha 0.03 over
the video; no matting model is available, so backgrounds are kept.
Building needs mediapipe and OpenCV; reading a built dataset needs only numpy, torch and OpenCV.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from gaga_ros.conventions import CROP_SIZE, FLAME_VERTICES
from gaga_ros.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
MODES = ("auto", "mesh", "flame")
DROP_REASONS = ("no_face", "fit_failed", "low_confidence", "blur")
#: docs/crop.md: video head boxes are EMA-smoothed, new = alpha current + (1 - alpha) previous.
BOX_EMA = 0.03
RMSE_HALF = 16.0  # as mesh_tracker: fit error (crop px) that halves the confidence


class DatasetError(InputError):
    """A dataset folder, video list or build option that cannot be used; the message says why."""


@dataclass
class BuildReport:
    """What a build did: frames read this run, kept in total, and drops by reason (this run)."""

    mode: str
    videos: list[str] = field(default_factory=list)
    skipped_videos: list[str] = field(default_factory=list)
    frames_processed: int = 0
    frames_kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        lines = [f"mode {self.mode}: {len(self.videos)} video(s), {len(self.skipped_videos)} already "
                 f"complete; {self.frames_processed} frame(s) processed this run, {self.frames_kept} kept",
                 "dropped: " + (", ".join(f"{r} {self.dropped[r]}" for r in DROP_REASONS if self.dropped[r])
                                or "none")]
        if self.mode == "mesh":
            lines.append("mesh mode: vertices are the synthetic FLAME stand-in (no expression); faithful "
                         "training needs FLAME mode (--flame FLAME_with_eye.pt)")
        return "\n".join(lines)


def _progress(total: int | None, desc: str):
    """tqdm when installed, else a one-line counter on stderr."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="frame", file=sys.stderr)
    except ImportError:
        return _TextBar(total, desc)


class _TextBar:
    def __init__(self, total: int | None, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % 25 == 0 or self.n == self.total:
            total = f"/{self.total}" if self.total else ""
            print(f"\r{self.desc}: {self.n}{total} frames", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def list_videos(videos: str | Path | Iterable[str | Path]) -> list[Path]:
    """Video files: every VIDEO_SUFFIXES file in a folder (sorted), a single file, or a list of files."""
    items = [Path(videos)] if isinstance(videos, str | Path) else [Path(v) for v in videos]
    out: list[Path] = []
    for item in items:
        if item.is_dir():
            out += sorted(p for p in item.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        elif item.is_file():
            out.append(item)
        else:
            raise DatasetError(f"{item} is neither a video file nor a folder of videos")
    if not out:
        raise DatasetError(f"no videos found in {[str(i) for i in items]}; accepted suffixes: "
                           f"{', '.join(VIDEO_SUFFIXES)}")
    return out


def _video_id(path: Path, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem) or "video"
    vid, k = base, 1
    while vid in taken:
        k += 1
        vid = f"{base}_{k}"
    taken.add(vid)
    return vid


def _stand_in_vertices() -> np.ndarray:
    from gaga_ros.faces.flame import Flame
    from gaga_ros.faces.synthetic_flame import make_synthetic_flame

    with torch.no_grad():
        return Flame(make_synthetic_flame(0))(batch_size=1)[0].numpy().astype(np.float32)


class _FlameTracking:
    """FLAME mode: per-frame FlameFitter records and the FLAME vertices of their codes."""

    def __init__(self, flame_path: Path) -> None:
        from gaga_ros.faces.flame import Flame
        from gaga_ros.faces.flame_assets import load_flame_assets
        from gaga_ros.tracking.flame_fitter import FlameFitter

        assets = load_flame_assets(flame_path)
        self.flame = Flame(assets)
        self.fitter = FlameFitter(assets)

    def reset(self) -> None:
        self.fitter.reset()

    def __call__(self, crop_points: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        fit = self.fitter.fit(crop_points)[0]
        codes = {k: np.asarray(getattr(fit, k), np.float32)
                 for k in ("shapecode", "expcode", "posecode", "eyecode")}
        with torch.no_grad():
            verts = self.flame.forward_codes(*(torch.from_numpy(codes[k])[None] for k in
                                               ("shapecode", "expcode", "posecode", "eyecode")))[0]
        return codes | {"transform": np.asarray(fit.transform_matrix, np.float32)}, verts.numpy()


def _resolve_mode(mode: str, flame_path: str | Path | None) -> str:
    if mode not in MODES:
        raise DatasetError(f"mode {mode!r}: accepted are {', '.join(MODES)}")
    have_fitter = (Path(__file__).resolve().parents[1] / "tracking" / "flame_fitter.py").is_file()
    if mode == "flame" and (flame_path is None or not Path(flame_path).is_file()):
        raise DatasetError(f"FLAME mode needs the FLAME model file (FLAME_with_eye.pt or a FLAME .pkl); "
                           f"got {flame_path!r}")
    if mode == "auto":
        mode = "flame" if flame_path is not None and Path(flame_path).is_file() and have_fitter else "mesh"
    return mode


def build_dataset(videos: str | Path | Iterable[str | Path], out_dir: str | Path, mode: str = "auto",
                  flame_path: str | Path | None = None, every: int = 1, max_frames: int | None = None,
                  blur_threshold: float = 20.0, min_confidence: float = 0.5, jpeg_quality: int = 90,
                  progress: bool = True, on_frame: Callable[[str, int], None] | None = None) -> BuildReport:
    """Track and crop every video into `out_dir`; finished videos and frames are skipped on a rerun.

    every: keep one frame in `every`; max_frames: stop each video after that many frames read (before
    `every`); blur_threshold: drop crops whose variance of the Laplacian (grey, 512x512) is lower;
    min_confidence: drop frames whose detector score x fit quality is lower; on_frame(video_id, frame)
    is called after each processed frame (for progress hooks; an exception there stops the build
    and the next run resumes).
    """
    import cv2

    if int(every) < 1 or (max_frames is not None and int(max_frames) < 1):
        raise DatasetError(f"every={every!r}, max_frames={max_frames!r}: accepted are positive integers")
    if not 1 <= int(jpeg_quality) <= 100:
        raise DatasetError(f"jpeg_quality {jpeg_quality!r}: accepted is 1..100")
    mode = _resolve_mode(mode, flame_path)
    paths = list_videos(videos)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "dataset.json"
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        if previous.get("mode") != mode:
            raise DatasetError(f"{out} was built in {previous.get('mode')!r} mode, this build is {mode!r}; "
                               "use another folder")
    report = BuildReport(mode)
    taken: set[str] = set()
    tracking = _FlameTracking(Path(flame_path)) if mode == "flame" and flame_path is not None else None
    stand_in = _stand_in_vertices() if mode == "mesh" else None
    settings = {"every": int(every), "max_frames": max_frames, "blur_threshold": float(blur_threshold),
                "min_confidence": float(min_confidence), "jpeg_quality": int(jpeg_quality)}
    for path in paths:
        vid = _video_id(path, taken)
        report.videos.append(vid)
        folder = out / vid
        if (folder / "index.json").is_file():
            report.skipped_videos.append(vid)
            continue
        folder.mkdir(exist_ok=True)
        if tracking is not None:
            tracking.reset()
        _build_video(cv2, path, vid, folder, report, tracking, stand_in, settings, progress, on_frame)
    _write_meta(out, mode, report)
    return report


def _read_progress(folder: Path) -> list[dict]:
    lines = []
    log = folder / "progress.jsonl"
    if log.is_file():
        for text in log.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                break  # a line cut by the interruption: that frame is redone
    return lines


def _build_video(cv2, path: Path, vid: str, folder: Path, report: BuildReport,
                 tracking: _FlameTracking | None, stand_in: np.ndarray | None, settings: dict,
                 progress: bool, on_frame: Callable[[str, int], None] | None) -> None:
    from gaga_ros.crop import CropError, crop_head, crop_window, head_box
    from gaga_ros.tracking.landmarks import FaceLandmarker
    from gaga_ros.tracking.mesh_tracker import FitError, fit_head

    done = _read_progress(folder)
    kept = [d for d in done if d["kept"]]
    end = kept[-1]["offset"] + kept[-1]["length"] if kept else 0
    with open(folder / "frames.bin", "ab") as f:
        f.truncate(end)  # drop bytes of a frame whose record was never written
    with open(folder / "progress.jsonl", "w") as f:  # rewrite without a cut last line
        f.writelines(json.dumps(d) + "\n" for d in done)
    last_frame = done[-1]["frame"] if done else -1
    box = np.array(done[-1]["box"]) if done and done[-1].get("box") else None
    guess = np.array(kept[-1]["transform"], np.float32) if kept else None

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DatasetError(f"cannot open video {path}")
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    limit = settings["max_frames"]
    if limit is not None:
        total = min(total, limit) if total else limit
    bar = _progress(total, vid) if progress else None
    if bar is not None and last_frame >= 0:
        bar.update(last_frame + 1)
    if last_frame >= 0:
        cap.set(cv2.CAP_PROP_POS_FRAMES, last_frame + 1)
        if int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != last_frame + 1:  # seek unsupported: read through
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            for _ in range(last_frame + 1):
                cap.grab()
    index = last_frame + 1
    landmarker = FaceLandmarker(static_image_mode=False, max_faces=1,
                                min_confidence=settings["min_confidence"])
    try:
        with open(folder / "frames.bin", "ab") as frames, open(folder / "progress.jsonl", "a") as log:
            while limit is None or index < limit:
                ok, bgr = cap.read()
                if not ok:
                    break
                if index % settings["every"] == 0:
                    record = _track_frame(cv2, bgr, landmarker, box, guess, tracking, settings,
                                          crop_head, crop_window, head_box, fit_head, (FitError, CropError))
                    record["frame"] = index
                    if record.get("box") is not None:
                        box = np.array(record["box"])
                    if record["kept"]:
                        jpeg = record.pop("jpeg")
                        record["offset"], record["length"] = frames.tell(), len(jpeg)
                        frames.write(jpeg)
                        frames.flush()
                        guess = np.array(record["transform"], np.float32)
                        report.frames_kept += 1
                    else:
                        report.dropped[record["reason"]] += 1
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    report.frames_processed += 1
                if bar is not None:
                    bar.update()
                if on_frame is not None:
                    on_frame(vid, index)
                index += 1
    finally:
        landmarker.close()
        cap.release()
        if bar is not None:
            bar.close()
    _finish_video(folder, vid, path, stand_in, tracking is not None)


def _track_frame(cv2, bgr: np.ndarray, landmarker, box: np.ndarray | None, guess: np.ndarray | None,
                 tracking: _FlameTracking | None, settings: dict, crop_head, crop_window, head_box,
                 fit_head, fit_errors: tuple[type[Exception], ...]) -> dict:
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    faces = landmarker.detect(rgb)
    if not faces:
        return {"kept": False, "reason": "no_face", "box": None if box is None else box.tolist()}
    face = faces[0]
    current = head_box(face.points)
    box = current if box is None else BOX_EMA * current + (1 - BOX_EMA) * box
    record: dict = {"kept": False, "box": box.tolist()}
    try:
        window = crop_window(box)
        points = window.to_crop(face.points)
        fit = fit_head(points, CROP_SIZE, guess)
    except fit_errors:
        return record | {"reason": "fit_failed"}
    confidence = face.score / (1.0 + (fit.rmse_px / RMSE_HALF) ** 2)
    if confidence < settings["min_confidence"]:
        return record | {"reason": "low_confidence", "confidence": confidence}
    crop = crop_head(rgb, box)
    grey = cv2.cvtColor(crop.image, cv2.COLOR_RGB2GRAY)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    if sharpness < settings["blur_threshold"]:
        return record | {"reason": "blur", "sharpness": sharpness}
    corners = window.to_crop(np.array([box[:2], box[2:]])).reshape(-1) / CROP_SIZE
    record |= {"kept": True, "confidence": confidence, "sharpness": sharpness,
               "bbox": np.clip(corners, 0, 1).astype(np.float32).tolist(),
               "landmarks": np.asarray(points, np.float32).round(3).tolist(),
               "transform": fit.transform.astype(np.float32).tolist()}
    if tracking is not None:
        codes, verts = tracking(points)
        record |= {k: v.tolist() for k, v in codes.items()}
        record["vertices"] = verts.tolist()
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(crop.image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, settings["jpeg_quality"]])
    record["jpeg"] = jpeg.tobytes()
    return record


def _finish_video(folder: Path, vid: str, path: Path, stand_in: np.ndarray | None, flame: bool) -> None:
    done = _read_progress(folder)
    kept = [d for d in done if d["kept"]]
    arrays = {"frame": np.array([d["frame"] for d in kept], np.int64),
              "offset": np.array([d["offset"] for d in kept], np.int64),
              "length": np.array([d["length"] for d in kept], np.int64)}
    keys = ["bbox", "transform", "landmarks"]
    if flame:
        keys += ["shapecode", "expcode", "posecode", "eyecode"]
    for k in keys:
        arrays[k] = np.array([d[k] for d in kept], np.float32)
    arrays["transform"] = arrays["transform"].reshape(-1, 3, 4)
    np.savez(folder / "records.npz", **arrays)
    if flame:
        verts = np.array([d["vertices"] for d in kept], np.float32).reshape(-1, FLAME_VERTICES, 3)
    else:
        assert stand_in is not None  # mesh mode builds with the stand-in
        verts = np.broadcast_to(stand_in, (len(kept), FLAME_VERTICES, 3))
    np.save(folder / "vertices.npy", np.ascontiguousarray(verts, np.float32))
    dropped = Counter(d["reason"] for d in done if not d["kept"])
    index = {"video_id": vid, "source": str(path), "frames_processed": len(done), "frames": len(kept),
             "dropped": dict(dropped), "mode": "flame" if flame else "mesh",
             "vertices": "flame" if flame else "synthetic FLAME stand-in (zero codes); not faithful"}
    (folder / "index.json").write_text(json.dumps(index, indent=1))
    (folder / "progress.jsonl").unlink()


def _write_meta(out: Path, mode: str, report: BuildReport) -> None:
    videos = {}
    for folder in sorted(p for p in out.iterdir() if (p / "index.json").is_file()):
        videos[folder.name] = json.loads((folder / "index.json").read_text())
    meta = {"mode": mode, "crop_size": CROP_SIZE, "videos": videos,
            "frames": sum(v["frames"] for v in videos.values()),
            "dropped": dict(sum((Counter(v["dropped"]) for v in videos.values()), Counter()))}
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))


class PairDataset(Dataset):
    """(source, target) training pairs from a built dataset: the target is frame i, the source a
    random *other* frame of the same video, drawn from (seed, epoch, i) so any worker, rank or resumed
    run draws the same one. Indices from `PairSampler` carry the epoch (index + epoch * len)."""

    def __init__(self, root: str | Path, image_size: int, render_size: int, seed: int = 42) -> None:
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise DatasetError(f"{self.root} is not a built dataset (no dataset.json); build it with "
                               "`python -m gaga_ros.train build VIDEOS OUT`")
        self.meta = json.loads(meta_path.read_text())
        self.image_size, self.render_size, self.seed = int(image_size), int(render_size), int(seed)
        self.videos = [v for v, info in self.meta["videos"].items() if info["frames"] >= 2]
        if not self.videos:
            raise DatasetError(f"{self.root} has no video with at least 2 kept frames; pairs need two")
        counts = [self.meta["videos"][v]["frames"] for v in self.videos]
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._open: dict[str, tuple] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _video(self, k: int) -> tuple:
        vid = self.videos[k]
        if vid not in self._open:  # opened lazily, once per worker process
            folder = self.root / vid
            with np.load(folder / "records.npz") as npz:
                records = {key: npz[key] for key in npz.files}
            self._open[vid] = (records, np.load(folder / "vertices.npy", mmap_mode="r"),
                               np.memmap(folder / "frames.bin", dtype=np.uint8, mode="r"))
        return self._open[vid]

    def _image(self, frames: np.memmap, records: dict, j: int, size: int) -> torch.Tensor:
        import cv2

        start = int(records["offset"][j])
        bgr = cv2.imdecode(np.asarray(frames[start:start + int(records["length"][j])]), cv2.IMREAD_COLOR)
        x = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)[None].float() / 255
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x[0].clamp(0, 1)

    def pair(self, index: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        """Target frame `index` (0..len-1) and its source frame for `epoch`."""
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} outside 0..{len(self) - 1}")
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        j = index - int(self._starts[k])
        records, vertices, frames = self._video(k)
        n = int(self._starts[k + 1] - self._starts[k])
        rng = np.random.default_rng([self.seed, epoch, index])
        s = int(rng.integers(n - 1))
        s += s >= j  # any frame but the target
        return {"t_image": self._image(frames, records, j, self.render_size),
                "t_bbox": torch.from_numpy(records["bbox"][j].copy()),
                "t_points": torch.from_numpy(np.array(vertices[j], np.float32)),
                "t_transform": torch.from_numpy(records["transform"][j].copy()),
                "f_image": self._image(frames, records, s, self.image_size),
                "f_transform": torch.from_numpy(records["transform"][s].copy()),
                "video": torch.tensor(k), "target_frame": torch.tensor(j), "source_frame": torch.tensor(s)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(int(index), len(self))
        return self.pair(i, epoch)


class PairSampler(DistributedSampler):
    """DistributedSampler whose indices carry the epoch (for PairDataset's source draw) and which can
    start part-way through an epoch (exact resume). Works with any world size, including 1."""

    def __init__(self, dataset: PairDataset, num_replicas: int, rank: int, seed: int, start: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = start
        self.pairs = len(dataset)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.pairs
        indices = list(super().__iter__())[self.start:]
        return iter([i + offset for i in indices])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def steps_per_epoch(dataset_len: int, world_size: int, per_rank_batch: int) -> int:
    """Optimizer steps in one epoch (DistributedSampler with drop_last, then batches with drop_last)."""
    return (dataset_len // world_size) // per_rank_batch if dataset_len >= world_size else 0


__all__ = ["BuildReport", "DatasetError", "PairDataset", "PairSampler", "build_dataset", "list_videos",
           "steps_per_epoch"]
