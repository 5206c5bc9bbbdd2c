"""Benchmark diffuse.merge's scaling: time per observation of the simple and full models.

Uses the analytic stills of tests/test_scaling_models.py (Ewald slices of a
Laue-symmetric map on a two-panel detector, with absorption, detector
response, scale and offset injected) for an increasing number of stills,
and times a fixed number of scaling passes (tolerance 0, so every size does
the same work per observation). Scaling time must stay linear in the number
of observations: the reported µs per observation per pass should not grow
with the size.

Usage:

  python benchmarks/bench_scaling.py                       # 15, 30, 60, 120 stills
  python benchmarks/bench_scaling.py --stills 10 20 --passes 3 --json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

import diffuse_cli  # noqa: F401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))


def run(n_stills: int, model: str, passes: int) -> dict:
    import test_scaling_models as tsm

    from diffuse_cli.merging import ListSource, scale_and_merge
    from diffuse_cli.scaling import ScaleModel

    tsm.N_STILLS = n_stills
    sy = tsm.make_synthetic()
    n_obs = int(sum(len(s["I"]) for s in sy["stills"]))
    scale = tsm.full_terms() if model == "full" else ScaleModel(1, d_star_sq_max=1 / tsm.D_MIN**2)
    t0 = time.perf_counter()
    res = scale_and_merge(ListSource(sy["stills"]), sy["grid"], sy["laue"], tsm.UC, d_min=tsm.D_MIN,
                          model=scale, max_iterations=passes, tolerance=0.0)
    wall = time.perf_counter() - t0
    n_pass = res.iterations + 1  # pass 0 (unscaled merge) included
    return {"model": model, "stills": n_stills, "observations": n_obs, "passes": n_pass,
            "wall_s": round(wall, 3), "us_per_obs_per_pass": round(1e6 * wall / (n_obs * n_pass), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stills", type=int, nargs="+", default=[15, 30, 60, 120])
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--models", nargs="+", default=["simple", "full"], choices=["simple", "full"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rows = [run(n, m, a.passes) for m in a.models for n in a.stills]
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'model':>7} {'stills':>7} {'obs':>10} {'passes':>6} {'wall s':>8} {'µs/obs/pass':>12}")
        for r in rows:
            print(f"{r['model']:>7} {r['stills']:>7} {r['observations']:>10} {r['passes']:>6} "
                  f"{r['wall_s']:>8.2f} {r['us_per_obs_per_pass']:>12.3f}")
    for m in a.models:
        per = [r["us_per_obs_per_pass"] for r in rows if r["model"] == m]
        if len(per) > 1:
            print(f"{m}: time per observation, largest / smallest size = {per[-1] / per[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
