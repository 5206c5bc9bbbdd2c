"""Memory of diffuse.merge's accumulation is bounded by the grid, not the observations."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_merge.py"


def _run(n_obs: float) -> dict:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--n-obs", str(n_obs), "--grid", "small", "--pool", "2",
         "--n-side", "500", "--json"],
        check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_maxrss_independent_of_number_of_observations():
    small = _run(2e6)
    large = _run(2e7)
    assert large["n_observations"] >= 10 * small["n_observations"]
    assert large["n_accumulated"] > 0.5 * large["n_observations"]
    # 10× more observations, streamed in chunks: peak memory unchanged (±24 MB)
    assert abs(large["maxrss_mb_end"] - small["maxrss_mb_end"]) < 24
    # and bounded by the grid: accumulators + fold temporaries, not the stream
    growth = large["maxrss_mb_end"] - large["maxrss_mb_before_stream"]
    assert growth < 3 * large["accumulator_mb"] + 64
