"""Per-pixel corrections against hand-derived values and DIALS's own code.

Reference numbers used below (independent of the code under test):

* NIST XCOM (Hubbell & Seltzer) mass attenuation coefficients, total with
  coherent scattering: Si 33.89 cm²/g at 10 keV and 10.34 cm²/g at 15 keV,
  density 2.33 g/cm³; dry air 5.120 cm²/g at 10 keV and 1.614 cm²/g at 15 keV.
  Between nodes we interpolate log-log by hand.
* Ideal gas: dry air at 101.325 kPa and 293.15 K has ρ = 1.2041e-3 g/cm³.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from diffuse_cli import corrections as C
from diffuse_cli.geometry import detector_geometry, pixel_lab_coordinates, s1_from_lab, two_theta

from dxtbx.model import BeamFactory, Detector, DetectorFactory, Panel

WAVELENGTH = 1.0  # Å, 12.398 keV


def loglog(e, e1, v1, e2, v2):
    """Hand log-log interpolation between two tabulated NIST nodes."""
    t = math.log(e / e1) / math.log(e2 / e1)
    return math.exp(math.log(v1) + t * (math.log(v2) - math.log(v1)))


SI_MU_RHO_12398 = loglog(12398.42, 10000, 33.89, 15000, 10.34)  # ≈ 18.05 cm²/g
AIR_MU_RHO_12398 = loglog(12398.42, 10000, 5.120, 15000, 1.614)  # ≈ 2.775 cm²/g
AIR_RHO = 101325 * 28.9647 / (8.314462618 * 293.15) * 1e-6  # g/cm³


def make_beam(wavelength=WAVELENGTH, fraction=0.999, normal=(0, 1, 0)):
    return BeamFactory.make_polarized_beam(
        sample_to_source=(0, 0, 1),
        wavelength=wavelength,
        polarization=normal,
        polarization_fraction=fraction,
    )


def flat_detector():
    """0.1 mm pixels at 100 mm; pixel (fast=1050, slow=50) sits at lab (100, 0, -100)."""
    det = DetectorFactory.simple(
        "PAD", 100.0, (5.05, 5.05), "+x", "-y", (0.1, 0.1), (1200, 100)
    )
    det[0].set_thickness(0.45)
    det[0].set_material("Si")
    return det


def tilted_panel(centre=(0.0, 0.0, -100.0), tilt_deg=30.0, pixel=0.2, size=(600, 400), at=(300, 200)):
    """Panel whose normal is tilted by ``tilt_deg`` about x; pixel ``at`` is centred on ``centre``."""
    t = math.radians(tilt_deg)
    f = np.array([1.0, 0.0, 0.0])
    s = np.array([0.0, math.cos(t), -math.sin(t)])
    origin = np.array(centre) - (at[0] + 0.5) * pixel * f - (at[1] + 0.5) * pixel * s
    p = Panel()
    p.set_frame(tuple(f), tuple(s), tuple(origin))
    p.set_pixel_size((pixel, pixel))
    p.set_image_size(size)
    p.set_thickness(0.45)
    p.set_material("Si")
    p.set_name("tilted")
    return p


# ------------------------------------------------------------------ flat detector, 2θ = 45°


def test_flat_pixel_at_45_degrees_every_factor():
    det = flat_detector()
    beam = make_beam()
    lab = pixel_lab_coordinates(det[0])
    s1 = s1_from_lab(lab, WAVELENGTH)
    j, i = 50, 1050
    assert np.allclose(lab[j, i], [100.0, 0.0, -100.0], atol=1e-9)
    assert math.degrees(two_theta(s1[j, i], beam.get_s0())) == pytest.approx(45.0, abs=1e-9)

    # Ω = A cosψ / r² = 0.01 mm² · cos45° / (2·100² mm²)
    omega = C.solid_angle(det[0], lab)
    assert omega.shape == (100, 1200)
    assert omega[j, i] == pytest.approx(0.01 * math.sqrt(0.5) / 20000.0, rel=1e-12)
    # pixel on the beam: Ω = A / d²
    assert omega[50, 50] == pytest.approx(0.01 / 100.0**2, rel=1e-12)

    # horizontal polarization (normal = +y), scattering in the horizontal plane:
    # P = f·cos²2θ + (1−f)·1
    P = C.polarization(s1, beam)
    assert P[j, i] == pytest.approx(0.999 * 0.5 + 0.001, rel=1e-12)

    # 450 µm Si at 12.4 keV, ray 45° to the normal
    mu = SI_MU_RHO_12398 * 2.33 / 10.0  # mm⁻¹
    eta = C.sensor_efficiency(det[0], s1, WAVELENGTH)
    assert eta[j, i] == pytest.approx(1 - math.exp(-mu * 0.45 / math.sqrt(0.5)), rel=2e-3)
    assert eta[50, 50] == pytest.approx(1 - math.exp(-mu * 0.45), rel=2e-3)
    assert 0.84 < eta[50, 50] < 0.86  # the familiar "85% at 12.4 keV" for 450 µm Si

    # air over 141.42 mm
    T = C.air_transmission(lab, WAVELENGTH)
    mu_air = AIR_MU_RHO_12398 * AIR_RHO / 10.0
    assert T[j, i] == pytest.approx(math.exp(-mu_air * 100 * math.sqrt(2)), rel=5e-4)
    assert T[j, i] == pytest.approx(0.9538, abs=2e-4)


def test_polarization_vertical_and_unpolarised():
    beam = make_beam(fraction=0.999)
    s1 = np.array([[0.0, 100.0, -100.0], [100.0, 0.0, -100.0]])
    P = C.polarization(s1, beam)
    # vertical scattering with horizontal E-field: f·1 + (1−f)·cos²2θ
    assert P[0] == pytest.approx(0.999 + 0.001 * 0.5, rel=1e-12)
    unpol = C.polarization(s1, make_beam(fraction=0.5))
    assert np.allclose(unpol, (1 + 0.5) / 2, rtol=1e-12)


def test_polarization_matches_dials_corrections():
    from dials.algorithms.integration import Corrections

    rng = np.random.default_rng(3)
    det = flat_detector()
    for fraction in (0.5, 0.8, 0.999):
        for normal in ((0, 1, 0), (1, 0, 0), (math.sqrt(0.5), math.sqrt(0.5), 0)):
            beam = make_beam(fraction=fraction, normal=normal)
            corr = Corrections(beam, det)  # no goniometer: stills, lp = 1/P
            s1 = rng.normal(size=(50, 3))
            s1[:, 2] = -np.abs(s1[:, 2])
            s1 = s1 / np.linalg.norm(s1, axis=1, keepdims=True) / WAVELENGTH
            ours = C.polarization(s1, beam)
            dials = np.array([1.0 / corr.lp(tuple(v)) for v in s1])
            assert np.allclose(ours, dials, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ tilted panel


def test_tilted_panel_solid_angle_and_efficiency():
    panel = tilted_panel()
    lab = pixel_lab_coordinates(panel)
    assert np.allclose(lab[200, 300], [0, 0, -100], atol=1e-9)
    normal = C.panel_normal(panel)
    assert abs(normal @ [0, 0, 1]) == pytest.approx(math.cos(math.radians(30)))
    omega = C.solid_angle(panel, lab)
    A = 0.04
    # on-beam pixel: ψ = 30°
    assert omega[200, 300] == pytest.approx(A * math.cos(math.radians(30)) / 100.0**2, rel=1e-12)
    # the pixel 250 columns (50 mm) along x: r = (50, 0, -100), cosψ = 100·cos30/|r|
    r = math.hypot(50, 100)
    assert np.allclose(lab[200, 550], [50, 0, -100], atol=1e-9)
    assert omega[200, 550] == pytest.approx(A * (100 * math.cos(math.radians(30)) / r) / r**2, rel=1e-12)

    s1 = s1_from_lab(lab, WAVELENGTH)
    mu = 0.7  # mm⁻¹ set on the panel wins over the material
    panel.set_mu(mu)
    eta = C.sensor_efficiency(panel, s1, WAVELENGTH)
    assert eta[200, 300] == pytest.approx(1 - math.exp(-mu * 0.45 / math.cos(math.radians(30))), rel=1e-12)


def test_exact_rectangle_solid_angle():
    # a large (10 mm) pixel at 20 mm, tilted 30°: point formula is off at the
    # (a/r)² level; the exact rectangle matches a brute-force sub-pixel sum.
    panel = tilted_panel(centre=(5.0, 3.0, -20.0), pixel=10.0, size=(3, 3), at=(1, 1))
    lab = pixel_lab_coordinates(panel)
    exact = C.solid_angle(panel, lab, exact=True)
    approx = C.solid_angle(panel, lab)
    f = np.array(panel.get_fast_axis())
    s = np.array(panel.get_slow_axis())
    n = C.panel_normal(panel)
    m = 400
    u = (np.arange(m) + 0.5) / m - 0.5
    sub = lab[1, 1] + 10.0 * (u[:, None, None] * f + u[None, :, None] * s)
    r = np.linalg.norm(sub, axis=-1)
    brute = np.sum((10.0 / m) ** 2 * np.abs(sub @ n) / r**3)
    assert exact[1, 1] == pytest.approx(brute, rel=1e-5)
    assert abs(approx[1, 1] / exact[1, 1] - 1) > 1e-3  # the approximation matters here
    # ... and not for a real pixel: 172 µm at 100 mm, 2θ up to 60°
    det = DetectorFactory.simple("PAD", 100.0, (0.0, 0.0), "+x", "-y", (0.172, 0.172), (1000, 10))
    lab = pixel_lab_coordinates(det[0])
    rel = C.solid_angle(det[0], lab) / C.solid_angle(det[0], lab, exact=True) - 1
    assert np.abs(rel).max() < 1e-6


# ------------------------------------------------------------------ attenuation tables


def test_air_attenuation_against_nist_air_table():
    # element mixture reproduces NIST's tabulated dry air at the nodes
    assert C.air_mass_attenuation(C.HC_EV_ANGSTROM / 10000.0) == pytest.approx(5.120, rel=5e-3)
    assert C.air_mass_attenuation(C.HC_EV_ANGSTROM / 15000.0) == pytest.approx(1.614, rel=5e-3)
    assert C.air_density() == pytest.approx(1.2041e-3, rel=2e-4)
    # half the pressure, twice the attenuation length
    assert C.air_mu(1.0, pressure_kpa=50.6625) == pytest.approx(C.air_mu(1.0) / 2, rel=1e-12)
    lab = np.array([0.0, 0.0, -1000.0])
    assert C.air_transmission(lab, 1.0) == pytest.approx(
        math.exp(-AIR_MU_RHO_12398 * AIR_RHO * 100.0), rel=2e-3
    )


def test_sensor_mu_follows_dxtbx():
    from cctbx.eltbx import attenuation_coefficient

    panel = tilted_panel()
    lam = C.HC_EV_ANGSTROM / 10000.0
    assert C.sensor_mu(panel, lam) == pytest.approx(33.89 * 2.33 / 10, rel=1e-3)
    assert C.sensor_mu(panel, lam) == pytest.approx(
        attenuation_coefficient.get_table("Si").mu_at_angstrom(lam) / 10.0, rel=1e-12
    )
    panel.set_material("")
    with pytest.raises(ValueError, match="material"):
        C.sensor_mu(panel, lam)
    panel.set_thickness(0.0)
    with pytest.raises(ValueError, match="thickness"):
        C.sensor_efficiency(panel, np.array([0, 0, -1.0]), lam, mu=1.0)


# ------------------------------------------------------------------ multi-panel and combined


def two_panel_detector():
    det = Detector()
    flat = flat_detector()[0]
    det.add_panel(flat)
    det.add_panel(tilted_panel(centre=(0.0, 100.0, -100.0), at=(300, 200)))
    return det


def test_multipanel_combined_factor_against_hand_values():
    det = two_panel_detector()
    beam = make_beam()
    opts = C.CorrectionOptions()
    m = C.detector_multipliers(det, beam, opts)
    n0 = 1200 * 100
    assert m["total"].shape == (n0 + 600 * 400,)
    assert m["applied"] == ["solid_angle", "polarization", "efficiency", "air"]
    assert np.all(m["kapton"] == 1)

    mu = SI_MU_RHO_12398 * 2.33 / 10.0
    mu_air = AIR_MU_RHO_12398 * AIR_RHO / 10.0

    # panel 0, pixel at (100, 0, -100): 2θ = 45° horizontal
    k0 = 50 * 1200 + 1050
    omega = 0.01 * math.sqrt(0.5) / 20000.0
    P = 0.999 * 0.5 + 0.001
    eta = 1 - math.exp(-mu * 0.45 / math.sqrt(0.5))
    T = math.exp(-mu_air * 100 * math.sqrt(2))
    assert m["solid_angle"][k0] == pytest.approx(1e-6 / omega, rel=1e-12)
    assert m["total"][k0] == pytest.approx(1e-6 / omega / P / eta / T, rel=3e-3)

    # panel 1, pixel at (0, 100, -100): 2θ = 45° vertical, ψ between ray and
    # the normal (0, sin30, cos30): cosψ = |(0,1,-1)/√2 · n| = |sin30 − cos30|/√2
    k1 = n0 + 200 * 600 + 300
    cospsi = abs(0.5 - math.cos(math.radians(30))) / math.sqrt(2)
    omega = 0.04 * cospsi / 20000.0
    P = 0.999 + 0.001 * 0.5
    eta = 1 - math.exp(-mu * 0.45 / cospsi)
    assert m["omega_sr"][k1] == pytest.approx(omega, rel=1e-12)
    assert m["polarization"][k1] == pytest.approx(1 / P, rel=1e-12)
    assert m["total"][k1] == pytest.approx(1e-6 / omega / P / eta / T, rel=3e-3)

    # every panel's slice equals the single-panel functions, in pixel order
    geo = detector_geometry(det, beam)
    for pid, (start, stop) in enumerate([(0, n0), (n0, len(m["total"]))]):
        g = geo[pid]
        expect = (
            1e-6
            / C.solid_angle(det[pid], g.lab)
            / C.polarization(g.s1, beam)
            / C.sensor_efficiency(det[pid], g.s1, WAVELENGTH)
            / C.air_transmission(g.lab, WAVELENGTH)
        ).ravel()
        assert np.allclose(m["total"][start:stop], expect, rtol=1e-12)


def test_options_switch_corrections_off_and_efficiency_modes():
    det = two_panel_detector()
    beam = make_beam()
    m = C.detector_multipliers(
        det, beam, C.CorrectionOptions(polarization=False, air=False, efficiency="off")
    )
    assert m["applied"] == ["solid_angle"]
    assert np.allclose(m["total"], 1e-6 / m["omega_sr"])
    for p in det:
        p.set_thickness(0.0)
    m = C.detector_multipliers(det, beam, C.CorrectionOptions(efficiency="auto"))
    assert "efficiency" not in m["applied"]
    with pytest.raises(ValueError, match="thickness"):
        C.detector_multipliers(det, beam, C.CorrectionOptions(efficiency="on"))
    m = C.detector_multipliers(
        det, beam, C.CorrectionOptions(efficiency="on", sensor_thickness_mm=0.45, sensor_material="Si")
    )
    assert "efficiency" in m["applied"]


def test_kapton_matches_dials_scalar_model():
    from scitbx import matrix

    from dials.algorithms.integration.kapton_correction import KaptonAbsorption

    beam = make_beam(wavelength=1.3)
    params = C.KaptonParams(height_above_kapton_mm=0.02, thickness_mm=0.05, half_width_mm=1.5875, rotation_angle_deg=1.15)
    rng = np.random.default_rng(1)
    s1 = rng.normal(size=(200, 3))
    s1[:, 2] = -np.abs(s1[:, 2]) - 0.3
    T = C.kapton_transmission(s1, beam, params)
    model = KaptonAbsorption(0.02, 0.05, 1.5875, 1.15, wavelength_ang=1.3, beam=beam)
    ref = np.array([1.0 / model.abs_correction(matrix.col(v).normalize()) for v in s1])
    assert np.allclose(T, ref, rtol=1e-12)
    assert (T < 1).any() and (T == 1).any()  # some rays shadowed by the tape, some not
    # by hand: a ray at 60° from the beam towards +x crosses the whole tape
    # (surface normal (−1,0,0) turned 1.15° about the beam): path = t/(sin60°·cos1.15°);
    # Kapton attenuation length at 12398.425/1.3 = 9537.25 eV interpolated in
    # DIALS's Henke table: 2005.82 + (37.25/70)·(2051.65 − 2005.82) µm.
    att_mm = (2005.82 + 37.25 / 70 * (2051.65 - 2005.82)) / 1000
    path = 0.05 / (math.sin(math.radians(60)) * math.cos(math.radians(1.15)))
    ray = np.array([[math.sin(math.radians(60)), 0, -math.cos(math.radians(60))],
                    [-math.sin(math.radians(60)), 0, -math.cos(math.radians(60))]])
    T = C.kapton_transmission(ray, beam, params)
    assert T[0] == pytest.approx(math.exp(-path / att_mm), rel=1e-6)
    assert T[1] == 1.0  # away from the tape


# ------------------------------------------------------------------ intensities and variances


def test_corrected_intensity_inverts_forward_model_and_propagates_variance():
    rng = np.random.default_rng(0)
    total = rng.uniform(0.5, 5.0, 1000)
    I_true = rng.uniform(0, 100, 1000)
    for gain in (1.0, 2.5):
        counts = C.expected_counts(I_true, total, exposure_time=0.1, gain=gain, scale=3.0)
        I, sigma = C.corrected_intensity(counts, total, 0.1, gain=gain)
        assert np.allclose(I, 3.0 * I_true, rtol=1e-13)
        # var(photons) = photons = counts/gain → σ(I) = sqrt(counts/gain)·total/t
        assert np.allclose(sigma, np.sqrt(counts / gain) * total / 0.1, rtol=1e-13)
    # background with variance
    I, sigma = C.corrected_intensity(np.array([10.0, -2.0]), np.array([2.0, 2.0]), 0.5, gain=1.0,
                                     background=4.0, background_variance=1.0)
    assert np.allclose(I, [(10 - 4) * 2 / 0.5, (-2 - 4) * 2 / 0.5])
    assert np.allclose(sigma, [math.sqrt(11) * 4, 1.0 * 4])  # negative counts carry no Poisson variance


def test_background_rate_from_images():
    imgs = [np.array([10.0, 0.0, 4.0]), np.array([30.0, 2.0, 4.0])]
    rate, var = C.background_rate(imgs, [1.0, 2.0], gain=2.0)
    assert np.allclose(rate, [(10 + 15) / 2, (0 + 1) / 2, (4 + 2) / 2])
    assert np.allclose(var, [(2 * 10 / 1 + 2 * 30 / 4) / 4, (0 + 2 * 2 / 4) / 4, (2 * 4 + 2 * 4 / 4) / 4])
    with pytest.raises(ValueError):
        C.background_rate([], [])


# ------------------------------------------------------------------ real data


@pytest.mark.real_data
def test_real_water_ring_becomes_isotropic(real_images):
    """Thaumatin still (Pilatus 6M, polarization 0.999): the solvent ring is
    anisotropic in raw counts (horizontal/vertical ≈ cos²2θ) and isotropic
    once corrected: physical truth independent of the code."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from scitbx.array_family import flex

    path = real_images("thaumatin_grid_stills", 1)[0]
    expt = ExperimentListFactory.from_filenames([str(path)])[0]
    panel, beam = expt.detector[0], expt.beam
    raw = expt.imageset.get_raw_data(0)[0].as_numpy_array()
    # every 3rd pixel keeps the test fast
    n_fast, n_slow = panel.get_image_size()
    jj, ii = np.meshgrid(np.arange(0, n_slow, 3), np.arange(0, n_fast, 3), indexing="ij")
    counts = raw[jj, ii].astype(float)
    px = flex.vec2_double(flex.double(ii.ravel() + 0.5), flex.double(jj.ravel() + 0.5))
    lab = panel.get_lab_coord(panel.pixel_to_millimeter(px)).as_numpy_array().reshape(ii.shape + (3,))
    s1 = s1_from_lab(lab, beam.get_wavelength())
    total = (
        1e-6
        / C.solid_angle(panel, lab)
        / C.polarization(s1, beam)
        / C.sensor_efficiency(panel, s1, beam.get_wavelength())
        / C.air_transmission(lab, beam.get_wavelength())
    )
    t = expt.imageset.get_scan().get_exposure_times()[0]
    I, _ = C.corrected_intensity(counts, total, t)
    d = 1.0 / np.linalg.norm(s1 - np.array(beam.get_s0()), axis=-1)
    chi = np.degrees(np.arctan2(s1[..., 1], s1[..., 0]))
    good = counts >= 0

    def trimmed_mean(x):
        return x[x <= np.percentile(x, 98)].mean()

    for lo, hi in [(3.0, 3.4), (2.4, 2.6), (2.0, 2.1)]:
        ring = good & (d > lo) & (d < hi)
        h = ring & ((np.abs(chi) < 20) | (np.abs(chi) > 160))
        v = ring & (np.abs(np.abs(chi) - 90) < 20)
        raw_ratio = trimmed_mean(counts[h]) / trimmed_mean(counts[v])
        cor_ratio = trimmed_mean(I[h]) / trimmed_mean(I[v])
        two_theta = 2 * math.asin(beam.get_wavelength() / (lo + hi))
        assert raw_ratio < 0.95
        assert raw_ratio == pytest.approx(math.cos(two_theta) ** 2, abs=0.04)
        assert cor_ratio == pytest.approx(1.0, abs=0.02)


def test_geometry_from_cached_s1_matches_dxtbx():
    det = two_panel_detector()
    beam = make_beam()
    geo = detector_geometry(det, beam)
    s1 = np.concatenate([g.s1.reshape(-1, 3) for g in geo]).astype(np.float32)
    rebuilt = C.geometry_from_s1(det, s1, beam.get_s0())
    for g, r in zip(geo, rebuilt):
        assert np.allclose(r.lab, g.lab, rtol=3e-7, atol=0)
        assert np.allclose(C.solid_angle(det[g.panel_id], r.lab), C.solid_angle(det[g.panel_id], g.lab), rtol=1e-6)
    with pytest.raises(ValueError):
        C.geometry_from_s1(det, s1[:-1], beam.get_s0())
