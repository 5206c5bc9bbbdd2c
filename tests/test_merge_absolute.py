"""Absolute scale (Krogh-Moe) on synthetic data with a known electron-unit scale."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli import absolute_scale as absc
from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import ListSource, scale_and_merge, voxel_d_star
from diffuse_cli.symmetry import LaueSymmetry
from test_merge_common import make_stills, symmetric_truth

COMP = {"C": 120.0, "N": 32.0, "O": 40.0, "S": 1.0, "H": 190.0}


def test_parse_composition():
    assert absc.parse_composition("C:1200,N:300,O:400,S:10,H:1900") == {
        "C": 1200.0, "N": 300.0, "O": 400.0, "S": 10.0, "H": 1900.0}
    with pytest.raises(ValueError):
        absc.parse_composition("C1200")
    with pytest.raises(ValueError):
        absc.parse_composition("Xx:3")


@pytest.mark.parametrize("el,z", [("H", 1), ("C", 6), ("N", 7), ("O", 8), ("S", 16), ("Fe", 26)])
def test_form_factor_and_incoherent_limits(el, z):
    f0 = absc.form_factor(el, np.array([0.0]))[0]
    assert f0 == pytest.approx(z, rel=5e-3)
    ds = np.array([0.0, 0.5, 1.0, 3.0])
    inc = absc.incoherent(el, ds)
    assert inc[0] == pytest.approx(0.0, abs=0.01 * z)
    assert np.all(np.diff(inc) > 0)
    assert inc[-1] == pytest.approx(z, rel=0.08)  # → Z at high s (all electrons incoherent)
    coh, inc_sum = absc.theory({el: 2.0}, np.array([0.0]))
    assert coh[0] == pytest.approx(2 * z * z, rel=1e-2)


def test_krogh_moe_scale_recovered_through_merge():
    uc = (20.0, 20.0, 30.0, 90, 90, 90)
    d_min = 1.6
    grid = HKLGrid.for_resolution(2, uc, d_min)
    laue = LaueSymmetry("P4")
    flat = np.arange(grid.n_voxels)
    ds = voxel_d_star(grid, flat, uc).reshape(grid.shape)
    coh, inc = absc.theory(COMP, ds)
    # electron-unit truth: features at low resolution on top of the independent-atom total
    features = symmetric_truth(grid, laue, uc, seed=2)
    truth_eu = coh * (1.0 + 0.5 * features * np.exp(-(ds**2) / 0.05)) + inc
    K_true = 2.5e4
    stills = make_stills(truth_eu / K_true, grid, uc, 25, seed=5, photons=2000)
    res = scale_and_merge(ListSource(stills), grid, laue, uc, d_min=d_min, scale=False)
    full = res.merged.expand(res.merged.I)
    centres, prof, n = absc.radial_profile(full, ds, 1 / d_min, n_bins=40)
    sc = absc.fit_absolute_scale(centres, prof, COMP, counts=n)
    assert sc.K == pytest.approx(K_true, rel=0.05)
    assert sc.residual < 0.05
    I_eu, _ = absc.to_electron_units(full, full * 0, ds, sc)
    ok = np.isfinite(I_eu)
    # output is coherent-only electron units: compare with truth − incoherent
    rel = np.median(np.abs(I_eu[ok] - (truth_eu - inc)[ok]) / (truth_eu - inc)[ok])
    assert rel < 0.05


def test_plot_absolute_scale(tmp_path):
    ds = np.linspace(0.01, 0.6, 30)
    coh, inc = absc.theory(COMP, ds)
    sc = absc.fit_absolute_scale(ds, (coh + inc) / 10.0, COMP)
    assert sc.K == pytest.approx(10.0, rel=1e-9)
    absc.plot_absolute_scale(sc, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 10000


def test_wilson_b_removes_the_bragg_part():
    """With Bragg peaks masked only (1 − exp(−B s²/2))·Σf² + ΣI_inc remains:
    the fit with wilson_b recovers K exactly, the total-scattering fit does not."""
    ds = np.linspace(0.05, 0.5, 40)
    coh, inc = absc.theory(COMP, ds)
    coh_b, inc_b = absc.theory(COMP, ds, wilson_b=30.0)
    np.testing.assert_allclose(inc_b, inc)
    np.testing.assert_allclose(coh_b, coh * (1 - np.exp(-15.0 * ds * ds)), rtol=1e-12)
    between_bragg = (coh_b + inc) / 7.0
    sc = absc.fit_absolute_scale(ds, between_bragg, COMP, fit_range=(0.3, 0.5), wilson_b=30.0)
    assert sc.K == pytest.approx(7.0, rel=1e-9) and sc.as_dict()["wilson_b"] == 30.0
    biased = absc.fit_absolute_scale(ds, between_bragg, COMP, fit_range=(0.3, 0.5))
    assert biased.K > 7.0 * 1.05  # the missing Bragg part inflates K


def test_simulator_atomic_term_is_the_merge_theory():
    from diffuse_cli.simulate import DiffuseModelParameters, TruthModel

    p = DiffuseModelParameters(unit_cell=(40.0, 40.0, 60.0, 90, 90, 90), space_group="P4", seed=1, d_min=1.8,
                               composition="C:120,N:32,O:40,S:1,H:190", wilson_b=25.0,
                               photons_per_electron_unit=1e-3, intensity_scale=2.0)
    model = TruthModel(p)
    ds = np.linspace(0.0, 1 / 1.8, 50)
    coh, inc = absc.theory(COMP, ds, wilson_b=25.0)
    np.testing.assert_allclose(model.atomic(ds), 2e-3 * (coh + inc), rtol=1e-4)
    assert model.photons_per_electron_unit == 2e-3
    # rebuilt from truth.json's dict with the same term
    again = TruthModel.from_dict(model.to_dict())
    np.testing.assert_allclose(again.atomic(ds), model.atomic(ds))
