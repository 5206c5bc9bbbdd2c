"""Convergence of diffuse.merge's scaling passes on weakly coupled groups of stills
(merge_passes.PassAcceleration; docs/merge.md, "Acceleration"), against simulated stills
with known scales: K tight clusters of stills (one orientation each, 0.3° rms jitter),
whose Ewald slices overlap little between clusters, as in the XFEL benchmark."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import ListSource, scale_and_merge, voxel_flat
from diffuse_cli.symmetry import LaueSymmetry, b_matrix
from test_merge_common import detector_q, symmetric_truth

UC = (20.0, 20.0, 30.0, 90, 90, 90)
D_MIN = 2.0
K, PER_CLUSTER = 3, 4  # clusters, stills per cluster
PHOTONS = 1000.0
TOL = 1e-3


def clustered_stills(grid, truth, scales, seed, photons=PHOTONS):
    """Ewald-slice stills, still i in cluster i % K: I = k_i·truth(voxel) + Poisson noise
    (``photons`` per unit intensity)."""
    rng = np.random.default_rng(11)  # orientations: the same for every noise realisation
    base = Rotation.random(K, random_state=2)
    n = len(scales)
    jitter = Rotation.from_rotvec(np.deg2rad(0.3) * rng.normal(size=(n, 3)) / np.sqrt(3))
    q, B, flat_truth = detector_q(120), b_matrix(UC), truth.ravel()
    noise = np.random.default_rng(seed)
    stills = []
    for i in range(n):
        U = (jitter[i] * base[i % K]).as_matrix()
        hkl = q @ np.linalg.inv(U @ B).T
        flat, inside = voxel_flat(grid, hkl)
        counts = noise.poisson(scales[i] * flat_truth[flat[inside]] * photons)
        stills.append({"hkl": hkl[inside], "I": counts / photons, "sigma": np.sqrt(np.maximum(counts, 1)) / photons})
    return stills


@pytest.fixture(scope="module")
def case():
    grid = HKLGrid.for_resolution(2, UC, D_MIN)
    laue = LaueSymmetry("P4")
    truth = symmetric_truth(grid, laue, UC, seed=1)
    k = np.random.default_rng(5).uniform(0.5, 2.0, K * PER_CLUSTER)
    return grid, laue, truth, k


def _run(grid, laue, stills, **kw):
    return scale_and_merge(ListSource(stills), grid, laue, UC, d_min=D_MIN, tolerance=TOL, **kw)


def test_weakly_coupled_clusters_converge_fast_to_the_plain_fixed_point_and_the_truth(case):
    """Without outlier rejection each pass's map is a function of the scales alone (the setting of
    the Anderson/GMRES argument)."""
    grid, laue, truth, k = case
    stills = clustered_stills(grid, truth, k, seed=0)
    plain = _run(grid, laue, stills, max_iterations=40, acceleration_memory=0, reject_sigma=None)
    fast = _run(grid, laue, stills, max_iterations=10, reject_sigma=None)
    assert plain.converged and fast.converged, (plain.history, fast.history)
    # the case is slow for the plain passes: a slow mode per cluster after the first passes
    ratio = plain.history[-1] / plain.history[-2]
    assert ratio > 0.5 and plain.iterations > 10, plain.history
    # Anderson = GMRES on the linear iteration: one pass of history per slow mode (K − 1 of
    # them: the overall factor is normalised out), ×2 for the nonlinear map (weights ∝ g²),
    # counted from the first slow pass (accelerated steps start there), plus the last pass
    first_slow = 1 + next(j for j in range(1, len(plain.history))
                          if plain.history[j] > 0.5 * plain.history[j - 1])
    assert fast.iterations <= first_slow + 2 * (K - 1) + 1, (fast.history, plain.history)
    # the same fixed point: each run is within tol·λ/(1 − λ) of it (λ: plain's last ratio)
    g_plain, g_fast = plain.params[:, 0], fast.params[:, 0]
    assert np.max(np.abs(np.log(g_fast / g_plain))) < 2 * TOL / (1 - ratio)
    # the truth (geometric mean 1, as the merge normalises), within 5 statistical σ from
    # noise realisations of the same stills, plus the convergence error
    g = [g_fast] + [_run(grid, laue, clustered_stills(grid, truth, k, seed=s), max_iterations=10,
                         reject_sigma=None).params[:, 0] for s in (1, 2, 3, 4, 5)]
    sigma = np.std(np.log(g), axis=0, ddof=1)
    err = np.log(g_fast) - (np.log(k) - np.mean(np.log(k)))
    assert np.all(np.abs(err) < 5 * sigma + TOL / (1 - ratio)), (err, sigma)


def test_with_outlier_rejection_no_more_passes_than_plain_and_the_same_fixed_point(case):
    """Outliers rejected against the previous map give the map memory (not a function of the
    scales alone: before rejection waited for converged scales, the plain passes here wandered
    for 15 passes before settling, 34 passes; accelerated 23); the safeguard (plain step and
    restart whenever the change rose) keeps the accelerated passes at most the plain ones
    (now 17 plain, 8 accelerated, as without rejection)."""
    grid, laue, truth, k = case
    stills = clustered_stills(grid, truth, k, seed=0)
    plain = _run(grid, laue, stills, max_iterations=40, acceleration_memory=0)
    fast = _run(grid, laue, stills, max_iterations=40)
    assert plain.converged and fast.converged, (plain.history, fast.history)
    assert fast.iterations <= plain.iterations
    ratio = plain.history[-1] / plain.history[-2]
    assert np.max(np.abs(np.log(fast.params / plain.params))) < 2 * TOL / (1 - ratio)


def test_strongly_coupled_stills_take_the_plain_passes(case):
    """One cluster (no slow mode): no accelerated step, the passes and scales are the plain ones."""
    grid, laue, truth, k = case
    stills = clustered_stills(grid, truth, k, seed=0)[0::K]
    plain = _run(grid, laue, stills, max_iterations=10, acceleration_memory=0)
    fast = _run(grid, laue, stills, max_iterations=10)
    assert fast.converged and fast.iterations == plain.iterations
    np.testing.assert_array_equal(fast.params, plain.params)


def test_anderson_step_is_gmres_on_a_linear_iteration():
    """On x ← J·x + b with J of three distinct eigenvalues (GMRES converges in three steps in
    exact arithmetic, and Anderson type II with the whole history is GMRES: Walker & Ni 2011),
    the passes reach the fixed point to rounding in 1 + 3 steps; the plain ones need
    log(1e-10)/log(0.8) ≈ 103."""
    from diffuse_cli.merge_passes import PassAcceleration

    rng = np.random.default_rng(0)
    n = 30
    basis = np.linalg.qr(np.column_stack([np.ones(n), rng.normal(size=(n, n - 1))]))[0]  # basis[:, 0] ∝ 1
    eig = np.concatenate([[0.0], np.repeat([0.8, 0.6, 0.05], [3, 6, n - 10])])  # the mean: normalised out
    J = basis @ np.diag(eig) @ basis.T
    b = rng.normal(size=n) * 0.1
    b -= b.mean()
    x_star = np.linalg.solve(np.eye(n) - J, b)
    acc = PassAcceleration(memory=5)
    x = np.zeros(n)
    for _ in range(4):  # a plain step (no history yet), then three accelerated ones
        g = J @ x + b
        change = float(np.max(np.abs(np.exp(g - x) - 1)))
        nxt = acc.step(np.exp(x)[:, None], np.exp(g)[:, None], np.ones(n), change)
        x = g if nxt is None else np.log(nxt[:, 0])
    assert np.max(np.abs(x - x_star)) < 1e-10 * np.max(np.abs(x_star))


# --------------------------------------------------------------- outlier rejection (two phases)
#
# At high signal-to-noise an overlap observation between clusters is many σ from the map while
# the clusters' relative scales are still wrong: rejecting it (map-based rejection, or a zero
# Tukey weight in the fit) cuts the coupling and makes the wrong scales self-consistent (before
# the two phases, 10⁴ photons: cluster scales 23 % and 12 % from the truth). Phase 1 (Huber
# fits, no rejection) converges first; rejection is decided from its converged scales.

TIGHT = 1e-5  # convergence well below the statistical error (≈1e-4 at 10⁴ photons)
N_REALISATIONS = 4


def _truth_error(result, k):
    """log g − log k per still, both at geometric mean 1 (as the merge normalises)."""
    return np.log(result.params[:, 0]) - (np.log(k) - np.mean(np.log(k)))


def _with_variance_model(stills, photons):
    """The stills with a Poisson variance model: var I = I/photons (v1 = 1/photons)."""
    return [dict(s, variance_per_intensity=np.full(len(s["I"]), 1.0 / photons)) for s in stills]


def _noisy(grid, truth, k, seed, photons, variance_model):
    stills = clustered_stills(grid, truth, k, seed=seed, photons=photons)
    return _with_variance_model(stills, photons) if variance_model else stills


@pytest.fixture(scope="module")
def scale_noise(case):
    """Statistical error of each still's log g per (photon level, variance model): spread over
    noise realisations (seeds 1…N) of the same stills."""
    grid, laue, truth, k = case
    out = {}
    for photons in (1e3, 1e4):
        for vm in (False, True):
            err = [_truth_error(_run_tight(grid, laue, _noisy(grid, truth, k, s, photons, vm)), k)
                   for s in range(1, N_REALISATIONS + 1)]
            out[photons, vm] = np.std(err, axis=0, ddof=1)
    return out


def _run_tight(grid, laue, stills, **kw):
    return scale_and_merge(ListSource(stills), grid, laue, UC, d_min=D_MIN, tolerance=TIGHT,
                           max_iterations=40, **kw)


@pytest.mark.parametrize("variance_model", [False, True])
@pytest.mark.parametrize("photons", [1e3, 1e4])
def test_cluster_scales_with_outlier_rejection_are_the_truth_within_the_noise(case, scale_noise, photons,
                                                                             variance_model):
    """Before the two phases (10⁴ photons): 23 % and 12 % from the truth (σ weights), 17 % and
    8.5 % (variance model); the statistical error is ≈1e-4."""
    grid, laue, truth, k = case
    res = _run_tight(grid, laue, _noisy(grid, truth, k, 0, photons, variance_model))
    assert res.converged, res.history
    err, sigma = _truth_error(res, k), scale_noise[photons, variance_model]
    assert np.all(np.abs(err) < 5 * sigma), (err, sigma)
    # the noise itself is Poisson's: ×10 photons, ÷√10 error (the spread is a real scale)
    if photons == 1e4:
        ratio = np.median(scale_noise[1e3, variance_model] / sigma)
        assert 0.5 * np.sqrt(10) < ratio < 2 * np.sqrt(10), ratio


def test_injected_zingers_are_rejected_and_the_map_and_scales_stay_unbiased(case, scale_noise):
    """0.5 % of the pixels of three stills (one per cluster) are zingers (I·30 + 10, σ from their
    counts), at 10⁴ photons: each is left out of the map, nothing else is lost except at their
    own voxels, the map there is the truth within its σ, and the scales are the truth within
    their noise."""
    grid, laue, truth, k = case
    photons = 1e4
    stills = clustered_stills(grid, truth, k, seed=0, photons=photons)
    rng = np.random.default_rng(3)
    zinger_flat = []
    for i in range(K):
        s = stills[i]
        bad = rng.random(len(s["I"])) < 0.005
        I = np.where(bad, s["I"] * 30 + 10, s["I"])
        stills[i] = dict(s, I=I, sigma=np.where(bad, np.sqrt(I * photons) / photons, s["sigma"]))
        flat, inside = voxel_flat(grid, s["hkl"][bad])
        zinger_flat.append(flat[inside])
    res = _run_tight(grid, laue, stills)
    kept = _run_tight(grid, laue, stills, reject_sigma=None)
    assert res.converged, res.history
    assert np.all(np.abs(_truth_error(res, k)) < 5 * scale_noise[photons, False])
    lut = res.merged.lut
    rep = lut[np.concatenate(zinger_flat)]
    rep = rep[rep >= 0]
    n_zingers = np.bincount(rep, minlength=lut.max() + 1)
    lost = kept.merged.counts.ravel() - res.merged.counts.ravel()
    at = np.unique(rep)
    assert np.all(lost[at] >= n_zingers[at])  # every zinger rejected
    others = np.setdiff1d(np.unique(lut[lut >= 0]), at)
    # elsewhere nothing: ~10⁵ observations × P(|z| > 6) ≈ 2·10⁻⁹ for near-Gaussian counts
    assert lost[others].sum() == 0
    c = np.exp(np.mean(np.log(k)))  # the map's scale: stills normalised to a geometric mean of 1
    # at (flat indices of ASU representatives: lut[at] == at) the truth is the voxel's own
    z_rej = (res.merged.I.ravel()[at] - c * truth.ravel()[at]) / res.merged.sigma.ravel()[at]
    z_kept = (kept.merged.I.ravel()[at] - c * truth.ravel()[at]) / kept.merged.sigma.ravel()[at]
    fin = np.isfinite(z_rej)
    assert fin.sum() > 0.5 * len(at)
    assert np.all(np.abs(z_rej[fin]) < 5), z_rej[fin]
    assert np.nanmax(np.abs(z_kept)) > 5  # the zingers, kept, bias the map (the test can fail)
