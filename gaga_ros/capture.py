"""Frame sources for the capture node: webcam, video file or image folder, as RGB numpy frames."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from gaga_ros.errors import UnavailableError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class CaptureError(UnavailableError):
    """A source that cannot be opened or read; the message says which and what is accepted."""


class FrameSource:
    """Reads RGB uint8 frames from one source; `read()` returns None when a finite source ends."""

    def __init__(self, source: str, loop: bool = True, width: int = 0, height: int = 0) -> None:
        self.source = source
        self.loop = loop
        self._files: list[Path] = []
        self._index = 0
        self._cap: cv2.VideoCapture | None = None
        self.kind = self._open(width, height)

    def _open(self, width: int, height: int) -> str:
        src = self.source.strip()
        if src.isdigit():
            cap = cv2.VideoCapture(int(src))
            if not cap.isOpened():
                raise CaptureError(f"camera device {src} cannot be opened: check that /dev/video{src} "
                                   "exists and is not in use (accepted: a device index, a video file "
                                   "or an image folder)")
            if width and height:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            self._cap = cap
            return "device"
        path = Path(src).expanduser()
        if path.is_dir():
            self._files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._files:
                raise CaptureError(f"image folder {path} holds no images (accepted: "
                                   f"{', '.join(IMAGE_SUFFIXES)})")
            return "folder"
        if not path.is_file():
            raise CaptureError(f"capture source {src!r} does not exist (accepted: a device index, "
                               "a video file or an image folder)")
        cap = cv2.VideoCapture(str(path))
        ok, _ = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            raise CaptureError(f"video file {path} cannot be decoded (accepted: any format FFmpeg "
                               "reads, e.g. mp4/H.264, webm)")
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        self._cap = cap
        return "video"

    @property
    def native_fps(self) -> float:
        """The source's own frame rate (0 when unknown, e.g. image folders)."""
        return float(self._cap.get(cv2.CAP_PROP_FPS)) if self._cap is not None else 0.0

    def read(self) -> np.ndarray | None:
        """The next frame as RGB uint8 (H, W, 3); None at the end of a non-looping source."""
        if self.kind == "folder":
            if self._index >= len(self._files):
                if not self.loop:
                    return None
                self._index = 0
            path = self._files[self._index]
            self._index += 1
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise CaptureError(f"image {path} cannot be decoded")
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        assert self._cap is not None  # opened in __init__ for "video" and "device"
        ok, bgr = self._cap.read()
        if not ok and self.kind == "video" and self.loop:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self._cap.read()
        if not ok:
            if self.kind == "device":
                raise CaptureError(f"camera device {self.source} stopped delivering frames")
            return None
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class RateLimiter:
    """Paces a loop to a fixed rate on the monotonic clock without drifting."""

    def __init__(self, rate_hz: float) -> None:
        self.period = 1.0 / rate_hz
        self._next = time.monotonic()

    def sleep(self) -> None:
        self._next += self.period
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:  # fell behind: restart the schedule rather than burst
            self._next = time.monotonic()
