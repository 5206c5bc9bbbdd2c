"""Wilson B of the Bragg intensities (Wilson plot, or partialities refined with B), for the absolute scale.

B enters the theory of :mod:`diffuse_cli.absolute_scale` when the map's Bragg peaks were masked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli.absolute_scale import coherent_total

logger = logging.getLogger("diffuse.absolute_scale")


@dataclass
class WilsonFit:
    """Overall isotropic B from a Wilson plot of Bragg intensities."""

    B: float  # Å², ⟨I⟩ ∝ Σf² exp(−B d*²/2)
    sigma_B: float  # Å², least-squares error scaled by the fit's χ²
    n_reflections: int  # reflections in the fitted bins
    n_groups: int  # stills (intercepts) in the fit
    n_bins: int  # (still, shell) points fitted
    d_range: tuple[float, float]  # (d_max, d_min) Å of the fit
    x: np.ndarray  # per point: mean d*² (Å⁻²)
    y: np.ndarray  # per point: ln(⟨I⟩/Σf²) minus its still's intercept
    source: str = ""  # e.g. the reflection file
    method: str = ("Wilson plot: ln(sum I/(P eps) / sum p Σf²) per still and d*² shell, common "
                   "slope −B/2, one intercept per still (weighted least squares)")
    partiality_model: dict | None = None  # refined excitation width r = r0 + r1 d* (Å⁻¹), stills
    diffuse_under_spots: dict | None = None  # stills: h, B_h of the ε-independent term

    def as_dict(self) -> dict:
        out = {
            "source": self.source,
            "B": self.B,
            "sigma_B": self.sigma_B,
            "n_reflections": self.n_reflections,
            "n_stills": self.n_groups,
            "n_points": self.n_bins,
            "fit_range_d": list(self.d_range),
            "method": self.method,
        }
        if self.partiality_model is not None:
            out["partiality_model"] = self.partiality_model
        if self.diffuse_under_spots is not None:
            out["diffuse_under_spots"] = self.diffuse_under_spots
        return out


def estimate_wilson_b(d_star: np.ndarray, intensity: np.ndarray, composition: dict,
                      partiality: np.ndarray | None = None, group: np.ndarray | None = None,
                      d_max: float = 4.0, d_min: float | None = None, n_shells: int = 10,
                      min_per_shell: int = 10, excitation_error: np.ndarray | None = None,
                      variance: np.ndarray | None = None, centric: np.ndarray | None = None) -> WilsonFit:
    """Wilson B (Å²) from Bragg intensities of one or many stills.

    With ``excitation_error`` (Å⁻¹, stills: DIALS's distance of each
    reflection from the Ewald sphere) the partialities are refined against
    the intensities together with B (:func:`_wilson_b_refined_partiality`;
    ``variance``: σ² of each intensity, ``centric``: bool per reflection);
    the given ``partiality`` only seeds the width. Otherwise, as follows.

    d_star: 1/d (Å⁻¹) per reflection; intensity: integrated intensity already
    divided by the polarization factor and the multiplicity ε (any scale);
    partiality: fraction of the full reflection recorded (stills; default 1);
    group: still index per reflection (each still gets its own scale).

    Model (Wilson 1942): ⟨I_full⟩ = k_g·Σf²(d*)·exp(−B d*²/2). In each still g
    and each shell of equal width in d*² over [1/d_max², 1/d_min²],
    ``y = ln(Σ I / Σ p·Σf²)`` at ``x = Σ p d*² / Σ p``: a ratio estimator that
    divides by the partialities in the sum, not per reflection (no blow-up at
    small p), and keeps negative intensities (no truncation bias). The common
    slope −B/2 is fitted with one intercept per still, each point weighted by
    1/var(y), var(y) = Σ(I − m·p)²/(Σ I)². Shells with fewer than
    ``min_per_shell`` reflections or Σ I < 3 σ(Σ I) are left out.
    Raises ValueError when fewer than 3 points (or 2 shells) remain.
    """
    ds = np.asarray(d_star, dtype=np.float64).ravel()
    I = np.asarray(intensity, dtype=np.float64).ravel()
    p = np.ones_like(I) if partiality is None else np.asarray(partiality, dtype=np.float64).ravel()
    g = np.zeros(I.size, dtype=np.int64) if group is None else np.asarray(group).ravel()
    if excitation_error is not None and np.any(np.isfinite(excitation_error)):
        return _wilson_b_refined_partiality(ds, I, composition, np.asarray(excitation_error, np.float64).ravel(),
                                            p, g, variance, centric, d_max, d_min, n_shells, min_per_shell)
    x_lo = 1.0 / d_max**2
    x_hi = float(np.max(ds[np.isfinite(I)]) ** 2) if d_min is None else 1.0 / d_min**2
    s2 = ds * ds
    ok = np.isfinite(I) & np.isfinite(p) & (p > 0) & (s2 >= x_lo) & (s2 <= x_hi)
    if ok.sum() < 3 * min_per_shell or not x_hi > x_lo:
        raise ValueError(f"too few Bragg reflections ({int(ok.sum())}) between {d_max:.2f} Å and "
                         f"{1 / np.sqrt(x_hi):.2f} Å for a Wilson plot")
    s2, I, p, ds = s2[ok], I[ok], p[ok], ds[ok]
    _, g = np.unique(g[ok], return_inverse=True)
    sigma_f2 = coherent_total(composition, ds)
    shell = np.minimum(((s2 - x_lo) / (x_hi - x_lo) * n_shells).astype(np.int64), n_shells - 1)
    key = g * n_shells + shell
    n_keys = int(g.max() + 1) * n_shells
    n = np.bincount(key, minlength=n_keys)
    sum_I = np.bincount(key, I, minlength=n_keys)
    sum_p = np.bincount(key, p, minlength=n_keys)
    sum_pf = np.bincount(key, p * sigma_f2, minlength=n_keys)
    sum_ps2 = np.bincount(key, p * s2, minlength=n_keys)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = sum_I / sum_p
        var_sum = np.bincount(key, (I - m[key] * p) ** 2, minlength=n_keys)
        good = (n >= min_per_shell) & (sum_I > 3.0 * np.sqrt(var_sum)) & (sum_I > 0)
        y = np.log(sum_I / sum_pf)
        x = sum_ps2 / sum_p
        w = sum_I**2 / var_sum
    good &= np.isfinite(y) & np.isfinite(w) & (w > 0)
    idx = np.nonzero(good)[0]
    gi = idx // n_shells
    # stills with a single usable shell carry no slope information
    per_group = np.bincount(gi, minlength=int(g.max() + 1))
    keep = per_group[gi] >= 2
    idx, gi = idx[keep], gi[keep]
    if idx.size < 3 or np.unique(idx % n_shells).size < 2:
        raise ValueError("too few resolution shells with significant Bragg intensity for a Wilson plot")
    x, y, w = x[idx], y[idx], w[idx]
    # common slope with one intercept per still: weighted, centred within each still
    wsum = np.bincount(gi, w)
    with np.errstate(invalid="ignore", divide="ignore"):  # stills without points: never indexed
        xm = np.bincount(gi, w * x) / wsum
        ym = np.bincount(gi, w * y) / wsum
    dx, dy = x - xm[gi], y - ym[gi]
    sxx = float(np.sum(w * dx * dx))
    if not sxx > 0:
        raise ValueError("the Bragg reflections span no range of d*² for a Wilson plot")
    slope = float(np.sum(w * dx * dy) / sxx)
    dof = idx.size - np.unique(gi).size - 1
    chi2 = float(np.sum(w * (dy - slope * dx) ** 2)) / dof if dof > 0 else 1.0
    sigma_slope = float(np.sqrt(max(chi2, 1.0) / sxx))
    n_used = int(np.sum(n[idx]))
    return WilsonFit(B=-2.0 * slope, sigma_B=2.0 * sigma_slope, n_reflections=n_used,
                     n_groups=int(np.unique(gi).size), n_bins=int(idx.size),
                     d_range=(float(d_max), float(1.0 / np.sqrt(x_hi))), x=x,
                     y=dy + slope * xm[gi])


def _wilson_b_refined_partiality(ds, I, composition, eps, p, g, variance, centric, d_max, d_min,
                                 n_shells, min_per_shell) -> WilsonFit:
    """Wilson B of stills with the partialities refined against the intensities.

    Model (Wilson 1942; Gaussian rocking curve whose width has the form of
    Sauter et al. 2014, Acta Cryst. D70, 3299, r = 1/D + d*·η/2)::

        ⟨I_i⟩ = k_g · Σf²(d*_i) · [exp(−B d*_i²/2) · exp(−ε_i²/(2 r_i²)) + h · exp(−B_h d*_i²/2)],
        r_i = r0 + r1·d*_i

    ε_i: excitation error (Å⁻¹, distance of the reciprocal-lattice point from
    the Ewald sphere; from the geometry, not from a mosaicity model); r0 (Å⁻¹,
    about 1/domain size) and r1 (about tan(mosaicity/2)) are refined here, so
    the partialities are those the intensities support rather than those of
    the mosaic model refined for spot positions (too high at low resolution
    on simulated shots, which biases B low). The second term is the diffuse
    scattering under the spots that summation integration counts as Bragg
    (thermal diffuse scattering, peaked at the lattice points but much wider
    in ε than the Bragg rocking curve, so it does not follow ε): h ≥ 0 its
    size relative to the Bragg part at d* = 0 and B_h = B − Δ, Δ ≥ 0, its
    fall-off: no steeper than the Bragg part's (thermal diffuse scattering
    goes as d*²·I_Bragg). Left in the Bragg part it biases B low, as it
    falls off more slowly. Fitted by maximum quasi-likelihood with
    the Wilson variance V_i = c_i⟨I_i⟩² + σ_i² (c = 1 acentric, 2 centric):
    least squares on (I − ⟨I⟩)/√V with V from the previous pass (iteratively
    reweighted; the estimating equations are those of the Wilson
    distribution's likelihood), one scale k_g per still profiled out in closed
    form, k_g = Σ I m/V / Σ m²/V. Five parameters remain: B, r0, r1, h, Δ;
    σ from the Jacobian, scaled by the reduced χ² when > 1. Negative
    intensities are kept (no truncation bias).
    """
    from scipy.optimize import least_squares

    x_lo = 1.0 / d_max**2
    finite = np.isfinite(I) & np.isfinite(eps) & np.isfinite(ds)
    x_hi = float(np.max(ds[finite]) ** 2) if d_min is None else 1.0 / d_min**2
    s2 = ds * ds
    ok = finite & (s2 >= x_lo) & (s2 <= x_hi)
    if ok.sum() < 3 * min_per_shell or not x_hi > x_lo:
        raise ValueError(f"too few Bragg reflections ({int(ok.sum())}) between {d_max:.2f} Å and "
                         f"{1 / np.sqrt(x_hi):.2f} Å for a Wilson plot")
    var_m = np.zeros(I.size) if variance is None else np.asarray(variance, np.float64).ravel()
    c = np.ones(I.size) if centric is None else np.where(np.asarray(centric).ravel(), 2.0, 1.0)
    ds, I, eps, p, s2, var_m, c = ds[ok], I[ok], eps[ok], p[ok], s2[ok], np.maximum(var_m[ok], 0.0), c[ok]
    var_m = np.where(np.isfinite(var_m), var_m, 0.0)
    _, g = np.unique(g[ok], return_inverse=True)
    n_groups = int(g.max()) + 1
    sigma_f2 = coherent_total(composition, ds)
    # seeds: the width DIALS's partialities imply, r = |ε| / sqrt(−2 ln p), as a line in d*
    seed = np.isfinite(p) & (p > 0.05) & (p < 0.95) & (eps != 0)
    r0, r1 = float(np.percentile(np.abs(eps), 68)), 0.0
    if seed.sum() >= 10:
        r_seed = np.abs(eps[seed]) / np.sqrt(-2.0 * np.log(p[seed]))
        r1, r0 = np.polyfit(ds[seed], r_seed, 1)
        r0, r1 = max(float(r0), 0.1 * float(np.median(r_seed))), max(float(r1), 0.0)
    try:
        b0 = estimate_wilson_b(ds, I, composition, partiality=p, group=g, d_max=d_max, d_min=d_min,
                               n_shells=n_shells, min_per_shell=min_per_shell).B
    except ValueError:
        b0 = 20.0
    # (B, r0, r1, h, Δ) with B_h = B − Δ; the diffuse term starts small and flat (B_h = 0)
    b0 = b0 if np.isfinite(b0) else 20.0
    theta = np.array([b0, r0, r1, 0.01, max(b0, 1.0)])

    def shape(t):
        r = t[1] + t[2] * ds
        bragg = np.exp(-0.5 * (eps / r) ** 2)
        return sigma_f2 * np.exp(-0.5 * t[0] * s2) * (bragg + t[3] * np.exp(0.5 * t[4] * s2))

    def scales(m, V):
        with np.errstate(invalid="ignore", divide="ignore"):
            k = np.bincount(g, I * m / V, minlength=n_groups) / np.bincount(g, m * m / V, minlength=n_groups)
        return np.where(np.isfinite(k), k, 0.0)

    m = shape(theta)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.bincount(g, I, minlength=n_groups) / np.bincount(g, m, minlength=n_groups)
    mu = np.where(np.isfinite(k), k, 0.0)[g] * m
    floor = (1e-6 * float(np.mean(np.abs(I)))) ** 2
    for _ in range(20):
        V = np.maximum(c * mu * mu + var_m, floor)
        sw = 1.0 / np.sqrt(V)

        def resid(t):
            mm = shape(t)
            return (I - scales(mm, V)[g] * mm) * sw

        res = least_squares(resid, theta, bounds=([-np.inf, 1e-7, 0.0, 0.0, 0.0], [np.inf] * 5),
                            x_scale=np.array([10.0, max(theta[1], 1e-5), max(theta[2], 1e-4), 0.01, 10.0]))
        step = abs(res.x[0] - theta[0])
        theta = res.x
        m = shape(theta)
        k = scales(m, V)
        mu = k[g] * m
        if step < 1e-3:
            break
    else:
        logger.warning("Wilson B with refined partialities: B still moved by %.2g Å^2 after 20 passes", step)
    dof = I.size - theta.size - n_groups
    chi2 = float(np.sum(res.fun ** 2)) / dof if dof > 0 else 1.0
    J = res.jac
    cov = np.linalg.pinv(J.T @ J) * max(chi2, 1.0)
    # Wilson-plot points for the figure: per still and shell, ln(Σ (I/k_g − diffuse) / Σ p Σf²)
    # at Σ p d*²/Σ p
    p_ref = np.exp(-0.5 * (eps / (theta[1] + theta[2] * ds)) ** 2)
    shell = np.minimum(((s2 - x_lo) / (x_hi - x_lo) * n_shells).astype(np.int64), n_shells - 1)
    key = g * n_shells + shell
    nk = n_groups * n_shells
    with np.errstate(invalid="ignore", divide="ignore"):
        bragg_part = I / k[g] - sigma_f2 * theta[3] * np.exp(-0.5 * (theta[0] - theta[4]) * s2)
        sum_i = np.bincount(key, bragg_part, minlength=nk)
        y = np.log(sum_i / np.bincount(key, p_ref * sigma_f2, minlength=nk))
        x = np.bincount(key, p_ref * s2, minlength=nk) / np.bincount(key, p_ref, minlength=nk)
    pts = (np.bincount(key, minlength=nk) >= min_per_shell) & np.isfinite(y) & np.isfinite(x) & (sum_i > 0)
    return WilsonFit(B=float(theta[0]), sigma_B=float(np.sqrt(max(cov[0, 0], 0.0))), n_reflections=int(I.size),
                     n_groups=n_groups, n_bins=int(pts.sum()), d_range=(float(d_max), float(1.0 / np.sqrt(x_hi))),
                     x=x[pts], y=y[pts],
                     method="stills, partialities refined: <I> = k_g Σf² [exp(−B d*²/2) exp(−ε²/(2 r²)) "
                            "+ h exp(−B_h d*²/2)], r = r0 + r1 d*; quasi-likelihood with V = c<I>² + σ² "
                            "(c = 2 centric), one scale per still",
                     partiality_model={"r0_inv_A": float(theta[1]), "r1": float(theta[2]),
                                       "sigma_r0": float(np.sqrt(max(cov[1, 1], 0.0))),
                                       "sigma_r1": float(np.sqrt(max(cov[2, 2], 0.0))),
                                       "reduced_chi2": chi2},
                     diffuse_under_spots={"h": float(theta[3]), "B_h": float(theta[0] - theta[4]),
                                          "sigma_h": float(np.sqrt(max(cov[3, 3], 0.0))),
                                          "sigma_B_h": float(np.sqrt(max(cov[0, 0] + cov[4, 4]
                                                                         - 2 * cov[0, 4], 0.0)))})


def bragg_intensities(reflections, experiments, space_group=None) -> dict:
    """Arrays for :func:`estimate_wilson_b` from a DIALS reflection table.

    Uses the reflections flagged ``integrated_sum`` (summation integration;
    stills_process's intensities), ``intensity.sum.value`` divided by the
    polarization factor of each reflection's experiment (``s1``, beam's
    polarization; :func:`diffuse_cli.corrections.polarization`), or by the
    ``lp`` column's inverse when present, and by the multiplicity ε of its
    Miller index in the space group (the experiments' unless given).
    Returns dict(d_star (Å⁻¹), intensity, partiality, group, variance (σ² of
    intensity), centric (bool), excitation_error (Å⁻¹; NaN without DIALS's
    ``excitation_error`` column, e.g. rotation data)).
    Raises ValueError when the table holds no integrated intensities.
    """
    from cctbx import crystal, miller

    from diffuse_cli.corrections import polarization

    if len(reflections) == 0 or "intensity.sum.value" not in reflections:
        raise ValueError("no integrated intensities (intensity.sum.value)")
    sel = reflections.get_flags(reflections.flags.integrated_sum)
    if "d" in reflections:
        sel &= reflections["d"] > 0
    r = reflections.select(sel)
    if len(r) == 0:
        raise ValueError("no reflections flagged integrated_sum")
    ids = r["id"].as_numpy_array().astype(np.int64)
    if ids.min() < 0 or ids.max() >= len(experiments):
        raise ValueError(f"reflection ids up to {ids.max()} for {len(experiments)} experiments")
    I = r["intensity.sum.value"].as_numpy_array().astype(np.float64)
    var = (r["intensity.sum.variance"].as_numpy_array().astype(np.float64)
           if "intensity.sum.variance" in r else np.zeros(len(r)))
    if "lp" in r:
        I = I * r["lp"].as_numpy_array()
        var = var * r["lp"].as_numpy_array() ** 2
    else:
        s1 = r["s1"].as_numpy_array()
        P = np.empty(len(r))
        order = np.argsort(ids, kind="stable")
        starts = np.searchsorted(ids[order], np.arange(len(experiments) + 1))
        for e in np.unique(ids):
            rows = order[starts[e]:starts[e + 1]]
            P[rows] = polarization(s1[rows], experiments[int(e)].beam)
        I = I / P
        var = var / (P * P)
    if "d" in r:
        d = r["d"].as_numpy_array()
    else:
        raise ValueError("reflections have no 'd' column")
    sg = space_group or str(experiments[0].crystal.get_space_group().info())
    ms = miller.set(crystal.symmetry(unit_cell=experiments[0].crystal.get_unit_cell(),
                                     space_group_symbol=sg),
                    r["miller_index"], anomalous_flag=False)
    eps = ms.epsilons().data().as_numpy_array().astype(np.float64)
    p = r["partiality"].as_numpy_array() if "partiality" in r else np.ones(len(r))
    centric = ms.centric_flags().data().as_numpy_array().astype(bool)
    exc = (r["excitation_error"].as_numpy_array().astype(np.float64) if "excitation_error" in r
           else np.full(len(r), np.nan))
    return {"d_star": 1.0 / d, "intensity": I / eps, "partiality": p, "group": ids,
            "variance": var / (eps * eps), "centric": centric, "excitation_error": exc}


def plot_wilson(fit: WilsonFit, path) -> None:
    """Wilson plot: ln(⟨I⟩/Σf²) less each still's intercept against d*², with the fit (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffuse_cli import program

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(fit.x, fit.y, "k.", ms=3, alpha=0.5, label="still × shell")
    xs = np.linspace(0.0, float(fit.x.max()) * 1.05, 50)
    ax.plot(xs, -0.5 * fit.B * xs, "C0-", label=f"slope −B/2, B = {fit.B:.1f} ± {fit.sigma_B:.1f} Å²")
    ax.set_xlabel("d*² (Å⁻²)")
    ax.set_ylabel("ln(⟨I⟩/Σf²) − intercept")
    ax.set_title(f"Wilson plot ({fit.n_reflections} reflections, {fit.n_groups} stills)")
    ax.legend(fontsize=8)
    program.save_figure(path, fig)
