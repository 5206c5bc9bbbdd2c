"""diffuse.merge's cached passes (each still read once, compact ASU voxels) against the
reference implementation that reloads every still in every pass, and against a
straightforward numpy merge that shares none of the merge code."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli import merge_prepared as mp
from diffuse_cli import merging as mg
from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import ListSource, scale_and_merge
from diffuse_cli.symmetry import LaueSymmetry, reciprocal_metric
from test_merge_common import make_stills, symmetric_truth

UC = (20.0, 20.0, 30.0, 90, 90, 90)
D_MIN = 2.0


@pytest.fixture(scope="module")
def data():
    grid = HKLGrid.for_resolution(2, UC, D_MIN)
    laue = LaueSymmetry("P4")
    truth = symmetric_truth(grid, laue, UC, seed=1)
    k = np.random.default_rng(5).uniform(0.5, 2.0, 12)
    stills = make_stills(truth, grid, UC, 12, seed=3, scales=k, photons=200)
    rng = np.random.default_rng(7)
    with_v1 = []
    for s in stills:  # a variance model (Poisson-like v1) and a few gross outliers
        I = s["I"].copy()
        bad = rng.random(len(I)) < 0.002
        I[bad] *= 50
        v1 = np.full(len(I), 0.01) * rng.uniform(0.5, 1.5, len(I))
        with_v1.append(dict(s, I=I, variance_per_intensity=v1))
    return grid, laue, stills, with_v1


def _same_map(a, b, rtol=1e-5):
    for name in ("I", "sigma"):
        x, y = getattr(a.merged, name), getattr(b.merged, name)
        np.testing.assert_array_equal(np.isfinite(x), np.isfinite(y))
        ok = np.isfinite(x)
        assert np.max(np.abs(x[ok] - y[ok]) / np.abs(x[ok])) < rtol, name
    np.testing.assert_array_equal(a.merged.counts, b.merged.counts)
    for x, y in zip(a.merged.half_I + a.merged.friedel_I, b.merged.half_I + b.merged.friedel_I):
        ok = np.isfinite(x)
        np.testing.assert_array_equal(ok, np.isfinite(y))
        assert np.max(np.abs(x[ok] - y[ok]) / np.abs(x[ok])) < 1e-5
    np.testing.assert_allclose(a.params, b.params, rtol=1e-6)


@pytest.mark.parametrize("variance_model", [False, True])
def test_cached_equals_reloading_path(data, variance_model):
    grid, laue, stills, with_v1 = data
    src = with_v1 if variance_model else stills
    old = scale_and_merge(ListSource(src), grid, laue, UC, d_min=D_MIN, cached=False, tolerance=1e-4)
    new = scale_and_merge(ListSource(src), grid, laue, UC, d_min=D_MIN, cached=True, tolerance=1e-4)
    assert new.iterations == old.iterations >= 2
    _same_map(old, new)
    # observations merged = the counts of the ASU voxels
    assert new.n_observations == int(new.merged.counts[new.merged.asu_voxels()].sum())


def test_spilled_to_disk_equals_in_memory(data):
    grid, laue, _, with_v1 = data
    mem = scale_and_merge(ListSource(with_v1), grid, laue, UC, d_min=D_MIN, max_iterations=2)
    disk = scale_and_merge(ListSource(with_v1), grid, laue, UC, d_min=D_MIN, max_iterations=2, cache_bytes=0)
    np.testing.assert_array_equal(mem.merged.I, disk.merged.I)
    np.testing.assert_array_equal(mem.params, disk.params)


def test_unscaled_merge_equals_plain_numpy(data):
    """Independent truth: round hkl·ndiv, map each voxel to cctbx's ASU with cctbx's
    map_to_asu, inverse-variance mean with np.bincount (no merge code)."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    grid, laue, stills, _ = data
    res = scale_and_merge(ListSource(stills), grid, laue, UC, d_min=D_MIN, scale=False)
    hkl = np.concatenate([s["hkl"] for s in stills])
    I = np.concatenate([s["I"] for s in stills])
    sig = np.concatenate([s["sigma"] for s in stills])
    nd = np.asarray(grid.ndiv)
    v = np.rint(hkl * nd.astype(hkl.dtype)).astype(np.int64)
    # voxel indices are Miller indices of a cell ndiv times larger
    big = tuple(a * n for a, n in zip(UC[:3], nd)) + UC[3:]
    cs = crystal.symmetry(unit_cell=big, space_group_symbol="P4")
    ms = miller.set(cs, flex.miller_index([tuple(map(int, x)) for x in v]), anomalous_flag=False)
    asu = np.array(ms.map_to_asu().indices(), dtype=np.int64)
    g = reciprocal_metric(UC)
    h = asu / nd  # resolution of the orbit's representative (as the merge decides)
    inside = (np.einsum("ni,ij,nj->n", h, g, h) <= 1 / D_MIN**2) & (sig > 0)
    asu, I, sig = asu[inside], I[inside], sig[inside]
    key, inv = np.unique(asu, axis=0, return_inverse=True)
    w = 1 / sig**2
    mean = np.bincount(inv, w * I) / np.bincount(inv, w)
    off = np.asarray(grid.hkl_max) * nd
    flat = np.ravel_multi_index(tuple((key + off).T), grid.shape)
    rep = res.merged.lut[flat]
    np.testing.assert_allclose(res.merged.I[rep], mean, rtol=1e-6)
    assert res.n_observations == len(I)


def test_compact_leave_one_out_equals_scaling_reference(data):
    from diffuse_cli.scaling import leave_one_out_voxels

    grid, laue, _, with_v1 = data
    lut, hand = mg._asu_maps(grid, laue, UC, D_MIN, None, None, True)
    reps, table = mg.compact_tables(lut)
    ref = scale_and_merge(ListSource(with_v1), grid, laue, UC, d_min=D_MIN, scale=False).merged
    ref_I, ref_s, ref_n = ref.I[reps], ref.sigma[reps], ref.counts[reps]
    p = mp.prepare_still(with_v1[0], grid, table, hand, reciprocal_metric(UC), seed=0)
    for limit in (None, 3.0):
        a = mp._leave_one_out_prepared(ref_I, ref_s, ref_n, p, 1.3, limit, 2)
        b = leave_one_out_voxels(ref_I, ref_s, ref_n, p.c, p.I, p.sigma, 1.3, 0.0, p.v1, p.fit["c"], limit, 2)
        np.testing.assert_array_equal(a[2], b[2])
        np.testing.assert_allclose(a[0][a[2]], b[0][b[2]], rtol=1e-9)
        np.testing.assert_allclose(a[1][a[2]], b[1][b[2]], rtol=1e-9)


def test_voxels_from_detector_q_equal_rounded_hkl_from_q():
    """The compiled q → voxel path rounds exactly as voxel_flat(hkl_from_q(...))."""
    from diffuse_cli.geometry import hkl_from_q
    from diffuse_cli.merge_accumulator import voxel_flat
    from diffuse_cli.merge_compact import _voxels_q

    grid = HKLGrid.for_resolution(3, (58.4, 58.4, 152.3, 90, 90, 90), 2.5)
    rng = np.random.default_rng(0)
    q_unit = rng.normal(0, 0.3, (200_000, 3)).astype(np.float32)
    pixels = np.sort(rng.choice(len(q_unit), 150_000, replace=False))
    A = np.linalg.qr(rng.normal(size=(3, 3)))[0] @ np.diag([1 / 58.4, 1 / 58.4, 1 / 152.3]) * 0.97
    M = np.linalg.inv(A)
    R = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]], dtype=np.float64)
    table = np.arange(grid.n_voxels, dtype=np.int32)  # identity: compact index = flat index
    for ops in ((), (R,)):
        hkl = hkl_from_q(q_unit[pixels], A)
        for op in ops:
            hkl = hkl @ op
        flat, inside = voxel_flat(grid, hkl)
        c = np.empty(len(pixels), np.int32)
        side = np.empty(len(pixels), np.int8)
        _voxels_q(q_unit, pixels, M, R if ops else np.eye(3), bool(ops), np.asarray(grid.ndiv, np.float64),
                  np.asarray(grid.hkl_max) * np.asarray(grid.ndiv), np.asarray(grid.shape), table,
                  np.empty(0, np.int8), c, side)
        np.testing.assert_array_equal(c, np.where(inside, flat, -1))


@pytest.mark.parametrize("cached", [True, False])
def test_a_voxel_whose_observations_all_disagree_stays_rejected_whatever_the_pass_count(data, cached):
    """Observations of one voxel split between 0 and a high value (as at a beam-stop edge): each is
    many σ from their mean, so all are rejected; the next pass must not take them all back (the
    map would then depend on the parity of the pass count)."""
    from diffuse_cli.merge_accumulator import voxel_flat

    grid, laue, stills, _ = data
    flat = [voxel_flat(grid, s["hkl"])[0] for s in stills]
    target = np.bincount(np.concatenate(flat)).argmax()  # the voxel seen most often (P1 index)
    damaged, n_in = [], 0
    for s, f in zip(stills, flat):
        I = s["I"].copy()
        at = np.flatnonzero(f == target)
        I[at[0::2]] = 0.0
        I[at[1::2]] = 100.0 * np.abs(s["I"]).max()
        n_in += len(at)
        damaged.append(dict(s, I=I))
    assert n_in >= 6
    runs = [scale_and_merge(ListSource(damaged), grid, laue, UC, d_min=D_MIN, cached=cached, tolerance=0.0,
                            max_iterations=n) for n in (3, 4)]
    rep = runs[0].merged.lut[target]
    counts = [int(r.merged.counts[rep]) for r in runs]
    assert counts[0] == counts[1] == 0, counts
    np.testing.assert_array_equal(runs[0].merged.counts, runs[1].merged.counts)


@pytest.mark.parametrize("case", range(6))
def test_floor_from_voxel_counts_equals_median_of_every_observation(case):
    """_floor_weighted (per touched voxel, with its observation count) gives bit for bit the
    floor 1e-3·median of the positive expected intensities listed per observation (np.median)."""
    rng = np.random.default_rng(case)
    n_c = [50, 7, 300, 1, 40, 12][case]
    ref = rng.lognormal(0.0, 1.0, n_c) * rng.choice([1.0, -1.0], n_c, p=[0.9, 0.1])
    ref[rng.random(n_c) < 0.2] = np.nan
    ref[: n_c // 3] = ref[0]  # ties
    c = rng.integers(0, n_c, [1000, 7, 5001, 3, 2, 64][case]).astype(np.int32)
    g = [1.0 / 3.0, 2.5, 0.7, 1.0, 1e-3, 3.0][case]
    typical = [0.0, 1.3, float(np.nanmedian(np.abs(ref))), 2.0, 0.5, 0.0][case]
    n_typical = [0, 3, 2000, 1, 0, 5][case]
    expected = np.where(np.isfinite(ref[c]), g * ref[c], typical)  # as merge_compact._expected
    listed = np.concatenate([expected, np.full(n_typical if typical > 0 else 0, typical)])
    listed = listed[listed > 0]
    truth = 1e-3 * float(np.median(listed)) if listed.size else 1e-12
    per_voxel = np.bincount(c)
    touched = np.flatnonzero(per_voxel)
    voxels = (touched.astype(np.int32), per_voxel[touched].astype(np.int64))
    assert mp._floor_weighted(ref, voxels, g, typical, n_typical) == truth
    assert mp._floor(expected.copy(), typical, n_typical) == truth  # the per-observation form it replaces


@pytest.mark.parametrize("case", range(5))
def test_median_of_positive_equals_numpy(case):
    """prepare_still's typical intensity: np.median of the positive values, bit for bit,
    also with ties, NaN, negatives, few values and a sample that misses the median."""
    rng = np.random.default_rng(case)
    n = [300_000, 1_000_001, 50, 400_000, 250_000][case]
    x = [rng.lognormal(0, 2, n), rng.poisson(1.5, n) * 0.25 - 0.25, rng.normal(0, 1, n),
         np.where(rng.random(n) < 0.3, np.nan, rng.normal(1, 1, n)),
         np.sort(rng.exponential(1.0, n))][case]  # sorted: a strided sample of one stretch
    if case == 4:
        x[: n // 2] = -1.0
    assert mp._median_of_positive(x) == float(np.median(x[x > 0]))
    assert mp._median_of_positive(np.full(10, -1.0)) == 1.0
