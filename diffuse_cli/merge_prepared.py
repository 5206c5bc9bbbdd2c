"""Observations prepared once per still for the scaling passes of diffuse.merge.

A pass needs, per observation, only its ASU voxel (int32, compact: inside the
resolution sphere) and I, σ, v1 (float32): :func:`prepare_still` computes them once,
:class:`_PreparedStore` keeps them in memory up to ``CACHE_BYTES`` and spills
further stills to temporary ``.npy`` files (scratch, not a file format), read
back memory-mapped. The compiled kernels are in :mod:`diffuse_cli.prepared_kernels`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from diffuse_cli import merge_compact as _mc
from diffuse_cli.grid import HKLGrid
from diffuse_cli.merge_accumulator import HAVE_NUMBA, MergedMap, voxel_flat
from diffuse_cli.scaling import _SCRATCH as _FIT_SCRATCH
from diffuse_cli.scaling import FitResult, fit_scale, relax
from diffuse_cli.prepared_kernels import _loo_at

logger = logging.getLogger("diffuse.merge")

if HAVE_NUMBA:  # the compiled passes (prepared_kernels); the numpy code otherwise
    from diffuse_cli.prepared_kernels import _fit_candidates, _floor_weighted_nb, _keep, _kept_size, _median_positive


def _valid_obs(hkl, I, sig, variance_per_intensity=None):
    """Usable observations: σ > 0, or σ >= 0 with a variance model (zero counts count)."""
    ok = np.isfinite(I) & np.isfinite(sig) & np.all(np.isfinite(hkl), axis=1)
    if variance_per_intensity is None:
        return ok & (sig > 0)
    return ok & (sig >= 0) & (variance_per_intensity > 0)


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


# ---------------------------------------------------------------- cached passes
#
# The scaling passes need, per observation, only its ASU voxel and I, σ, v1:
# those are computed once per still (prepare_still) and kept, so that a pass
# is one fit on a fixed subset and one fused accumulation kernel
# (merge_compact._pass) per still.

#: bytes of prepared observations kept in memory; beyond, stills are written to
#: temporary .npy files and read back memory-mapped in every pass (≈ 17 bytes per
#: observation inside the resolution range, plus the fit subset). 1 GiB keeps a
#: merge of any number of stills under the 2 GB per worker of issue 12 (the rest of
#: its peak is the grid's sums and the libraries, ≈ 0.4 GB for the XFEL benchmark).
CACHE_BYTES = 1 << 30


@dataclass
class PreparedStill:
    """One still's observations as the scaling passes use them (computed once).

    Arrays over the observations inside the ASU range (the others are never
    merged): ``c`` int32 compact voxel (:func:`merge_compact.compact_tables`), ``side`` int8
    Bijvoet side, ``I``, ``sigma``, ``v1`` (variance per intensity, or None),
    ``dss`` (d*², only with a resolution-dependent scale) float32.
    ``n_dropped``: observations outside the range; ``typical``: the still's
    median positive I (expected intensity where there is no reference).
    ``fit``: the fit subset (at most fit_max_obs, fixed by the still's seed),
    float64: c, I, sigma, v1, dss (only with ``dss``). ``voxels``: (compact voxels the still touches, int32
    increasing; observations in each, int64), for :func:`_floor_weighted`.
    """

    c: np.ndarray
    side: np.ndarray
    I: np.ndarray
    sigma: np.ndarray
    v1: np.ndarray | None
    dss: np.ndarray | None
    n_dropped: int
    typical: float
    fit: dict
    voxels: tuple | None = None

    def arrays(self) -> dict:
        out = {k: getattr(self, k) for k in ("c", "side", "I", "sigma", "v1", "dss")}
        out.update({f"fit_{k}": v for k, v in self.fit.items()})
        if self.voxels is not None:
            out["voxels_index"], out["voxels_count"] = self.voxels
        return {k: v for k, v in out.items() if v is not None}

    @property
    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.arrays().values()))


def _hkl_of(obs, sel=None, ops=()) -> np.ndarray:
    """Fractional hkl (float64 unless given) of observations ``sel``, then h·M for M in ``ops``."""
    if "hkl" in obs:
        hkl = np.asarray(obs["hkl"])
        hkl = hkl if sel is None else hkl[sel]
    else:  # as geometry.hkl_from_q, column by column in float64
        q = obs["q_unit"][obs["pixel"] if sel is None else obs["pixel"][sel]]
        M = obs["hkl_matrix"]
        cols = [q[:, i].astype(np.float64) for i in range(3)]
        hkl = np.empty((len(q), 3))
        for j in range(3):
            hkl[:, j] = cols[0] * M[j, 0] + cols[1] * M[j, 1] + cols[2] * M[j, 2]
    for M in ops:
        hkl = hkl @ np.asarray(M).astype(hkl.dtype)
    return hkl


def _median_of_positive(x: np.ndarray, sample: int = 20_000, exact_below: int = 100_000) -> float:
    """``np.median(x[x > 0])`` bit for bit (1.0 when none is positive), without partitioning
    all of them: the middle order statistics are found inside a window of values that a
    strided sample puts around them (Floyd–Rivest); if the window misses them, np.median."""
    x = np.asarray(x, dtype=np.float64)
    positive = x > 0
    n = int(np.count_nonzero(positive))
    if n == 0:
        return 1.0
    if n < exact_below:
        return float(np.median(x[positive]))
    ks = sorted({(n - 1) // 2, n // 2})
    s = x[:: max(1, len(x) // sample)]
    s = np.sort(s[s > 0])
    half = max(8, int(0.03 * len(s)))  # ±3 % of the sample (≫ its sampling error)
    lo, hi = s[max(0, len(s) // 2 - half)], s[min(len(s) - 1, len(s) // 2 + half)]
    below = int(np.count_nonzero(positive & (x < lo)))
    window = x[(x >= lo) & (x <= hi)]
    if lo > 0 and below <= ks[0] and ks[-1] < below + len(window):
        window.partition([k - below for k in ks])
        vals = [window[k - below] for k in ks]
    else:  # a sample far from the median
        return float(np.median(x[positive]))
    return float(vals[0] if len(vals) == 1 else (vals[0] + vals[1]) / 2)


def prepare_still(obs: dict, grid: HKLGrid, table: np.ndarray, hand: np.ndarray | None, gstar,
                  reindex=None, fit_max_obs: int = 200_000, seed: int = 0,
                  with_dss: bool = False) -> PreparedStill:
    """The arrays the scaling passes need from one still (see :class:`PreparedStill`).

    obs: a source's still, with ``hkl`` or (diffuse.correct files, FileSource.load_deferred)
    ``pixel``, ``q_unit``, ``hkl_matrix`` and ``operator``; reindex: None or the still's
    ambiguity operator (h' = h·M, after the crystal's). The voxel of an observation is its
    hkl rounded exactly as :func:`voxel_flat` rounds it.
    """
    I = np.asarray(obs["I"])
    sig = np.asarray(obs["sigma"])
    v1 = obs.get("variance_per_intensity")
    n = len(I)
    ops = [M for M in (obs.get("operator"), reindex) if M is not None]
    c = np.empty(n, dtype=np.int32)
    side = np.empty(n, dtype=np.int8)
    hd = np.empty(0, dtype=np.int8) if hand is None else hand
    ndiv = np.asarray(grid.ndiv, dtype=np.float64)
    offset = np.asarray(grid.hkl_max, dtype=np.int64) * np.asarray(grid.ndiv)
    shape = np.asarray(grid.shape, dtype=np.int64)
    if "hkl" in obs:
        hkl = _hkl_of(obs, ops=ops)
        hkl = np.ascontiguousarray(hkl if hkl.dtype in (np.float32, np.float64) else hkl.astype(np.float64))
        _mc._voxels_hkl(hkl, ndiv.astype(hkl.dtype), offset, shape, table, hd, c, side)
        finite_hkl = np.all(np.isfinite(hkl), axis=1)
    else:
        R = np.eye(3)
        for M in ops:
            R = R @ np.asarray(M, dtype=np.float64)
        pix = np.ascontiguousarray(obs["pixel"], dtype=np.int64)
        _mc._voxels_q(obs["q_unit"], pix, np.ascontiguousarray(obs["hkl_matrix"], dtype=np.float64), R,
                      bool(ops), ndiv, offset, shape, table, hd, c, side)
        finite_hkl = True
    I_f = I.astype(np.float64, copy=False)
    s_f = sig.astype(np.float64, copy=False)
    if HAVE_NUMBA:  # one compiled pass each, the same values
        typical = float(_median_positive(I_f, np.empty(n))[0]) if v1 is not None else 1.0
        sel = np.empty(n, dtype=np.int64)
        sel = sel[:_fit_candidates(I, sig, _NONE if v1 is None else np.asarray(v1),
                                   hkl if "hkl" in obs else _NONE_HKL, sel)]
    else:
        typical = _median_of_positive(I_f) if v1 is not None else 1.0
        # the fit subset: as _reference_subset (the same observations in every pass)
        ok = np.isfinite(I_f) & np.isfinite(s_f) & finite_hkl
        ok &= (s_f > 0) if v1 is None else (s_f >= 0) & (np.asarray(v1) > 0)
        sel = np.flatnonzero(ok)
    if len(sel) > fit_max_obs:
        sel = np.sort(np.random.default_rng(seed).choice(sel, fit_max_obs, replace=False))
    sel = sel[c[sel] >= 0]
    fit = {"c": c[sel], "I": I_f[sel].copy(), "sigma": s_f[sel].copy(),
           "v1": None if v1 is None else np.asarray(v1, dtype=np.float64)[sel]}
    if with_dss:  # a constant scale does not use d*²
        h = _hkl_of(obs, sel, ops).astype(np.float64)
        fit["dss"] = np.einsum("ni,ij,nj->n", h, gstar, h)
    dss = None
    if with_dss:
        hk = _hkl_of(obs, np.flatnonzero(c >= 0), ops).astype(np.float64)
        dss = np.einsum("ni,ij,nj->n", hk, gstar, hk).astype(np.float32)
    if HAVE_NUMBA:
        n_keep, top = _kept_size(c)
        ck, side_k = np.empty(n_keep, dtype=np.int32), np.empty(n_keep, dtype=np.int8)
        I_k, s_k = np.empty(n_keep, dtype=np.float32), np.empty(n_keep, dtype=np.float32)
        v1_k = None if v1 is None else np.empty(n_keep, dtype=np.float32)
        per_voxel = np.zeros(top + 1, dtype=np.int64)
        _keep(c, side, I, sig, _NONE if v1 is None else np.asarray(v1), ck, side_k, I_k, s_k,
              _NONE32 if v1 is None else v1_k, per_voxel)
    else:
        keep = np.flatnonzero(c >= 0)
        n_keep = len(keep)
        ck, side_k = c[keep], side[keep]
        I_k, s_k = I[keep].astype(np.float32), sig[keep].astype(np.float32)
        v1_k = None if v1 is None else np.asarray(v1)[keep].astype(np.float32)
        per_voxel = np.bincount(ck)
    touched = np.flatnonzero(per_voxel)
    return PreparedStill(ck, side_k, I_k, s_k, v1_k, dss,
                         n - n_keep, typical, {k: v for k, v in fit.items() if v is not None},
                         (touched.astype(np.int32), per_voxel[touched].astype(np.int64)))


class _PreparedStore:
    """Prepared stills in memory up to ``max_bytes``, the rest in temporary .npy files (mmap)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.in_memory = 0
        self.items: dict = {}
        self.directory = None

    def put(self, i: int, p: PreparedStill) -> None:
        if self.in_memory + p.nbytes <= self.max_bytes:
            self.items[i] = p
            self.in_memory += p.nbytes
            return
        import tempfile

        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="diffuse_merge_")
        import os

        names = {}
        for k, v in p.arrays().items():
            names[k] = os.path.join(self.directory, f"{i}_{k}.npy")
            np.save(names[k], v)
        self.items[i] = (names, p.n_dropped, p.typical)

    def get(self, i: int) -> PreparedStill:
        item = self.items[i]
        if isinstance(item, PreparedStill):
            return item
        names, n_dropped, typical = item
        a = {k: np.load(f, mmap_mode="r") for k, f in names.items()}
        fit = {k[4:]: np.asarray(v) for k, v in a.items() if k.startswith("fit_")}
        return PreparedStill(a["c"], a["side"], a["I"], a["sigma"], a.get("v1"), a.get("dss"),
                             n_dropped, typical, fit,
                             (np.asarray(a["voxels_index"]), np.asarray(a["voxels_count"]))
                             if "voxels_index" in a else None)

    @property
    def n_spilled(self) -> int:
        return sum(not isinstance(v, PreparedStill) for v in self.items.values())

    def close(self) -> None:
        if self.directory is not None:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


_SCRATCH = _FIT_SCRATCH  # one dict: merging's _SCRATCH.clear() frees the fits' work arrays too


def _buffer(name: str, n: int) -> np.ndarray:
    """A float64 scratch array of length n, reused between stills and passes (fewer page
    faults than a fresh 8-bytes-per-observation array each time); freed by _SCRATCH.clear()."""
    buf = _SCRATCH.get(name)
    if buf is None or buf.size < n:
        buf = _SCRATCH[name] = np.empty(max(n, 1))
    return buf[:n]


def _floor(expected: np.ndarray, typical: float, n_typical: int) -> float:
    """model_variance's floor, 1e-3 × the median of the positive expected intensities of
    the whole still: ``expected`` (the observations kept) and ``n_typical`` more equal to
    ``typical`` (those outside the range). Exact: the same order statistics as np.median."""
    pos = expected[expected > 0]
    m = n_typical if typical > 0 else 0
    total = pos.size + m
    if total == 0:
        return 1e-12
    ks = sorted({(total - 1) // 2, total // 2})
    below = int(np.count_nonzero(pos < typical)) if m else pos.size
    where = [k if k < below else (None if k < below + m else k - m) for k in ks]
    need = sorted({w for w in where if w is not None})
    if need:
        pos.partition(need)  # pos is a copy already: in place
    vals = [typical if w is None else pos[w] for w in where]
    med = vals[0] if len(vals) == 1 else (vals[0] + vals[1]) / 2
    return 1e-3 * float(med)


def _floor_weighted(ref: np.ndarray, voxels: tuple, g: float, typical: float, n_typical: int) -> float:
    """:func:`_floor` of the expected intensities ``_expected(c, ref, [g], typical)`` of a
    still's observations and ``n_typical`` more equal to ``typical``, from its voxel counts
    (``PreparedStill.voxels``): O(voxels touched), not O(observations). Exact: for g > 0,
    g·x rounds monotonically in x, so the order statistics of the products are the products
    at the order statistics; each voxel's product is its observations' (all equal)."""
    index, count = voxels
    if HAVE_NUMBA:
        n = len(index) + 1
        return float(_floor_weighted_nb(ref, np.ascontiguousarray(index), np.ascontiguousarray(count, dtype=np.int64),
                                        float(g), float(typical), int(n_typical), _buffer("floor_vals", n),
                                        np.empty(n, dtype=np.int64)))
    r = np.asarray(ref[index], dtype=np.float64)
    finite = np.isfinite(r)
    e = np.float64(g) * r[finite]
    w = count[finite]
    m = (int(count[~finite].sum()) + int(n_typical)) if typical > 0 else 0
    pos = e > 0
    e, w = e[pos], w[pos]
    total = int(w.sum()) + m
    if total == 0:
        return 1e-12
    if m:
        e, w = np.append(e, typical), np.append(w, m)
    order = np.argsort(e, kind="stable")
    e, end = e[order], np.cumsum(w[order])  # sorted values; end[j]: observations up to value j
    vals = [e[np.searchsorted(end, k, side="right")] for k in sorted({(total - 1) // 2, total // 2})]
    med = vals[0] if len(vals) == 1 else (vals[0] + vals[1]) / 2
    return 1e-3 * float(med)


#: per-voxel scratch arrays larger than this are not kept between fits
ZEROS_KEEP_BYTES = 32 << 20


def _zeros(name: str, n: int, dtype) -> np.ndarray:
    """A zero-filled scratch array of length n, reused between stills and passes: its user
    zeroes again what it wrote (_own_prepared); freed by _SCRATCH.clear(). Above
    ZEROS_KEEP_BYTES a fresh one each time: kept, every still's voxels would stay resident
    (3 arrays of 134 MB for a 16.8 M-voxel compact map, +0.3 GB of peak RSS), while a fresh
    np.zeros maps only the pages the still touches."""
    if n * np.dtype(dtype).itemsize > ZEROS_KEEP_BYTES:
        return np.zeros(max(n, 1), dtype=dtype)[:n]
    key = ("zeros", name)
    buf = _SCRATCH.get(key)
    if buf is None or buf.size < n:
        buf = _SCRATCH[key] = np.zeros(max(n, 1), dtype=dtype)
    return buf[:n]


@contextmanager
def _own_prepared(ref_I, p: PreparedStill, m: np.ndarray, reject_limit):
    """The still's own weights, weighted sums and counts per compact voxel
    (merge_compact._own_sums), with model_variance's floor over m·R: zero-filled arrays
    reused between fits (a fresh one per fit costs its page faults), zeroed again on exit
    at the voxels the still touches."""
    n_c = len(ref_I)
    floor = 0.0
    if p.v1 is not None and m.size == 1 and m[0] > 0 and p.voxels is not None:
        floor = _floor_weighted(np.asarray(ref_I, dtype=np.float64), p.voxels, float(m[0]), 0.0, 0)
    elif p.v1 is not None:  # model_variance's floor over m·R (0 where no reference)
        e = _buffer("loo", len(p.c))
        _mc._expected(p.c, ref_I, m, 0.0, e)
        floor = _floor(e, 0.0, 0)
        del e
    W_own, S_own, n_own = _zeros("W_own", n_c, np.float64), _zeros("S_own", n_c, np.float64), _zeros(
        "n_own", n_c, np.int64)
    try:
        _mc._own_sums(p.c, p.I, p.sigma, np.empty(0) if p.v1 is None else p.v1, m, ref_I, floor,
                      float(reject_limit) if reject_limit else -1.0, W_own, S_own, n_own)
        yield W_own, S_own, n_own
    finally:
        touched = slice(None) if p.voxels is None else p.voxels[0]
        W_own[touched], S_own[touched], n_own[touched] = 0.0, 0.0, 0


def _leave_one_out_prepared(ref_I, ref_sigma, ref_counts, p: PreparedStill, multiplier, reject_limit,
                            min_counts):
    """scaling.leave_one_out_voxels (offset 0) at the still's fit subset, the own sums by one
    compiled pass over its prepared observations (equal to it to rounding; tested)."""
    from diffuse_cli.scaling import LOO_MIN_SHARE

    m = np.ascontiguousarray(np.atleast_1d(np.asarray(multiplier, dtype=np.float64)))
    r = np.ascontiguousarray(p.fit["c"])
    n = len(r)
    ref, ref_var, usable = np.empty(n), np.empty(n), np.empty(n, dtype=np.bool_)
    with _own_prepared(ref_I, p, m, reject_limit) as (W_own, S_own, n_own):
        _loo_at(r, ref_I, ref_sigma, ref_counts, W_own, S_own, n_own, int(min_counts), LOO_MIN_SHARE, True,
                _NONE, _NONE, _NONE, ref, ref_var, usable, _NONE, _NONE, _NONE)
    return ref, ref_var, usable


_NONE = np.empty(0)
_NONE32 = np.empty(0, dtype=np.float32)
_NONE_HKL = np.empty((0, 3))


def _fit_prepared(model, p: PreparedStill, ref_I, ref_counts, min_counts, previous=None,
                  redescending: bool = True) -> FitResult:
    """fit_scale on the still's fixed subset, where the reference has ≥ min_counts and a finite I.

    previous: (scale parameters, reject limit, own share, reference σ) of the still's last
    pass: the reference without the still's own contribution (scaling.leave_one_out), then relax."""
    f = p.fit
    v1 = f.get("v1")
    if previous is None:
        c = f["c"]
        ref = ref_I[c]
        good = (ref_counts[c] >= min_counts) & np.isfinite(ref)
        fit = fit_scale(model, f["I"][good], f["sigma"][good], ref[good], f["dss"][good] if "dss" in f else None,
                        variance_per_intensity=None if v1 is None else v1[good], redescending=redescending)
        return fit
    if model.n_control_points == 1:  # the usable observations gathered by one compiled pass
        from diffuse_cli.scaling import LOO_MIN_SHARE

        m = np.ascontiguousarray(np.atleast_1d(np.asarray(float(previous[0][0]), dtype=np.float64)))
        r = np.ascontiguousarray(f["c"])
        out = [_buffer(k, len(r)) for k in ("fit_I", "fit_sigma", "fit_v1", "fit_ref", "fit_var")]
        fv1 = _NONE if v1 is None else np.ascontiguousarray(v1, dtype=np.float64)
        with _own_prepared(ref_I, p, m, previous[1]) as (W_own, S_own, n_own):
            k = _loo_at(r, ref_I, previous[3], ref_counts, W_own, S_own, n_own, int(min_counts), LOO_MIN_SHARE,
                        False, np.ascontiguousarray(f["I"], dtype=np.float64),
                        np.ascontiguousarray(f["sigma"], dtype=np.float64), fv1, out[3], out[4], _NONE,
                        out[0], out[1], out[2] if v1 is not None else _NONE)
        fit = fit_scale(model, out[0][:k], out[1][:k], out[3][:k], None,
                        variance_per_intensity=None if v1 is None else out[2][:k], reference_variance=out[4][:k],
                        redescending=redescending)
    else:
        m = model.evaluate(previous[0], np.asarray(p.dss, dtype=np.float64))
        ref, ref_var, good = _leave_one_out_prepared(ref_I, previous[3], ref_counts, p, m, previous[1],
                                                     min_counts)
        fit = fit_scale(model, f["I"][good], f["sigma"][good], ref[good], f["dss"][good],
                        variance_per_intensity=None if v1 is None else v1[good],
                        reference_variance=ref_var[good], redescending=redescending)
    return relax(fit, previous[0], own_share=previous[2])
