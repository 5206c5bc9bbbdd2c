"""diffuse.simulate: images DIALS reads and indexes, exact forward physics, truth map.

Truth comes from the simulator's own analytic model (TruthModel, rebuilt from
truth.json), from DIALS (dials.import, stills indexing, orientation
comparison) and from dxtbx reading the CBFs back.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli import dials_compat, simulate
from diffuse_cli.command_line import simulate as simulate_cli
from diffuse_cli.grid import HKLGrid

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def run_simulate(directory: pathlib.Path, *args: str) -> pathlib.Path:
    """Run diffuse.simulate in-process with its log in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    simulate_cli.run(
        [f"output.directory={directory}", f"output.log={directory / 'diffuse.simulate.log'}", *args]
    )
    return directory


@pytest.fixture(scope="module")
def sim10(tmp_path_factory) -> pathlib.Path:
    """The done-when simulation: 10 stills, seed 7, default everything."""
    return run_simulate(tmp_path_factory.mktemp("sim") / "sim", "n_stills=10", "seed=7")


def load_truth(directory: pathlib.Path) -> dict:
    with open(directory / "truth.json") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- 1: DIALS


def test_dials_import_reads_simulated_geometry(sim10, tmp_path, monkeypatch):
    from dials.command_line.dials_import import run as dials_import
    from dxtbx.model.experiment_list import ExperimentListFactory

    truth = load_truth(sim10)
    images = [str(sim10 / name) for name in truth["images"]]
    assert len(images) == 10 and all(os.path.exists(p) for p in images)
    monkeypatch.chdir(tmp_path)
    dials_import(images + ["output.experiments=imported.expt"])
    experiments = ExperimentListFactory.from_json_file("imported.expt", check_format=False)
    assert len(experiments) == 10
    want = truth["detector_and_beam"]
    for expt in experiments:
        assert expt.beam.get_wavelength() == pytest.approx(want["beam"]["wavelength_A"], abs=1e-9)
        # a still: zero-width scan that still carries the exposure time
        assert expt.scan.get_oscillation()[1] == 0.0
        assert expt.scan.get_exposure_times()[0] == pytest.approx(truth["exposure_time_s"], abs=1e-7)
        assert len(expt.detector) == len(want["panels"]) == 1
        for panel, p in zip(expt.detector, want["panels"]):
            np.testing.assert_allclose(panel.get_origin(), p["origin_mm"], atol=1e-6)
            np.testing.assert_allclose(panel.get_fast_axis(), p["fast_axis"], atol=1e-6)
            np.testing.assert_allclose(panel.get_slow_axis(), p["slow_axis"], atol=1e-6)
            np.testing.assert_allclose(panel.get_pixel_size(), p["pixel_size_mm"], atol=1e-9)
            assert list(panel.get_image_size()) == p["image_size"]
            np.testing.assert_allclose(panel.get_trusted_range(), p["trusted_range"])
            assert panel.get_material() == "Si"
            assert panel.get_thickness() == pytest.approx(0.45, abs=1e-6)
            assert type(panel.get_px_mm_strategy()).__name__ == p["px_mm_strategy"]


INDEX_SCRIPT = """
import json, sys
import numpy as np
import diffuse_cli
from diffuse_cli import dials_compat
if {no_shim}:
    dials_compat.uninstall_mono_simulation_shim()
import libtbx.phil
from dials.algorithms.indexing import DialsIndexError
from dials.command_line.stills_process import Processor, do_import, phil_scope
from dials.algorithms.indexing.compare_orientation_matrices import (
    difference_rotation_matrix_axis_angle,
)
from diffuse_cli.simulation import make_crystal

directory, out_dir, indices = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3:]]
truth = json.load(open(directory + "/truth.json"))
params = phil_scope.fetch(libtbx.phil.parse('''
indexing.known_symmetry.space_group=%s
indexing.known_symmetry.unit_cell=%s
indexing.stills.candidate_outlier_rejection=False
output.output_dir=%s
output.composite_output=False
output.experiments_filename=None
output.strong_filename=None
output.indexed_filename=None
output.refined_experiments_filename=None
output.integrated_filename=None
output.integrated_experiments_filename=None
mp.debug.output_debug_logs=False
''' % (truth["space_group"].replace(" ", ""), ",".join(map(str, truth["unit_cell"])), out_dir))).extract()
processor = Processor(params)
results = {{}}
for i in indices:
    experiments = do_import(directory + "/" + truth["images"][i])
    strong = processor.find_spots(experiments)
    try:
        indexed_expts, indexed = processor.index(experiments, strong)
    except DialsIndexError as e:
        results[i] = {{"error": str(e)}}
        continue
    reference = make_crystal(truth["unit_cell"], truth["space_group"], np.array(truth["stills"][i]["U"]))
    _, _, angle, _ = difference_rotation_matrix_axis_angle(reference, indexed_expts[0].crystal)
    results[i] = {{"angle": abs(angle), "n_indexed": len(indexed)}}
print("RESULT " + json.dumps(results))
"""


def index_stills(directory, indices, out_dir, no_shim=False) -> dict:
    """DIALS stills indexing (stills_process Processor) in a clean subprocess."""
    script = INDEX_SCRIPT.format(no_shim=bool(no_shim))
    proc = subprocess.run(
        [PYTHON, "-c", script, str(directory), str(out_dir), *map(str, indices)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return {int(k): v for k, v in json.loads(line[len("RESULT ") :]).items()}


def test_dials_stills_indexing_recovers_orientations(sim10, tmp_path):
    """≥ 9 of 10 index; each recovered orientation within 0.1° of the truth.

    Two subprocesses (5 stills each) run in parallel.
    """
    import concurrent.futures

    halves = [list(range(0, 10, 2)), list(range(1, 10, 2))]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(index_stills, sim10, half, tmp_path / f"proc{j}") for j, half in enumerate(halves)
        ]
        results = {}
        for f in futures:
            results.update(f.result())
    print("indexing results:", json.dumps(results))
    assert sorted(results) == list(range(10))
    indexed = {i: r for i, r in results.items() if "angle" in r}
    assert len(indexed) >= 9, results
    for i, r in indexed.items():
        assert r["angle"] < 0.1, (i, r)
        assert r["n_indexed"] > 100, (i, r)


def test_stills_indexing_fails_without_mono_sim_shim(sim10, tmp_path):
    """Without dials_compat's shim DIALS stills indexing finds no solution."""
    results = index_stills(sim10, [0], tmp_path / "noshim", no_shim=True)
    assert "angle" not in results[0], results
    assert "No suitable indexing solution" in results[0]["error"]


# --------------------------------------------------------------------------- 2: forward physics


def _observed_over_truth(directory: pathlib.Path, min_counts: float):
    """I_obs / I_true for every trusted pixel above ``min_counts`` of every image.

    Reads the CBFs with dxtbx and divides out the *pipeline's* geometry and
    correction factors (diffuse_cli.geometry / corrections), an implementation
    of the same physics that shares no code with the simulator's forward
    model. The attenuation coefficients are the simulator's (xraylib, recorded
    in truth.json), so table differences (test_attenuation_tables_agree) do
    not enter.
    """
    from dxtbx.model.experiment_list import ExperimentListFactory

    from diffuse_cli import corrections
    from diffuse_cli.geometry import detector_geometry

    truth = load_truth(directory)
    model = simulate.TruthModel.from_json(directory / "truth.json")
    ratios = []
    for still in truth["stills"]:
        expt = ExperimentListFactory.from_filenames([str(directory / truth["images"][still["index"]])])[0]
        detector, beam = expt.detector, expt.beam
        wavelength = beam.get_wavelength()
        data = expt.imageset.get_raw_data(0)
        A_inv_T = np.linalg.inv(np.array(still["A"])).T
        mu_air = truth["air"]["mu_per_mm_xraylib"]
        for panel_id, (panel, g) in enumerate(zip(detector, detector_geometry(detector, beam))):
            counts = data[panel_id].as_numpy_array().astype(np.float64)
            lo, hi = panel.get_trusted_range()
            use = (counts > lo) & (counts < hi) & (counts >= min_counts)
            if truth["sensor"]["material"]:
                eta = corrections.sensor_efficiency(
                    panel, g.s1, wavelength, mu=truth["sensor"]["mu_per_mm_xraylib"],
                    thickness_mm=truth["sensor"]["thickness_mm"],
                )
            else:
                eta = 1.0
            # T = exp(-mu L): the pipeline's T with its own mu scaled to the simulator's
            # (xraylib's at the simulated beam.wavelength; an XFEL shot's λ differs from it)
            nominal = truth["detector_and_beam"]["beam"]["wavelength_A"]
            T_air = corrections.air_transmission(g.lab, wavelength, **_air(truth)) ** (
                mu_air / corrections.air_mu(nominal, **_air(truth))
            )
            factor = (
                still["scale"] * (1.0 if truth["kind"] == "xfel" else truth["exposure_time_s"])
                * corrections.solid_angle(panel, g.lab) / 1e-6
                * corrections.polarization(g.s1, beam)
                * eta
                * T_air
            )
            hkl = g.q @ A_inv_T
            expected = model(hkl[use], g.d_star[use])
            ratios.append(counts[use] / factor[use] / expected)
    return np.concatenate(ratios)


def _air(truth):
    return {"pressure_kpa": truth["air"]["pressure_kpa"], "temperature_k": truth["air"]["temperature_k"]}


@pytest.mark.parametrize("detector, sensor", [("single", "none"), ("multi", "Si")])
def test_forward_physics_inverts_to_truth(tmp_path, detector, sensor):
    """counts / (scale t Ω/µsr P η T) equals I_true(hkl, d*) to < 0.1 % per pixel.

    Without parallax (no sensor on the single panel; the multi-panel CBF
    carries none) the pipeline's pixel-centre Ω = A cos ψ / r² and the
    simulator's exact corner-quadrilateral Ω differ by O((a/r)²) ~ 1e-7, so
    rounding (< 5e-4 at ≥ 1000 counts, mean zero) is the only error.
    """
    directory = run_simulate(
        tmp_path / "fwd", "n_stills=2", "seed=11", "noise=False", "bragg=False", "truth.map=False",
        "model.intensity_scale=100", f"detector={detector}", f"sensor.material={sensor}",
    )
    ratio = _observed_over_truth(directory, min_counts=1000)
    assert ratio.size > 1.5e6  # most of 2 × ~1M pixels take part
    assert np.max(np.abs(ratio - 1.0)) < 1e-3
    assert abs(np.mean(ratio) - 1.0) < 1e-5


def test_forward_physics_with_parallax(tmp_path):
    """Si sensor with dxtbx's parallax: counts / (scale t Ω/µsr P η T) equals I_true to < 0.1 % per pixel.

    The simulator's Ω is that of the rays dxtbx assigns to the pixel: they
    enter the sensor over the pixel's corners mapped by pixel_to_millimeter,
    a patch smaller than the pixel because they are absorbed deeper, farther
    from the sample (about −2 z̄/D, up to 4.5e-3 for 0.45 mm at 200 mm). The
    pipeline's Ω must include that patch (correction_factors.parallax_area_factor),
    so the mean ratio is 1 to rounding, as without parallax.
    """
    directory = run_simulate(
        tmp_path / "fwd", "n_stills=1", "seed=11", "noise=False", "bragg=False", "truth.map=False",
        "model.intensity_scale=100",
    )
    ratio = _observed_over_truth(directory, min_counts=1000)
    print("parallax: mean ratio - 1 = %.3g, spread %.3g" % (ratio.mean() - 1, np.ptp(ratio)))
    assert np.max(np.abs(ratio - 1.0)) < 1e-3
    assert abs(np.mean(ratio) - 1.0) < 1e-5


def test_attenuation_tables_agree():
    """xraylib (the simulator's μ) and cctbx's NIST tables (the pipeline's) within 2 %.

    Air (N, O, Ar) and Si at 8.3, 12.4 and 17.7 keV; the two compilations
    differ by about 1 % for N and O.
    """
    from diffuse_cli import corrections
    from diffuse_cli.simulation import forward

    class _Si:
        def get_mu(self):
            return 0.0

        def get_material(self):
            return "Si"

        def get_name(self):
            return "Si"

    for wavelength in (0.7, 1.0, 1.5):
        air = forward.air_attenuation(wavelength, 101.325, 293.15) / corrections.air_mu(wavelength, 101.325, 293.15)
        si = forward.sensor_attenuation("Si", wavelength) / corrections.sensor_mu(_Si(), wavelength)
        assert abs(air - 1) < 0.02 and abs(si - 1) < 0.02, (wavelength, air, si)


def test_masked_pixels_are_outside_trusted_range(tmp_path):
    """Gaps, beamstop and dead pixels read -1, hot pixels the overload value."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    directory = run_simulate(
        tmp_path / "mask", "n_stills=1", "seed=5", "bragg=False", "truth.map=False",
        "masking.dead_fraction=0.001", "masking.hot_fraction=0.001",
    )
    truth = load_truth(directory)
    expt = ExperimentListFactory.from_filenames([str(directory / truth["images"][0])])[0]
    panel = expt.detector[0]
    data = expt.imageset.get_raw_data(0)[0]
    trusted = panel.get_trusted_range_mask(data).as_numpy_array()
    counts = data.as_numpy_array()
    # module gap rows 195..211 (Pilatus-like) and the beam centre are masked
    assert not trusted[200, :].any() and not trusted[:, 490].any()
    bx, by = panel.get_beam_centre_px(expt.beam.get_s0())
    assert not trusted[int(by), int(bx)]
    hot = counts == int(panel.get_trusted_range()[1])
    assert 500 < hot.sum() < 2000 and not trusted[hot].any()
    dead_like = counts == -1
    assert not trusted[dead_like].any()
    assert trusted.mean() > 0.85


# --------------------------------------------------------------------------- multi-panel round trip


def test_multi_panel_cbf_round_trip(tmp_path):
    from dxtbx.imageset import ImageSequence
    from dxtbx.model.experiment_list import ExperimentListFactory

    directory = run_simulate(
        tmp_path / "multi", "n_stills=1", "detector=multi", "bragg=False", "truth.map=False",
        "exposure_time=0.25", "beam.polarization_fraction=0.95",
    )
    truth = load_truth(directory)
    expt = ExperimentListFactory.from_filenames([str(directory / truth["images"][0])])[0]
    assert not isinstance(expt.imageset, ImageSequence) and expt.scan is None  # a still
    want = truth["detector_and_beam"]
    assert len(expt.detector) == len(want["panels"]) == 4
    normals = []
    for panel, p in zip(expt.detector, want["panels"]):
        np.testing.assert_allclose(panel.get_origin(), p["origin_mm"], atol=1e-6)
        np.testing.assert_allclose(panel.get_fast_axis(), p["fast_axis"], atol=1e-6)
        np.testing.assert_allclose(panel.get_slow_axis(), p["slow_axis"], atol=1e-6)
        np.testing.assert_allclose(panel.get_trusted_range(), p["trusted_range"])
        normals.append(np.cross(p["fast_axis"], p["slow_axis"]))
    # slightly different tilts
    assert np.ptp(np.array(normals), axis=0).max() > 1e-3
    assert expt.beam.get_wavelength() == pytest.approx(want["beam"]["wavelength_A"], abs=1e-9)
    assert expt.beam.get_polarization_fraction() == pytest.approx(0.95, abs=1e-6)
    assert dials_compat.exposure_time(expt.imageset, 0) == pytest.approx(0.25, abs=1e-7)
    # the format does not carry the sensor: it is recorded in truth.json instead
    sensor = dict(truth["sensor"])
    assert sensor.pop("mu_per_mm_xraylib") > 0
    assert sensor == {"material": "Si", "thickness_mm": 0.45, "carried_by_image_format": False}


# --------------------------------------------------------------------------- 3: program


def test_same_seed_same_images_other_seed_differs(tmp_path):
    small = ["n_stills=2", "detector_model.n_fast=256", "detector_model.n_slow=256", "truth.map=False"]
    a = run_simulate(tmp_path / "a", "seed=3", "nproc=2", *small)  # same result in parallel
    b = run_simulate(tmp_path / "b", "seed=3", *small)
    c = run_simulate(tmp_path / "c", "seed=4", *small)
    from dxtbx.model.experiment_list import ExperimentListFactory

    def pixels(d, i):
        expt = ExperimentListFactory.from_filenames([str(d / f"image_{i:05d}.cbf")])[0]
        return expt.imageset.get_raw_data(0)[0].as_numpy_array()

    for i in range(2):
        np.testing.assert_array_equal(pixels(a, i), pixels(b, i))
        assert not np.array_equal(pixels(a, i), pixels(c, i))
    ta, tb, tc = load_truth(a), load_truth(b), load_truth(c)
    assert ta["stills"] == tb["stills"] and ta["stills"] != tc["stills"]


def _cli(*args, cwd):
    return subprocess.run(
        [str(pathlib.Path(PYTHON).with_name("diffuse.simulate")), *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def test_help_shows_examples(tmp_path):
    proc = _cli("-h", cwd=tmp_path)
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "diffuse.simulate n_stills=10 seed=7" in proc.stdout


def test_show_config(tmp_path):
    proc = _cli("-c", cwd=tmp_path)
    assert proc.returncode == 0
    assert "n_stills = 20" in proc.stdout and "space_group = P43212" in proc.stdout
    assert not list(tmp_path.glob("*.cbf"))


def test_missing_phil_file_is_one_line_sorry(tmp_path):
    proc = _cli("missing.phil", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "Sorry: File not found: missing.phil"


def test_bad_symmetry_is_sorry(tmp_path):
    from libtbx.utils import Sorry

    with pytest.raises(Sorry, match="not compatible"):
        run_simulate(tmp_path / "bad", "unit_cell=79,95,38,90,90,90", "space_group=P43212", "n_stills=1")


def test_default_phil_file_parses():
    import libtbx.phil

    text = (REPO / "phil" / "simulate.phil").read_text()
    user = libtbx.phil.parse(text)
    working, unused = simulate_cli.phil_scope.fetch(user, track_unused_definitions=True)
    assert unused == []
    assert working.extract().n_stills == simulate_cli.phil_scope.extract().n_stills


# --------------------------------------------------------------------------- 4: truth map


def test_truth_map_grid_matches_hklgrid(sim10):
    truth = load_truth(sim10)
    with np.load(sim10 / "truth.npz") as z:
        I, h, k, l = z["I"], z["h"], z["k"], z["l"]
        ndiv = z["ndiv"]
        assert str(z["space_group"]) == truth["space_group"]
        np.testing.assert_allclose(z["unit_cell"], truth["unit_cell"])
    grid = HKLGrid.for_resolution(int(ndiv[0]), truth["unit_cell"], truth["d_min_A"])
    assert I.shape == grid.shape
    for axis, ref in zip((h, k, l), grid.axes()):
        np.testing.assert_array_equal(axis, ref)
    # NaN exactly beyond the detector's resolution limit
    model = simulate.TruthModel.from_json(sim10 / "truth.json")
    H = np.stack(np.meshgrid(h, k, l, indexing="ij"), -1)
    beyond = model.d_star(H) > 1.0 / truth["d_min_A"]
    assert np.array_equal(np.isnan(I), beyond)
    assert np.isfinite(I).sum() > 1e6


def _sub_grid(n, ndiv):
    frac = ((np.arange(n) + 0.5) / n - 0.5) / ndiv
    return np.stack(np.meshgrid(frac, frac, frac, indexing="ij"), -1).reshape(-1, 3)


def test_truth_map_is_voxel_mean_of_the_model(sim10):
    """truth.npz values = the mean of TruthModel over each voxel.

    Checked by brute force against a 24³ midpoint sub-grid of the whole model
    (the map takes the smooth terms on 3³ and the halos by an exact kernel),
    on random voxels and on voxels at integer hkl, where the halos peak.
    """
    model = simulate.TruthModel.from_json(sim10 / "truth.json")
    with np.load(sim10 / "truth.npz") as z:
        I, h, k, l, ndiv = z["I"], z["h"], z["k"], z["l"], int(z["ndiv"][0])
        assert int(z["subsample"]) == 3
    rng = np.random.default_rng(0)
    finite = np.argwhere(np.isfinite(I))
    centres_all = np.stack([h[finite[:, 0]], k[finite[:, 1]], l[finite[:, 2]]], -1)
    on_lattice = np.flatnonzero(np.all(centres_all == np.rint(centres_all), axis=1)
                                & (np.abs(centres_all).sum(axis=1) > 0))
    pick = np.concatenate([rng.choice(len(finite), 100, replace=False), rng.choice(on_lattice, 60, replace=False)])
    centres = centres_all[pick]
    values = I[tuple(finite[pick].T)]
    fine = np.array([model(c + _sub_grid(24, ndiv)).mean() for c in centres])
    # 2e-3: the 3³ rule's own error on the shell and water ring (≤ 0.15 % here)
    np.testing.assert_allclose(values, fine, rtol=2e-3)
    # the smooth terms on the documented 3³ sub-grid, exactly
    halo = model.halo_voxel_mean(np.rint(centres * ndiv).astype(np.int64), ndiv)
    smooth = np.mean([model.smooth(centres + o) for o in _sub_grid(3, ndiv)], axis=0)
    np.testing.assert_allclose(values, smooth + halo, rtol=1e-12)
    # not vacuous: a 3³ rule of the whole model overstates the halo peaks by ~5 %
    three = np.mean([model(centres + o) for o in _sub_grid(3, ndiv)], axis=0)
    lattice = slice(100, None)
    assert np.median((three - fine)[lattice] / model.halo_voxel_mean(
        np.rint(centres[lattice] * ndiv).astype(np.int64), ndiv)) > 0.03


def test_halo_voxel_kernel_matches_the_analytic_gaussian_mean():
    """The voxel mean of one halo against the closed form: with the truncation
    constant set to 0 the halo is exp(−δᵀGδ/2), and for a diagonal G (4/mmm)
    its mean over the voxel about a lattice point is a product of erf terms."""
    from scipy.special import erf

    model = simulate.TruthModel(simulate.DiffuseModelParameters(
        unit_cell=(79.1, 79.1, 37.9, 90, 90, 90), space_group="P 43 21 2", seed=1, d_min=3.0))
    assert np.allclose(model.G, np.diag(np.diag(model.G)))  # the Laue-averaged form is diagonal
    sigma = 1.0 / np.sqrt(np.diag(model.G))
    truncated = model.halo_voxel_kernel(2)
    model._ec = 0.0
    exact = {}
    for ndiv in (1, 2, 3):
        offsets, K = model.halo_voxel_kernel(ndiv)
        centre = K[np.all(offsets == 0, axis=1)][0]
        a = 0.5 / ndiv  # voxel half-width, lattice units
        exact[ndiv] = np.prod(np.sqrt(np.pi / 2) * sigma * 2 * erf(a / (np.sqrt(2) * sigma)) / (2 * a))
        # 32-point midpoint rule per axis: O(1/32²), 5e-4 at ndiv 2
        assert abs(centre / exact[ndiv] - 1) < 1e-3, (ndiv, centre, exact[ndiv])
    # the truncated halo (the model's) is lower, and its kernel is symmetric under δ → −δ
    offsets, K = truncated
    assert K[np.all(offsets == 0, axis=1)][0] < exact[2]
    order = {tuple(o): k for o, k in zip(offsets, K)}
    assert all(abs(order[tuple(-o)] - k) < 1e-12 * k for o, k in zip(offsets, K))


def test_truth_map_has_laue_symmetry(sim10):
    """I(QH) == I(H) for every 4/mmm operator, to 1e-6 relative."""
    with np.load(sim10 / "truth.npz") as z:
        I, h, k, l, ndiv = z["I"], z["h"], z["k"], z["l"], int(z["ndiv"][0])
    rotations = simulate.laue_rotations("P 43 21 2")
    assert len(rotations) == 16
    # for 4/mmm the operators are signed permutations of (h, k): check them as
    # array flips/transposes, independent of the simulator's own symmetry code
    finite = np.isfinite(I)
    checked = 0
    for R in rotations:
        idx = np.stack(np.meshgrid(h, k, l, indexing="ij"), -1)[finite]
        mapped = idx @ R.T  # rows: (Q H)ᵀ
        ii = np.rint(mapped * ndiv).astype(int) + (np.array(I.shape) - 1) // 2
        other = I[ii[:, 0], ii[:, 1], ii[:, 2]]
        np.testing.assert_allclose(other, I[finite], rtol=1e-6)
        checked += 1
    assert checked == 16
    # spelled out for a few operators
    fin = np.where(finite, I, 0.0)
    np.testing.assert_allclose(fin, np.transpose(fin, (1, 0, 2)), rtol=1e-6)  # (k, h, l)
    np.testing.assert_allclose(fin, fin[::-1, :, :], rtol=1e-6)  # (-h, k, l)
    np.testing.assert_allclose(fin, fin[:, :, ::-1], rtol=1e-6)  # (h, k, -l)
    # the comparison is not vacuous: a one-voxel shift along h changes the map
    assert not np.allclose(fin, np.roll(fin, 1, axis=0), rtol=1e-3)


def test_truth_map_is_anisotropic(sim10):
    """Not a function of |q| alone: large spread within thin |q| shells."""
    model = simulate.TruthModel.from_json(sim10 / "truth.json")
    with np.load(sim10 / "truth.npz") as z:
        I, h, k, l = z["I"], z["h"], z["k"], z["l"]
    H = np.stack(np.meshgrid(h, k, l, indexing="ij"), -1)
    finite = np.isfinite(I)
    d_star = model.d_star(H[finite])
    values = I[finite]
    bins = np.digitize(d_star, np.linspace(0.05, d_star.max(), 60))
    cv = []
    for b in np.unique(bins):
        v = values[bins == b]
        if v.size > 200:
            cv.append(v.std() / v.mean())
    assert np.median(cv) > 0.05
    # the smooth term alone is anisotropic too: same |q| along a* and c*
    q = 0.18
    along_a = np.array([[q * 79.1, 0.0, 0.0]])
    along_c = np.array([[0.0, 0.0, q * 37.9]])
    assert model.d_star(along_a)[0] == pytest.approx(model.d_star(along_c)[0])
    assert abs(model.shell(along_a)[0] - model.shell(along_c)[0]) > 0.05 * model.shell(along_a)[0]


# --------------------------------------------------------------------------- building blocks


def test_bragg_table_absences_and_laue_symmetry():
    p = simulate.DiffuseModelParameters(
        unit_cell=(79.1, 79.1, 37.9, 90, 90, 90), space_group="P 43 21 2", seed=1, d_min=2.0
    )
    table = simulate.bragg_table(p, amplitude=1000.0, b_factor=10.0)
    look = lambda *hkl: table.lookup(np.array([hkl], dtype=float))[0]  # noqa: E731
    # P43212: 00l present only for l = 4n, h00 only for h = 2n
    assert look(0, 0, 4) > 0 and look(0, 0, 8) > 0
    assert look(0, 0, 1) == look(0, 0, 2) == look(0, 0, 6) == 0
    assert look(3, 0, 0) == look(0, 5, 0) == 0 and look(4, 0, 0) > 0
    H = np.array([[3, 5, 7], [5, 3, 7], [-3, 5, 7], [3, -5, -7], [-5, -3, 7], [5, -3, -7]], dtype=float)
    values = table.lookup(H)
    assert values[0] > 0
    np.testing.assert_allclose(values, values[0], rtol=1e-12)


def test_rendered_spot_centroid_and_total():
    img = simulate.render_spots([(40, 50)], np.array([0]), np.array([10.3]), np.array([20.7]), np.array([1e4]), 1.0)[0]
    ys, xs = np.mgrid[0:40, 0:50]
    total = img.sum()
    # 7x7 box keeps erf(3.5/sqrt2)^2 ~ 0.99907 of a 1-pixel Gaussian (box spans ±3.5 px at most)
    assert 0.995 * 1e4 < total <= 1e4
    assert (img * (xs + 0.5)).sum() / total == pytest.approx(10.3, abs=0.02)
    assert (img * (ys + 0.5)).sum() / total == pytest.approx(20.7, abs=0.02)


def test_random_rotations_are_uniform_rotations():
    R = simulate.random_rotations(np.random.default_rng(0), 4000)
    np.testing.assert_allclose(R @ np.transpose(R, (0, 2, 1)), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # uniform on SO(3): E[R] = 0 and the rotated z axis has E[z_i^2] = 1/3
    assert np.abs(R.mean(axis=0)).max() < 0.05
    np.testing.assert_allclose((R[:, :, 2] ** 2).mean(axis=0), 1 / 3, atol=0.03)


def _assert_laue_symmetric(directory: pathlib.Path, space_group: str) -> int:
    with np.load(directory / "truth.npz") as z:
        I, h, k, l, ndiv = z["I"], z["h"], z["k"], z["l"], int(z["ndiv"][0])
    finite = np.isfinite(I)
    idx = np.stack(np.meshgrid(h, k, l, indexing="ij"), -1)[finite]
    centre = (np.array(I.shape) - 1) // 2
    rotations = simulate.laue_rotations(space_group)
    for R in rotations:
        ii = np.rint(idx @ R.T * ndiv).astype(int) + centre
        np.testing.assert_allclose(I[ii[:, 0], ii[:, 1], ii[:, 2]], I[finite], rtol=1e-6)
    return len(rotations)


@pytest.mark.parametrize(
    "cell, space_group, n_ops",
    [("93,93,130.4,90,90,120", "P6122", 24), ("60,50,70,90,105,90", "C2", 4)],
)
def test_truth_map_laue_symmetry_other_systems(tmp_path, cell, space_group, n_ops):
    """Hexagonal and monoclinic (C-centred) cells: I_true has the Laue symmetry.

    With truth.subsample=1 the map holds I_true at the voxel centres, which
    every operator maps onto voxel centres. (Voxel means are exactly symmetric
    only when the operators map cubes onto cubes, as for 4/mmm above; a
    hexagonal operator shears the cube, see docs/simulate.md.)
    """
    directory = run_simulate(
        tmp_path / "sym", "n_stills=1", f"unit_cell={cell}", f"space_group={space_group}",
        "detector_model.n_fast=300", "detector_model.n_slow=300", "truth.ndiv=2", "truth.subsample=1",
    )
    truth = load_truth(directory)
    assert _assert_laue_symmetric(directory, truth["space_group"]) == n_ops


@pytest.mark.parametrize("space_group, cell", [
    ("P 43 21 2", (79.1, 79.1, 37.9, 90, 90, 90)),
    ("P 61 2 2", (93, 93, 130.4, 90, 90, 120)),
    ("R 3 :H", (80, 80, 120, 90, 90, 120)),
    ("C 1 2 1", (60, 50, 70, 90, 105, 90)),
])
def test_laue_operators_on_miller_indices_preserve_d_star(space_group, cell):
    """h' = Q h must keep |B h| (the reciprocal metric) for every operator."""
    B = simulate.b_matrix(cell)
    H = np.random.default_rng(0).integers(-20, 21, size=(500, 3)).astype(float)
    d0 = np.linalg.norm(H @ B.T, axis=1)
    for Q in simulate.laue_rotations(space_group):
        np.testing.assert_allclose(np.linalg.norm((H @ Q.T) @ B.T, axis=1), d0, rtol=1e-12)


# --------------------------------------------------------------------------- rotation sweeps

SWEEP_SMALL = ["detector_model.n_fast=96", "detector_model.n_slow=80", "truth.map=False"]


def _import_sweep(directory: pathlib.Path):
    """The sweep's files through dxtbx's ExperimentListFactory, as dials.import reads them."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    truth = load_truth(directory)
    return truth, ExperimentListFactory.from_filenames([str(directory / name) for name in truth["images"]])


@pytest.mark.parametrize("first_image", [1, 0, 101])
def test_rotation_sweep_imports_as_one_sequence(tmp_path, first_image):
    from dxtbx.imageset import ImageSequence

    n = 4
    directory = run_simulate(
        tmp_path / "sweep", "kind=rotation", f"rotation.n_images={n}", f"rotation.first_image={first_image}",
        "rotation.phi_start=30", "rotation.oscillation=0.25", "exposure_time=0.1", *SWEEP_SMALL,
    )
    truth, experiments = _import_sweep(directory)
    assert truth["images"] == [f"image_{first_image + j:05d}.cbf" for j in range(n)]
    assert len(experiments) == 1
    expt = experiments[0]
    assert isinstance(expt.imageset, ImageSequence)
    assert expt.scan.get_image_range() == (first_image, first_image + n - 1)
    assert expt.scan.get_oscillation() == pytest.approx((30.0, 0.25))
    assert expt.goniometer.get_rotation_axis() == pytest.approx((1.0, 0.0, 0.0))
    assert expt.scan.get_exposure_times()[0] == pytest.approx(0.1)
    assert len(expt.imageset) == n
    # the truth names the same φ ranges as dxtbx's scan
    for j, frame in enumerate(truth["frames"]):
        a = expt.scan.get_array_range()[0] + j
        assert frame["image_number"] == first_image + j
        assert frame["phi_range_deg"] == pytest.approx(
            [expt.scan.get_angle_from_array_index(a), expt.scan.get_angle_from_array_index(a + 1)]
        )


def test_rotation_axis_needs_the_dials_import_override(tmp_path, monkeypatch):
    """A miniCBF carries no axis: dials.import geometry.goniometer.axes=… gives the simulated one."""
    from dials.command_line.dials_import import run as dials_import
    from dxtbx.model.experiment_list import ExperimentListFactory

    directory = run_simulate(
        tmp_path / "sweep", "kind=rotation", "rotation.n_images=3", "rotation.first_image=101",
        "rotation.axis=0,1,0", *SWEEP_SMALL,
    )
    truth = load_truth(directory)
    assert truth["sweep"]["axis_carried_by_image_format"] is False
    assert "geometry.goniometer.axes=0,1,0" in (directory / "diffuse.simulate.log").read_text()
    monkeypatch.chdir(tmp_path)
    dials_import([str(directory / name) for name in truth["images"]]
                 + ["geometry.goniometer.axes=0,1,0", "output.experiments=imported.expt"])
    (expt,) = ExperimentListFactory.from_json_file("imported.expt", check_format=False)
    assert expt.goniometer.get_rotation_axis() == pytest.approx((0.0, 1.0, 0.0))
    assert expt.scan.get_image_range() == (101, 103)


def test_rotation_frame_is_the_truth_integrated_over_its_oscillation(tmp_path):
    """counts / factors = mean over sub-steps of I_true((R(φ_k) A)⁻¹ q), with R from dxtbx's scan and goniometer.

    φ_k come from ``scan.get_angle_from_array_index`` and R from scitbx's
    axis-angle rotation of the imported goniometer axis, i.e. DIALS's
    convention, not the simulator's. The check is not vacuous: the opposite
    rotation sense, or I_true at the frame centre only, misses by far more.
    """
    from scitbx import matrix

    from diffuse_cli import corrections
    from diffuse_cli.geometry import detector_geometry

    directory = run_simulate(
        tmp_path / "sweep", "kind=rotation", "rotation.n_images=2", "rotation.first_image=101",
        "rotation.phi_start=10", "rotation.oscillation=2.0", "rotation.sub_steps=4", "noise=False", "bragg=False",
        "sensor.material=none", "model.intensity_scale=100", "detector_model.distance=60",
        "detector_model.n_fast=160", "detector_model.n_slow=150", "truth.map=False", "masking.beamstop=False",
    )
    truth, (expt,) = _import_sweep(directory)
    model = simulate.TruthModel.from_json(directory / "truth.json")
    beam, panel, scan, gonio = expt.beam, expt.detector[0], expt.scan, expt.goniometer
    (g,) = detector_geometry(expt.detector, beam)
    axis = matrix.col(gonio.get_rotation_axis())
    worst = {"right": 0.0, "reversed": 0.0, "centre_only": 0.0}
    for j, frame in enumerate(truth["frames"]):
        counts = expt.imageset.get_raw_data(j)[0].as_numpy_array().astype(float)
        use = (counts >= 1000) & (counts < panel.get_trusted_range()[1])
        T = corrections.air_transmission(g.lab, beam.get_wavelength(), **_air(truth)) ** (
            truth["air"]["mu_per_mm_xraylib"] / corrections.air_mu(beam.get_wavelength(), **_air(truth))
        )
        factor = frame["scale"] * truth["exposure_time_s"] * corrections.solid_angle(panel, g.lab) / 1e-6 * (
            corrections.polarization(g.s1, beam) * T
        )
        A = np.array(frame["A"])
        a0 = scan.get_array_range()[0] + j

        def frame_mean(sign, steps):
            total = 0.0
            for t in steps:
                phi = scan.get_angle_from_array_index(a0 + t)
                R = np.array(axis.axis_and_angle_as_r3_rotation_matrix(sign * phi, deg=True)).reshape(3, 3)
                total = total + model(g.q[use] @ np.linalg.inv(R @ A).T, g.d_star[use])
            return total / len(steps)

        steps = (np.arange(4) + 0.5) / 4
        observed = counts[use] / factor[use]
        worst["right"] = max(worst["right"], np.max(np.abs(observed / frame_mean(1, steps) - 1)))
        worst["reversed"] = max(worst["reversed"], np.max(np.abs(observed / frame_mean(-1, steps) - 1)))
        worst["centre_only"] = max(worst["centre_only"], np.max(np.abs(observed / frame_mean(1, [0.5]) - 1)))
    print("rotation frame vs truth:", worst)
    # rounding at >= 1000 counts is < 5e-4; the wrong models miss by ten times that or more
    assert worst["right"] < 1e-3
    assert worst["reversed"] > 5e-3 and worst["centre_only"] > 5e-3


def test_scan_varying_crystal_drifts_as_asked(tmp_path):
    directory = run_simulate(
        tmp_path / "sweep", "kind=rotation", "rotation.n_images=4", "rotation.oscillation=0.5",
        "rotation.drift_deg=0.8", *SWEEP_SMALL,
    )
    truth = load_truth(directory)
    A = np.array(truth["sweep"]["scan_point_A"])
    assert A.shape == (5, 3, 3)
    B = np.array(truth["sweep"]["B"])
    U = A @ np.linalg.inv(B)
    # total drift: rotation angle between the first and last scan point
    R = U[-1] @ U[0].T
    angle = np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1)))
    assert angle == pytest.approx(0.8, abs=1e-6)
    # about one fixed axis, in equal steps
    steps = [np.degrees(np.arccos(np.clip((np.trace(U[i + 1] @ U[i].T) - 1) / 2, -1, 1))) for i in range(4)]
    np.testing.assert_allclose(steps, 0.2, atol=1e-6)
    # frame A is the orientation at the frame centre, between its scan points
    mid = np.array(truth["frames"][1]["A"]) @ np.linalg.inv(B)
    half = np.degrees(np.arccos(np.clip((np.trace(mid @ U[1].T) - 1) / 2, -1, 1)))
    assert half == pytest.approx(0.1, abs=1e-6)


INDEX_SWEEP_SCRIPT = r"""
import json, subprocess, sys
import numpy as np
import diffuse_cli
from diffuse_cli.simulation import make_crystal
from dxtbx.model.experiment_list import ExperimentListFactory
from dials.algorithms.indexing.compare_orientation_matrices import difference_rotation_matrix_axis_angle
from dials.array_family import flex

directory = sys.argv[1]
truth = json.load(open(directory + "/truth.json"))
images = [directory + "/" + name for name in truth["images"]]
def run(*args):
    subprocess.run(list(args), check=True, capture_output=True)
run("dials.import", *images, "output.experiments=imported.expt")
run("dials.find_spots", "imported.expt", "nproc=1", "output.reflections=strong.refl")
run("dials.index", "imported.expt", "strong.refl",
    "indexing.known_symmetry.space_group=" + truth["space_group"].replace(" ", ""),
    "indexing.known_symmetry.unit_cell=" + ",".join(map(str, truth["unit_cell"])),
    # the simulated detector is exact; free, a short sweep can trade a detector rotation about
    # its normal for a crystal rotation about the beam (a near-degeneracy of narrow sweeps)
    "refinement.parameterisation.detector.fix=all")
expt = ExperimentListFactory.from_json_file("indexed.expt", check_format=False)[0]
refl = flex.reflection_table.from_file("indexed.refl")
reference = make_crystal(truth["unit_cell"], truth["space_group"], np.array(truth["sweep"]["U0"]))
_, _, angle, _ = difference_rotation_matrix_axis_angle(reference, expt.crystal)
print("RESULT " + json.dumps({"angle": abs(angle), "n_indexed": int(refl.get_flags(refl.flags.indexed).count(True)),
      "n_strong": len(flex.reflection_table.from_file("strong.refl")),
      "image_range": list(expt.scan.get_image_range())}))
"""


@pytest.mark.slow
def test_rotation_sweep_indexes_with_dials_rotation_indexing(tmp_path):
    """dials.import + find_spots + index (rotation, known symmetry) recover the orientation to < 0.1°."""
    directory = run_simulate(
        tmp_path / "sweep", "kind=rotation", "rotation.n_images=6", "rotation.first_image=101",
        "rotation.oscillation=1.0", "seed=3", "detector_model.n_fast=320", "detector_model.n_slow=320",
        "detector_model.distance=120", "truth.map=False",
    )
    work = tmp_path / "dials"
    work.mkdir()
    proc = subprocess.run([PYTHON, "-c", INDEX_SWEEP_SCRIPT, str(directory)], capture_output=True, text=True,
                          cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    print("sweep indexing:", result)
    assert result["image_range"] == [101, 106]
    assert result["n_indexed"] >= 0.9 * result["n_strong"] and result["n_indexed"] > 100
    assert result["angle"] < 0.1


# --------------------------------------------------------------------------- reruns


def test_rerun_with_fewer_stills_leaves_no_foreign_images(tmp_path):
    small = ["detector_model.n_fast=48", "detector_model.n_slow=40", "bragg=False"]
    directory = run_simulate(tmp_path / "sim", "n_stills=3", *small)
    assert (directory / "truth.npz").exists()
    run_simulate(directory, "n_stills=1", "truth.map=False", *small)
    assert sorted(p.name for p in directory.glob("*.cbf")) == ["image_00000.cbf"]
    assert not (directory / "truth.npz").exists()  # the old map described other images
    truth = load_truth(directory)
    assert truth["images"] == ["image_00000.cbf"]
    assert truth["removed_from_earlier_run"] == ["image_00001.cbf", "image_00002.cbf", "truth.npz"]
    assert "Removed 3 file(s) of an earlier run" in (directory / "diffuse.simulate.log").read_text()
    # a sweep into the same directory replaces the stills
    run_simulate(directory, "kind=rotation", "rotation.n_images=2", "rotation.first_image=101", "truth.map=False",
                 *small)
    assert sorted(p.name for p in directory.glob("*.cbf")) == ["image_00101.cbf", "image_00102.cbf"]


def test_rerun_refuses_a_directory_with_other_images(tmp_path):
    from libtbx.utils import Sorry

    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "my_crystal_001.cbf").write_text("not ours")
    with pytest.raises(Sorry, match="not written by diffuse.simulate.*my_crystal_001.cbf"):
        run_simulate(directory, "n_stills=1", "detector_model.n_fast=48", "detector_model.n_slow=40")
    assert (directory / "my_crystal_001.cbf").read_text() == "not ours"
    assert not list(directory.glob("image_*"))


# --------------------------------------------------------------------------- XFEL shots, CSPAD-like detector

CSPAD = ["detector=multi", "multi.layout=cspad", "multi.panel_size=96,48", "multi.gap_px=6",
         "multi.tilt_deg=0.3", "multi.rotation_deg=0.5", "detector_model.pixel_size=0.11",
         "detector_model.distance=60", "sensor.material=none"]


def test_xfel_shots_carry_their_own_wavelength_and_no_exposure_time(tmp_path):
    """dials.import reads each shot's header wavelength (truth.json) and exposure time 0."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    directory = run_simulate(tmp_path / "xfel", "kind=xfel", "n_stills=12", "seed=4", "bragg=False",
                             "truth.map=False", "xfel.wavelength_jitter=0.002", "detector_model.n_fast=64",
                             "detector_model.n_slow=64")
    truth = load_truth(directory)
    assert truth["kind"] == "xfel" and truth["exposure_time_s"] == 0.0
    wl = np.array([s["wavelength_A"] for s in truth["stills"]])
    # 12 draws of 0.2 % rms: the sample rms is within a factor 2 of it, and no two shots share λ
    assert 0.001 < np.std(wl) / 1.0 < 0.004 and len(set(wl.tolist())) == 12
    experiments = ExperimentListFactory.from_filenames([str(directory / n) for n in truth["images"]])
    assert len(experiments) == 12
    for e, w in zip(experiments, wl):
        assert e.beam.get_wavelength() == pytest.approx(w, rel=1e-6)
        assert e.scan.get_exposure_times()[0] == 0.0
        with pytest.raises(ValueError):  # the pipeline finds no exposure time: per-shot normalisation
            dials_compat.exposure_time(e.imageset, 0)
    flux = np.array([s["flux"] for s in truth["stills"]])
    assert np.all(flux > 0) and np.std(flux) > 0.05
    for s in truth["stills"]:
        assert s["scale"] / s["flux"] >= 0.5 - 1e-12 and s["scale"] / s["flux"] <= 2.0 + 1e-12


@pytest.mark.parametrize("detector", ["single", "multi"])
def test_xfel_pulse_flux_in_the_header(tmp_path, detector):
    """xfel.photons_per_pulse: dxtbx reads each shot's incident photons (photons_per_pulse × flux) as beam flux."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    directory = run_simulate(tmp_path / "flux", "kind=xfel", "n_stills=3", "seed=6", "bragg=False",
                             "truth.map=False", "xfel.photons_per_pulse=2e12", f"detector={detector}",
                             "multi.panel_size=32,24", "detector_model.n_fast=64", "detector_model.n_slow=64")
    truth = load_truth(directory)
    for name, shot in zip(truth["images"], truth["stills"]):
        beam = ExperimentListFactory.from_filenames([str(directory / name)])[0].beam
        assert beam.get_flux() == pytest.approx(2e12 * shot["flux"], rel=1e-5)
        assert beam.get_flux() == shot["incident_photons"]


def test_xfel_forward_physics_at_each_shots_wavelength(tmp_path):
    """Noise-free shots with 1 % rms jitter divided by the pipeline's factors at the header λ give I_true.

    The pipeline's geometry turns each pixel into q at the shot's own
    wavelength (read from its header): if the simulator drew a shot at another
    λ than it wrote, hkl would be off by the jitter (1 % of |q|) and the ratio
    would spread by far more than 1e-3.
    """
    directory = run_simulate(
        tmp_path / "fwd", "kind=xfel", "n_stills=3", "seed=12", "noise=False", "bragg=False", "truth.map=False",
        "xfel.wavelength_jitter=0.01", "model.intensity_scale=100", *CSPAD,
    )
    ratio = _observed_over_truth(directory, min_counts=1000)
    assert ratio.size > 50_000
    assert np.max(np.abs(ratio - 1.0)) < 1e-3
    assert abs(np.mean(ratio) - 1.0) < 2e-5


def test_xfel_spectrum_is_the_weighted_sum_over_its_wavelengths(tmp_path):
    """With a bandwidth, a shot's diffuse counts are Σ_k w_k F(λ_k) I_true(q(λ_k)), not I_true at the mean λ.

    The expectation is built with the pipeline's geometry and factors for a
    beam at each sample wavelength (independent code) and the truth model.
    """
    from dxtbx.model.experiment_list import ExperimentListFactory

    from diffuse_cli import corrections
    from diffuse_cli.geometry import detector_geometry
    from diffuse_cli.simulation.simulator import spectrum_samples

    lam, w = spectrum_samples(1.0, 0.01, 5)
    assert np.sum(w) == pytest.approx(1.0) and np.dot(w, lam) == pytest.approx(1.0, rel=1e-12)
    directory = run_simulate(tmp_path / "wide", "kind=xfel", "n_stills=1", "seed=8", "noise=False", "bragg=False",
                             "truth.map=False", "model.intensity_scale=100", "xfel.wavelength_jitter=0",
                             "xfel.bandwidth=0.01", "xfel.spectrum_samples=5", *CSPAD)
    truth = load_truth(directory)
    shot = truth["stills"][0]
    assert shot["spectrum"]["wavelength_A"] == pytest.approx(list(lam)) and shot["wavelength_A"] == 1.0
    model = simulate.TruthModel.from_json(directory / "truth.json")
    expt = ExperimentListFactory.from_filenames([str(directory / truth["images"][0])])[0]
    assert expt.beam.get_wavelength() == pytest.approx(1.0)
    A_inv_T = np.linalg.inv(np.array(shot["A"])).T

    def expected(wavelengths, weights):
        out = []
        for k, (l_k, w_k) in enumerate(zip(wavelengths, weights)):
            beam = copy.deepcopy(expt.beam)
            beam.set_wavelength(float(l_k))
            per_panel = []
            for panel, g in zip(expt.detector, detector_geometry(expt.detector, beam)):
                F = (corrections.solid_angle(panel, g.lab) / 1e-6 * corrections.polarization(g.s1, beam)
                     * corrections.air_transmission(g.lab, float(l_k), **_air(truth)))
                per_panel.append(w_k * shot["scale"] * F * model(g.q @ A_inv_T, g.d_star))
            out = per_panel if k == 0 else [a + b for a, b in zip(out, per_panel)]
        return np.concatenate([a.ravel() for a in out])

    data = expt.imageset.get_raw_data(0)
    counts = np.concatenate([d.as_numpy_array().ravel() for d in data]).astype(float)
    mixed = expected(lam, w)
    good = (counts >= 1000) & (counts < 1e6)
    assert good.sum() > 30_000
    ratio = counts[good] / mixed[good]
    # μ_air of the two tables differs by ~1 % (a ~4e-4 effect here), rounding < 5e-4
    assert np.max(np.abs(ratio - np.median(ratio))) < 2e-3 and abs(np.median(ratio) - 1) < 1e-3
    mono = expected([1.0], [1.0])
    assert np.max(np.abs(mono[good] / mixed[good] - 1)) > 0.02  # the bandwidth does matter


def test_cspad_layout_round_trips_through_the_full_cbf(tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    directory = run_simulate(tmp_path / "cspad", "n_stills=1", "bragg=False", "truth.map=False",
                             "multi.modules_per_quadrant=2", *CSPAD)
    truth = load_truth(directory)
    expt = ExperimentListFactory.from_filenames([str(directory / truth["images"][0])])[0]
    det = expt.detector
    assert len(det) == len(truth["detector_and_beam"]["panels"]) == 8
    for panel, p in zip(det, truth["detector_and_beam"]["panels"]):
        np.testing.assert_allclose(panel.get_origin(), p["origin_mm"], atol=1e-6)
        np.testing.assert_allclose(panel.get_fast_axis(), p["fast_axis"], atol=1e-6)
    fast = np.array([det[2 * q].get_fast_axis() for q in range(4)])
    # neighbouring quadrants at right angles (within the small module rotations), opposite ones antiparallel
    for q in range(4):
        assert abs(np.dot(fast[q], fast[(q + 1) % 4])) < 0.02
        assert np.dot(fast[q], fast[(q + 2) % 4]) < -0.99
    # every module tilted a little differently; the beam passes through the hole
    normals = np.array([np.cross(p.get_fast_axis(), p.get_slow_axis()) for p in det])
    assert 1e-4 < np.ptp(normals[:, :2], axis=0).max() < 0.02
    assert det.get_panel_intersection(expt.beam.get_s0()) == -1
    # no two panels overlap: the lab xy footprints of their pixel centres are disjoint
    from diffuse_cli.simulation import forward

    boxes = []
    for p in det:
        nf, ns = p.get_image_size()
        f, s = np.meshgrid(np.arange(nf) + 0.5, np.arange(ns) + 0.5)
        xy = forward.lab_at_pixels(p, f, s)[..., :2].reshape(-1, 2)
        boxes.append((xy.min(axis=0), xy.max(axis=0)))
    for i in range(8):
        for j in range(i + 1, 8):
            (lo_i, hi_i), (lo_j, hi_j) = boxes[i], boxes[j]
            assert np.any(hi_i < lo_j) or np.any(hi_j < lo_i), (i, j)


def test_bragg_table_follows_wilson_statistics():
    """⟨I/ε⟩ in shells ∝ Σf²(d*) exp(−B d*²/2), B = absolute_scale.wilson_b, Σf² from cctbx (not xraylib)."""
    from cctbx.eltbx import xray_scattering

    comp = {"C": 4904, "N": 1544, "O": 4480, "S": 80, "H": 13672}
    p = simulate.DiffuseModelParameters(
        unit_cell=(79.1, 79.1, 37.9, 90, 90, 90), space_group="P 43 21 2", seed=3, d_min=1.8,
        composition=",".join(f"{k}:{v}" for k, v in comp.items()), wilson_b=30.0,
    )
    table = simulate.bragg_table(p, amplitude=1000.0, b_factor=99.0)  # b_factor unused with a composition
    H = simulate.LatticeTable.box_indices(table.hkl_max).astype(float)
    I = table.values.ravel()
    d = np.linalg.norm(H @ simulate.b_matrix(p.unit_cell).T, axis=1)
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    ok = (I > 0) & (d > 0.25) & (d < 1 / 1.8)
    ms = miller.set(crystal.symmetry(unit_cell=p.unit_cell, space_group_symbol=p.space_group),
                    flex.miller_index([tuple(map(int, h)) for h in H[ok]]), anomalous_flag=True)
    eps = np.array(ms.epsilons().data(), dtype=float)
    sf2 = sum(n * np.array([xray_scattering.wk1995(el).fetch().at_d_star_sq(x) for x in d[ok] ** 2]) ** 2
              for el, n in comp.items())
    y = I[ok] / eps / sf2
    edges = np.linspace(0.25**2, (1 / 1.8) ** 2, 9)
    shell = np.digitize(d[ok] ** 2, edges) - 1
    x = np.array([np.mean(d[ok][shell == i] ** 2) for i in range(8)])
    m = np.array([np.mean(y[shell == i]) for i in range(8)])
    B = -2 * np.polyfit(x, np.log(m), 1)[0]
    assert B == pytest.approx(30.0, abs=1.5)  # exponential draws: a few % per shell
    # and the d* → 0 normalisation: amplitude is the mean at d* = 0 per unit ε
    sf2_0 = sum(n * xray_scattering.wk1995(el).fetch().at_d_star_sq(0.0) ** 2 for el, n in comp.items())
    assert np.mean(y[shell == 0]) * sf2_0 / np.exp(-15.0 * x[0]) == pytest.approx(1000.0, rel=0.1)
