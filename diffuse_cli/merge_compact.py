"""The cached merge's compact storage: sums and merged values per ASU voxel inside the resolution range.

The scaling passes of diffuse.merge (merging._scale_and_merge_cached) work on
observations whose ASU voxel is computed once per still
(:func:`diffuse_cli.merge_prepared.prepare_still`): an int32 index into the ASU
voxels inside the resolution range ("compact" index, in increasing flat order of
their representatives), and the observation's Bijvoet side (int8: +1 h's side,
−1 −h's side, 0 centric). The sums are then kept per compact voxel only, never
over the whole P1 box (issue 12):

* :func:`compact_asu` (the int32 ASU table, for reading the stills) and
  :func:`compact_tables` (the same from grid_asu_map's lut);
* the per-observation loops (voxels, expected intensity, one still of one pass,
  a still's own sums), numba-compiled when numba is importable, else the same
  pure-Python loops;
* :class:`CompactAccumulator` (sums per compact voxel);
* in :mod:`diffuse_cli.compact_map`: :class:`~diffuse_cli.compact_map.CompactMergedMap`
  (the map on those voxels; dense blocks of h-planes on demand,
  :meth:`~diffuse_cli.compact_map.CompactMergedMap.expand_slab`).

The dense P1-box accumulator and :class:`~diffuse_cli.merge_accumulator.MergedMap`
are in :mod:`diffuse_cli.merge_accumulator`.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.grid import HKLGrid
from diffuse_cli.merge_accumulator import HAVE_NUMBA

if HAVE_NUMBA:
    import numba


# ---------------------------------------------------------------- ASU tables and per-observation loops

def compact_tables(lut: np.ndarray, hand: np.ndarray | None = None):
    """(representatives, table): flat index of each compact voxel (int64, increasing),
    and for every grid voxel its compact index (int32, −1 outside the range).

    lut: from :func:`diffuse_cli.symmetry.grid_asu_map`.
    """
    n = lut.size
    step = 1 << 23  # chunks: no grid-sized int64 temporaries
    reps = np.concatenate([a + np.flatnonzero(lut[a:a + step] == np.arange(a, min(n, a + step), dtype=lut.dtype))
                           for a in range(0, n, step)] or [np.empty(0, dtype=np.int64)])
    table = np.full(n, -1, dtype=np.int32)
    table[reps] = np.arange(len(reps), dtype=np.int32)  # the representatives' own rank first
    for a in range(0, n, step):
        part = lut[a:a + step]
        ok = np.flatnonzero(part >= 0)
        table[a + ok] = table[part[ok]]
    return reps, table


def _voxels_hkl_py(hkl, ndiv, offset, shape, table, hand, out_c, out_side):
    """Compact voxel and side of each fractional hkl (rounded in hkl's dtype, as voxel_flat)."""
    n0, n1, n2 = shape[0], shape[1], shape[2]
    has_hand = hand.shape[0] > 0
    for i in range(hkl.shape[0]):
        out_c[i] = -1
        out_side[i] = 0
        h0, h1, h2 = hkl[i, 0] * ndiv[0], hkl[i, 1] * ndiv[1], hkl[i, 2] * ndiv[2]
        if not (np.isfinite(h0) and np.isfinite(h1) and np.isfinite(h2)):
            continue
        u0 = np.int64(np.rint(h0)) + offset[0]
        u1 = np.int64(np.rint(h1)) + offset[1]
        u2 = np.int64(np.rint(h2)) + offset[2]
        if u0 < 0 or u0 >= n0 or u1 < 0 or u1 >= n1 or u2 < 0 or u2 >= n2:
            continue
        k = (u0 * n1 + u1) * n2 + u2
        out_c[i] = table[k]
        if has_hand:
            out_side[i] = hand[k]


def _voxels_q_py(q_unit, pixels, M, R, has_R, ndiv, offset, shape, table, hand, out_c, out_side):
    """As :func:`_voxels_hkl_py` from the detector's ŝ1 − ŝ0 (float32) and hkl = M·q
    (float64, the order of :func:`diffuse_cli.geometry.hkl_from_q`), then hkl·R if has_R."""
    n0, n1, n2 = shape[0], shape[1], shape[2]
    has_hand = hand.shape[0] > 0
    for i in range(pixels.shape[0]):
        p = pixels[i]
        q0, q1, q2 = np.float64(q_unit[p, 0]), np.float64(q_unit[p, 1]), np.float64(q_unit[p, 2])
        a0 = q0 * M[0, 0] + q1 * M[0, 1] + q2 * M[0, 2]
        a1 = q0 * M[1, 0] + q1 * M[1, 1] + q2 * M[1, 2]
        a2 = q0 * M[2, 0] + q1 * M[2, 1] + q2 * M[2, 2]
        if has_R:
            b0 = a0 * R[0, 0] + a1 * R[1, 0] + a2 * R[2, 0]
            b1 = a0 * R[0, 1] + a1 * R[1, 1] + a2 * R[2, 1]
            b2 = a0 * R[0, 2] + a1 * R[1, 2] + a2 * R[2, 2]
            a0, a1, a2 = b0, b1, b2
        out_c[i] = -1
        out_side[i] = 0
        u0 = np.int64(np.rint(a0 * ndiv[0])) + offset[0]
        u1 = np.int64(np.rint(a1 * ndiv[1])) + offset[1]
        u2 = np.int64(np.rint(a2 * ndiv[2])) + offset[2]
        if u0 < 0 or u0 >= n0 or u1 < 0 or u1 >= n1 or u2 < 0 or u2 >= n2:
            continue
        k = (u0 * n1 + u1) * n2 + u2
        out_c[i] = table[k]
        if has_hand:
            out_side[i] = hand[k]


def _expected_py(c, ref, g, typical, out):
    """g·I_ref at each observation's compact voxel; ``typical`` where the reference is NaN."""
    ng = g.shape[0]
    for i in range(c.shape[0]):
        r = ref[c[i]]
        if np.isfinite(r):
            out[i] = (g[0] if ng == 1 else g[i]) * r
        else:
            out[i] = typical


def _pass_py(c, side, I, sig, v1, factor, ref, expected, floor, limit, half, sw, swi, cnt, sw0, swi0, swp, swip):
    """One still of one scaling pass (the old per-observation chain, fused):

    with v1 (variance model): var = v1·max(E, floor) + max(σ² − v1·I, 0),
    w = 1/(f²·var), σ_m = √var; without: w = 1/(σ f)², σ_m = σ. Outliers
    |I·f − I_ref| / (σ_m·f) > limit (limit > 0, I_ref finite) are left out.
    Adds w, w·I·f, 1 to sw, swi, cnt at c; with statistics (sw0 not empty) also
    to sw0, swi0 when ``half`` is 0 and to swp, swip when the side is +1.
    (w²(σ_m f)² = w exactly for these weights: σ of the mean is 1/√Σw.)
    Returns the number added.
    """
    nf = factor.shape[0]
    has_v1 = v1.shape[0] > 0
    has_ref = ref.shape[0] > 0
    n = 0
    stats = sw0.shape[0] > 0
    for i in range(c.shape[0]):
        k = c[i]
        f = factor[0] if nf == 1 else factor[i]
        x = np.float64(I[i])
        s0 = np.float64(sig[i])
        if has_v1:
            a = np.float64(v1[i])
            e = expected[i]
            if e < floor:
                e = floor
            v0 = s0 * s0 - a * x
            if v0 < 0.0:
                v0 = 0.0
            var = a * e + v0
            w = 1.0 / (f * f * var)
            sm = np.sqrt(var)
        else:
            sm = s0
            w = 0.0
        if limit > 0.0 and has_ref:
            r = ref[k]
            if np.isfinite(r):
                z = (x * f - r) / (sm * f)
                if abs(z) > limit:
                    continue
        s = sm * f
        v = x * f
        if not np.isfinite(v) or not np.isfinite(s):
            continue
        if has_v1:
            if not (w > 0.0) or not np.isfinite(w) or s < 0.0:
                continue
        else:
            if not (s > 0.0):
                continue
            w = 1.0 / (s * s)
        sw[k] += w
        swi[k] += w * v
        cnt[k] += 1
        if stats:
            if half == 0:
                sw0[k] += w
                swi0[k] += w * v
            if side[i] == 1:
                swp[k] += w
                swip[k] += w * v
        n += 1
    return n


def _means_py(sw, swi, factor, out_I, out_sigma):
    """out_I = Σw·I/Σw·factor and (out_sigma not empty) √Σw/Σw·factor; NaN where Σw ≤ 0."""
    has_s = out_sigma.shape[0] > 0
    for k in range(sw.shape[0]):
        if sw[k] > 0.0:
            out_I[k] = swi[k] / sw[k] * factor
            if has_s:
                out_sigma[k] = np.sqrt(sw[k]) / sw[k] * factor
        else:
            out_I[k] = np.nan
            if has_s:
                out_sigma[k] = np.nan


def _rest_means_py(sw, swi, sw_part, swi_part, skip, factor, out):
    """Mean of the observations not in a part: (Σw − Σw_part, Σw·I − Σw·I_part), NaN where that is
    empty or ``skip`` (not empty) is set. Exact emptiness: a part holding every observation of a
    voxel was summed in the same order as the total, so the difference is exactly 0."""
    has_skip = skip.shape[0] > 0
    for k in range(sw.shape[0]):
        a = sw[k] - sw_part[k]
        if a > 0.0 and not (has_skip and skip[k]):
            out[k] = (swi[k] - swi_part[k]) / a * factor
        else:
            out[k] = np.nan


def _next_reference_py(sw, swi, cnt, factor, ref_I, ref_sigma, ref_counts):
    """The next pass's reference in place: the new means, except at voxels whose every
    observation this pass rejected (count 0, previously > 0), which keep the previous
    values (see merge_passes._carry_rejected)."""
    for k in range(sw.shape[0]):
        if cnt[k] == 0 and ref_counts[k] > 0:
            continue
        ref_counts[k] = cnt[k]
        if sw[k] > 0.0:
            ref_I[k] = swi[k] / sw[k] * factor
            ref_sigma[k] = np.sqrt(sw[k]) / sw[k] * factor
        else:
            ref_I[k] = np.nan
            ref_sigma[k] = np.nan


def _orbit_scatter_py(reps, rot, offset, shape, i0, i1, values, out):
    """Expand compact values onto the grid slab h-index [i0, i1): every image v·R (in the
    grid) of each representative (flat index reps[c]) gets values[c] (as grid_asu_map)."""
    n1, n2 = shape[1], shape[2]
    for c in range(reps.shape[0]):
        f = np.int64(reps[c])
        v0 = f // (n1 * n2) - offset[0]
        r = f % (n1 * n2)
        v1 = r // n2 - offset[1]
        v2 = r % n2 - offset[2]
        for o in range(rot.shape[0]):
            u0 = v0 * rot[o, 0, 0] + v1 * rot[o, 1, 0] + v2 * rot[o, 2, 0] + offset[0]
            if u0 < i0 or u0 >= i1:
                continue
            u1 = v0 * rot[o, 0, 1] + v1 * rot[o, 1, 1] + v2 * rot[o, 2, 1] + offset[1]
            u2 = v0 * rot[o, 0, 2] + v1 * rot[o, 1, 2] + v2 * rot[o, 2, 2] + offset[2]
            if u1 < 0 or u1 >= n1 or u2 < 0 or u2 >= n2:
                continue
            out[((u0 - i0) * n1 + u1) * n2 + u2] = values[c]


def _gather_py(table, values, fill, out):
    """out[j] = values[table[j]], or ``fill`` where table[j] < 0 (a slab of the grid table)."""
    for j in range(table.shape[0]):
        c = table[j]
        out[j] = values[c] if c >= 0 else fill


def _radial_sums_py(table, I, h, k, l, g, d_star_max, n_bins, n, s):
    """Counts and sums of I per d* bin over the grid voxels of a slab (the h-planes ``h``)
    whose compact value (``table``) is finite with d* ≤ d_star_max, the bin
    min(⌊d*/d_star_max·n_bins⌋, n_bins − 1). d* as merged_blocks.block_d_star computes it
    (the same operations in the same order), the sums in flat voxel order (as bincount)."""
    n1, n2 = k.shape[0], l.shape[0]
    g00, g11, g22 = g[0, 0], g[1, 1], g[2, 2]
    g01, g02, g12 = 2 * g[0, 1], 2 * g[0, 2], 2 * g[1, 2]
    for a in range(h.shape[0]):
        x = h[a]
        for b in range(n1):
            y = k[b]
            hk = g00 * x * x + g11 * y * y
            row = (a * n1 + b) * n2
            for c in range(n2):
                t = table[row + c]
                if t < 0:
                    continue
                v = I[t]
                if not np.isfinite(v):
                    continue
                z = l[c]
                d2 = hk + (g22 * z * z + g12 * y * z)
                d2 += g01 * x * y
                d2 += g02 * x * z
                ds = np.sqrt(d2) if d2 > 0.0 else 0.0
                if ds <= d_star_max:
                    m = np.int64(ds / d_star_max * n_bins)
                    if m > n_bins - 1:
                        m = n_bins - 1
                    n[m] += 1
                    s[m] += v


def _own_sums_py(c, I, sig, v1, m, ref, floor, limit, W_own, S_own, n_own):
    """A still's own weights and sums per compact voxel, as scaling.leave_one_out_voxels
    recomputes them (offset 0): v = I/m, w = m²/var with var = v1·max(m·R, floor) + v0
    (R = 0 where the reference is NaN), or σ² without v1; observations beyond ``limit``
    (≥ 0; < 0: none) robust σ from R are left out, as the pass before left them out."""
    nm = m.shape[0]
    has_v1 = v1.shape[0] > 0
    for i in range(c.shape[0]):
        k = c[i]
        if k < 0:
            continue
        mi = m[0] if nm == 1 else m[i]
        x = np.float64(I[i])
        s0 = np.float64(sig[i])
        r = ref[k]
        value = x / mi
        if has_v1:
            a = np.float64(v1[i])
            if not (s0 >= 0.0 and a > 0.0):
                continue
            e = mi * (r if np.isfinite(r) else 0.0)
            if e < floor:
                e = floor
            v0 = s0 * s0 - a * x
            if v0 < 0.0:
                v0 = 0.0
            var = a * e + v0
        else:
            if not (s0 > 0.0):
                continue
            var = s0 * s0
        w = mi * mi / var
        if not np.isfinite(value) or not np.isfinite(w) or not (w > 0.0):
            continue
        if limit >= 0.0 and np.isfinite(r) and abs(value - r) * np.sqrt(w) > limit:
            continue
        W_own[k] += w
        S_own[k] += w * value
        n_own[k] += 1


if HAVE_NUMBA:  # error_model numpy: x/0 is ±inf or NaN (then skipped), as in the numpy code
    _own_sums = numba.njit(nogil=True, cache=True, error_model="numpy")(_own_sums_py)
    _voxels_hkl = numba.njit(nogil=True, cache=True, error_model="numpy")(_voxels_hkl_py)
    _voxels_q = numba.njit(nogil=True, cache=True, error_model="numpy")(_voxels_q_py)
    _expected = numba.njit(nogil=True, cache=True, error_model="numpy")(_expected_py)
    _pass = numba.njit(nogil=True, cache=True, error_model="numpy")(_pass_py)
    _means = numba.njit(nogil=True, cache=True, error_model="numpy")(_means_py)
    _rest_means = numba.njit(nogil=True, cache=True, error_model="numpy")(_rest_means_py)
    _next_reference = numba.njit(nogil=True, cache=True, error_model="numpy")(_next_reference_py)
    _orbit_scatter = numba.njit(nogil=True, cache=True)(_orbit_scatter_py)
    _gather = numba.njit(nogil=True, cache=True)(_gather_py)
    _radial_sums = numba.njit(nogil=True, cache=True, error_model="numpy")(_radial_sums_py)
else:  # pragma: no cover - slow but identical (pure Python loops)
    _voxels_hkl, _voxels_q, _expected, _pass = _voxels_hkl_py, _voxels_q_py, _expected_py, _pass_py
    _own_sums = _own_sums_py
    _means, _rest_means, _next_reference, _orbit_scatter = (_means_py, _rest_means_py, _next_reference_py,
                                                            _orbit_scatter_py)
    _gather, _radial_sums = _gather_py, _radial_sums_py


class CompactAccumulator:
    """Sums per compact ASU voxel, one array each (freed one by one when the map is made).

    ``sw``, ``swi`` float64: Σw, Σw·I over every observation; ``cnt`` int32: their count.
    With ``statistics`` (the last pass: the map's half-dataset and Friedel means) also
    ``sw0``, ``swi0`` (half 0) and ``swp``, ``swip`` (h's Bijvoet side, +1); half 1 and
    −h's side are the differences (:func:`_rest_means_py`). 20 bytes per ASU voxel inside
    the resolution range, 52 with statistics.
    """

    def __init__(self, n_compact: int, statistics: bool = True):
        self.sw, self.swi = np.zeros(n_compact), np.zeros(n_compact)
        self.cnt = np.zeros(n_compact, dtype=np.int32)
        empty = np.empty(0)
        self.stats = [np.zeros(n_compact) for _ in range(4)] if statistics else [empty] * 4
        self.statistics = statistics
        self.n_added = 0

    def reduce(self, comm) -> None:
        """Sum over all MPI ranks (in place)."""
        if comm is None or comm.Get_size() == 1:
            return
        from mpi4py import MPI

        for a in [self.sw, self.swi, self.cnt] + (self.stats if self.statistics else []):
            comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        self.n_added = comm.allreduce(self.n_added, op=MPI.SUM)

    def next_reference(self, factor: float, reference: dict | None) -> dict:
        """The next pass's reference (I, sigma float64, counts int32), in the arrays of
        ``reference`` when given (previous values kept where every observation was rejected)."""
        if reference is None:
            n = len(self.sw)
            reference = {"I": np.empty(n), "sigma": np.empty(n), "counts": np.zeros(n, dtype=np.int32)}
        _next_reference(self.sw, self.swi, self.cnt, float(factor), reference["I"], reference["sigma"],
                        reference["counts"])
        return reference

    def take_means(self, factor: float = 1.0, centric: np.ndarray | None = None, friedel: bool = True) -> dict:
        """Compact merged values (I, sigma float64, counts int32, half_I and friedel_I float32
        lists); the sums are released on the way (the accumulator is empty afterwards).
        centric: per compact voxel, no Friedel pair (friedel_I NaN there)."""
        n = len(self.sw)
        empty = np.empty(0)
        half_I, friedel_I = [], []
        f = float(factor)
        if self.statistics:
            sw0, swi0, swp, swip = self.stats
            h0, h1 = np.empty(n, np.float32), np.empty(n, np.float32)
            _means(sw0, swi0, f, h0, np.empty(0, np.float32))
            _rest_means(self.sw, self.swi, sw0, swi0, np.empty(0, np.bool_), f, h1)
            half_I = [h0, h1]
            self.stats[0] = self.stats[1] = sw0 = swi0 = None
            if friedel:
                fp, fm = np.empty(n, np.float32), np.empty(n, np.float32)
                skip = np.empty(0, np.bool_) if centric is None else centric
                _means(swp, swip, f, fp, np.empty(0, np.float32))
                if centric is not None:
                    fp[centric] = np.nan
                _rest_means(self.sw, self.swi, swp, swip, skip, f, fm)
                friedel_I = [fp, fm]
            self.stats = [empty] * 4
            del swp, swip
        I, sig = np.empty(n), np.empty(n)
        _means(self.sw, self.swi, f, I, sig)
        cnt = self.cnt
        self.sw = self.swi = self.cnt = empty
        return {"I": I, "sigma": sig, "counts": cnt, "half_I": half_I, "friedel_I": friedel_I}


def _in_resolution_range(v: np.ndarray, ndiv, gstar, d_min=None, d_max=None) -> np.ndarray:
    """symmetry.representatives_in_range's resolution test of grid index vectors v (N, 3):
    d*² = h·G*·h (h = v/ndiv) ≤ 1/d_min² and ≥ 1/d_max², decided as its einsum decides.

    d*² is summed term by term (cheap); only where it lies within 1e-12 of the sum of the
    terms' magnitudes from a limit (both sums err by a few 1e-16 of that) is the einsum
    evaluated, so the decisions are the einsum's everywhere."""
    x, y, z = (v[:, i] / ndiv[i] for i in range(3))
    diag = gstar[0, 0] * x * x + gstar[1, 1] * y * y + gstar[2, 2] * z * z
    dss, size = diag, diag
    for g, a, b in ((gstar[0, 1], x, y), (gstar[0, 2], x, z), (gstar[1, 2], y, z)):
        if g != 0.0:
            t = (2.0 * g) * a * b
            dss, size = dss + t, size + np.abs(t)
    keep = np.ones(len(v), dtype=bool)
    doubt = np.zeros(len(v), dtype=bool)
    for limit, below in ((d_min, True), (d_max, False)):
        if limit is None:
            continue
        edge = 1.0 / limit**2
        keep &= (dss <= edge) if below else (dss >= edge)
        doubt |= np.abs(dss - edge) <= 1e-12 * size
    if doubt.any():
        i = np.flatnonzero(doubt)
        hkl = v[i] / ndiv
        exact = np.einsum("ni,ij,nj->n", hkl, gstar, hkl)
        ok = np.ones(len(i), dtype=bool)
        if d_min is not None:
            ok &= exact <= 1.0 / d_min**2
        if d_max is not None:
            ok &= exact >= 1.0 / d_max**2
        keep[i] = ok
    return keep


def compact_asu(grid: HKLGrid, laue, unit_cell=None, d_min=None, d_max=None, friedel: bool = True,
                chunk: int = 1 << 19):
    """(reps, table, hand) of the ASU voxels inside the resolution range, without the
    int64 full-grid map of :func:`diffuse_cli.symmetry.grid_asu_map`:

    reps: flat index of each compact voxel (increasing; int32 when the grid allows);
    table: per grid voxel its compact index (int32, −1 outside the range), equal to
    :func:`compact_tables` of grid_asu_map; hand: as grid_asu_map's (int8), or None.
    Built as grid_asu_map is (representatives found chunk by chunk, their images pointed at
    them), writing the compact index directly. 5 bytes per grid voxel. ``chunk``: voxels per
    block of whole h-planes (small blocks reuse their temporaries instead of fresh pages).
    """
    from diffuse_cli.symmetry import _orbit_fill, reciprocal_metric

    shape = np.asarray(grid.shape, dtype=np.int64)
    offset = np.asarray(grid.hkl_max, dtype=np.int64) * np.asarray(grid.ndiv)
    n = grid.n_voxels
    table = np.full(n, -1, dtype=np.int32)
    hand = np.zeros(n, dtype=np.int8) if friedel else None
    dets = np.rint(np.linalg.det(laue.rotations.astype(np.float64))).astype(np.int8)
    gstar = reciprocal_metric(unit_cell) if unit_cell is not None else None
    ndiv = np.asarray(grid.ndiv, dtype=np.float64)
    rep_dtype = np.int32 if n < 2**31 else np.int64
    parts, n_c = [], 0
    plane = int(shape[1] * shape[2])
    step = max(1, chunk // plane)  # whole h-planes: the indices by broadcasting, not unravel_index
    k_axis = (np.arange(shape[1]) - offset[1])[None, :, None]
    l_axis = (np.arange(shape[2]) - offset[2])[None, None, :]
    for i0 in range(0, int(shape[0]), step):
        i1 = min(int(shape[0]), i0 + step)
        # the ASU test on the block's axes (broadcast), the index vectors of its voxels only:
        # the voxels, their order and the resolution test are representatives_in_range's
        inside = laue.is_inside_broadcast((np.arange(i0, i1) - offset[0])[:, None, None], k_axis, l_axis)
        a, b, c = np.nonzero(np.broadcast_to(inside, (i1 - i0, int(shape[1]), int(shape[2]))))
        loc = (a * shape[1] + b) * shape[2] + c  # flat within the block, increasing
        v = np.empty((len(loc), 3), dtype=np.int64)
        v[:, 0] = a + (i0 - offset[0])
        v[:, 1] = b - offset[1]
        v[:, 2] = c - offset[2]
        if gstar is not None and (d_min is not None or d_max is not None):
            keep = _in_resolution_range(v, ndiv, gstar, d_min, d_max)
            loc, v = loc[keep], v[keep]
        fr = loc + i0 * plane
        idx = np.arange(n_c, n_c + len(fr), dtype=np.int64)
        vr = np.ascontiguousarray(v)
        if _orbit_fill is not None:
            _orbit_fill(idx, vr, laue.rotations, dets, offset, shape, table,
                        hand if hand is not None else np.zeros(0, dtype=np.int8))
        else:  # pragma: no cover - without numba
            for r, det in zip(laue.rotations, dets):
                u = vr @ r + offset
                ok = np.all((u >= 0) & (u < shape), axis=-1)
                dest = (u[ok, 0] * shape[1] + u[ok, 1]) * shape[2] + u[ok, 2]
                table[dest] = idx[ok]
                if hand is not None:
                    hd = hand[dest]
                    hand[dest] = np.where(hd == 0, det, np.where(hd == det, hd, 2)).astype(np.int8)
        parts.append(fr.astype(rep_dtype))
        n_c += len(fr)
    if hand is not None:
        for a in range(0, n, chunk):
            part = hand[a:a + chunk]
            part[part == 2] = 0
    reps = np.concatenate(parts) if parts else np.empty(0, dtype=rep_dtype)
    return reps, table, hand
