"""WebRTC stream bench: glass-to-glass latency, encode cost per codec, viewers held at 30 fps.

Glass-to-glass: frames with a frame code (gaga_ros.stream.stamp_code) are pushed at 30 fps; the
headless Chromium viewer reads the code back at requestVideoFrameCallback time and records the
wall clock (performance.timeOrigin + presentationTime); the bench subtracts its own push wall time.
Same machine, same clock. Needs `apt-get install -y chromium`.

    python bench/webrtc_bench.py [--seconds 10] [--codec VP8] [--clients 1,2,4,8]
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from record import write

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from browser import Browser  # noqa: E402

from gaga_ros.stream import StreamServer, stamp_code  # noqa: E402
from gaga_ros.stream.tracks import CODE_VALUES  # noqa: E402

MEDIA = REPO.parent / "shared" / "media" / "obama.mp4"
SIZE = 512


def source_frames(n: int = 90) -> list[np.ndarray]:
    """512x512 frames of the test video, or a moving synthetic texture without it."""
    if MEDIA.exists():
        out = []
        with av.open(str(MEDIA)) as container:
            for frame in container.decode(video=0):
                out.append(frame.to_ndarray(format="rgb24", width=SIZE, height=SIZE))
                if len(out) == n:
                    break
        return out
    base = np.random.default_rng(0).integers(30, 220, (64, 64, 3), dtype=np.uint8)
    base = np.kron(base, np.ones((8, 8, 1), np.uint8))
    return [np.roll(base, i, axis=1) for i in range(n)]


def encode_ms(frames: list[np.ndarray]) -> dict[str, float]:
    """Median ms per frame of aiortc's own encoders (what a per-viewer sender would cost)."""
    out = {}
    for name, encoder in (("VP8", Vp8Encoder()), ("H264", H264Encoder())):
        times = []
        for i, rgb in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            vf.pts, vf.time_base = i * 3000, fractions.Fraction(1, 90000)
            t0 = time.perf_counter()
            encoder.encode(vf)
            times.append(time.perf_counter() - t0)
        out[name] = 1000 * float(np.median(times[5:]))
    return out


class Pusher:
    """Pushes the frames in a loop at fps, each with its frame code; remembers push wall times."""

    def __init__(self, server: StreamServer, frames: list[np.ndarray], fps: float = 30.0) -> None:
        self.server, self.frames, self.period = server, frames, 1.0 / fps
        self.pushed: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n, next_t = 0, time.perf_counter()
        while not self._stop.is_set():
            img = self.frames[n % len(self.frames)].copy()
            stamp_code(img, n)
            self.pushed[n % CODE_VALUES] = time.time() * 1000
            self.server.push_frame(img, time.time_ns())
            n += 1
            next_t += self.period
            time.sleep(max(0.0, next_t - time.perf_counter()))

    def __enter__(self) -> Pusher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def glass_to_glass(server: StreamServer, pusher: Pusher, seconds: float) -> dict:
    async with Browser() as browser:
        page = await browser.new_page(server.url + "?codes=1")
        await page.wait_for("gaga.codes.length >= 30", timeout=30)
        await page.evaluate("gaga.codes.length = 0")
        await asyncio.sleep(seconds)
        codes = await page.evaluate("gaga.codes")
        stats = await page.evaluate("gaga.stats")
    lat = np.array([t - pusher.pushed[c] for c, t in codes if c in pusher.pushed])
    return {"frames": len(lat), "median_ms": float(np.median(lat)), "p95_ms": float(np.percentile(lat, 95)),
            "rendered_fps": len(codes) / seconds, "jitter_buffer_ms": stats.get("jitterBufferMs"),
            "browser_kbps": stats.get("kbps")}


async def viewers_fps(server: StreamServer, n: int, seconds: float, window: bool) -> list[float]:
    """Decoded fps of each of n viewers (getStats framesDecoded over `seconds`)."""
    async with Browser() as browser:
        pages = [await browser.new_page(server.url, window=window) for _ in range(n)]
        for page in pages:
            await page.wait_for("gaga.stats.framesDecoded >= 10", timeout=60)
        await asyncio.sleep(2)
        get = "[gaga.stats.framesDecoded, performance.now()]"
        start = [await p.evaluate(get) for p in pages]
        await asyncio.sleep(seconds)
        end = [await p.evaluate(get) for p in pages]
    return [1000 * (e[0] - s[0]) / (e[1] - s[1]) for s, e in zip(start, end, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--codec", default="VP8", choices=["VP8", "H264"])
    ap.add_argument("--clients", default="1,2,4,8")
    args = ap.parse_args()
    frames = source_frames()
    results: dict = {"browser": "headless Chromium", "size": f"{SIZE}x{SIZE}", "fps": 30,
                     "source": MEDIA.name if MEDIA.exists() else "synthetic"}
    results["aiortc_encode_ms_per_frame"] = encode_ms(frames)
    g2g = {}
    for codec in (args.codec, "H264" if args.codec == "VP8" else "VP8"):
        with StreamServer(port=0, codec=codec) as server, Pusher(server, frames) as pusher:
            g2g[codec] = asyncio.run(glass_to_glass(server, pusher, args.seconds))
            g2g[codec]["server_encode_ms_mean"] = server.stats()["encode_ms_mean"]
    results["glass_to_glass"] = g2g
    # Visible windows paint every frame: on this machine the browsers' painting, not the server,
    # runs out of CPU first. Background tabs decode without painting: closer to the server's reach.
    for label, window in (("windows", True), ("background_tabs", False)):
        held = {}
        with StreamServer(port=0, codec=args.codec) as server, Pusher(server, frames):
            for n in (int(c) for c in args.clients.split(",")):
                fps = asyncio.run(viewers_fps(server, n, min(args.seconds, 6.0), window))
                held[n] = {"min_fps": min(fps), "fps": fps}
                print(f"{n} viewer {label}: decoded fps {', '.join(f'{f:.1f}' for f in fps)}", flush=True)
                if min(fps) < 28:
                    break
            held["server_encode_ms_mean"] = server.stats()["encode_ms_mean"]
        results[f"viewers_{label}"] = held
        results[f"clients_at_30fps_{label}"] = max(
            [n for n, v in held.items() if isinstance(n, int) and v["min_fps"] >= 28], default=0)
    print(f"\n{'metric':44s} value")
    for codec, r in g2g.items():
        print(f"{'glass-to-glass median ms (' + codec + ')':44s} {r['median_ms']:.1f}")
        print(f"{'glass-to-glass p95 ms (' + codec + ')':44s} {r['p95_ms']:.1f}")
        print(f"{'server shared encode ms mean (' + codec + ')':44s} {r['server_encode_ms_mean']:.1f}")
    for codec, ms in results["aiortc_encode_ms_per_frame"].items():
        print(f"{'encode ms per frame, aiortc ' + codec:44s} {ms:.1f}")
    for label in ("windows", "background_tabs"):
        print(f"{'clients at 30 fps (' + args.codec + ', ' + label + ')':44s} "
              f"{results['clients_at_30fps_' + label]}")
    write(REPO / "bench" / "results" / "webrtc.json", results)


if __name__ == "__main__":
    main()
