"""Honest merge statistics: CC½ by blocks of rotation, and the Friedel CC.

Truth is analytic: a map with I(h) = I(−h) must give a Friedel CC near its
CC½, a map with an odd part (I(h) − I(−h) = 2·a(h)) must give the CC that
follows from the known even and odd variances; block halves never split a
block.
"""

from __future__ import annotations

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import ListSource, half_assignment, scale_and_merge, shell_statistics
from diffuse_cli.symmetry import LaueSymmetry, grid_asu_map

CELL = (30.0, 34.0, 38.0, 90.0, 90.0, 90.0)


def _stills(odd_amplitude: float, n_stills=24, n_obs=40_000, seed=3):
    """Stills observing I(h) = even(h) + odd_amplitude·odd(h) with small noise."""
    rng = np.random.default_rng(seed)
    k = np.array([0.31, -0.47, 0.23])

    def truth(hkl):
        # even part invariant under every sign change of h, k, l (Laue mmm)
        h, kk, l = hkl.T
        even = 100.0 + 30.0 * np.cos(0.9 * h) * np.cos(0.7 * kk) + 20.0 * np.cos(1.1 * l)
        odd = np.sin(hkl @ k * 1.7)
        return even + odd_amplitude * odd

    stills = []
    for _ in range(n_stills):
        hkl = rng.uniform(-6.0, 6.0, size=(n_obs, 3))
        hkl = np.rint(hkl * 2) / 2  # voxel centres at ndiv=2
        I = truth(hkl) + rng.normal(0, 1.0, n_obs)
        stills.append({"hkl": hkl, "I": I, "sigma": np.ones(n_obs)})
    return stills


def _merge(stills, symbol="P1"):
    grid = HKLGrid(2, 6)
    laue = LaueSymmetry(symbol)
    return scale_and_merge(ListSource(stills), grid, laue, CELL, d_min=None, scale=False, friedel=True)


def test_hand_marks_each_side_of_an_orbit():
    grid = HKLGrid(1, 3)
    for symbol in ("P1", "P222", "P4", "P6"):
        laue = LaueSymmetry(symbol)
        lut, hand = grid_asu_map(grid, laue, return_hand=True)
        assert np.array_equal(lut, grid_asu_map(grid, laue))
        offset = 3
        v = np.stack(np.unravel_index(np.arange(grid.n_voxels), grid.shape), -1) - offset
        minus = ((-v + offset) * np.array([grid.shape[1] * grid.shape[2], grid.shape[2], 1])).sum(1)
        acentric = hand != 0
        # h and −h sit on opposite sides; centric voxels have both
        assert np.all(hand[acentric] == -hand[minus[acentric]])
        assert hand[np.flatnonzero(np.all(v == 0, axis=1))[0]] == 0
        # the proper rotations alone never take h to −h for a general (acentric) index
        general = np.all(v != 0, axis=1) & (np.abs(v).sum(1) % 2 == 1)
        if symbol == "P1":
            assert np.all(acentric[general])


@pytest.mark.parametrize("symbol", ["P1", "P222"])
def test_friedel_cc_of_a_centrosymmetric_map_equals_cc_half(symbol):
    sym = _merge(_stills(0.0), symbol)
    stats = shell_statistics(sym.merged, CELL, n_shells=1)["overall"]
    assert stats["n_friedel"] > 500
    assert stats["cc_friedel"] > 0.99
    assert stats["cc_friedel"] == pytest.approx(stats["cc_half"], abs=0.01)


def test_friedel_cc_sees_an_odd_part():
    odd = _merge(_stills(40.0), "P1")
    stats_odd = shell_statistics(odd.merged, CELL, n_shells=1)["overall"]
    # I± = E ± a with var(E) = 30²/4 + 20²/2, var(a) = 40²/2: CC = (vE − va)/(vE + va)
    vE, va = 30.0**2 / 4 + 20.0**2 / 2, 40.0**2 / 2
    assert stats_odd["cc_friedel"] == pytest.approx((vE - va) / (vE + va), abs=0.06)
    # CC½ hardly sees it: each half merges h with −h (Laue group), the odd part averages out
    assert stats_odd["cc_half"] > 0.9


def test_block_halves_keep_blocks_together():
    blocks = np.repeat(np.arange(9), 5)  # 9 blocks of 5 frames
    half = half_assignment(len(blocks), seed=4, blocks=blocks)
    for b in range(9):
        assert len(set(half[blocks == b])) == 1
    assert sorted(np.bincount(half[::5])) == [4, 5]
    # stills: every still its own block, equal halves
    assert np.bincount(half_assignment(10, seed=1)).tolist() == [5, 5]


def test_half_blocks_follow_the_rotation_angle():
    from dxtbx.model import BeamFactory, Crystal, DetectorFactory, GoniometerFactory, ScanFactory
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    from diffuse_cli.command_line.merge import _half_blocks

    scan = ScanFactory.make_scan((101, 140), [0.1] * 40, (30.0, 0.5), list(range(40)), deg=True)
    expt = Experiment(beam=BeamFactory.simple(1.0),
                      detector=DetectorFactory.simple("PAD", 100, (50, 50), "+x", "-y", (0.1, 0.1), (1000, 1000)),
                      goniometer=GoniometerFactory.known_axis((1, 0, 0)), scan=scan,
                      crystal=Crystal((30, 0, 0), (0, 34, 0), (0, 0, 38), space_group_symbol="P1"))
    experiments = ExperimentList([expt])
    frames = list(range(100, 140))  # absolute array indices of images 101..140
    labels = _half_blocks(experiments, [0] * 40, frames, 5.0)
    # 0.5° frames, 5° blocks: frames 0-9 in the first block, 10-19 in the next...
    assert len(set(labels)) == 4
    assert np.all(np.diff(labels) >= 0)
    assert len(set(labels[:10])) == 1 and labels[9] != labels[10]
