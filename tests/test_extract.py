"""diffuse.extract: per-pixel geometry, extract files, and the program."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from libtbx.utils import Sorry

from diffuse_cli import extraction as ex
from diffuse_cli.command_line import extract as extract_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def thaumatin(processed_real):
    """The first thaumatin still, processed once per session by diffuse.stills_process (DIALS)."""
    run = processed_real("thaumatin")
    images = run["images"][:1]
    expt = sorted((run["out"] / "stills").glob("*_integrated.expt"))[0]
    refl = expt.with_name(expt.name.replace("_integrated.expt", "_integrated.refl"))
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(str(expt), check_format=True)
    reflections = flex.reflection_table.from_file(str(refl))
    return {"expt": expt, "refl": refl, "experiments": experiments, "reflections": reflections, "image": images[0]}


# ---------------------------------------------------------------- synthetic geometry


def _simple_detector(parallax=False, shape=(60, 50), pixel=0.172, distance=200.0):
    from dxtbx.model import DetectorFactory, ParallaxCorrectedPxMmStrategy

    det = DetectorFactory.simple(
        sensor="PAD",
        distance=distance,
        beam_centre=(-20.0, -15.0),  # beam off the panel: every pixel oblique
        fast_direction="+x",
        slow_direction="-y",
        pixel_size=(pixel, pixel),
        image_size=shape,
        trusted_range=(-1, 1e6),
    )
    if parallax:
        det[0].set_mu(3.83)
        det[0].set_thickness(0.45)
        det[0].set_px_mm_strategy(ParallaxCorrectedPxMmStrategy(3.83, 0.45))
    return det


def _beam(wavelength=1.0):
    from dxtbx.model import BeamFactory

    return BeamFactory.simple(wavelength)


def test_pixel_centres_at_half_pixel():
    """Pixel (f, s) centre is at origin + (f + 0.5)·px·fast + (s + 0.5)·px·slow (analytic)."""
    det, beam = _simple_detector(), _beam()
    geom = ex.compute_geometry(det, beam)
    p = det[0]
    o, f, s = (np.array(v) for v in (p.get_origin(), p.get_fast_axis(), p.get_slow_axis()))
    n_fast, n_slow = p.get_image_size()
    fi, si = np.meshgrid(np.arange(n_fast), np.arange(n_slow))
    lab = o + ((fi + 0.5) * 0.172)[..., None] * f + ((si + 0.5) * 0.172)[..., None] * s
    expected = lab / np.linalg.norm(lab, axis=-1, keepdims=True) / beam.get_wavelength()
    np.testing.assert_allclose(geom.s1.reshape(n_slow, n_fast, 3), expected, atol=2e-7)
    # and |q| = 1/d = 2 sin(θ)/λ, no 2π
    q = geom.q()
    two_theta = np.arccos(expected.reshape(-1, 3) @ np.array(beam.get_unit_s0()) * beam.get_wavelength())
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 2 * np.sin(two_theta / 2) / beam.get_wavelength(), rtol=1e-5)


def test_parallax_honoured():
    """With ParallaxCorrectedPxMmStrategy, pixel mm positions are shifted by the
    analytic parallax of the sensor (dxtbx's formula re-derived here in numpy)."""
    det_p, beam = _simple_detector(parallax=True), _beam()
    det_s = _simple_detector(parallax=False)
    p = det_p[0]
    n_fast, n_slow = p.get_image_size()
    fi, si = np.meshgrid(np.arange(n_fast) + 0.5, np.arange(n_slow) + 0.5)
    lab_p = ex.lab_coordinates_at(p, fi, si)
    lab_s = ex.lab_coordinates_at(det_s[0], fi, si)
    shift = np.linalg.norm(lab_p - lab_s, axis=1)
    assert shift.min() > 0.01  # mm: oblique rays travel into the 0.45 mm sensor
    # forward parallax of our mm position must give back the plain pixel position
    f, s, o = (np.array(v) for v in (p.get_fast_axis(), p.get_slow_axis(), p.get_origin()))
    mm = np.stack([(lab_p - o) @ f, (lab_p - o) @ s], axis=1)
    ray = o + mm[:, :1] * f + mm[:, 1:] * s
    ray /= np.linalg.norm(ray, axis=1, keepdims=True)
    normal = np.cross(f, s)
    normal = normal if o @ normal > 0 else -normal
    cos_t = ray @ normal
    mu, t0 = 3.83, 0.45
    att = 1 / mu - (t0 / cos_t + 1 / mu) * np.exp(-mu * t0 / cos_t)
    forward = mm + np.stack([ray @ f, ray @ s], axis=1) * att[:, None]
    simple = np.stack([fi.ravel() * 0.172, si.ravel() * 0.172], axis=1)
    assert np.abs(forward - simple).max() < 1e-3 * shift.max() + 1e-6
    # the cache goes through the same path
    geom = ex.compute_geometry(det_p, beam)
    np.testing.assert_allclose(geom.s1, ex.s1_from_lab(lab_p, 1.0), atol=1e-7)


@pytest.mark.real_data
def test_cspad_multipanel_geometry(real_images):
    """64-panel CSPAD: q of each panel equals an independent per-pixel
    calculation through Panel.get_pixel_lab_coord (sampled pixels, all panels)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    image = real_images("thermolysin_cspad_stills", 1)[0]
    expt = ExperimentListFactory.from_filenames([str(image)])[0]
    det, beam = expt.detector, expt.beam
    assert len(det) == 64
    geom = ex.compute_geometry(det, beam)
    counts = ex.raw_counts(expt.imageset, 0)
    assert geom.n_pixels == counts.size == sum(p.get_image_size()[0] * p.get_image_size()[1] for p in det)
    rng = np.random.default_rng(0)
    sel = rng.choice(geom.n_pixels, 3000, replace=False)
    panel, fast, slow = geom.pixel_panel_fast_slow(sel)
    expected = np.array([
        det[int(pi)].get_pixel_lab_coord((float(fx) + 0.5, float(sy) + 0.5))
        for pi, fx, sy in zip(panel, fast, slow)
    ])
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True) / beam.get_wavelength()
    q_ref = expected - np.array(beam.get_s0())
    np.testing.assert_allclose(geom.q(sel), q_ref, atol=2e-7)
    assert set(panel.tolist()) == set(range(64))  # every panel checked
    # the per-panel split matches dxtbx's per-panel arrays
    raw = expt.imageset.get_raw_data(0)
    for i in (0, 17, 63):
        np.testing.assert_array_equal(geom.split(counts)[i], raw[i].as_numpy_array())


# ---------------------------------------------------------------- real thaumatin


def _rotate(v, axis, angle):
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return v * c + np.cross(axis, v) * s + axis * np.einsum("ij,ij->i", axis, v)[:, None] * (1 - c)


@pytest.mark.real_data
def test_thaumatin_q_and_hkl_match_dials(thaumatin):
    """|q| = 1/d from DIALS's d column and hkl = Miller index, via our code path."""
    from dials.array_family import flex

    expt = thaumatin["experiments"][0]
    refl = thaumatin["reflections"]
    refl = refl.select(refl["id"] == 0)
    assert len(refl) > 500
    s0 = np.array(expt.beam.get_s0())
    d = refl["d"].as_numpy_array()
    panel = refl["panel"].as_numpy_array()
    A_inv = np.linalg.inv(np.array(expt.crystal.get_A()).reshape(3, 3))
    miller = np.array(refl["miller_index"], dtype=float)
    delpsi = refl["delpsical.rad"].as_numpy_array()

    def q_at(col):
        x, y, _ = refl[col].parts()
        return ex.s1_at(expt.detector, expt.beam, panel, x.as_numpy_array(), y.as_numpy_array()) - s0

    def hkl_of(q):
        # undo DIALS's stills rotation of the lattice point onto the Ewald
        # sphere: by delpsi about e1 = unit(q × ŝ0) (stills_ray_predictor.h)
        e1 = np.cross(q, s0 / np.linalg.norm(s0))
        e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
        return _rotate(q, e1, -delpsi) @ A_inv.T

    # predicted position: exact, |q|·d = 1 and hkl = Miller index
    q_cal = q_at("xyzcal.px")
    assert np.abs(np.linalg.norm(q_cal, axis=1) * d - 1).max() < 1e-4
    assert np.abs(hkl_of(q_cal) - miller).max() < 1e-3
    # observed centroid: our |q| equals DIALS's own 1/d there (|rlp| from
    # map_centroids_to_reciprocal_space, through xyzobs.mm and parallax) ...
    q_obs = q_at("xyzobs.px.value")
    r = refl.select(flex.bool(np.ones(len(refl), dtype=bool)))
    r.centroid_px_to_mm(thaumatin["experiments"][:1])
    r.map_centroids_to_reciprocal_space(thaumatin["experiments"][:1])
    rlp = r["rlp"].as_numpy_array()
    assert np.abs(np.linalg.norm(q_obs, axis=1) / np.linalg.norm(rlp, axis=1) - 1).max() < 1e-6
    # ... and 1/d of the Miller index within the centroid residuals (DIALS's
    # RMSD ~1 px, i.e. ~1e-3 relative at low angle, bounds this, not our code)
    rel = np.abs(np.linalg.norm(q_obs, axis=1) * d - 1)
    assert np.median(rel) < 1e-3
    close = np.abs(hkl_of(q_obs) - miller).max(axis=1) < 0.1
    assert close.mean() >= 0.95
    # the pixel-centre value (cache) is within half a pixel diagonal of the exact one
    geom = ex.compute_geometry(expt.detector, expt.beam)
    x, y, _ = refl["xyzobs.px.value"].parts()
    fx, sy = np.floor(x.as_numpy_array()).astype(int), np.floor(y.as_numpy_array()).astype(int)
    n_fast = expt.detector[0].get_image_size()[0]
    q_centre = geom.q(sy * n_fast + fx)
    scale = 0.172 / (expt.detector[0].get_distance() * expt.beam.get_wavelength())
    assert np.linalg.norm(q_centre - q_obs, axis=1).max() < 0.71 * scale
    q_centre_exact = ex.s1_at(expt.detector, expt.beam, panel, fx + 0.5, sy + 0.5) - s0
    assert np.abs(q_centre - q_centre_exact).max() < 3e-7  # float32 storage


@pytest.mark.real_data
def test_extract_program_roundtrip(thaumatin, tmp_path, capsys):
    """Extract with a static mask; counts, mask and hkl read back correctly;
    the file is smaller than the CBF; a rerun skips, overwrite redoes."""
    import pickle

    from scitbx.array_family import flex

    from dials.util.masking import phil_scope as mask_phil

    from diffuse_cli.masking import static_mask

    expt = thaumatin["experiments"][0]
    mparams = mask_phil.extract()
    mparams.border = 3
    geom = ex.compute_geometry(expt.detector, expt.beam)
    flat = static_mask(expt.imageset, mparams, geom)
    mask = tuple(ex.DetectorGeometry.split(geom, flat))
    mask = (flex.bool(np.ascontiguousarray(mask[0])),)
    assert 0.85 < flat.mean() < 0.95  # Pilatus gaps and the border
    mask_file = tmp_path / "static.mask"
    with open(mask_file, "wb") as fh:
        pickle.dump(mask, fh)
    out = tmp_path / "extracted"
    args = [str(thaumatin["expt"]), f"masks.static={mask_file}", f"output.directory={out}", f"output.log={tmp_path / 'x.log'}"]
    extract_cli.run(args)
    files = sorted(out.glob("thau_*.npz"))
    assert len(files) == 1
    e = ex.read_extract(files[0])
    raw = expt.imageset.get_raw_data(0)[0].as_numpy_array().ravel()
    expected_mask = mask[0].as_numpy_array().ravel() & (raw > -1) & (raw < expt.detector[0].get_trusted_range()[1])
    np.testing.assert_array_equal(e.mask, expected_mask)
    np.testing.assert_array_equal(e.counts, raw[expected_mask])
    np.testing.assert_allclose(e.A, np.array(expt.crystal.get_A()).reshape(3, 3))
    # the header's Exposure_time (0.019 s), not the Exposure_period (0.020 s)
    # that dxtbx's scan holds for these Pilatus CBFs (dials_compat.exposure_time)
    with open(thaumatin["image"], "rb") as fh:
        header = fh.read(4096).decode("latin-1")
    assert "# Exposure_time 0.0190000 s" in header
    assert e.exposure_time == pytest.approx(0.019, rel=1e-9)
    assert 0.8 < e.mask.mean() < 0.95
    # smaller than the image compressed by bzip2 (the counts are entropy-coded, not zip-deflated)
    import bz2

    assert os.path.getsize(files[0]) < len(bz2.compress(pathlib.Path(thaumatin["image"]).read_bytes(), 9))
    # hkl rebuilt from the file at the centroid pixels of strong reflections
    geom = ex.GeometryCache(out).by_key(e.geometry_key)
    refl = thaumatin["reflections"]
    refl = refl.select(refl["id"] == 0)
    x, y, _ = refl["xyzobs.px.value"].parts()
    flat = np.floor(y.as_numpy_array()).astype(int) * 2463 + np.floor(x.as_numpy_array()).astype(int)
    used_index = np.cumsum(e.mask) - 1
    ok = e.mask[flat]
    hkl = ex.used_hkl(e, geom)[used_index[flat[ok]]]
    miller = np.array(refl["miller_index"], dtype=float)[ok]
    # excitation error and half-pixel offsets allowed: within 0.5 of the index,
    # and q magnitudes agree with 1/d to the pixel size
    assert (np.abs(hkl - miller).max(axis=1) < 0.5).mean() > 0.99
    d_star = ex.used_d_star(e, geom)[used_index[flat[ok]]]
    scale = 0.172 / (351.0 * expt.beam.get_wavelength())
    assert np.abs(d_star - 1 / refl["d"].as_numpy_array()[ok]).max() < 6 * scale
    # resumable
    extract_cli.run(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stills"][0].get("skipped") is True
    extract_cli.run(args + ["output.overwrite=True"])
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["stills"][0].get("skipped")


# ---------------------------------------------------------------- file format


@pytest.mark.parametrize(
    "counts",
    [
        np.array([0, 3, 255, 70000, 254, 1], dtype=np.int32),
        np.array([-5, 3, 2**20], dtype=np.int32),
        np.array([0.5, 2.25, -1.0]),
    ],
)
def test_extract_file_roundtrip(tmp_path, counts):
    mask = np.zeros(20, dtype=bool)
    mask[np.arange(len(counts)) * 3] = True
    ref = ex.StillRef("x_00000", 0, 0, "/data/x.cbf", None, 0)
    A = np.arange(9.0).reshape(3, 3) + np.eye(3)
    ex.write_extract(tmp_path / "x.npz", mask=mask, counts=counts, A=A, exposure_time=0.1, geometry_key="k", ref=ref)
    e = ex.read_extract(tmp_path / "x.npz")
    np.testing.assert_array_equal(e.mask, mask)
    np.testing.assert_allclose(e.counts, counts.astype(np.float32) if counts.dtype.kind == "f" else counts)
    np.testing.assert_array_equal(e.A, A)
    assert ex.is_complete(tmp_path / "x.npz")
    (tmp_path / "bad.npz").write_bytes(b"truncated")
    assert not ex.is_complete(tmp_path / "bad.npz")


def _poisson_entropy_bits(lam: float) -> float:
    from scipy import stats

    k = np.arange(0, int(lam + 20 * np.sqrt(lam) + 20))
    p = stats.poisson.pmf(k, lam)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("n", [0, 1, 2, 4095, 4096, 100_001])
def test_count_codecs_exact(n):
    """Every codec gives back the exact counts, escapes (>= 15, >= 255, int32 range) included."""
    from diffuse_cli.formats import extract as fx

    rng = np.random.default_rng(n)
    low = rng.poisson(3.5, n)
    high = rng.poisson(300 + 200 * np.sin(np.arange(n) / 400.0))
    wild = rng.integers(0, 2**31 - 1, n)
    for counts, codec in ((low, "nibble"), (high, "delta"), (wild, None)):
        for name in ("counts", "sample"):
            z = fx.pack_counts(counts, name)
            if codec and n > 4096:
                assert str(z[f"{name}_codec"]) == codec
            back = fx.unpack_counts(z, name)
            assert back.dtype == np.int32 and fx.n_counts(z, name) == n
            np.testing.assert_array_equal(back, counts)
    import unittest.mock as mock

    for codec in ("byte", "delta", "nibble"):  # each codec on data it would not choose, too
        for counts in (wild, wild.astype(np.int32), high.astype(np.int32)):  # int32: the raw images' type
            with mock.patch.object(fx, "choose_codec", return_value=codec):
                z = fx.pack_counts(counts)
            np.testing.assert_array_equal(fx.unpack_counts(z), counts)


@pytest.mark.parametrize("lam,codec", [(3.5, "nibble"), (300.0, "delta")])
def test_count_codecs_near_entropy(lam, codec):
    """Stored bits per count within 0.6 bit of the Poisson entropy (nibble) or of
    the entropy of the difference of two Poisson counts (delta; Skellam, about
    the Gaussian 0.5·log2(2πe·2λ))."""
    from diffuse_cli.formats import extract as fx

    counts = np.random.default_rng(1).poisson(lam, 200_000)
    z = fx.pack_counts(counts)
    assert str(z["counts_codec"]) == codec
    bits = 8 * sum(z[k].nbytes for k in ("counts_stream", "counts_escaped")) / counts.size
    floor = _poisson_entropy_bits(lam) if codec == "nibble" else 0.5 * np.log2(2 * np.pi * np.e * 2 * lam)
    assert floor - 0.05 < bits < floor + 0.6, (bits, floor)


def test_extract_sample_and_old_schema(tmp_path):
    """The sampled counts are those of every SAMPLE_STRIDE-th pixel that is used, and a
    diffuse.extract/2 file (zip-deflated uint8 counts + overflows) still reads."""
    from diffuse_cli import program
    from diffuse_cli.formats import extract as fx

    rng = np.random.default_rng(4)
    n_pix = 10_003
    mask = rng.random(n_pix) > 0.3
    image = rng.poisson(40, n_pix)
    ref = ex.StillRef("x_00000", 0, 0, "/data/x.cbf", None, 0)
    ex.write_extract(tmp_path / "x.npz", mask=mask, counts=image[mask], A=np.eye(3), exposure_time=0.1,
                     geometry_key="k", ref=ref)
    z = fx.read_extract_arrays(tmp_path / "x.npz")
    np.testing.assert_array_equal(z["mask_bits"], np.packbits(mask))
    expected = np.flatnonzero(mask & (np.arange(n_pix) % fx.SAMPLE_STRIDE == 0))
    np.testing.assert_array_equal(fx.sample_pixels(z["mask_bits"], n_pix), expected)
    np.testing.assert_array_equal(fx.unpack_counts(z, "sample"), image[expected])
    # the extract program's own sample (extraction.extract_still: from the whole image) is the same
    np.testing.assert_array_equal(image[::fx.SAMPLE_STRIDE][mask[::fx.SAMPLE_STRIDE]], image[expected])
    counts = image[mask]
    over = np.flatnonzero(counts >= 255)
    program.write_npz(tmp_path / "old.npz", compresslevel=1, schema=np.array("diffuse.extract/2"),
                      mask_bits=np.packbits(mask), n_pixels=np.int64(n_pix),
                      counts=np.minimum(counts, 255).astype(np.uint8), overflow_index=over.astype(np.uint32),
                      overflow_counts=counts[over].astype(np.int32), A=np.eye(3), exposure_time=np.float64(0.1),
                      geometry_key=np.array("k"), experiment_index=np.int64(0), s0=np.array([0, 0, -1.0]))
    old = ex.read_extract(tmp_path / "old.npz")
    np.testing.assert_array_equal(old.mask, mask)
    np.testing.assert_array_equal(old.counts, counts)
    assert not fx.has_sample(fx.read_extract_arrays(tmp_path / "old.npz"))


def test_geometry_cache_file(tmp_path):
    det, beam = _simple_detector(), _beam()
    cache = ex.GeometryCache(tmp_path)
    g = cache.get(det, beam)
    assert (tmp_path / f"geometry_{g.key}.npz").exists()
    g2 = ex.GeometryCache(tmp_path).by_key(g.key)
    np.testing.assert_array_equal(g.s1, g2.s1)
    assert g.s1.dtype == np.float32
    # the key is per detector and beam direction, not per wavelength (issue 12)
    from dxtbx.model import BeamFactory

    assert ex.geometry_key(det, _beam(1.1)) == g.key
    assert ex.geometry_key(det, BeamFactory.simple_directional((0, 0.01, 1), 1.0)) != g.key


def test_geometry_taken_from_the_bragg_mask_folder(tmp_path, monkeypatch):
    """A geometry file in a read_also folder (diffuse.bragg_mask's) is copied, not computed again."""
    det, beam = _simple_detector(), _beam()
    computed = ex.GeometryCache(tmp_path / "masks").get(det, beam)

    def no_compute(*args):
        raise AssertionError("geometry computed again")

    monkeypatch.setattr(ex, "compute_geometry", no_compute)
    cache = ex.GeometryCache(tmp_path / "extracted", read_also=[tmp_path / "masks", None])
    (tmp_path / "extracted").mkdir()
    g = cache.get(det, beam)
    np.testing.assert_array_equal(g.s1_unit, computed.s1_unit)
    np.testing.assert_array_equal(ex.GeometryCache(tmp_path / "extracted").by_key(g.key).s1_unit, computed.s1_unit)


# ---------------------------------------------------------------- program conventions


def test_phil_file_parses():
    from libtbx.phil import parse

    text = (REPO / "phil" / "extract.phil").read_text()
    params = extract_cli.phil_scope.fetch(parse(text)).extract()
    assert params.output.directory == "extracted"


def test_missing_file(tmp_path):
    with pytest.raises(Sorry, match="File not found: .*nope.expt"):
        extract_cli.run([str(tmp_path / "nope.expt")])


def test_rotation_frame_hkl_matches_dials_predictions():
    """Rotation data: hkl of a pixel on frame i is (S R(φ_i) F A)⁻¹ q. At
    DIALS's predicted positions (ScanStaticReflectionPredictor) it equals the
    Miller index to within the rotation over half a frame; ignoring the
    goniometer rotation does not."""
    from dials.algorithms.spot_prediction import ScanStaticReflectionPredictor
    from dxtbx.model import Crystal, GoniometerFactory, ScanFactory
    from dxtbx.model.experiment_list import Experiment
    from scitbx import matrix

    from diffuse_cli.geometry import setting_matrix

    det = _simple_detector(shape=(500, 500), distance=100.0)
    beam = _beam()
    gonio = GoniometerFactory.known_axis((1, 0, 0))
    osc = 0.5
    scan = ScanFactory.make_scan(
        image_range=(1, 20), exposure_times=0.1, oscillation=(10.0, osc), epochs=list(range(20)), deg=True
    )
    R = matrix.col((1, 2, 3)).normalize().axis_and_angle_as_r3_rotation_matrix(0.4)
    crystal = Crystal(R * matrix.col((30, 0, 0)), R * matrix.col((0, 40, 0)), R * matrix.col((0, 0, 50)), space_group_symbol="P1")
    expt = Experiment(beam=beam, detector=det, goniometer=gonio, scan=scan, crystal=crystal)
    assert ex.is_rotation(expt)
    refl = ScanStaticReflectionPredictor(expt, dmin=2.0).for_ub(matrix.sqr(crystal.get_A()))
    assert len(refl) > 100
    x, y, z = (c.as_numpy_array() for c in refl["xyzcal.px"].parts())
    miller = np.array(refl["miller_index"], dtype=float)
    q = ex.s1_at(det, beam, refl["panel"].as_numpy_array(), x, y) - np.array(beam.get_s0())
    frame = np.floor(z).astype(int)
    dev = np.empty(len(refl))
    dev_static = np.empty(len(refl))
    A = np.array(crystal.get_A()).reshape(3, 3)
    for f in np.unique(frame):
        sel = frame == f
        M = setting_matrix(crystal, gonio, scan, int(f))
        dev[sel] = np.abs(q[sel] @ np.linalg.inv(M).T - miller[sel]).max(axis=1)
        dev_static[sel] = np.abs(q[sel] @ np.linalg.inv(A).T - miller[sel]).max(axis=1)
    # half a frame of rotation moves q by at most |q|·osc/2 rad; in hkl that is
    # at most |q|·osc/2·max(a, b, c) = 2 · 0.0044 · 50 ≈ 0.44 at d = 2 Å
    bound = np.linalg.norm(q, axis=1) * np.radians(osc / 2) * 50 + 1e-6
    assert np.all(dev <= bound)
    assert np.median(dev) < 0.1
    assert np.median(dev_static) > 1.0  # frames start at φ = 10°: A alone is wrong
