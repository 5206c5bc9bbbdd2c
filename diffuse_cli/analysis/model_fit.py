"""Fit LLM / RBT model maps to the anisotropic part of a merged map (diffuse.model).

Target (as Lunus ``refine_llm.py``): maximise the anisotropic correlation
coefficient CC(ΔI, ΔM) over the fit voxels, ΔI = I − I_iso(|q|) of the data
and ΔM = M − M_iso of the model, both split by
:func:`diffuse_cli.analysis.isotropic.isotropic_component` on the same voxels
with equal (or the data's 1/σ²) weights. CC is blind to the model's scale, which then
follows by weighted least squares: scale = Σ w ΔI ΔM / Σ w ΔM² (w = 1/σ_Δ²).

Search: γ (LLM) by a scan of ``n_scan`` log-spaced values followed by bounded
Brent in ln γ between the neighbours of the best; for each γ, σ by bounded
Brent in ln σ (σ is cheap: the convolved terms J_n depend on γ only).

Errors: from the Jacobian of the weighted residuals r = (ΔI − scale ΔM)/σ_Δ
at the optimum (central differences in σ and γ, scale analytic):
cov = (JᵀJ)⁻¹ · max(1, χ²_ν) — the least-squares curvature, inflated when
the model does not fit within the errors.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from diffuse_cli.analysis.isotropic import anisotropic_map, isotropic_component


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation coefficient (NaN for fewer than 3 values or no spread)."""
    if a.size < 3:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


class AnisotropicTarget:
    """The data's anisotropic map on the fit voxels and the same split applied to model maps.

    weights: ``equal`` (plain shell means, as Lunus anisolt; not biased when σ
    grows with I) or ``inverse_variance`` (1/σ², the data's σ). Data and
    model always go through the same split. σ_Δ of the residual weights is
    the data's propagated σ of I − I_iso.
    """

    def __init__(self, I, sigma, axes, unit_cell, fit_mask, shell_width=None, weights="equal"):
        self.axes = axes
        self.unit_cell = unit_cell
        self.mask = fit_mask
        self.shell_width = shell_width
        data_sigma = np.where(fit_mask, sigma, np.nan).astype(np.float64)
        self.weights = "inverse_variance" if weights == "inverse_variance" else "volume"
        self.sigma = data_sigma
        data = np.where(fit_mask, I, np.nan).astype(np.float64)
        aniso = anisotropic_map(data, data_sigma, *axes, unit_cell, shell_width=shell_width,
                                weights=self.weights)
        sig = aniso["sigma_aniso"]
        self.iso = aniso
        self.data_aniso_map = aniso["I_aniso"]
        self.delta = aniso["I_aniso"][fit_mask].astype(np.float64)
        sig = sig[fit_mask].astype(np.float64)
        self.weight = np.where(sig > 0, 1.0 / np.maximum(sig, 1e-300) ** 2, 0.0)
        self.sigma_delta = sig

    def model_delta(self, model: np.ndarray) -> np.ndarray:
        """ΔM on the fit voxels (model − its isotropic component on the same voxels and weights)."""
        m = np.where(self.mask, model, np.nan)
        iso = isotropic_component(m, self.sigma, *self.axes, self.unit_cell, shell_width=self.shell_width,
                                  weights=self.weights)
        return (m - iso["I_iso_map"])[self.mask].astype(np.float64)

    def cc(self, delta_model: np.ndarray) -> float:
        return pearson(self.delta, delta_model)

    def scale(self, delta_model: np.ndarray) -> float:
        den = float(np.sum(self.weight * delta_model * delta_model))
        return float(np.sum(self.weight * self.delta * delta_model)) / den if den > 0 else float("nan")

    def residuals(self, delta_model: np.ndarray, scale: float) -> np.ndarray:
        return (self.delta - scale * delta_model) * np.sqrt(self.weight)


def _brent(f, lo: float, hi: float, xatol: float):
    res = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": xatol})
    return float(res.x), float(res.fun)


def fit_model(target: AnisotropicTarget, model_of, has_gamma: bool, sigma_range, gamma_range,
              n_scan: int = 6, xatol: float = 5e-3) -> dict:
    """Maximise CC(ΔI, ΔM(σ[, γ])); model_of(σ, γ) returns the model map. Returns the fit dict."""
    evaluations = [0]

    def neg_cc(sigma, gamma):
        evaluations[0] += 1
        cc = target.cc(target.model_delta(model_of(sigma, gamma)))
        return -cc if np.isfinite(cc) else 1.0

    def best_sigma(gamma):
        ls, f = _brent(lambda u: neg_cc(math.exp(u), gamma), math.log(sigma_range[0]), math.log(sigma_range[1]), xatol)
        return math.exp(ls), f

    if has_gamma:
        grid = np.linspace(math.log(gamma_range[0]), math.log(gamma_range[1]), n_scan)
        scan = [best_sigma(math.exp(g))[1] for g in grid]
        i = int(np.argmin(scan))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n_scan - 1)]
        lg, _ = _brent(lambda u: best_sigma(math.exp(u))[1], lo, hi, xatol)
        gamma = math.exp(lg)
    else:
        gamma = float("nan")
    sigma, f = best_sigma(gamma)
    delta_model = target.model_delta(model_of(sigma, gamma))
    scale = target.scale(delta_model)
    errors = _errors(target, model_of, sigma, gamma, scale, delta_model, has_gamma)
    return {"sigma": sigma, "gamma": gamma, "scale": scale, "cc_aniso": target.cc(delta_model),
            "evaluations": evaluations[0], "delta_model": delta_model,
            "sigma_at_bound": bool(min(abs(math.log(sigma / b)) for b in sigma_range) < 5 * xatol),
            "gamma_at_bound": bool(has_gamma and min(abs(math.log(gamma / b)) for b in gamma_range) < 5 * xatol),
            **errors}


def _errors(target, model_of, sigma, gamma, scale, delta_model, has_gamma, rel_step=1e-3) -> dict:
    """σ errors from the Jacobian of the weighted residuals (module doc)."""
    r0 = target.residuals(delta_model, scale)
    cols = []
    names = ["sigma"] + (["gamma"] if has_gamma else [])
    for name in names:
        h = rel_step * (sigma if name == "sigma" else gamma)
        plus = (sigma + h, gamma) if name == "sigma" else (sigma, gamma + h)
        minus = (sigma - h, gamma) if name == "sigma" else (sigma, gamma - h)
        rp = target.residuals(target.model_delta(model_of(*plus)), scale)
        rm = target.residuals(target.model_delta(model_of(*minus)), scale)
        cols.append((rp - rm) / (2 * h))
    cols.append(-delta_model * np.sqrt(target.weight))
    J = np.stack(cols, axis=1)
    dof = max(len(r0) - J.shape[1], 1)
    chi2_nu = float(r0 @ r0) / dof
    cov = np.linalg.pinv(J.T @ J) * max(1.0, chi2_nu)
    err = np.sqrt(np.maximum(np.diag(cov), 0.0))
    out = {"chi2_nu": chi2_nu, "sigma_error": float(err[0]), "scale_error": float(err[-1]),
           "gamma_error": float(err[1]) if has_gamma else float("nan")}
    if has_gamma:
        out["sigma_gamma_correlation"] = float(cov[0, 1] / max(err[0] * err[1], 1e-300))
    return out


def shell_statistics(target: AnisotropicTarget, s: np.ndarray, data: np.ndarray, model: np.ndarray,
                     delta_model: np.ndarray, n_shells: int) -> list:
    """Per resolution shell (equal volume in s³ over the fit voxels): CC total (I vs M), CC aniso (ΔI vs ΔM)."""
    sv = s[target.mask]
    Iv = data[target.mask].astype(np.float64)
    Mv = model[target.mask].astype(np.float64)
    lo, hi = float(sv.min()), float(sv.max())
    edges = np.cbrt(np.linspace(lo ** 3, hi ** 3, n_shells + 1))
    shell = np.clip(np.searchsorted(edges, sv, side="right") - 1, 0, n_shells - 1)
    rows = []
    for c in range(n_shells):
        sel = shell == c
        rows.append({
            "d_max": float(1.0 / edges[c]) if edges[c] > 0 else float("inf"),
            "d_min": float(1.0 / edges[c + 1]),
            "n_voxels": int(sel.sum()),
            "cc_total": pearson(Iv[sel], Mv[sel]),
            "cc_aniso": pearson(target.delta[sel], delta_model[sel]),
        })
    return rows
