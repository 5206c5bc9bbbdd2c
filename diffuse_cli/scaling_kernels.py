"""Compiled pieces of the constant-scale fit of :mod:`diffuse_cli.scaling`
(``_fit_scale_constant``): order statistics and medians (:func:`_median`, bit for
bit np.median), and the per-observation passes of the IRLS fit (normalised
residuals, robust reweighting, model_variance's background part). numba-compiled
when numba is importable (Debian: python3-numba), else the same Python functions.
"""

from __future__ import annotations

import numpy as np

try:  # optional accelerator, as merge_accumulator
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on the installation
    numba = None
    HAVE_NUMBA = False


# ---------------------------------------------------------------- compiled pieces of the fits
#
# The same floating-point operations, in the same order, as the numpy expressions
# they replace (fit_scale's results are bit for bit those of _fit_scale_numpy; tested).
# A median is two order statistics (the same values whatever the selection algorithm),
# averaged as np.median averages them.

def _select_py(a, lo, hi, k):
    """Partition a[lo:hi + 1] (no NaN) in place so that a[k] is its (k − lo)-th smallest (Wirth's find,
    median-of-three pivots; a full sort of what is left after 64 rounds)."""
    rounds = 0
    while lo < hi:
        rounds += 1
        if rounds > 64:
            a[lo:hi + 1].sort()
            return
        x, y, z = a[lo], a[(lo + hi) // 2], a[hi]
        if x < y:
            p = y if y < z else (z if x < z else x)
        else:
            p = x if x < z else (z if y < z else y)
        i, j = lo, hi
        while i <= j:
            while a[i] < p:
                i += 1
            while p < a[j]:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if j < k:
            lo = i
        if k < i:
            hi = j


def _middle_py(x, centre, absdev, work):
    """(v_(k0), v_(k1), has_nan) of the values v = x (absdev False) or |x − centre| (as
    np.abs(x − centre)) of 1-D float64 x, k0 = (n − 1)//2, k1 = n//2: the order statistics
    np.median averages. Large x: the values inside a window that a strided sample puts
    around the median are gathered and selected from (one pass over x); if the window
    misses them, all of them. ``work``: scratch of x's length."""
    n = x.shape[0]
    k0 = (n - 1) // 2
    k1 = n // 2
    if n >= 8192:
        step = n // 2048
        ns = (n + step - 1) // step
        smp = np.empty(ns)
        for t in range(ns):
            smp[t] = abs(x[t * step] - centre) if absdev else x[t * step]
        smp.sort()
        half = int(1.5 * np.sqrt(ns)) + 8
        lo = smp[max(0, ns // 2 - half)]
        hi = smp[min(ns - 1, ns // 2 + half)]
        if lo == lo and hi == hi:
            below = 0
            m = 0
            nan = False
            for i in range(n):  # branch-free: random data would mispredict every other branch
                v = abs(x[i] - centre) if absdev else x[i]
                below += v < lo
                work[m] = v
                m += (v >= lo) & (v <= hi)
                nan |= v != v
            if nan:
                return np.nan, np.nan, True
            if below <= k0 and k1 < below + m:
                _select(work, 0, m - 1, k0 - below)
                a = work[k0 - below]
                b = a if k1 == k0 else work[k0 - below + 1:m].min()
                return a, b, False
    for i in range(n):
        v = abs(x[i] - centre) if absdev else x[i]
        if v != v:
            return np.nan, np.nan, True
        work[i] = v
    _select(work, 0, n - 1, k0)
    a = work[k0]
    b = a if k1 == k0 else work[k0 + 1:n].min()
    return a, b, False


def _positives_py(x, factor, out):
    """The positive values of factor·x into out (in order); returns their number."""
    m = 0
    for i in range(x.shape[0]):
        v = x[i] * factor
        if v > 0.0:
            out[m] = v
            m += 1
    return m


def _sigma_resid_py(I, s, v0, v1, ref, vref, c0, floor, w0, r):
    """fit_scale's sigma_of(c) (s_model) for a constant scale c = (c0,): w0 = 1/s_model² and
    r = (I − D@c)/s_model, D@c = ref·c0; the variance's expected intensity and reference
    term use D@c and G@c = c0, or ref and 1 when c0 = 0. v1, vref: empty if not given;
    v0 = max(σ² − v1·I, 0); floor: model_variance's floor. The variance goes to w0 first:
    two loops over few arrays vectorise, one over all of them does not."""
    n = I.shape[0]
    g = c0 if c0 != 0.0 else 1.0
    gg = g * g
    has_v1 = v1.shape[0] > 0
    has_vref = vref.shape[0] > 0
    if has_v1 and has_vref:
        for i in range(n):
            e = ref[i] * g
            m = e if (e >= floor or e != e) else floor  # np.maximum
            w0[i] = v1[i] * m + v0[i] + gg * vref[i]
    elif has_v1:
        for i in range(n):
            e = ref[i] * g
            m = e if (e >= floor or e != e) else floor
            w0[i] = v1[i] * m + v0[i] + 0.0
    elif has_vref:
        for i in range(n):
            w0[i] = s[i] * s[i] + gg * vref[i]
    if has_v1 or has_vref:
        for i in range(n):
            sm = np.sqrt(w0[i])
            w0[i] = 1.0 / (sm * sm)
            r[i] = (I[i] - ref[i] * c0) / sm
    else:  # s_model = σ
        for i in range(n):
            sm = s[i]
            w0[i] = 1.0 / (sm * sm)
            r[i] = (I[i] - ref[i] * c0) / sm


def _reweight_py(r, w0, ref, mode, t, hub, Dw):
    """fit_scale's robust weights from r, in place in hub: mode 0 |r| ≤ t (t = cut·scale),
    1 Huber (t = k·scale), 2 Tukey's biweight (t = c·scale); Dw[:, 0] = ref·(w0·hub), the
    next iteration's D·w. Returns whether any weight changed."""
    changed = False
    for i in range(r.shape[0]):
        x = r[i]
        if mode == 0:
            h = 1.0 if abs(x) <= t else 0.0
        elif mode == 1:
            u = abs(x) / t
            if u <= 1.0:
                h = 1.0
            else:
                h = 1.0 / (u if (u >= 1e-300 or u != u) else 1e-300)
        else:
            u = x / t
            if abs(u) < 1.0:
                q = 1.0 - u * u
                h = q * q
            else:
                h = 0.0
        if h != hub[i]:
            changed = True
        hub[i] = h
        Dw[i, 0] = ref[i] * (w0[i] * h)
    return changed


def _final_resid_py(I, s, v0, v1, ref, c0, floor, out):
    """The finite values of (I − D@c)/s_obs (s_obs = σ, or √model_variance at D@c = ref·c0)
    into out, in order; returns their number."""
    has_v1 = v1.shape[0] > 0
    m = 0
    for i in range(I.shape[0]):
        mu = ref[i] * c0
        if has_v1:
            m_e = mu if (mu >= floor or mu != mu) else floor
            so = np.sqrt(v1[i] * m_e + v0[i])
        else:
            so = s[i]
        x = (I[i] - mu) / so
        if np.isfinite(x):
            out[m] = x
            m += 1
    return m


def _v0_py(I, s, v1, out):
    """out = max(σ² − v1·I, 0) (model_variance's background part)."""
    for i in range(I.shape[0]):
        x = s[i] * s[i] - v1[i] * I[i]
        out[i] = x if (x >= 0.0 or x != x) else 0.0


if HAVE_NUMBA:  # error_model numpy: x/0 is ±inf or NaN, √(−x) NaN, as in numpy
    _jit = numba.njit(nogil=True, cache=True, error_model="numpy")
    _select = _jit(_select_py)
    _middle = _jit(_middle_py)
    _positives = _jit(_positives_py)
    _sigma_resid = _jit(_sigma_resid_py)
    _reweight = _jit(_reweight_py)
    _final_resid = _jit(_final_resid_py)
    _v0 = _jit(_v0_py)
else:  # pragma: no cover - fit_scale and _median use numpy then
    _select, _middle, _positives = _select_py, _middle_py, _positives_py
    _sigma_resid, _reweight, _final_resid, _v0 = _sigma_resid_py, _reweight_py, _final_resid_py, _v0_py


def _median(x: np.ndarray, work: np.ndarray | None = None, centre=None):
    """np.median(x), or with ``centre`` np.median(np.abs(x − centre)), of a 1-D float64
    array, bit for bit (compiled selection; ``work``: scratch, len(x)); other arrays: numpy."""
    x = np.asarray(x)
    if not HAVE_NUMBA or x.dtype != np.float64 or x.ndim != 1 or x.size == 0:
        return np.median(x if centre is None else np.abs(x - centre))
    x = np.ascontiguousarray(x)
    a, b, nan = _middle(x, 0.0 if centre is None else float(centre), centre is not None,
                        np.empty(x.size) if work is None else work)
    if nan:
        return np.float64(np.nan)
    return np.float64(a) if x.size % 2 else np.float64((a + b) / 2.0)
