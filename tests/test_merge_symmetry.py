"""diffuse.merge symmetry: ASU mapping vs cctbx, Laue merge vs P1 + symmetrise, ambiguity."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import ListSource, scale_and_merge
from diffuse_cli.ambiguity import determine_reindexing
from diffuse_cli.ambiguity_cosets import ambiguity_operators
from diffuse_cli.symmetry import LaueSymmetry, grid_asu_map
from test_merge_common import make_stills, symmetric_truth, symmetrize_dense

SYMBOLS = ["P1", "P2", "C2", "P112", "P222", "P4", "P43212", "I41/a", "P3", "R3", "R3:R",
           "P321", "P312", "P6", "P6122", "I23", "Fm-3m", "P4332"]


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_asu_mapping_agrees_with_cctbx(symbol):
    from cctbx import miller
    from cctbx.array_family import flex

    laue = LaueSymmetry(symbol)
    rng = np.random.default_rng(1)
    v = rng.integers(-9, 10, (4000, 3))
    v[:50] = 0  # origin and axes (special positions) included
    v[50:100, :2] = 0
    v[100:150, 0] = v[100:150, 1]
    ours = laue.map_to_asu(v)
    mi = flex.miller_index([tuple(int(x) for x in row) for row in v])
    miller.map_to_asu(laue.laue_group.type(), False, mi)
    assert np.array_equal(ours, np.array(mi).reshape(-1, 3))
    # and the representative is an equivalent of the input
    eq = laue.equivalents(v)
    assert np.all(np.any(np.all(eq == ours[None], axis=2), axis=0))


def test_laue_group_orders():
    assert LaueSymmetry("P43212").order == 16
    assert LaueSymmetry("P4").order == 8
    assert LaueSymmetry("P6122").order == 24
    assert LaueSymmetry("C2").order == 4
    assert LaueSymmetry("Fm-3m").order == 48


def test_grid_asu_map_partitions_the_sphere():
    uc = (20.0, 20.0, 30.0, 90, 90, 90)
    grid = HKLGrid.for_resolution(2, uc, 3.0)
    laue = LaueSymmetry("P422")
    lut = grid_asu_map(grid, laue, uc, d_min=3.0)
    inside = lut >= 0
    reps = np.flatnonzero(lut == np.arange(lut.size))
    # every representative maps to itself, and every in-range voxel to a representative
    assert np.all(lut[reps] == reps)
    assert np.all(lut[lut[inside]] == lut[inside])
    # orbit sizes: general-position orbits have 16 members in 4/mmm
    sizes = np.bincount(lut[inside], minlength=lut.size)[reps]
    assert set(np.unique(sizes)) <= {1, 2, 4, 8, 16}
    assert np.median(sizes) == 16


@pytest.fixture(scope="module")
def tetragonal():
    uc = (20.0, 20.0, 30.0, 90, 90, 90)
    d_min = 2.5
    grid = HKLGrid.for_resolution(2, uc, d_min)
    laue = LaueSymmetry("P4")
    truth = symmetric_truth(grid, laue, uc, seed=1)
    return uc, d_min, grid, laue, truth


def test_p1_merge_symmetrised_equals_laue_merge(tetragonal):
    uc, d_min, grid, laue, truth = tetragonal
    stills = make_stills(truth, grid, uc, 12, seed=4)
    src = ListSource(stills)
    p1 = scale_and_merge(src, grid, LaueSymmetry("P1"), uc, scale=False).merged
    # P1 merge without resolution cut, symmetrised by independent dense-array code
    sym_I, _ = symmetrize_dense(p1.expand(p1.I), p1.expand(p1.sigma), grid, laue)
    lg = scale_and_merge(src, grid, laue, uc, d_min=d_min, scale=False).merged
    lg_I = lg.expand(lg.I)
    in_range = lg.lut.reshape(grid.shape) >= 0
    ok = in_range & np.isfinite(lg_I)
    assert ok.sum() > 5000
    np.testing.assert_allclose(sym_I[ok], lg_I[ok], rtol=1e-9)
    # same voxels measured
    assert np.array_equal(np.isfinite(sym_I[in_range]), np.isfinite(lg_I[in_range]))


def test_known_laue_symmetry_reproduced_from_partial_data(tetragonal):
    uc, d_min, grid, laue, truth = tetragonal
    stills = make_stills(truth, grid, uc, 25, seed=7, photons=5000)
    # keep only observations with h > 0 and k > 0 (one quadrant of reciprocal space)
    for s in stills:
        keep = (s["hkl"][:, 0] > 0.3) & (s["hkl"][:, 1] > 0.3)
        for key in ("hkl", "I", "sigma"):
            s[key] = s[key][keep]
    m = scale_and_merge(ListSource(stills), grid, laue, uc, d_min=d_min, scale=False).merged
    full = m.expand(m.I)
    H = np.stack(np.meshgrid(*grid.axes(), indexing="ij"), -1)
    unobserved_quadrant = (H[..., 0] < -0.3) & (H[..., 1] < -0.3) & np.isfinite(full)
    assert unobserved_quadrant.sum() > 2000
    a, b = full[unobserved_quadrant], truth[unobserved_quadrant]
    assert np.corrcoef(a, b)[0, 1] > 0.99
    assert abs(np.median(a / b) - 1) < 0.02


def test_ambiguity_operators_counts():
    tet = (48.4, 48.4, 63.3, 90, 90, 90)
    hexa = (93.0, 93.0, 130.4, 90, 90, 120)
    amb = ambiguity_operators(tet, LaueSymmetry("P4"))
    assert amb.n == 2
    # the (h,k,l) -> (k,h,-l) reindexing is in the non-identity coset
    assert amb.coset_of(np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])) == 1
    assert ambiguity_operators(tet, LaueSymmetry("P43212")).n == 1
    assert ambiguity_operators(hexa, LaueSymmetry("P3")).n == 4
    assert ambiguity_operators(hexa, LaueSymmetry("P321")).n == 2
    assert ambiguity_operators(hexa, LaueSymmetry("P6122")).n == 1
    assert ambiguity_operators((50, 60, 70, 90, 90, 90), LaueSymmetry("P212121")).n == 1
    # a cubic-looking cell in a monoclinic group: |m-3m| / |2/m| = 12
    assert ambiguity_operators((50, 50, 50, 90, 90, 90), LaueSymmetry("P2")).n == 12


def test_ambiguity_resolved_on_flipped_subset(tetragonal):
    uc, d_min, grid, laue, truth = tetragonal
    amb = ambiguity_operators(uc, laue)
    flip = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])  # (h,k,l) -> (k,h,-l)
    flipped = {1, 4, 5, 9, 13, 17, 20, 22}
    stills = make_stills(truth, grid, uc, 24, seed=11, flip={i: flip for i in flipped})
    res = determine_reindexing(ListSource(stills), amb, uc, d_min=d_min)
    assert set(np.flatnonzero(res["assignment"]).tolist()) == flipped
    # merging with the reindexing recovers the truth as well as unflipped data does
    src = ListSource(stills)
    good = scale_and_merge(src, grid, laue, uc, d_min=d_min, scale=False, reindex=res["reindex"]).merged
    bad = scale_and_merge(src, grid, laue, uc, d_min=d_min, scale=False).merged
    vox = good.asu_voxels()

    def aniso_cc(m):
        ok = np.isfinite(m.I[vox])
        t = truth.ravel()[vox][ok]
        return np.corrcoef(m.I[vox][ok], t)[0, 1]

    assert aniso_cc(good) > 0.99
    assert aniso_cc(bad) < aniso_cc(good) - 0.02


@pytest.mark.parametrize("symbol", ["P4", "P6122", "R3", "I23", "C2"])
def test_grid_asu_map_equals_per_voxel_map_to_asu(symbol):
    laue = LaueSymmetry(symbol)
    if symbol in ("P6122", "R3"):
        uc = (30.0, 30.0, 40.0, 90, 90, 120)
    elif symbol == "C2":
        uc = (30.0, 20.0, 25.0, 90, 100, 90)
    else:
        uc = (25.0, 25.0, 25.0 if symbol == "I23" else 35.0, 90, 90, 90)
    d_min = 4.0
    grid = HKLGrid.for_resolution(2, uc, d_min)
    lut = grid_asu_map(grid, laue, uc, d_min=d_min, chunk=5000)
    off = np.asarray(grid.hkl_max) * np.asarray(grid.ndiv)
    v = np.stack(np.unravel_index(np.arange(grid.n_voxels), grid.shape), -1) - off
    rep = laue.map_to_asu(v)
    G = __import__("diffuse_cli.symmetry", fromlist=["x"]).reciprocal_metric(uc)
    h = rep / 2.0
    in_res = np.einsum("ni,ij,nj->n", h, G, h) <= 1 / d_min**2
    u = rep + off
    in_grid = np.all((u >= 0) & (u < np.asarray(grid.shape)), axis=1)
    expect = np.where(in_res & in_grid, np.ravel_multi_index(tuple(np.clip(u, 0, np.asarray(grid.shape) - 1).T), grid.shape), -1)
    assert in_res.sum() > 500
    np.testing.assert_array_equal(lut, expect)


# ---------------------------------------------------------------- ambiguity at scale

FLIP = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])  # (h,k,l) -> (k,h,-l), not in 4/m


def _flipped_stills(tetragonal, n, photons, seed):
    uc, d_min, grid, laue, truth = tetragonal
    rng = np.random.default_rng(seed)
    flipped = np.flatnonzero(rng.random(n) < 0.3)
    stills = make_stills(truth, grid, uc, n, seed=seed, n_side=30, photons=photons,
                         flip={int(i): FLIP for i in flipped})
    expected = np.zeros(n, dtype=np.int64)
    expected[flipped] = 1
    return stills, expected


def test_reference_correlations_equal_explicit_leave_one_out():
    from diffuse_cli.ambiguity import FeatureStore, reference_correlations

    rng = np.random.default_rng(5)
    n, k, V = 40, 2, 60
    features = []
    for _ in range(n):
        f = []
        for _a in range(k):
            ids = np.sort(rng.choice(V, rng.integers(5, 30), replace=False))
            vals = rng.normal(size=len(ids))
            vals[0] = 0.0  # an exact zero is still an observed voxel
            f.append((ids, vals))
        features.append(f)
    x = rng.integers(0, k, n)
    use = rng.random(n) < 0.7
    store = FeatureStore.from_features([list(f) for f in features], k, V, block=16)
    assert store.nbytes < 8 * sum(len(i) for f in features for i, _ in f) + 4 * 8 * (n + 3)
    cc, cnt = reference_correlations(store, x, use, min_overlap=3)
    # explicit: per voxel, the mean over the other used stills in their settings
    for i in range(n):
        s, c = np.zeros(V), np.zeros(V)
        for j in np.flatnonzero(use):
            if j != i:
                ids, vals = features[j][x[j]]
                s[ids] += vals
                c[ids] += 1
        for a in range(k):
            ids, z = features[i][a]
            common = c[ids] > 0
            r = s[ids][common] / c[ids][common]
            zc = z[common].astype(np.float32).astype(np.float64)
            want = zc @ r / np.sqrt((zc @ zc) * (r @ r)) if common.sum() >= 3 else 0.0
            assert cnt[i, a] == common.sum()
            assert cc[i, a] == pytest.approx(want, abs=2e-6)


def test_one_sweep_has_a_single_indexing(tetragonal):
    """Frames of one sweep (one group) share their indexing by construction: never reindexed,
    even when their data would prefer another setting."""
    uc, d_min, grid, laue, truth = tetragonal
    flip = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])
    stills = make_stills(truth, grid, uc, 6, seed=12, flip={i: flip for i in (1, 3)})
    res = determine_reindexing(ListSource(stills), ambiguity_operators(uc, laue), uc, d_min=d_min,
                               groups=np.zeros(6, dtype=int))
    assert res["method"] == "single"
    assert not res["assignment"].any() and res["reindex"] == [None] * 6
    # two sweeps are two units: resolved against each other as before
    two = determine_reindexing(ListSource(stills), ambiguity_operators(uc, laue), uc, d_min=d_min,
                               groups=np.array([0, 1, 0, 1, 0, 1]))
    assert two["method"] == "dense"


def test_scalable_resolution_recovers_true_twins(tetragonal):
    uc, d_min, grid, laue, truth = tetragonal
    stills, expected = _flipped_stills(tetragonal, 3000, photons=10, seed=21)
    res = determine_reindexing(ListSource(stills), ambiguity_operators(uc, laue), uc, d_min=d_min,
                               dense_max=1000, subset=300)
    assert res["method"] == "reference"
    assert res["info"]["converged"]
    # features: 8 bytes per stored (still, operator, voxel), no float64 copy
    n_obs_voxels = sum(len(s["I"]) for s in stills)  # an upper bound of the coarse voxels hit
    assert res["info"]["feature_bytes"] < 2 * 8 * n_obs_voxels
    wrong = res["assignment"] != expected
    assert wrong.mean() < 0.01
    # the few misses are stills that the coarse features themselves cannot decide:
    # against the mean of all other stills in their TRUE settings they also
    # prefer the wrong operator (so neither the subset nor the passes lost them)
    from diffuse_cli.ambiguity import FeatureStore, ambiguity_grid, reference_correlations, still_features

    amb = ambiguity_operators(uc, laue)
    cgrid, lut, shells = ambiguity_grid(laue, uc, d_min)
    feats = [still_features(s["hkl"].astype(np.float64), s["I"], amb, cgrid, lut, shells)
             for s in stills]
    store = FeatureStore.from_features(feats, amb.n, cgrid.n_voxels)
    cc, _ = reference_correlations(store, expected, np.ones(len(stills), dtype=bool))
    decidable = np.argmax(cc, axis=1) == expected
    assert decidable.mean() > 0.99
    np.testing.assert_array_equal(res["assignment"][decidable], expected[decidable])


def test_scalable_resolution_equals_dense(tetragonal):
    uc, d_min, grid, laue, truth = tetragonal
    stills, expected = _flipped_stills(tetragonal, 400, photons=50, seed=22)
    amb = ambiguity_operators(uc, laue)
    dense = determine_reindexing(ListSource(stills), amb, uc, d_min=d_min)
    scalable = determine_reindexing(ListSource(stills), amb, uc, d_min=d_min, dense_max=100,
                                    subset=100)
    assert dense["method"] == "dense" and scalable["method"] == "reference"
    np.testing.assert_array_equal(dense["assignment"], expected)
    np.testing.assert_array_equal(scalable["assignment"], dense["assignment"])
    assert [r is None for r in scalable["reindex"]] == [r is None for r in dense["reindex"]]
