"""The compiled scaling fit (scaling._fit_scale_constant, the median selection, merge_prepared's
leave-one-out gather) against the numpy code it replaces: bit for bit, not to a tolerance.

The fits' own correctness (scales recovered from simulated stills, robustness to outliers)
is tested in test_merge_scaling.py and test_merge_cached.py; here the truth is
np.median and the numpy implementation (scaling._fit_scale_numpy), which share no code with
the kernels."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli import merge_prepared as mp
from diffuse_cli import prepared_kernels as pk
from diffuse_cli import scaling as sc
from diffuse_cli.scaling import ScaleModel
from diffuse_cli.scaling_kernels import _median

pytestmark = pytest.mark.skipif(not sc.HAVE_NUMBA, reason="numba not installed")


def _arrays(rng):
    """1-D float64 arrays of the kinds the fits see: sizes on both sides of the sampled
    window (8192), ties, sorted and heavy-tailed values, zeros, ±inf, NaN."""
    for n in (1, 2, 3, 10, 101, 8191, 8192, 8193, 30001, 60000):
        yield rng.normal(size=n)
        yield np.round(rng.normal(size=n), 1)
        yield np.sort(rng.standard_cauchy(size=n))
        yield rng.poisson(0.3, size=n).astype(np.float64)
        x = rng.normal(size=n)
        x[rng.integers(0, n, 3)] = np.inf
        x[rng.integers(0, n, 2)] = -np.inf
        yield x
        x = rng.normal(size=n)
        x[rng.integers(0, n)] = np.nan
        yield x


def test_median_equals_numpy_bit_for_bit():
    rng = np.random.default_rng(11)
    for x in _arrays(rng):
        with np.errstate(invalid="ignore"):  # inf − inf, NaN in np.median's mean
            assert np.array_equal(_median(x), np.median(x), equal_nan=True), x.size
            m = np.median(x)
            mad = _median(x, centre=_median(x))
            assert np.array_equal(mad, np.median(np.abs(x - m)), equal_nan=True), x.size


def _still(rng, n, poisson, outliers=True):
    """Simulated observations of one still: reference I_ref > 0, true scale 1.7, Gaussian
    noise (or Poisson counts with a variance model v1), a few hot pixels."""
    ref = rng.gamma(2.0, 20.0 if not poisson else 0.5, n)
    g = 1.7
    if poisson:
        v1 = rng.uniform(0.8, 1.2, n)  # variance per unit intensity
        counts = rng.poisson(g * ref / v1)
        I = counts * v1 - 0.1
        sig = np.sqrt(np.maximum(counts, 0) * v1 * v1 + 0.05)
    else:
        v1 = None
        sig = np.sqrt(g * ref + 4.0)
        I = g * ref + rng.normal(size=n) * sig
    if outliers:
        hot = rng.random(n) < 0.003
        I[hot] *= 40
    ref_var = rng.uniform(0.01, 0.3, n) * ref
    return I, sig, ref, v1, ref_var


@pytest.mark.parametrize("n", [400, 30000])
@pytest.mark.parametrize("poisson", [False, True])
@pytest.mark.parametrize("with_ref_var", [False, True])
def test_compiled_fit_equals_numpy_fit(n, poisson, with_ref_var):
    rng = np.random.default_rng(n + 2 * poisson + with_ref_var)
    I, sig, ref, v1, ref_var = _still(rng, n, poisson)
    model = ScaleModel(1)
    dss = rng.uniform(0, 0.25, n)
    for n_irls, redescending in ((1, True), (6, True), (6, False)):
        a = sc.fit_scale(model, I, sig, ref, None, n_irls=n_irls, variance_per_intensity=v1,
                         reference_variance=ref_var if with_ref_var else None, redescending=redescending)
        b = sc._fit_scale_numpy(model, I, sig, ref, dss, n_irls=n_irls, variance_per_intensity=v1,
                                reference_variance=ref_var if with_ref_var else None, redescending=redescending)
        for k in ("params", "n_obs", "rms_normalised_residual", "cc", "outlier_fraction", "ok",
                  "residual_scale"):
            assert np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True), (k, getattr(a, k), getattr(b, k))
        assert a.ok
        if not poisson:  # and it found the scale (statistical error < 1 %)
            assert abs(a.params[0] / 1.7 - 1) < 0.05


def test_compiled_fit_equals_numpy_fit_when_some_reference_is_not_positive():
    """model_variance's floor from the positive c·I_ref only; c·I_ref's median by monotonicity."""
    rng = np.random.default_rng(3)
    I, sig, ref, v1, ref_var = _still(rng, 20000, True)
    ref[rng.random(ref.size) < 0.1] *= -1
    ref[:7] = 0.0
    a = sc.fit_scale(ScaleModel(1), I, sig, ref, None, variance_per_intensity=v1, reference_variance=ref_var)
    b = sc._fit_scale_numpy(ScaleModel(1), I, sig, ref, np.zeros(ref.size), variance_per_intensity=v1,
                            reference_variance=ref_var)
    assert np.array_equal(a.params, b.params) and a.residual_scale == b.residual_scale
    assert a.rms_normalised_residual == b.rms_normalised_residual and a.cc == b.cc


def test_model_variance_floor_is_a_median_of_the_positive_expected():
    rng = np.random.default_rng(5)
    e = rng.normal(1.0, 2.0, 9001)
    I, s, v1 = rng.uniform(0, 5, e.size), rng.uniform(0.5, 2, e.size), rng.uniform(0.5, 1.5, e.size)
    floor = 1e-3 * np.median(e[e > 0])
    want = v1 * np.maximum(e, floor) + np.maximum(s**2 - v1 * I, 0.0)
    assert np.array_equal(sc.model_variance(I, s, v1, e), want)


@pytest.fixture(scope="module")
def prepared():
    """One prepared still (merge_prepared.prepare_still) and a reference map from the others."""
    from diffuse_cli import merging as mg
    from diffuse_cli.grid import HKLGrid
    from diffuse_cli.merging import ListSource, scale_and_merge
    from diffuse_cli.symmetry import LaueSymmetry, reciprocal_metric
    from test_merge_common import make_stills, symmetric_truth

    uc, d_min = (20.0, 20.0, 30.0, 90, 90, 90), 2.0
    grid = HKLGrid.for_resolution(2, uc, d_min)
    laue = LaueSymmetry("P4")
    truth = symmetric_truth(grid, laue, uc, seed=1)
    stills = make_stills(truth, grid, uc, 6, seed=3, scales=np.linspace(0.6, 1.8, 6), photons=200)
    rng = np.random.default_rng(7)
    for s in stills:
        s["I"] = s["I"].copy()
        s["I"][rng.random(len(s["I"])) < 0.002] *= 50
        s["variance_per_intensity"] = np.full(len(s["I"]), 0.01) * rng.uniform(0.5, 1.5, len(s["I"]))
    lut, hand = mg._asu_maps(grid, laue, uc, d_min, None, None, True)
    reps, table = mg.compact_tables(lut)
    ref = scale_and_merge(ListSource(stills), grid, laue, uc, d_min=d_min, scale=False).merged
    p = mp.prepare_still(stills[0], grid, table, hand, reciprocal_metric(uc), seed=0)
    return p, ref.I[reps], ref.sigma[reps], ref.counts[reps], (stills, grid, table, hand, reciprocal_metric(uc))


@pytest.mark.parametrize("limit", [None, 3.0])
def test_prepared_fit_equals_fit_of_the_leave_one_out_reference(prepared, limit):
    """_fit_prepared's one-pass gather of the usable observations gives the fit that
    fit_scale gives on _leave_one_out_prepared's arrays (tested against
    scaling.leave_one_out_voxels in test_merge_cached.py), relaxed: bit for bit."""
    p, ref_I, ref_s, ref_n, _ = prepared
    model = ScaleModel(1)
    previous = (np.array([1.3]), limit, 1 / 6, ref_s)
    a = mp._fit_prepared(model, p, ref_I, ref_n, 2, previous)
    ref, ref_var, good = mp._leave_one_out_prepared(ref_I, ref_s, ref_n, p, 1.3, limit, 2)
    f = p.fit
    b = sc._fit_scale_numpy(model, f["I"][good], f["sigma"][good], ref[good], np.zeros(good.sum()),
                            variance_per_intensity=f["v1"][good], reference_variance=ref_var[good])
    b = sc.relax(b, previous[0], own_share=previous[2])
    assert good.sum() > 1000 and a.n_obs == b.n_obs
    for k in ("params", "rms_normalised_residual", "cc", "outlier_fraction", "ok", "residual_scale"):
        assert np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True), k


@pytest.mark.parametrize("case", range(4))
def test_floor_from_voxel_counts_many_voxels_and_ties(case):
    """merge_prepared._floor_weighted (weighted selection over the touched voxels) against
    np.median of the positive expected intensity listed per observation, bit for bit."""
    rng = np.random.default_rng(100 + case)
    n_c = [20000, 5000, 3000, 40000][case]
    ref = rng.lognormal(0.0, 1.0, n_c) * rng.choice([1.0, -1.0], n_c, p=[0.95, 0.05])
    if case == 1:
        ref = np.round(ref, 1)  # many equal values
    if case == 2:
        ref = np.sort(ref)
    ref[rng.random(n_c) < 0.05] = np.nan
    c = rng.integers(0, n_c, 8 * n_c + case).astype(np.int32)
    g, typical, n_typical = [(0.7, 0.0, 0), (1.9, 1.1, 999), (1.0, 2.0, 10), (3e-3, 5.0, 20001)][case]
    expected = np.where(np.isfinite(ref[c]), g * ref[c], typical)
    listed = np.concatenate([expected, np.full(n_typical if typical > 0 else 0, typical)])
    truth = 1e-3 * float(np.median(listed[listed > 0]))
    per_voxel = np.bincount(c)
    touched = np.flatnonzero(per_voxel)
    voxels = (touched.astype(np.int32), per_voxel[touched].astype(np.int64))
    assert mp._floor_weighted(ref, voxels, g, typical, n_typical) == truth


@pytest.mark.parametrize("fit_max_obs", [200_000, 3000])
@pytest.mark.parametrize("variance_model", [True, False])
def test_prepare_still_compiled_equals_numpy(prepared, monkeypatch, fit_max_obs, variance_model):
    """prepare_still's compiled selection of the fit and kept observations and its typical
    intensity: the arrays of the numpy code (HAVE_NUMBA off), bit for bit and dtype for dtype."""
    stills, grid, table, hand, gstar = prepared[4]
    obs = dict(stills[1])
    obs["I"] = obs["I"].copy()
    obs["I"][::97] = np.nan
    obs["sigma"] = obs["sigma"].copy()
    obs["sigma"][::89] = 0.0
    if not variance_model:
        obs.pop("variance_per_intensity")
    args = (obs, grid, table, hand, gstar, None, fit_max_obs, 4, True)
    a = mp.prepare_still(*args)
    monkeypatch.setattr(mp, "HAVE_NUMBA", False)
    b = mp.prepare_still(*args)
    assert a.n_dropped == b.n_dropped and a.typical == b.typical
    for (ka, x), (kb, y) in zip(sorted(a.arrays().items()), sorted(b.arrays().items())):
        assert ka == kb and x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), ka


@pytest.mark.parametrize("case", range(5))
def test_median_of_positive_kernel_equals_numpy(case):
    rng = np.random.default_rng(case)
    n = [300_000, 1_000_001, 50, 400_000, 250_000][case]
    x = [rng.lognormal(0, 2, n), rng.poisson(1.5, n) * 0.25 - 0.25, rng.normal(0, 1, n),
         np.where(rng.random(n) < 0.3, np.nan, rng.normal(1, 1, n)),
         np.sort(rng.exponential(1.0, n))][case]
    if case == 4:
        x[: n // 2] = -1.0
    med, count = pk._median_positive(x, np.empty(n))
    assert med == float(np.median(x[x > 0])) and count == np.count_nonzero(x > 0)
    assert pk._median_positive(np.full(10, -1.0), np.empty(10)) == (1.0, 0)
