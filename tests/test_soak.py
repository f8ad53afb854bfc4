"""Load: the demo graph streams to 8 headless Chromium viewers for ~75 s (the CI cut of
bench/soak_bench.py, which runs 10 minutes). Every viewer keeps decoding, no node dies, and no
node's memory grows past the bound stated in soak_bench (start RSS + 10 % + 30 MB)."""

import sys
from pathlib import Path

import pytest
from browser import chromium_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

CLIENTS = 8
SECONDS = 75.0


@pytest.mark.slow
@pytest.mark.skipif(chromium_path() is None, reason="chromium missing: apt-get install -y chromium")
def test_soak_eight_viewers(tmp_path):
    from soak_bench import run_soak

    r = run_soak(SECONDS, CLIENTS, tmp_path)
    print({k: v for k, v in r.items() if k != "samples"})
    assert all(r["alive_at_end"].values()), r["alive_at_end"]
    assert r["frames_rendered"] > SECONDS, "the render node should keep producing (> 1 fps)"
    for c in r["per_client"]:
        assert c["state"] == "connected" and c["connects"] == 1, c  # never dropped or reconnected
        # each viewer decodes most of what was rendered (the bridge sends every new frame)
        assert c["frames_decoded"] >= 0.7 * r["frames_rendered"], (c, r["frames_rendered"])
    for name, m in r["memory"].items():
        assert m["rss_end_kb"] <= m["bound_kb"], (name, m)
        assert m["threads_end"] <= m["threads_start"] + 2, (name, m)
