"""Fuzz: the CI fuzz run of tests/test_hardening.py, longer. Every input of the running graph (each
subscribed message type, the services, the bridge's HTTP and data channel) gets N hypothesis draws;
the table says, per target, inputs sent, refused, refused without a reason (must be 0), and the
run ends with the node exits (must be 0) and whether /avatar/image still flows.

    .venv/bin/python bench/fuzz_bench.py                  # 400 draws per target
    .venv/bin/python bench/fuzz_bench.py --examples 40    # what CI runs

Writes bench/results/fuzz.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from record import write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400, help="hypothesis draws per target")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fuzz.json")
    args = parser.parse_args()

    from fuzzing import csrf_headers, graph_params, run_all
    from test_faults import Graph, Observer

    media = REPO.parent / "shared" / "media"
    with tempfile.TemporaryDirectory(prefix="gaga_fuzz_") as tmp:
        work = Path(tmp)
        graph = Graph(work, graph_params(work, media))
        obs = Observer()
        graph.start_all()
        try:
            if not obs.serving(timeout=180):
                sys.exit("the graph never served frames")
            t0 = time.monotonic()
            rows = run_all(graph, obs, args.examples, media, lambda: csrf_headers(graph))
            seconds = time.monotonic() - t0
            exits = {n: p.returncode for n, p in graph.procs.items() if p.poll() is not None}
            serving = obs.serving(timeout=30)
        finally:
            codes = graph.stop()
            obs.close()
    total = sum(r["sent"] for r in rows.values())
    print(f"{'target':44} {'sent':>6} {'refused':>8} {'unexplained':>12}")
    for name, r in rows.items():
        print(f"{name:44} {r['sent']:6d} {r['refused']:8d} {r['unexplained']:12d}")
    print(f"\nfuzz inputs survived: {total if not exits else 0} in {seconds:.0f} s "
          f"({args.examples} draws per target); node exits: {len(exits)}; frames after: {serving}")
    write(args.out, {
        "examples_per_target": args.examples, "seconds": round(seconds, 1),
        "inputs": total, "node_exits": exits, "serving_after": serving, "stop_codes": codes,
        "targets": rows})
    print(f"wrote {args.out}")
    if exits or not serving or any(r["unexplained"] for r in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
