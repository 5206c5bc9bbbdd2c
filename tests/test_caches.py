"""Geometry and correction caches per detector, not per beam (issue 12, item 1).

XFEL shots of one detector each have their own wavelength. The pixel
directions ŝ1 (geometry_<key>.npz) and the correction factors
(factors_<key>.npz) are cached once per detector and beam direction; each
shot's s1 = ŝ1/λ and its λ-dependent factors (sensor, air, Kapton) come from
per-pixel path lengths and the shot's attenuation coefficients. Checked here:

* one geometry file and one factors file, of fixed size, for 1, 100 and many
  shots with jittered wavelengths; the in-memory caches stay bounded (LRU);
* corrected intensities equal the exact per-λ computation
  (corrections.detector_multipliers with each shot's own beam, a separate
  code path through dxtbx) within 1e-4 relative;
* hkl and |q| of each shot equal A⁻¹(s1 − s0) with its own wavelength.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from diffuse_cli import corrections as C
from diffuse_cli import extraction as ex
from diffuse_cli.command_line import correct
from diffuse_cli.geometry import detector_geometry

from dxtbx.model import BeamFactory, Crystal, Detector, DetectorFactory, Experiment, ExperimentList, Panel

WAVELENGTH = 1.0
JITTER = 2e-3  # rms relative wavelength jitter, as at an XFEL (issue 10: 0.2 %)


def small_detector():
    """Two small panels (one tilted), silicon sensors: cheap, but every factor applies."""
    d = DetectorFactory.simple("PAD", 80.0, (3.0, 2.5), "+x", "-y", (0.172, 0.172), (24, 20))
    d[0].set_thickness(0.45)
    d[0].set_material("Si")
    det = Detector()
    det.add_panel(d[0])
    p = Panel()
    p.set_frame((1, 0, 0), (0, -0.9, -0.43588989435406733), (-3.0, -4.0, -80.0))
    p.set_pixel_size((0.1, 0.1))
    p.set_image_size((16, 12))
    p.set_thickness(0.32)
    p.set_material("Si")
    det.add_panel(p)
    return det


def shot_beam(wavelength):
    return BeamFactory.make_polarized_beam(
        sample_to_source=(0, 0, 1), wavelength=float(wavelength), polarization=(0, 1, 0), polarization_fraction=0.99
    )


def shots(n, seed=3):
    """n experiments of one detector, each with its own wavelength and orientation."""
    from scitbx import matrix

    rng = np.random.default_rng(seed)
    det = small_detector()
    el = ExperimentList()
    for lam in WAVELENGTH * (1 + JITTER * rng.standard_normal(n)):
        R = matrix.sqr(tuple(np.linalg.qr(rng.normal(size=(3, 3)))[0].ravel()))
        a, b, c = R * matrix.col((40, 0, 0)), R * matrix.col((3, 50, 0)), R * matrix.col((2, 4, 60))
        el.append(Experiment(beam=shot_beam(lam), detector=det, crystal=Crystal(a, b, c, space_group_symbol="P1")))
    return el


def true_intensity(hkl):
    return 50.0 + 20.0 * np.cos(np.pi * hkl[:, 0]) ** 2 + 5.0 * hkl[:, 2] ** 2


def exact_total(expt, options):
    """Every multiplier recomputed for this shot's own beam (dxtbx pixel positions, no cache)."""
    return C.detector_multipliers(expt.detector, expt.beam, options)["total"]


def write_shots(root, experiments, options, exposure=0.5, per_shot=None):
    """Extract files (diffuse.extract/2) through the extraction API, counts from the exact forward model.

    per_shot: N of each shot (counts = N·I/total) when not the exposure time.
    """
    ext = root / "extracted"
    ext.mkdir(parents=True, exist_ok=True)
    cache = ex.GeometryCache(ext)
    truth = []
    rng = np.random.default_rng(11)
    for i, e in enumerate(experiments):
        g = cache.get(e.detector, e.beam)
        mask = rng.random(g.n_pixels) > 0.2
        q = np.concatenate([pg.q.reshape(-1, 3) for pg in detector_geometry(e.detector, e.beam)])[mask]
        A = np.array(e.crystal.get_A()).reshape(3, 3)
        hkl = q @ np.linalg.inv(A).T
        I_true = true_intensity(hkl)
        n = exposure if per_shot is None else per_shot[i]
        counts = n * I_true / exact_total(e, options)[mask]
        ref = ex.StillRef(f"shot_{i:04d}", i, 0, f"/data/shot_{i:04d}.cbf", None, 0)
        ex.write_extract(ext / f"shot_{i:04d}.npz", mask=mask, counts=counts.astype(np.float32), A=A,
                         exposure_time=exposure, geometry_key=g.key, ref=ref, s0=e.beam.get_s0())
        truth.append({"mask": mask, "I": I_true, "hkl": hkl, "d_star": np.linalg.norm(q, axis=1)})
    return ext, truth, cache


def run_correct(root, *extra):
    return correct.run([str(root / "combined.expt"), str(root / "extracted"), f"output.directory={root / 'corrected'}",
                        f"output.log={root / 'correct.log'}", *extra])


def cache_files(root):
    sizes = {}
    for sub, prefix in (("extracted", "geometry_"), ("corrected", "factors_")):
        for p in sorted((root / sub).glob(prefix + "*.npz")):
            sizes[p.name] = os.path.getsize(p)
    return sizes


def memory_bytes(memo: dict) -> int:
    return sum(v.nbytes for entry in memo.values() for v in _arrays(entry))


def _arrays(x):
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _arrays(v)


@pytest.fixture(scope="module")
def corrected_runs(tmp_path_factory):
    """diffuse.correct on 1 and on 100 jittered shots of one detector (Kapton on: every factor)."""
    options = C.CorrectionOptions(kapton=C.KaptonParams())
    out = {}
    for n in (1, 100):
        root = tmp_path_factory.mktemp(f"shots_{n}")
        el = shots(n)
        el.as_file(str(root / "combined.expt"))
        ext, truth, cache = write_shots(root, el, options)
        run_correct(root, "kapton.apply=True")
        out[n] = {"root": root, "experiments": el, "truth": truth, "cache": cache, "options": options}
    return out


def test_one_cache_of_fixed_size_for_1_and_100_shots(corrected_runs):
    one, hundred = corrected_runs[1], corrected_runs[100]
    lams = [e.beam.get_wavelength() for e in hundred["experiments"]]
    assert len(set(lams)) == 100 and np.std(lams) > 1e-3 * WAVELENGTH  # every shot its own wavelength
    files_1, files_100 = cache_files(one["root"]), cache_files(hundred["root"])
    assert len(files_100) == 2  # one geometry_, one factors_ file
    assert files_1 == files_100  # same names (key: detector + beam direction) and byte sizes
    # in memory: the extraction cache holds one geometry, whatever the number of shots
    for run in (one, hundred):
        assert len(run["cache"]._by_key) == 1
    assert memory_bytes({k: g.s1_unit for k, g in one["cache"]._by_key.items()}) == \
        memory_bytes({k: g.s1_unit for k, g in hundred["cache"]._by_key.items()})
    # merge's per-detector memo (corrections._cached) after reading every shot
    sizes = []
    for run in (one, hundred):
        memo = {}
        for f in sorted((run["root"] / "corrected").glob("shot_*.npz")):
            C.load_observations(f, cache=memo)
        assert len(memo) == 1
        sizes.append(memory_bytes(memo))
    assert sizes[0] == sizes[1]


def test_corrected_intensities_equal_exact_per_wavelength_computation(corrected_runs):
    run = corrected_runs[100]
    memo = {}
    worst = 0.0
    n_other = 0
    for i, t in enumerate(run["truth"]):
        f = run["root"] / "corrected" / f"shot_{i:04d}.npz"
        obs = C.load_observations(f, cache=memo)
        n_other += "attenuation_mu_per_mm" in np.load(f).files
        worst = max(worst, float(np.max(np.abs(obs["I"] / t["I"] - 1))))
        # q and hkl with the shot's own wavelength
        np.testing.assert_allclose(obs["d_star"], t["d_star"], rtol=1e-5)
        np.testing.assert_allclose(obs["hkl"], t["hkl"], atol=2e-5)
    assert n_other == 99  # all but the reference shot use the per-shot factors
    assert worst < 1e-4, worst
    # and the λ-dependent factors really matter at this jitter (the test can fail)
    e0, e1 = run["experiments"][0], run["experiments"][1]
    ratio = exact_total(e1, run["options"]) / exact_total(e0, run["options"])
    assert np.abs(ratio - 1).max() > 2e-4


def test_many_shots_bounded_caches(tmp_path):
    """10⁴ shots: one geometry entry and file, LRU memory bounds, exact per-shot totals."""
    el = shots(10_000, seed=5)
    cache = ex.GeometryCache(tmp_path, max_entries=2)
    keys = {cache.get(e.detector, e.beam).key for e in el}
    assert len(keys) == 1 and len(list(tmp_path.glob("geometry_*.npz"))) == 1
    assert len(cache._by_key) == 1
    # views carry each shot's own s1 = ŝ1/λ
    g = cache.get(el[7].detector, el[7].beam)
    exact = np.concatenate([pg.s1.reshape(-1, 3) for pg in detector_geometry(el[7].detector, el[7].beam)])
    np.testing.assert_allclose(g.s1, exact, rtol=0, atol=2e-7 / WAVELENGTH)
    # an LRU cache of other detectors stays at max_entries
    for dz in range(5):
        det = small_detector()
        det[0].set_frame(det[0].get_fast_axis(), det[0].get_slow_axis(), (3.0, 2.5, -80.0 - dz))
        cache.get(det, el[0].beam)
    assert len(cache._by_key) == 2
    # the per-shot factors from cached directions and paths equal the exact per-λ ones
    options = C.CorrectionOptions()
    e0 = el[0]
    geo = C.geometry_from_s1(e0.detector, g.s1_unit.astype(np.float64) / e0.beam.get_wavelength(), e0.beam.get_s0())
    m = C.detector_multipliers(e0.detector, e0.beam, options, geometry=geo)
    paths = C.path_lengths(e0.detector, e0.beam, geo, options)
    direction = (m["solid_angle"] * m["polarization"]).astype(np.float32)
    offsets = g.panel_offsets
    pixels = np.arange(g.n_pixels)
    worst = 0.0
    for e in el[::250]:
        coefficients = C.wavelength_coefficients(e.detector, e.beam.get_wavelength(), options)
        total = C.shot_total(direction, {k: v.astype(np.float32) for k, v in paths.items()}, coefficients, pixels, offsets)
        worst = max(worst, float(np.max(np.abs(total / exact_total(e, options) - 1))))
    assert worst < 1e-4, worst
    # a bounded memo: more files than entries never grows it
    memo = {}
    for i in range(3 * C.CACHE_ENTRIES):
        p = tmp_path / f"f{i}.npy"
        np.save(p, np.zeros(10))
        C._cached(memo, str(p), lambda: np.zeros(10))
    assert len(memo) == C.CACHE_ENTRIES


def test_summary_records_wavelength_and_normalisation(corrected_runs):
    rows = json.loads((corrected_runs[100]["root"] / "corrected" / "summary.json").read_text())["stills"]
    assert {r["normalisation"] for r in rows} == {"exposure_time"}
    assert len({r["wavelength"] for r in rows}) == 100


def test_xfel_shots_normalised_per_shot(tmp_path):
    """Shots without an exposure time: per 1e12 incident photons from a pulse-energy
    table (N = E/(hc/λ)/1e12, by hand), or by 1 without one; never per second."""
    el = shots(3, seed=9)
    el.as_file(str(tmp_path / "combined.expt"))
    e_mj = [1.2, 0.8, 2.5]
    ev = [12398.419843320026 / e.beam.get_wavelength() for e in el]
    photons = [E * 1e-3 / (v * 1.602176634e-19) for E, v in zip(e_mj, ev)]
    options = C.CorrectionOptions()
    ext, truth, _ = write_shots(tmp_path, el, options, exposure=0.0, per_shot=[p / 1e12 for p in photons])
    table = tmp_path / "pulses.csv"
    table.write_text("image,pulse_energy_mj\n" + "".join(f"shot_{i:04d}.cbf,{E}\n" for i, E in enumerate(e_mj)))
    rows = run_correct(tmp_path, f"normalisation.table={table}")
    assert [r["normalisation"] for r in rows] == ["incident_photons"] * 3
    for i, t in enumerate(truth):
        obs = C.load_observations(tmp_path / "corrected" / f"shot_{i:04d}.npz")
        assert obs["normalisation"] == "incident_photons"
        assert np.max(np.abs(obs["I"] / t["I"] - 1)) < 1e-4
    # no table, no flux, no exposure time: N = 1, recorded as such
    rows = run_correct(tmp_path, "overwrite=True")
    assert [(r["normalisation"], r["normalisation_value"]) for r in rows] == [("unit", 1.0)] * 3
    obs = C.load_observations(tmp_path / "corrected" / "shot_0001.npz")
    assert np.allclose(obs["I"], truth[1]["I"] * photons[1] / 1e12, rtol=1e-4)
    # per second demanded: a one-line Sorry
    from libtbx.utils import Sorry

    with pytest.raises(Sorry, match="no exposure time"):
        run_correct(tmp_path, "normalisation.mode=exposure_time", "overwrite=True")


def test_integer_counts_through_correct_and_merge_reader(tmp_path):
    """Integer counts (diffuse.extract/3's entropy-coded streams: low counts as
    nibbles, high ones as zig-zag differences) reach diffuse.merge's reader
    exactly: I = counts · total / t with each shot's exact per-λ total, and
    diffuse.correct's summary median from its sampled pixels."""
    from diffuse_cli.formats import extract as fx

    el = shots(2, seed=13)
    el.as_file(str(tmp_path / "combined.expt"))
    ext = tmp_path / "extracted"
    ext.mkdir()
    cache = ex.GeometryCache(ext)
    rng = np.random.default_rng(2)
    counts_by_shot = []
    for i, (e, lam) in enumerate(zip(el, (3.0, 400.0))):
        g = cache.get(e.detector, e.beam)
        mask = rng.random(g.n_pixels) > 0.1
        counts = rng.poisson(lam, int(mask.sum())).astype(np.int32)
        ref = ex.StillRef(f"shot_{i:04d}", i, 0, f"/data/shot_{i:04d}.cbf", None, 0)
        ex.write_extract(ext / f"shot_{i:04d}.npz", mask=mask, counts=counts, A=np.array(e.crystal.get_A()).reshape(3, 3),
                         exposure_time=0.5, geometry_key=g.key, ref=ref, s0=e.beam.get_s0())
        counts_by_shot.append((mask, counts))
    rows = run_correct(tmp_path)
    options = C.CorrectionOptions()
    for i, (mask, counts) in enumerate(counts_by_shot):
        f = tmp_path / "corrected" / f"shot_{i:04d}.npz"
        obs = C.load_observations(f)
        expected = counts * exact_total(el[i], options)[mask] / 0.5
        np.testing.assert_allclose(obs["I"], expected, rtol=1e-4)
        z = fx.read_extract_arrays(ext / f"shot_{i:04d}.npz")
        assert str(z["counts_codec"]) == ("nibble", "delta")[i]  # both integer codecs exercised
        sample = fx.sample_pixels(z["mask_bits"], z["n_pixels"])
        ranks = np.cumsum(mask) - 1
        assert rows[i]["median_I"] == pytest.approx(float(np.median(obs["I"][ranks[sample]])), rel=1e-9)
