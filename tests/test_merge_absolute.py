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
    ds = np.array([0.0, 0.5, 1.0, 3.0, 20.0])
    inc = absc.incoherent(el, ds)
    assert inc[0] == pytest.approx(0.0, abs=0.01 * z)
    assert np.all(np.diff(inc) > -1e-9 * z)  # rises to Z (H has saturated by d* = 3)
    assert inc[-1] == pytest.approx(z, rel=0.01)  # → Z at high s (all electrons incoherent)
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


def test_independent_simulator_atomic_term_agrees_with_the_merge_theory():
    """The simulator's independent-atom term (its own code: xraylib's Hubbell f and S)
    and the merge theory (cctbx wk1995 f, xraylib S) agree within 1 %: same x = d*/2
    convention, same composition handling. They are independent code, so this can fail."""
    from diffuse_cli.simulate import DiffuseModelParameters, TruthModel

    p = DiffuseModelParameters(unit_cell=(40.0, 40.0, 60.0, 90, 90, 90), space_group="P4", seed=1, d_min=1.8,
                               composition="C:120,N:32,O:40,S:1,H:190", wilson_b=25.0,
                               photons_per_electron_unit=1e-3, intensity_scale=2.0)
    model = TruthModel(p)
    ds = np.linspace(0.05, 1 / 1.8, 50)
    coh, inc = absc.theory(COMP, ds, wilson_b=25.0)
    np.testing.assert_allclose(model.atomic(ds), 2e-3 * (coh + inc), rtol=0.01)
    assert model.photons_per_electron_unit == 2e-3


# --------------------------------------------------------------- diffuse.merge: Bragg peaks and Wilson B

def _write_merge_inputs(d, with_beam=True, n_stills=6):
    """Observation files (between-Bragg truth on the atomic total) + combined.expt."""
    from dxtbx.model import BeamFactory, Crystal, Experiment, ExperimentList

    uc = (20.0, 20.0, 30.0, 90, 90, 90)
    grid = HKLGrid.for_resolution(2, uc, 1.8)
    flat = np.arange(grid.n_voxels)
    ds = voxel_d_star(grid, flat, uc).reshape(grid.shape)
    coh, inc = absc.theory(COMP, ds, wilson_b=20.0)
    stills = make_stills((coh + inc) / 1e3, grid, uc, n_stills, seed=2, photons=2000)
    (d / "corrected").mkdir()
    el = ExperimentList()
    for i, s in enumerate(stills):
        np.savez(d / "corrected" / f"still_{i:04d}.npz", schema=np.array("diffuse.observations/1"),
                 hkl=s["hkl"], I=s["I"], sigma=s["sigma"])
        R = np.linalg.inv(s["A"])
        beam = BeamFactory.simple(1.0) if with_beam else None
        el.append(Experiment(beam=beam, crystal=Crystal(R[0], R[1], R[2], space_group_symbol="P4")))
    el.as_file(str(d / "combined.expt"))
    return el


def _write_bragg_reflections(path, experiments, B, seed=0, per_still=600):
    """combined.refl as stills_process writes it: acentric Wilson intensities with B, Σf² from
    xraylib's form factors (independent of the cctbx ones the estimate uses), polarization in."""
    import xraylib
    from dials.array_family import flex

    from diffuse_cli.corrections import polarization

    rng = np.random.default_rng(seed)
    n = len(experiments) * per_still
    d_star = np.cbrt(rng.uniform(0.1**3, (1 / 1.8) ** 3, n))
    ids = np.repeat(np.arange(len(experiments)), per_still)
    sf2 = np.zeros(n)
    for el, m in COMP.items():
        z = xraylib.SymbolToAtomicNumber(el)
        sf2 += m * np.array([xraylib.FF_Rayl(z, float(x)) for x in 0.5 * d_star]) ** 2
    k = rng.uniform(0.5, 2.0, len(experiments))[ids]
    p = rng.uniform(0.1, 1.0, n)
    full = rng.exponential(k * sf2 * np.exp(-0.5 * B * d_star**2))
    lam = experiments[0].beam.get_wavelength()
    tt, phi = 2 * np.arcsin(lam * d_star / 2), rng.uniform(0, 2 * np.pi, n)
    s1 = np.stack([np.sin(tt) * np.cos(phi), np.sin(tt) * np.sin(phi), -np.cos(tt)], axis=1) / lam
    P = polarization(s1, experiments[0].beam)
    t = flex.reflection_table()
    t["id"] = flex.int(ids.astype(np.int32))
    t["miller_index"] = flex.miller_index([(1 + i % 7, 2 + i % 5, 1 + i % 11) for i in range(n)])
    t["d"] = flex.double(1 / d_star)
    t["s1"] = flex.vec3_double(s1)
    t["intensity.sum.value"] = flex.double(p * full * P)
    t["intensity.sum.variance"] = flex.double(np.ones(n))
    t["partiality"] = flex.double(p)
    t.set_flags(flex.bool(n, True), t.flags.integrated_sum)
    t.as_file(str(path))


MERGE_ARGS = ["combined.expt", "corrected", "ndiv=2", "d_min=1.8", "space_group=P4", "scaling.enable=False",
              "composition=C:120,N:32,O:40,S:1,H:190", "output.directory=out"]


def test_merge_refuses_electron_units_without_bragg_intensities(tmp_path, monkeypatch):
    from libtbx.utils import Sorry

    from diffuse_cli.command_line import merge as merge_cli

    monkeypatch.chdir(tmp_path)
    _write_merge_inputs(tmp_path)
    with pytest.raises(Sorry) as e:
        merge_cli.run([*MERGE_ARGS, "absolute_scale.bragg_peaks=masked"])
    msg = str(e.value)
    assert "absolute_scale.wilson_b" in msg and "combined.refl" in msg and "\n" not in msg
    assert not (tmp_path / "out" / "merged.npz").exists()  # refused before merging
    with pytest.raises(Sorry, match="bragg_peaks=masked"):
        merge_cli.run([*MERGE_ARGS, "absolute_scale.bragg_peaks=kept", "absolute_scale.wilson_b=20"])


def test_merge_estimates_wilson_b_from_the_refl_beside_the_expt(tmp_path, monkeypatch):
    import json

    from diffuse_cli.command_line import merge as merge_cli

    monkeypatch.chdir(tmp_path)
    el = _write_merge_inputs(tmp_path)
    _write_bragg_reflections(tmp_path / "combined.refl", el, B=20.0)
    merge_cli.run([*MERGE_ARGS, "absolute_scale.bragg_peaks=masked", "output.log=merge.log"])
    sc = json.loads((tmp_path / "out" / "absolute_scale.json").read_text())
    assert sc["wilson"]["source"].endswith("combined.refl")
    assert sc["wilson_b"] == pytest.approx(20.0, rel=0.10)
    assert sc["bragg_peaks"]["masked"] and sc["wavelength"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "wilson_plot.png").stat().st_size > 10000
    assert "Wilson B =" in (tmp_path / "merge.log").read_text()
    # the map was simulated between Bragg peaks with B = 20: K recovered with the estimated B
    assert sc["K"] == pytest.approx(1e3, rel=0.05)


def test_bragg_peaks_auto_reads_diffuse_extract_summary(tmp_path):
    import json

    from diffuse_cli.command_line import merge as merge_cli

    (tmp_path / "extracted").mkdir()
    (tmp_path / "corrected").mkdir()
    np.savez(tmp_path / "extracted" / "s.npz", schema=np.array("diffuse.extract/1"))
    f = tmp_path / "corrected" / "s.npz"
    np.savez(f, schema=np.array("diffuse.correct/3"), extract_file=np.array("../extracted/s.npz"),
             extract_file_absolute=np.array(str(tmp_path / "extracted" / "s.npz")))
    a = merge_cli.phil_scope.extract().absolute_scale
    # no summary: the default chain's assumption for diffuse.correct files
    assert merge_cli._bragg_peaks_masked(a, [str(f)])[0] is True
    for flag in (True, False):
        (tmp_path / "extracted" / "summary.json").write_text(
            json.dumps({"schema": "diffuse.extract_summary/1", "bragg_masks": flag, "stills": []}))
        masked, why = merge_cli._bragg_peaks_masked(a, [str(f)])
        assert masked is flag and "summary.json" in why
    a.bragg_peaks = "masked"
    assert merge_cli._bragg_peaks_masked(a, [str(f)])[0] is True
