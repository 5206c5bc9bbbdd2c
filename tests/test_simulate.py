"""diffuse.simulate: images DIALS reads and indexes, exact forward physics, truth map.

Truth comes from the simulator's own analytic model (TruthModel, rebuilt from
truth.json), from DIALS (dials.import, stills indexing, orientation
comparison) and from dxtbx reading the CBFs back.
"""

from __future__ import annotations

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
from diffuse_cli.simulate import make_crystal

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

    Reads the CBFs with dxtbx, computes geometry and the documented forward
    factors from the models dxtbx returns, and divides them out.
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
        data = expt.imageset.get_raw_data(0)
        A_inv_T = np.linalg.inv(np.array(still["A"])).T
        for panel_id, (panel, g) in enumerate(zip(detector, detector_geometry(detector, beam))):
            counts = data[panel_id].as_numpy_array().astype(np.float64)
            lo, hi = panel.get_trusted_range()
            use = (counts > lo) & (counts < hi) & (counts >= min_counts)
            material = truth["sensor"]["material"]
            eta = corrections.sensor_efficiency(
                panel, g.s1, beam.get_wavelength(),
                mu=simulate.sensor_mu(material, beam.get_wavelength()),
                thickness_mm=truth["sensor"]["thickness_mm"],
            )
            factor = (
                still["scale"] * truth["exposure_time_s"]
                * corrections.solid_angle(panel, g.lab) / 1e-6
                * corrections.polarization(g.s1, beam)
                * eta
                * corrections.air_transmission(g.lab, beam.get_wavelength(), **_air(truth))
            )
            hkl = g.q @ A_inv_T
            expected = model(hkl[use], g.d_star[use])
            ratios.append(counts[use] / factor[use] / expected)
    return np.concatenate(ratios)


def _air(truth):
    return {"pressure_kpa": truth["air"]["pressure_kpa"], "temperature_k": truth["air"]["temperature_k"]}


@pytest.mark.parametrize("detector", ["single", "multi"])
def test_forward_physics_inverts_to_truth(tmp_path, detector):
    """counts / (scale t Ω/µsr P η T) equals I_true(hkl, d*) to < 0.1 % per pixel."""
    directory = run_simulate(
        tmp_path / "fwd", "n_stills=2", "seed=11", "noise=False", "bragg=False", "truth.map=False",
        "model.intensity_scale=100", f"detector={detector}",
    )
    ratio = _observed_over_truth(directory, min_counts=1000)
    assert ratio.size > 1.5e6  # most of 2 × ~1M pixels take part
    assert np.max(np.abs(ratio - 1.0)) < 1e-3
    # and the rounding is the only error: mean bias far below it
    assert abs(np.mean(ratio) - 1.0) < 1e-5


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
    assert truth["sensor"] == {"material": "Si", "thickness_mm": 0.45, "carried_by_image_format": False}


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


def test_truth_map_is_voxel_mean_of_the_model(sim10):
    """truth.npz values = mean of TruthModel over the documented 3×3×3 sub-grid."""
    model = simulate.TruthModel.from_json(sim10 / "truth.json")
    with np.load(sim10 / "truth.npz") as z:
        I, h, k, l, ndiv = z["I"], z["h"], z["k"], z["l"], z["ndiv"]
    rng = np.random.default_rng(0)
    finite = np.argwhere(np.isfinite(I))
    pick = finite[rng.choice(len(finite), 200, replace=False)]
    centres = np.stack([h[pick[:, 0]], k[pick[:, 1]], l[pick[:, 2]]], -1)
    frac = (np.array([0.5, 1.5, 2.5]) / 3 - 0.5) / ndiv[0]
    offsets = np.stack(np.meshgrid(frac, frac, frac, indexing="ij"), -1).reshape(-1, 3)
    mean = np.mean([model(centres + o) for o in offsets], axis=0)
    np.testing.assert_allclose(I[tuple(pick.T)], mean, rtol=1e-12)


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
