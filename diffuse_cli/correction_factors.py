"""The correction factors of one pixel, as numpy arrays (formulas in docs/corrections.md).

Solid angle Ω, polarization P, sensor absorption efficiency η, air and Kapton
transmissions, and the physical constants and attenuation coefficients they
need. :mod:`diffuse_cli.corrections` turns them into per-detector multipliers
and corrected intensities (and re-exports these names).

Functions taking a panel return arrays of shape ``(n_slow, n_fast)`` for inputs
``lab_mm`` / ``s1`` of shape ``(n_slow, n_fast, 3)``; they also accept any
``(..., 3)``. Lengths are mm, wave vectors Å⁻¹, attenuation coefficients mm⁻¹.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)

MICROSTERADIAN = 1.0e-6
#: h·c in eV·Å (CODATA 2018).
HC_EV_ANGSTROM = 12398.419843320026
#: Gas constant, J mol⁻¹ K⁻¹.
GAS_CONSTANT = 8.314462618
#: Dry air near sea level, mass fractions (NIST XCOM / Hubbell & Seltzer "Air, Dry").
AIR_MASS_FRACTIONS = {"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827}
#: Molar mass of dry air, g/mol.
AIR_MOLAR_MASS = 28.9647
STANDARD_PRESSURE_KPA = 101.325
ROOM_TEMPERATURE_K = 293.15


# ------------------------------------------------------------------ helpers


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _norm(v: np.ndarray) -> np.ndarray:
    """|v| over the last axis (einsum: several times faster than linalg.norm)."""
    return np.sqrt(np.einsum("...i,...i->...", v, v))


def panel_normal(panel) -> np.ndarray:
    """Unit normal of a panel (fast × slow), lab frame."""
    return _unit(np.array(panel.get_normal(), dtype=np.float64))


def pixel_area_mm2(panel) -> float:
    """Area of one pixel (mm²): |f̂ × ŝ| · size_fast · size_slow."""
    f = _unit(np.array(panel.get_fast_axis()))
    s = _unit(np.array(panel.get_slow_axis()))
    px_f, px_s = panel.get_pixel_size()
    return float(np.linalg.norm(np.cross(f, s)) * px_f * px_s)


def cos_incidence(panel, vectors: np.ndarray) -> np.ndarray:
    """|cos ψ| between each ray (lab position or s1) and the panel normal."""
    n = panel_normal(panel)
    v = np.asarray(vectors, dtype=np.float64)
    return np.abs(v @ n) / _norm(v)


def energy_ev(wavelength: float) -> float:
    """Photon energy (eV) for a wavelength in Å."""
    return HC_EV_ANGSTROM / float(wavelength)


@functools.lru_cache(maxsize=32)
def _attenuation_table(material: str):
    from cctbx.eltbx import attenuation_coefficient

    return attenuation_coefficient.get_table(material)


def mass_attenuation(material: str, wavelength: float) -> float:
    """Total mass attenuation coefficient μ/ρ (cm²/g) from cctbx's NIST tables."""
    return float(_attenuation_table(material).mu_rho_at_angstrom(float(wavelength)))


def sensor_mu(panel, wavelength: float, material: str | None = None) -> float:
    """Linear attenuation coefficient μ (mm⁻¹) of a panel's sensor.

    ``panel.get_mu()`` when the format set it (> 0) and no material override
    is given; otherwise the NIST table for the material at the beam energy,
    exactly as dxtbx computes it for the parallax correction
    (``mu_at_angstrom(λ) / 10``, table density).
    """
    if material is None:
        mu = float(panel.get_mu())
        if mu > 0:
            return mu
        material = panel.get_material()
    if not material:
        raise ValueError(
            f"panel {panel.get_name()!r} has neither mu nor a sensor material; "
            "give the sensor material"
        )
    return float(_attenuation_table(material).mu_at_angstrom(float(wavelength))) / 10.0


# ------------------------------------------------------------------ factors


def is_parallax_corrected(panel) -> bool:
    """True when dxtbx maps this panel's pixels to mm with its parallax correction."""
    return "Parallax" in type(panel.get_px_mm_strategy()).__name__


def _absorption_point_mm(panel, x: np.ndarray, y: np.ndarray):
    """dxtbx's parallax_correction in numpy: in-plane mm where a ray entering at (x, y) is absorbed.

    The ray from the sample through the entry point travels on, inside the
    sensor, the mean absorption length ``L = 1/μ − (t/cos θ + 1/μ)·exp(−μt/cos θ)``
    (θ to the panel normal), so it is recorded at ``(x, y) + L·(û·f̂, û·ŝ)``.
    """
    f = np.array(panel.get_fast_axis(), dtype=np.float64)
    s = np.array(panel.get_slow_axis(), dtype=np.float64)
    origin = np.array(panel.get_origin(), dtype=np.float64)
    normal = np.cross(f, s)
    if origin @ normal < 0:
        normal = -normal
    mu, t0 = float(panel.get_mu()), float(panel.get_thickness())
    r = origin + x[..., None] * f + y[..., None] * s
    u = r / _norm(r)[..., None]
    cos_t = u @ normal
    length = 1.0 / mu - (t0 / cos_t + 1.0 / mu) * np.exp(-mu * t0 / cos_t)
    return x + (u @ f) * length, y + (u @ s) * length


def parallax_area_factor(panel, lab_mm: np.ndarray) -> np.ndarray:
    """Area of the sensor entry patch whose rays a pixel records, over the pixel's area.

    ``pixel_to_millimeter`` gives the point where the rays recorded by a pixel
    enter the sensor; they are absorbed deeper, farther from the sample, so
    the entry patch is smaller than the pixel by the Jacobian of the entry →
    absorption map: factor ``1/det(∂x_abs/∂x_entry)`` ≈ 1 − 2 z̄/D (z̄ the
    mean absorption depth, D the distance). 1 for panels without parallax.
    """
    lab = np.asarray(lab_mm, dtype=np.float64)
    if not is_parallax_corrected(panel) or not panel.get_mu() > 0:
        return np.ones(lab.shape[:-1])
    D_inv = np.linalg.inv(np.array(panel.get_d_matrix(), dtype=np.float64).reshape(3, 3))
    xy = lab @ D_inv.T
    x, y = xy[..., 0], xy[..., 1]
    h = 1e-3  # mm; the shift varies on the scale of the distance, so forward differences are exact to ~1e-8
    ax, ay = _absorption_point_mm(panel, x, y)
    fx, fy = _absorption_point_mm(panel, x + h, y)
    sx, sy = _absorption_point_mm(panel, x, y + h)
    det = ((fx - ax) * (sy - ay) - (fy - ay) * (sx - ax)) / (h * h)
    return 1.0 / det


def solid_angle(panel, lab_mm: np.ndarray, exact: bool = False) -> np.ndarray:
    """Solid angle Ω (sr) of each pixel seen from the sample at the lab origin.

    Default: flat pixel of area A at distance r with incidence angle ψ to the
    panel normal, ``Ω = A·cos ψ / r²``. ``exact=True`` integrates over the
    rectangle (pixel axes must be orthogonal); the two differ by a relative
    O((a/r)²) (about 1e-7 for 172 µm pixels at 100 mm; see docs/corrections.md).
    ``lab_mm`` are the pixels' entry points (``pixel_to_millimeter``); on a
    parallax-corrected panel Ω is that of the entry patch
    (:func:`parallax_area_factor`, about −1e-3 for 450 µm Si at 200 mm).
    """
    lab = np.asarray(lab_mm, dtype=np.float64)
    if not exact:
        r2 = np.einsum("...i,...i->...", lab, lab)
        omega = pixel_area_mm2(panel) * np.abs(lab @ panel_normal(panel)) / (r2 * np.sqrt(r2))
        if is_parallax_corrected(panel):
            omega *= parallax_area_factor(panel, lab)
        return omega
    f = _unit(np.array(panel.get_fast_axis()))
    s = _unit(np.array(panel.get_slow_axis()))
    if abs(f @ s) > 1e-9:
        raise ValueError("exact solid angle needs orthogonal fast and slow axes")
    n = panel_normal(panel)
    d = float(np.array(panel.get_origin()) @ n)  # signed distance of the plane
    rel = lab - d * n  # from the foot of the perpendicular, in the plane
    x = rel @ f
    y = rel @ s
    px_f, px_s = panel.get_pixel_size()
    ad = abs(d)

    def corner(u, v):
        return np.arctan(u * v / (ad * np.sqrt(u * u + v * v + ad * ad)))

    x1, x2 = x - px_f / 2, x + px_f / 2
    y1, y2 = y - px_s / 2, y + px_s / 2
    omega = corner(x2, y2) - corner(x1, y2) - corner(x2, y1) + corner(x1, y1)
    if is_parallax_corrected(panel):
        omega *= parallax_area_factor(panel, lab)
    return omega


def polarization(s1: np.ndarray, beam) -> np.ndarray:
    """Polarization factor P (fraction of the scattered intensity), DIALS convention.

    With ``n`` the beam's polarization normal (made orthogonal to ŝ0),
    ``ê₁ = n × ŝ0`` and ``f`` the polarization fraction (f = 0.5 unpolarised,
    f → 1: E-field along ê₁, i.e. in the plane normal to n)::

        P = f·(1 − (ŝ1·ê₁)²) + (1 − f)·(1 − (ŝ1·n)²)

    which equals DIALS's ``(1−2f)(1−(ŝ1·n)²) + f(1+cos²2θ)`` (the inverse of
    ``Corrections.lp`` for stills), and ``(1+cos²2θ)/2`` for f = 0.5.
    """
    s0 = _unit(np.array(beam.get_s0(), dtype=np.float64))
    n = np.array(beam.get_polarization_normal(), dtype=np.float64)
    n = _unit(n - (n @ s0) * s0)
    e1 = np.cross(n, s0)
    f = float(beam.get_polarization_fraction())
    s1 = np.asarray(s1, dtype=np.float64)
    norm = _norm(s1)
    a = (s1 @ e1) / norm
    b = (s1 @ n) / norm
    return f * (1.0 - a * a) + (1.0 - f) * (1.0 - b * b)


def sensor_efficiency(
    panel,
    s1: np.ndarray,
    wavelength: float,
    mu: float | None = None,
    thickness_mm: float | None = None,
) -> np.ndarray:
    """Fraction of photons absorbed in the sensor, ``η = 1 − exp(−μ·t / cos ψ)``.

    μ (mm⁻¹) from :func:`sensor_mu` unless given; ``t`` the panel thickness
    (mm) unless given; ψ the angle between the ray and the panel normal (as in
    DIALS ``qe_correction``). Raises ValueError if the thickness is unknown.
    """
    t = float(panel.get_thickness()) if thickness_mm is None else float(thickness_mm)
    if not t > 0:
        raise ValueError(f"panel {panel.get_name()!r} has no sensor thickness")
    if mu is None:
        mu = sensor_mu(panel, wavelength)
    if not mu > 0:
        raise ValueError("sensor attenuation coefficient must be positive")
    return -np.expm1(-mu * t / cos_incidence(panel, s1))


def air_density(pressure_kpa: float = STANDARD_PRESSURE_KPA, temperature_k: float = ROOM_TEMPERATURE_K) -> float:
    """Density of dry air (g/cm³) from the ideal gas law."""
    grams_per_m3 = pressure_kpa * 1e3 * AIR_MOLAR_MASS / (GAS_CONSTANT * temperature_k)
    return grams_per_m3 * 1e-6


def air_mass_attenuation(wavelength: float) -> float:
    """μ/ρ of dry air (cm²/g): mass-fraction-weighted NIST element values."""
    return sum(w * mass_attenuation(el, wavelength) for el, w in AIR_MASS_FRACTIONS.items())


def air_mu(wavelength: float, pressure_kpa: float = STANDARD_PRESSURE_KPA, temperature_k: float = ROOM_TEMPERATURE_K) -> float:
    """Linear attenuation coefficient of air (mm⁻¹)."""
    return air_mass_attenuation(wavelength) * air_density(pressure_kpa, temperature_k) / 10.0


def air_transmission(
    lab_mm: np.ndarray,
    wavelength: float,
    pressure_kpa: float = STANDARD_PRESSURE_KPA,
    temperature_k: float = ROOM_TEMPERATURE_K,
) -> np.ndarray:
    """Transmission ``T = exp(−μ_air·L)`` over the sample-to-pixel distance L (mm)."""
    L = _norm(np.asarray(lab_mm, dtype=np.float64))
    return np.exp(-air_mu(wavelength, pressure_kpa, temperature_k) * L)


@dataclass
class KaptonParams:
    """DIALS ``fuller_kapton`` geometry (mm, degrees); see kapton_correction.py."""

    height_above_kapton_mm: float = 0.02
    thickness_mm: float = 0.05
    half_width_mm: float = 1.5875
    rotation_angle_deg: float = 1.15


def kapton_transmission(s1: np.ndarray, beam, params: KaptonParams) -> np.ndarray:
    """Transmission through Kapton tape (≤ 1), DIALS's ``KaptonAbsorption`` model.

    DIALS returns the multiplier 1/T; we return T. Its Kapton attenuation
    table covers 6–13 keV only.
    """
    from scitbx.array_family import flex

    from dials.algorithms.integration.kapton_correction import KaptonAbsorption

    e = energy_ev(beam.get_wavelength())
    if not 6000.0 <= e <= 13000.0:
        raise ValueError(f"Kapton absorption table covers 6-13 keV, beam is {e / 1000:.2f} keV")
    model = KaptonAbsorption(
        params.height_above_kapton_mm,
        params.thickness_mm,
        params.half_width_mm,
        params.rotation_angle_deg,
        wavelength_ang=beam.get_wavelength(),
        beam=beam,
    )
    u = _unit(s1)
    shape = u.shape[:-1]
    flat = flex.vec3_double(np.ascontiguousarray(u.reshape(-1, 3)))
    multiplier = model.abs_correction_flex(flat).as_numpy_array()
    return (1.0 / multiplier).reshape(shape)


def kapton_mu(wavelength: float) -> float:
    """Linear attenuation coefficient of Kapton (mm⁻¹) in DIALS's ``fuller_kapton`` table (6–13 keV)."""
    e = energy_ev(wavelength)
    if not 6000.0 <= e <= 13000.0:
        raise ValueError(f"Kapton absorption table covers 6-13 keV, beam is {e / 1000:.2f} keV")
    return 1.0 / float(_kapton_attenuation_length()(float(wavelength)))


@functools.lru_cache(maxsize=1)
def _kapton_attenuation_length():
    from dials.algorithms.integration.kapton_correction import get_absorption_correction

    return get_absorption_correction()
