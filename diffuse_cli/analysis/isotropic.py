"""The isotropic component I_iso(|q|) of a map on the hkl grid, and the anisotropic map I − I_iso.

|q| = s = 1/d (Å⁻¹, no 2π) of a voxel at fractional hkl h is ``|B·h|`` with B
the cctbx/DIALS B matrix (``fractionalization_matrix().transpose()``), i.e.
s² = hᵀ G* h with the reciprocal metric G* = BᵀB.

Shells: equal widths Δs from 0. I_iso of shell c is the weighted mean over
the measured voxels i in it (voxels with finite I and σ > 0):

    I_c = Σ w_i I_i / W_c,   σ_c² = Σ w_i² σ_i² / W_c²,   W_c = Σ w_i,

with w_i = 1 by default (``weights="volume"``: the spherical average, as
Lunus's anisolt takes it) or w_i = 1/σ_i² (``"inverse_variance"``, then
σ_c² = 1/W_c). Inverse-variance weights are biased low when σ grows with I
(Poisson counts: σ² ∝ I, so the weaker voxels of a shell weigh more) and
they weight the anisotropy itself, which is signal, not noise; hence the
default. The shell value is placed at the weighted mean s̄_c of its voxels. The map I_iso(s) is the
linear interpolation between neighbouring s̄_c (constant beyond the first and
last measured shell), I_iso(s) = (1 − t) I_a + t I_b, with
σ_iso²(s) = (1 − t)² σ_a² + t² σ_b².

Anisotropic map ΔI_i = I_i − I_iso(s_i). Its variance counts that voxel i is
itself part of its own shell's mean (cov(I_i, I_c) = w_i σ_i²/W_c, which is
σ_c² for inverse-variance weights):

    σ_Δ² = σ_i² + σ_iso²(s_i) − 2 λ_i w_i σ_i² / W_c,

with λ_i the interpolation coefficient of the voxel's own shell c (1 − t or
t, 0 if c is not an end of the bracket). For a purely isotropic map
ΔI/σ_Δ is then standard normal (tests/test_analysis_anisotropic.py).
"""

from __future__ import annotations

import numpy as np


def reciprocal_metric(unit_cell) -> np.ndarray:
    """G* = BᵀB (Å⁻²) so that s² = hᵀ G* h, B = fractionalization_matrix()ᵀ (cctbx)."""
    from cctbx import uctbx

    B = np.array(uctbx.unit_cell(tuple(float(x) for x in unit_cell)).fractionalization_matrix(),
                 dtype=np.float64).reshape(3, 3).T
    return B.T @ B


def s_map(h, k, l, unit_cell) -> np.ndarray:
    """|q| = 1/d (Å⁻¹) of every voxel of the dense grid on axes h, k, l (float64, shape (nh, nk, nl))."""
    G = reciprocal_metric(unit_cell)
    H = np.asarray(h, dtype=np.float64)[:, None, None]
    K = np.asarray(k, dtype=np.float64)[None, :, None]
    L = np.asarray(l, dtype=np.float64)[None, None, :]
    s2 = G[0, 0] * H * H + G[1, 1] * K * K
    s2 = s2 + 2.0 * G[0, 1] * H * K          # (nh, nk, 1): cheap before broadcasting to 3D
    s2 = s2 + G[2, 2] * L * L + 2.0 * (G[0, 2] * H + G[1, 2] * K) * L
    return np.sqrt(np.maximum(s2, 0.0))


def default_shell_width(h, k, l, unit_cell) -> float:
    """The smallest voxel step along a*, b*, c* (Å⁻¹): fine shells about one voxel wide."""
    G = reciprocal_metric(unit_cell)
    steps = [abs(float(a[1] - a[0])) if len(a) > 1 else 1.0 for a in (h, k, l)]
    return float(min(np.sqrt(G[i, i]) * steps[i] for i in range(3)))


WEIGHTS = ("volume", "inverse_variance")


def isotropic_component(I, sigma, h, k, l, unit_cell, n_shells=None, shell_width=None, s=None,
                        weights="volume") -> dict:
    """I_iso(|q|) in shells with σ, and I_iso/σ_iso interpolated onto every voxel (see module doc).

    I, sigma: dense maps [h, k, l] (NaN where unmeasured); h, k, l: axes
    (fractional Miller indices); unit_cell: (a, b, c Å, α, β, γ °).
    n_shells: number of equal shells from 0 to the largest measured s; else
    shell_width (Å⁻¹); default: one voxel step (default_shell_width).
    s: s_map(h, k, l, unit_cell) if already at hand (saves its time on large maps).
    weights: ``volume`` (w = 1, default) or ``inverse_variance`` (w = 1/σ²); module doc.

    Returns s_edges (n+1,), s_centres (n,), s_mean (n,, weighted mean s of
    each shell, NaN if empty), I_iso, sigma_iso, n_voxels (n,), chi2 (n,,
    Σ (I − I_c)²/σ² / (n − 1) per shell), and the maps I_iso_map,
    sigma_iso_map (float32, shape of I, NaN where I is NaN), all in I's units;
    cov_own_map: λ_i w_i σ_i²/W_c, each voxel's covariance with I_iso at its own |q|.
    """
    I = np.asarray(I)
    sigma = np.asarray(sigma)
    if I.shape != sigma.shape or I.shape != (len(h), len(k), len(l)):
        raise ValueError(f"I {I.shape}, sigma {sigma.shape} and axes {(len(h), len(k), len(l))} disagree")
    finite = np.isfinite(I).ravel()
    fidx = np.flatnonzero(finite)                   # work on the measured voxels only
    s = (s_map(h, k, l, unit_cell) if s is None else np.asarray(s)).ravel()[fidx]
    Iv = I.ravel()[fidx].astype(np.float64)
    sv = sigma.ravel()[fidx].astype(np.float64)
    used = np.isfinite(sv) & (sv > 0)
    if not used.any():
        raise ValueError("no voxel with finite I and σ > 0")
    s_max = float(s[used].max())
    if n_shells is not None:
        n = int(n_shells)
        if n < 1:
            raise ValueError("n_shells must be >= 1")
        width = s_max / n * (1 + 1e-9) if s_max > 0 else 1.0
    else:
        width = float(shell_width) if shell_width else default_shell_width(h, k, l, unit_cell)
        if width <= 0:
            raise ValueError("shell_width must be > 0")
        n = int(np.floor(s_max / width)) + 1
    edges = np.arange(n + 1, dtype=np.float64) * width
    shell = np.minimum((s / width).astype(np.int64), n - 1)       # shell of every measured voxel
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, not {weights!r}")
    su, Iu = shell[used], Iv[used]
    var_u = sv[used] * sv[used]
    wu = 1.0 / var_u if weights == "inverse_variance" else np.ones_like(var_u)
    W = np.bincount(su, weights=wu, minlength=n)
    sum_w2var = np.bincount(su, weights=wu * wu * var_u, minlength=n)
    sum_wI = np.bincount(su, weights=wu * Iu, minlength=n)
    sum_ws = np.bincount(su, weights=wu * s[used], minlength=n)
    count = np.bincount(su, minlength=n)
    ok = W > 0
    I_c = np.full(n, np.nan)
    sig_c = np.full(n, np.nan)
    s_mean = np.full(n, np.nan)
    I_c[ok] = sum_wI[ok] / W[ok]
    sig_c[ok] = np.sqrt(sum_w2var[ok]) / W[ok]
    s_mean[ok] = sum_ws[ok] / W[ok]
    chi2 = np.full(n, np.nan)
    many = count > 1
    resid2 = np.bincount(su, weights=(Iu - np.where(ok, I_c, 0.0)[su]) ** 2 / var_u, minlength=n)
    chi2[many] = resid2[many] / (count[many] - 1)

    I_map, var_map, lam = _interpolate(s, shell, s_mean, I_c, sig_c)
    # λ_i w_i σ_i²/W_c of the module doc: voxel i's covariance with its own shell's mean (0 if not used)
    w_all = np.zeros_like(sv)
    w_all[used] = wu * var_u
    W_own = np.where(W[shell] > 0, W[shell], np.inf)
    cov_own = np.where(used, lam * w_all / W_own, 0.0)

    def full(values):
        out = np.full(I.size, np.nan, dtype=np.float32)
        out[fidx] = values
        return out.reshape(I.shape)

    return {
        "s_edges": edges, "s_centres": 0.5 * (edges[:-1] + edges[1:]), "s_mean": s_mean,
        "I_iso": I_c, "sigma_iso": sig_c, "n_voxels": count, "chi2": chi2,
        "I_iso_map": full(I_map), "sigma_iso_map": full(np.sqrt(var_map)),
        "cov_own_map": full(cov_own),
    }


def _interpolate(s, shell, s_mean, I_c, sig_c):
    """Linear interpolation of shell values at s; variance; coefficient of each voxel's own shell."""
    good = np.flatnonzero(np.isfinite(I_c))
    xs = s_mean[good]
    if good.size == 1:
        zero = np.zeros_like(s)
        return np.full_like(s, I_c[good[0]]), np.full_like(s, sig_c[good[0]] ** 2), \
            np.where(shell == good[0], 1.0, zero)
    # bracket [j, j+1] in the list of measured shells; clamp outside
    j = np.clip(np.searchsorted(xs, s, side="right") - 1, 0, good.size - 2)
    t = np.clip((s - xs[j]) / (xs[j + 1] - xs[j]), 0.0, 1.0)
    a, b = good[j], good[j + 1]
    I_map = (1.0 - t) * I_c[a] + t * I_c[b]
    var_map = (1.0 - t) ** 2 * sig_c[a] ** 2 + t ** 2 * sig_c[b] ** 2
    lam = np.where(shell == a, 1.0 - t, 0.0) + np.where(shell == b, t, 0.0)
    return I_map, var_map, lam


def anisotropic_map(I, sigma, h, k, l, unit_cell, n_shells=None, shell_width=None, iso=None, s=None,
                    weights="volume") -> dict:
    """The anisotropic map ΔI = I − I_iso(|q|) with propagated σ_Δ (module doc), plus the isotropic dict.

    iso: a result of isotropic_component to reuse (else computed here); s: as there.
    Returns the isotropic_component dict with I_aniso and sigma_aniso
    (float32, shape of I, NaN where I or σ is not finite) added.
    """
    if iso is None:
        iso = isotropic_component(I, sigma, h, k, l, unit_cell, n_shells=n_shells, shell_width=shell_width, s=s,
                                  weights=weights)
    sigma = np.asarray(sigma, dtype=np.float32)
    var = (sigma.astype(np.float64) ** 2 + iso["sigma_iso_map"].astype(np.float64) ** 2
           - 2.0 * iso["cov_own_map"])
    var = np.maximum(var, 0.0)
    out = dict(iso)
    out["I_aniso"] = np.asarray(I, dtype=np.float32) - iso["I_iso_map"]
    sig = np.sqrt(var)
    sig[~np.isfinite(sigma)] = np.nan
    out["sigma_aniso"] = sig.astype(np.float32)
    return out

