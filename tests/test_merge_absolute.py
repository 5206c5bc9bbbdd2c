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
