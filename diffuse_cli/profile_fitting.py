"""Peak fits to 1D profiles and the orientational order parameter S.

Models (x in the profile's own unit: q_inv_angstrom for radial profiles,
degrees of χ for azimuthal ones):

* ``pseudo_voigt`` (radial): ``y = h·[η L(x) + (1 − η) G(x)] + b0 + b1 (x − x0)``
  with ``G = exp(−4 ln2 (x − x0)²/w²)``, ``L = 1/(1 + 4 (x − x0)²/w²)``, both
  of height 1 at ``x0``; ``w`` is the FWHM, ``η ∈ [0, 1]``.
* ``pseudo_voigt`` (azimuthal): the same peak in the wrapped angle
  ``θ = wrap(χ − χ0)`` (periodic), with its partner at ``χ0 + 180°`` when
  ``pair=True`` (apolar order), on a constant background.
* ``maier_saupe`` (azimuthal): ``y = b0 + h·exp(m (cos²(χ − χ0) − 1))``, an
  orientation distribution ``f(θ) ∝ exp(m cos² θ)`` about the director at χ0.

Order parameter ``S = ⟨P₂(cos θ)⟩ = ∫₀^π f(θ) P₂(cos θ) sin θ dθ / ∫₀^π f(θ) sin θ dθ``
with θ the angle from the **fitted centre**, so S never depends on where the
peak sits on the detector. For Maier–Saupe it has the closed form
``S = 3/(4√m·D(√m)) − 3/(4m) − 1/2`` (D = Dawson's function,
``scipy.special.dawsn``), continued to m ≤ 0. For a pseudo-Voigt, S is
integrated numerically from the fitted shape (FWHM in radians, η). Identifying
the detector azimuth with the polar angle from the director is the usual
approximation for a director in the detector plane at small scattering angle.

``S`` describes the fitted peak alone (the oriented component). ``S_total``
is ⟨P₂⟩ of the whole fitted I(χ), counting the constant background as an
isotropic population (S_total = S × oriented fraction); it is the one that
stays 0 for an isotropic sample, where the peak (and so S) is undetermined.
``S_data`` is the same ⟨P₂⟩ of the measured profile (no model), with an
exact linear error; anisotropy is significant when |S_data|/σ reaches a
threshold (:func:`assess_anisotropy`), and otherwise S is reported as 0 with
"anisotropy not significant". A profile without signal (blank image) is a
failed fit.

Shapes are in :mod:`diffuse_cli.profile_shapes`, S in :mod:`diffuse_cli.order_parameter`.

Uncertainties come from the covariance of the weighted least-squares fit
(``scipy.optimize.curve_fit``, ``absolute_sigma=True`` when σ is given), S's by
propagating that covariance. R² = 1 − SS_res/SS_tot is computed on the
unsmoothed data (smoothing, if asked, is used only for starting values). A fit
that fails returns ``success=False`` with the reason; it never raises.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from diffuse_cli.order_parameter import maier_saupe_S, order_parameter_odf, order_parameter_with_error, pseudo_voigt_S
from diffuse_cli.profile_shapes import maier_saupe, pseudo_voigt_azimuthal, pseudo_voigt_linear, wrap_degrees

logger = logging.getLogger("diffuse.profile_fitting")


# ------------------------------------------------------------------ fitting


@dataclass
class FitResult:
    """Result of one fit. Parameters and 1σ errors are keyed by name.

    Units: ``centre``/``fwhm`` in the x unit of the profile (q_inv_angstrom or
    degrees); ``height``/``b0`` in intensity units; ``b1`` intensity per x
    unit; ``m`` and ``eta``, ``S`` dimensionless.

    Azimuthal fits also carry ``S_data`` ± ``S_data_error`` (model-free ⟨P₂⟩
    of the measured I(χ) about the fitted centre), ``anisotropy_z`` =
    |S_data|/S_data_error and ``significant`` (z ≥ the threshold; see
    :func:`assess_anisotropy`). When not significant, ``S`` is 0 and
    ``S_error`` NaN: the peak, and so its S, is not determined by the data.
    """

    model: str
    success: bool
    message: str = ""
    params: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    r_squared: float = float("nan")
    chi2_reduced: float = float("nan")
    n_points: int = 0
    S: float = float("nan")
    S_error: float = float("nan")
    S_total: float = float("nan")
    S_total_error: float = float("nan")
    S_data: float = float("nan")
    S_data_error: float = float("nan")
    anisotropy_z: float = float("nan")
    significant: bool | None = None
    x: np.ndarray | None = None
    y_model: np.ndarray | None = None

    def row(self) -> dict:
        """Flat dict for the tidy fits table."""
        out = {
            "model": self.model,
            "success": bool(self.success),
            "message": self.message,
            "n_points": self.n_points,
            "r_squared": self.r_squared,
            "chi2_reduced": self.chi2_reduced,
        }
        for name in ("centre", "fwhm", "height", "eta", "m", "b0", "b1"):
            out[name] = self.params.get(name, float("nan"))
            out[name + "_error"] = self.errors.get(name, float("nan"))
        out["S"] = self.S
        out["S_error"] = self.S_error
        out["S_total"] = self.S_total
        out["S_total_error"] = self.S_total_error
        out["S_data"] = self.S_data
        out["S_data_error"] = self.S_data_error
        out["anisotropy_z"] = self.anisotropy_z
        out["significant"] = "" if self.significant is None else bool(self.significant)
        return out


def _prepare(x, y, sigma):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    s = None
    if sigma is not None:
        s = np.asarray(sigma, dtype=np.float64)
        ok &= np.isfinite(s) & (s > 0)
        s = s[ok]
    return x[ok], y[ok], s


def smooth(y, window: int) -> np.ndarray:
    """Moving average (odd window, edges reflected). For starting values only."""
    if window is None or window <= 1:
        return np.asarray(y, dtype=np.float64)
    window = int(window) | 1
    pad = window // 2
    yp = np.pad(np.asarray(y, dtype=np.float64), pad, mode="reflect")
    return np.convolve(yp, np.ones(window) / window, mode="valid")


def _smooth_periodic(y, window: int) -> np.ndarray:
    if window is None or window <= 1:
        return np.asarray(y, dtype=np.float64)
    window = int(window) | 1
    pad = window // 2
    yp = np.concatenate([y[-pad:], y, y[:pad]])
    return np.convolve(yp, np.ones(window) / window, mode="valid")


def _finish(model, names, func, popt, pcov, x, y, s, n_free) -> FitResult:
    yfit = func(x, *popt)
    ss_res = float(np.sum((y - yfit) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    dof = max(len(x) - n_free, 1)
    chi2 = float(np.sum(((y - yfit) / s) ** 2)) / dof if s is not None else ss_res / dof
    errors = np.sqrt(np.diag(pcov)) if pcov is not None and np.all(np.isfinite(pcov)) else np.full(len(popt), np.nan)
    message = "" if np.all(np.isfinite(errors)) else "covariance could not be estimated"
    return FitResult(
        model=model,
        success=True,
        message=message,
        params=dict(zip(names, map(float, popt))),
        errors=dict(zip(names, map(float, errors))),
        r_squared=r2,
        chi2_reduced=chi2,
        n_points=len(x),
        x=x,
        y_model=yfit,
    )


def _total_order_parameter(res: FitResult, func, popt, pcov, centre_index) -> None:
    """S_total: ⟨P₂⟩ of the whole fitted I(χ), background counted as isotropic.

    f(θ) = fitted model at χ0 + θ (θ from the fitted centre), so it does not
    depend on where the peak sits; its error propagates the full covariance.
    """

    def s_total(p):
        c = p[centre_index] if centre_index is not None else res.params["centre"]
        return order_parameter_odf(lambda t: func(c + np.degrees(t), *p), n=4001)

    popt = np.asarray(popt, dtype=np.float64)
    res.S_total = s_total(popt)
    if pcov is None or not np.all(np.isfinite(pcov)):
        return
    g = np.zeros(len(popt))
    for i in range(len(popt)):
        step = 1e-6 * max(abs(popt[i]), 1e-3)
        hi, lo = popt.copy(), popt.copy()
        hi[i] += step
        lo[i] -= step
        g[i] = (s_total(hi) - s_total(lo)) / (2 * step)
    res.S_total_error = float(np.sqrt(max(g @ pcov @ g, 0.0)))


SIGNIFICANCE_THRESHOLD = 4.0
"""Default z = |S_data|/σ(S_data) at and above which anisotropy is significant."""


EXCESS_NOISE_HARMONICS = 8
"""Harmonics of the smooth description of I(χ) behind :func:`excess_noise`."""


def excess_noise(chi_deg, y, s, n_harmonics: int = EXCESS_NOISE_HARMONICS) -> float:
    """χ²_ν of I(χ) about a Fourier series with harmonics 0…n (weighted linear fit).

    Structure broader than about 180°/n is taken as signal; the scatter of
    the bins about it, relative to their σ (unit σ if ``s`` is None), is
    noise the bin errors do not include (pixel-to-pixel response, unmasked
    spots, gap edges on real data). n is lowered for short profiles.
    """
    theta = np.radians(np.asarray(chi_deg, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    w = 1.0 / (np.asarray(s, dtype=np.float64) if s is not None else np.ones_like(y))
    n = int(min(n_harmonics, (len(y) - 2) // 4))
    cols = [np.ones_like(theta)] + [f(k * theta) for k in range(1, n + 1) for f in (np.cos, np.sin)]
    X = np.stack(cols, axis=1) * w[:, None]
    coef = np.linalg.lstsq(X, y * w, rcond=None)[0]
    dof = max(len(y) - X.shape[1], 1)
    return float(np.sum((y * w - X @ coef) ** 2) / dof)


def assess_anisotropy(res: FitResult, x, y, s, threshold: float = SIGNIFICANCE_THRESHOLD) -> None:
    """Decide whether the profile shows order about the fitted director.

    z = |S_data|/σ(S_data): S_data is ⟨P₂⟩ of the measured I(χ) about the
    fitted centre (the data's own S_total), σ by exact linear propagation of
    the bin errors (:func:`order_parameter_with_error`), times
    √max(1, :func:`excess_noise`) (Birge ratio about a smooth Fourier
    description, so that scatter beyond the bin errors, as on real data,
    widens the error instead of becoming "order"). Without σ the bins get
    unit weight and the factor is √excess_noise (the residual scatter).
    The peak height's own σ is not used: it is degenerate with the
    background for broad peaks and undefined for a flat profile.

    Not significant (z < threshold): S = 0, S_error = NaN and the message
    says so; S_total, S_data and the fitted parameters stay as fitted.
    """
    centre = res.params.get("centre", float("nan"))
    sig = s if s is not None else np.ones_like(y)
    S, err = order_parameter_with_error(x, y, sig, centre)
    chi2 = excess_noise(x, y, s)
    if s is None:  # unit weights: χ²_ν is the residual variance; floor it at rounding level
        err *= np.sqrt(max(chi2, (1e-9 * float(np.mean(np.abs(y)))) ** 2))
    else:
        err *= np.sqrt(max(1.0, chi2))
    res.S_data, res.S_data_error = S, float(err)
    if err > 0:
        res.anisotropy_z = float(abs(S) / err)
    else:  # noise-free profile without σ: S_data is exact
        res.anisotropy_z = 0.0 if abs(S) < 1e-12 else (float("inf") if np.isfinite(S) else float("nan"))
    res.significant = bool(np.isfinite(res.anisotropy_z) and res.anisotropy_z >= threshold)
    if not res.significant:
        res.S, res.S_error = 0.0, float("nan")
        note = f"anisotropy not significant (|S_data|/sigma = {res.anisotropy_z:.2g} < {threshold:g}); S set to 0"
        res.message = f"{res.message}; {note}" if res.message else note


def _no_signal(x, y, s, model):
    """A failed FitResult when the profile's mean is not 3σ above zero, else None.

    ⟨P₂⟩ of a zero intensity is 0/0: a blank band is a failure, not S = 0.
    """
    if s is not None:
        w = 1.0 / (s * s)
        mean, err = float(np.sum(w * y) / np.sum(w)), float(1.0 / np.sqrt(np.sum(w)))
    else:
        mean, err = float(np.mean(y)), float(np.std(y) / np.sqrt(len(y)))
    if mean > 3.0 * err and mean > 0:
        return None
    return _failed(model, f"no signal: mean intensity {mean:.3g} ± {err:.2g} is not 3 sigma above 0", len(x))


def _curve_fit(func, x, y, s, p0, bounds):
    with warnings.catch_warnings():
        # a singular covariance is reported through NaN errors instead
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        return optimize.curve_fit(
            func, x, y, p0=p0, sigma=s, absolute_sigma=s is not None, bounds=bounds, max_nfev=1000, x_scale="jac"
        )


def _best_of_starts(func, x, y, s, starts, bounds):
    """Fit from each start; keep the lowest χ² ((popt, pcov), or None and the errors).

    Several starts, because one starting width lets a lone spike win by default.
    """
    best, errors = None, []
    for p0 in starts:
        try:
            popt, pcov = _curve_fit(func, x, y, s, p0, bounds)
        except (RuntimeError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
            continue
        r = y - func(x, *popt)
        cost = float(np.sum((r / s) ** 2) if s is not None else np.sum(r * r))
        if best is None or cost < best[0]:
            best = (cost, popt, pcov)
    if best is None:
        return None, "; ".join(sorted(set(errors)))
    return best[1:], ""


def _failed(model, message, n) -> FitResult:
    logger.warning("%s fit failed: %s", model, message)
    return FitResult(model=model, success=False, message=message, n_points=n)


def fit_pseudo_voigt(x, y, sigma=None, x_range=None, smooth_window: int = 0) -> FitResult:
    """Pseudo-Voigt + linear background on a radial profile (x in q_inv_angstrom).

    x_range: optional (lo, hi) restricting the fit.
    """
    x, y, s = _prepare(x, y, sigma)
    if x_range is not None:
        sel = (x >= x_range[0]) & (x <= x_range[1])
        x, y, s = x[sel], y[sel], (s[sel] if s is not None else None)
    names = ["height", "centre", "fwhm", "eta", "b0", "b1"]
    if len(x) < 8:
        return _failed("pseudo_voigt", f"only {len(x)} valid points", len(x))
    ys = smooth(y, smooth_window)
    span = x.max() - x.min()
    # linear background through the ends, peak at the maximum above it
    n_end = max(2, len(x) // 10)
    xa, ya = x[:n_end].mean(), ys[:n_end].mean()
    xb, yb = x[-n_end:].mean(), ys[-n_end:].mean()
    slope = (yb - ya) / (xb - xa) if xb > xa else 0.0
    base = ya + slope * (x - xa)
    i = int(np.argmax(ys - base))
    c0 = x[i]
    h0 = max(float(ys[i] - base[i]), 1e-12 * max(1.0, abs(float(ys[i]))))
    above = (ys - base) >= 0.5 * h0
    # FWHM from the contiguous half-maximum run around the maximum
    lo = i
    while lo > 0 and above[lo - 1]:
        lo -= 1
    hi = i
    while hi < len(x) - 1 and above[hi + 1]:
        hi += 1
    w0 = max(x[hi] - x[lo], 2 * np.median(np.diff(x)))
    b00 = ya + slope * (c0 - xa)
    p0 = [h0, c0, w0, 0.5, b00, slope]
    bounds = ([-np.inf, x.min(), 1e-3 * w0, 0.0, -np.inf, -np.inf], [np.inf, x.max(), 2 * span, 1.0, np.inf, np.inf])
    try:
        popt, pcov = _curve_fit(pseudo_voigt_linear, x, y, s, p0, bounds)
    except (RuntimeError, ValueError) as e:
        return _failed("pseudo_voigt", str(e).splitlines()[0], len(x))
    return _finish("pseudo_voigt", names, pseudo_voigt_linear, popt, pcov, x, y, s, len(names))


def _centre_guess(chi, ys, period: float) -> float:
    """Argmax of the profile folded with the given period (degrees)."""
    i = int(np.argmax(ys))
    c = chi[i]
    return float(wrap_degrees(c)) if period == 360 else float(((c + 90.0) % 180.0) - 90.0)


def fit_pseudo_voigt_azimuthal(
    chi_deg, y, sigma=None, pair: bool = True, smooth_window: int = 0, significance: float = SIGNIFICANCE_THRESHOLD
) -> FitResult:
    """Periodic pseudo-Voigt (and partner at +180° if ``pair``) + constant background.

    chi_deg in degrees; returns centre (degrees, wrapped to [−180, 180) or
    [−90, 90) for a pair), fwhm (degrees), eta, height, b0, and S with its error.
    ``significance``: z threshold of :func:`assess_anisotropy`. A profile
    without signal (mean not 3σ above 0) is a failure.
    """
    x, y, s = _prepare(chi_deg, y, sigma)
    names = ["height", "centre", "fwhm", "eta", "b0"]
    model = "pseudo_voigt"
    if len(x) < 8:
        return _failed(model, f"only {len(x)} valid points", len(x))
    blank = _no_signal(x, y, s, model)
    if blank is not None:
        return blank
    ys = _smooth_periodic(y, smooth_window)
    c0 = _centre_guess(x, ys, 180 if pair else 360)
    b0 = float(np.percentile(ys, 10))
    h0 = max(float(ys.max() - b0), 1e-12 * max(1.0, abs(b0)))
    above = np.sum(ys - b0 >= 0.5 * h0) * (360.0 / len(x))
    w0 = float(np.clip(above / (2 if pair else 1), 2.0, 170.0))

    def func(xx, h, c, w, eta, bb):
        return pseudo_voigt_azimuthal(xx, h, c, w, eta, bb, pair=pair)

    # an orientation distribution is not negative: height >= 0
    bounds = ([0.0, c0 - 180.0, 0.05, 0.0, -np.inf], [np.inf, c0 + 180.0, 720.0, 1.0, np.inf])
    # a few starting widths; the best χ² wins (a lone spike must not win by default)
    starts = [[h0, c0, w_start, 0.5, b0] for w_start in sorted({w0, 20.0, 60.0})]
    best, errors = _best_of_starts(func, x, y, s, starts, bounds)
    if best is None:
        return _failed(model, errors, len(x))
    popt, pcov = best
    res = _finish(model, names, func, popt, pcov, x, y, s, len(names))
    period = 180.0 if pair else 360.0
    res.params["centre"] = float((res.params["centre"] + period / 2) % period - period / 2)
    res.S = pseudo_voigt_S(res.params["fwhm"], res.params["eta"])
    # propagate (fwhm, eta) covariance by finite differences
    if np.all(np.isfinite(pcov)):
        w, eta = res.params["fwhm"], res.params["eta"]
        dw = 1e-4 * max(w, 1e-3)
        de = 1e-4
        gw = (pseudo_voigt_S(w + dw, eta) - pseudo_voigt_S(w - dw, eta)) / (2 * dw)
        e_hi, e_lo = min(eta + de, 1.0), max(eta - de, 0.0)
        ge = (pseudo_voigt_S(w, e_hi) - pseudo_voigt_S(w, e_lo)) / (e_hi - e_lo)
        g = np.array([gw, ge])
        cov = pcov[np.ix_([2, 3], [2, 3])]
        res.S_error = float(np.sqrt(max(g @ cov @ g, 0.0)))
    _total_order_parameter(res, func, popt, pcov, 1)
    assess_anisotropy(res, x, y, s, significance)
    return res


def fit_maier_saupe(
    chi_deg, y, sigma=None, smooth_window: int = 0, centre: float | None = None,
    significance: float = SIGNIFICANCE_THRESHOLD,
) -> FitResult:
    """Maier–Saupe ``b0 + h·exp(m (cos²(χ − χ0) − 1))`` on I(χ) (χ in degrees).

    centre: fix χ0 (degrees) instead of fitting it (e.g. a known director).
    Several starting m are tried and the best χ² kept. m is bounded above so
    the peak's FWHM (≈ 2√(ln2/m) rad) stays at least two bins wide: narrower
    peaks are not resolved by the profile and would only fit noise.
    S = maier_saupe_S(m) (independent of χ0), σ_S = |dS/dm|·σ_m.
    ``significance``: z threshold of :func:`assess_anisotropy`. A profile
    without signal (mean not 3σ above 0) is a failure.
    """
    x, y, s = _prepare(chi_deg, y, sigma)
    model = "maier_saupe"
    if len(x) < 6:
        return _failed(model, f"only {len(x)} valid points", len(x))
    blank = _no_signal(x, y, s, model)
    if blank is not None:
        return blank
    ys = _smooth_periodic(y, smooth_window)
    step = np.radians(float(np.median(np.diff(np.sort(x))))) if len(x) > 1 else np.radians(1.0)
    m_max = float(np.log(2.0) / step**2)
    b0 = float(np.min(ys))
    h0 = max(float(ys.max() - b0), 1e-12 * max(1.0, abs(b0)))
    if centre is None:
        names = ["height", "centre", "m", "b0"]
        c0 = _centre_guess(x, ys, 180)
        func = maier_saupe
        lower, upper = [0.0, c0 - 90.0, -50.0, -np.inf], [np.inf, c0 + 90.0, m_max, np.inf]
    else:
        names = ["height", "m", "b0"]
        c0 = float(centre)

        def func(xx, h, m, bb):
            return maier_saupe(xx, h, c0, m, bb)

        lower, upper = [0.0, -50.0, -np.inf], [np.inf, m_max, np.inf]
    starts = [[h0, c0, m, b0] if centre is None else [h0, m, b0]
              for m in (min(m0, 0.5 * m_max) for m0 in (0.5, 2.0, 8.0, 40.0))]
    best, errors = _best_of_starts(func, x, y, s, starts, (lower, upper))
    if best is None:
        return _failed(model, errors, len(x))
    popt, pcov = best
    res = _finish(model, names, func, popt, pcov, x, y, s, len(names))
    if centre is None:
        res.params["centre"] = float((res.params["centre"] + 90.0) % 180.0 - 90.0)
    else:
        res.params["centre"] = c0
        res.errors["centre"] = 0.0
    m = res.params["m"]
    res.S = maier_saupe_S(m)
    dm = 1e-5 * max(1.0, abs(m))
    dS = (maier_saupe_S(m + dm) - maier_saupe_S(m - dm)) / (2 * dm)
    res.S_error = float(abs(dS) * res.errors["m"]) if np.isfinite(res.errors["m"]) else float("nan")
    if m >= 0.999 * m_max:
        res.message = (res.message + "; " if res.message else "") + "peak narrower than the χ binning"
    _total_order_parameter(res, func, popt, pcov, 1 if centre is None else None)
    assess_anisotropy(res, x, y, s, significance)
    return res
