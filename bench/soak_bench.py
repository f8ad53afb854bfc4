"""Soak: the demo graph (driver, reconstruction, render, bridge) streaming to N headless Chromium
viewers for a bounded time, loopback only. Records frames rendered and decoded per client, drops,
and the RSS and threads of every node process at start (after warm-up) and end.

    .venv/bin/python bench/soak_bench.py                 # 10 minutes, 8 clients
    .venv/bin/python bench/soak_bench.py --seconds 90    # what tests/test_soak.py runs

Writes bench/results/soak.json (or --out). Needs chromium (apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from record import write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

#: Memory bound of every node over a soak: end RSS <= start RSS * (1 + GROWTH) + SLACK_KB. The start
#: is sampled after warm-up (all viewers decoding), so one-off allocations are already counted.
GROWTH = 0.10
SLACK_KB = 30_000


def node_memory(graph) -> dict[str, dict[str, int]]:
    from test_faults import proc_status

    return {name: proc_status(proc.pid) for name, proc in graph.procs.items() if proc.poll() is None}


async def _soak(graph, obs, seconds: float, clients: int, sample_s: float) -> dict:
    from browser import Browser

    url = graph.url + "?stats=1"
    async with Browser() as browser:
        pages = [await browser.new_page(url, window=False) for _ in range(clients)]
        for page in pages:
            await page.wait_for("gaga.stats.framesDecoded >= 10", timeout=120)
        stats0 = [await page.evaluate("gaga.stats") for page in pages]
        t0 = time.monotonic()
        rendered0 = len(obs.frame_times)
        mem0 = node_memory(graph)
        samples = [{"t": 0.0, **{n: m["VmRSS"] for n, m in mem0.items()}}]
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(min(sample_s, max(0.0, seconds - (time.monotonic() - t0))))
            samples.append({"t": round(time.monotonic() - t0, 1),
                            **{n: m["VmRSS"] for n, m in node_memory(graph).items()}})
        elapsed = time.monotonic() - t0
        rendered = len(obs.frame_times) - rendered0
        stats1 = [await page.evaluate("gaga.stats") for page in pages]
        states = [await page.evaluate("gaga.state") for page in pages]
        connects = [await page.evaluate("gaga.connects") for page in pages]
        mem1 = node_memory(graph)
    per_client = []
    for i, (a, b) in enumerate(zip(stats0, stats1, strict=True)):
        per_client.append({
            "client": i, "state": states[i], "connects": connects[i],
            "frames_decoded": b["framesDecoded"] - a["framesDecoded"],
            "frames_dropped": b.get("framesDropped", 0) - a.get("framesDropped", 0),
            "fps": (b["framesDecoded"] - a["framesDecoded"]) / elapsed})
    memory = {}
    for name in mem0:
        start, end = mem0[name]["VmRSS"], mem1.get(name, {}).get("VmRSS", 0)
        memory[name] = {"rss_start_kb": start, "rss_end_kb": end,
                        "rss_max_kb": max(s.get(name, 0) for s in samples),
                        "growth_pct": 100.0 * (end - start) / start,
                        "threads_start": mem0[name]["Threads"],
                        "threads_end": mem1.get(name, {}).get("Threads", 0),
                        "bound_kb": int(start * (1 + GROWTH) + SLACK_KB)}
    total0 = sum(m["rss_start_kb"] for m in memory.values())
    total1 = sum(m["rss_end_kb"] for m in memory.values())
    return {"seconds": round(elapsed, 1), "clients": clients,
            "frames_rendered": rendered, "render_fps": rendered / elapsed,
            "per_client": per_client, "memory": memory,
            "memory_growth_pct": 100.0 * (total1 - total0) / total0,
            "samples": samples, "render_diagnostics": obs.status("render")[2],
            "bridge_diagnostics": obs.status("bridge")[2]}


def run_soak(seconds: float, clients: int, workdir: Path, sample_s: float = 5.0) -> dict:
    """Start the graph, soak it with `clients` viewers for `seconds`, stop it; the figures."""
    from test_faults import GRAPH_PARAMS, Graph, Observer

    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 101)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    graph = Graph(workdir, GRAPH_PARAMS)
    obs = Observer()
    graph.start_all()
    try:
        if not obs.serving(timeout=180):
            raise RuntimeError("the graph never served frames:\n" + "\n".join(
                f"--- {n}\n{graph.log(n)[-1500:]}" for n in graph.procs))
        result = asyncio.run(_soak(graph, obs, seconds, clients, sample_s))
        result["alive_at_end"] = {n: p.poll() is None for n, p in graph.procs.items()}
    finally:
        result_codes = graph.stop()
        obs.close()
    result["exit_codes"] = result_codes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gaga_soak_") as tmp:
        r = run_soak(ns.seconds, ns.clients, Path(tmp), sample_s=10.0 if ns.seconds > 120 else 5.0)
    write(ns.out, r)
    print(f"soak: {r['clients']} clients, {r['seconds']} s, render {r['render_fps']:.1f} fps, "
          f"{r['frames_rendered']} frames rendered")
    print(f"{'client':>6} {'state':>10} {'connects':>8} {'decoded':>8} {'dropped':>8} {'fps':>6}")
    for c in r["per_client"]:
        print(f"{c['client']:>6} {c['state']:>10} {c['connects']:>8} {c['frames_decoded']:>8} "
              f"{c['frames_dropped']:>8} {c['fps']:>6.1f}")
    print(f"{'node':>15} {'RSS start MB':>12} {'end MB':>8} {'max MB':>8} {'growth %':>9} "
          f"{'threads':>9} {'bound MB':>9}")
    for name, m in r["memory"].items():
        print(f"{name:>15} {m['rss_start_kb'] / 1024:>12.1f} {m['rss_end_kb'] / 1024:>8.1f} "
              f"{m['rss_max_kb'] / 1024:>8.1f} {m['growth_pct']:>9.2f} "
              f"{m['threads_start']:>4}->{m['threads_end']:<4} {m['bound_kb'] / 1024:>9.1f}")
    print(f"memory growth, all nodes: {r['memory_growth_pct']:.2f} %  -> {ns.out}")


if __name__ == "__main__":
    main()
