"""Benchmark indexing-ambiguity resolution on many simulated stills (10⁵ by default).

Simulator (shares no code with diffuse_cli.symmetry's ambiguity section): a
random tetragonal lattice (a in 40–60 Å, c in 60–90 Å) with a P4-symmetric
truth map (tests/test_merge_common.symmetric_truth: Laue-symmetrised Gaussian
blobs). Each still is an Ewald-sphere slice (random orientation, λ = 1 Å, a
detector of ``n_pixels`` pixels out to ``d_min``) of the truth at coarse voxel
centres, times a random scale, plus Gaussian noise of ``noise`` × the rms
anisotropic signal per pixel. Each still is reported in a random indexing
(h_reported = h_true · M_t, t uniform over the ambiguity operators), so the
true reindexing is known. Stills are generated lazily in chunks, so the
simulator holds one chunk at a time.

The stills go through ``determine_reindexing`` as diffuse.merge calls it
(binning into coarse features, then the scalable method above
``dense_max`` units). Reported: wall and CPU time (simulation excluded),
features and resolution separately, bytes of the stored features, peak RSS
of the process (``run`` uses a fresh subprocess, so the figure is this job's
alone), and the fraction of stills resolved correctly (up to one global
reindexing, which no method can fix).

Usage:

  python benchmarks/bench_ambiguity.py                 # 10⁵ stills
  python benchmarks/bench_ambiguity.py --n 20000 --json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

import diffuse_cli  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


class SyntheticStills:
    """Lazily simulated stills with known indexing (see module doc); source for determine_reindexing."""

    def __init__(self, n_stills: int, d_min: float = 4.0, n_pixels: int = 4096, noise: float = 1.0,
                 seed: int = 0, chunk: int = 100):
        from test_merge_common import symmetric_truth

        from diffuse_cli.grid import HKLGrid
        from diffuse_cli.ambiguity_cosets import ambiguity_operators
        from diffuse_cli.symmetry import LaueSymmetry, b_matrix

        rng = np.random.default_rng(seed)
        self.n, self.seed, self.chunk, self.noise = int(n_stills), seed, int(chunk), float(noise)
        a, c = rng.uniform(40, 60), rng.uniform(60, 90)
        self.unit_cell = (a, a, c, 90.0, 90.0, 90.0)
        self.laue = LaueSymmetry("P4")
        self.ambiguity = ambiguity_operators(self.unit_cell, self.laue)
        self.d_min = float(d_min)
        self.grid = HKLGrid.for_resolution(1, self.unit_cell, self.d_min)
        self.truth = symmetric_truth(self.grid, self.laue, self.unit_cell, n_blobs=300,
                                     seed=seed + 1, width=0.03)
        self.B = b_matrix(self.unit_cell)
        # flat detector normal to the beam, pixels out to 2θ of d_min (λ = 1 Å)
        side = int(round(np.sqrt(n_pixels)))
        tan2t = np.tan(2 * np.arcsin(1.0 / (2 * self.d_min)))
        x = np.linspace(-tan2t, tan2t, side) / np.sqrt(2)
        X, Y = np.meshgrid(x, x)
        s1 = np.stack([X, Y, np.ones_like(X)], -1).reshape(-1, 3)
        s1 /= np.linalg.norm(s1, axis=1)[:, None]
        self.q = s1 - np.array([0.0, 0.0, 1.0])
        ops = self.ambiguity.operators
        self.twin = rng.integers(0, len(ops), self.n)
        # the correct reindexing undoes the twin: M_t · M_a in the Laue group
        laue_keys = {r.tobytes() for r in self.laue.rotations.astype(np.int64)}
        undo = [next(a for a in range(len(ops)) if (ops[t] @ ops[a]).astype(np.int64).tobytes()
                     in laue_keys) for t in range(len(ops))]
        self.expected = np.asarray(undo)[self.twin]
        anis = self.truth - self.truth.mean()
        self.pixel_sigma = self.noise * float(np.std(anis))
        self.beam_cos_c = np.full(self.n, np.nan)
        self._cache_start, self._cache = -1, None
        self.simulate_s = self.simulate_cpu_s = 0.0

    def __len__(self):
        return self.n

    def _make_chunk(self, start: int) -> list[dict]:
        from scipy.spatial.transform import Rotation

        t0, c0 = time.perf_counter(), time.process_time()
        stop = min(self.n, start + self.chunk)
        rng = np.random.default_rng([self.seed, start])
        U = Rotation.random(stop - start, random_state=rng).as_matrix()
        # |cos| of the angle between the beam and c*: near 0, the slice is close to a
        # zone (h0l) that the twin maps onto a symmetry mate (undecidable at low resolution)
        beam_c = np.abs(np.einsum("cij,i->cj", U, [0.0, 0.0, 1.0]) @ np.array([0.0, 0.0, 1.0]))
        self.beam_cos_c[start:stop] = beam_c
        inv_A = np.linalg.inv(U @ self.B)                      # (C, 3, 3)
        hkl = np.einsum("cij,pj->cpi", inv_A, self.q)          # (C, P, 3) true hkl
        off = np.asarray(self.grid.hkl_max)
        v = np.rint(hkl).astype(np.int64) + off
        shape = np.asarray(self.truth.shape)
        inside = np.all((v >= 0) & (v < shape), axis=-1)
        v = np.clip(v, 0, shape - 1)
        I_true = self.truth[v[..., 0], v[..., 1], v[..., 2]]
        k = rng.uniform(0.5, 2.0, stop - start)[:, None]
        I = k * I_true + rng.normal(0.0, self.pixel_sigma, I_true.shape)
        M = self.ambiguity.operators[self.twin[start:stop]].astype(np.float64)
        reported = np.einsum("cpi,cij->cpj", hkl, M)
        sigma = np.full(I.shape[1], self.pixel_sigma if self.pixel_sigma > 0 else 1.0)
        out = [{"hkl": reported[c][inside[c]], "I": I[c][inside[c]], "sigma": sigma[inside[c]]}
               for c in range(stop - start)]
        self.simulate_s += time.perf_counter() - t0
        self.simulate_cpu_s += time.process_time() - c0
        return out

    def load(self, i: int) -> dict:
        start = (i // self.chunk) * self.chunk
        if start != self._cache_start:
            self._cache, self._cache_start = self._make_chunk(start), start
        return self._cache[i - start]


def fraction_correct(assignment, expected, ambiguity, where=None) -> float:
    """Fraction of stills (``where``) whose reindexing is right, up to one global operator."""
    table = ambiguity.product_table()
    where = np.ones(len(expected), dtype=bool) if where is None else where
    best = max(range(ambiguity.n), key=lambda g: np.mean(table[assignment, g] == expected))
    return float(np.mean((table[assignment, best] == expected)[where]))


def _run_here(n_stills: int, d_min: float, n_pixels: int, noise: float, seed: int,
              dense_max: int, subset: int, max_passes: int) -> dict:
    from diffuse_cli.ambiguity import determine_reindexing

    src = SyntheticStills(n_stills, d_min=d_min, n_pixels=n_pixels, noise=noise, seed=seed)
    w0, c0 = time.perf_counter(), time.process_time()
    res = determine_reindexing(src, src.ambiguity, src.unit_cell, d_min=d_min, seed=seed,
                               dense_max=dense_max, subset=subset, max_passes=max_passes)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    info = res.get("info", {})
    out = {"n_stills": n_stills, "unit_cell": [round(x, 2) for x in src.unit_cell],
           "space_group": "P4", "n_operators": src.ambiguity.n, "d_min": d_min,
           "n_pixels": n_pixels, "noise": noise, "method": res["method"],
           # simulation runs inside determine_reindexing's loads: excluded from both clocks
           "wall_s": round(wall - src.simulate_s, 2), "cpu_s": round(cpu - src.simulate_cpu_s, 2),
           "simulate_wall_s": round(src.simulate_s, 2), "simulate_cpu_s": round(src.simulate_cpu_s, 2),
           "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "fraction_correct": round(fraction_correct(res["assignment"], src.expected,
                                                      src.ambiguity), 5),
           # beam more than 20° out of the a-b plane: away from the undecidable zones
           "fraction_correct_beam_off_ab": round(fraction_correct(
               res["assignment"], src.expected, src.ambiguity,
               src.beam_cos_c > np.sin(np.radians(20))), 5),
           "mean_cc_same": round(float(res["mean_cc_same"]), 4)}
    if info:
        n_entries = info["feature_bytes"] / 8
        out.update(features_s=round(info["features_s"] - src.simulate_s, 2),
                   resolve_s=round(info["resolve_s"], 2),
                   features_cpu_s=round(info["features_cpu_s"] - src.simulate_cpu_s, 2),
                   resolve_cpu_s=round(info["resolve_cpu_s"], 2),
                   feature_MB=round(info["feature_bytes"] / 1e6, 1),
                   voxels_per_still=round(n_entries / (n_stills * src.ambiguity.n), 1),
                   subset=info["subset"], passes=info["passes"], changed=info["changed"],
                   mean_cc_reference=round(info["mean_cc_reference"], 4))
    return out


def run(n_stills: int = 100_000, d_min: float = 4.0, n_pixels: int = 4096, noise: float = 1.0,
        seed: int = 0, dense_max: int = 1000, subset: int = 500, max_passes: int = 5,
        isolated: bool = True) -> dict:
    """Time ambiguity resolution of ``n_stills`` simulated stills; a dict of figures.

    isolated: run in a fresh Python process, so peak RSS and CPU are this job's alone.
    """
    args = dict(n_stills=n_stills, d_min=d_min, n_pixels=n_pixels, noise=noise, seed=seed,
                dense_max=dense_max, subset=subset, max_passes=max_passes)
    if not isolated:
        return _run_here(**args)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--here", "--json",
           "--n", str(n_stills), "--d-min", str(d_min), "--pixels", str(n_pixels),
           "--noise", str(noise), "--seed", str(seed), "--dense-max", str(dense_max),
           "--subset", str(subset), "--max-passes", str(max_passes)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench_ambiguity subprocess failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="number of stills")
    ap.add_argument("--d-min", type=float, default=4.0, help="resolution of the ambiguity analysis (Å)")
    ap.add_argument("--pixels", type=int, default=4096, help="pixels per simulated still")
    ap.add_argument("--noise", type=float, default=1.0, help="pixel noise / rms anisotropic signal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-max", type=int, default=1000, help="ambiguity.dense_max")
    ap.add_argument("--subset", type=int, default=500, help="ambiguity.subset")
    ap.add_argument("--max-passes", type=int, default=5, help="ambiguity.max_passes")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--here", action="store_true", help="run in this process (run() uses a subprocess)")
    a = ap.parse_args(argv)
    r = run(a.n, a.d_min, a.pixels, a.noise, a.seed, a.dense_max, a.subset, a.max_passes,
            isolated=not a.here)
    if a.json:
        print(json.dumps(r))
    else:
        for key, value in r.items():
            print(f"{key:>18}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
