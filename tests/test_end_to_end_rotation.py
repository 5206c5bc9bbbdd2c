"""The whole chain on a simulated rotation sweep that starts at image 101.

simulate kind=rotation -> stills_process processing_mode=sequence ->
bragg_mask -> extract -> correct -> merge, run once per module on 24 noisy
0.5° frames (images 101-124) of a lysozyme-like crystal rotating about +y
(not the miniCBF default +x, so the axis is given as dials.import's
``geometry.goniometer.axes``), per-frame scales falling from 1.4 to 0.7, with
a composition for the absolute scale. Merge estimates the Wilson B itself.
Everything is checked against the simulator's truth (truth.npz, truth.json),
with q of the truth comparison computed by dxtbx from the image headers.

The detector is the simulator's Pilatus-like default (1024² of 172 µm at
200 mm): on a 512² panel at 100 mm (the same resolution) each pixel spans
twice the reciprocal distance, the Bragg masks cover twice as much of every
lattice voxel and 25 % of each frame.
"""

from __future__ import annotations

import csv
import glob
import json
import pathlib

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from diffuse_cli.command_line import bragg_mask, correct, extract, merge, simulate, stills_process
from diffuse_cli.merging import map_agreement
from diffuse_cli.simulate import TruthModel
from diffuse_cli.symmetry import reciprocal_metric

pytestmark = pytest.mark.slow

CELL = "79.1,79.1,37.9,90,90,90"
COMPOSITION = "C:4904,N:1544,O:4480,S:80,H:13672"  # as tests/test_end_to_end.py
FIRST_IMAGE, N_FRAMES = 101, 24
AXIS = "0,1,0"


SIMULATION = [
    "kind=rotation", f"rotation.first_image={FIRST_IMAGE}", f"rotation.n_images={N_FRAMES}",
    "rotation.oscillation=0.5", f"rotation.axis={AXIS}", "seed=21", "noise=True",
    "exposure_time=8", "scale_min=0.7", "scale_max=1.4", "truth.ndiv=2",
    f"absolute_scale.composition={COMPOSITION}",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep101")
    # 8 s per 0.5° frame: ~100-300 diffuse counts per pixel (the real nuclease
    # frames have ~500 per 1° frame)
    simulate.run([*SIMULATION, f"output.directory={root / 'sim'}", "nproc=2", f"output.log={root / 'simulate.log'}"])
    stills_process.run([
        str(root / "sim"), "processing_mode=sequence", f"geometry.goniometer.axes={AXIS}",
        "indexing.known_symmetry.space_group=P43212", f"indexing.known_symmetry.unit_cell={CELL}",
        f"output.directory={root / 'processed'}", "nproc=2", f"output.log={root / 'sp.log'}",
    ])
    expt = str(root / "processed" / "combined.expt")
    refl = str(root / "processed" / "combined.refl")
    bragg_mask.run([expt, refl, f"output.directory={root / 'masks'}", "nproc=2",
                    f"output.log={root / 'mask.log'}"])
    extract.run([expt, f"masks.summary={root / 'masks' / 'summary.json'}",
                 f"output.directory={root / 'extracted'}", "nproc=2",
                 f"output.log={root / 'extract.log'}"])
    correct.run([expt, str(root / "extracted"), f"output.directory={root / 'corrected'}",
                 "nproc=2", f"output.log={root / 'correct.log'}"])
    # no absolute_scale.wilson_b: merge estimates B from combined.refl
    merge.run([expt, str(root / "corrected"), f"output.directory={root / 'merged'}", "ndiv=2",
               "space_group=P43212", f"composition={COMPOSITION}", "absolute_scale.fit_d_max=2.5",
               "scaling.fit_max_obs=50000", f"output.log={root / 'merge.log'}"])
    return root


def _d_star_of_grid(m) -> np.ndarray:
    h, k, l = np.meshgrid(m["h"], m["k"], m["l"], indexing="ij")
    hkl = np.stack([h, k, l], axis=-1).reshape(-1, 3)
    return np.sqrt(np.einsum("ni,ij,nj->n", hkl, reciprocal_metric(m["unit_cell"]), hkl))


def _truth_electron_units(root, d_star):
    """The simulated truth on the merged map's absolute scale: I_true / c − Σ I_inc."""
    from diffuse_cli.absolute_scale import parse_composition, theory

    truth = np.load(root / "sim" / "truth.npz")
    c = json.loads((root / "sim" / "truth.json").read_text())["truth_model"]["photons_per_electron_unit"]
    _, inc = theory(parse_composition(COMPOSITION), d_star)
    return truth["I"].ravel() / c - inc


def test_frames_are_processed_as_one_sweep_from_image_101(sweep):
    from dxtbx.model.experiment_list import ExperimentList

    with open(sweep / "processed" / "stills_process_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_FRAMES
    assert all(r["status"] == "indexed" for r in rows), rows
    (expt,) = ExperimentList.from_file(str(sweep / "processed" / "combined.expt"), check_format=False)
    assert tuple(expt.scan.get_image_range()) == (FIRST_IMAGE, FIRST_IMAGE + N_FRAMES - 1)
    assert np.asarray(expt.goniometer.get_rotation_axis()) @ np.array([0.0, 1.0, 0.0]) > 0.9999


def test_extract_frames_are_image_numbers_minus_one(sweep):
    seen = {}
    from diffuse_cli.formats.extract import read_extract_header

    for f in glob.glob(str(sweep / "extracted" / "image_*.npz")):
        header = read_extract_header(f)
        number = int(pathlib.Path(header["image_path"]).stem.rsplit("_", 1)[1])
        seen[number] = header["frame"]
    assert sorted(seen) == list(range(FIRST_IMAGE, FIRST_IMAGE + N_FRAMES))
    assert all(frame == number - 1 for number, frame in seen.items()), seen


def test_bragg_mask_is_at_most_15_percent_of_each_frame(sweep):
    stills = json.loads((sweep / "masks" / "summary.json").read_text())["stills"]
    assert len(stills) == N_FRAMES
    fractions = [s["bragg_fraction"] for s in stills]
    assert max(fractions) <= 0.15, fractions


def _simulated_bragg_counts(image_numbers) -> dict:
    """The simulator's own noise-free Bragg counts of each frame (flat, pixel order), from its spot list.

    The spots of frame j, as ``Simulator.frame_image`` adds them: each spot's
    photons times its rocking fraction on the frame, rendered by
    ``render_spots``; no pipeline code.
    """
    from diffuse_cli.simulation import Simulator, bragg

    params = simulate.phil_scope.fetch(
        sources=simulate.phil_scope.command_line_argument_interpreter().process(args=SIMULATION)).extract()
    sim = Simulator.from_params(params)
    spots = sim.sweep_spots()
    out = {}
    for j in range(params.rotation.n_images):
        ft = sim.frame_truth(j)
        if ft.image_number not in image_numbers:
            continue
        frac = bragg.frame_fractions(spots["phi"], spots["sigma_phi"], ft.phi_start, ft.phi_end)
        on = frac > 1e-6
        counts = ft.scale * params.exposure_time * spots["photons"][on] * frac[on] * spots["factor"][on]
        images = bragg.render_spots([g.shape for g in sim.geometry], spots["panel"][on], spots["x"][on],
                                    spots["y"][on], counts, params.bragg_model.profile_sigma_px)
        out[ft.image_number] = np.concatenate([im.ravel() for im in images])
    return out


def test_bragg_photons_left_by_the_mask_are_a_small_part_of_the_diffuse(sweep):
    """Bragg leakage: the simulated Bragg counts on the pixels the masks keep, over the diffuse
    counts there (the recorded counts less those Bragg counts), summed over the sweep. A
    tolerance of 0.1 %: far below the ~2 % a merged voxel may be off at CC 0.98."""
    from diffuse_cli.formats.extract import read_extract

    files = sorted(glob.glob(str(sweep / "extracted" / "image_*.npz")))
    numbers = {int(pathlib.Path(read_extract(f).image_path).stem.rsplit("_", 1)[1]): f for f in files}
    bragg = _simulated_bragg_counts(set(numbers))
    assert sorted(bragg) == sorted(numbers)
    bragg_kept = diffuse_kept = bragg_all = 0.0
    for number, f in numbers.items():
        ex = read_extract(f)
        b = bragg[number]
        bragg_kept += b[ex.mask].sum()
        diffuse_kept += float(ex.counts.astype(np.float64).sum()) - b[ex.mask].sum()
        bragg_all += b.sum()
    assert bragg_all > 100 * diffuse_kept * 1e-3  # the spots carry far more than the tolerance
    assert bragg_kept / diffuse_kept < 1e-3, (bragg_kept / diffuse_kept, bragg_kept / bragg_all)


def _agreement_with_truth_npz(sweep) -> dict:
    truth = np.load(sweep / "sim" / "truth.npz")
    merged = np.load(sweep / "merged" / "merged.npz")
    assert merged["I"].shape == truth["I"].shape
    d_star = _d_star_of_grid(merged)
    a = map_agreement(_truth_electron_units(sweep, d_star), merged["I"].ravel(),
                      merged["counts"].ravel(), d_star, min_counts=3)
    assert a["n_voxels"] > 100_000
    return a


def test_merged_map_correlates_with_truth(sweep):
    assert _agreement_with_truth_npz(sweep)["cc_total"] >= 0.98


def test_merged_map_anisotropic_correlation_with_truth(sweep):
    """Issue 10 item 4. The integer-hkl voxels' halo cores sit under the Bragg peaks: the
    default rotation mask (peak_model=spots, each spot masked where it exceeds 10 % of the
    background, 3.5-4.2 % of each frame) leaves enough of them measured (the fitted
    one-shape peak model, 6.0-6.5 %, gave 0.979)."""
    assert _agreement_with_truth_npz(sweep)["cc_anisotropic"] >= 0.98


def test_merged_map_anisotropic_correlation_with_truth_off_the_lattice_voxels(sweep):
    """truth.npz (voxel means) on every measured voxel except those at integer hkl,
    whose cores sit under the Bragg peaks the mask removes."""
    truth = np.load(sweep / "sim" / "truth.npz")
    merged = np.load(sweep / "merged" / "merged.npz")
    assert merged["I"].shape == truth["I"].shape
    d_star = _d_star_of_grid(merged)
    h, k, l = np.meshgrid(merged["h"], merged["k"], merged["l"], indexing="ij")
    lattice = (np.isclose(h, np.rint(h)) & np.isclose(k, np.rint(k)) & np.isclose(l, np.rint(l))).ravel()
    n = np.where(lattice, 0, merged["counts"].ravel())
    a = map_agreement(_truth_electron_units(sweep, d_star), merged["I"].ravel(), n, d_star, min_counts=3)
    assert a["n_voxels"] > 100_000
    assert a["cc_total"] >= 0.98, a
    assert a["cc_anisotropic"] >= 0.98, a  # measured 0.985


def _truth_where_measured(root):
    """Voxel means of I_true over the pixels the chain kept, at their TRUE hkl.

    q per pixel from dxtbx and the image header (the simulated detector and
    beam, not the refined ones), hkl = (R(axis, φ_centre) A)⁻¹ q with A and the
    axis from truth.json; folded onto h ≥ k ≥ 0, l ≥ 0 (Laue group 4/mmm).
    Returns (sum, count) on the merged grid.
    """
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from diffuse_cli.formats.extract import read_extract

    tj = json.loads((root / "sim" / "truth.json").read_text())
    model = TruthModel.from_json(root / "sim" / "truth.json")
    merged = np.load(root / "merged" / "merged.npz")
    shape = merged["I"].shape
    origin = -np.array([merged["h"][0], merged["k"][0], merged["l"][0]])
    axis = np.asarray(tj["sweep"]["rotation_axis"], dtype=np.float64)
    axis /= np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    frames = {f["image_number"]: f for f in tj["frames"]}
    q_all = None
    total, count = np.zeros(np.prod(shape)), np.zeros(np.prod(shape))
    for f in sorted(glob.glob(str(root / "extracted" / "image_*.npz"))):
        ex = read_extract(f)
        number = int(pathlib.Path(ex.image_path).stem.rsplit("_", 1)[1])
        if q_all is None:
            header = ExperimentListFactory.from_filenames([str(ex.image_path)])[0]
            (panel,) = header.detector
            nf, ns = panel.get_image_size()
            slow, fast = np.mgrid[0:ns, 0:nf]
            mm = panel.pixel_to_millimeter(flex.vec2_double(
                flex.double(fast.ravel() + 0.5), flex.double(slow.ravel() + 0.5)))
            lab = panel.get_lab_coord(mm).as_numpy_array()
            s1 = lab / (np.linalg.norm(lab, axis=1, keepdims=True) * header.beam.get_wavelength())
            q_all = s1 - np.asarray(header.beam.get_s0())
        q = q_all[ex.mask]
        fr = frames[number]
        phi = np.radians(np.mean(fr["phi_range_deg"]))
        R = np.eye(3) + np.sin(phi) * K + (1 - np.cos(phi)) * (K @ K)
        hkl = q @ np.linalg.inv(R @ np.asarray(fr["A"])).T
        value = model(hkl, np.linalg.norm(q, axis=1))
        a = np.abs(hkl)
        canon = np.stack([np.maximum(a[:, 0], a[:, 1]), np.minimum(a[:, 0], a[:, 1]), a[:, 2]], axis=1)
        idx = np.rint(canon * merged["ndiv"]).astype(np.int64) + (origin * merged["ndiv"]).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        flat = np.ravel_multi_index(idx[inside].T, shape)
        total += np.bincount(flat, value[inside], total.size)
        count += np.bincount(flat, minlength=total.size)
    return total, count


def test_merged_map_equals_the_truth_where_it_was_measured(sweep):
    """The merged map against I_true averaged over the very pixels that went into
    it (Bragg-masked cores of the lattice voxels excluded), which separates the
    pipeline from what the Bragg mask leaves unmeasured."""
    merged = np.load(sweep / "merged" / "merged.npz")
    d_star = _d_star_of_grid(merged)
    total, count = _truth_where_measured(sweep)
    h, k, l = np.meshgrid(merged["h"], merged["k"], merged["l"], indexing="ij")
    canonical = ((h >= k) & (k >= 0) & (l >= 0)).ravel() & (count > 0)
    from diffuse_cli.absolute_scale import parse_composition, theory

    c = json.loads((sweep / "sim" / "truth.json").read_text())["truth_model"]["photons_per_electron_unit"]
    _, inc = theory(parse_composition(COMPOSITION), d_star)
    sampled = np.where(count > 0, total / np.maximum(count, 1), np.nan) / c - inc
    n = np.where(canonical, merged["counts"].ravel(), 0)
    a = map_agreement(sampled, merged["I"].ravel(), n, d_star, min_counts=3)
    assert a["n_voxels"] > 20_000
    assert a["cc_total"] >= 0.98, a
    assert a["cc_anisotropic"] >= 0.98, a
    # no extra bias at the integer-hkl voxels, whose kept pixels ring the Bragg
    # mask: the merge weighs them as any other (the mask's 2.6 % is not here)
    lattice = (np.isclose(h, np.rint(h)) & np.isclose(k, np.rint(k)) & np.isclose(l, np.rint(l))).ravel()
    ok = (n >= 3) & np.isfinite(sampled) & np.isfinite(merged["I"].ravel())
    ratio = merged["I"].ravel() / sampled
    assert (ok & lattice).sum() > 1000
    assert abs(np.median(ratio[ok & lattice]) / np.median(ratio[ok & ~lattice]) - 1) < 0.01


def test_per_frame_scales_recovered(sweep):
    truth = json.loads((sweep / "sim" / "truth.json").read_text())
    true_scale = {f["image_number"]: f["scale"] for f in truth["frames"]}
    fitted = json.loads((sweep / "merged" / "scales.json").read_text())["stills"]
    pairs = np.array([(true_scale[int(f["file"].split("_")[1])], f["scale"][0]) for f in fitted])
    assert len(pairs) == N_FRAMES
    assert pairs[:, 0].max() / pairs[:, 0].min() > 1.8  # 1.4 ... 0.7 along the sweep
    # merged scales multiply the model (I_obs = g · I_ref), up to one overall factor
    ratio = pairs[:, 1] / pairs[:, 0]
    ratio /= np.median(ratio)
    assert np.max(np.abs(ratio - 1)) < 0.02, ratio


def test_absolute_scale_matches_simulated_with_estimated_wilson_b(sweep):
    merged = np.load(sweep / "merged" / "merged.npz")
    d_star = _d_star_of_grid(merged)
    truth_eu = _truth_electron_units(sweep, d_star)
    I, n = merged["I"].ravel(), merged["counts"].ravel()
    ok = (n >= 3) & np.isfinite(I) & np.isfinite(truth_eu)
    slope = float(np.sum(I[ok] * truth_eu[ok]) / np.sum(truth_eu[ok] ** 2))
    sc = json.loads((sweep / "merged" / "absolute_scale.json").read_text())
    # B came from the integrated Bragg intensities, not from a parameter
    assert sc["wilson"]["source"].endswith("combined.refl") and sc["wilson"]["n_reflections"] > 1000
    assert abs(slope - 1) < 0.05, (slope, sc["wilson"]["B"])
    for lo in (0.2, 0.3, 0.4):
        s = ok & (d_star >= lo) & (d_star < lo + 0.1)
        assert s.sum() > 1000
        assert abs(np.mean(I[s]) / np.mean(truth_eu[s]) - 1) < 0.05, (lo, np.mean(I[s]), np.mean(truth_eu[s]))
