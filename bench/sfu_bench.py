"""Direct vs Janus in one run: viewers' decoded fps, the bridge's CPU per added viewer, the
glass-to-glass latency Janus adds, and a late joiner's time to its first frame.

The "bridge" here is its streaming core in this process: two StreamServers side by side, one direct
and one publishing into a Janus started here (tests/janus_process.py), both fed the same 512x512
frames with frame codes at 30 fps (bench/webrtc_bench.py's Pusher). Viewers are headless Chromium
pages on the same machine. Measured, per mode:
- glass-to-glass: a direct page and a Janus page open at once in visible windows, each frame timed
  from its push to the moment the page shows it; Janus's addition is the difference of the medians
  under the same load (`--rounds` rounds of `--seconds`, a fresh browser each);
- CPU per added viewer: 1, 2, 4 viewers (background tabs, which decode without painting) of one mode
  while the other has none, this process's CPU (and Janus's) over `--seconds` each; the slope of a
  line through them. The Janus server's publisher encodes all the time, the direct one only while
  someone watches: both are a constant under the slope;
- late joiners: while one viewer of each mode watches, new pages open one at a time, alternating
  modes, each timed from its first connect to its first picture (signalling, ICE, DTLS, a keyframe,
  decode).

    python bench/sfu_bench.py            # needs apt-get install -y chromium janus
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from record import write
from webrtc_bench import Pusher, source_frames

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from browser import Browser  # noqa: E402
from janus_process import ROOM, JanusProcess  # noqa: E402

from gaga_ros.stream import StreamServer  # noqa: E402
from gaga_ros.stream.janus import SfuSettings  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of this process (None) or of process `pid`."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class FanOut:
    """push_frame into several servers (the same frame, the same push time for all)."""

    def __init__(self, *servers: StreamServer) -> None:
        self.servers = servers

    def push_frame(self, rgb: np.ndarray, stamp_ns: int) -> None:
        for server in self.servers:
            server.push_frame(rgb, stamp_ns)


async def glass_to_glass(urls: dict[str, str], pusher: Pusher, seconds: float) -> tuple[dict, dict]:
    """ms from push to display of each frame, and the pages' jitter buffer delay (ms), for pages of
    every mode open at the same time."""
    async with Browser() as browser:
        pages = {mode: await browser.new_page(url + "?codes=1") for mode, url in urls.items()}
        for page in pages.values():
            await page.wait_for("gaga.codes.length >= 30", timeout=60)
        for page in pages.values():
            await page.evaluate("gaga.codes.length = 0")
        await asyncio.sleep(seconds)
        codes = {mode: await page.evaluate("gaga.codes") for mode, page in pages.items()}
        jitter = {mode: await page.evaluate("gaga.stats.jitterBufferMs") for mode, page in pages.items()}
        for page in pages.values():
            await page.close()  # the page's goodbye (pagehide) ends its subscription at once
    return {mode: [t - pusher.pushed[c] for c, t in got if c in pusher.pushed]
            for mode, got in codes.items()}, jitter


async def viewers_cpu(url: str, counts: list[int], seconds: float, janus_pid: int) -> dict:
    """CPU % of one core (this process, Janus) and each viewer's decoded fps, per viewer count."""
    out = {}
    get = "[gaga.stats.framesDecoded || 0, performance.now()]"
    async with Browser() as browser:
        pages = []
        for n in counts:
            while len(pages) < n:
                pages.append(await browser.new_page(url, window=False))
            for page in pages:
                await page.wait_for("gaga.stats.framesDecoded >= 10", timeout=60)
            await asyncio.sleep(2)  # settle after the joins' keyframes
            start = [await p.evaluate(get) for p in pages]
            t0, own0, janus0 = time.monotonic(), cpu_s(None), cpu_s(janus_pid)
            await asyncio.sleep(seconds)
            wall = time.monotonic() - t0
            own, janus = cpu_s(None) - own0, cpu_s(janus_pid) - janus0
            end = [await p.evaluate(get) for p in pages]
            fps = [1000 * (e[0] - s[0]) / (e[1] - s[1]) for s, e in zip(start, end, strict=True)]
            out[n] = {"bridge_cpu_pct": 100 * own / wall, "janus_cpu_pct": 100 * janus / wall, "fps": fps,
                      "load": os.getloadavg()[0]}
            shown = ", ".join(f"{f:.1f}" for f in fps)
            print(f"  {n} viewers: bridge {out[n]['bridge_cpu_pct']:.1f} % janus "
                  f"{out[n]['janus_cpu_pct']:.1f} % decoded fps {shown}", flush=True)
        for page in pages:
            await page.close()
    return out


async def late_joiners(urls: dict[str, str], n: int) -> dict[str, list[float]]:
    """ms from a new page's first connect to its first picture, modes alternating, one page at a time,
    while one viewer of each mode watches."""
    out: dict[str, list[float]] = {mode: [] for mode in urls}
    gaps = random.Random(19)
    async with Browser() as browser:
        watching = [await browser.new_page(url, window=False) for url in urls.values()]
        for page in watching:
            await page.wait_for("gaga.stats.framesDecoded >= 10", timeout=60)
        for _ in range(n):
            for mode, url in urls.items():
                page = await browser.new_page(url)
                out[mode].append(await page.wait_for("gaga.firstFrameMs", timeout=60))
                await page.close()
                # a random gap, so joins do not lock onto the encoder's 2 s keyframe clock
                await asyncio.sleep(1.0 + 2.0 * gaps.random())
        for page in watching:
            await page.close()
    return out


def drained(direct: StreamServer, sfu: StreamServer, timeout: float = 30.0) -> None:
    """Wait until neither server has a viewer: a direct one still connected keeps its encoder busy."""
    deadline = time.monotonic() + timeout
    assert sfu.sfu is not None
    while direct.stats()["clients"] + direct.stats()["pending"] or sfu.sfu.subscribers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"viewers did not leave: {direct.stats()['clients']} direct, "
                               f"{len(sfu.sfu.subscribers)} through Janus")
        time.sleep(0.2)


def slope(cpu: dict, key: str) -> float:
    counts = sorted(cpu)
    return float(np.polyfit(counts, [cpu[n][key] for n in counts], 1)[0])


def unrouted(n: int) -> None:
    """Late joiners through Janus when PLI/FIR stop at aiortc's flag, as before issue 19."""
    import gaga_ros.stream.janus as janus_module

    janus_module.route_keyframe_requests = lambda sender, encoder: None  # type: ignore[assignment]
    janus = JanusProcess().start()
    try:
        with StreamServer(port=0, sfu=SfuSettings(janus.url, ROOM, janus.secret)) as sfu, \
                Pusher(sfu, source_frames()):
            while sfu.stats()["sfu"]["state"] != "publishing":
                time.sleep(0.1)
            late = asyncio.run(late_joiners({"sfu": sfu.url}, n))["sfu"]
    finally:
        janus.close()
    print(f"late joiner first frame ms through Janus, keyframe requests not routed: median "
          f"{np.median(late):.0f} ({', '.join(f'{v:.0f}' for v in late)})")
    write(REPO / "bench" / "results" / "sfu_bench_unrouted.json",
          {"late_joiner_ms": late, "late_joiner_median_ms": float(np.median(late)),
           "keyframe_interval_s": 2.0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3, help="glass-to-glass rounds")
    ap.add_argument("--viewers", default="1,2,4", help="viewer counts for the CPU line")
    ap.add_argument("--late", type=int, default=5, help="late joiners per mode")
    ap.add_argument("--unrouted", action="store_true",
                    help="only late joiners through Janus with keyframe requests NOT routed to the encoder "
                         "(what route_keyframe_requests saves); writes sfu_bench_unrouted.json")
    args = ap.parse_args()
    if args.unrouted:
        unrouted(args.late)
        return
    counts = [int(c) for c in args.viewers.split(",")]
    frames = source_frames()
    results: dict = {"size": "512x512", "fps": 30, "codec": "VP8", "browser": "headless Chromium"}
    janus = JanusProcess().start()
    try:
        with StreamServer(port=0) as direct, \
                StreamServer(port=0, sfu=SfuSettings(janus.url, ROOM, janus.secret)) as sfu, \
                Pusher(FanOut(direct, sfu), frames) as pusher:  # type: ignore[arg-type]  # duck-typed
            deadline = time.monotonic() + 30
            while sfu.stats()["sfu"]["state"] != "publishing":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not publishing: {sfu.stats()['sfu']}\n{janus.tail()}")
                time.sleep(0.1)
            urls = {"direct": direct.url, "sfu": sfu.url}
            lat: dict[str, list[float]] = {"direct": [], "sfu": []}
            jitter: dict[str, list[float]] = {"direct": [], "sfu": []}
            for r in range(args.rounds):
                got, buffered = asyncio.run(glass_to_glass(urls, pusher, args.seconds))
                for mode in lat:
                    lat[mode] += got[mode]
                    jitter[mode].append(buffered[mode])
                print(f"glass-to-glass round {r + 1}: " + ", ".join(
                    f"{m} median {np.median(v):.1f} ms" for m, v in got.items()), flush=True)
            cpu = {}
            for mode, url in urls.items():
                drained(direct, sfu)  # the other mode's viewers (and the glass-to-glass pages) are gone
                print(f"{mode} viewers", flush=True)
                cpu[mode] = asyncio.run(viewers_cpu(url, counts, args.seconds, janus.proc.pid))
            drained(direct, sfu)
            late = asyncio.run(late_joiners(urls, args.late))
            keyframes = {"direct": direct.stats()["peer_keyframes"], "sfu": sfu.stats()["peer_keyframes"]}
    finally:
        janus.close()
    for mode in ("direct", "sfu"):
        results[mode] = {
            "glass_to_glass": {"frames": len(lat[mode]), "median_ms": float(np.median(lat[mode])),
                               "p95_ms": float(np.percentile(lat[mode], 95)),
                               "jitter_buffer_ms": jitter[mode]},
            "viewers": cpu[mode], "bridge_cpu_pct_per_viewer": slope(cpu[mode], "bridge_cpu_pct"),
            "janus_cpu_pct_per_viewer": slope(cpu[mode], "janus_cpu_pct"),
            "min_fps": min(f for v in cpu[mode].values() for f in v["fps"]),
            "late_joiner_ms": late[mode], "late_joiner_median_ms": float(np.median(late[mode])),
            "peer_keyframes": keyframes[mode]}
    d, s = results["direct"], results["sfu"]
    results["sfu_added_latency_ms"] = s["glass_to_glass"]["median_ms"] - d["glass_to_glass"]["median_ms"]
    print(f"\n{'metric':40s} {'direct':>10s} {'janus':>10s}")
    for name, key in (("glass-to-glass median ms", lambda r: r["glass_to_glass"]["median_ms"]),
                      ("glass-to-glass p95 ms", lambda r: r["glass_to_glass"]["p95_ms"]),
                      ("bridge cpu % per added viewer", lambda r: r["bridge_cpu_pct_per_viewer"]),
                      ("janus cpu % per added viewer", lambda r: r["janus_cpu_pct_per_viewer"]),
                      ("lowest viewer decoded fps", lambda r: r["min_fps"]),
                      ("late joiner first frame ms (median)", lambda r: r["late_joiner_median_ms"]),
                      ("keyframes for peers' PLI/FIR", lambda r: r["peer_keyframes"])):
        print(f"{name:40s} {key(d):10.1f} {key(s):10.1f}")
    print(f"{'sfu added latency ms':40s} {results['sfu_added_latency_ms']:10.1f}")
    write(REPO / "bench" / "results" / "sfu_bench.json", results)


if __name__ == "__main__":
    main()
