"""Compiled kernels of :mod:`diffuse_cli.merge_prepared`: the per-observation passes of
``prepare_still`` (fit candidates, the observations kept, the median of the positive
intensities), the weighted selection of ``_floor_weighted`` (model_variance's floor from
voxel counts) and the leave-one-out reference at the fit observations
(``_leave_one_out_prepared``). numba-compiled when numba is importable; ``_loo_at`` falls
back to its Python function, the others are used only with numba.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.merge_accumulator import HAVE_NUMBA

if HAVE_NUMBA:
    import numba


def _fit_candidates_py(I, sig, v1, hkl, out):
    """np.flatnonzero of prepare_still's test for fit observations, into out: finite I, σ
    and hkl (hkl (n, 3); empty: finite), and σ > 0, or with a variance model (v1 not
    empty) σ ≥ 0 and v1 > 0. Returns their number."""
    has_v1 = v1.shape[0] > 0
    has_hkl = hkl.shape[0] > 0
    m = 0
    for i in range(I.shape[0]):
        s = sig[i]
        ok = np.isfinite(I[i]) and np.isfinite(s)
        if has_hkl:
            ok = ok and np.isfinite(hkl[i, 0]) and np.isfinite(hkl[i, 1]) and np.isfinite(hkl[i, 2])
        if has_v1:
            ok = ok and s >= 0 and v1[i] > 0
        else:
            ok = ok and s > 0
        out[m] = i
        m += ok
    return m


def _kept_size_py(c):
    """(number of c ≥ 0, max c) of compact voxels c (−1: outside)."""
    m = 0
    top = -1
    for i in range(c.shape[0]):
        k = c[i]
        m += k >= 0
        if k > top:
            top = k
    return m, top


def _keep_py(c, side, I, sig, v1, out_c, out_side, out_I, out_s, out_v1, per_voxel):
    """The observations with c ≥ 0, in order: c, side, and I, σ, v1 (v1 empty: none) as
    float32; per_voxel[c] += 1 (np.bincount)."""
    has_v1 = v1.shape[0] > 0
    m = 0
    for i in range(c.shape[0]):
        k = c[i]
        if k >= 0:
            out_c[m] = k
            out_side[m] = side[i]
            out_I[m] = np.float32(I[i])
            out_s[m] = np.float32(sig[i])
            if has_v1:
                out_v1[m] = np.float32(v1[i])
            per_voxel[k] += 1
            m += 1


def _median_positive_py(x, work):
    """(median, number) of the positive values of x, the median as np.median(x[x > 0])
    computes it (in float64): the values inside a window that a strided sample puts around
    it are gathered and selected from, in one pass; if the window misses, all of them."""
    n = x.shape[0]
    if n >= 8192:
        step = n // 2048
        ns = (n + step - 1) // step
        smp = np.empty(ns)
        k = 0
        for t in range(ns):
            v = np.float64(x[t * step])
            if v > 0.0:
                smp[k] = v
                k += 1
        if k > 0:
            smp = np.sort(smp[:k])
            half = int(1.5 * np.sqrt(k)) + 8
            lo = smp[max(0, k // 2 - half)]
            hi = smp[min(k - 1, k // 2 + half)]
            n_pos = 0
            below = 0
            m = 0
            for i in range(n):  # branch-free (see scaling_kernels._middle)
                v = np.float64(x[i])
                n_pos += v > 0.0
                below += (v > 0.0) & (v < lo)
                work[m] = v
                m += (v >= lo) & (v <= hi)
            k0, k1 = (n_pos - 1) // 2, n_pos // 2
            if n_pos and below <= k0 and k1 < below + m:
                _select(work, 0, m - 1, k0 - below)
                a = work[k0 - below]
                b = a if k1 == k0 else work[k0 - below + 1:m].min()
                return (a if k1 == k0 else (a + b) / 2.0), n_pos
    m = _positives(x, 1.0, work)
    if m == 0:
        return 1.0, 0
    k0, k1 = (m - 1) // 2, m // 2
    _select(work, 0, m - 1, k0)
    a = work[k0]
    b = a if k1 == k0 else work[k0 + 1:m].min()
    return (a if k1 == k0 else (a + b) / 2.0), m


if HAVE_NUMBA:
    from diffuse_cli.scaling_kernels import _positives, _select

    _fit_candidates = numba.njit(nogil=True, cache=True)(_fit_candidates_py)
    _kept_size = numba.njit(nogil=True, cache=True)(_kept_size_py)
    _keep = numba.njit(nogil=True, cache=True)(_keep_py)
    _median_positive = numba.njit(nogil=True, cache=True)(_median_positive_py)


def _weighted_kth_py(vals, wts, k):
    """The value of rank k (0-based) among values ``vals`` repeated ``wts`` times (no NaN;
    both arrays are reordered): the k-th of the sorted observations. Three-way quickselect
    on the weights; a sort of what is left after 64 rounds."""
    lo, hi = 0, vals.shape[0] - 1
    rounds = 0
    while lo < hi:
        rounds += 1
        if rounds > 64:
            order = np.argsort(vals[lo:hi + 1])
            acc = 0
            for j in order:
                acc += wts[lo + j]
                if k < acc:
                    return vals[lo + j]
            return vals[lo + order[-1]]
        x, y, z = vals[lo], vals[(lo + hi) // 2], vals[hi]
        if x < y:
            p = y if y < z else (z if x < z else x)
        else:
            p = x if x < z else (z if y < z else y)
        # Dutch flag: [lo, lt) < p, [lt, i) == p, (gt, hi] > p
        lt, i, gt = lo, lo, hi
        while i <= gt:
            v = vals[i]
            if v < p:
                vals[i], vals[lt] = vals[lt], v
                wts[i], wts[lt] = wts[lt], wts[i]
                lt += 1
                i += 1
            elif v > p:
                vals[i], vals[gt] = vals[gt], v
                wts[i], wts[gt] = wts[gt], wts[i]
                gt -= 1
            else:
                i += 1
        w_less = 0
        for j in range(lo, lt):
            w_less += wts[j]
        w_equal = 0
        for j in range(lt, gt + 1):
            w_equal += wts[j]
        if k < w_less:
            hi = lt - 1
        elif k < w_less + w_equal:
            return p
        else:
            k -= w_less + w_equal
            lo = gt + 1
    return vals[lo]


def _floor_weighted_py(ref, index, count, g, typical, n_typical, vals, wts):
    """_floor_weighted's floor, one pass over the touched voxels and weighted selection."""
    n = 0
    n_nonfinite = 0
    for j in range(index.shape[0]):
        x = np.float64(ref[index[j]])
        if not np.isfinite(x):
            n_nonfinite += count[j]
            continue
        e = g * x
        if e > 0:
            vals[n] = e
            wts[n] = count[j]
            n += 1
    m = (n_nonfinite + n_typical) if typical > 0 else 0
    total = m
    for j in range(n):
        total += wts[j]
    if total == 0:
        return 1e-12
    if m:
        vals[n] = typical
        wts[n] = m
        n += 1
    k0, k1 = (total - 1) // 2, total // 2
    a = _weighted_kth(vals[:n].copy(), wts[:n].copy(), k0)
    if k1 == k0:
        return 1e-3 * a
    return 1e-3 * ((a + _weighted_kth(vals[:n], wts[:n], k1)) / 2)


if HAVE_NUMBA:
    _weighted_kth = numba.njit(nogil=True, cache=True)(_weighted_kth_py)
    _floor_weighted_nb = numba.njit(nogil=True, cache=True, error_model="numpy")(_floor_weighted_py)


def _loo_at_py(r, ref_I, ref_sigma, ref_counts, W_own, S_own, n_own, min_counts, min_share, full,
               fI, fs, fv1, out_ref, out_var, out_use, oI, os_, ov1):
    """The leave-one-out reference at fit observations r (compact voxels), as
    scaling.leave_one_out_voxels computes it: W = 1/σ_h², W_other = W − W_own,
    R = (R_h·W − S_own)/W_other, var = 1/W_other, usable where the others have
    ≥ min_counts observations, W_other > min_share·W and R, W are finite. full: R and var
    (NaN where not usable) and usable at every j; else only the usable ones, in order,
    with their fI, fs, fv1 (fv1 empty: none) into oI, os_, ov1. Returns their number."""
    has_v1 = fv1.shape[0] > 0
    m = 0
    for j in range(r.shape[0]):
        k = r[j]
        sg = np.float64(ref_sigma[k])
        W = 1.0 / (sg * sg)
        W_other = W - W_own[k]
        n_other = np.int64(ref_counts[k]) - n_own[k]
        ref = (np.float64(ref_I[k]) * W - S_own[k]) / W_other
        use = (n_other >= min_counts) and (W_other > min_share * W) and np.isfinite(ref) and np.isfinite(W)
        if full:
            out_ref[j] = ref if use else np.nan
            out_var[j] = 1.0 / W_other if use else np.nan
            out_use[j] = use
        elif use:
            oI[m] = fI[j]
            os_[m] = fs[j]
            if has_v1:
                ov1[m] = fv1[j]
            out_ref[m] = ref
            out_var[m] = 1.0 / W_other
        m += use
    return m


_loo_at = (numba.njit(nogil=True, cache=True, error_model="numpy")(_loo_at_py) if HAVE_NUMBA
           else _loo_at_py)  # error_model numpy: x/0 is ±inf or NaN (then not usable), as numpy
