"""One way for the benchmarks to time a step and to record where a figure came from.

Every results file under bench/results/ carries the same provenance, the three things a line of
bench/RESULTS.md names: the machine, the commit and the command. `write` adds them (and the load
average, since other jobs share these cores) to a script's results. `timed_ms` times one call per
item with time.perf_counter, dropping a warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """Host, CPU, cores, and the GPU and torch version when torch is loaded."""
    info: dict[str, Any] = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def commit() -> str:
    """The short commit of the repository, with "+changes" when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def command() -> str:
    """This process's command line, the script named relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return " ".join(["python", str(name), *sys.argv[1:]])


def write(path: Path, results: dict[str, Any]) -> None:
    """Write `results` with machine, commit, command and load average to `path` (JSON) and say so."""
    record = {**results, "machine": machine(), "commit": commit(), "command": command(),
              "load_average_at_end": os.getloadavg()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def timed_ms(fn: Callable[[Any], object], items: Iterable[Any], warmup: int = 0,
             sync: Callable[[], object] | None = None) -> np.ndarray:
    """Milliseconds of fn(item) for each item, the first `warmup` calls left out. `sync` (e.g.
    torch.cuda.synchronize) runs before the clock starts and inside the timing, so queued GPU work
    counts to the call that queued it."""
    out = []
    for item in items:
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn(item)
        if sync is not None:
            sync()
        out.append((time.perf_counter() - t0) * 1000)
    return np.array(out[warmup:])


def stats(ms: Iterable[float]) -> dict[str, float]:
    """Median, 90th percentile, least and most of timings in milliseconds."""
    a = np.asarray(list(ms), np.float64)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "min_ms": float(a.min()), "max_ms": float(a.max())}
