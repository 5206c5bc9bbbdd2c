"""The simulator's forward model: per-pixel geometry and the factors between I_true and counts.

Expected diffuse counts in a pixel (docs/simulate.md gives every formula)::

    counts = scale · t · (Ω / 1e-6 sr) · P · η · T_air · I_true(hkl, d*)

Written from first principles and independent tables, sharing no code with the
pipeline's geometry/corrections modules (a test asserts it):

* geometry: dxtbx's own per-pixel model functions, ``Panel.pixel_to_millimeter``
  (parallax included when the panel has it) and ``Panel.get_lab_coord`` on
  flex arrays, at pixel centres (index + ½);
* Ω: exact solid angle of the pixel's quadrilateral (its four corners through
  the same dxtbx functions), two triangles by Van Oosterom & Strackee (1983);
* P: Thomson (dipole) scattering of a partly linearly polarised beam;
* η: 1 − exp(−μ t / cos ψ), μ from xraylib (``CS_Total``, Hubbell/Scofield tables);
* T_air: exp(−μ_air L), μ_air from xraylib with NIST's dry-air mass fractions
  and density scaled by the ideal-gas law.

Lengths mm, wave vectors Å⁻¹, μ mm⁻¹. Panel arrays have shape (n_slow, n_fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)

#: h·c (keV·Å), CODATA 2018.
HC_KEV_ANGSTROM = 12.398419843320026
#: NIST "Air, Dry (near sea level)": mass fractions and density (g/cm³) at 20 °C, 101.325 kPa.
AIR_NIST_NAME = "Air, Dry (near sea level)"
AIR_REFERENCE_DENSITY = 1.20479e-3
AIR_REFERENCE_KPA = 101.325
AIR_REFERENCE_K = 293.15
#: Sensor densities (g/cm³); elements from xraylib, compounds from NIST's compound list.
SENSOR_COMPOUNDS = {"CdTe": "Cadmium Telluride"}


def _flex_vec2(xy: np.ndarray):
    from scitbx.array_family import flex

    xy = np.ascontiguousarray(xy.reshape(-1, 2), dtype=np.float64)
    return flex.vec2_double(flex.double(xy[:, 0].copy()), flex.double(xy[:, 1].copy()))


def lab_at_pixels(panel, fast_px: np.ndarray, slow_px: np.ndarray) -> np.ndarray:
    """Lab positions (mm) of dxtbx pixel coordinates, via dxtbx's own functions.

    ``pixel_to_millimeter`` (parallax-corrected when the panel's strategy is)
    then ``get_lab_coord``, both on flex arrays. Output shape ``fast_px.shape + (3,)``.
    """
    from dxtbx import flumpy

    xy = np.stack(np.broadcast_arrays(fast_px, slow_px), -1).astype(np.float64)
    lab = panel.get_lab_coord(panel.pixel_to_millimeter(_flex_vec2(xy)))
    return flumpy.to_numpy(lab).reshape(xy.shape[:-1] + (3,))


def triangle_solid_angle(r1: np.ndarray, r2: np.ndarray, r3: np.ndarray) -> np.ndarray:
    """Solid angle (sr) of triangles seen from the origin (Van Oosterom & Strackee 1983).

    tan(Ω/2) = |r1·(r2×r3)| / (r1 r2 r3 + (r1·r2) r3 + (r1·r3) r2 + (r2·r3) r1).
    """
    def dot(a, b):
        return np.einsum("...i,...i->...", a, b)

    n1, n2, n3 = (np.sqrt(dot(r, r)) for r in (r1, r2, r3))
    numerator = np.abs(dot(r1, np.cross(r2, r3)))
    denominator = n1 * n2 * n3 + dot(r1, r2) * n3 + dot(r1, r3) * n2 + dot(r2, r3) * n1
    return 2.0 * np.arctan2(numerator, denominator)


def pixel_solid_angles(panel) -> np.ndarray:
    """Ω (sr) of every pixel: the quadrilateral of its corners, as two triangles.

    Corners at integer pixel coordinates go through the same dxtbx functions
    as the centres, so with parallax Ω is the solid angle of the rays dxtbx
    assigns to the pixel.
    """
    n_fast, n_slow = panel.get_image_size()
    f, s = np.meshgrid(np.arange(n_fast + 1.0), np.arange(n_slow + 1.0))
    c = lab_at_pixels(panel, f, s)  # (n_slow + 1, n_fast + 1, 3)
    c00, c01, c11, c10 = c[:-1, :-1], c[:-1, 1:], c[1:, 1:], c[1:, :-1]
    return triangle_solid_angle(c00, c01, c11) + triangle_solid_angle(c00, c11, c10)


@dataclass
class PixelGeometry:
    """Pixel-centre geometry of one panel for one beam (shared by all images)."""

    lab: np.ndarray  # (n_slow, n_fast, 3) mm, sample at the origin
    s1: np.ndarray  # (n_slow, n_fast, 3) Å⁻¹, |s1| = 1/λ
    q: np.ndarray  # s1 − s0 (Å⁻¹), |q| = 1/d
    d_star: np.ndarray  # |q| (Å⁻¹)
    solid_angle: np.ndarray  # Ω (sr)

    @property
    def shape(self) -> tuple:
        return self.lab.shape[:2]


def pixel_geometry(panel, beam) -> PixelGeometry:
    n_fast, n_slow = panel.get_image_size()
    f, s = np.meshgrid(np.arange(n_fast) + 0.5, np.arange(n_slow) + 0.5)
    lab = lab_at_pixels(panel, f, s)
    distance = np.sqrt(np.einsum("...i,...i->...", lab, lab))
    s1 = lab / (distance[..., None] * beam.get_wavelength())
    q = s1 - np.asarray(beam.get_s0(), dtype=np.float64)
    d_star = np.sqrt(np.einsum("...i,...i->...", q, q))
    return PixelGeometry(lab, s1, q, d_star, pixel_solid_angles(panel))


# --------------------------------------------------------------------------- factors


def polarization_factor(s1: np.ndarray, s0, polarization_normal, fraction: float) -> np.ndarray:
    """Thomson factor of a beam with a fraction ``fraction`` of its intensity polarised in the plane ⟂ n.

    A dipole driven along the unit vector ê radiates ∝ |ŝ1 × ê|² = 1 − (ŝ1·ê)².
    The E-field is along ê₁ = n̂ × ŝ0 with weight f (DIALS's convention: the
    fraction in the plane normal to the polarisation normal n), along n̂ with
    weight 1 − f: ``P = f |ŝ1 × ê₁|² + (1 − f) |ŝ1 × n̂|²`` (f = ½: (1 + cos²2θ)/2).
    """
    u0 = np.asarray(s0, dtype=np.float64)
    u0 = u0 / np.linalg.norm(u0)
    n = np.asarray(polarization_normal, dtype=np.float64)
    n = n - np.dot(n, u0) * u0  # the field is transverse
    n = n / np.linalg.norm(n)
    e1 = np.cross(n, u0)
    u1 = s1 / np.linalg.norm(s1, axis=-1, keepdims=True)
    along_e1 = np.cross(u1, e1)
    along_n = np.cross(u1, n)
    return fraction * np.einsum("...i,...i->...", along_e1, along_e1) + (1.0 - fraction) * np.einsum(
        "...i,...i->...", along_n, along_n
    )


def energy_kev(wavelength: float) -> float:
    return HC_KEV_ANGSTROM / float(wavelength)


def sensor_attenuation(material: str, wavelength: float) -> float:
    """Linear attenuation coefficient μ (mm⁻¹) of a sensor, xraylib total cross-section.

    μ = (μ/ρ)·ρ with μ/ρ = ``CS_Total`` (photoelectric + Rayleigh + Compton,
    cm²/g) and ρ xraylib's element density, or the NIST compound density.
    """
    import xraylib

    e = energy_kev(wavelength)
    if material in SENSOR_COMPOUNDS:
        data = xraylib.GetCompoundDataNISTByName(SENSOR_COMPOUNDS[material])
        mu_rho = sum(
            w * xraylib.CS_Total(z, e) for z, w in zip(data["Elements"], data["massFractions"])
        )
        density = data["density"]
    else:
        z = xraylib.SymbolToAtomicNumber(material)
        mu_rho, density = xraylib.CS_Total(z, e), xraylib.ElementDensity(z)
    return mu_rho * density / 10.0


def sensor_absorption(panel, s1: np.ndarray, mu: float, thickness_mm: float) -> np.ndarray:
    """η = 1 − exp(−μ t / cos ψ): the fraction of photons stopped in the sensor.

    ψ is the angle between the ray and the panel normal (path t / cos ψ through
    a slab of thickness t).
    """
    normal = np.cross(panel.get_fast_axis(), panel.get_slow_axis())
    normal = normal / np.linalg.norm(normal)
    cos_psi = np.abs(s1 @ normal) / np.linalg.norm(s1, axis=-1)
    return -np.expm1(-mu * thickness_mm / cos_psi)


def air_attenuation(wavelength: float, pressure_kpa: float, temperature_k: float) -> float:
    """μ_air (mm⁻¹): NIST dry-air mass fractions × xraylib CS_Total, ideal-gas density."""
    import xraylib

    e = energy_kev(wavelength)
    data = xraylib.GetCompoundDataNISTByName(AIR_NIST_NAME)
    mu_rho = sum(w * xraylib.CS_Total(z, e) for z, w in zip(data["Elements"], data["massFractions"]))
    density = AIR_REFERENCE_DENSITY * (pressure_kpa / AIR_REFERENCE_KPA) * (AIR_REFERENCE_K / temperature_k)
    return mu_rho * density / 10.0


def air_transmission(lab: np.ndarray, mu_air: float) -> np.ndarray:
    """T = exp(−μ_air L), L = sample-to-pixel distance (mm)."""
    return np.exp(-mu_air * np.sqrt(np.einsum("...i,...i->...", lab, lab)))


@dataclass
class PanelFactors:
    """Ω (sr), P, η, T_air of one panel; ``diffuse`` = Ω/1e-6 · P η T (per µsr)."""

    solid_angle: np.ndarray
    polarization: np.ndarray
    sensor: np.ndarray
    air: np.ndarray

    @property
    def bragg(self) -> np.ndarray:
        """Factor of a spot's photons at a pixel (its own Ω is in the spot model)."""
        return self.polarization * self.sensor * self.air

    @property
    def diffuse(self) -> np.ndarray:
        return self.solid_angle / 1e-6 * self.bragg


def forward_factors(detector, beam, geometry, sensor, air_pressure_kpa: float, air_temperature_k: float):
    """Per panel :class:`PanelFactors`; ``sensor`` = (mu mm⁻¹, thickness mm) or None (η = 1)."""
    mu_air = air_attenuation(beam.get_wavelength(), air_pressure_kpa, air_temperature_k)
    out = []
    for panel, g in zip(detector, geometry):
        eta = np.ones(g.shape) if sensor is None else sensor_absorption(panel, g.s1, *sensor)
        out.append(
            PanelFactors(
                solid_angle=g.solid_angle,
                polarization=polarization_factor(
                    g.s1, beam.get_s0(), beam.get_polarization_normal(), beam.get_polarization_fraction()
                ),
                sensor=eta,
                air=air_transmission(g.lab, mu_air),
            )
        )
    return out, mu_air
