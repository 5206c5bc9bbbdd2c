"""diffuse.merge's richer scaling model (absorption, detector response, offset) on synthetic stills.

The truth is analytic: stills are Ewald slices of a known Laue-symmetric map
on a flat two-panel detector (beam along −z), and each observation is

    I = a_i(u, v) · d(panel, x, y) · b_i · (I_true(h) + c_i(|s|)) + noise

with a per-still absorption surface over the ŝ1 direction (u, v), a smooth
detector response with different panel gains, a per-still scale b_i and an
additive background drift c_i(|s|). The merge must recover each term within
2 % rms over its surface, up to the gauge freedoms docs/merge.md states (one
overall scale; the static part of the absorption belongs to d; the mean
offset belongs to the map), which the truth here satisfies by construction.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import ListSource, scale_and_merge, voxel_flat
from diffuse_cli.scaling import ScaleModel
from diffuse_cli.scaling_terms import ScalingTerms, TermSettings
from diffuse_cli.symmetry import LaueSymmetry, b_matrix
from test_merge_common import random_rotations, symmetric_truth

UC = (20.0, 20.0, 30.0, 90, 90, 90)
D_MIN = 2.0
WAVELENGTH = 1.0
DISTANCE = 100.0  # mm
N_FAST, N_SLOW = 45, 90  # per panel; two panels side by side
HALF_WIDTH = 36.0  # mm
GAINS = (1.0, 0.92)
N_STILLS = 30
ABS_SMOOTH = 30.0


def _detector():
    """Lab coordinates (mm), panel, fast, slow of every pixel of two panels (left, right)."""
    px = HALF_WIDTH / N_FAST
    fast, slow = np.meshgrid(np.arange(N_FAST), np.arange(N_SLOW))
    fast, slow = fast.ravel(), slow.ravel()
    out = []
    for p in range(2):
        x = -HALF_WIDTH + p * HALF_WIDTH + (fast + 0.5) * px
        y = -HALF_WIDTH + (slow + 0.5) * (2 * HALF_WIDTH / N_SLOW)
        lab = np.stack([x, y, np.full_like(x, -DISTANCE)], axis=1)
        out.append((lab, np.full(fast.size, p), fast, slow))
    return [np.concatenate([o[k] for o in out]) for k in range(4)]


def true_detector(panel, fast, slow):
    tx = (fast + 0.5) / N_FAST
    ty = (slow + 0.5) / N_SLOW
    return np.asarray(GAINS)[panel] * (1 + 0.05 * (2 * tx - 1)) * (1 + 0.04 * np.cos(np.pi * ty))


def true_absorption(coef, uv):
    """exp(α u + β v + γ (u² + v² − 0.05)) with u, v the lab x, y of ŝ1."""
    u, v = uv[:, 0] / 0.3, uv[:, 1] / 0.3
    return np.exp(coef[0] * u + coef[1] * v + coef[2] * (u * u + v * v - 1.0))


def true_offset(delta, s):
    return delta * (0.4 + 0.6 * s / (1 / D_MIN))


def make_synthetic(n_blobs=12, absorption=True, offset=True, photons=3000.0, n_stills=N_STILLS, iso=1.0,
                   ndiv=2, offset_rms=0.25, rotations=None, pixels=None):
    """``rotations`` (n_stills, 3, 3): the crystal orientations (default: random);
    ``pixels``: boolean mask over the detector pixels, True = observed (default: all)."""
    rng = np.random.default_rng(11)
    grid = HKLGrid.for_resolution(ndiv, UC, D_MIN)
    laue = LaueSymmetry("P4")
    truth = symmetric_truth(grid, laue, UC, n_blobs=n_blobs, seed=4, iso=iso)
    lab, panel, fast, slow = _detector()
    if pixels is not None:
        lab, panel, fast, slow = lab[pixels], panel[pixels], fast[pixels], slow[pixels]
    s1 = lab / np.linalg.norm(lab, axis=1, keepdims=True) / WAVELENGTH
    s0 = np.array([0.0, 0.0, -1.0 / WAVELENGTH])
    q = s1 - s0
    s = np.linalg.norm(q, axis=1)
    uv = (s1 * WAVELENGTH)[:, :2]
    det = true_detector(panel, fast, slow)
    B = b_matrix(UC)
    U = random_rotations(n_stills, 7) if rotations is None else np.asarray(rotations)
    b = rng.uniform(0.6, 1.6, n_stills)
    coef = rng.normal(0, 1, (n_stills, 3)) * [0.06, 0.06, 0.0]
    coef -= coef.mean(axis=0)  # geometric mean over stills 1 at every direction
    delta = rng.normal(0, 0.25, n_stills) * (offset_rms / 0.25)
    delta -= delta.mean()  # the mean offset is part of the map
    coef *= absorption
    delta *= offset
    stills = []
    for i in range(n_stills):
        hkl = q @ np.linalg.inv(U[i] @ B).T
        flat, inside = voxel_flat(grid, hkl)
        t = truth.ravel()[flat[inside]]
        mu = true_absorption(coef[i], uv[inside]) * det[inside] * b[i] * (t + true_offset(delta[i], s[inside]))
        sig = np.sqrt(mu / photons)
        stills.append({
            "hkl": hkl[inside], "I": mu + rng.normal(0, 1, mu.size) * sig, "sigma": sig,
            "s1_xy": uv[inside].astype(np.float32), "panel": panel[inside], "fast": fast[inside],
            "slow": slow[inside], "panel_shapes": np.array([[N_SLOW, N_FAST]] * 2),
        })
    return {"grid": grid, "laue": laue, "truth": truth, "stills": stills, "b": b, "coef": coef,
            "delta": delta, "uv": uv, "s": s, "det": det, "panel": panel, "fast": fast, "slow": slow}


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic()


def full_terms(absorption=True, detector=True, offset=True):
    return ScalingTerms(ScaleModel(1, d_star_sq_max=1 / D_MIN**2),
                        absorption=TermSettings(absorption, 5, ABS_SMOOTH), detector=TermSettings(detector, 6, 1.0),
                        offset=TermSettings(offset, 6, 1.0))


@pytest.fixture(scope="module")
def merged_full(synthetic):
    sy = synthetic
    res = scale_and_merge(ListSource(sy["stills"]), sy["grid"], sy["laue"], UC, d_min=D_MIN,
                          model=full_terms(), max_iterations=14, tolerance=1e-3)
    vox = res.merged.asu_voxels()
    good = np.isfinite(res.merged.I[vox]) & (res.merged.counts[vox] >= 3)
    m, t = res.merged.I[vox][good], sy["truth"].ravel()[vox][good]
    K = float(np.dot(m, t) / np.dot(t, t))  # merged = K · truth (the free overall scale)
    return res, K


def _rms_ratio(rec, true):
    r = rec / true
    return float(np.sqrt(np.mean((r / r.mean() - 1) ** 2)))


def test_full_model_converges(merged_full):
    res, _ = merged_full
    assert res.converged, res.history
    assert res.history[-1] < 1e-3


def test_detector_response_recovered(synthetic, merged_full):
    sy = synthetic
    res, _ = merged_full
    terms = res.terms
    co = terms.coordinates({"panel": sy["panel"], "fast": sy["fast"], "slow": sy["slow"], "s1_xy": sy["uv"]},
                           np.zeros(sy["panel"].size))
    err = _rms_ratio(terms.detector_factor(co), sy["det"])
    assert err < 0.02, err
    # the panel gains, which no smooth absorption can mimic, come out
    d = terms.detector_factor(co)
    ratio = np.mean(d[sy["panel"] == 1] / sy["det"][sy["panel"] == 1]) / np.mean(
        d[sy["panel"] == 0] / sy["det"][sy["panel"] == 0])
    assert abs(ratio - 1) < 0.01


def test_absorption_surfaces_recovered(synthetic, merged_full):
    sy = synthetic
    res, _ = merged_full
    terms = res.terms
    errs = []
    for i, st in enumerate(sy["stills"]):
        co = terms.coordinates(st, np.zeros(len(st["I"])))
        a = np.einsum("nk,nk->n", terms.alpha[i][co["a_idx"]], co["a_w"])
        errs.append(_rms_ratio(a, true_absorption(sy["coef"][i], st["s1_xy"].astype(float))))
    assert np.sqrt(np.mean(np.square(errs))) < 0.02, errs
    assert max(errs) < 0.03, errs


def test_offset_drift_and_scales_recovered(synthetic, merged_full):
    sy = synthetic
    res, K = merged_full
    terms = res.terms
    s = np.linspace(0.1, 1 / D_MIN, 50)
    rec = np.array([terms.offset_at(terms.kappa[i], s) for i in range(N_STILLS)]) / K
    true = np.array([true_offset(d, s) for d in sy["delta"]])
    err = float(np.sqrt(np.mean((rec - true) ** 2)) / np.sqrt(np.mean(true**2)))
    assert err < 0.02, err
    # per-still scale: g_i · mean(a_i) · K ∝ b_i (the absorption nodes have mean 1)
    g = res.params[:, 0] * K
    assert _rms_ratio(g, sy["b"]) < 0.01


def test_map_recovered_and_simple_model_worse(synthetic, merged_full):
    sy = synthetic
    res, K = merged_full
    simple = scale_and_merge(ListSource(sy["stills"]), sy["grid"], sy["laue"], UC, d_min=D_MIN,
                             model=ScaleModel(1, d_star_sq_max=1 / D_MIN**2), max_iterations=8)

    def rel_err(merged):
        vox = merged.asu_voxels()
        good = np.isfinite(merged.I[vox]) & (merged.counts[vox] >= 3)
        m, t = merged.I[vox][good], sy["truth"].ravel()[vox][good]
        k = float(np.dot(m, t) / np.dot(t, t))
        return float(np.sqrt(np.mean((m / k - t) ** 2)) / np.sqrt(np.mean(t**2)))

    full_err, simple_err = rel_err(res.merged), rel_err(simple.merged)
    assert full_err < 0.01, full_err
    assert simple_err > 2 * full_err, (simple_err, full_err)


def test_each_term_plotted(merged_full, tmp_path):
    from diffuse_cli.scaling_plots import plot_terms

    res, _ = merged_full
    names = plot_terms(res.terms, str(tmp_path))
    assert sorted(names) == ["scaling_absorption.png", "scaling_detector.png", "scaling_offset.png",
                             "scaling_scale.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


def test_scaling_model_parameter_selects_terms():
    from diffuse_cli.command_line.merge import phil_scope, scaling_model

    def params(*args):
        from libtbx.phil import parse

        return phil_scope.fetch(sources=[parse(a) for a in args]).extract().scaling

    assert isinstance(scaling_model(params(), 2.0), ScaleModel)  # the default stays simple
    full = scaling_model(params("scaling.model=full"), 2.0)
    assert isinstance(full, ScalingTerms) and full.n_a == 25 and full.n_d == 36 and full.n_c == 8
    only = scaling_model(params("scaling.offset.enable=True"), 2.0)
    assert only.n_c == 8 and only.n_a == 0 and only.n_d == 0
    none = scaling_model(params("scaling.model=full", "scaling.absorption.enable=False",
                                "scaling.detector.enable=False", "scaling.offset.enable=False"), 2.0)
    assert isinstance(none, ScaleModel)


# ---------------------------------------------------------------- convergence with few stills
#
# Fitted against a map that holds its own observations, a still's scale is pulled
# back toward its previous value by its own share of each voxel; with few stills on
# a fine grid that share is most of the weight and the passes crawl. The fits use
# the map without the still (scaling.leave_one_out) and keep 1/n of the previous
# value (scaling.relax), docs/merge.md "Scaling".


def test_leave_one_out_equals_the_map_of_the_other_stills(synthetic):
    """The reference without still 0, from the map of stills 0–2, is the map of stills 1–2."""
    from diffuse_cli.scaling import leave_one_out

    sy = synthetic
    st = sy["stills"][:3]
    kw = dict(d_min=D_MIN, scale=False)
    all3 = scale_and_merge(ListSource(st), sy["grid"], sy["laue"], UC, **kw).merged
    others = scale_and_merge(ListSource(st[1:]), sy["grid"], sy["laue"], UC, **kw).merged
    s0 = st[0]
    ref, var, usable = leave_one_out(all3, sy["grid"], s0["hkl"], s0["I"], s0["sigma"], 1.0, min_counts=1)
    flat, inside = voxel_flat(sy["grid"], s0["hkl"])
    truth = np.full(len(flat), np.nan)
    truth[inside] = others.gather(flat[inside])
    rep = np.where(inside, all3.lut[np.where(inside, flat, 0)], -1)
    sig_o = np.full(len(flat), np.nan)
    sig_o[rep >= 0] = others.sigma[others.lut[flat[rep >= 0]]]
    assert usable.sum() > 0.3 * len(flat)
    assert np.allclose(ref[usable], truth[usable], rtol=1e-5)
    assert np.allclose(np.sqrt(var[usable]), sig_o[usable], rtol=1e-5)
    # where only still 0 measured the voxel there is no reference
    assert not np.any(usable & ~np.isfinite(truth))


@pytest.fixture(scope="module")
def no_absorption():
    return make_synthetic(absorption=False, offset=False)


def test_three_stills_converge_to_their_scales(no_absorption):
    """3 stills on a grid where each still holds most of its voxels: converged in half the default
    passes, scales ∝ the injected b (the detector response is the same for every still)."""
    sy = no_absorption
    res = scale_and_merge(ListSource(sy["stills"][:3]), sy["grid"], sy["laue"], UC, d_min=D_MIN,
                          model=ScaleModel(1, d_star_sq_max=1 / D_MIN**2), max_iterations=5, tolerance=1e-3)
    assert res.converged, res.history
    assert _rms_ratio(res.params[:, 0], sy["b"][:3]) < 0.01


# ---------------------------------------------------------------- identifiability of the offset
#
# Where the reference is (nearly) a function of |s| alone, g·(I_ref + c) = g'·(I_ref + c') for a
# whole family of (g, c): the split between scale and offset is not fixed by the data.
# scaling_priors.offset_prior puts a zero-mean prior on exactly the offset modes that keep less than
# OFFSET_INFORMATION_FLOOR of their information once g (and a) are free (docs/merge.md).

def _radial_still(contrast, seed=3, n=4000, n_c=4, s_max=0.5):
    """One still's pixels: reference F(|s|)·(1 + contrast·u), data 1.3·(reference + c); F and c are
    linear in |s| (so that no curvature prior fixes the split either)."""
    rng = np.random.default_rng(seed)
    terms = ScalingTerms(ScaleModel(1, d_star_sq_max=s_max**2), offset=TermSettings(True, n_c, 1.0))
    s = rng.uniform(0.02, s_max, n)
    co = terms.coordinates({}, s * s)
    X = np.zeros((n, n_c))
    for k in range(2):
        X[np.arange(n), co["c_idx"][:, k]] += co["c_w"][:, k]
    ref = X @ np.array([10.0, 8.0, 6.0, 4.0]) * (1 + contrast * rng.uniform(-1, 1, n))
    mu = 1.3 * (ref + X @ np.array([0.5, 0.4, 0.3, 0.2]))
    sig = np.sqrt(mu / 50)
    return terms, co, X, ref, mu, mu + rng.normal(0, 1, n) * sig, sig


def _generalised_eigenvalues(M, blk, M_ref=None):
    """μ of S u = μ M_cc u, S the information on c with the rest free = inverse of (M⁻¹)_cc
    (M_cc of ``M_ref`` if given: the information with the rest fixed, before a prior)."""
    S = np.linalg.inv(np.linalg.inv(M)[blk, blk])
    L = np.linalg.cholesky((M if M_ref is None else M_ref)[blk, blk])
    Li = np.linalg.inv(L)
    return np.linalg.eigvalsh(Li @ S @ Li.T)


def test_offset_prior_lifts_only_the_modes_the_scale_can_mimic():
    from diffuse_cli.scaling_priors import offset_prior
    from diffuse_cli.scaling_terms import OFFSET_INFORMATION_FLOOR

    blk = slice(1, 5)
    for contrast, n_lifted in ((0.0, 1), (0.5, 0)):
        _, _, X, ref, mu, _, sig = _radial_still(contrast)
        J = np.column_stack([ref + 0 * X[:, 0], 1.3 * X])  # ∂μ/∂g, ∂μ/∂κ at g = 1.3, c = 0
        M = (J / sig[:, None] ** 2).T @ J + 1e-9 * np.eye(5)
        before = _generalised_eigenvalues(M, blk)
        P, mu_min = offset_prior(M, blk, OFFSET_INFORMATION_FLOOR)
        assert mu_min == pytest.approx(before.min(), abs=1e-4)
        assert np.sum(before < OFFSET_INFORMATION_FLOOR) == n_lifted
        if not n_lifted:  # a still whose contrast fixes the split is untouched
            assert np.all(P == 0)
            continue
        assert before.min() < 1e-4  # the exactly radial reference: g and one c mode degenerate
        M2 = M.copy()
        M2[blk, blk] += P
        assert np.linalg.matrix_rank(P, tol=1e-9 * np.abs(P).max()) == 1
        after = _generalised_eigenvalues(M2, blk, M)  # against the information without the prior
        assert after.min() >= OFFSET_INFORMATION_FLOOR * (1 - 1e-6)
        # the modes above the floor keep their information on c: M2's eigenvalues above it are M's
        assert np.allclose(np.sort(after)[1:], np.sort(before)[1:], rtol=1e-3)  # (M near-singular)


@pytest.mark.parametrize("floor", [0.0, None])
def test_scale_offset_split_on_a_radial_map_is_identifiable(monkeypatch, floor):
    """On an exactly radial reference, the fit from two starting scales must agree with the prior
    (the offset mode that g mimics goes to 0, g takes it); without it (floor 0) it depends on the
    start or fails. The prediction g·(I_ref + c) is then right."""
    import diffuse_cli.scaling_terms as scaling_terms

    if floor is not None:
        monkeypatch.setattr(scaling_terms, "OFFSET_INFORMATION_FLOOR", floor)
    terms, co, _, ref, mu, I, sig = _radial_still(0.0)
    g, pred, ok = [], [], []
    for g0 in (1.0, 1.5):
        terms.start(1)
        terms.g[0] = g0
        fit = terms.fit_still(0, I, sig, ref, co)
        ok.append(fit.ok)
        g.append(fit.params[0])
        pred.append(fit.params[0] * (ref + terms.offset_at(fit.offset, np.sqrt(co["dss"]))))
    if floor is None:
        assert all(ok) and abs(g[1] / g[0] - 1) < 1e-3, g
        for p in pred:
            assert np.sqrt(np.mean((p / mu - 1) ** 2)) < 0.01
    else:
        assert not all(ok) or abs(g[1] / g[0] - 1) > 0.01, g


# ---------------------------------------------------------------- identifiability of the detector response
#
# A detector node whose support the data barely cover (beyond d_min, a panel edge) is not fixed by the
# data; the curvature prior extrapolated it from its neighbours, and on the 5-frame nuclease sweep that
# edge flipped by ±2 % every pass. scaling_priors.detector_floor holds such nodes at 1 with a prior that
# makes up their missing information (docs/merge.md, "d ↔ nothing").

def _detector_solve(monkeypatch, floor, first_row=20):
    """d solved from one still of noise-free data d_true·h on the two panels, no pixels with slow < first_row."""
    import diffuse_cli.detector_response as detector_response

    monkeypatch.setattr(detector_response, "DETECTOR_INFORMATION_FLOOR", floor)
    lab, panel, fast, slow = _detector()
    keep = slow >= first_row
    lab, panel, fast, slow = lab[keep], panel[keep], fast[keep], slow[keep]
    s1 = lab / np.linalg.norm(lab, axis=1, keepdims=True) / WAVELENGTH
    s = np.linalg.norm(s1 - np.array([0.0, 0.0, -1.0 / WAVELENGTH]), axis=1)
    obs = {"panel": panel, "fast": fast, "slow": slow, "panel_shapes": np.array([[N_SLOW, N_FAST]] * 2)}
    terms = ScalingTerms(ScaleModel(1, d_star_sq_max=1 / D_MIN**2), detector=TermSettings(True, 6, 1.0))
    terms.start(1)
    terms.observe(obs)
    terms.finish_setup()
    co = terms.coordinates(obs, s * s)
    h = 1 + 0.5 * np.random.default_rng(2).random(len(s))
    d_true = 1 + 0.1 * (2 * (slow + 0.5) / N_SLOW - 1)  # a tilt along slow: planes are free of the curvature prior
    terms._add_detector(co, h, d_true * h, np.ones(len(s)))
    N = terms._dN.reshape(2, 36, 36).copy()
    return terms._solve_detector().reshape(2, 6, 6), N


def test_detector_floor_lifts_only_nodes_without_data(monkeypatch):
    from diffuse_cli.scaling_priors import detector_floor

    for first_row, lifted_rows in ((0, ()), (20, (0,))):
        _, N = _detector_solve(monkeypatch, 0.1, first_row)
        lift = detector_floor(N, 6, 0.1).reshape(2, 6, 6)
        diag = np.einsum("pkk->pk", N).reshape(2, 6, 6)
        for r in range(6):
            if r in lifted_rows:  # no pixel in its support: the prior supplies the floor itself
                assert np.all(diag[:, r] == 0)
                w = np.array([0.5, 1, 1, 1, 1, 0.5])
                expected = 0.1 * 0.5 * w * diag.sum() / (2 * 25.0)  # c_k = ½·w_x (edge row), Σc = 25
                assert np.allclose(lift[:, r], expected, rtol=1e-9)
            else:  # corners and edges of a covered panel hold ¼ and ½ of an interior node: no prior
                assert np.all(lift[:, r] == 0), (first_row, r)


def test_detector_nodes_without_data_are_held_not_extrapolated(monkeypatch):
    held, _ = _detector_solve(monkeypatch, 0.1)
    extrapolated, _ = _detector_solve(monkeypatch, 0.0)
    # the empty edge row: without the floor the tilt is extrapolated into it (≈ 0.86), with it d stays nearer 1
    assert np.all(np.abs(extrapolated[:, 0] - 1) > 0.05)
    assert np.all(np.abs(held[:, 0] - 1) < 0.55 * np.abs(extrapolated[:, 0] - 1))
    # the nodes that the data cover are (nearly) unchanged
    assert np.max(np.abs(held[:, 2:] / extrapolated[:, 2:] - 1)) < 0.005
