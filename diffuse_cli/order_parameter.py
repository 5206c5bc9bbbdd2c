"""The orientational order parameter S = ⟨P₂(cos θ)⟩ about a director: closed form for Maier–Saupe,
numerical for a pseudo-Voigt, and model-free from a binned I(χ) with its error (:mod:`diffuse_cli.profile_fitting`).
"""

from __future__ import annotations

import numpy as np
from scipy import special

from diffuse_cli.profile_shapes import pseudo_voigt_shape


# ------------------------------------------------------------------ order parameter


def _x2_series(m: float, terms: int = 30) -> float:
    """⟨cos²θ⟩ for f ∝ exp(m cos²θ) by the power series of Z(m) = ∫₀¹ e^{m x²} dx."""
    n = np.arange(terms)
    fact = special.factorial(n)
    z = np.sum(m**n / (fact * (2 * n + 1)))
    dz = np.sum(m**n / (fact * (2 * n + 3)))  # dZ/dm = ∫ x² e^{m x²}
    return dz / z


def maier_saupe_S(m):
    """S = ⟨P₂(cos θ)⟩ for f(θ) ∝ exp(m cos² θ) (weight sin θ), any real m.

    m > 0: ``3/(4√m·D(√m)) − 3/(4m) − 1/2`` (Dawson's function D).
    m < 0 (k = √−m): ⟨cos²θ⟩ = 1/(2k²) − e^{−k²}/(k√π erf k).
    |m| < 0.5: power series (avoids cancellation near the isotropic m = 0).
    """
    m_arr = np.atleast_1d(np.asarray(m, dtype=np.float64))
    out = np.empty_like(m_arr)
    for i, mi in enumerate(m_arr):
        if abs(mi) < 0.5:
            x2 = _x2_series(mi)
            out[i] = 1.5 * x2 - 0.5
        elif mi > 0:
            r = np.sqrt(mi)
            out[i] = 3.0 / (4.0 * r * special.dawsn(r)) - 3.0 / (4.0 * mi) - 0.5
        else:
            k = np.sqrt(-mi)
            x2 = 1.0 / (2.0 * k * k) - np.exp(-k * k) / (k * np.sqrt(np.pi) * special.erf(k))
            out[i] = 1.5 * x2 - 0.5
    return out if np.ndim(m) else float(out[0])


def order_parameter_odf(f_of_theta, n: int = 20001) -> float:
    """S = ∫₀^π f P₂(cos θ) sin θ dθ / ∫₀^π f sin θ dθ by Simpson's rule.

    ``f_of_theta`` takes θ in radians (angle from the director).
    """
    from scipy.integrate import simpson

    theta = np.linspace(0.0, np.pi, n)
    f = f_of_theta(theta)
    c = np.cos(theta)
    w = f * np.sin(theta)
    return float(simpson(w * 0.5 * (3 * c * c - 1), x=theta) / simpson(w, x=theta))


def pseudo_voigt_S(fwhm_deg: float, eta: float) -> float:
    """S of the ODF f(θ) = pV(θ) (FWHM in degrees, centred at θ = 0).

    Adding the apolar partner pV(π − θ) gives the same S (P₂ and sin θ are
    symmetric about π/2), so single and paired peaks share this value.
    """
    w = np.radians(fwhm_deg)
    return order_parameter_odf(lambda t: pseudo_voigt_shape(t, w, eta))


def _p2_bin_weights(chi_deg, centre_deg: float, bin_width_deg: float):
    """Exact bin integrals ∫_b P₂(cos θ)|sin θ| dθ and ∫_b |sin θ| dθ (θ = χ − centre)."""
    half = np.radians(0.5 * bin_width_deg)
    theta = np.radians(np.asarray(chi_deg, dtype=np.float64) - centre_deg)

    # continuous antiderivatives over the whole circle (period π, zero net
    # increment for P₂|sin|, increment 2 per π for |sin|)
    def p2_anti(t):
        c = np.cos(np.mod(t, np.pi))
        return 0.5 * (c - c**3)

    def sin_anti(t):
        return 1.0 - np.cos(np.mod(t, np.pi)) + 2.0 * np.floor(t / np.pi)

    return p2_anti(theta + half) - p2_anti(theta - half), sin_anti(theta + half) - sin_anti(theta - half)


def order_parameter_with_error(chi_deg, intensity, sigma, centre_deg: float, bin_width_deg: float | None = None):
    """Model-free (S, σ_S) from a binned I(χ) over the full circle, about ``centre_deg``.

    ``S = Σ I_b ∫_b P₂(cos θ)|sin θ| dθ / Σ I_b ∫_b |sin θ| dθ`` with θ = χ − centre
    and each bin integrated exactly (I constant within a bin of width
    ``bin_width_deg``, default the median spacing of ``chi_deg``), so an
    isotropic profile gives exactly 0 for any centre. Uses the intensity as
    given (subtract an isotropic background first if wanted). Empty (NaN)
    bins are skipped, which biases S when the gaps are not symmetric.

    σ_S by linear propagation: S = N/D is a ratio of sums linear in the bin intensities, so
    ``σ_S² = Σ σ_b² (a_b − S·d_b)² / D²`` (a_b, d_b the bin integrals of
    P₂|sin θ| and |sin θ|) is exact to first order and needs no fitted model.
    σ_S is NaN when ``sigma`` is None; S and σ_S are NaN when D ≤ 0 (no
    signal: the order parameter of a zero intensity is undefined).
    """
    chi = np.asarray(chi_deg, dtype=np.float64)
    I = np.asarray(intensity, dtype=np.float64)
    if bin_width_deg is None:
        bin_width_deg = float(np.median(np.diff(np.sort(chi))))
    ok = np.isfinite(I)
    if sigma is not None:
        sig = np.asarray(sigma, dtype=np.float64)
        ok &= np.isfinite(sig)
    a, d = _p2_bin_weights(chi[ok], centre_deg, bin_width_deg)
    num = float(np.sum(I[ok] * a))
    den = float(np.sum(I[ok] * d))
    if not den > 0:
        return float("nan"), float("nan")
    S = num / den
    if sigma is None:
        return S, float("nan")
    return S, float(np.sqrt(np.sum((sig[ok] * (a - S * d)) ** 2)) / den)
