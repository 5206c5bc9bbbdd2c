"""Relative scaling of stills against a merged reference.

Model for the observations of still *i*::

    I_obs ≈ g_i(x) · I_ref(h),   x = d*² / d*²_max  (d* in Å⁻¹, reference cell)

``g_i`` is a constant (``n_control_points = 1``) or a piecewise-linear
function of x through ``n_control_points`` equally spaced nodes on [0, 1]
(a smooth, resolution-dependent term with few parameters). Scaled
observations are ``I_obs / g_i`` with ``σ / g_i``.

The fit is weighted least squares (w = 1/σ²) made robust by iteratively
reweighted least squares on the residuals normalised by a robust (MAD)
scale: Huber weights first (convex, safe start), then Tukey's biweight
(redescending, so gross outliers such as hot pixels get zero weight), with
a small smoothness penalty between neighbouring nodes.

:class:`diffuse_cli.scaling_terms.ScalingTerms` adds, for
``scaling.model=full``, an absorption surface per still, a detector response
per panel and an additive offset per still (formulas, priors and constraints:
docs/merge.md, "Scaling"); :mod:`diffuse_cli.scaling_plots` draws them.
The compiled passes of the constant-scale fit are in :mod:`diffuse_cli.scaling_kernels`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from diffuse_cli.scaling_kernels import (HAVE_NUMBA, _final_resid, _median, _middle, _positives, _reweight,
                                         _sigma_resid, _v0)

logger = logging.getLogger("diffuse.scaling")

HUBER_K = 1.345
TUKEY_C = 4.685
POISSON_OUTLIER_CUT = 6.0  # robust σ, with a Poisson variance model


@dataclass(frozen=True)
class ScaleModel:
    """Piecewise-linear scale in x = d*²/d*²_max with ``n_control_points`` nodes."""

    n_control_points: int = 1
    d_star_sq_max: float = 1.0  # Å⁻²
    smoothness: float = 1e-3

    def basis(self, d_star_sq: np.ndarray) -> np.ndarray:
        """Hat-function basis (N, n_control_points) at d*² (Å⁻²)."""
        n = self.n_control_points
        x = np.asarray(d_star_sq, dtype=np.float64)
        if n == 1:
            return np.ones((x.size, 1))
        t = np.clip(x / self.d_star_sq_max, 0.0, 1.0) * (n - 1)
        j = np.minimum(t.astype(np.int64), n - 2)
        f = t - j
        phi = np.zeros((x.size, n))
        rows = np.arange(x.size)
        phi[rows, j] = 1.0 - f
        phi[rows, j + 1] = f
        return phi

    def evaluate(self, params: np.ndarray, d_star_sq: np.ndarray) -> np.ndarray:
        """g(d*²) for one still's parameters (n_control_points,)."""
        params = np.asarray(params, dtype=np.float64)
        if self.n_control_points == 1:
            return np.full(np.size(d_star_sq), params[0])
        return self.basis(d_star_sq) @ params


@dataclass
class FitResult:
    params: np.ndarray  # (n_control_points,)
    n_obs: int
    rms_normalised_residual: float  # robust-weighted rms of (I − gI_ref)/σ
    cc: float  # Pearson CC of I_obs with I_ref
    outlier_fraction: float  # fraction with zero (biweight) weight
    ok: bool
    residual_scale: float = np.nan  # robust (MAD) scale of (I − gI_ref)/σ
    absorption: np.ndarray | None = None  # (n_a,) absorption nodes (ScalingTerms)
    offset: np.ndarray | None = None  # (n_c,) offset nodes, merged-map units (ScalingTerms)


def fit_scale(model: ScaleModel, intensity, sigma, reference, d_star_sq,
              n_irls: int = 6, variance_per_intensity=None, reference_variance=None,
              redescending: bool = True) -> FitResult:
    """Fit g for one still: I ≈ g(d*²)·I_ref, robust weighted least squares.

    All arrays (N,): observed intensity, its σ, the reference intensity at the
    observation's voxel, and d*² (Å⁻²). Observations with non-finite values or
    σ ≤ 0 must already be removed. With ``variance_per_intensity`` (Poisson
    data, see :func:`model_variance`), weights and
    residuals use the variance expected from the current model g·I_ref rather
    than each observation's own σ, which would bias g low by ~1/counts.
    ``reference_variance`` (N,): variance of I_ref (a leave-one-out
    reference, :func:`leave_one_out`); the residual variance is then
    σ² + g²·var(I_ref), so that voxels the other stills barely measured weigh little.
    With ``n_control_points = 1``, ``d_star_sq`` is not used (None is allowed); the fit
    then runs as compiled passes over the observations (with numba; the same
    arithmetic as :func:`_fit_scale_numpy`, bit for bit).
    ``redescending=False``: Huber weights only, no Tukey phase (merging's first phase, while
    the scales are not yet determined: docs/merge.md, "Outlier rejection"); with a variance
    model the gross-outlier cut stays (without it one-sided outliers bias g at low counts).
    """
    if model.n_control_points == 1 and HAVE_NUMBA and n_irls > 0:
        return _fit_scale_constant(model, intensity, sigma, reference, n_irls, variance_per_intensity,
                                   reference_variance, redescending)
    if d_star_sq is None:
        if model.n_control_points > 1:
            raise ValueError("fit_scale: d_star_sq is needed with n_control_points > 1")
        d_star_sq = np.zeros(np.size(intensity))
    return _fit_scale_numpy(model, intensity, sigma, reference, d_star_sq, n_irls, variance_per_intensity,
                            reference_variance, redescending)


def _fit_scale_numpy(model: ScaleModel, intensity, sigma, reference, d_star_sq,
                     n_irls: int = 6, variance_per_intensity=None, reference_variance=None,
                     redescending: bool = True) -> FitResult:
    """:func:`fit_scale` in numpy, for any number of control points."""
    I = np.asarray(intensity, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    n = model.n_control_points
    if I.size < max(10, 5 * n):
        return FitResult(np.full(n, np.nan), int(I.size), np.nan, np.nan, np.nan, False)
    G = model.basis(d_star_sq)
    D = G * ref[:, None]
    v_ref = None if reference_variance is None else np.asarray(reference_variance, dtype=np.float64)

    def ref_part(c):  # g²·var(I_ref)
        if v_ref is None:
            return 0.0
        gc = G @ c if np.any(c) else 1.0
        return gc * gc * v_ref

    if variance_per_intensity is not None:
        v1 = np.asarray(variance_per_intensity, dtype=np.float64)

        def sigma_of(c):
            return np.sqrt(model_variance(I, s, v1, D @ c if np.any(c) else ref) + ref_part(c))
    else:
        def sigma_of(c):
            return np.sqrt(s * s + ref_part(c)) if v_ref is not None else s
    s_model = sigma_of(np.zeros(n))
    w0 = 1.0 / (s_model * s_model)
    hub = np.ones_like(I)
    # smoothness penalty: differences of neighbouring nodes, relative scale
    P = np.zeros((n, n))
    if n > 1:
        Dm = np.diff(np.eye(n), axis=0)
        P = Dm.T @ Dm
    c = np.zeros(n)
    scale = 1.0
    it = 0
    while it < 2 * n_irls:
        c_prev, hub_prev = c, hub
        w = w0 * hub
        N = (D * w[:, None]).T @ D
        b = (D * w[:, None]).T @ I
        lam = model.smoothness * np.trace(N) / n
        try:
            c = np.linalg.solve(N + lam * P, b)
        except np.linalg.LinAlgError:
            return FitResult(np.full(n, np.nan), int(I.size), np.nan, np.nan, np.nan, False)
        s_model = sigma_of(c)
        w0 = 1.0 / (s_model * s_model)
        r = (I - D @ c) / s_model
        mad = 1.4826 * np.median(np.abs(r - np.median(r)))
        scale = mad if mad > 0 else (np.std(r) or 1.0)
        if variance_per_intensity is not None:
            # Poisson residuals at a few counts are skewed: Huber/Tukey weights
            # would cut the high tail more than the low one and bias g low.
            # Only gross outliers are removed.
            hub = (np.abs(r) <= POISSON_OUTLIER_CUT * scale).astype(np.float64)
        elif it < n_irls or not redescending:
            u = np.abs(r) / (HUBER_K * scale)
            hub = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300))
        else:
            u = r / (TUKEY_C * scale)
            hub = np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0)
        it += 1
        # a fixed point of this phase (same weights, g within 1e-12): its remaining
        # iterations would repeat it, so go on with the next phase (Tukey) or stop
        if it > 1 and np.all(np.abs(c - c_prev) <= 1e-12 * np.abs(c)) and np.array_equal(hub, hub_prev):
            if variance_per_intensity is None and it <= n_irls:
                it = n_irls
            else:
                break
    r = (I - D @ c) / s_model
    inl = hub > 0
    rms = float(np.sqrt(np.mean(r[inl] ** 2))) if inl.any() else np.nan
    cc = float(np.corrcoef(I[inl], ref[inl])[0, 1]) if inl.sum() > 2 and np.std(ref[inl]) > 0 else np.nan
    ok = bool(np.all(np.isfinite(c)) and np.all(c > 0))
    if v_ref is not None:  # the outlier limit's scale, in the units merging tests residuals in
        s_obs = s if variance_per_intensity is None else np.sqrt(model_variance(I, s, v1, D @ c))
        scale = _robust_scale((I - D @ c) / s_obs, scale)
    return FitResult(c, int(I.size), rms, cc, float(np.mean(~inl)), ok, float(scale))


def _robust_scale(r: np.ndarray, fallback: float) -> float:
    """MAD scale (×1.4826) of normalised residuals r, ``fallback`` if it is not positive.

    With a leave-one-out reference the fits normalise residuals by √(σ² + m²·var I_ref);
    merging's outlier test (``reject_sigma`` × this scale) divides by σ alone, so the
    scale it gets is of (I − E[I])/σ: otherwise the limit would tighten wherever the
    reference is noisy and strong, consistent pixels would be dropped.
    """
    r = r[np.isfinite(r)]
    if not r.size:
        return fallback
    mad = 1.4826 * float(_median(r, centre=_median(r)))  # np.median(np.abs(r − np.median(r)))
    return mad if mad > 0 else fallback


_EMPTY = np.empty(0)

#: float64 work arrays of the compiled fits, reused between fits (a fit's fresh arrays
#: cost as much in page faults as its passes); merge_prepared shares the dict and
#: merging clears it after a merge.
_SCRATCH: dict = {}


def _work(name: str, n: int) -> np.ndarray:
    """A float64 scratch array of length n (per thread), reused between calls."""
    key = (name, threading.get_ident())
    buf = _SCRATCH.get(key)
    if buf is None or buf.size < n:
        buf = _SCRATCH[key] = np.empty(max(n, 1))
    return buf[:n]


def _fit_scale_constant(model: ScaleModel, intensity, sigma, reference, n_irls, variance_per_intensity,
                        reference_variance, redescending=True) -> FitResult:
    """:func:`fit_scale` for a constant scale (n_control_points = 1) by compiled passes
    (_sigma_resid, _reweight, ...): the operations of :func:`_fit_scale_numpy` in the same
    order, without its temporaries. model_variance's floor (1e-3 × the median of the positive
    c·I_ref) comes from the two middle positive I_ref, found once: for c > 0, c·x rounds
    monotonically in x, so the order statistics of the products are the products of the
    order statistics."""
    I = np.ascontiguousarray(intensity, dtype=np.float64)
    s = np.ascontiguousarray(sigma, dtype=np.float64)
    ref = np.ascontiguousarray(reference, dtype=np.float64)
    n = 1
    N = I.size
    if N < max(10, 5 * n):
        return FitResult(np.full(n, np.nan), int(N), np.nan, np.nan, np.nan, False)
    # D = G·I_ref with G = 1: I_ref itself, (N, 1) C-ordered as in _fit_scale_numpy (the same BLAS calls)
    D = _work("fit_D", N).reshape(N, 1)
    D[:, 0] = ref
    has_v1 = variance_per_intensity is not None
    v1 = np.ascontiguousarray(variance_per_intensity, dtype=np.float64) if has_v1 else _EMPTY
    v_ref = _EMPTY if reference_variance is None else np.ascontiguousarray(reference_variance, dtype=np.float64)
    w0, r, work, dev = (_work(k, N) for k in ("fit_w0", "fit_r", "fit_work", "fit_dev"))
    v0 = _EMPTY
    if has_v1:
        v0 = _work("fit_v0", N)
        _v0(I, s, v1, v0)
        n_pos = _positives(ref, 1.0, work)
        if n_pos:
            lo, hi, _ = _middle(work[:n_pos], 0.0, False, r)
            least = float(work[:n_pos].min())

    def floor_of(g):  # model_variance's floor for the expected intensity g·I_ref
        if g > 0 and (n_pos == 0 or g * least > 0):
            if n_pos == 0:
                return 1e-12
            a = g * lo
            return 1e-3 * float(a if n_pos % 2 else (a + g * hi) / 2.0)
        m = _positives(ref, g, work)
        if m == 0:
            return 1e-12
        a, b, _ = _middle(work[:m], 0.0, False, dev)
        return 1e-3 * float(a if m % 2 else (a + b) / 2.0)

    _sigma_resid(I, s, v0, v1, ref, v_ref, 0.0, floor_of(1.0) if has_v1 else 0.0, w0, r)
    hub = _work("fit_hub", N)
    hub.fill(1.0)
    P = np.zeros((n, n))
    c = np.zeros(n)
    scale = 1.0
    it = 0
    Dw = _work("fit_Dw", N).reshape(N, 1)
    np.multiply(D[:, 0], w0 * hub, out=Dw[:, 0])  # D·w, w = w0·hub
    while it < 2 * n_irls:
        c_prev = c
        N_ = Dw.T @ D
        b = Dw.T @ I
        lam = model.smoothness * np.trace(N_) / n
        try:
            c = np.linalg.solve(N_ + lam * P, b)
        except np.linalg.LinAlgError:
            return FitResult(np.full(n, np.nan), int(N), np.nan, np.nan, np.nan, False)
        c0 = float(c[0])
        floor = floor_of(c0 if c0 != 0.0 else 1.0) if has_v1 else 0.0  # D@c if any(c) else I_ref
        _sigma_resid(I, s, v0, v1, ref, v_ref, c0, floor, w0, r)
        mad = 1.4826 * _median(r, work, centre=_median(r, work))
        scale = mad if mad > 0 else (np.std(r) or 1.0)
        if has_v1:  # as _fit_scale_numpy: gross outliers only
            mode, t = 0, POISSON_OUTLIER_CUT * scale
        elif it < n_irls or not redescending:
            mode, t = 1, HUBER_K * scale
        else:
            mode, t = 2, TUKEY_C * scale
        changed = _reweight(r, w0, ref, mode, t, hub, Dw)
        it += 1
        if it > 1 and np.all(np.abs(c - c_prev) <= 1e-12 * np.abs(c)) and not changed:
            if not has_v1 and it <= n_irls:
                it = n_irls
            else:
                break
    # r: (I − D@c)/s_model of the final c, from its last iteration (n_irls > 0)
    inl = hub > 0
    n_in = int(np.count_nonzero(inl))
    if n_in == N:  # no outlier: the arrays themselves, not copies
        r_in, I_in, ref_in = r, I, ref
    else:
        r_in, I_in, ref_in = (np.compress(inl, a, out=_work(k, n_in)) for a, k in
                              ((r, "fit_r_in"), (I, "fit_I_in"), (ref, "fit_ref_in")))
    rms = float(np.sqrt(np.mean(np.square(r_in, out=dev[:n_in])))) if n_in else np.nan
    cc = float(np.corrcoef(I_in, ref_in)[0, 1]) if n_in > 2 and np.std(ref_in) > 0 else np.nan
    ok = bool(np.all(np.isfinite(c)) and np.all(c > 0))
    if reference_variance is not None:
        c0 = float(c[0])
        m = _final_resid(I, s, v0, v1, ref, c0, floor_of(c0) if has_v1 else 0.0, work)
        if m:  # _robust_scale of the finite values
            x = work[:m]
            mad = 1.4826 * float(_median(x, dev, centre=_median(x, dev)))
            scale = mad if mad > 0 else scale
    return FitResult(c, int(N), rms, cc, float(np.mean(~inl)), ok, float(scale))


def normalisation(params: np.ndarray, ok: np.ndarray) -> float:
    """Overall factor: geometric mean over good stills of their mean node value."""
    p = np.asarray(params)[np.asarray(ok, dtype=bool)]
    if p.size == 0:
        return 1.0
    m = p.mean(axis=1)
    m = m[m > 0]
    return float(np.exp(np.mean(np.log(m)))) if m.size else 1.0


def model_variance(intensity, sigma, variance_per_intensity, expected):
    """Poisson variance of corrected intensities from their EXPECTED value.

    Weights from each observation's own counts (σ² ∝ counts) favour the
    pixels that fluctuated low and bias weighted means (and scales) low by
    about 1/counts; pixels with zero counts get infinite weight. The model
    variance is ``v1·E[I] + v0``, where ``v1`` (``variance_per_intensity``)
    is the variance added per unit corrected intensity and ``v0 = σ² − v1·I``
    the part from background subtraction, which does not depend on the counts.
    ``expected`` is floored at 1e-3 of its median so that no weight is infinite.
    """
    v1 = np.asarray(variance_per_intensity, dtype=np.float64)
    v0 = np.maximum(np.asarray(sigma, dtype=np.float64) ** 2 - v1 * intensity, 0.0)
    e = np.asarray(expected, dtype=np.float64)
    pos = e[e > 0]
    floor = 1e-3 * float(_median(pos)) if pos.size else 1e-12  # _median: np.median bit for bit
    return v1 * np.maximum(e, floor) + v0


def relax(fit: FitResult, g_prev, a_prev=None, c_prev=None, own_share: float = 0.0) -> FitResult:
    """Damped update of a still's terms after a leave-one-out fit (in place): θ = s·θ_prev + (1 − s)·θ_fit.

    Fitting every still against the others (:func:`leave_one_out`) is a Jacobi
    iteration on the joint least-squares problem (the map eliminated); its
    fixed point is the joint solution, but with n stills of similar overlap
    the error of each pass is about −1/(n − 1) times the last (with two
    stills it flips sign forever). Keeping a share s = 1/n of the previous
    value cancels that: s·1 + (1 − s)·(−1/(n − 1)) = 0. Multiplicative terms
    (g, absorption nodes) mix in log, the offset linearly; the fixed point
    is unchanged.
    """
    s = float(own_share)
    if s <= 0 or not fit.ok:
        return fit
    fit.params = np.exp(s * np.log(np.asarray(g_prev, dtype=np.float64)) + (1 - s) * np.log(fit.params))
    if fit.absorption is not None and a_prev is not None and np.size(a_prev):
        fit.absorption = np.exp(s * np.log(np.maximum(a_prev, 1e-6)) + (1 - s) * np.log(fit.absorption))
    if fit.offset is not None and c_prev is not None and np.size(c_prev):
        fit.offset = s * np.asarray(c_prev, dtype=np.float64) + (1 - s) * fit.offset
    return fit


LOO_MIN_SHARE = 0.01  # least share of a voxel's weight from the other stills (leave_one_out)


def leave_one_out(reference, grid, hkl, intensity, sigma, multiplier, offset=0.0,
                  variance_per_intensity=None, select=None, reject_limit=None, min_counts: int = 2):
    """The reference at a still's observations without that still's own contribution.

    The reference map R_h = Σw·v/Σw holds still i's own observations, scaled
    with its previous multiplier m (v = I/m − c, weight w = m²/σ², or m²/var
    with a variance model: the accumulator's weights). Fitted against R, a
    still's scale is pulled toward its previous value by its own share of
    each voxel's weight, and, when one still holds most of a voxel (few
    stills, a fine grid), the passes converge slowly (each moves only the
    others' share of the way) and the scale absorbs the still's own noise.
    With W_h = 1/σ_h² (the map's σ) and the still's sums W_i, S_i = Σw·v over
    its observations in voxel h::

        R_{-i}(h) = (R_h·W_h − S_i(h)) / (W_h − W_i(h)),   var R_{-i}(h) = 1/(W_h − W_i(h)).

    Observations rejected as outliers in the previous pass (|v − R|·√w >
    ``reject_limit``) had no weight and are not removed. ``hkl``, ``intensity``,
    ``sigma``, ``multiplier`` (scalar or (N,)), ``offset`` (merged-map units)
    and ``variance_per_intensity`` cover ALL the still's observations;
    ``select``: indices of the observations to return (default all).
    Returns (R_{-i}, var R_{-i}, usable): usable where the other stills put at
    least ``min_counts`` observations and a share LOO_MIN_SHARE of the weight
    in the voxel (below it the recomputed own weight's error would dominate).
    """
    from diffuse_cli.merge_accumulator import voxel_flat

    flat, inside = voxel_flat(grid, hkl)
    rep = np.full(len(flat), -1, dtype=np.int64)
    rep[inside] = reference.lut[flat[inside]]
    sel = np.arange(len(rep)) if select is None else np.asarray(select)
    return leave_one_out_voxels(reference.I, reference.sigma, reference.counts, rep, intensity, sigma,
                                multiplier, offset, variance_per_intensity, rep[sel], reject_limit, min_counts)


def leave_one_out_voxels(ref_I, ref_sigma, ref_counts, voxel, intensity, sigma, multiplier, offset=0.0,
                         variance_per_intensity=None, voxel_select=None, reject_limit=None,
                         min_counts: int = 2):
    """:func:`leave_one_out` on voxel indices: ``voxel`` (N,) index into the reference arrays
    (I, σ, counts) of each of the still's observations (−1: not merged); ``voxel_select``:
    those of the observations to return (default ``voxel``)."""
    I = np.asarray(intensity, dtype=np.float64)
    n = I.size
    sig = np.asarray(sigma, dtype=np.float64)
    m = np.broadcast_to(np.asarray(multiplier, dtype=np.float64), (n,))
    c = np.broadcast_to(np.asarray(offset, dtype=np.float64), (n,))
    rep = np.asarray(voxel, dtype=np.int64)
    have = rep >= 0
    R = np.full(n, np.nan)
    R[have] = ref_I[rep[have]]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = I / m - c
        if variance_per_intensity is None:
            var = np.where(sig > 0, sig * sig, np.nan)
        else:
            v1 = np.asarray(variance_per_intensity, dtype=np.float64)
            var = np.where((sig >= 0) & (v1 > 0), model_variance(I, sig, v1, m * (np.nan_to_num(R) + c)), np.nan)
        w = m * m / var
    use = have & np.isfinite(value) & np.isfinite(w) & (w > 0)
    if reject_limit:
        with np.errstate(invalid="ignore"):
            use &= ~(np.abs(value - R) * np.sqrt(w) > reject_limit)  # NaN R: kept
    vox, inv = np.unique(rep[use], return_inverse=True)
    W_own = np.bincount(inv, w[use], minlength=vox.size)
    S_own = np.bincount(inv, w[use] * value[use], minlength=vox.size)
    n_own = np.bincount(inv, minlength=vox.size)
    r = rep if voxel_select is None else np.asarray(voxel_select, dtype=np.int64)
    if vox.size:
        pos = np.minimum(np.searchsorted(vox, r), vox.size - 1)
        found = (r >= 0) & (vox[pos] == r)
    else:
        pos, found = np.zeros(r.size, dtype=np.int64), np.zeros(r.size, dtype=bool)
    rr = np.where(r >= 0, r, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        W = 1.0 / np.asarray(ref_sigma, dtype=np.float64)[rr] ** 2
        W_other = W - np.where(found, W_own[pos], 0.0)
        n_other = np.asarray(ref_counts)[rr] - np.where(found, n_own[pos], 0)
        ref = (np.asarray(ref_I, dtype=np.float64)[rr] * W - np.where(found, S_own[pos], 0.0)) / W_other
        usable = ((r >= 0) & (n_other >= min_counts) & (W_other > LOO_MIN_SHARE * W)
                  & np.isfinite(ref) & np.isfinite(W))
        ref_var = np.where(usable, 1.0 / W_other, np.nan)
    return np.where(usable, ref, np.nan), ref_var, usable
