"""Order parameters of diffuse.azimuthal_fit with its defaults, against independent truth.

Simulated stills are written here from an analytic model through dxtbx
geometry only (no diffuse_cli geometry or corrections code): a detector
tilted by 20° so that both the polarization factor (36 % modulation at
q = 4 Å⁻¹, λ = 1 Å) and the solid angle (5× round the ring) change with χ.
Truths: S = 0 for an isotropic sample, the Maier–Saupe closed form, no
signal on a blank image, no order in the solvent ring of a real still.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy.special import dawsn

from diffuse_cli.command_line import azimuthal_fit

WAVELENGTH = 1.0  # Å
Q_RING = 4.0  # Å⁻¹ (2π/d): 2θ = 37.1°, polarization modulation sin²2θ = 0.36
DISTANCE = 100.0  # mm, along the beam to the panel plane
TILT = 20.0  # degrees, panel rotated about the lab y axis
PIXEL = 0.4  # mm
N_FAST, N_SLOW = 480, 420
EXPOSURE = 0.1  # s
# dry air (NIST XCOM, Hubbell & Seltzer): μ/ρ = 5.120 and 1.614 cm²/g at 10
# and 15 keV, log-log interpolated to 12.398 keV; ρ = 1.204 mg/cm³ (20 °C, 1 atm)
AIR_MU = float(np.exp(np.interp(np.log(12.398), np.log([10.0, 15.0]), np.log([5.120, 1.614])))) * 1.204e-3 / 10.0  # mm⁻¹
M_TRUE, CHI0_TRUE = 4.0, 35.0  # Maier–Saupe sample


def maier_saupe_closed_form(m):
    """S of f(θ) ∝ exp(m cos²θ), m > 0 (docs/azimuthal_fit.md; written out here)."""
    r = np.sqrt(m)
    return 3.0 / (4.0 * r * dawsn(r)) - 3.0 / (4.0 * m) - 0.5


def tilted_detector():
    """One flat panel, normal tilted by TILT from the beam, holding the whole ring at Q_RING."""
    from dxtbx.model import Detector

    tau = np.radians(TILT)
    fast = np.array([np.cos(tau), 0.0, np.sin(tau)])
    slow = np.array([0.0, -1.0, 0.0])
    # the beam meets the panel at (0, 0, −DISTANCE), 120 mm from its first
    # column, mid slow; the ring spans fast −111…63 mm and slow ±79 mm from there
    origin = np.array([0.0, 0.0, -DISTANCE]) - 120.0 * fast - 84.0 * slow
    det = Detector()
    panel = det.add_panel()
    panel.set_type("SENSOR_PAD")
    panel.set_frame(tuple(fast), tuple(slow), tuple(origin))
    panel.set_pixel_size((PIXEL, PIXEL))
    panel.set_image_size((N_FAST, N_SLOW))
    panel.set_trusted_range((-1, 1e7))
    return det


def pixel_model(det, beam):
    """Per pixel (slow, fast order): q (2π/d), χ (deg) and the recording factor.

    Recording factor = exposure × Ω/µsr × P × T_air: the expected counts per
    unit intensity (photons/µsr/s). Ω = A·cos ψ/r² (flat pixel), P for a beam
    along −z polarized with fraction f along x (polarization normal y),
    T_air = exp(−μ r).
    """
    from scitbx.array_family import flex

    panel = det[0]
    f, s = np.meshgrid(np.arange(N_FAST) + 0.5, np.arange(N_SLOW) + 0.5)
    mm = flex.vec2_double(flex.double(f.ravel() * PIXEL), flex.double(s.ravel() * PIXEL))
    lab = panel.get_lab_coord(mm).as_numpy_array()
    r = np.linalg.norm(lab, axis=1)
    u = lab / r[:, None]
    assert tuple(beam.get_unit_s0()) == (0.0, 0.0, -1.0)
    assert tuple(beam.get_polarization_normal()) == (0.0, 1.0, 0.0)
    two_theta = np.arccos(-u[:, 2])
    q = 4 * np.pi * np.sin(two_theta / 2) / WAVELENGTH
    chi = np.degrees(np.arctan2(u[:, 1], u[:, 0]))
    frac = beam.get_polarization_fraction()
    pol = frac * (1 - u[:, 0] ** 2) + (1 - frac) * (1 - u[:, 1] ** 2)
    normal = np.cross(panel.get_fast_axis(), panel.get_slow_axis())
    omega = PIXEL * PIXEL * np.abs(u @ normal) / r**2
    return q, chi, EXPOSURE * omega / 1e-6 * pol * np.exp(-AIR_MU * r)


def write_still(directory, name, counts, det, beam):
    """A miniCBF holding ``counts`` and an .expt that gives it the tilted detector."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import DetectorFactory, GoniometerFactory, ScanFactory
    from dxtbx.model.experiment_list import ExperimentListFactory
    from scitbx.array_family import flex

    # miniCBF headers cannot hold a tilted panel: write with a flat one, then
    # replace the detector in the experiment list
    flat = DetectorFactory.simple("PAD", DISTANCE, (60.0, 60.0), "+x", "-y", (PIXEL, PIXEL), (N_FAST, N_SLOW), (-1, 1e7), [])
    path = directory / f"{name}_0001.cbf"
    scan = ScanFactory.make_scan((1, 1), EXPOSURE, (0, 0), [0], deg=True)
    data = flex.int(np.ascontiguousarray(counts.reshape(N_SLOW, N_FAST), dtype=np.int32))
    FormatCBFMini.as_file(flat, beam, GoniometerFactory.known_axis((1, 0, 0)), scan, data, str(path))
    expts = ExperimentListFactory.from_filenames([str(path)])
    # the format reads back the default fraction whatever the header says: use it
    assert expts[0].beam.get_polarization_fraction() == pytest.approx(beam.get_polarization_fraction())
    expts[0].detector = det
    expts[0].beam = beam
    out = directory / f"{name}.expt"
    expts.as_file(str(out))
    return out


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    from dxtbx.model import BeamFactory

    d = tmp_path_factory.mktemp("order_parameters")
    det = tilted_detector()
    beam = BeamFactory.simple(WAVELENGTH)  # polarization fraction 0.999 along x
    q, chi, factor = pixel_model(det, beam)
    rng = np.random.default_rng(2024)
    ring = np.exp(-((q - Q_RING) ** 2) / (2 * 0.3**2))
    isotropic = 200.0 + 500.0 * ring  # photons/µsr/s
    # Maier–Saupe: oriented population exp(m cos²(χ − χ0)) on an isotropic one
    oriented = 150.0 + 500.0 * np.exp(M_TRUE * (np.cos(np.radians(chi - CHI0_TRUE)) ** 2 - 1))
    out = {"factor": factor, "chi": chi, "q": q}
    out["isotropic"] = write_still(d, "isotropic", rng.poisson(isotropic * factor), det, beam)
    out["maier_saupe"] = write_still(d, "maier_saupe", rng.poisson(oriented * factor), det, beam)
    out["blank"] = write_still(d, "blank", np.zeros(q.size), det, beam)
    out["flat"] = write_still(d, "flat", np.full(q.size, 1000.0), det, beam)
    out["dir"] = d
    return out


def run_fit(expt, out, *extra):
    azimuthal_fit.run([str(expt), f"q={Q_RING}", "maps.enable=False", "output.plots=False", "output.sasview=False",
                       f"output.directory={out}", f"output.log={out}.log", *extra])
    with open(out / "fits.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["profile"].startswith("azimuthal")]
    assert {r["model"] for r in rows} == {"pseudo_voigt", "maier_saupe"}
    return rows


def test_geometry_gives_the_intended_modulations(stills):
    """The simulated band really carries the 36 % polarization and a χ-dependent solid angle."""
    band = np.abs(stills["q"] - Q_RING) <= 0.02
    assert band.sum() > 2000
    chi = stills["chi"][band]
    assert np.histogram(chi, bins=180, range=(-180, 180))[0].min() > 0  # the whole ring is on the panel
    factor = stills["factor"][band]
    assert factor.max() / factor.min() > 5


def test_isotropic_sample_has_no_order_with_the_defaults(stills, tmp_path):
    rows = run_fit(stills["isotropic"], tmp_path / "default")
    for r in rows:
        assert r["success"] == "true", r["message"]
        assert r["corrections"] == "solid_angle+polarization+air"
        assert abs(float(r["S"])) < 0.01, r
        assert abs(float(r["S_total"])) < 0.01 and abs(float(r["S_data"])) < 0.01, r
        assert r["significant"] == "false" and "not significant" in r["message"]
    log = (tmp_path / "default.log").read_text()
    assert "Corrections applied (corrections.apply=True): solid_angle, polarization, air" in log
    # the same still without corrections: polarization and solid angle are
    # read as significant order, beyond the bound the defaults meet
    raw = run_fit(stills["isotropic"], tmp_path / "raw", "corrections.apply=False")
    for r in raw:
        assert r["corrections"] == "none"
        assert r["significant"] == "true" and abs(float(r["S"])) > 0.01 and abs(float(r["S_data"])) > 0.01, r
    assert "corrections.apply=False" in (tmp_path / "raw.log").read_text()


def test_maier_saupe_sample_gives_the_closed_form(stills, tmp_path):
    truth = maier_saupe_closed_form(M_TRUE)
    assert truth == pytest.approx(0.557, abs=0.001)
    rows = {r["model"]: r for r in run_fit(stills["maier_saupe"], tmp_path / "ms")}
    ms = rows["maier_saupe"]
    assert ms["success"] == "true" and ms["significant"] == "true", ms["message"]
    assert abs(float(ms["S"]) - truth) < 0.01, (ms["S"], ms["S_error"], truth)
    assert float(ms["m"]) == pytest.approx(M_TRUE, rel=0.05)
    # the director, modulo 180°, in the DIALS χ convention
    assert abs((float(ms["centre"]) - CHI0_TRUE + 90) % 180 - 90) < 1.0
    # S_total: <P2> of the whole I(χ) = S × oriented fraction, by quadrature here
    t = np.linspace(0, np.pi, 20001)
    f = 150.0 + 500.0 * np.exp(M_TRUE * (np.cos(t) ** 2 - 1))
    w = f * np.sin(t)
    s_total = np.trapz(w * 0.5 * (3 * np.cos(t) ** 2 - 1), t) / np.trapz(w, t)
    for r in rows.values():
        assert float(r["S_data"]) == pytest.approx(s_total, abs=0.01)


def test_blank_image_is_a_failure_and_flat_is_not_significant(stills, tmp_path):
    for r in run_fit(stills["blank"], tmp_path / "blank"):
        assert r["success"] == "false" and "no signal" in r["message"], r
        assert r["S"] == "nan" and r["S_error"] == "nan"
    # exactly flat raw counts (no corrections, so the profile is flat): S = 0, not significant
    for r in run_fit(stills["flat"], tmp_path / "flat", "corrections.apply=False"):
        assert r["success"] == "true", r["message"]
        assert float(r["S"]) == 0.0 and r["S_error"] == "nan"
        assert r["significant"] == "false" and "not significant" in r["message"]
        assert abs(float(r["S_data"])) < 1e-9


@pytest.fixture(scope="module")
def thaumatin_masked(processed_real, tmp_path_factory):
    """The first thaumatin still (processed once per session) through diffuse.bragg_mask."""
    from diffuse_cli.command_line import bragg_mask

    root = tmp_path_factory.mktemp("thaumatin_order")
    stills = processed_real("thaumatin")["out"] / "stills"
    expt = sorted(stills.glob("*_integrated.expt"))[0]
    bragg_mask.run([str(expt), str(expt).replace("_integrated.expt", "_integrated.refl"),
                    f"output.directory={root / 'masks'}", "nproc=1", f"output.log={root / 'mask.log'}"])
    masks = [p for p in (root / "masks").glob("*.mask") if p.name != "static.mask"]
    assert len(masks) == 1
    return root, expt, masks[0]


@pytest.mark.real_data
@pytest.mark.slow
def test_real_solvent_ring_shows_no_order(thaumatin_masked):
    root, expt, mask = thaumatin_masked
    out = root / "az"
    azimuthal_fit.run([str(expt), str(mask), "q=1.95", "maps.enable=False", "output.plots=False",
                       f"output.directory={out}", f"output.log={root / 'az.log'}"])
    with open(out / "fits.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["profile"].startswith("azimuthal")]
    assert {r["model"] for r in rows} == {"pseudo_voigt", "maier_saupe"}
    for r in rows:
        assert r["corrections"].startswith("solid_angle+polarization")
        assert r["success"] == "true", r["message"]
        assert abs(float(r["S_total"])) < 0.01, r
        assert abs(float(r["S_data"])) < 0.01, r
        assert r["significant"] == "false" or abs(float(r["S"])) < 0.05, r


def test_S_data_error_is_calibrated():
    """σ(S_data) from the bin errors matches the scatter of S_data over noise realisations."""
    from diffuse_cli import order_parameter as op

    chi = np.arange(-179.0, 180.0, 2.0)
    truth = 50.0 + 100.0 * np.exp(M_TRUE * (np.cos(np.radians(chi - CHI0_TRUE)) ** 2 - 1))
    sigma = 0.02 * truth
    rng = np.random.default_rng(8)
    draws = [op.order_parameter_with_error(chi, truth + rng.normal(0, sigma), sigma, CHI0_TRUE) for _ in range(400)]
    S, err = np.array(draws).T
    assert np.std(S) == pytest.approx(np.mean(err), rel=0.12)
    # and the noise-free value is the quadrature <P2> of the profile
    t = np.linspace(0, np.pi, 20001)
    f = 50.0 + 100.0 * np.exp(M_TRUE * (np.cos(t) ** 2 - 1))
    w = f * np.sin(t)
    assert op.order_parameter_with_error(chi, truth, None, CHI0_TRUE)[0] == pytest.approx(
        np.trapz(w * 0.5 * (3 * np.cos(t) ** 2 - 1), t) / np.trapz(w, t), abs=2e-3)
