"""diffuse.azimuthal_fit end to end on simulated miniCBF images."""

from __future__ import annotations

import csv
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from diffuse_cli import azimuthal_pixels as azp
from diffuse_cli import azimuthal_series
from diffuse_cli import order_parameter as op
from diffuse_cli import profile_shapes as ps
from diffuse_cli.command_line import azimuthal_fit

from conftest import REPO

Q0 = 2.0  # ring position, Å⁻¹ (2π/d)
M = 4.0  # Maier–Saupe m of the ring's angular distribution


def models(flux=1.0):
    from dxtbx.model import BeamFactory, DetectorFactory, GoniometerFactory, ScanFactory

    beam = BeamFactory.simple(1.0)
    beam.set_flux(flux)
    det = DetectorFactory.simple("PAD", 100.0, (40.0, 40.0), "+x", "-y", (0.2, 0.2), (400, 400), (-1, 1e6), [])
    gonio = GoniometerFactory.known_axis((1, 0, 0))
    scan = ScanFactory.make_scan((1, 1), 0.1, (0, 0), [0], deg=True)
    return det, beam, gonio, scan


def recording_factor(det, beam):
    """Polarization × relative solid angle of every pixel, from dxtbx lab coordinates.

    The counts a sample of intensity I gives are I·P·Ω (detector normal to the
    beam, so Ω ∝ d/r³); air absorption (< 0.5 % here, and independent of χ) is
    left out. Written from the formulas, not from diffuse_cli.corrections.
    """
    from scitbx.array_family import flex

    panel = det[0]
    n_fast, n_slow = panel.get_image_size()
    f, s = np.meshgrid(np.arange(n_fast) + 0.5, np.arange(n_slow) + 0.5)
    px = flex.vec2_double(flex.double(f.ravel() * panel.get_pixel_size()[0]), flex.double(s.ravel() * panel.get_pixel_size()[1]))
    lab = panel.get_lab_coord(px).as_numpy_array()
    r = np.linalg.norm(lab, axis=1)
    u = lab / r[:, None]
    frac = beam.get_polarization_fraction()  # E-field along x (polarization normal is y)
    P = frac * (1 - u[:, 0] ** 2) + (1 - frac) * (1 - u[:, 1] ** 2)
    d = panel.get_distance()
    return P * (d / r) * (d / r) ** 2


def write_image(path, chi0, field, rng):
    """A ring at Q0 with intensity ∝ exp(M cos²(χ − χ0)) on a flat background,
    recorded with polarization and solid angle, Poisson noise."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from scitbx.array_family import flex

    det, beam, gonio, scan = models(flux=field)
    px = azp.DetectorPixels.from_models(det, beam)
    ring = np.exp(-((px.q - Q0) ** 2) / (2 * 0.25**2))
    intensity = 20.0 + 400.0 * ring * np.exp(M * (np.cos(np.radians(px.chi - chi0)) ** 2 - 1))
    mean = intensity * recording_factor(det, beam)
    counts = rng.poisson(mean).astype(np.int32).reshape(400, 400)
    FormatCBFMini.as_file(det, beam, gonio, scan, flex.int(counts), str(path))


@pytest.fixture(scope="module")
def series_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("az_series")
    rng = np.random.default_rng(0)
    truth = {}
    for i, (field, chi0) in enumerate([(10, -60.0), (20, 15.0), (30, 70.0)]):
        # image numbers not consecutive: dxtbx would otherwise join files with
        # different prefixes into one sequence named after the first file
        path = d / f"ring_{field:03d}mT_{10 * (i + 1):04d}.cbf"
        write_image(path, chi0, field, rng)
        truth[path.name] = (field, chi0)
    return d, truth


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_series_fit_end_to_end(series_images, tmp_path):
    d, truth = series_images
    out = tmp_path / "az"
    images = sorted(str(p) for p in d.glob("*.cbf"))
    azimuthal_fit.run(
        [
            *images,
            f"q={Q0}",
            "q_tolerance=0.03",
            "azimuthal.n_bins=120",
            "error_model=spread",
            r"series.filename_pattern=_(\d+)mT",
            "series.name=field_mT",
            "maps.n_bins=200",
            "maps.fill_centrosymmetric=True",
            f"output.directory={out}",
            f"output.log={tmp_path / 'log.txt'}",
        ]
    )
    # one geometry for the three images (bins computed once, reused)
    log = (tmp_path / "log.txt").read_text()
    assert "Computing pixel geometry 1 " in log and "Computing pixel geometry 2 " not in log
    rows = read_rows(out / "fits.csv")
    ms = [r for r in rows if r["model"] == "maier_saupe"]
    assert len(ms) == 3
    for r in ms:
        field, chi0 = truth[r["image"]]
        assert float(r["field_mT"]) == field
        assert r["success"] == "true"
        # centre (mod 180) at the simulated director, DIALS χ convention
        assert abs(ps.wrap_degrees(2 * (float(r["centre"]) - chi0)) / 2) < 1.0
        assert float(r["m"]) == pytest.approx(M, rel=0.05)
        assert float(r["S"]) == pytest.approx(op.maier_saupe_S(M), abs=0.02)
        assert float(r["q_inv_angstrom"]) == pytest.approx(Q0)
    # S_total: <P2> of the whole simulated I(χ) (background 20 counts, ring
    # factor ≈ 1 in the band), the same whichever peak model was fitted
    ring = np.exp(-(0.03**2) / 6 / (2 * 0.25**2))  # band average of the Gaussian ring, to O(tol²)
    s_total_truth = op.order_parameter_odf(lambda t: 20.0 + 400.0 * ring * np.exp(M * (np.cos(t) ** 2 - 1)))
    for r in rows:
        if r["profile"].startswith("azimuthal"):
            assert float(r["S_total"]) == pytest.approx(s_total_truth, abs=0.005)
            assert float(r["S_data"]) == pytest.approx(s_total_truth, abs=0.005)
    pv = [r for r in rows if r["model"] == "pseudo_voigt" and r["profile"].startswith("azimuthal")]
    assert len(pv) == 3 and all(r["success"] == "true" for r in pv)
    # per-image outputs
    stem = "ring_010mT_0010"
    prof = read_rows(out / "profiles" / f"{stem}_azimuthal_q{Q0:.4f}.csv")
    assert list(prof[0]) == ["chi_deg", "I", "sigma", "n_pixels"] and len(prof) == 120
    radial = read_rows(out / "profiles" / f"{stem}_radial.csv")
    assert list(radial[0]) == ["q_inv_angstrom", "d_star", "d", "I", "sigma", "n_pixels"]
    assert len(radial) == 500
    sas = np.loadtxt(out / "profiles" / f"{stem}_radial.dat")
    assert sas.shape[1] == 3 and np.all(np.isfinite(sas))
    for name in ("qmap.png", "cake.png", "maps.npz"):
        assert (out / "maps" / f"{stem}_{name}").exists()
    maps = np.load(out / "maps" / f"{stem}_maps.npz")
    assert maps["qmap"].shape == (200, 200) and maps["cake"].shape == (200, 360)
    assert "qmap_filled" in maps.files
    for q in ("centre", "fwhm", "S"):
        assert (out / f"summary_{q}.png").exists()
    assert (out / "plots" / f"{stem}_azimuthal_q{Q0:.4f}.png").exists()


def test_nproc_2_gives_the_serial_fits(series_images, tmp_path):
    d, truth = series_images
    images = sorted(str(p) for p in d.glob("*.cbf"))
    tables = []
    for nproc in (1, 2):
        out = tmp_path / f"az{nproc}"
        azimuthal_fit.run([*images, f"q={Q0}", "q_tolerance=0.03", "fit.radial_range=1.4,2.6",
                           "series.header_key=timestamp", "maps.enable=False", "output.plots=False",
                           f"nproc={nproc}", f"output.directory={out}", f"output.log={tmp_path / f'l{nproc}.txt'}"])
        tables.append((out / "fits.csv").read_text())
        # the timestamp series counts from the first image, whichever worker reads it
        assert float(read_rows(out / "fits.csv")[0]["series"]) == 0.0
    assert tables[0] == tables[1]
    assert len(read_rows(tmp_path / "az2" / "fits.csv")) >= 3 * 3


def test_series_from_header_and_csv_and_mask(series_images, tmp_path):
    d, truth = series_images
    images = sorted(str(p) for p in d.glob("*.cbf"))
    # header: the simulated images carry "# Flux <field>"
    out = tmp_path / "hdr"
    azimuthal_fit.run(
        [*images, "fit.radial_range=1.4,2.6", "series.header_key=Flux", "maps.enable=False", "output.plots=False", f"output.directory={out}", f"output.log={tmp_path / 'l1.txt'}"]
    )
    rows = read_rows(out / "fits.csv")
    assert len(rows) == 3
    for r in rows:
        assert float(r["series"]) == truth[r["image"]][0]
        assert r["profile"] == "radial" and r["model"] == "pseudo_voigt" and r["success"] == "true"
        # the ring sits at Q0 (the ring is broad; its mean over χ keeps the centre)
        assert float(r["centre"]) == pytest.approx(Q0, abs=0.02)
    # CSV series and a mask that hides the lower half of the detector (slow > 200)
    table = tmp_path / "temps.csv"
    table.write_text("image,temperature\n" + "".join(f"{n},{100 + 5 * t[0]}\n" for n, t in truth.items()))
    from scitbx.array_family import flex

    mask = np.ones((400, 400), dtype=bool)
    mask[200:, :] = False
    mask_path = tmp_path / "half.pickle"
    with open(mask_path, "wb") as fh:
        pickle.dump((flex.bool(mask),), fh)
    out2 = tmp_path / "csv"
    azimuthal_fit.run(
        [images[0], str(mask_path), f"series.csv={table}", "series.name=temperature", "maps.enable=False", "output.plots=False", f"output.directory={out2}", f"output.log={tmp_path / 'l2.txt'}"]
    )
    radial = read_rows(out2 / "profiles" / "ring_010mT_0010_radial.csv")
    assert sum(int(r["n_pixels"]) for r in radial) == mask.sum()
    # no fits asked: profiles only, no table
    assert not (out2 / "fits.csv").exists()


def test_hkl_needs_crystal(series_images, tmp_path):
    from libtbx.utils import Sorry

    d, _ = series_images
    with pytest.raises(Sorry, match="crystal"):
        azimuthal_fit.run([str(next(d.glob("*.cbf"))), "hkl=1,0,0", f"output.directory={tmp_path}", f"output.log={tmp_path / 'l.txt'}"])


def test_hkl_band_from_crystal_model(series_images, tmp_path):
    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentListFactory

    d, _ = series_images
    a = 5.0
    expts = ExperimentListFactory.from_filenames([str(sorted(d.glob("*.cbf"))[0])])
    expts[0].crystal = Crystal((a, 0, 0), (0, a, 0), (0, 0, a), space_group_symbol="P1")
    expts.as_file(str(tmp_path / "indexed.expt"))
    azimuthal_fit.run(
        [str(tmp_path / "indexed.expt"), "hkl=1,1,0", "maps.enable=False", "output.plots=False", f"output.directory={tmp_path / 'o'}", f"output.log={tmp_path / 'l.txt'}"]
    )
    rows = read_rows(tmp_path / "o" / "fits.csv")
    assert {r["profile"] for r in rows} == {"azimuthal_hkl1_1_0"}
    # |q| = 2π/d(110) = 2π·√2/a
    assert float(rows[0]["q_inv_angstrom"]) == pytest.approx(2 * np.pi * np.sqrt(2) / a, rel=1e-7)  # CSV keeps 8 digits
    assert (tmp_path / "o" / "profiles" / "ring_010mT_0010_azimuthal_hkl1_1_0.csv").exists()


def test_q_conventions_d_and_d_star_give_the_same_band(series_images, tmp_path):
    d, _ = series_images
    image = str(sorted(d.glob("*.cbf"))[0])
    d_star = Q0 / (2 * np.pi)
    azimuthal_fit.run(
        [image, f"d_star={d_star}", f"d={1 / d_star}", "maps.enable=False", "output.plots=False", f"output.directory={tmp_path}", f"output.log={tmp_path / 'l.txt'}"]
    )
    rows = read_rows(tmp_path / "fits.csv")
    assert {round(float(r["q_inv_angstrom"]), 9) for r in rows} == {round(Q0, 9)}


def test_merged_map_input(tmp_path):
    a = 30.0
    h = np.arange(-8, 9) / 2.0
    H, K, L = np.meshgrid(h, h, h, indexing="ij")
    q = 2 * np.pi * np.sqrt(H**2 + K**2 + L**2) / a
    I = 10.0 + 5 * np.exp(-((q - 1.0) ** 2) / 0.02)
    np.savez(tmp_path / "merged.npz", schema=np.array("diffuse.merge/1"), I=I, sigma=np.full_like(I, 0.1), counts=np.ones_like(I, dtype=int), h=h, k=h, l=h, unit_cell=np.array([a, a, a, 90, 90, 90.0]), ndiv=2)
    out = tmp_path / "m"
    azimuthal_fit.run([str(tmp_path / "merged.npz"), "radial.n_bins=60", f"output.directory={out}", f"output.log={tmp_path / 'l.txt'}"])
    rows = read_rows(out / "profiles" / "merged_radial.csv")
    assert len(rows) == 60
    best = max((r for r in rows if r["I"] != "nan"), key=lambda r: float(r["I"]))
    assert float(best["q_inv_angstrom"]) == pytest.approx(1.0, abs=0.1)
    assert sum(int(r["n_pixels"]) for r in rows) == I.size


def test_help_and_config(capsys):
    with pytest.raises(SystemExit) as e:
        azimuthal_fit.run(["-h"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "Examples" in out and "q_inv_angstrom" in out
    with pytest.raises(SystemExit):
        azimuthal_fit.run(["-c"])
    assert "q_tolerance" in capsys.readouterr().out


def test_missing_files_are_one_line_sorry(tmp_path):
    from libtbx.utils import Sorry

    with pytest.raises(Sorry, match="^File not found: missing_mask.pickle$"):
        azimuthal_fit.run(["missing_mask.pickle"])
    with pytest.raises(Sorry, match="^File not found: missing.npz$"):
        azimuthal_fit.run(["missing.npz"])
    # as a console script: one line on stderr, non-zero exit
    exe = os.path.join(os.path.dirname(sys.executable), "diffuse.azimuthal_fit")
    r = subprocess.run([exe, "missing.expt"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip() == "Sorry: File not found: missing.expt"


def test_default_phil_file_parses():
    import libtbx.phil

    text = (REPO / "phil" / "azimuthal_fit.phil").read_text()
    user = libtbx.phil.parse(text)
    working, unused = azimuthal_fit.phil_scope.fetch(sources=[user], track_unused_definitions=True)
    assert not unused
    assert working.as_str() == azimuthal_fit.phil_scope.fetch().as_str()


def test_header_values(series_images):
    import datetime

    d, truth = series_images
    path = sorted(d.glob("*.cbf"))[1]
    assert azimuthal_series.header_value(str(path), "Flux") == truth[path.name][0]
    assert azimuthal_series.header_value(str(path), "Exposure_time") == pytest.approx(0.1)
    # FormatCBFMini writes the date 1972-01-01T00:00:00.000
    expected = datetime.datetime(1972, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert azimuthal_series.header_value(str(path), "timestamp") == expected
    from libtbx.utils import Sorry

    with pytest.raises(Sorry, match="no header line"):
        azimuthal_series.header_value(str(path), "Temperature_K")


def _table_ratio_per_bin(image, truth_json, d_star_bins):
    """Mean over each radial bin's pixels of sim_tables.table_ratio (bins: their d* centres)."""
    import json

    from dxtbx.model.experiment_list import ExperimentListFactory
    from sim_tables import table_ratio

    from diffuse_cli.geometry import detector_geometry

    truth = json.loads(pathlib.Path(truth_json).read_text())
    expt = ExperimentListFactory.from_filenames([str(image)])[0]
    wavelength = expt.beam.get_wavelength()
    ratio, d_star = [], []
    for panel, g in zip(expt.detector, detector_geometry(expt.detector, expt.beam)):
        ratio.append(table_ratio(truth, panel, g.s1, g.lab, wavelength).ravel())
        d_star.append(g.d_star.ravel())
    ratio, d_star = np.concatenate(ratio), np.concatenate(d_star)
    centres = np.asarray(d_star_bins, dtype=np.float64)
    edges = np.concatenate([[centres[0] - (centres[1] - centres[0]) / 2], (centres[1:] + centres[:-1]) / 2,
                            [centres[-1] + (centres[-1] - centres[-2]) / 2]])
    b = np.digitize(d_star, edges) - 1
    inside = (b >= 0) & (b < len(centres))
    total = np.bincount(b[inside], ratio[inside], minlength=len(centres))
    n = np.bincount(b[inside], minlength=len(centres))
    return np.where(n > 0, total / np.maximum(n, 1), 1.0)


def test_corrections_recover_the_simulated_isotropic_intensity(tmp_path):
    """corrections.apply=True: the radial profile of a noise-free simulated
    still (isotropic truth: flat floor + water ring) is I_true(|q|) in
    photons/µsr/s. The raw profile is not (solid angle, polarization, ...).
    Long exposure: noise-free images are rounded to integers, and pixels of
    one ring share nearly the same expected count, so rounding does not
    average out over a bin (±0.5 % at 50 counts)."""
    from diffuse_cli.command_line import simulate
    from diffuse_cli.simulate import TruthModel

    sim = tmp_path / "sim"
    simulate.run(["n_stills=1", "seed=3", "noise=False", "bragg=False", "model.halo.amplitude=0",
                  "model.shell.amplitude=0", "truth.map=False", "exposure_time=200", "scale_min=1", "scale_max=1",
                  f"output.directory={sim}", "nproc=1", f"output.log={tmp_path / 'sim.log'}"])
    image = sorted(sim.glob("*.cbf"))[0]
    truth = TruthModel.from_json(sim / "truth.json")
    profiles = {}
    for apply in (True, False):
        out = tmp_path / f"az_{apply}"
        azimuthal_fit.run([str(image), f"corrections.apply={apply}", "maps.enable=False", "output.plots=False",
                           f"output.directory={out}", f"output.log={tmp_path / f'az_{apply}.log'}"])
        rows = read_rows(out / "profiles" / f"{image.stem}_radial.csv")
        profiles[apply] = {k: np.array([float(r[k]) for r in rows]) for k in ("d_star", "I", "sigma", "n_pixels")}
    p = profiles[True]
    ok = p["n_pixels"] >= 200
    assert ok.sum() > 200
    d_star = p["d_star"][ok]
    expected = truth.p.intensity_scale * truth.p.background + truth.isotropic(d_star)
    # the simulator's xraylib μ (air, sensor) against the pipeline's cctbx tables (~1e-3):
    # their per-pixel ratio, averaged over each bin's pixels
    expected = expected * _table_ratio_per_bin(image, sim / "truth.json", p["d_star"])[ok]
    rel = p["I"][ok] / expected - 1
    assert np.median(np.abs(rel)) < 5e-4 and np.abs(rel).max() < 2e-3, (np.median(np.abs(rel)), np.abs(rel).max())
    # Poisson σ follows the counts: with m nearly constant across a thin ring,
    # σ/I = 1/sqrt(Σ c) as for the raw counts
    r = profiles[False]
    np.testing.assert_allclose(p["sigma"][ok] / p["I"][ok], r["sigma"][ok] / r["I"][ok], rtol=0.02)
    raw = profiles[False]["I"][ok] / expected
    assert raw.max() / raw.min() > 1.2  # without corrections the profile is not I_true
