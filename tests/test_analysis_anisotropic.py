"""diffuse.anisotropic: I_iso(|q|), I − I_iso with σ, punch-and-fill, against analytic truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from libtbx.utils import Sorry

from diffuse_cli.analysis import fill, isotropic
from diffuse_cli.grid import HKLGrid

CELL = (30.0, 40.0, 50.0, 90.0, 100.0, 90.0)   # monoclinic: the metric has a cross term


def test_s_is_one_over_d_of_cctbx():
    """|q| = 1/d (no 2π) against cctbx's own d-spacings, oblique cell."""
    from cctbx import uctbx

    h, k, l = (np.arange(-3, 4.0),) * 3
    s = isotropic.s_map(h, k, l, CELL)
    uc = uctbx.unit_cell(CELL)
    assert s[3, 3, 3] == 0.0
    for hkl in [(1, 0, 0), (0, 0, 1), (1, 0, 1), (-1, 0, 1), (2, -3, 1), (3, 3, -3)]:
        assert s[tuple(np.array(hkl) + 3)] == pytest.approx(1.0 / uc.d(hkl), rel=1e-12)


def _isotropic_map(ndiv=3, hkl_max=(5, 7, 9), seed=0):
    grid = HKLGrid(ndiv, hkl_max)
    h, k, l = grid.axes()
    s = isotropic.s_map(h, k, l, CELL)
    rng = np.random.default_rng(seed)
    truth = 80.0 * np.exp(-25.0 * s ** 2) + 4.0 + 30.0 * s     # smooth, purely isotropic
    sigma = (0.03 * truth + 0.3) * (0.5 + rng.random(truth.shape))   # errors vary voxel to voxel
    I = truth + sigma * rng.standard_normal(truth.shape)
    I[s > 0.25] = np.nan
    sigma[s > 0.25] = np.nan
    return grid, I, sigma, truth, s


def test_anisotropic_of_isotropic_map_is_zero_within_sigma():
    grid, I, sigma, truth, s = _isotropic_map()
    res = isotropic.anisotropic_map(I, sigma, *grid.axes(), CELL)
    z = (res["I_aniso"] / res["sigma_aniso"])[np.isfinite(I)].astype(np.float64)
    n = z.size
    assert n > 20000
    assert abs(z.mean()) < 4.0 / np.sqrt(n)                 # zero within σ
    assert abs(np.mean(z * z) - 1.0) < 4.0 * np.sqrt(2.0 / n)   # χ²/N = 1: σ_Δ propagated right
    assert np.all(np.isnan(res["I_aniso"][np.isnan(I)]))


def test_isotropic_shells_match_truth_within_sigma():
    grid, I, sigma, truth, s = _isotropic_map(seed=1)
    iso = isotropic.isotropic_component(I, sigma, *grid.axes(), CELL)
    ok = np.isfinite(iso["I_iso"]) & (iso["n_voxels"] > 5)
    f = 80.0 * np.exp(-25.0 * iso["s_mean"][ok] ** 2) + 4.0 + 30.0 * iso["s_mean"][ok]
    z = (iso["I_iso"][ok] - f) / iso["sigma_iso"][ok]
    assert ok.sum() > 20
    assert np.mean(z * z) < 2.0
    assert iso["I_iso_map"].shape == I.shape and iso["s_edges"].shape == (len(iso["I_iso"]) + 1,)


def test_anisotropic_part_of_a_modulated_map_is_recovered():
    """I = iso(s) + A cos(2π h/2): the modulation averages out of every shell, so ΔI ≈ the modulation."""
    grid, I, sigma, truth, s = _isotropic_map(ndiv=4, seed=2)
    h, k, l = grid.axes()
    mod = 5.0 * np.cos(np.pi * h)[:, None, None] * np.ones(I.shape)
    res = isotropic.anisotropic_map(truth + mod, np.full(I.shape, 0.1), h, k, l, CELL,
                                    shell_width=0.01)
    inner = s < 0.2
    err = res["I_aniso"][inner] - mod[inner]
    assert np.sqrt(np.mean(err ** 2)) < 0.1 * np.sqrt(np.mean(mod[inner] ** 2))


def test_shell_means_unbiased_when_sigma_grows_with_I():
    """Counts: σ² ∝ I. The plain (volume) shell mean is unbiased; the 1/σ²-weighted one is
    pulled low (by about σ²/I per voxel), so it is not the default."""
    grid, _, _, truth, s = _isotropic_map(seed=3)
    rng = np.random.default_rng(3)
    counts = 0.2 * truth          # ~1-20 counts per voxel: Poisson, σ² = I
    I = rng.poisson(counts).astype(np.float64) + 0.0
    I = np.where(I > 0, I, 0.5)   # σ from the observed counts, as a merge reports it
    sigma = np.sqrt(I)
    I[s > 0.25] = sigma[s > 0.25] = np.nan
    iso_v = isotropic.isotropic_component(I, sigma, *grid.axes(), CELL, shell_width=0.02)
    iso_w = isotropic.isotropic_component(I, sigma, *grid.axes(), CELL, shell_width=0.02,
                                          weights="inverse_variance")
    ok = (iso_v["n_voxels"] > 200)
    f = 0.2 * (80.0 * np.exp(-25.0 * iso_v["s_mean"][ok] ** 2) + 4.0 + 30.0 * iso_v["s_mean"][ok])
    z_v = (iso_v["I_iso"][ok] - f) / iso_v["sigma_iso"][ok]
    assert ok.sum() >= 5
    assert np.all(np.abs(z_v) < 4.0)                      # volume: unbiased within σ
    low = (iso_w["I_iso"][ok] - f) / f
    assert np.all(low < -0.05)                            # 1/σ² weights: biased low by > 5 %
    with pytest.raises(ValueError, match="weights"):
        isotropic.isotropic_component(I, sigma, *grid.axes(), CELL, weights="bogus")


@pytest.fixture(scope="module")
def smooth():
    grid = HKLGrid(4, (4, 5, 6))
    h, k, l = grid.axes()
    H, K, L = np.meshgrid(h, k, l, indexing="ij")
    truth = (np.cos(2 * np.pi * H / 7.3) * np.cos(2 * np.pi * K / 9.1 + 0.4)
             + np.exp(-((H - 1) ** 2 + (K + 2) ** 2 / 2 + L ** 2 / 3) / 8))
    return grid, truth


@pytest.mark.parametrize("radius", [0.0, 0.3, 0.4])
def test_punch_and_fill_restores_smooth_map_within_2_percent(smooth, radius):
    grid, truth = smooth
    out = fill.punch_and_fill(truth, *grid.axes(), CELL, radius=radius)
    p = out["punched"]
    assert p.sum() > 100
    # independent count of the punched voxels: distance to the nearest integer hkl
    h, k, l = np.meshgrid(*grid.axes(), indexing="ij")
    d = np.sqrt((h - np.round(h)) ** 2 + (k - np.round(k)) ** 2 + (l - np.round(l)) ** 2)
    assert np.array_equal(p, d <= radius + 1e-9)
    rms = np.sqrt(np.mean((out["filled"][p] - truth[p]) ** 2)) / np.sqrt(np.mean(truth[p] ** 2))
    assert rms < 0.02, rms
    assert np.array_equal(out["filled"][~p], truth[~p])       # measured voxels untouched


def test_fill_of_missing_block_and_unfillable_region(smooth):
    grid, truth = smooth
    v = truth.copy()
    v[10:14, 20:24, 30:34] = np.nan            # a gap inside the map: filled
    out = fill.laplace_fill(v, np.zeros(v.shape, dtype=bool), method="biharmonic")
    gap = np.isnan(v)
    assert out["filled_mask"][gap].all() and out["n_unfillable"] == 0
    err = np.sqrt(np.mean((out["filled"][gap] - truth[gap]) ** 2)) / np.sqrt(np.mean(truth[gap] ** 2))
    assert err < 0.05
    allnan = np.full((5, 5, 5), np.nan)
    res = fill.laplace_fill(allnan, np.zeros(allnan.shape, dtype=bool))
    assert res["n_unfillable"] == 125 and np.isnan(res["filled"]).all()


def test_fill_limit_by_completeness():
    """Shells 0.1 wide: a beamstop gap below 0.1 is ignored, the first shell under 90 % stops it."""
    s = np.repeat(np.arange(0.05, 0.6, 0.1), 100)       # 100 voxels per shell
    measured = np.ones(s.size, dtype=bool)
    measured[:50] = False                               # shell 0: 50 % (beamstop)
    measured[300:315] = False                           # shell 3: 85 %
    assert fill.complete_limit(measured, s, 0.1, 0.9) == pytest.approx(0.3)
    assert fill.complete_limit(measured, s, 0.1, 0.8) == pytest.approx(0.6)


# ---------------------------------------------------------------- the program


@pytest.fixture(scope="module")
def merged_npz(tmp_path_factory):
    from diffuse_cli.formats.merged import write_merged

    grid, I, sigma, truth, s = _isotropic_map(seed=3)
    path = tmp_path_factory.mktemp("aniso") / "merged.npz"
    write_merged(path, grid, I, sigma, np.isfinite(I).astype(int), CELL, "P 1 21 1",
                 units="electron units per unit cell (incoherent subtracted)", laue_group="P 1 2/m 1")
    return path


def test_program_on_isotropic_merged_map(merged_npz, tmp_path):
    from diffuse_cli.command_line.anisotropic import run
    from diffuse_cli.formats.analysis_maps import read_anisotropic

    out = tmp_path / "analysis"
    run([str(merged_npz), f"output.directory={out}", "anisotropic.fill.punch_radius=0"])
    a = read_anisotropic(out / "anisotropic.npz")
    assert a["I_aniso"].shape == a["I_iso_map"].shape == (len(a["h"]), len(a["k"]), len(a["l"]))
    assert a["filled"][a["punched"]].all() and a["punched"].sum() > 100
    stats = json.loads((out / "anisotropic.json").read_text())
    n = stats["n_measured"]
    assert abs(stats["z_mean"]) < 4 / np.sqrt(n) and abs(stats["z_rms"] ** 2 - 1) < 4 * np.sqrt(2 / n)
    for name in ("anisotropic.ccp4", "anisotropic_filled.ccp4", "anisotropic_hk0.png", "I_iso.png",
                 "isotropic.csv"):
        assert (out / name).stat().st_size > 0, name


def test_program_bad_inputs(tmp_path):
    from diffuse_cli.command_line.anisotropic import run

    text = tmp_path / "notes.npz"
    text.write_text("not a zip")
    with pytest.raises(Sorry, match="notes.npz"):
        run([str(text), f"output.directory={tmp_path / 'o'}"])
    other = tmp_path / "other.npz"
    np.savez(other, schema=np.array("diffuse.extract/2"), I=np.zeros(3))
    with pytest.raises(Sorry) as e:
        run([str(other), f"output.directory={tmp_path / 'o'}"])
    assert "other.npz" in str(e.value) and "diffuse.merge/1" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
