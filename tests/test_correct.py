"""diffuse.correct: files, inversion of the forward model, resume, CLI behaviour.

The extracted input is built here from the schema in docs/file_formats.md
(diffuse.extract/1 + diffuse.geometry/1), so these tests do not depend on
diffuse.extract. Counts are made with the forward model
``counts = gain·t·(Ω/1e-6)·P·η·T·I_true(hkl)`` from the individual
correction functions; diffuse.correct must give back I_true at the hkl that
A⁻¹(s1 − s0) gives for each pixel.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from diffuse_cli import corrections as C
from diffuse_cli import program
from diffuse_cli.command_line import correct
from diffuse_cli.geometry import detector_geometry, hkl_from_q

from dxtbx.model import BeamFactory, Crystal, Detector, DetectorFactory, Experiment, ExperimentList, Panel
from libtbx.utils import Sorry

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
WAVELENGTH = 1.0


def make_detector(multi: bool):
    d = DetectorFactory.simple("PAD", 80.0, (6.0, 5.0), "+x", "-y", (0.172, 0.172), (70, 60))
    d[0].set_thickness(0.45)
    d[0].set_material("Si")
    if not multi:
        return d
    det = Detector()
    det.add_panel(d[0])
    p = Panel()
    # a second, tilted panel below the first
    p.set_frame((1, 0, 0), (0, -0.9, -0.43588989435406733), (-6.0, -8.0, -80.0))
    p.set_pixel_size((0.1, 0.1))
    p.set_image_size((50, 40))
    p.set_thickness(0.32)
    p.set_material("Si")
    det.add_panel(p)
    return det


def make_experiments(multi: bool, n_stills: int):
    beam = BeamFactory.make_polarized_beam(
        sample_to_source=(0, 0, 1), wavelength=WAVELENGTH, polarization=(0, 1, 0), polarization_fraction=0.99
    )
    det = make_detector(multi)
    el = ExperimentList()
    rng = np.random.default_rng(7)
    for i in range(n_stills):
        # a P1 cell in a random orientation
        from scitbx import matrix

        R = matrix.sqr(tuple(np.linalg.qr(rng.normal(size=(3, 3)))[0].ravel()))
        a, b, c = R * matrix.col((40, 0, 0)), R * matrix.col((3, 50, 0)), R * matrix.col((2, 4, 60))
        el.append(Experiment(beam=beam, detector=det, crystal=Crystal(a, b, c, space_group_symbol="P1")))
    return el


def true_intensity(hkl):
    """A smooth made-up diffuse map (photons/µsr/s)."""
    return 50.0 + 20.0 * np.cos(np.pi * hkl[:, 0]) ** 2 + 5.0 * hkl[:, 2] ** 2


def write_extracted(tmp, experiments, gain=1.0, exposure=0.5, integral=False, background=0.0, key="k0"):
    """Extracted per-still files (schema diffuse.extract/1) made with the forward model."""
    ext = tmp / "extracted"
    ext.mkdir(exist_ok=True)
    expt = experiments[0]
    geo = detector_geometry(expt.detector, expt.beam)
    s1 = np.concatenate([g.s1.reshape(-1, 3) for g in geo])
    s0 = np.array(expt.beam.get_s0())
    program.write_npz(
        ext / f"geometry_{key}.npz",
        schema=np.array("diffuse.geometry/1"),
        panel_shapes=np.array([g.shape for g in geo], dtype=np.int32),
        s1=s1.astype(np.float32),
        s0=s0,
        wavelength=np.float64(WAVELENGTH),
    )
    # forward factors from the individual functions
    fwd = []
    for panel, g in zip(expt.detector, geo):
        f = (
            C.solid_angle(panel, g.lab) / 1e-6
            * C.polarization(g.s1, expt.beam)
            * C.sensor_efficiency(panel, g.s1, WAVELENGTH)
            * C.air_transmission(g.lab, WAVELENGTH)
        )
        fwd.append(f.ravel())
    fwd = np.concatenate(fwd)
    npix = len(fwd)
    rng = np.random.default_rng(11)
    truth = []
    for i, e in enumerate(experiments):
        mask = rng.random(npix) > 0.2
        A = np.array(e.crystal.get_A()).reshape(3, 3)
        hkl = hkl_from_q(s1.astype(np.float64)[mask] - s0, A)
        I_true = true_intensity(hkl)
        counts = gain * exposure * fwd[mask] * I_true + background
        if integral:
            # diffuse.extract's packed form: uint8 clipped at 255 + exact overflows
            counts = np.round(counts).astype(np.int32)
            over = np.flatnonzero(counts >= 255)
            packed = {
                "counts": np.minimum(counts, 255).astype(np.uint8),
                "overflow_index": over.astype(np.uint32),
                "overflow_counts": counts[over],
            }
        else:
            counts = counts.astype(np.float32)
            packed = {"counts": counts}
        program.write_npz(
            ext / f"still_{i:03d}.npz",
            schema=np.array("diffuse.extract/1"),
            mask_bits=np.packbits(mask),
            n_pixels=np.int64(npix),
            **packed,
            A=A,
            exposure_time=np.float64(exposure),
            geometry_key=np.array(key),
            experiment_index=np.int64(i),
            image_path=np.array(f"image_{i}.cbf"),
            image_index=np.int64(0),
        )
        truth.append({"mask": mask, "hkl": hkl, "I": I_true, "counts": counts})
    return ext, truth


@pytest.fixture
def dataset(tmp_path):
    def make(multi=True, n_stills=3, **kw):
        el = make_experiments(multi, n_stills)
        el.as_file(str(tmp_path / "combined.expt"))
        ext, truth = write_extracted(tmp_path, el, **kw)
        return tmp_path, el, ext, truth

    return make


def run_correct(tmp, *extra):
    return correct.run(
        [str(tmp / "combined.expt"), str(tmp / "extracted"), f"output.directory={tmp / 'corrected'}",
         f"output.log={tmp / 'correct.log'}", *extra]
    )


# ------------------------------------------------------------------ science through the program


def test_correct_inverts_forward_model_multipanel(dataset):
    tmp, el, ext, truth = dataset(multi=True, gain=2.0)
    rows = run_correct(tmp, "gain=2.0")
    assert [r["status"] for r in rows] == ["corrected"] * 3
    cache = {}
    for i, t in enumerate(truth):
        obs = C.load_observations(tmp / "corrected" / f"still_{i:03d}.npz", cache=cache, with_pixels=True)
        assert obs["still_id"] == f"still_{i:03d}" and obs["experiment_index"] == i
        assert np.array_equal(obs["pixel"], np.flatnonzero(t["mask"]))
        # hkl = A⁻¹ q, independently from the experiment's crystal and detector
        e = el[i]
        geo = detector_geometry(e.detector, e.beam)
        q = np.concatenate([g.q.reshape(-1, 3) for g in geo])[t["mask"]]
        hkl = q @ np.linalg.inv(np.array(e.crystal.get_A()).reshape(3, 3)).T
        assert np.allclose(obs["hkl"], hkl, atol=2e-5)
        assert np.allclose(obs["d_star"], np.linalg.norm(q, axis=1), rtol=1e-5)
        # exact inverse (float32 counts)
        assert np.allclose(obs["I"], t["I"], rtol=2e-6)
        # σ² = gain·counts·(total/(gain t))²
        factors = np.load(tmp / "corrected" / "factors_k0.npz")
        F = factors["total"][t["mask"]]
        assert np.allclose(obs["sigma"], np.sqrt(2.0 * t["counts"]) * F / (2.0 * 0.5), rtol=1e-6)
    # both panels present, in pixel order
    assert obs["pixel"].max() >= 70 * 60
    # total = product of the stored multipliers, and 1e-6/Ω for the solid angle
    f = np.load(tmp / "corrected" / "factors_k0.npz")
    prod = f["solid_angle"].astype(np.float64) * f["polarization"] * f["efficiency"] * f["air"] * f["kapton"]
    assert np.allclose(f["total"], prod, rtol=1e-6)
    # panel 0 by hand: pixel (i, j) at ((i+½)p − 6, −((j+½)p − 5), −80) mm, Ω = p²·80/r³
    p = 0.172
    i, j = np.meshgrid(np.arange(70), np.arange(60))
    x, y = (i + 0.5) * p - 6.0, -((j + 0.5) * p - 5.0)
    omega = p * p * 80.0 / (x * x + y * y + 80.0**2) ** 1.5
    assert np.allclose(f["solid_angle"][: 70 * 60], 1e-6 / omega.ravel(), rtol=1e-6)
    assert list(f["applied"]) == ["solid_angle", "polarization", "efficiency", "air"]
    summary = json.load(open(tmp / "corrected" / "summary.json"))
    assert len(summary["stills"]) == 3


def test_integer_counts_background_constant_and_file_size(dataset):
    tmp, el, ext, truth = dataset(multi=False, n_stills=2, integral=True, background=7.0, exposure=2.0)
    assert max(t["counts"].max() for t in truth) > 255  # the overflow path is exercised
    run_correct(tmp, "background.mode=constant", "background.constant=7", "background.constant_sigma=0.5")
    for i, t in enumerate(truth):
        out = tmp / "corrected" / f"still_{i:03d}.npz"
        obs = C.load_observations(out)
        # rounding to integers: |ΔI| ≤ 0.5·F/t
        F = np.load(tmp / "corrected" / "factors_k0.npz")["total"][t["mask"]]
        assert np.all(np.abs(obs["I"] - t["I"]) <= 0.5 * F / 2.0 + 1e-9)
        assert np.allclose(obs["sigma"], np.sqrt(t["counts"] + 0.25) * F / 2.0, rtol=1e-12)
        # per-still files hold nothing per pixel: a few kB of scalars and the
        # reference to the extracted counts, whatever the number of pixels
        assert os.path.getsize(out) < 8000  # 3 k pixels here; the scalars and provenance, ~5 kB
        assert str(np.load(out)["extract_file"]) == os.path.join("..", "extracted", out.name)
        with np.load(out) as d:
            assert all(d[n].dtype.kind != "f" or d[n].ndim == 0 for n in d.files if n != "A")
            assert max(d[n].size for n in d.files) <= 9  # no array per pixel of any type


def test_background_map_from_images(dataset, tmp_path):
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import GoniometerFactory, ScanFactory
    from scitbx.array_family import flex

    tmp, el, ext, truth = dataset(multi=False, n_stills=1, background=0.0)
    det, beam = el[0].detector, el[0].beam
    rng = np.random.default_rng(5)
    imgs = []
    for j, t_exp in enumerate((1.0, 2.0)):
        data = rng.poisson(3.0 * t_exp, size=(60, 70)).astype(np.int32)
        imgs.append((data, t_exp))
        scan = ScanFactory.make_scan((1, 1), t_exp, (0, 0), {1: 0})
        FormatCBFMini.as_file(det, beam, GoniometerFactory.known_axis((1, 0, 0)), scan,
                              flex.int(data), str(tmp / f"bg_{j}.cbf"))
    run_correct(tmp, "background.mode=map", f"background.images={tmp / 'bg_0.cbf'}",
                f"background.images={tmp / 'bg_1.cbf'}")
    bg = np.load(tmp / "corrected" / "background.npz")
    rate = (imgs[0][0].ravel() / 1.0 + imgs[1][0].ravel() / 2.0) / 2
    var = (imgs[0][0].ravel() / 1.0 + imgs[1][0].ravel() / 4.0) / 4
    assert np.allclose(bg["exposure_times"], [1.0, 2.0])
    assert np.allclose(bg["rate"], rate) and np.allclose(bg["rate_variance"], var)
    obs = C.load_observations(tmp / "corrected" / "still_000.npz")
    m = truth[0]["mask"]
    F = np.load(tmp / "corrected" / "factors_k0.npz")["total"][m]
    expect = (truth[0]["counts"] - rate[m] * 0.5) * F / 0.5
    assert np.allclose(obs["I"], expect, rtol=1e-6)
    assert np.allclose(obs["sigma"], np.sqrt(truth[0]["counts"] + var[m] * 0.25) * F / 0.5, rtol=1e-6)


# ------------------------------------------------------------------ resume and errors


def test_corrected_still_follows_moved_tree_and_refuses_changed_extract(dataset):
    tmp, el, ext, truth = dataset(multi=False, n_stills=1)
    run_correct(tmp)
    moved = tmp / "moved"
    moved.mkdir()
    for d in ("extracted", "corrected"):
        (tmp / d).rename(moved / d)
    obs = C.load_observations(moved / "corrected" / "still_000.npz")  # relative reference
    assert np.allclose(obs["I"], truth[0]["I"], rtol=2e-6)
    # an extract rewritten with other counts no longer matches the corrected still
    e = dict(np.load(moved / "extracted" / "still_000.npz"))
    e["counts"] = e["counts"] + np.float32(1.0)
    np.savez(moved / "extracted" / "still_000.npz", **e)
    with pytest.raises(Sorry, match="changed since diffuse.correct ran"):
        C.load_observations(moved / "corrected" / "still_000.npz")
    os.remove(moved / "extracted" / "still_000.npz")
    with pytest.raises(Sorry, match="extracted pixels .* are missing"):
        C.load_observations(moved / "corrected" / "still_000.npz")


def test_resume_skips_up_to_date_and_redoes_on_change(dataset):
    tmp, el, ext, truth = dataset(multi=False, n_stills=2)
    run_correct(tmp)
    out = tmp / "corrected" / "still_000.npz"
    fac = tmp / "corrected" / "factors_k0.npz"
    m1, f1 = out.stat().st_mtime_ns, fac.stat().st_mtime_ns
    rows = run_correct(tmp)
    assert [r["status"] for r in rows] == ["up to date", "up to date"]
    assert out.stat().st_mtime_ns == m1 and fac.stat().st_mtime_ns == f1
    rows = run_correct(tmp, "overwrite=True")
    assert [r["status"] for r in rows] == ["corrected", "corrected"]
    assert out.stat().st_mtime_ns > m1
    # a changed parameter invalidates the outputs
    rows = run_correct(tmp, "air.apply=False")
    assert [r["status"] for r in rows] == ["corrected", "corrected"]
    assert "air" not in list(np.load(fac)["applied"])
    # a touched input (same content) changes nothing; new content redoes its still only
    os.utime(ext / "still_001.npz", None)
    rows = run_correct(tmp, "air.apply=False")
    assert [r["status"] for r in rows] == ["up to date", "up to date"]
    with np.load(ext / "still_001.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["counts"] = arrays["counts"] + np.float32(1)
    program.write_npz(ext / "still_001.npz", **arrays)
    rows = run_correct(tmp, "air.apply=False")
    assert [r["status"] for r in rows] == ["up to date", "corrected"]
    assert not list((tmp / "corrected").glob("*.tmp*"))


def test_nproc_2_gives_same_result(dataset):
    tmp, el, ext, truth = dataset(multi=False, n_stills=3)
    run_correct(tmp, "nproc=2")
    for i, t in enumerate(truth):
        obs = C.load_observations(tmp / "corrected" / f"still_{i:03d}.npz")
        assert np.allclose(obs["I"], t["I"], rtol=2e-6)


def test_errors_are_one_line_sorry(dataset, tmp_path):
    tmp, el, ext, truth = dataset(multi=False, n_stills=1)
    # wrong schema
    bad = tmp / "bad"
    bad.mkdir()
    np.savez(bad / "x.npz", schema=np.array("diffuse.something/9"))
    with pytest.raises(Sorry, match="schema"):
        correct.run([str(tmp / "combined.expt"), str(bad), f"output.directory={tmp / 'c2'}",
                     f"output.log={tmp / 'l.log'}"])
    # experiments that do not match the extracted geometry
    other = make_experiments(multi=True, n_stills=1)
    other.as_file(str(tmp / "other.expt"))
    with pytest.raises(Sorry, match="pixels"):
        correct.run([str(tmp / "other.expt"), str(ext), f"output.directory={tmp / 'c3'}",
                     f"output.log={tmp / 'l.log'}"])
    # same pixel count, detector moved by 1 mm: not the experiments extract used
    from scitbx import matrix

    moved = make_experiments(multi=False, n_stills=1)
    p0 = moved[0].detector[0]
    p0.set_frame(p0.get_fast_axis(), p0.get_slow_axis(), tuple(matrix.col(p0.get_origin()) + matrix.col((0, 0, -1))))
    moved.as_file(str(tmp / "moved.expt"))
    with pytest.raises(Sorry, match="pixel directions differ"):
        correct.run([str(tmp / "moved.expt"), str(ext), f"output.directory={tmp / 'c5'}",
                     f"output.log={tmp / 'l.log'}"])
    # sensor efficiency required but unknown
    for p in el[0].detector:
        p.set_thickness(0.0)
    el.as_file(str(tmp / "thin.expt"))
    with pytest.raises(Sorry, match="thickness"):
        correct.run([str(tmp / "thin.expt"), str(ext), "sensor.efficiency=on",
                     f"output.directory={tmp / 'c4'}", f"output.log={tmp / 'l.log'}"])


def test_cli_help_config_missing_file_and_exit_status(dataset, tmp_path):
    exe = str(BIN / "diffuse.correct")
    tmp, el, ext, truth = dataset(multi=False, n_stills=1)
    r = subprocess.run([exe, "combined.expt", "extracted"], capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert (tmp / "corrected" / "still_000.npz").exists() and (tmp / "diffuse.correct.log").exists()
    r = subprocess.run([exe, "-h"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "Examples" in r.stdout and "diffuse.correct" in r.stdout
    r = subprocess.run([exe, "-c"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "background" in r.stdout and "nproc" in r.stdout
    r = subprocess.run([exe, "missing.expt", "extracted/"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["Sorry: File not found: missing.expt"]


def test_default_phil_file_parses():
    import libtbx.phil

    text = (REPO / "phil" / "correct.phil").read_text()
    user = libtbx.phil.parse(text)
    working, unused = correct.phil_scope.fetch(sources=[user], track_unused_definitions=True)
    assert unused == []
    params = working.extract()
    assert params.gain == 1.0 and params.background.mode == "none"
    assert params.output.directory == "corrected"
    # same defaults as the program
    assert working.as_str() == correct.phil_scope.fetch().as_str()


def test_sampled_factors_give_the_full_arrays_values():
    """correct's summary sample gathers from per-detector arrays at every SAMPLE_STRIDE-th
    pixel (correct_driver._sampled): the same totals, bit for bit, as corrections.shot_total
    on the full arrays (load_observations' path), panels with different sensor μ and
    panel boundaries that are not multiples of the stride included."""
    from diffuse_cli import correct_driver
    from diffuse_cli.formats.extract import SAMPLE_STRIDE, sample_pixels

    rng = np.random.default_rng(3)
    n_pix = 5 * SAMPLE_STRIDE * 40 + 17
    offsets = np.array([0, 3001, 3001 + 5 * SAMPLE_STRIDE * 7, n_pix])  # one boundary on a multiple
    factors = {
        "total": rng.random(n_pix),
        "direction": rng.random(n_pix).astype(np.float32),
        "paths": {"air_path_mm": rng.random(n_pix).astype(np.float32) * 200,
                  "sensor_path_mm": rng.random(n_pix).astype(np.float32)},
        "panel_offsets": offsets,
    }
    mask = rng.random(n_pix) > 0.3
    mask[(3001 // SAMPLE_STRIDE) * SAMPLE_STRIDE] = True  # the last sampled pixel before a boundary
    pixels = sample_pixels(np.packbits(mask), n_pix)
    assert np.array_equal(pixels, np.flatnonzero(mask)[np.flatnonzero(mask) % SAMPLE_STRIDE == 0])
    at = correct_driver._sampled(factors)
    index = pixels // SAMPLE_STRIDE
    assert np.array_equal(at["total"][index], factors["total"][pixels])
    coefficients = {"air_mu_per_mm": 1.1e-3, "kapton_mu_per_mm": 0.0, "sensor_mu_per_mm": np.array([3.0, 0.0, 4.5])}
    full = C.shot_total(factors["direction"], factors["paths"], coefficients, pixels, factors["panel_offsets"])
    compact = C.shot_total(at["direction"], at["paths"], coefficients, index, at["panel_offsets"])
    assert np.array_equal(compact, full)
    assert correct_driver._sampled(factors) is at  # made once per detector
