"""The whole chain against the simulator's ground truth.

simulate -> stills_process -> bragg_mask -> extract -> correct -> merge, run
once per module on 50 noisy stills with per-still scales drawn from 0.5–2,
then checked against truth.npz / truth.json. A second, noise-free run checks
that extract + correct invert the forward model per pixel, and that the
predicted Bragg mask removes the simulated Bragg intensity.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from diffuse_cli import corrections, extraction
from diffuse_cli.command_line import bragg_mask, correct, extract, merge, simulate, stills_process
from diffuse_cli.merging import map_agreement
from diffuse_cli.simulate import TruthModel
from diffuse_cli.symmetry import reciprocal_metric

pytestmark = pytest.mark.slow

CELL = "79.1,79.1,37.9,90,90,90"
# lysozyme-like: 8 × C613 H959 N193 O185 S10 plus ~3000 waters per unit cell
COMPOSITION = "C:4904,N:1544,O:4480,S:80,H:13672"
WILSON_B = 30.0
KNOWN_SYMMETRY = [
    "indexing.known_symmetry.space_group=P43212",
    f"indexing.known_symmetry.unit_cell={CELL}",
]


def _chain(root: pathlib.Path, sim_args: list[str], merge_args: list[str] | None) -> pathlib.Path:
    simulate.run([*sim_args, f"output.directory={root / 'sim'}", "nproc=2",
                  f"output.log={root / 'simulate.log'}"])
    stills_process.run([str(root / "sim"), f"output.directory={root / 'processed'}", "nproc=2",
                        *KNOWN_SYMMETRY, f"output.log={root / 'sp.log'}"])
    expt = str(root / "processed" / "combined.expt")
    refl = str(root / "processed" / "combined.refl")
    bragg_mask.run([expt, refl, f"output.directory={root / 'masks'}", "nproc=2",
                    f"output.log={root / 'mask.log'}"])
    extract.run([expt, f"masks.summary={root / 'masks' / 'summary.json'}",
                 f"output.directory={root / 'extracted'}", "nproc=2",
                 f"output.log={root / 'extract.log'}"])
    correct.run([expt, str(root / "extracted"), f"output.directory={root / 'corrected'}",
                 "nproc=2", f"output.log={root / 'correct.log'}"])
    if merge_args is not None:
        merge.run([expt, str(root / "corrected"), f"output.directory={root / 'merged'}",
                   *merge_args, f"output.log={root / 'merge.log'}"])
    return root


@pytest.fixture(scope="module")
def noisy_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain50")
    return _chain(
        root,
        ["n_stills=50", "seed=11", "noise=True", "scale_min=0.5", "scale_max=2", "truth.ndiv=2",
         f"absolute_scale.composition={COMPOSITION}", f"absolute_scale.wilson_b={WILSON_B}"],
        # Krogh-Moe fit beyond the water ring (3.1 Å), Bragg peaks masked; no wilson_b:
        # merge estimates B from combined.refl beside combined.expt
        ["ndiv=2", "space_group=P43212", f"composition={COMPOSITION}", "absolute_scale.fit_d_max=2.5"],
    )


def _d_star_of_grid(m) -> np.ndarray:
    h, k, l = np.meshgrid(m["h"], m["k"], m["l"], indexing="ij")
    hkl = np.stack([h, k, l], axis=-1).reshape(-1, 3)
    return np.sqrt(np.einsum("ni,ij,nj->n", hkl, reciprocal_metric(m["unit_cell"]), hkl))


def test_at_least_49_of_50_stills_processed(noisy_chain):
    import csv

    with open(noisy_chain / "processed" / "stills_process_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 50
    assert sum(r["status"] == "indexed" for r in rows) >= 49


def _truth_electron_units(chain, d_star):
    """The simulated truth on the merged map's absolute scale: I_true / c − Σ I_inc."""
    from diffuse_cli.absolute_scale import parse_composition, theory

    truth = np.load(chain / "sim" / "truth.npz")
    c = json.loads((chain / "sim" / "truth.json").read_text())["truth_model"]["photons_per_electron_unit"]
    _, inc = theory(parse_composition(COMPOSITION), d_star)
    return truth["I"].ravel() / c - inc


def test_merged_map_correlates_with_truth(noisy_chain):
    truth = np.load(noisy_chain / "sim" / "truth.npz")
    merged = np.load(noisy_chain / "merged" / "merged.npz")
    assert merged["I"].shape == truth["I"].shape
    for name in ("h", "k", "l"):
        np.testing.assert_allclose(merged[name], truth[name])
    d_star = _d_star_of_grid(merged)
    a = map_agreement(_truth_electron_units(noisy_chain, d_star), merged["I"].ravel(),
                      merged["counts"].ravel(), d_star, min_counts=3)
    assert a["n_voxels"] > 100_000
    assert a["cc_total"] >= 0.98, a
    assert a["cc_anisotropic"] >= 0.98, a


def test_absolute_scale_matches_simulated(noisy_chain):
    """With the composition, merged.npz is in electron units per unit cell
    (incoherent subtracted): it matches I_true / c − Σ I_inc within 5 %, with
    the Wilson B estimated from the Bragg spots (within 10 %), not handed in."""
    merged = np.load(noisy_chain / "merged" / "merged.npz")
    d_star = _d_star_of_grid(merged)
    truth_eu = _truth_electron_units(noisy_chain, d_star)
    I, n = merged["I"].ravel(), merged["counts"].ravel()
    ok = (n >= 3) & np.isfinite(I) & np.isfinite(truth_eu)
    slope = float(np.sum(I[ok] * truth_eu[ok]) / np.sum(truth_eu[ok] ** 2))
    assert abs(slope - 1) < 0.05, slope
    # shell by shell too, outside the water ring and the low-angle shells
    sc = json.loads((noisy_chain / "merged" / "absolute_scale.json").read_text())
    print("absolute scale: merged / truth = %.4f; Wilson B estimated %.2f ± %.2f Å² (truth %.1f)"
          % (slope, sc["wilson_b"], sc["wilson"]["sigma_B"], WILSON_B))
    assert sc["wilson"]["source"].endswith("combined.refl") and sc["K"] > 0
    assert sc["wilson_b"] == pytest.approx(WILSON_B, rel=0.10)
    for lo in (0.2, 0.3, 0.4):
        s = ok & (d_star >= lo) & (d_star < lo + 0.1)
        assert s.sum() > 1000
        assert abs(np.mean(I[s]) / np.mean(truth_eu[s]) - 1) < 0.05, (lo, np.mean(I[s]), np.mean(truth_eu[s]))
    assert (noisy_chain / "merged" / "absolute_scale.png").stat().st_size > 10_000


def test_per_still_scales_recovered(noisy_chain):
    truth = json.loads((noisy_chain / "sim" / "truth.json").read_text())
    true_scale = {pathlib.Path(p).stem: s["scale"] for p, s in zip(truth["images"], truth["stills"])}
    fitted = json.loads((noisy_chain / "merged" / "scales.json").read_text())["stills"]
    pairs = np.array([
        (true_scale[f["file"].split(".")[0].rsplit("_", 1)[0]], f["scale"][0]) for f in fitted
    ])
    assert len(pairs) >= 49
    # merged scales multiply the model (I_obs = g · I_ref), up to one overall factor
    ratio = pairs[:, 1] / pairs[:, 0]
    ratio /= np.median(ratio)
    assert np.max(np.abs(ratio - 1)) < 0.02, ratio


@pytest.fixture(scope="module")
def noise_free_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain_noise_free")
    return _chain(root, ["n_stills=3", "seed=5", "noise=False", "truth.map=False",
                         "exposure_time=4"], None)


def test_extract_and_correct_invert_the_simulator_per_pixel(noise_free_chain):
    """Noise-free: corrected intensity / scale equals I_true at each pixel's hkl to 0.5%
    (median 0.1 %), up to the two codes' attenuation tables (sim_tables.table_ratio)."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from sim_tables import table_ratio

    root = noise_free_chain
    truth = json.loads((root / "sim" / "truth.json").read_text())
    model = TruthModel.from_json(root / "sim" / "truth.json")
    true_scale = {pathlib.Path(p).stem: s["scale"] for p, s in zip(truth["images"], truth["stills"])}
    true_A = {pathlib.Path(p).stem: np.array(s["A"]).reshape(3, 3)
              for p, s in zip(truth["images"], truth["stills"])}
    files = sorted(p for p in (root / "corrected").glob("image_*.npz"))
    assert len(files) == 3
    for f in files:
        stem = f.name.split(".")[0].rsplit("_", 1)[0]
        obs = corrections.load_observations(str(f))
        ex = extraction.read_extract(root / "extracted" / f.name)
        geometry = extraction.read_geometry(extraction.geometry_path(root / "extracted", ex.geometry_key))
        # the truth is a function of the TRUE hkl of each pixel (not DIALS's refined A)
        q = geometry.q(ex.mask)
        hkl_true = q @ np.linalg.inv(true_A[stem]).T
        expected = true_scale[stem] * model(hkl_true, np.linalg.norm(q, axis=1))
        # the simulator's xraylib μ (air, sensor) against the pipeline's cctbx tables: ~1e-3
        detector = ExperimentListFactory.from_filenames([str(root / "sim" / f"{stem}.cbf")])[0].detector
        panels = corrections.geometry_from_s1(detector, geometry.s1_unit / geometry.wavelength, geometry.s0)
        tables = np.concatenate([table_ratio(truth, panel, g.s1, g.lab, geometry.wavelength).ravel()
                                 for panel, g in zip(detector, panels)])
        expected = expected * tables[ex.mask]
        I = obs["I"]
        # expected counts = I / variance_per_intensity; >= 200 keeps integer rounding < 0.25 %
        bright = expected / obs["variance_per_intensity"] >= 200
        assert bright.sum() > 100_000
        rel = np.abs(I[bright] / expected[bright] - 1)
        # the pixels left in by the Bragg mask hold a little Bragg tail: judge the bulk
        assert np.median(rel) < 1e-3, stem
        assert np.percentile(rel, 99) < 5e-3, stem


def test_predicted_bragg_mask_removes_simulated_bragg_intensity(noise_free_chain, tmp_path):
    """>= 99% of the Bragg counts fall on masked pixels; < 10% of pixels masked."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    root = noise_free_chain
    # the same stills without Bragg spots: per-still orientation/scale depend only on seed and index
    simulate.run(["n_stills=3", "seed=5", "noise=False", "bragg=False", "truth.map=False",
                  "exposure_time=4",
                  f"output.directory={tmp_path / 'nobragg'}", f"output.log={tmp_path / 's.log'}"])
    summary = json.loads((root / "masks" / "summary.json").read_text())
    masks = {pathlib.Path(s["image_path"]).stem: s for s in summary["stills"]}
    (static_name,) = summary["static_masks"].values()
    static = _read_mask(root / "masks" / static_name)
    for image in sorted((root / "sim").glob("image_*.cbf")):
        with_bragg = ExperimentListFactory.from_filenames([str(image)])[0].imageset.get_raw_data(0)
        without = ExperimentListFactory.from_filenames(
            [str(tmp_path / "nobragg" / image.name)])[0].imageset.get_raw_data(0)
        bragg = np.concatenate([(a.as_numpy_array() - b.as_numpy_array()).ravel()
                                for a, b in zip(with_bragg, without)]).astype(float)
        bragg[~static] = 0  # gaps, beamstop, bad pixels: not diffuse data either way
        assert bragg.min() >= 0 and bragg.sum() > 0
        total = _read_mask(root / "masks" / masks[image.stem]["mask"])
        assert not (total & ~static).any()  # total = static & not Bragg (True = usable)
        removed = bragg[~total].sum() / bragg.sum()
        masked_for_bragg = (static & ~total).sum() / static.sum()
        assert removed >= 0.99, (image.name, removed)
        assert masked_for_bragg < 0.10, (image.name, masked_for_bragg)


def _read_mask(path) -> np.ndarray:
    import pickle

    with open(path, "rb") as fh:
        return np.concatenate([m.as_numpy_array().ravel() for m in pickle.load(fh)])
