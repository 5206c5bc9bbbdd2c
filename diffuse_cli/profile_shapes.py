"""Peak shapes of 1D profiles: pseudo-Voigt (radial, on a linear background; periodic in χ) and Maier–Saupe.

x in the profile's own unit (q_inv_angstrom, or degrees of χ); fitted in :mod:`diffuse_cli.profile_fitting`.
"""

from __future__ import annotations

import numpy as np

FOUR_LN2 = 4.0 * np.log(2.0)


# ------------------------------------------------------------------ shapes


def wrap_degrees(angle):
    """Wrap angles (degrees) into [−180, 180)."""
    return (np.asarray(angle, dtype=np.float64) + 180.0) % 360.0 - 180.0


def pseudo_voigt_shape(dx, fwhm, eta):
    """η·Lorentzian + (1 − η)·Gaussian of FWHM ``fwhm``, height 1 at dx = 0."""
    t = (dx / fwhm) ** 2
    return eta / (1.0 + 4.0 * t) + (1.0 - eta) * np.exp(-FOUR_LN2 * t)


def pseudo_voigt_linear(x, height, centre, fwhm, eta, b0, b1):
    """Pseudo-Voigt peak on a linear background (radial profiles)."""
    dx = x - centre
    return height * pseudo_voigt_shape(dx, fwhm, eta) + b0 + b1 * dx


def pseudo_voigt_azimuthal(chi_deg, height, centre, fwhm, eta, b0, pair=True):
    """Periodic pseudo-Voigt in χ (degrees), optionally with a partner at +180°."""
    y = pseudo_voigt_shape(wrap_degrees(chi_deg - centre), fwhm, eta)
    if pair:
        y = y + pseudo_voigt_shape(wrap_degrees(chi_deg - centre - 180.0), fwhm, eta)
    return height * y + b0


def maier_saupe(chi_deg, height, centre, m, b0):
    """``b0 + h·exp(m (cos²(χ − χ0) − 1))``, χ in degrees (height h at χ0 for m > 0)."""
    c = np.cos(np.radians(chi_deg - centre))
    return b0 + height * np.exp(m * (c * c - 1.0))
