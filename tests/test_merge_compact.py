"""The merge's compact storage (issue 12): the ASU table without the full-grid int64 map,
the dense outputs made block by block from the ASU voxels, and the shell statistics,
each against an independent or the previous full-grid computation."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli import merge_accumulator as ma
from diffuse_cli import merge_compact as mc
from diffuse_cli.compact_map import CompactMergedMap
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
    return CompactMergedMap(grid, laue, cell, 3.0, None, reps, values, centric=hand[reps] == 0)


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


@pytest.mark.parametrize("symbol,cell", CASES)
def test_grid_table_is_the_compact_index_of_grid_asu_map(symbol, cell):
    # grid_table (each representative's images) against compact_tables of the per-voxel map
    m = _compact_map(symbol, cell)
    lut = grid_asu_map(m.grid, m.laue, cell, d_min=3.0)
    reps, table = mc.compact_tables(lut)
    np.testing.assert_array_equal(m.reps, reps)
    np.testing.assert_array_equal(m.grid_table(), table)
    assert m.grid_table().dtype == np.int32
    plane = m.grid.shape[1] * m.grid.shape[2]
    np.testing.assert_array_equal(m.slab_table(2, 4), table[2 * plane:4 * plane])
    # into a caller's buffer (larger than the slab), any dtype of the values
    buf = np.full(5 * plane, -7, dtype=np.int64)
    got = m.expand_slab(m.values["counts"], 1, 4, fill=0, dtype=np.int64, out=buf)
    np.testing.assert_array_equal(got, m.expand(m.values["counts"].astype(np.int64), fill=0)[1:4])
    assert np.shares_memory(got, buf) and (buf[3 * plane:] == -7).all()
    with pytest.raises(ValueError, match="buffer"):
        m.expand_slab(None, 0, 4, out=np.empty(4 * plane, dtype=np.float32))


@pytest.mark.parametrize("symbol,cell", CASES)
def test_radial_profile_blocks_equal_numpy_bincount_of_the_dense_map(symbol, cell):
    # the compiled pass against numpy on the dense map from grid_asu_map and grid_d_star,
    # bit for bit (the same d* arithmetic, the same summation order per block)
    from diffuse_cli.merged_blocks import map_blocks, radial_profile_blocks
    from diffuse_cli.merge_statistics import grid_d_star

    m = _compact_map(symbol, cell, seed=5)
    lut = grid_asu_map(m.grid, m.laue, cell, d_min=3.0)
    flat_I = np.full(lut.size, np.nan)
    flat_I[m.reps] = m.values["I"]
    dense = np.where(lut >= 0, flat_I[np.maximum(lut, 0)], np.nan).reshape(m.grid.shape)
    ds = grid_d_star(m.grid, cell)
    top = 1 / 3.2  # a limit inside the map: voxels beyond it are left out
    blocks = [(a, min(m.grid.shape[0], a + 4)) for a in range(0, m.grid.shape[0], 4)]
    n, s = np.zeros(60, dtype=np.int64), np.zeros(60)
    for i0, i1 in blocks:
        v, d = dense[i0:i1].ravel(), ds[i0:i1].ravel()
        ok = np.isfinite(v) & (d <= top)
        b = np.minimum((d[ok] / top * 60).astype(np.int64), 59)
        n += np.bincount(b, minlength=60)
        s += np.bincount(b, v[ok], minlength=60)
    centres, mean, counts = radial_profile_blocks(m, m.grid, cell, top, blocks, n_bins=60)
    np.testing.assert_array_equal(counts, n)
    np.testing.assert_array_equal(mean, np.where(n > 0, s / np.maximum(n, 1), np.nan))
    np.testing.assert_allclose(centres, (np.arange(60) + 0.5) * top / 60)
    assert counts.sum() > 0 and len(map_blocks(m.grid)) >= 1


SETTINGS = ["P1", "P2", "C 1 2 1", "P 1 1 2", "P222", "P4", "P41212", "P3", "P321", "P312", "R3", "R32",
            "R 3 :R", "R 3 2 :R", "P6", "P622", "P23", "P432", "I 4 3 2"]


@pytest.mark.parametrize("symbol", SETTINGS)
def test_asu_test_on_broadcast_axes_equals_the_per_voxel_test(symbol):
    laue = LaueSymmetry(symbol)
    h, k, l = (np.arange(-6, 7)[:, None, None], np.arange(-5, 6)[None, :, None], np.arange(-4, 5)[None, None, :])
    got = np.broadcast_to(laue.is_inside_broadcast(h, k, l), (13, 11, 9))
    v = np.stack(np.broadcast_arrays(h, k, l), axis=-1).reshape(-1, 3)
    np.testing.assert_array_equal(got.ravel(), laue.is_inside(v))
    assert 0 < got.sum() < got.size


def test_resolution_test_decides_as_the_einsum_on_the_sphere():
    # a cubic cell where d* = 1/d_min exactly for many voxels (h² + k² + l² = 25 at ndiv 1, a = 10 Å):
    # the cheap sum must defer to the einsum there
    from diffuse_cli.symmetry import reciprocal_metric, representatives_in_range

    laue = LaueSymmetry("P1")
    for cell, ndiv in (((10.0, 10.0, 10.0, 90, 90, 90), 1), ((10.0, 10.0, 10.0, 90, 90, 90), 3),
                       ((10.0, 11.0, 12.0, 70, 80, 100), 2)):
        g = reciprocal_metric(cell)
        v = np.stack(np.meshgrid(*[np.arange(-16, 17)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
        nd = np.full(3, float(ndiv))
        for d_min, d_max in ((2.0, None), (2.0, 5.0), (None, 2.5)):
            want = representatives_in_range(v, laue, nd, g, d_min, d_max)
            inside = laue.is_inside(v)
            got = np.zeros(len(v), dtype=bool)
            got[inside] = mc._in_resolution_range(v[inside], nd, g, d_min, d_max)
            np.testing.assert_array_equal(got, want)
        if cell[3] == 90:  # voxels exactly on the sphere d = 2 Å are there
            hkl = v / nd
            assert np.any(np.einsum("ni,ij,nj->n", hkl, g, hkl) == 0.25)


def test_merged_npz_members_are_standard_deflate_with_valid_crcs(tmp_path):
    import zipfile
    import zlib

    from diffuse_cli.formats.merged import write_merged

    m = _compact_map("P4", (20.0, 20.0, 30.0, 90, 90, 90))
    path = str(tmp_path / "m.npz")
    write_merged(path, m.grid, lambda a, b: m.expand_slab(None, a, b),
                 lambda a, b: m.expand_slab(m.values["sigma"], a, b),
                 lambda a, b: m.expand_slab(m.values["counts"], a, b, fill=0), (20.0, 20.0, 30.0, 90, 90, 90), "P4")
    assert zipfile.crc32 is zlib.crc32  # zipfile's own CRC again after writing
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every member inflates (stdlib zlib) to its recorded CRC-32
        infos = {i.filename: i for i in zf.infolist()}
        assert infos["I.npy"].compress_type == zipfile.ZIP_DEFLATED
        assert infos["I.npy"].compress_size < infos["I.npy"].file_size / 2
    with np.load(path) as z:
        np.testing.assert_array_equal(z["I"], m.expand().astype(np.float32))
        np.testing.assert_array_equal(z["counts"], m.expand(m.values["counts"], fill=0))


def test_slab_tables_of_a_grid_too_big_to_keep_are_the_same(monkeypatch):
    m = _compact_map("P4", (20.0, 20.0, 30.0, 90, 90, 90))
    want = m.expand()
    table = mc.compact_tables(grid_asu_map(m.grid, m.laue, m.unit_cell, d_min=3.0))[1]
    monkeypatch.setattr(CompactMergedMap, "TABLE_MAX_BYTES", 1000)  # every slab made alone, none kept
    big = _compact_map("P4", (20.0, 20.0, 30.0, 90, 90, 90))
    plane = big.grid.shape[1] * big.grid.shape[2]
    np.testing.assert_array_equal(big.slab_table(3, 6), table[3 * plane:6 * plane])
    np.testing.assert_array_equal(np.concatenate([big.expand_slab(None, a, a + 1) for a in range(big.grid.shape[0])]),
                                  want)
    assert big._table is None
    # slabs of SLAB_VOXELS: one table serves the consecutive blocks inside it, a block across
    # its end gets a new one from there
    monkeypatch.setattr(CompactMergedMap, "SLAB_VOXELS", 4 * plane)
    made = []
    scatter = CompactMergedMap._scatter_table
    monkeypatch.setattr(CompactMergedMap, "_scatter_table",
                        lambda self, a, b: made.append((a, b)) or scatter(self, a, b))
    big.release_tables()
    for step, first in ((2, [(0, 4), (4, 8), (8, 12)]), (3, [(0, 4), (3, 7), (6, 10)])):
        made.clear()
        blocks = [(a, min(big.grid.shape[0], a + step)) for a in range(0, big.grid.shape[0], step)]
        np.testing.assert_array_equal(np.concatenate([big.expand_slab(None, a, b) for a, b in blocks]), want)
        assert made[:3] == first
