"""The diffuse.merge program: help, config, errors, default phil, and an end-to-end run."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from diffuse_cli.command_line import merge as merge_cli
from diffuse_cli.grid import HKLGrid
from diffuse_cli.symmetry import LaueSymmetry
from test_merge_common import make_stills, symmetric_truth

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = pathlib.Path(sys.executable).parent / "diffuse.merge"


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        merge_cli.run(["-h"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "Examples" in out and "diffuse.merge combined.expt corrected/" in out


def test_show_config(capsys):
    with pytest.raises(SystemExit):
        merge_cli.run(["-c"])
    out = capsys.readouterr().out
    assert "ndiv" in out and "composition" in out and "mp {" in out


def test_missing_file_one_line_sorry(tmp_path):
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "diffuse_cli.command_line.merge"]
    p = subprocess.run(cmd + ["missing.expt", "nothere/"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0
    assert p.stderr.strip() == "Sorry: File not found: missing.expt"


def test_default_phil_file_parses():
    text = (REPO / "phil" / "merge.phil").read_text()
    import libtbx.phil

    user = libtbx.phil.parse(text)
    params = merge_cli.phil_scope.fetch(user).extract()
    assert tuple(params.grid.ndiv) == (3,)
    assert params.mp.method == "serial"
    # every definition in the file is one the program knows (nothing left unused)
    _, unused = merge_cli.phil_scope.fetch(user, track_unused_definitions=True)
    assert not unused


def _write_inputs(d: pathlib.Path, flipped=(3, 8)):
    from dxtbx.model import Crystal, Experiment, ExperimentList

    uc = (20.0, 20.0, 30.0, 90, 90, 90)
    grid = HKLGrid.for_resolution(2, uc, 2.2)
    truth = symmetric_truth(grid, LaueSymmetry("P4"), uc, seed=1)
    k = np.random.default_rng(5).uniform(0.5, 2.0, 16)
    flip = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])
    stills = make_stills(truth, grid, uc, 16, seed=3, scales=k, flip={i: flip for i in flipped},
                         photons=500)
    (d / "corrected").mkdir()
    el = ExperimentList()
    for i, s in enumerate(stills):
        np.savez(d / "corrected" / f"still_{i:04d}.npz", schema=np.array("diffuse.observations/1"),
                 hkl=s["hkl"], I=s["I"], sigma=s["sigma"])
        R = np.linalg.inv(s["A"])
        el.append(Experiment(crystal=Crystal(R[0], R[1], R[2], space_group_symbol="P4")))
    el.as_file(str(d / "combined.expt"))
    return grid, truth


def test_end_to_end_synthetic(tmp_path, monkeypatch):
    import iotbx.mrcfile

    monkeypatch.chdir(tmp_path)
    grid, truth = _write_inputs(tmp_path)
    merge_cli.run(["combined.expt", "corrected", "ndiv=2", "d_min=2.2", "space_group=P4",
                   "composition=C:100,N:30,O:30,H:150", "output.directory=out"])
    out = tmp_path / "out"
    for name in ("merged.npz", "merged.ccp4", "slice_hk0.png", "slice_h0l.png", "slice_0kl.png",
                 "I_vs_q.png", "statistics.json", "scales.json", "absolute_scale.png",
                 "absolute_scale.json"):
        assert (out / name).stat().st_size > 0, name
    assert (tmp_path / "diffuse.merge.log").exists()
    z = np.load(out / "merged.npz")
    assert str(z["schema"]) == "diffuse.merge/1"
    assert z["I"].shape == grid.shape == z["counts"].shape == z["sigma"].shape
    np.testing.assert_allclose(z["h"], grid.axes()[0])
    assert list(z["ndiv"]) == [2, 2, 2]
    assert str(z["space_group"]) == "P4"
    assert "electron" in str(z["units"])
    ok = np.isfinite(z["I"]) & (z["counts"] > 0)
    # absolute scale is linear: the map still correlates with the truth
    assert np.corrcoef(z["I"][ok], truth[ok])[0, 1] > 0.98
    scales = json.loads((out / "scales.json").read_text())
    reidx = sorted(r["file"] for r in scales["stills"] if r["reindexed_by"])
    assert reidx == ["still_0003.npz", "still_0008.npz"]
    assert scales["converged"]
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["overall"]["cc_half"] > 0.95
    m = iotbx.mrcfile.map_reader(file_name=str(out / "merged.ccp4"))
    data = m.map_data().as_numpy_array()
    assert data.shape == grid.shape
    assert tuple(m.map_data().origin()) == tuple(-x * 2 for x in grid.hkl_max)
    np.testing.assert_allclose(data, np.nan_to_num(z["I"], nan=0.0), rtol=1e-6, atol=1e-3)


def test_reference_model_and_spread_warnings(caplog, monkeypatch):
    import logging

    # configure_logging (run by other tests in this process) stops propagation
    monkeypatch.setattr(logging.getLogger("diffuse"), "propagate", True)

    from dxtbx.model import Crystal, Experiment, ExperimentList
    from scipy.spatial.transform import Rotation

    from diffuse_cli.symmetry import b_matrix

    rng = np.random.default_rng(0)
    el = ExperimentList()
    cells = []
    U0 = Rotation.from_euler("xyz", [10, 20, 30], degrees=True)
    for i in range(12):
        a = 50 + rng.normal(0, 0.3)
        c = 70 + rng.normal(0, 0.3)
        cells.append((a, c))
        U = (Rotation.from_rotvec(rng.normal(0, 0.01, 3)) * U0).as_matrix()
        R = np.linalg.inv(U @ b_matrix((a, a, c, 90, 90, 90)))
        el.append(Experiment(crystal=Crystal(R[0], R[1], R[2], space_group_symbol="P4")))
    ref = merge_cli.reference_model(el, LaueSymmetry("P4"))
    cells = np.array(cells)
    assert ref["unit_cell"][0] == pytest.approx(cells[:, 0].mean(), abs=1e-6)
    assert ref["unit_cell"][2] == pytest.approx(cells[:, 1].mean(), abs=1e-6)
    assert ref["unit_cell"][0] == ref["unit_cell"][1]  # tetragonal metric imposed
    angle = np.degrees((Rotation.from_matrix(ref["U_mean"]) * U0.inv()).magnitude())
    assert angle < 0.5
    assert 0.2 < ref["orientation_rms_deg"] < 1.5
    grid = HKLGrid.for_resolution(3, ref["unit_cell"], 2.0)
    with caplog.at_level(logging.INFO, logger="diffuse"):
        merge_cli._warn_spreads(ref, grid, 2.0, 0.5)  # 0.3 Å / 2 Å × 3 = 0.45 voxel: orientation warns
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not any("cells differ" in w for w in warnings)
    assert any("Orientation spread" in w for w in warnings)
    caplog.clear()
    ref["cell_rms"] = np.array([1.0, 1.0, 1.0, 0, 0, 0])
    with caplog.at_level(logging.INFO, logger="diffuse"):
        merge_cli._warn_spreads(ref, grid, 2.0, 0.5)
    assert any("cells differ" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_merges_diffuse_correct_output(tmp_path, monkeypatch):
    """Upstream integration: diffuse.correct files (forward model of test_correct) → merge in P1."""
    tc = pytest.importorskip("test_correct")
    from diffuse_cli.command_line import correct

    monkeypatch.chdir(tmp_path)
    el = tc.make_experiments(True, 4)
    el.as_file(str(tmp_path / "combined.expt"))
    _, truth = tc.write_extracted(tmp_path, el, exposure=0.5)
    correct.run(["combined.expt", "extracted", "output.directory=corrected", "output.log=correct.log"])
    merge_cli.run(["combined.expt", "corrected", "ndiv=4", "space_group=P1", "scaling.enable=False",
                   "output.directory=merged", "output.log=merge.log"])
    z = np.load(tmp_path / "merged" / "merged.npz")
    assert int(z["n_stills"]) == 4
    grid = HKLGrid(z["ndiv"], [(len(a) - 1) // (2 * 4) for a in (z["h"], z["k"], z["l"])])
    # independent per-voxel range of the true intensities (P1 merges h with −h: Laue −1)
    from diffuse_cli.merging import voxel_flat

    hkl = np.concatenate([t["hkl"] for t in truth])
    I = np.concatenate([t["I"] for t in truth])
    flat, inside = voxel_flat(grid, np.concatenate([hkl, -hkl]))
    I2 = np.concatenate([I, I])[inside]
    flat = flat[inside]
    lo = np.full(grid.n_voxels, np.inf)
    hi = np.full(grid.n_voxels, -np.inf)
    np.minimum.at(lo, flat, I2)
    np.maximum.at(hi, flat, I2)
    merged = z["I"].ravel()
    ok = np.isfinite(merged)
    assert ok.sum() > 1000
    # every merged voxel is a weighted mean of the true values that fell in it
    assert np.all(merged[ok] >= lo[ok] * (1 - 1e-4) - 1e-3)
    assert np.all(merged[ok] <= hi[ok] * (1 + 1e-4) + 1e-3)
    # the same voxels are measured, except a few beyond d_min (detector corner) at the rim
    only_truth = np.isfinite(lo) & ~ok
    assert not np.any(ok & ~np.isfinite(lo))
    assert only_truth.sum() <= 0.02 * ok.sum()
    from diffuse_cli.merging import voxel_d_star
    ds = voxel_d_star(grid, np.flatnonzero(only_truth), z["unit_cell"])
    assert np.all(ds > 0.98 / float(z["d_min"])), (only_truth.sum(), ds.min() * float(z["d_min"]))


def test_plots_false_same_maps_without_pictures(tmp_path, monkeypatch):
    """output.plots=False: the same merged.npz, CCP4 map and statistics, and no picture."""
    monkeypatch.chdir(tmp_path)
    _write_inputs(tmp_path)
    args = ["combined.expt", "corrected", "ndiv=2", "d_min=2.2", "space_group=P4"]
    merge_cli.run(args + ["output.directory=with"])
    merge_cli.run(args + ["output.directory=without", "output.plots=False"])
    with_png = sorted(p.name for p in (tmp_path / "with").glob("*.png"))
    assert {"slice_hk0.png", "slice_h0l.png", "slice_0kl.png", "I_vs_q.png", "statistics.png"} <= set(with_png)
    assert not list((tmp_path / "without").glob("*.png"))
    a, b = np.load(tmp_path / "with" / "merged.npz"), np.load(tmp_path / "without" / "merged.npz")
    for name in ("I", "sigma", "counts", "scales", "n_observations"):
        np.testing.assert_array_equal(a[name], b[name])
    assert (tmp_path / "with" / "merged.ccp4").read_bytes() == (tmp_path / "without" / "merged.ccp4").read_bytes()
    for name in ("statistics.json", "scales.json"):
        assert json.loads((tmp_path / "with" / name).read_text()) == json.loads((tmp_path / "without" / name).read_text())
    # the resume rule: plots=False again is up to date; plots=True then makes the pictures
    mtime = (tmp_path / "without" / "merged.npz").stat().st_mtime_ns
    merge_cli.run(args + ["output.directory=without", "output.plots=False"])
    assert (tmp_path / "without" / "merged.npz").stat().st_mtime_ns == mtime
    merge_cli.run(args + ["output.directory=without"])
    assert sorted(p.name for p in (tmp_path / "without").glob("*.png")) == with_png
