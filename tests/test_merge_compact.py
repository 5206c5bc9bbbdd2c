"""The merge's compact storage (issue 12): the ASU table without the full-grid int64 map,
the dense outputs made block by block from the ASU voxels, and the shell statistics,
each against an independent or the previous full-grid computation."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli import merge_accumulator as ma
from diffuse_cli import merge_compact as mc
from diffuse_cli.grid import HKLGrid
from diffuse_cli.symmetry import LaueSymmetry, grid_asu_map

CASES = [("P1", (20.0, 22.0, 25.0, 80, 95, 100)), ("P4", (20.0, 20.0, 30.0, 90, 90, 90)),
         ("P6", (25.0, 25.0, 30.0, 90, 90, 120)), ("P212121", (20.0, 24.0, 28.0, 90, 90, 90))]


@pytest.mark.parametrize("symbol,cell", CASES)
def test_compact_asu_equals_the_tables_of_grid_asu_map(symbol, cell):
    grid = HKLGrid.for_resolution(2, cell, 3.0)
    laue = LaueSymmetry(symbol)
    lut, hand = grid_asu_map(grid, laue, cell, d_min=3.0, d_max=15.0, return_hand=True)
    reps, table = mc.compact_tables(lut)
    r2, t2, h2 = mc.compact_asu(grid, laue, cell, d_min=3.0, d_max=15.0, chunk=1000)
    np.testing.assert_array_equal(reps, r2)
    np.testing.assert_array_equal(table, t2)
    np.testing.assert_array_equal(hand, h2)
    assert t2.dtype == np.int32 and mc.compact_asu(grid, laue, cell, d_min=3.0, friedel=False)[2] is None


def _compact_map(symbol, cell, seed=0):
    grid = HKLGrid.for_resolution(2, cell, 3.0)
    laue = LaueSymmetry(symbol)
    reps, _, hand = mc.compact_asu(grid, laue, cell, d_min=3.0)
    rng = np.random.default_rng(seed)
    n = len(reps)
    I = rng.normal(10, 3, n)
    I[rng.random(n) < 0.2] = np.nan
    values = {"I": I, "sigma": rng.uniform(0.5, 2, n), "counts": np.where(np.isfinite(I), rng.integers(1, 9, n), 0),
              "half_I": [(I + rng.normal(0, 1, n)).astype(np.float32) for _ in range(2)],
              "friedel_I": [(I + rng.normal(0, 1, n)).astype(np.float32) for _ in range(2)]}
    return mc.CompactMergedMap(grid, laue, cell, 3.0, None, reps, values, centric=hand[reps] == 0)


@pytest.mark.parametrize("symbol,cell", CASES)
def test_expanded_blocks_equal_the_lookup_of_grid_asu_map(symbol, cell):
    m = _compact_map(symbol, cell)
    lut = grid_asu_map(m.grid, m.laue, cell, d_min=3.0)
    flat_I = np.full(lut.size, np.nan)
    flat_I[m.reps] = m.values["I"]
    want = np.where(lut >= 0, flat_I[np.maximum(lut, 0)], np.nan).reshape(m.grid.shape)
    np.testing.assert_array_equal(m.expand(), want)
    n0 = m.grid.shape[0]
    blocks = [m.expand_slab(None, a, min(n0, a + 3)) for a in range(0, n0, 3)]
    np.testing.assert_array_equal(np.concatenate(blocks), want)
    counts = m.expand_slab(m.values["counts"], 0, n0, fill=0, dtype=np.int64)
    assert counts.dtype == np.int64 and counts.sum() == m.counts[lut[lut >= 0]].sum()
    # the full-grid MergedMap gives the same blocks
    full = ma.MergedMap(m.grid, lut, m.I, m.sigma, m.counts)
    np.testing.assert_array_equal(full.expand_slab(None, 2, 5), want[2:5])


def test_shell_statistics_against_numpy_corrcoef():
    from diffuse_cli.merge_statistics import shell_edges, shell_statistics, voxel_d_star

    cell = (20.0, 20.0, 30.0, 90, 90, 90)
    m = _compact_map("P4", cell, seed=3)
    st = shell_statistics(m, cell, n_shells=4, d_min=3.0)
    ds = voxel_d_star(m.grid, m.reps, cell)
    shell = np.clip(np.searchsorted(shell_edges(0.0, 1 / 3.0, 4), ds, side="right") - 1, 0, 3)
    h1, h2 = m.values["half_I"]
    fp, fm = m.values["friedel_I"]
    for rows, sel in [(st["shells"][k], shell == k) for k in range(4)] + [(st["overall"], shell >= 0)]:
        both = sel & np.isfinite(h1) & np.isfinite(h2)
        assert rows["cc_half"] == pytest.approx(np.corrcoef(h1[both], h2[both])[0, 1], abs=1e-9)
        pair = sel & np.isfinite(fp) & np.isfinite(fm)
        assert rows["cc_friedel"] == pytest.approx(np.corrcoef(fp[pair], fm[pair])[0, 1], abs=1e-9)
        meas = sel & (m.values["counts"] > 0)
        assert rows["mean_I"] == pytest.approx(np.mean(m.values["I"][meas]), rel=1e-12)
        assert rows["multiplicity"] == pytest.approx(np.mean(m.values["counts"][meas]), rel=1e-12)
        assert rows["mean_I_over_sigma"] == pytest.approx(np.mean(m.values["I"][meas] / m.values["sigma"][meas]),
                                                          rel=1e-12)
    # the full-grid MergedMap of the same values gives the same table
    lut = grid_asu_map(m.grid, m.laue, cell, d_min=3.0)
    full = ma.MergedMap(m.grid, lut, m.I, m.sigma, m.counts, m.half_I, m.friedel_I)
    assert shell_statistics(full, cell, n_shells=4, d_min=3.0) == st


def test_ccp4_written_block_by_block_is_the_iotbx_file(tmp_path):
    from diffuse_cli import map_output

    grid = HKLGrid(2, (2, 3, 4))
    v = np.random.default_rng(0).normal(size=grid.shape)
    v[v > 1.5] = np.nan
    map_output.write_ccp4(str(tmp_path / "a.ccp4"), grid, v, (30, 40, 50, 90, 95, 90), title="t")
    map_output.write_ccp4_slabs(str(tmp_path / "b.ccp4"), grid, [v[:3], v[3:4], v[4:]], (30, 40, 50, 90, 95, 90),
                                title="t")
    assert (tmp_path / "a.ccp4").read_bytes() == (tmp_path / "b.ccp4").read_bytes()


def test_merged_npz_written_block_by_block_reads_as_the_dense_arrays(tmp_path):
    from diffuse_cli.formats.merged import read_merged, write_merged

    cell = (20.0, 20.0, 30.0, 90, 90, 90)
    m = _compact_map("P4", cell)
    I, s, c = m.expand(), m.expand(m.values["sigma"]), m.expand(m.values["counts"], fill=0)
    write_merged(str(tmp_path / "dense.npz"), m.grid, I, s, c, cell, "P4", n_stills=3)
    write_merged(str(tmp_path / "blocks.npz"), m.grid, lambda a, b: m.expand_slab(None, a, b),
                 lambda a, b: m.expand_slab(m.values["sigma"], a, b),
                 lambda a, b: m.expand_slab(m.values["counts"], a, b, fill=0), cell, "P4", n_stills=3)
    a, b = read_merged(str(tmp_path / "dense.npz")), read_merged(str(tmp_path / "blocks.npz"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert b["I"].dtype == np.float32 and b["counts"].dtype == np.int64 and b["I"].shape == m.grid.shape
