"""Merging Poisson data at a few counts per pixel without bias.

Weights from each observation's own counts (σ² = counts) favour pixels that
fluctuated low: weighted means and per-still scales come out low by about
1/counts, and pixels with zero counts (σ = 0) get infinite weight or are
dropped. diffuse.merge weights by the variance expected from the model when
the observations carry ``variance_per_intensity`` (diffuse.correct's do).
"""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import ListSource, scale_and_merge
from diffuse_cli.symmetry import LaueSymmetry
from test_merge_common import detector_q, random_rotations, symmetric_truth
from diffuse_cli.symmetry import b_matrix
from diffuse_cli.merging import voxel_flat

UC = (20.0, 20.0, 30.0, 90, 90, 90)
D_MIN = 2.0
PHOTONS = 3.0  # expected counts per unit intensity: ~1-10 counts per pixel


def _poisson_stills(truth, grid, scales, seed, with_model: bool):
    rng = np.random.default_rng(seed)
    q = detector_q(120)
    B = b_matrix(UC)
    U = random_rotations(len(scales), seed + 1)
    stills = []
    for i, k in enumerate(scales):
        hkl = q @ np.linalg.inv(U[i] @ B).T
        flat, inside = voxel_flat(grid, hkl)
        hkl, flat = hkl[inside], flat[inside]
        counts = rng.poisson(k * truth.ravel()[flat] * PHOTONS)
        obs = {"hkl": hkl, "I": counts / PHOTONS, "sigma": np.sqrt(counts) / PHOTONS}
        if with_model:
            obs["variance_per_intensity"] = np.full(len(counts), 1.0 / PHOTONS)
        stills.append(obs)
    return stills


@pytest.fixture(scope="module")
def setup():
    grid = HKLGrid.for_resolution(2, UC, D_MIN)
    laue = LaueSymmetry("P4")
    truth = symmetric_truth(grid, laue, UC, seed=1)
    scales = np.random.default_rng(2).uniform(0.5, 2.0, 30)
    return grid, laue, truth, scales


def _run(setup, with_model):
    grid, laue, truth, scales = setup
    stills = _poisson_stills(truth, grid, scales, 9, with_model)
    res = scale_and_merge(ListSource(stills), grid, laue, UC, d_min=D_MIN, tolerance=1e-4)
    ratio = res.params[:, 0] / scales
    merged = res.merged.expand()
    use = (res.merged.expand(res.merged.counts.astype(float), fill=0) >= 20) & np.isfinite(truth)
    # the overall factor is free: compare the map and scales after fixing it by the scales
    overall = np.exp(np.mean(np.log(ratio)))
    bias = np.sum(merged[use] * overall) / np.sum(truth[use]) - 1
    return ratio / overall, bias


def test_model_weights_recover_scales_and_unbiased_map(setup):
    ratio, bias = _run(setup, with_model=True)
    assert np.max(np.abs(ratio - 1)) < 0.02, ratio
    assert abs(bias) < 0.01, bias


def test_count_weights_are_biased_at_low_counts(setup):
    """The failure the model weights repair: the merged map comes out low by ~1/counts."""
    ratio, bias = _run(setup, with_model=False)
    assert bias < -0.05, bias
