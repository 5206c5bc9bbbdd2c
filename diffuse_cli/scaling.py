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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

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


def fit_scale(model: ScaleModel, intensity, sigma, reference, d_star_sq,
              n_irls: int = 6, variance_per_intensity=None) -> FitResult:
    """Fit g for one still: I ≈ g(d*²)·I_ref, robust weighted least squares.

    All arrays (N,): observed intensity, its σ, the reference intensity at the
    observation's voxel, and d*² (Å⁻²). Observations with non-finite values or
    σ ≤ 0 must already be removed. With ``variance_per_intensity`` (Poisson
    data, see :func:`diffuse_cli.merging.model_variance`), weights and
    residuals use the variance expected from the current model g·I_ref rather
    than each observation's own σ, which would bias g low by ~1/counts.
    """
    I = np.asarray(intensity, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    n = model.n_control_points
    if I.size < max(10, 5 * n):
        return FitResult(np.full(n, np.nan), int(I.size), np.nan, np.nan, np.nan, False)
    D = model.basis(d_star_sq) * ref[:, None]
    if variance_per_intensity is not None:
        from diffuse_cli.merging import model_variance

        v1 = np.asarray(variance_per_intensity, dtype=np.float64)

        def sigma_of(c):
            return np.sqrt(model_variance(I, s, v1, D @ c if np.any(c) else ref))
    else:
        def sigma_of(c):
            return s
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
    for it in range(2 * n_irls):
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
        elif it < n_irls:
            u = np.abs(r) / (HUBER_K * scale)
            hub = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300))
        else:
            u = r / (TUKEY_C * scale)
            hub = np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0)
    r = (I - D @ c) / s_model
    inl = hub > 0
    rms = float(np.sqrt(np.mean(r[inl] ** 2))) if inl.any() else np.nan
    cc = float(np.corrcoef(I[inl], ref[inl])[0, 1]) if inl.sum() > 2 and np.std(ref[inl]) > 0 else np.nan
    ok = bool(np.all(np.isfinite(c)) and np.all(c > 0))
    return FitResult(c, int(I.size), rms, cc, float(np.mean(~inl)), ok, float(scale))


def normalisation(params: np.ndarray, ok: np.ndarray) -> float:
    """Overall factor: geometric mean over good stills of their mean node value."""
    p = np.asarray(params)[np.asarray(ok, dtype=bool)]
    if p.size == 0:
        return 1.0
    m = p.mean(axis=1)
    m = m[m > 0]
    return float(np.exp(np.mean(np.log(m)))) if m.size else 1.0
