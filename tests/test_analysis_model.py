"""diffuse.model recovers known motion parameters (issue 14, items 3–4).

Truth: diffuse_cli.simulation.llm_truth (no pipeline code): a random P1
model written as PDB, LLM diffuse by direct reciprocal-space summation with
the Lorentzian-squared kernel and xraylib form factors, RBT from the
molecular transform summed atom by atom; plus an isotropic ring and noise,
voxels at integer hkl unmeasured (as behind a Bragg mask) and beyond d_min
unmeasured. The pipeline convolves by FFT with the real-space kernel
exp(−n r/γ) and takes F from cctbx. Written through write_merged.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from libtbx.utils import Sorry

from diffuse_cli.simulation import llm_truth

CELL = (12.0, 14.0, 16.0, 90.0, 96.0, 90.0)
D_MIN = 2.5
NDIV = 3
SIGMA_LLM, GAMMA_LLM = 0.45, 5.0
SIGMA_RBT = 0.6


def _write_map(path, intensity, cell, axes, rng, noise=0.03):
    """Truth + isotropic ring + Gaussian noise; NaN beyond D_MIN and at integer hkl."""
    from diffuse_cli.formats.merged import write_merged
    from diffuse_cli.grid import HKLGrid

    s = llm_truth.s_of_grid(cell, axes)
    ring = 0.5 * float(np.nanmean(intensity)) * np.exp(-((s - 0.3) ** 2) / 0.004)
    sigma = np.full(intensity.shape, noise * float(np.nanmean(intensity)))
    I = intensity + ring + rng.normal(size=intensity.shape) * sigma
    on = [np.abs(a - np.rint(a)) < 1e-9 for a in axes]
    bragg = on[0][:, None, None] & on[1][None, :, None] & on[2][None, None, :]
    I[(s > 1.0 / D_MIN) | bragg] = np.nan
    sigma[np.isnan(I)] = np.nan
    grid = HKLGrid(NDIV, [int(round(a[-1])) for a in axes])
    assert grid.shape == I.shape
    write_merged(path, grid, I, sigma, np.isfinite(I).astype(np.int64), cell, "P1", units="test")


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("model_truth")
    atoms = llm_truth.random_atoms(rng, 30)
    llm_truth.write_pdb(root / "model.pdb", atoms, CELL)
    axes = llm_truth.grid_axes(CELL, D_MIN, NDIV)
    llm = llm_truth.llm_map(atoms, CELL, axes, SIGMA_LLM, GAMMA_LLM, d_min=D_MIN)  # NaN beyond d_min
    _write_map(root / "llm.npz", llm, CELL, axes, rng)
    rbt = llm_truth.rbt_map(atoms, CELL, axes, SIGMA_RBT)
    _write_map(root / "rbt.npz", rbt, CELL, axes, rng)
    return root


def _run(args):
    from diffuse_cli.command_line import model

    model.run([str(a) for a in args])


def test_llm_recovers_sigma_and_gamma(truth):
    out = truth / "out_llm"
    _run([truth / "llm.npz", truth / "model.pdb", f"output.directory={out}", f"output.log={out}.log"])
    fit = json.loads((out / "model_fit.json").read_text())
    assert abs(fit["sigma_A"] - SIGMA_LLM) < 0.10 * SIGMA_LLM, fit["sigma_A"]
    assert abs(fit["gamma_A"] - GAMMA_LLM) < 0.10 * GAMMA_LLM, fit["gamma_A"]
    # the truth's absolute scale (e² per cell) comes back: cctbx vs xraylib form factors differ by ~1 %
    assert abs(fit["scale"] - 1.0) < 0.05, fit["scale"]
    # errors are finite, positive and cover the truth within a few σ (noise is the only error)
    for name, true in (("sigma", SIGMA_LLM), ("gamma", GAMMA_LLM)):
        err = fit[f"{name}_error_A"]
        assert 0 < err < 0.05 * true
    assert fit["cc_aniso"] > 0.9 and len(fit["shells"]) == 10
    assert all(np.isfinite(r["cc_aniso"]) for r in fit["shells"])
    for name in ("model.npz", "model.ccp4", "model_difference.ccp4", "model_slices_hk0.png", "model_cc_per_shell.png"):
        assert (out / name).exists(), name


def test_model_map_file(truth):
    from diffuse_cli.formats.model_map import read_model_map

    out = truth / "out_llm"
    if not (out / "model.npz").exists():
        _run([truth / "llm.npz", truth / "model.pdb", f"output.directory={out}", f"output.log={out}.log"])
    m = read_model_map(out / "model.npz")
    assert str(m["model_kind"]) == "llm"
    mask = m["fit_mask"]
    diff = m["difference"][mask]
    data = m["data_aniso"][mask]
    # the model explains the anisotropic map: the difference is much smaller than the data
    assert np.std(diff) < 0.2 * np.std(data)
    assert np.allclose(diff, (m["data_aniso"] - m["model_aniso"])[mask], atol=1e-3 * np.std(data))
    assert not mask[np.argmin(np.abs(m["h"])), np.argmin(np.abs(m["k"])), np.argmin(np.abs(m["l"]))]


def test_rbt_recovers_sigma(truth):
    out = truth / "out_rbt"
    _run([truth / "rbt.npz", truth / "model.pdb", "model=rbt", "output.plots=False", "output.ccp4=False",
          f"output.directory={out}", f"output.log={out}.log"])
    fit = json.loads((out / "model_fit.json").read_text())
    assert abs(fit["sigma_A"] - SIGMA_RBT) < 0.10 * SIGMA_RBT, fit["sigma_A"]
    assert fit["gamma_A"] is None
    assert abs(fit["scale"] - 1.0) < 0.05, fit["scale"]


def test_pipeline_convolution_matches_direct_sum_at_fixed_parameters(truth):
    """The FFT/real-space kernel route equals the direct Lorentzian² sum (no fit in between).

    The FFT route's kernel carries the aliased tails of Γ̂ (its real-space
    sampling of the cusp of e^{−r/γ}, docs/model.md): a smooth, nearly
    isotropic excess of a few % of the mean. The anisotropic parts must agree
    far better than that.
    """
    from diffuse_cli.analysis import motion_models as mm
    from diffuse_cli.analysis.isotropic import isotropic_component, s_map

    cell = (10.0, 11.0, 12.0, 90.0, 100.0, 90.0)
    atoms = llm_truth.random_atoms(np.random.default_rng(2), 12)
    llm_truth.write_pdb(truth / "small.pdb", atoms, cell)
    axes = llm_truth.grid_axes(cell, 3.0, 3)
    direct = llm_truth.llm_map(atoms, cell, axes, 0.4, 2.0, d_min=3.0)
    lattice = mm.lattice_from_model(truth / "small.pdb", axes, cell, "P1")
    s = s_map(*axes, cell)
    conv = mm.LLMConvolver(lattice, (3, 3, 3), cell, padding=0.5)
    n = mm.series_length(float(mm.displacement_exponent(s.max(), 0.4)), 1e-6)
    fft = mm.llm_intensity(conv.terms(2.0, n), s, 0.4)
    used = np.isfinite(direct) & (s > 0)
    equal = np.where(used, 1.0, np.nan)

    def aniso(a):
        a = np.where(used, a, np.nan)
        return (a - isotropic_component(a, equal, *axes, cell)["I_iso_map"])[used]

    a_fft, a_direct = aniso(fft), aniso(direct)
    assert np.sqrt(np.mean((a_fft - a_direct) ** 2)) < 0.02 * np.sqrt(np.mean(a_direct ** 2))
    assert 0.0 <= np.mean(fft[used] - direct[used]) < 0.1 * np.mean(direct[used])


def test_missing_model_is_one_line_sorry(truth, tmp_path):
    with pytest.raises(Sorry, match=r"^File not found: .*nothing\.pdb$"):
        _run([truth / "llm.npz", f"input.model={tmp_path / 'nothing.pdb'}", f"output.directory={tmp_path}/o"])


def test_wrong_schema_npz_is_sorry(truth, tmp_path):
    from diffuse_cli import program

    bad = tmp_path / "other.npz"
    program.write_npz(bad, schema=np.array("diffuse.extract/2"), I=np.zeros(3))
    with pytest.raises(Sorry, match="other.npz: schema 'diffuse.extract/2', expected 'diffuse.merge/1'"):
        _run([bad, truth / "model.pdb", f"output.directory={tmp_path}/o"])


def test_rbt_without_atomic_model_is_sorry(truth, tmp_path):
    refl = tmp_path / "x.refl"
    refl.write_bytes(b"")
    with pytest.raises(Sorry, match="model=rbt needs an atomic model"):
        _run([truth / "llm.npz", refl, "model=rbt", f"output.directory={tmp_path}/o"])


def test_model_cell_mismatch_is_sorry(truth, tmp_path):
    atoms = llm_truth.random_atoms(np.random.default_rng(1), 5)
    llm_truth.write_pdb(tmp_path / "wrong.pdb", atoms, (20.0, 14.0, 16.0, 90.0, 96.0, 90.0))
    with pytest.raises(Sorry, match="wrong.pdb: unit cell .* differs from the map's"):
        _run([truth / "llm.npz", tmp_path / "wrong.pdb", f"output.directory={tmp_path}/o"])


def test_displacement_exponent_convention():
    """x = 4π²σ²s², s = 1/d: at d = 1 Å, σ = 1/(2π) Å, x = 1; Debye–Waller exp(−B s²/2), B = 8π²σ²."""
    from diffuse_cli.analysis.motion_models import displacement_exponent

    assert math.isclose(float(displacement_exponent(1.0, 1.0 / (2 * math.pi))), 1.0, rel_tol=1e-12)
    B = 8 * math.pi ** 2 * 0.3 ** 2
    assert math.isclose(math.exp(-float(displacement_exponent(0.5, 0.3))), math.exp(-B * 0.25 / 2), rel_tol=1e-12)


def test_bragg_intensities_from_reflections_merge_onto_integer_hkl(tmp_path):
    """.refl route: I/partiality averaged over equivalents (P2: h,k,l ≡ −h,k,−l), Friedel mates filled."""
    from dials.array_family import flex

    from diffuse_cli.analysis.motion_models import lattice_from_reflections

    refl = flex.reflection_table()
    refl["miller_index"] = flex.miller_index([(1, 2, 3), (-1, 2, -3), (2, 0, 1), (2, 0, 1), (0, 1, 0)])
    refl["intensity.sum.value"] = flex.double([10.0, 30.0, 8.0, 3.0, 5.0])
    refl["partiality"] = flex.double([1.0, 0.5, 0.8, 0.05, 1.0])  # 0.05 < 0.1: left out
    refl.set_flags(flex.bool([True, True, True, True, False]), refl.flags.integrated_sum)
    refl.as_file(str(tmp_path / "x.refl"))
    cell = (10.0, 11.0, 12.0, 90.0, 100.0, 90.0)
    axes = llm_truth.grid_axes(cell, 3.0, 2)
    lat = lattice_from_reflections(tmp_path / "x.refl", axes, cell, "P2")

    def at(h, k, l):
        return lat[tuple(int(np.argmin(np.abs(a - v))) for a, v in zip(axes, (h, k, l)))]

    for hkl in ((1, 2, 3), (-1, 2, -3), (-1, -2, -3), (1, -2, 3)):  # mean of 10 and 30/0.5
        assert math.isclose(at(*hkl), 35.0), hkl
    assert math.isclose(at(2, 0, 1), 10.0) and math.isclose(at(-2, 0, -1), 10.0)
    assert at(0, 1, 0) == 0.0  # not integrated
    assert np.count_nonzero(lat) == 6
