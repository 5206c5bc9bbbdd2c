"""Per-detector correction multipliers and the per-shot attenuation coefficients.

What diffuse.correct computes once per detector (the forward factors Ω, P, η,
T of every pixel, their multipliers and the direction-only path lengths of the
λ-dependent factors) and once per shot (its attenuation coefficients μ(λ)).
Formulas: docs/corrections.md; the factors of one pixel are in
:mod:`diffuse_cli.correction_factors`. Every name here is also importable from
:mod:`diffuse_cli.corrections`; a shot's ``total`` is
:func:`diffuse_cli.corrections.shot_total`.

Lengths are mm, wave vectors Å⁻¹, attenuation coefficients mm⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffuse_cli.correction_factors import (
    MICROSTERADIAN,
    ROOM_TEMPERATURE_K,
    STANDARD_PRESSURE_KPA,
    KaptonParams,
    _norm,
    air_mu,
    air_transmission,
    cos_incidence,
    kapton_mu,
    kapton_transmission,
    panel_normal,
    polarization,
    sensor_efficiency,
    sensor_mu,
    solid_angle,
)


# ------------------------------------------------------------------ per detector


@dataclass
class CorrectionOptions:
    """Which corrections to compute and their settings.

    ``efficiency``: "auto" applies the sensor efficiency when the panel has a
    thickness (and mu or material), "on" requires it, "off" skips it.
    """

    solid_angle_exact: bool = False
    polarization: bool = True
    efficiency: str = "auto"
    sensor_material: str | None = None
    sensor_thickness_mm: float | None = None
    air: bool = True
    air_pressure_kpa: float = STANDARD_PRESSURE_KPA
    air_temperature_k: float = ROOM_TEMPERATURE_K
    kapton: KaptonParams | None = None
    notes: list = field(default_factory=list)


MULTIPLIER_NAMES = ("solid_angle", "polarization", "efficiency", "air", "kapton")
#: Changes whenever a factor's formula changes, so that diffuse.correct recomputes
#: factors files made by older code (2: Ω of the parallax entry patch).
FORMULAS_VERSION = 2


def _efficiency_applies(panel, options: CorrectionOptions) -> bool:
    if options.efficiency == "off":
        return False
    thickness = options.sensor_thickness_mm or panel.get_thickness()
    has_mu = panel.get_mu() > 0 or bool(options.sensor_material or panel.get_material())
    if thickness > 0 and has_mu:
        return True
    if options.efficiency == "on":
        raise ValueError(
            f"sensor efficiency requested but panel {panel.get_name()!r} has no "
            "thickness/material; set sensor.thickness_mm and sensor.material"
        )
    return False


def panel_factors(panel, beam, lab_mm: np.ndarray, s1: np.ndarray, options: CorrectionOptions) -> dict:
    """Forward factors of one panel: Ω (sr), P, η, T_air, T_kapton (arrays or None)."""
    wavelength = beam.get_wavelength()
    out = {"solid_angle": solid_angle(panel, lab_mm, exact=options.solid_angle_exact)}
    out["polarization"] = polarization(s1, beam) if options.polarization else None
    if _efficiency_applies(panel, options):
        mu = sensor_mu(panel, wavelength, material=options.sensor_material)
        out["efficiency"] = sensor_efficiency(
            panel, s1, wavelength, mu=mu, thickness_mm=options.sensor_thickness_mm
        )
    else:
        out["efficiency"] = None
    out["air"] = (
        air_transmission(lab_mm, wavelength, options.air_pressure_kpa, options.air_temperature_k)
        if options.air
        else None
    )
    out["kapton"] = kapton_transmission(s1, beam, options.kapton) if options.kapton else None
    return out


def geometry_from_s1(detector, s1: np.ndarray, s0) -> list:
    """PanelGeometry per panel rebuilt from cached pixel directions (no dxtbx calls).

    A pixel centre lies on its panel plane ``x·n̂ = d`` (d = origin·n̂), so its
    lab position is ``ŝ1 · d / (ŝ1·n̂)``: exact for flat panels, parallax
    included (the cache's s1 already has it). ``s1`` is (Npix, 3) in pixel
    order; float32 input gives positions to ~1e-7 relative.
    """
    from diffuse_cli.geometry import PanelGeometry, q_from_s1

    s1 = np.asarray(s1, dtype=np.float64)
    out = []
    start = 0
    for panel_id, panel in enumerate(detector):
        n_fast, n_slow = panel.get_image_size()
        stop = start + n_fast * n_slow
        if stop > len(s1):
            raise ValueError("fewer cached pixels than the detector has")
        v = s1[start:stop].reshape(n_slow, n_fast, 3)
        n = panel_normal(panel)
        d = float(np.array(panel.get_origin()) @ n)
        lab = v * (d / (v @ n))[..., None]
        out.append(PanelGeometry(panel_id, lab, v, q_from_s1(v, s0)))
        start = stop
    if start != len(s1):
        raise ValueError(f"{len(s1)} cached pixels, the detector has {start}")
    return out


def detector_multipliers(detector, beam, options: CorrectionOptions | None = None, geometry=None) -> dict:
    """Multiplier arrays for every pixel of a detector, in pixel order.

    Returns a dict of 1-D float64 arrays of length Npix (panel-major, slow,
    fast): ``solid_angle`` = 1e-6/Ω (per microsteradian), ``polarization`` =
    1/P, ``efficiency`` = 1/η, ``air`` = 1/T_air, ``kapton`` = 1/T_kapton
    (a correction not applied is all ones and absent from ``applied``),
    ``total`` = their product, ``omega_sr`` = Ω, and ``applied`` (list of
    names). ``geometry`` is an optional list of PanelGeometry to reuse.
    """
    from diffuse_cli.geometry import detector_geometry

    options = options or CorrectionOptions()
    if geometry is None:
        geometry = detector_geometry(detector, beam)
    parts = {name: [] for name in MULTIPLIER_NAMES}
    omega = []
    applied = set()
    for panel, g in zip(detector, geometry):
        forward = panel_factors(panel, beam, g.lab, g.s1, options)
        omega.append(forward["solid_angle"].ravel())
        for name in MULTIPLIER_NAMES:
            value = forward[name]
            if value is None:
                parts[name].append(np.ones(g.shape[0] * g.shape[1]))
                continue
            applied.add(name)
            if name == "solid_angle":
                parts[name].append(MICROSTERADIAN / value.ravel())
            else:
                parts[name].append(1.0 / value.ravel())
    out = {name: np.concatenate(v) for name, v in parts.items()}
    total = np.ones_like(out["solid_angle"])
    for name in MULTIPLIER_NAMES:
        total *= out[name]
    out["total"] = total
    out["omega_sr"] = np.concatenate(omega)
    out["applied"] = [n for n in MULTIPLIER_NAMES if n in applied]
    return out


# ------------------------------------------------------------------ per shot: λ-dependent factors
#
# Ω and P depend on pixel directions only (P on the beam direction and its
# polarization, not on λ); η, T_air and T_kapton are all exp(±μ(λ)·path) with
# a direction-only path per pixel. So a detector's factors file holds Ω, P and
# the paths once, and each shot needs only its attenuation coefficients:
#
#   total(λ) = (1e-6/Ω)·(1/P) · exp(μ_air(λ)·L) · exp(μ_k(λ)·ℓ_k) / (1 − exp(−μ_s(λ)·τ))
#
# exact (no interpolation), evaluated for the used pixels of each shot.

WAVELENGTH_COEFFICIENTS = ("air_mu_per_mm", "sensor_mu_per_mm", "kapton_mu_per_mm")


def wavelength_coefficients(detector, wavelength: float, options: CorrectionOptions | None = None) -> dict:
    """Attenuation coefficients (mm⁻¹) of one shot's λ-dependent factors.

    ``sensor_mu_per_mm``: (P,) per panel, 0 where the sensor efficiency is
    not applied; ``air_mu_per_mm`` and ``kapton_mu_per_mm``: scalars, 0 when
    not applied. ``detector`` is the shot's own (its panels' μ are the
    format's for the shot's wavelength, as :func:`sensor_mu` uses them).
    """
    options = options or CorrectionOptions()
    sensor = np.zeros(len(detector), dtype=np.float64)
    for i, panel in enumerate(detector):
        if _efficiency_applies(panel, options):
            sensor[i] = sensor_mu(panel, wavelength, material=options.sensor_material)
    air = air_mu(wavelength, options.air_pressure_kpa, options.air_temperature_k) if options.air else 0.0
    kapton = kapton_mu(wavelength) if options.kapton else 0.0
    return {"air_mu_per_mm": float(air), "sensor_mu_per_mm": sensor, "kapton_mu_per_mm": float(kapton)}


def path_lengths(detector, beam, geometry, options: CorrectionOptions | None = None) -> dict:
    """Direction-only path lengths (mm, flat pixel order) of the λ-dependent factors.

    ``air_path_mm`` L = |r|; ``sensor_path_mm`` τ = t/cos ψ on panels whose
    efficiency applies (0 elsewhere); ``kapton_path_mm`` ℓ_k through the tape
    (DIALS's model: ln(1/T_kapton)/μ_k at ``beam``'s wavelength). Absent when
    the correction is off. ``geometry``: list of PanelGeometry.
    """
    options = options or CorrectionOptions()
    out = {}
    if options.air:
        out["air_path_mm"] = np.concatenate([_norm(g.lab).ravel() for g in geometry])
    taus, any_sensor = [], False
    for panel, g in zip(detector, geometry):
        if _efficiency_applies(panel, options):
            any_sensor = True
            t = float(panel.get_thickness()) if options.sensor_thickness_mm is None else float(options.sensor_thickness_mm)
            taus.append((t / cos_incidence(panel, g.s1)).ravel())
        else:
            taus.append(np.zeros(g.shape[0] * g.shape[1]))
    if any_sensor:
        out["sensor_path_mm"] = np.concatenate(taus)
    if options.kapton:
        T = np.concatenate([kapton_transmission(g.s1, beam, options.kapton).ravel() for g in geometry])
        out["kapton_path_mm"] = -np.log(T) / kapton_mu(beam.get_wavelength())
    return out


def pack_coefficients(c: dict) -> np.ndarray:
    """One array for a still file: [μ_air, μ_kapton, μ_sensor of each panel] (mm⁻¹)."""
    return np.concatenate([[c["air_mu_per_mm"], c["kapton_mu_per_mm"]], np.ravel(c["sensor_mu_per_mm"])]).astype(np.float64)


def same_coefficients(a: dict, b: dict) -> bool:
    """True when two shots' attenuation coefficients are identical (same wavelength and options)."""
    return all(np.array_equal(np.asarray(a[n], dtype=np.float64), np.asarray(b[n], dtype=np.float64))
               for n in WAVELENGTH_COEFFICIENTS)
