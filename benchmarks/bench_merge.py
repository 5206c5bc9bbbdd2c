"""Benchmark diffuse.merge's binning + accumulation, and its memory bound.

Streams synthetic stills (Ewald-sphere slices of a flat 1000×1000-pixel
detector, random orientations, pixel order) through the merge accumulator
(hkl → voxel → Σw, Σw·I, count for two half-datasets), then folds onto the
ASU of the Laue group. A pool of stills is precomputed (float32 hkl, as the
corrected-observation reader gives) and cycled, so the timing is the merge,
not the data generation.

Reports observations per second per core (accumulation alone, and including
the ASU map and fold), and the peak resident memory (ru_maxrss), which must
not grow with the number of observations.

Usage:

  python benchmarks/bench_merge.py                    # 1e9 observations, 15 M-voxel grid
  python benchmarks/bench_merge.py --n-obs 2e7 --grid small --json
  python benchmarks/bench_merge.py --numpy            # the numpy bincount fallback

End to end (issue 12): diffuse.merge as a user runs it, from corrected files to the
written maps and statistics, in a child process; CPU = user + system time of the
child (resource.getrusage(RUSAGE_CHILDREN)), observations = merged.npz's
n_observations (observations merged inside the resolution range). With
``--stills a,b`` it runs twice (the first a, then b files) and also reports the
marginal rate Δobservations / ΔCPU, which leaves out the per-run costs (imports,
experiments, ASU map, per-detector factors, writing the map and pictures):

  python benchmarks/bench_merge.py --end-to-end combined.expt corrected/ --stills 2,4 \\
      -- ndiv=3 d_min=2.5 space_group=P41212      # thaumatin stills: < 3 min

Add ``output.plots=False`` after ``--`` for the maps and statistics alone (the pictures, about
1 CPU-s, left out; the map is the same).

Peak memory of a merge on a 100 Å cubic P1 cell at 1.5 Å, ndiv=3 (issue 12, item 3):

  python benchmarks/bench_merge.py --rss-100A --pool 4 --n-side 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

import diffuse_cli  # noqa: F401
from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import HAVE_NUMBA, Accumulator
from diffuse_cli.symmetry import LaueSymmetry, b_matrix, grid_asu_map

GRIDS = {
    # thaumatin-like: P41212, 58.4 58.4 152.3, d_min 2 Å, ndiv 3 -> 15 M voxels
    "large": ((58.4, 58.4, 152.3, 90, 90, 90), "P43212", 2.0, 3),
    "small": ((40.0, 40.0, 60.0, 90, 90, 90), "P43212", 2.0, 2),
}


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def detector_q(n_side=1000, wavelength=1.0, distance=200.0, pixel=0.172) -> np.ndarray:
    x = (np.arange(n_side) - n_side / 2 + 0.5) * pixel * 1.5
    X, Y = np.meshgrid(x, x)
    lab = np.stack([X, Y, np.full_like(X, distance)], -1).reshape(-1, 3)
    s1 = lab / np.linalg.norm(lab, axis=1)[:, None] / wavelength
    return s1 - np.array([0.0, 0.0, 1.0 / wavelength])


def make_pool(unit_cell, n_pool: int, n_side: int, seed: int = 0):
    from scipy.spatial.transform import Rotation

    q = detector_q(n_side)
    B = b_matrix(unit_cell)
    rng = np.random.default_rng(seed)
    pool = []
    for U in Rotation.random(n_pool, random_state=seed).as_matrix():
        hkl = (q @ np.linalg.inv(U @ B).T).astype(np.float32)
        I = rng.gamma(2.0, 1.0, len(q)).astype(np.float32)
        sig = np.sqrt(I + 0.5).astype(np.float32)
        pool.append((hkl, I, sig))
    return pool


def end_to_end(expt: str, corrected: str, n_files: int | None, merge_args: list[str], workdir: str) -> dict:
    """One diffuse.merge run in a child process on the first ``n_files`` corrected stills."""
    import glob
    import os
    import subprocess

    from diffuse_cli.merge_inputs import corrected_files

    files = corrected_files([corrected])[:n_files] if os.path.isdir(corrected) else sorted(glob.glob(corrected))
    out = os.path.join(workdir, f"merged_{len(files)}")
    # -P: the current directory is not put first on sys.path, so PYTHONPATH picks the tree to time
    cmd = [sys.executable, "-P", "-c", "import sys; from diffuse_cli.command_line.merge import run; run(sys.argv[1:])",
           expt, *files, *merge_args,
           f"output.directory={out}", f"output.log={out}.log"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    n_obs = int(np.load(os.path.join(out, "merged.npz"))["n_observations"])
    return {"n_stills": len(files), "n_observations": n_obs, "cpu_seconds": cpu,
            "user_seconds": after.ru_utime - before.ru_utime, "system_seconds": after.ru_stime - before.ru_stime,
            "wall_seconds": wall, "obs_per_cpu_second": n_obs / cpu, "maxrss_mb_child": after.ru_maxrss / 1024.0}


def main_end_to_end(args, merge_args) -> dict:
    import tempfile

    counts = [int(x) for x in args.stills.split(",")] if args.stills else [None]
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as work:
        runs = [end_to_end(args.end_to_end[0], args.end_to_end[1], n, merge_args, work) for n in counts]
    out = {"runs": runs}
    if len(runs) == 2:
        a, b = runs
        out["marginal_obs_per_cpu_second"] = ((b["n_observations"] - a["n_observations"])
                                              / (b["cpu_seconds"] - a["cpu_seconds"]))
    if args.json:
        print(json.dumps(out))
    else:
        for r in runs:
            print(f"{r['n_stills']} stills: {r['n_observations']} observations merged, CPU {r['cpu_seconds']:.2f} s "
                  f"(user {r['user_seconds']:.2f}, system {r['system_seconds']:.2f}), wall {r['wall_seconds']:.2f} s, "
                  f"{r['obs_per_cpu_second'] / 1e6:.2f} M obs per CPU-second, child maxrss {r['maxrss_mb_child']:.0f} MB")
        if "marginal_obs_per_cpu_second" in out:
            print(f"marginal: {out['marginal_obs_per_cpu_second'] / 1e6:.2f} M obs per CPU-second")
    return out


def main_rss_100A(args) -> dict:
    """Peak RSS of one serial merge (issue 12, item 3): 100 Å cubic cell, P1, d_min 1.5 Å,
    ndiv=3, a few synthetic stills (scaling on), then diffuse.merge's outputs as its driver
    makes them: shell statistics, the radial profile, merged.ccp4, the three sections and
    merged.npz, written block by block from the merged ASU voxels (into a temporary folder)."""
    import os
    import tempfile

    from diffuse_cli import map_output
    from diffuse_cli.formats.merged import read_merged, write_merged
    from diffuse_cli.merged_blocks import dense_blocks, map_blocks, radial_profile_blocks
    from diffuse_cli.merge_statistics import shell_statistics
    from diffuse_cli.merging import scale_and_merge

    cell, d_min, ndiv = (100.0, 100.0, 100.0, 90, 90, 90), 1.5, 3
    laue = LaueSymmetry("P1")
    grid = HKLGrid.for_resolution(ndiv, cell, d_min)

    class Stills:  # made when the merge reads them, as files are (a pool held aside would count too)
        def __len__(self):
            return args.pool

        def load(self, i):
            hkl, I, sig = make_pool(cell, 1, args.n_side, seed=i)[0]
            return {"hkl": hkl, "I": I, "sigma": sig}

    rss0 = maxrss_mb()
    c0 = time.process_time()
    res = scale_and_merge(Stills(), grid, laue, cell, d_min=d_min, max_iterations=2)
    c_merge = time.process_time() - c0
    rss_merge = maxrss_mb()
    m = res.merged
    c0 = time.process_time()
    stats = shell_statistics(m, cell, 10, d_min=d_min)
    rss_stats = maxrss_mb()
    blocks = map_blocks(grid)
    centres, prof, nprof = radial_profile_blocks(m, grid, cell, 1.0 / d_min, blocks)
    I_block, sigma_block, counts_block = dense_blocks(m, grid, cell)
    with tempfile.TemporaryDirectory(prefix="bench_merge_rss_") as work:
        map_output.write_ccp4_slabs(os.path.join(work, "merged.ccp4"), grid, (I_block(*b) for b in blocks), cell)
        write_merged(os.path.join(work, "merged.npz"), grid, I_block, sigma_block, counts_block, cell, "P1",
                     n_observations=res.n_observations)
        c_out = time.process_time() - c0
        rss_out = maxrss_mb()
        n_written = int(np.sum(read_merged(os.path.join(work, "merged.npz"), fields=["counts"])["counts"]))
    out = {"grid_shape": list(grid.shape), "n_voxels": grid.n_voxels,
           "n_compact_voxels": len(m.asu_voxels()), "n_stills": args.pool,
           "n_observations": res.n_observations, "cpu_seconds_merge": c_merge, "cpu_seconds_outputs": c_out,
           "maxrss_mb_before_merge": rss0, "maxrss_mb_after_merge": rss_merge,
           "maxrss_mb_after_statistics": rss_stats, "maxrss_mb_with_outputs": rss_out,
           "counts_in_merged_npz": n_written, "cc_half": stats["overall"].get("cc_half"), "target_mb": 1536}
    print(json.dumps(out) if args.json else "\n".join(f"{k:>28}: {v}" for k, v in out.items()))
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    merge_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--end-to-end", nargs=2, metavar=("EXPT", "CORRECTED"),
                    help="time diffuse.merge end to end (parameters for it after --)")
    ap.add_argument("--stills", help="with --end-to-end: numbers of stills, e.g. 2,4 (marginal rate)")
    ap.add_argument("--rss-100A", action="store_true",
                    help="peak RSS of a merge on a 100 Å P1 cell at 1.5 Å, ndiv=3 (use --pool, --n-side)")
    ap.add_argument("--n-obs", type=float, default=1e9)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="large")
    ap.add_argument("--pool", type=int, default=6, help="distinct stills to cycle")
    ap.add_argument("--n-side", type=int, default=1000, help="detector side (pixels)")
    ap.add_argument("--chunk", type=int, default=4_000_000)
    ap.add_argument("--numpy", action="store_true", help="numpy fallback instead of numba")
    ap.add_argument("--shuffle", action="store_true", help="random pixel order (worst case)")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args(argv)
    if args.end_to_end:
        return main_end_to_end(args, merge_args)
    if args.rss_100A:
        return main_rss_100A(args)

    cell, sg, d_min, ndiv = GRIDS[args.grid]
    laue = LaueSymmetry(sg)
    grid = HKLGrid.for_resolution(ndiv, cell, d_min)
    pool = make_pool(cell, args.pool, args.n_side)
    if args.shuffle:
        rng = np.random.default_rng(1)
        pool = [tuple(a[p] for a in s) for s in pool for p in [rng.permutation(len(s[0]))]]
    rss_pool = maxrss_mb()
    per_still = len(pool[0][0])
    n_stills = int(np.ceil(args.n_obs / per_still))

    t0, c0 = time.perf_counter(), time.process_time()
    lut = grid_asu_map(grid, laue, cell, d_min=d_min)
    t_lut, c_lut = time.perf_counter() - t0, time.process_time() - c0
    acc = Accumulator(grid, 2, use_numba=not args.numpy)
    acc.add(*pool[0][:3], half=0, chunk=args.chunk)  # JIT warm-up, not timed
    acc = Accumulator(grid, 2, use_numba=not args.numpy)
    rss_start = maxrss_mb()
    halves = np.random.default_rng(2).integers(0, 2, n_stills)
    t0, c0 = time.perf_counter(), time.process_time()
    n_in = 0
    for i in range(n_stills):
        hkl, I, sig = pool[i % len(pool)]
        n_in += acc.add(hkl, I, sig, factor=1.0, half=int(halves[i]), chunk=args.chunk)
        if not args.json and (i + 1) % max(1, n_stills // 10) == 0:
            el = time.perf_counter() - t0
            print(f"  {i + 1}/{n_stills} stills, {(i + 1) * per_still / el / 1e6:.1f} M obs/s, "
                  f"maxrss {maxrss_mb():.0f} MB", flush=True)
    t_acc, c_acc = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    merged = acc.merge(lut)
    t_fold, c_fold = time.perf_counter() - t0, time.process_time() - c0
    n_total = n_stills * per_still
    out = {
        "grid": args.grid,
        "grid_shape": list(grid.shape),
        "n_voxels": grid.n_voxels,
        "laue_group": laue.laue_symbol,
        "kernel": "numpy" if (args.numpy or not HAVE_NUMBA) else "numba",
        "pixel_order": "shuffled" if args.shuffle else "detector",
        "n_observations": n_total,
        "n_accumulated": int(n_in),
        "n_measured_asu_voxels": int(np.sum(merged.counts > 0)),
        "seconds_accumulate": t_acc,
        "seconds_asu_map": t_lut,
        "seconds_fold": t_fold,
        "cpu_seconds_accumulate": c_acc,
        "cpu_seconds_asu_map": c_lut,
        "cpu_seconds_fold": c_fold,
        # per core: CPU time of this single-threaded process (the machine may be shared)
        "obs_per_cpu_second_accumulate": n_total / c_acc,
        "obs_per_cpu_second_total": n_total / (c_acc + c_lut + c_fold),
        "obs_per_wall_second_total": n_total / (t_acc + t_lut + t_fold),
        "maxrss_mb_after_pool": rss_pool,
        "maxrss_mb_before_stream": rss_start,
        "maxrss_mb_end": maxrss_mb(),
        "accumulator_mb": acc.acc.nbytes / 2**20,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>30}: {v:.4g}" if isinstance(v, float) else f"{k:>30}: {v}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
