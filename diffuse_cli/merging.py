"""Streaming accumulation of observations on the hkl grid, merging and statistics.

Observations (fractional hkl, intensity I, σ) are accumulated still by still
into dense **P1** arrays over the whole grid (:class:`diffuse_cli.grid.HKLGrid`)
for two half-datasets (stills assigned to halves at random with a fixed seed):
Σw, Σw·I and the count, with w = 1/σ². Memory is therefore bounded by the grid,
never by the number of observations. The Laue-group merge is obtained by
folding these P1 sums onto the asymmetric unit with the grid's ASU map
(:func:`diffuse_cli.symmetry.grid_asu_map`), so a P1 merge symmetrised later
and a merge in the Laue group are the same thing. Merged voxel value:
I = Σw·I / Σw, σ = 1/sqrt(Σw) (inverse-variance weighted mean).

The per-observation hot loop (hkl → voxel → three sums) is a numba kernel
when numba is importable (≈ 20–40 M observations per CPU-second here for
detector-ordered pixels), with a numpy ``unique``/``bincount`` fallback
(≈ 4 M/s) that gives the same sums to rounding.

Distributed runs (MPI): every rank accumulates its own stills; the arrays are
summed with ``Allreduce``, giving the same map as a serial run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from diffuse_cli.grid import HKLGrid
from diffuse_cli.scaling import (FitResult, ScaleModel, ScalingTerms, fit_scale, model_variance,
                                 normalisation)
from diffuse_cli.symmetry import LaueSymmetry, b_matrix, grid_asu_map, reciprocal_metric

logger = logging.getLogger("diffuse.merging")

try:  # optional accelerator (Debian: python3-numba)
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on the installation
    numba = None
    HAVE_NUMBA = False


# ---------------------------------------------------------------- kernels


def _kernel_py(hkl, I, sig, factor, weight, ndiv, offset, shape, acc):
    """One pass: hkl → voxel, skip invalid, add (w, w·I, 1, w²σ²) to acc[voxel] (numba-compiled).

    I and σ are multiplied by ``factor`` (1/scale). ``weight``: empty for
    inverse-variance weights w = 1/σ² (σ > 0 required), else the per-observation
    weight (w > 0 required; σ = 0 allowed, e.g. a pixel with zero counts).
    acc: (n_voxels, 4) float64, interleaved so one voxel is one cache line.
    """
    n0, n1, n2 = shape[0], shape[1], shape[2]
    nf = factor.shape[0]
    has_w = weight.shape[0] > 0
    nin = 0
    for i in range(hkl.shape[0]):
        f = factor[0] if nf == 1 else factor[i]
        s = sig[i] * f
        v = I[i] * f
        if not np.isfinite(v) or not np.isfinite(s):
            continue
        if has_w:
            w = np.float64(weight[i])
            if not (w > 0.0) or not np.isfinite(w) or s < 0.0:
                continue
        else:
            if not (s > 0.0):
                continue
            w = 1.0 / (np.float64(s) * np.float64(s))
        u0 = np.int64(np.rint(hkl[i, 0] * ndiv[0])) + offset[0]
        u1 = np.int64(np.rint(hkl[i, 1] * ndiv[1])) + offset[1]
        u2 = np.int64(np.rint(hkl[i, 2] * ndiv[2])) + offset[2]
        if u0 < 0 or u0 >= n0 or u1 < 0 or u1 >= n1 or u2 < 0 or u2 >= n2:
            continue
        k = (u0 * n1 + u1) * n2 + u2
        acc[k, 0] += w
        acc[k, 1] += w * np.float64(v)
        acc[k, 2] += 1.0
        acc[k, 3] += w * w * np.float64(s) * np.float64(s)
        nin += 1
    return nin


_kernel_nb = numba.njit(nogil=True, cache=True)(_kernel_py) if HAVE_NUMBA else None


def voxel_flat(grid: HKLGrid, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat voxel index (N,) int64 of each hkl (rounded in hkl's own dtype), and in-grid flag."""
    hkl = np.asarray(hkl)
    dt = hkl.dtype if hkl.dtype in (np.float32, np.float64) else np.float64
    ndiv = np.asarray(grid.ndiv, dtype=dt)
    u = np.rint(hkl.astype(dt, copy=False) * ndiv).astype(np.int64)
    u += np.asarray(grid.hkl_max, dtype=np.int64) * np.asarray(grid.ndiv)
    shape = np.asarray(grid.shape)
    inside = np.all((u >= 0) & (u < shape), axis=-1)
    flat = (u[:, 0] * shape[1] + u[:, 1]) * shape[2] + u[:, 2]
    flat[~inside] = -1
    return flat, inside


def _kernel_numpy(grid, hkl, I, sig, factor, weight, acc):
    """numpy fallback of :func:`_kernel_py`: compress the chunk's voxels with np.unique, then bincount.

    Avoids grid-sized temporaries per chunk (a bincount with minlength =
    n_voxels costs O(grid) per call).
    """
    flat, inside = voxel_flat(grid, hkl)
    f = factor if factor.shape[0] > 1 else factor[0]
    s = sig * f
    v = I * f
    ok = inside & np.isfinite(v) & np.isfinite(s)
    if weight.shape[0] > 0:
        w = weight.astype(np.float64)
        ok &= (w > 0) & np.isfinite(w) & (s >= 0)
    else:
        ok &= s > 0
        with np.errstate(divide="ignore"):
            w = 1.0 / (s.astype(np.float64) ** 2)
    flat = flat[ok]
    s = s[ok].astype(np.float64)
    w = w[ok]
    uniq, inv = np.unique(flat, return_inverse=True)
    acc[uniq, 0] += np.bincount(inv, w, minlength=len(uniq))
    acc[uniq, 1] += np.bincount(inv, w * v[ok].astype(np.float64), minlength=len(uniq))
    acc[uniq, 2] += np.bincount(inv, minlength=len(uniq))
    acc[uniq, 3] += np.bincount(inv, w * w * s * s, minlength=len(uniq))
    return int(ok.sum())


# ---------------------------------------------------------------- accumulator


class Accumulator:
    """Dense P1 sums over the grid for ``n_halves`` half-datasets.

    ``acc`` (n_halves, n_voxels, 4) float64 holds Σw, Σw·I, the count (exact
    in float64 up to 2⁵³) and Σw²σ² interleaved per voxel: 32 bytes ×
    n_halves per voxel. ``sw``, ``swi``, ``cnt``, ``sw2s2`` are views
    (n_halves, n_voxels). The merged value is Σw·I/Σw with σ = √(Σw²σ²)/Σw,
    which is 1/√Σw for inverse-variance weights w = 1/σ².
    """

    def __init__(self, grid: HKLGrid, n_halves: int = 2, use_numba: bool | None = None):
        self.grid = grid
        n = grid.n_voxels
        self.acc = np.zeros((n_halves, n, 4))
        self.use_numba = HAVE_NUMBA if use_numba is None else (use_numba and HAVE_NUMBA)
        self.n_added = 0
        self._ndiv = np.asarray(grid.ndiv, dtype=np.float64)
        self._offset = np.asarray(grid.hkl_max, dtype=np.int64) * np.asarray(grid.ndiv)
        self._shape = np.asarray(grid.shape, dtype=np.int64)

    @property
    def sw(self):
        return self.acc[..., 0]

    @property
    def swi(self):
        return self.acc[..., 1]

    @property
    def cnt(self):
        return self.acc[..., 2]

    @property
    def sw2s2(self):
        return self.acc[..., 3]

    def add(self, hkl, intensity, sigma, factor=1.0, half: int = 0,
            chunk: int = 4_000_000, weight=None) -> int:
        """Accumulate observations (hkl (N,3) fractional; I, σ (N,)).

        factor: scalar or (N,) multiplier applied to I and σ (1/scale).
        weight: None for inverse-variance weights 1/(σ·factor)², or (N,)
        weights of the scaled observations (see :func:`model_variance`).
        Observations off the grid, with non-finite values, or with σ ≤ 0
        (weight None) / weight ≤ 0 are skipped. Returns the number accumulated.
        """
        hkl = np.ascontiguousarray(hkl)
        if hkl.dtype not in (np.float32, np.float64):
            hkl = hkl.astype(np.float64)
        I = np.ascontiguousarray(intensity)
        s = np.ascontiguousarray(sigma)
        if I.dtype not in (np.float32, np.float64):
            I = I.astype(np.float64)
        if s.dtype != I.dtype:
            s = s.astype(I.dtype)
        f = np.ascontiguousarray(np.atleast_1d(np.asarray(factor, dtype=np.float64)))
        wt = (np.empty(0) if weight is None
              else np.ascontiguousarray(np.asarray(weight, dtype=np.float64)))
        n = len(I)
        total = 0
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            fc = f if f.shape[0] == 1 else f[a:b]
            wc = wt if wt.shape[0] == 0 else wt[a:b]
            if self.use_numba:
                nd = self._ndiv.astype(hkl.dtype)
                total += _kernel_nb(hkl[a:b], I[a:b], s[a:b], fc, wc, nd, self._offset,
                                    self._shape, self.acc[half])
            else:
                total += _kernel_numpy(self.grid, hkl[a:b], I[a:b], s[a:b], fc, wc,
                                       self.acc[half])
        self.n_added += total
        return total

    def reduce(self, comm) -> None:
        """Sum the arrays over all MPI ranks (in place)."""
        if comm is None or comm.Get_size() == 1:
            return
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, self.acc, op=MPI.SUM)
        self.n_added = comm.allreduce(self.n_added, op=MPI.SUM)

    def merge(self, lut: np.ndarray, factor: float = 1.0, hand: np.ndarray | None = None) -> "MergedMap":
        """Fold the P1 sums onto the ASU (lut from grid_asu_map) and merge.

        factor multiplies the merged I and σ (overall scale normalisation).
        hand: from ``grid_asu_map(..., return_hand=True)``; then the Friedel
        means (h's side and −h's side of each orbit, merged separately in the
        point group without inversion) are kept for statistics too.
        """
        n = self.grid.n_voxels
        # only voxels that received observations contribute
        total_cnt = self.cnt.sum(axis=0)
        touched = np.flatnonzero((total_cnt > 0) & (lut >= 0))
        dest = lut[touched]
        cnt = np.rint(np.bincount(dest, total_cnt[touched], minlength=n)).astype(np.int64)
        del total_cnt
        sw = np.zeros(n)
        swi = np.zeros(n)
        sw2s2 = np.zeros(n)
        half_I = []
        for h in range(self.sw.shape[0]):
            a = np.bincount(dest, self.sw[h][touched], minlength=n)
            b = np.bincount(dest, self.swi[h][touched], minlength=n)
            half_I.append(_mean(a, b, None, factor)[0].astype(np.float32))  # statistics only
            sw += a
            swi += b
            sw2s2 += np.bincount(dest, self.sw2s2[h][touched], minlength=n)
            del a, b
        friedel_I = []
        if hand is not None:
            hand_t = hand[touched]
            sw_t = self.sw.sum(axis=0)[touched]
            swi_t = self.swi.sum(axis=0)[touched]
            for side in (1, -1):
                sel = hand_t == side
                a = np.bincount(dest[sel], sw_t[sel], minlength=n)
                b = np.bincount(dest[sel], swi_t[sel], minlength=n)
                friedel_I.append(_mean(a, b, None, factor)[0].astype(np.float32))
            del hand_t, sw_t, swi_t
        del dest, touched
        I, sig = _mean(sw, swi, sw2s2, factor)
        return MergedMap(self.grid, lut, I, sig, cnt, half_I, friedel_I)


def _mean(sw, swi, sw2s2, factor):
    """Weighted mean Σw·I/Σw and its σ = √(Σw²σ²)/Σw (σ NaN when sw2s2 is None)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        I = np.where(sw > 0, swi / sw, np.nan) * factor
        if sw2s2 is None:
            return I, None
        sig = np.where(sw > 0, np.sqrt(sw2s2) / sw, np.nan) * factor
    return I, sig


@dataclass
class MergedMap:
    """Merged values on ASU voxels (arrays over the flat grid; NaN elsewhere).

    ``I``, ``sigma``, ``counts`` are defined at ASU-representative voxels;
    :meth:`expand` fills every grid voxel from its representative.
    ``half_I``: list of the half-dataset means (same layout as ``I``, float32).
    ``friedel_I``: [h's side, −h's side] means, or [] (see Accumulator.merge).
    """

    grid: HKLGrid
    lut: np.ndarray
    I: np.ndarray
    sigma: np.ndarray
    counts: np.ndarray
    half_I: list = field(default_factory=list)
    friedel_I: list = field(default_factory=list)

    def asu_voxels(self) -> np.ndarray:
        """Flat indices of ASU-representative voxels inside the resolution range."""
        return np.flatnonzero(self.lut == np.arange(self.lut.size))

    def expand(self, values: np.ndarray | None = None, fill=np.nan) -> np.ndarray:
        """Values at representatives copied to every grid voxel, shape grid.shape."""
        values = self.I if values is None else values
        out = np.full(self.lut.size, fill, dtype=np.result_type(values, type(fill)))
        ok = self.lut >= 0
        out[ok] = values[self.lut[ok]]
        return out.reshape(self.grid.shape)

    def gather(self, flat: np.ndarray) -> np.ndarray:
        """Merged I at the ASU representative of each flat grid index (NaN if none)."""
        rep = self.lut[flat]
        out = np.full(len(flat), np.nan)
        ok = rep >= 0
        out[ok] = self.I[rep[ok]]
        return out


# ---------------------------------------------------------------- statistics


def voxel_hkl(grid: HKLGrid, flat: np.ndarray) -> np.ndarray:
    """Fractional hkl (N, 3) of voxel centres given by flat indices."""
    u = np.stack(np.unravel_index(flat, grid.shape), axis=-1)
    off = np.asarray(grid.hkl_max) * np.asarray(grid.ndiv)
    return (u - off) / np.asarray(grid.ndiv, dtype=np.float64)


def voxel_d_star(grid: HKLGrid, flat: np.ndarray, unit_cell) -> np.ndarray:
    """d* (Å⁻¹) of voxel centres for the reference cell."""
    h = voxel_hkl(grid, flat)
    g = reciprocal_metric(unit_cell)
    return np.sqrt(np.einsum("ni,ij,nj->n", h, g, h))


def shell_edges(d_star_min: float, d_star_max: float, n_shells: int) -> np.ndarray:
    """Edges in d* (Å⁻¹) of shells of equal reciprocal-space volume."""
    v = np.linspace(d_star_min**3, d_star_max**3, n_shells + 1)
    return np.cbrt(v)


def _cc(x, y):
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return np.nan
    return float(np.corrcoef(x, y)[0, 1])


def anisotropic_part(values: np.ndarray, d_star_bin: np.ndarray, n_bins: int,
                     select: np.ndarray | None = None) -> np.ndarray:
    """values minus the mean of ``values[select]`` in their narrow d* bin."""
    sel = np.isfinite(values) if select is None else select
    b = d_star_bin[sel]
    n = np.maximum(np.bincount(b, None, n_bins), 1)
    iso = np.bincount(b, values[sel], n_bins) / n
    return values - iso[d_star_bin]


def map_agreement(reference: np.ndarray, I: np.ndarray, counts: np.ndarray,
                  d_star: np.ndarray, min_counts: int = 3, n_iso_bins: int = 100) -> dict:
    """Agreement of a merged map with a reference map on the same grid.

    Uses voxels with ``counts >= min_counts`` where both are finite. Returns
    the Pearson correlation of the total signal, of the anisotropic signal
    (each map minus its own isotropic mean in ``n_iso_bins`` d* bins), the
    least-squares scale ``I ≈ scale · reference`` and the number of voxels.
    """
    use = (counts >= min_counts) & np.isfinite(reference) & np.isfinite(I)
    ref, val, ds = reference[use], I[use], d_star[use]
    span = ds.max() - ds.min() if ds.size else 1.0
    fine = np.clip(((ds - ds.min()) / (span or 1.0) * n_iso_bins).astype(np.int64), 0, n_iso_bins - 1)
    return {
        "n_voxels": int(use.sum()),
        "cc_total": _cc(ref, val),
        "cc_anisotropic": _cc(anisotropic_part(ref, fine, n_iso_bins),
                              anisotropic_part(val, fine, n_iso_bins)),
        "scale": float(np.dot(ref, val) / np.dot(ref, ref)) if use.any() else float("nan"),
    }


def shell_statistics(merged: MergedMap, unit_cell, n_shells: int = 10,
                     d_min: float | None = None, d_max: float | None = None,
                     n_iso_bins: int = 100) -> dict:
    """Per-shell table: completeness, multiplicity, ⟨I⟩, ⟨I/σ⟩, CC½ (total, anisotropic), Friedel CC.

    Shells are equal-volume in d*; the voxel population is the ASU voxels
    inside the resolution range. CC½ uses voxels measured in both halves.
    The Friedel CC correlates, over acentric voxels measured on both sides,
    I merged from h's side of each orbit with I from −h's side (present
    when the map was merged with ``hand``).
    The anisotropic CC½ first subtracts from each half its isotropic mean,
    taken in ``n_iso_bins`` narrow d* bins (much finer than the shells, so
    the radial fall-off inside a shell is removed too), then correlates.
    """
    vox = merged.asu_voxels()
    ds = voxel_d_star(merged.grid, vox, unit_cell)
    lo = 1.0 / d_max if d_max else 0.0
    hi = 1.0 / d_min if d_min else float(ds.max()) * (1 + 1e-9)
    edges = shell_edges(lo, hi, n_shells)
    shell = np.clip(np.searchsorted(edges, ds, side="right") - 1, 0, n_shells - 1)
    fine = np.clip(((ds - lo) / (hi - lo) * n_iso_bins).astype(np.int64), 0, n_iso_bins - 1)
    I = merged.I[vox]
    sig = merged.sigma[vox]
    cnt = merged.counts[vox]
    measured = cnt > 0
    have_halves = len(merged.half_I) >= 2
    if have_halves:
        h1 = merged.half_I[0][vox]
        h2 = merged.half_I[1][vox]
        both = np.isfinite(h1) & np.isfinite(h2)
        a1 = anisotropic_part(h1, fine, n_iso_bins, both)
        a2 = anisotropic_part(h2, fine, n_iso_bins, both)
    have_friedel = len(merged.friedel_I) == 2
    if have_friedel:
        fp = merged.friedel_I[0][vox]
        fm = merged.friedel_I[1][vox]
        pair = np.isfinite(fp) & np.isfinite(fm)

    def row(sel, d_lo, d_hi):
        m = sel & measured
        r = {
            "d_max": float(1 / d_lo) if d_lo > 0 else float("inf"),
            "d_min": float(1 / d_hi),
            "n_voxels": int(sel.sum()),
            "n_measured": int(m.sum()),
            "completeness": float(m.sum() / max(sel.sum(), 1)),
            "multiplicity": float(cnt[m].mean()) if m.any() else 0.0,
            "mean_I": float(np.mean(I[m])) if m.any() else np.nan,
            "mean_I_over_sigma": float(np.mean(I[m] / sig[m])) if m.any() else np.nan,
        }
        if have_halves:
            sb = sel & both
            r["n_cc"] = int(sb.sum())
            r["cc_half"] = _cc(h1[sb], h2[sb])
            r["cc_half_aniso"] = _cc(a1[sb], a2[sb])
        if have_friedel:
            sp = sel & pair
            r["n_friedel"] = int(sp.sum())
            r["cc_friedel"] = _cc(fp[sp], fm[sp])
        return r

    rows = [row(shell == s, edges[s], edges[s + 1]) for s in range(n_shells)]
    overall = row(np.ones(len(vox), dtype=bool), edges[0], edges[-1])
    return {"shells": rows, "overall": overall, "edges_d_star": edges.tolist()}


def format_statistics(stats: dict) -> str:
    head = (f"{'d_max':>7} {'d_min':>6} {'voxels':>9} {'compl':>6} {'mult':>6} "
            f"{'<I>':>10} {'<I/sig>':>8} {'CC1/2':>6} {'CC1/2an':>7} {'CCfried':>7}")
    lines = [head]

    def fmt(r, label=None):
        dmax = "inf" if not np.isfinite(r["d_max"]) else f"{r['d_max']:.2f}"
        return (f"{dmax:>7} {r['d_min']:>6.2f} {r['n_voxels']:>9d} {r['completeness']:>6.3f} "
                f"{r['multiplicity']:>6.1f} {r['mean_I']:>10.4g} {r['mean_I_over_sigma']:>8.2f} "
                f"{r.get('cc_half', np.nan):>6.3f} {r.get('cc_half_aniso', np.nan):>7.3f} "
                f"{r.get('cc_friedel', np.nan):>7.3f}")

    for r in stats["shells"]:
        lines.append(fmt(r))
    lines.append("overall:")
    lines.append(fmt(stats["overall"]))
    return "\n".join(lines)


# ---------------------------------------------------------------- scale and merge


class StillSource(Protocol):
    """What the merger needs from the data: a number of stills and a loader."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> dict:  # keys hkl (N,3), I (N,), sigma (N,)
        ...


@dataclass
class ListSource:
    """In-memory stills (tests, small data): list of dicts with hkl, I, sigma."""

    stills: Sequence[dict]

    def __len__(self):
        return len(self.stills)

    def load(self, i):
        return self.stills[i]


class ArraySource:
    """Observations of many stills in flat arrays, with a still index per observation.

    hkl (N, 3), I (N,), sigma (N,), still (N,) int. Stills are numbered by
    their order of first appearance in ``np.unique(still)``.
    """

    def __init__(self, hkl, I, sigma, still):
        still = np.asarray(still)
        self.ids, inverse = np.unique(still, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(self.ids) + 1))
        self._slices = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.hkl, self.I, self.sigma = np.asarray(hkl), np.asarray(I), np.asarray(sigma)

    def __len__(self):
        return len(self.ids)

    def load(self, i):
        sel = self._slices[i]
        return {"hkl": self.hkl[sel], "I": self.I[sel], "sigma": self.sigma[sel]}


@dataclass
class MergeResult:
    merged: MergedMap
    params: np.ndarray  # (n_stills, n_control_points) scale g per still (normalised)
    fits: list  # FitResult per still (last iteration), None if not fitted
    half: np.ndarray  # (n_stills,) half-dataset of each still
    iterations: int
    converged: bool
    history: list  # max relative scale change per iteration
    n_observations: int
    terms: ScalingTerms | None = None  # the richer model's refined terms (scaling.model=full)


def _asu_maps(grid, laue, unit_cell, d_min, d_max, lut=None, friedel: bool = True):
    """(lut, hand): the ASU map of the grid (the caller's ``lut`` when given) and,
    with ``friedel``, each voxel's Bijvoet side (``grid_asu_map(return_hand=True)``)."""
    if not friedel:
        return (grid_asu_map(grid, laue, unit_cell, d_min=d_min, d_max=d_max) if lut is None else lut), None
    computed, hand = grid_asu_map(grid, laue, unit_cell, d_min=d_min, d_max=d_max, return_hand=True)
    return (computed if lut is None else lut), hand


def half_assignment(n_stills: int, seed: int = 0, blocks=None) -> np.ndarray:
    """Random halves (0/1) by still, reproducible from the seed.

    blocks: optional (n_stills,) block label per still; whole blocks are
    assigned to a half (equal numbers of blocks), so that neighbouring frames
    of a sweep, which share pixels and systematic errors, never end up in
    different halves. None: every still is its own block.
    """
    rng = np.random.default_rng(seed)
    if blocks is None:
        half = np.zeros(n_stills, dtype=np.int64)
        half[rng.permutation(n_stills)[: n_stills // 2]] = 1
        return half
    labels, block_of = np.unique(np.asarray(blocks), return_inverse=True)
    block_half = np.zeros(len(labels), dtype=np.int64)
    block_half[rng.permutation(len(labels))[: len(labels) // 2]] = 1
    return block_half[block_of]


def _valid_obs(hkl, I, sig, variance_per_intensity=None):
    """Usable observations: σ > 0, or σ >= 0 with a variance model (zero counts count)."""
    ok = np.isfinite(I) & np.isfinite(sig) & np.all(np.isfinite(hkl), axis=1)
    if variance_per_intensity is None:
        return ok & (sig > 0)
    return ok & (sig >= 0) & (variance_per_intensity > 0)


def _expected_intensity(grid, reference, hkl, I, scale_g):
    """g·I_ref at each observation's voxel; the still's median positive I where no reference."""
    typical = np.median(I[I > 0]) if np.any(I > 0) else 1.0
    expected = np.full(len(I), typical, dtype=np.float64)
    if reference is not None:
        flat, inside = voxel_flat(grid, hkl)
        ref = np.full(len(flat), np.nan)
        ref[inside] = reference.gather(flat[inside])
        have = np.isfinite(ref)
        g = np.broadcast_to(np.asarray(scale_g, dtype=np.float64), expected.shape)
        expected[have] = g[have] * ref[have]
    return expected


def scale_and_merge(
    source: StillSource,
    grid: HKLGrid,
    laue: LaueSymmetry,
    unit_cell,
    d_min: float | None = None,
    d_max: float | None = None,
    scale: bool = True,
    model: ScaleModel | None = None,
    max_iterations: int = 10,
    tolerance: float = 1e-3,
    reindex: Sequence | None = None,
    half_seed: int = 0,
    half_blocks=None,
    friedel: bool = True,
    fit_max_obs: int = 200_000,
    min_reference_counts: int = 2,
    comm=None,
    lut: np.ndarray | None = None,
    reject_sigma: float | None = 6.0,
    chunk: int = 4_000_000,
    use_numba: bool | None = None,
    progress: Callable | None = None,
    neighbours=None,
) -> MergeResult:
    """Merge stills (optionally with per-still scales refined to convergence).

    Pass 0 merges unscaled data; each further pass fits every still's scale
    against the previous pass's merged map (reference) and accumulates the
    still with its new scale. Iterates until the largest relative change of
    any still's scale is below ``tolerance`` or ``max_iterations`` passes.
    Scales are normalised to a geometric mean of 1 after each pass.

    half_blocks: block label per still for the CC½ halves (see
    :func:`half_assignment`). friedel: also merge h's and −h's sides apart
    for the Friedel CC (MergedMap.friedel_I).

    reindex: per still, None or an integer (3,3) operator applied as hkl @ M
    (indexing-ambiguity resolution). reject_sigma: in scaling passes, an
    observation whose residual (I/g − I_ref)/(σ/g) exceeds this many robust
    standard deviations of its still's residuals is left out of the merge
    (None: keep everything). Under MPI (``comm``), rank r handles
    stills r, r+size, ...; sums and scales are reduced across ranks.

    model: a :class:`ScaleModel` (g only), or :class:`ScalingTerms` with
    absorption, detector and offset terms (see :func:`_scale_and_merge_terms`);
    neighbours (n_stills, 2): previous/next still of the same sweep, −1 for
    none (ScalingTerms.neighbour_prior).
    """
    if isinstance(model, ScalingTerms):
        if model.any_extra and scale:
            return _scale_and_merge_terms(
                source, grid, laue, unit_cell, model, d_min=d_min, d_max=d_max,
                max_iterations=max_iterations, tolerance=tolerance, reindex=reindex,
                half_seed=half_seed, half_blocks=half_blocks, friedel=friedel,
                fit_max_obs=fit_max_obs, min_reference_counts=min_reference_counts, comm=comm,
                lut=lut, reject_sigma=reject_sigma, chunk=chunk, use_numba=use_numba,
                progress=progress, neighbours=neighbours)
        model = model.base
    n_stills = len(source)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    mine = list(range(rank, n_stills, size))
    lut, hand = _asu_maps(grid, laue, unit_cell, d_min, d_max, lut, friedel)
    if model is None:
        model = ScaleModel(1, d_star_sq_max=(1.0 / d_min**2) if d_min else 1.0)
    gstar = reciprocal_metric(unit_cell)
    half = half_assignment(n_stills, half_seed, half_blocks)
    params = np.ones((n_stills, model.n_control_points))
    fits: list = [None] * n_stills
    reference = None
    history = []
    converged = not scale
    iterations = 0
    n_passes = (max_iterations + 1) if scale else 1
    merged = None
    n_obs = 0
    for it in range(n_passes):
        acc = Accumulator(grid, 2, use_numba=use_numba)
        new = np.zeros_like(params)
        ok = np.zeros(n_stills)
        iterator = progress(mine, desc=f"pass {it}") if progress else mine
        for i in iterator:
            obs = source.load(i)
            hkl, I, sig = obs["hkl"], obs["I"], obs["sigma"]
            v1 = obs.get("variance_per_intensity")
            if reindex is not None and reindex[i] is not None:
                hkl = np.asarray(hkl) @ np.asarray(reindex[i]).astype(np.asarray(hkl).dtype)
            if reference is not None:
                fits[i] = _fit_still(model, grid, gstar, reference, hkl, I, sig, fit_max_obs,
                                     min_reference_counts, seed=i, variance_per_intensity=v1)
                if fits[i].ok:
                    new[i] = fits[i].params
                    ok[i] = 1
                else:
                    new[i] = params[i]
            else:
                new[i] = params[i]
                ok[i] = 1
            if model.n_control_points == 1:
                factor = 1.0 / new[i, 0]
            else:
                h = np.asarray(hkl, dtype=np.float64)
                dss = np.einsum("ni,ij,nj->n", h, gstar, h)
                factor = 1.0 / model.evaluate(new[i], dss)
            weight = None
            model_sigma = sig
            if v1 is not None:
                I_f = np.asarray(I, dtype=np.float64)
                var = model_variance(I_f, sig, v1, _expected_intensity(grid, reference, hkl, I_f, 1.0 / factor))
                weight = 1.0 / (np.asarray(factor) ** 2 * var)
                model_sigma = np.sqrt(var)
            if reference is not None and reject_sigma and fits[i] is not None and fits[i].ok:
                bad = _outliers(grid, reference, hkl, I, model_sigma, factor,
                                reject_sigma * fits[i].residual_scale)
                if weight is None:
                    sig = np.where(bad, 0.0, sig)  # the accumulator skips σ ≤ 0
                else:
                    weight = np.where(bad, 0.0, weight)
            # with a variance model, the merged σ uses the model σ too: a voxel
            # whose observations all have zero counts still gets σ > 0
            acc.add(hkl, I, sig if weight is None else model_sigma, factor,
                    half=int(half[i]), chunk=chunk, weight=weight)
        acc.reduce(comm)
        if comm is not None and size > 1:
            from mpi4py import MPI

            comm.Allreduce(MPI.IN_PLACE, new, op=MPI.SUM)
            comm.Allreduce(MPI.IN_PLACE, ok, op=MPI.SUM)
            fits = _gather_fits(comm, fits, mine, n_stills)
        c = normalisation(new, ok > 0) if reference is not None else 1.0
        new = new / c
        change = float(np.max(np.abs(new / params - 1.0))) if reference is not None else np.inf
        params = new
        merged = acc.merge(lut, factor=c, hand=hand)
        n_obs = acc.n_added
        iterations = it
        del acc
        if reference is not None:
            history.append(change)
            logger.info("scaling pass %d: max relative scale change %.2e", it, change)
            if change < tolerance:
                converged = True
                break
        reference = merged
    return MergeResult(merged, params, fits, half, iterations, converged, history, n_obs)


def _scale_and_merge_terms(source, grid, laue, unit_cell, terms: ScalingTerms, d_min=None, d_max=None,
                           max_iterations=10, tolerance=1e-3, reindex=None, half_seed=0,
                           half_blocks=None, friedel=True, fit_max_obs=200_000,
                           min_reference_counts=2, comm=None, lut=None, reject_sigma=6.0,
                           chunk=4_000_000, use_numba=None, progress=None,
                           neighbours=None) -> MergeResult:
    """scale_and_merge with the richer model a·d·g·(I_ref + c) (:class:`ScalingTerms`).

    Pass 0 merges unscaled and records the range of ŝ1 and the panels. Each
    further pass, per still: fit (g, a, c) against the previous map with the
    current d, add its detector normal equations, accumulate the still
    scaled, I → I/(a·d·g) − c, σ → σ/(a·d·g). After the pass: solve d,
    impose the constraints (ScalingTerms.end_pass) and correct the map for
    the overall factor and the mean offset. Stops when no term changes by
    more than ``tolerance`` (relative; c relative to the median merged I).
    """
    n_stills = len(source)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    mine = list(range(rank, n_stills, size))
    lut, hand = _asu_maps(grid, laue, unit_cell, d_min, d_max, lut, friedel)
    gstar = reciprocal_metric(unit_cell)
    half = half_assignment(n_stills, half_seed, half_blocks)
    terms.start(n_stills, neighbours)
    fits: list = [None] * n_stills
    reference = None
    history = []
    converged = False
    merged = None
    n_obs = 0
    iterations = 0
    for it in range(max_iterations + 1):
        acc = Accumulator(grid, 2, use_numba=use_numba)
        new_g = np.zeros_like(terms.g)
        new_a = np.zeros_like(terms.alpha)
        new_c = np.zeros_like(terms.kappa)
        ok = np.zeros(n_stills)
        iterator = progress(mine, desc=f"pass {it}") if progress else mine
        for i in iterator:
            obs = source.load(i)
            hkl, I, sig = obs["hkl"], np.asarray(obs["I"]), np.asarray(obs["sigma"])
            v1 = obs.get("variance_per_intensity")
            if reindex is not None and reindex[i] is not None:
                hkl = np.asarray(hkl) @ np.asarray(reindex[i]).astype(np.asarray(hkl).dtype)
            if reference is None:
                terms.observe(obs)
                factor, offset = 1.0, 0.0
                ok[i] = 1
            else:
                h = np.asarray(hkl, dtype=np.float64)
                dss = np.einsum("ni,ij,nj->n", h, gstar, h)
                co = terms.coordinates(obs, dss)
                fits[i] = _fit_still_terms(terms, i, grid, reference, hkl, I, sig, co, fit_max_obs,
                                           min_reference_counts, seed=i, variance_per_intensity=v1)
                if fits[i].ok:
                    new_g[i], new_a[i], new_c[i] = fits[i].params, fits[i].absorption, fits[i].offset
                    ok[i] = 1
                    m, offset = terms.evaluate(i, co, new_g[i], new_a[i], new_c[i])
                else:
                    m, offset = terms.evaluate(i, co)
                factor = 1.0 / m
            if reference is None:
                new_g[i], new_a[i], new_c[i] = terms.g[i], terms.alpha[i], terms.kappa[i]
            # the offset is in merged units: (I − c·m)/m = I/m − c
            I_adj = np.asarray(I, dtype=np.float64) - np.asarray(offset) / np.asarray(factor)
            weight = None
            model_sigma = sig
            if v1 is not None:
                I_f = np.asarray(I, dtype=np.float64)
                expected = _expected_intensity(grid, reference, hkl, I_f, 1.0 / np.asarray(factor))
                if reference is not None:
                    expected = expected + np.asarray(offset) / np.asarray(factor)
                var = model_variance(I_f, sig, v1, expected)
                weight = 1.0 / (np.asarray(factor) ** 2 * var)
                model_sigma = np.sqrt(var)
            if reference is not None and reject_sigma and fits[i] is not None and fits[i].ok:
                bad = _outliers(grid, reference, hkl, I_adj, model_sigma, factor,
                                reject_sigma * fits[i].residual_scale)
                if weight is None:
                    sig = np.where(bad, 0.0, sig)
                else:
                    weight = np.where(bad, 0.0, weight)
            acc.add(hkl, I_adj, sig if weight is None else model_sigma, factor,
                    half=int(half[i]), chunk=chunk, weight=weight)
        acc.reduce(comm)
        if comm is not None and size > 1:
            from mpi4py import MPI

            for arr in (new_g, new_a, new_c, ok):
                comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
            fits = _gather_fits(comm, fits, mine, n_stills)
        n_obs = acc.n_added
        iterations = it
        if reference is None:
            terms.finish_setup(comm)
            merged = acc.merge(lut, factor=1.0, hand=hand)
            reference = merged
            del acc
            continue
        typical = float(np.nanmedian(np.abs(reference.I[reference.counts > 0]))) if np.any(reference.counts > 0) else 0.0
        step = terms.end_pass(new_g, new_a, new_c, ok > 0, comm=comm, typical=typical)
        merged = acc.merge(lut, factor=step["factor"], hand=hand)
        del acc
        _adjust_map(merged, unit_cell, terms, step["ring_factor"], step["offset_shift"])
        history.append(step["change"])
        logger.info("scaling pass %d: max relative change %.2e", it, step["change"])
        if step["change"] < tolerance:
            converged = True
            break
        reference = merged
    return MergeResult(merged, terms.g.copy(), fits, half, iterations, converged, history, n_obs, terms)


def _adjust_map(merged: MergedMap, unit_cell, terms: ScalingTerms, ring_factor, offset_nodes) -> None:
    """The map's share of the gauge moves (in place): I → ρ(d*)·I + c̄(d*).

    ρ: the radial static absorption at the ring centres (None: 1), c̄: the
    mean offset, node values ``offset_nodes`` (see ScalingTerms.end_pass).
    """
    has_ring = ring_factor is not None and np.any(np.isfinite(ring_factor))
    has_shift = terms.n_c > 0 and np.any(offset_nodes)
    if not (has_ring or has_shift):
        return
    vox = np.flatnonzero(np.isfinite(merged.I))
    ds = voxel_d_star(merged.grid, vox, unit_cell)
    mul = np.ones(len(vox))
    if has_ring:
        have = np.isfinite(ring_factor)
        mul = np.exp(np.interp(ds, terms.ring_centres()[have], np.log(ring_factor[have])))
    add = terms.offset_at(offset_nodes, ds) if has_shift else np.zeros(len(vox))
    merged.I[vox] = merged.I[vox] * mul + add
    merged.sigma[vox] = merged.sigma[vox] * mul
    for arr in list(merged.half_I) + list(merged.friedel_I):
        fin = np.isfinite(arr[vox])
        arr[vox[fin]] = (arr[vox[fin]] * mul[fin] + add[fin]).astype(arr.dtype)


def _reference_subset(grid, reference: MergedMap, hkl, I, sig, v1, fit_max_obs, min_counts, seed):
    """Indices of a still's usable observations (at most ``fit_max_obs``, random, fixed by
    ``seed``) whose reference voxel has ≥ ``min_counts`` counts and a finite I, and that I."""
    sel = np.flatnonzero(_valid_obs(hkl, I, sig, v1))
    if len(sel) > fit_max_obs:
        sel = np.sort(np.random.default_rng(seed).choice(sel, fit_max_obs, replace=False))
    flat, inside = voxel_flat(grid, hkl[sel])
    sel, flat = sel[inside], flat[inside]
    rep = reference.lut[flat]
    good = rep >= 0
    rep = np.where(good, rep, 0)
    good &= reference.counts[rep] >= min_counts
    sel, rep = sel[good], rep[good]
    ref = reference.I[rep]
    good = np.isfinite(ref)
    return sel[good], ref[good]


def _fit_still_terms(terms, i, grid, reference: MergedMap, hkl, I, sig, co, fit_max_obs, min_counts,
                     seed, variance_per_intensity=None) -> FitResult:
    """Subset of still i's observations with a reference value, then ScalingTerms.fit_still."""
    hkl = np.asarray(hkl)
    I = np.asarray(I, dtype=np.float64)
    sig = np.asarray(sig, dtype=np.float64)
    v1 = variance_per_intensity
    sel, ref = _reference_subset(grid, reference, hkl, I, sig, v1, fit_max_obs, min_counts, seed)
    sub = {k: v[sel] for k, v in co.items()}
    return terms.fit_still(i, I[sel], sig[sel], ref, sub,
                           variance_per_intensity=None if v1 is None else np.asarray(v1)[sel])


def _outliers(grid, reference, hkl, I, sig, factor, limit) -> np.ndarray:
    """Observations whose residual (I·f − I_ref)/(σ·f) exceeds ``limit`` (no reference: kept)."""
    flat, inside = voxel_flat(grid, hkl)
    ref = np.full(len(flat), np.nan)
    ref[inside] = reference.gather(flat[inside])
    f = np.asarray(factor, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (np.asarray(I) * f - ref) / (np.asarray(sig) * f)
    return np.abs(z) > limit  # NaN (no reference) compares False: kept


def _fit_still(model, grid, gstar, reference: MergedMap, hkl, I, sig, fit_max_obs,
               min_counts, seed, variance_per_intensity=None) -> FitResult:
    hkl = np.asarray(hkl)
    I = np.asarray(I, dtype=np.float64)
    sig = np.asarray(sig, dtype=np.float64)
    v1 = variance_per_intensity
    sel, ref = _reference_subset(grid, reference, hkl, I, sig, v1, fit_max_obs, min_counts, seed)
    h = hkl[sel].astype(np.float64)
    dss = np.einsum("ni,ij,nj->n", h, gstar, h)
    return fit_scale(model, I[sel], sig[sel], ref, dss,
                     variance_per_intensity=None if v1 is None else np.asarray(v1)[sel])


def _gather_fits(comm, fits, mine, n_stills):
    """Every rank gets every still's fit (each rank sends only its own stills)."""
    parts = comm.allgather([(i, fits[i]) for i in mine])
    out = [None] * n_stills
    for part in parts:
        for i, f in part:
            out[i] = f
    return out


# ---------------------------------------------------------------- input consistency
#
# diffuse.merge accepts a corrected still only if it belongs to the experiment
# list: matched by experiment identifier and image (path, index in the file),
# never by list position, with the setting matrix the still was extracted with
# equal to the experiment's, and a cell compatible with the reference crystal's.


@dataclass
class StillIdentity:
    """Where a corrected still comes from (read from its file and the extract it refers to)."""

    path: str
    identifier: str  # "" for files written before identifiers were recorded
    image_path: str
    image_index: int
    frame: int  # -1 for stills
    A: np.ndarray | None  # (3, 3) setting matrix it was extracted with; None if unknown
    experiment_index: int = -1  # used only for experiment lists without identifiers and images


def still_identity(path: str) -> StillIdentity | None:
    """Identity of a ``diffuse.correct/*`` still; None for files without provenance
    (``diffuse.observations/1``, which carry hkl directly)."""
    from diffuse_cli.formats import corrected, extract

    if corrected.schema_of(path) != corrected.CORRECT_SCHEMA:
        return None
    z = corrected.read_corrected(path, fields=("image_path", "image_index", "frame", "experiment_index",
                                               "extract_file", "extract_file_absolute", "extract_fingerprint"))
    image_path = str(z["image_path"]) if "image_path" in z else ""
    image_index = int(z["image_index"]) if "image_index" in z else -1
    frame = int(z["frame"]) if "frame" in z else -1
    experiment_index = int(z["experiment_index"]) if "experiment_index" in z else -1
    ex = extract.read_extract_arrays(corrected.extract_path(path, z, check=False),
                                     fields=("experiment_identifier", "A"))
    identifier = str(ex["experiment_identifier"]) if "experiment_identifier" in ex else ""
    A = np.asarray(ex["A"], dtype=np.float64).reshape(3, 3)
    return StillIdentity(path, identifier, image_path, image_index, frame, A, experiment_index)


def cell_of(A: np.ndarray) -> np.ndarray:
    """Unit cell (a, b, c in Å; α, β, γ in degrees) of setting matrices A ((3, 3) or (n, 3, 3)), q = A·hkl."""
    A = np.asarray(A, dtype=np.float64)
    G = np.linalg.inv(np.swapaxes(A, -1, -2) @ A)  # direct metric from the reciprocal one
    abc = np.sqrt(np.stack([G[..., 0, 0], G[..., 1, 1], G[..., 2, 2]], axis=-1))
    cos = np.stack([G[..., 1, 2] / (abc[..., 1] * abc[..., 2]),
                    G[..., 0, 2] / (abc[..., 0] * abc[..., 2]),
                    G[..., 0, 1] / (abc[..., 0] * abc[..., 1])], axis=-1)
    return np.concatenate([abc, np.degrees(np.arccos(np.clip(cos, -1, 1)))], axis=-1)


def cell_deviation(cell, reference) -> tuple[np.ndarray, np.ndarray]:
    """Largest relative length difference and largest angle difference (degrees)."""
    cell = np.asarray(cell, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    rel = np.max(np.abs(cell[..., :3] / reference[:3] - 1.0), axis=-1)
    ang = np.max(np.abs(cell[..., 3:] - reference[3:]), axis=-1)
    return rel, ang


def _unimodular_candidates() -> np.ndarray:
    """Integer matrices with entries in {-1, 0, 1} and determinant ±1, identity first."""
    import itertools

    m = np.array(list(itertools.product((-1, 0, 1), repeat=9)), dtype=np.int64).reshape(-1, 3, 3)
    m = m[np.abs(np.rint(np.linalg.det(m))) == 1]
    order = np.argsort(np.abs(m - np.eye(3, dtype=np.int64)).sum(axis=(1, 2)), kind="stable")
    return m[order]


def change_of_basis_onto(A: np.ndarray, reference_cell, length_tolerance: float,
                         angle_tolerance: float) -> np.ndarray | None:
    """Integer M (h' = h @ M) that puts A's lattice onto the reference cell, or None.

    The reindexed setting matrix is A' = A·(M⁻¹)ᵀ; M is the simplest (closest
    to the identity, proper rotations first) whose cell(A') is within
    ``length_tolerance`` (relative) and ``angle_tolerance`` (degrees) of
    ``reference_cell``. The identity comes first, so a cell that matches as
    it is keeps its indexing.
    """
    M = _unimodular_candidates()
    A_new = np.asarray(A, dtype=np.float64) @ np.swapaxes(np.linalg.inv(M), -1, -2)
    rel, ang = cell_deviation(cell_of(A_new), reference_cell)
    ok = (rel <= length_tolerance) & (ang <= angle_tolerance)
    if not ok.any():
        return None
    proper = np.rint(np.linalg.det(M)) > 0
    pick = np.flatnonzero(ok & proper)
    return M[(pick if pick.size else np.flatnonzero(ok))[0]]


def _fmt_cell(cell) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in cell) + ")"


def check_stills(experiments, files, groups=None, expt_files=None, length_tolerance: float = 0.02,
                 angle_tolerance: float = 2.0, allow_multiple_crystals: bool = False) -> dict:
    """Match corrected stills to experiments and check their cells; Sorry on any mismatch.

    experiments: the ExperimentList; groups: per experiment, the index of
    the experiment-list file (crystal) it came from (default: one crystal);
    expt_files: those files' names (for messages). Per still:

    * it must be in the experiment list: same experiment identifier and same
      image (real path and index in the file), or the same image when the
      still carries no identifier. Never matched by list position;
    * (stills) the setting matrix it was extracted with must equal the
      experiment's (relative difference ≤ 1e-6): otherwise it was extracted
      with other models and is stale;
    * its cell (from A) must be within ``length_tolerance`` (relative) and
      ``angle_tolerance`` (degrees) of its crystal's cell, the
      parameter-wise median of that crystal's matched stills.

    Stills of a second experiment-list file are another crystal: refused
    unless ``allow_multiple_crystals``; then that crystal's cell must match the
    reference crystal's (the first file) within the same tolerance, directly
    or after an integer change of basis, and its stills are reindexed by it.

    Returns {"experiment_index": [...], "reindex": [M or None per file],
    "crystal": [...], "reference_cell": (6,)}; files without provenance
    (``diffuse.observations/1``) are passed through with experiment index None.
    """
    import os

    from libtbx.utils import Sorry

    groups = [0] * len(experiments) if groups is None else list(groups)
    expt_files = expt_files or ["the experiments"]
    by_identifier: dict = {}
    by_image: dict = {}
    for i, e in enumerate(experiments):
        if e.identifier:
            by_identifier.setdefault(e.identifier, []).append(i)
        iset = e.imageset
        if iset is None:
            continue
        for j in range(len(iset)):
            try:
                index = int(iset.indices()[j])
            except (AttributeError, IndexError):
                index = j
            by_image.setdefault((os.path.realpath(iset.get_path(j)), index), []).append(i)

    # models-only experiment lists (no identifiers, no images) leave nothing but
    # the list position; the setting-matrix check below still guards them
    models_only = not by_identifier and not by_image
    if models_only:
        logger.warning("The experiments carry neither identifiers nor images: stills matched by "
                       "experiment index, checked by their setting matrices")
    matched, identities = [], []
    for f in files:
        ident = still_identity(f)
        identities.append(ident)
        if ident is None:
            matched.append(None)
            continue
        on_image = by_image.get((os.path.realpath(ident.image_path), ident.image_index), [])
        if models_only:
            i = ident.experiment_index
            if not 0 <= i < len(experiments):
                raise Sorry(f"{f}: experiment_index {i}, but the experiments hold {len(experiments)}")
            same = [i]
        elif ident.identifier:
            same = [i for i in by_identifier.get(ident.identifier, []) if i in on_image]
            if not same:
                where = ("with that identifier, but of another image" if ident.identifier in by_identifier
                         else "with that identifier")
                raise Sorry(
                    f"{f}: still of experiment {ident.identifier!r} ({ident.image_path}) is not in the experiment "
                    f"list ({', '.join(expt_files)}: none {where}); give the .expt it was processed with"
                )
        else:
            same = on_image
            if not same:
                raise Sorry(f"{f}: its image {ident.image_path} is not in the experiment list ({', '.join(expt_files)})")
        if len(same) > 1 and ident.A is not None:
            # several lattices on one image: the one whose A it was extracted with
            same = [i for i in same if _same_A(experiments[i], ident)] or same
        i = same[0]
        if ident.frame < 0 and not _same_A(experiments[i], ident):
            raise Sorry(
                f"{f}: extracted with another crystal model than experiment {experiments[i].identifier or i} of "
                f"{expt_files[groups[i]]}; run diffuse.extract and diffuse.correct again with this .expt"
            )
        matched.append(i)

    # cells per crystal (experiment-list file)
    n_files = len(files)
    crystal = [None if m is None else groups[m] for m in matched]
    present = sorted({c for c in crystal if c is not None})
    reindex: list = [None] * n_files
    reference_cell = None
    if present:
        if len(present) > 1 and not allow_multiple_crystals:
            other = next(k for k, c in enumerate(crystal) if c is not None and c != present[0])
            raise Sorry(
                f"{files[other]}: still of another crystal ({expt_files[present[1]]}, besides "
                f"{expt_files[present[0]]}); set merging.allow_multiple_crystals=True to merge several crystals"
            )
        cells = {k: cell_of(identities[k].A) for k in range(n_files) if crystal[k] is not None}
        crystal_cell = {c: np.median([cells[k] for k in cells if crystal[k] == c], axis=0) for c in present}
        reference_cell = crystal_cell[present[0]]
        ops = {present[0]: None}
        for c in present[1:]:
            # the crystal's change of basis, found on its median cell (B has that metric)
            M = change_of_basis_onto(b_matrix(crystal_cell[c]), reference_cell, length_tolerance, angle_tolerance)
            if M is None:
                raise Sorry(
                    f"{expt_files[c]}: crystal cell {_fmt_cell(crystal_cell[c])} is incompatible with the reference "
                    f"{_fmt_cell(reference_cell)} from {expt_files[present[0]]} (tolerance "
                    f"merging.cell_tolerance: {100 * length_tolerance:g} % on lengths, {angle_tolerance:g}° on angles), "
                    "even after a change of basis"
                )
            ops[c] = None if np.array_equal(M, np.eye(3)) else M
        for k, c in enumerate(crystal):
            if c is None:
                continue
            M = ops[c]
            A_k = identities[k].A if M is None else identities[k].A @ np.linalg.inv(M).T
            rel, ang = cell_deviation(cell_of(A_k), reference_cell)
            if rel > length_tolerance or ang > angle_tolerance:
                raise Sorry(
                    f"{files[k]}: cell {_fmt_cell(cell_of(A_k))} is incompatible with the reference "
                    f"{_fmt_cell(reference_cell)} ({100 * rel:.1f} % on lengths, {ang:.1f}° on angles; tolerance "
                    f"merging.cell_tolerance: {100 * length_tolerance:g} %, {angle_tolerance:g}°)"
                )
            reindex[k] = M
    return {"experiment_index": matched, "reindex": reindex, "crystal": crystal,
            "reference_cell": reference_cell,
            "frame": [ident.frame if ident is not None else -1 for ident in identities]}


def _same_A(experiment, ident: StillIdentity) -> bool:
    if ident.A is None or experiment.crystal is None:
        return True
    if ident.frame >= 0:  # rotation frame: S R(φ) F A(φ) at its absolute array index
        from diffuse_cli.extraction import is_rotation
        from diffuse_cli.geometry import setting_matrix

        if not is_rotation(experiment):
            return False
        try:
            A = setting_matrix(experiment.crystal, experiment.goniometer, experiment.scan, ident.frame)
        except ValueError:  # frame outside the experiment's scan
            return False
    else:
        A = np.asarray(experiment.crystal.get_A(), dtype=np.float64).reshape(3, 3)
    return bool(np.linalg.norm(A - ident.A) <= 1e-6 * np.linalg.norm(A))
