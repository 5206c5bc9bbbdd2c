"""The cached merge's map on the compact ASU voxels (:class:`CompactMergedMap`) and its
dense outputs: the grid (or slab) table from compact index to grid voxel and the dense
blocks of h-planes (:meth:`CompactMergedMap.expand_slab`); :func:`merged_from_compact`
for the flat-grid :class:`~diffuse_cli.merge_accumulator.MergedMap`. The compact ASU
tables, sums and compiled loops are in :mod:`diffuse_cli.merge_compact`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffuse_cli.grid import HKLGrid
from diffuse_cli.merge_accumulator import HAVE_NUMBA, MergedMap
from diffuse_cli.merge_compact import _gather, _orbit_scatter


@dataclass
class CompactMergedMap:
    """Merged values on the compact ASU voxels only (the cached merge's result).

    ``reps``: flat grid index of each compact voxel (increasing); ``values``: I, sigma
    (float64), counts (int32), half_I and friedel_I (float32 lists) per compact voxel;
    ``centric``: per compact voxel, no Friedel pair. :meth:`compact` gives them, and
    :meth:`expand_slab` the dense values of a slab of the grid (the outputs are written
    slab by slab). The :class:`MergedMap` API (``I``, ``sigma``, ``counts``, ``half_I``,
    ``friedel_I`` over the flat grid, ``lut``, :meth:`expand`, :meth:`gather`) is kept
    for tests and small maps: each access builds full-grid arrays.
    """

    grid: HKLGrid
    laue: object
    unit_cell: tuple
    d_min: float | None
    d_max: float | None
    reps: np.ndarray
    values: dict
    centric: np.ndarray | None = None
    _lut: np.ndarray | None = field(default=None, repr=False)
    _table: np.ndarray | None = field(default=None, repr=False)
    _slab: tuple | None = field(default=None, repr=False)  # (i0, i1, table) of a grid too big to keep

    # -- compact access (what the driver uses)
    def compact(self) -> dict:
        """voxels (flat indices, int64) and I, sigma, counts, half_I, friedel_I at them."""
        return {"voxels": self.reps, **self.values}

    def asu_voxels(self) -> np.ndarray:
        return self.reps.astype(np.int64)

    def _compact_values(self, values):
        if values is None:
            return self.values["I"]
        values = np.asarray(values)
        if len(values) == len(self.reps):
            return values
        if values.size == self.grid.n_voxels:
            return values.ravel()[self.reps]
        raise ValueError(f"values of length {len(values)}: neither compact ({len(self.reps)}) nor the grid")

    #: largest grid table (bytes) kept for the dense outputs; a larger grid has the table of
    #: one slab of about ``SLAB_VOXELS`` at a time (one pass over the representatives each),
    #: so that the outputs of a big map need no memory per grid voxel (issue 12: 1.5 GB per rank)
    TABLE_MAX_BYTES = 128 << 20
    SLAB_VOXELS = 8 << 20  # as merged_blocks.map_blocks' blocks

    def _table_dtype(self):
        return np.int32 if len(self.reps) < 2**31 else np.int64

    def grid_table(self) -> np.ndarray:
        """Per grid voxel (flat) its compact index (int32 when the number of compact voxels
        allows; −1 outside the resolution range): every image of each representative under
        the Laue group, as compact_asu's table. Built once (4 bytes per grid voxel) and kept
        when it is at most ``TABLE_MAX_BYTES``: each dense slab is then a gather through it."""
        if self._table is not None:
            return self._table
        table = self._scatter_table(0, self.grid.shape[0])
        if table.nbytes <= self.TABLE_MAX_BYTES:
            self._table = table
        return table

    def _scatter_table(self, i0: int, i1: int) -> np.ndarray:
        s = self.grid.shape
        dt = self._table_dtype()
        table = np.full((i1 - i0) * s[1] * s[2], -1, dtype=dt)
        offset = np.asarray(self.grid.hkl_max, dtype=np.int64) * np.asarray(self.grid.ndiv)
        _orbit_scatter(self.reps, self.laue.rotations, offset, np.asarray(s, dtype=np.int64), i0, i1,
                       np.arange(len(self.reps), dtype=dt), table)
        return table

    def slab_table(self, i0: int, i1: int) -> np.ndarray:
        """:meth:`grid_table` of the grid slab h-index [i0, i1) (flat; a view of the kept
        table, or made for this slab alone when the grid's is too big to keep)."""
        plane = self.grid.shape[1] * self.grid.shape[2]
        if self._table is None and self.grid.n_voxels * np.dtype(self._table_dtype()).itemsize > self.TABLE_MAX_BYTES:
            # the slab's table, or the one made last when it holds the slab (the outputs ask
            # for consecutive slabs, each output in blocks of its own size)
            if self._slab is None or not (self._slab[0] <= i0 and i1 <= self._slab[1]):
                n_planes = max(i1 - i0, self.SLAB_VOXELS // plane, 1)
                j1 = min(self.grid.shape[0], i0 + n_planes)
                self._slab = None  # the previous one freed first
                self._slab = (i0, j1, self._scatter_table(i0, j1))
            a, _, table = self._slab
            return table[(i0 - a) * plane:(i1 - a) * plane]
        return self.grid_table()[i0 * plane:i1 * plane]

    def release_tables(self) -> None:
        """Free the grid (or slab) table of the dense outputs (made again when asked)."""
        self._table = self._slab = None

    def expand_slab(self, values, i0: int, i1: int, fill=np.nan, dtype=None, out=None) -> np.ndarray:
        """Values (compact, or over the flat grid) on the grid slab h-index [i0, i1),
        shape (i1 − i0, n_k, n_l); ``fill`` outside the resolution range. ``out``: a
        buffer of at least that size and of the result's dtype to write into (its leading
        part is returned)."""
        v = self._compact_values(values)
        dt = np.dtype(np.result_type(v, type(fill)) if dtype is None else dtype)
        s = self.grid.shape
        table = self.slab_table(i0, i1)
        if out is None:
            out = np.empty(len(table), dtype=dt)
        elif out.dtype != dt or out.size < len(table):
            raise ValueError(f"out: {out.dtype} buffer of {out.size} for {len(table)} values of {dt}")
        dest = out.reshape(-1)[:len(table)]
        v = np.ascontiguousarray(v.astype(dt, copy=False))
        if HAVE_NUMBA:
            _gather(table, v, dt.type(fill), dest)
        else:  # pragma: no cover - without numba
            np.copyto(dest, np.where(table >= 0, v[np.maximum(table, 0)] if len(v) else dt.type(fill), fill))
        return dest.reshape(i1 - i0, s[1], s[2])

    def expand(self, values=None, fill=np.nan) -> np.ndarray:
        return self.expand_slab(values, 0, self.grid.shape[0], fill)

    # -- the MergedMap API over the flat grid (full-grid arrays: tests, small maps)
    def _flat(self, v, fill):
        out = np.full(self.grid.n_voxels, fill, dtype=np.result_type(v, type(fill)))
        out[self.reps] = v
        return out

    @property
    def I(self):
        return self._flat(self.values["I"], np.nan)

    @property
    def sigma(self):
        return self._flat(self.values["sigma"], np.nan)

    @property
    def counts(self):
        return self._flat(self.values["counts"].astype(np.int64), 0)

    @property
    def half_I(self):
        return [self._flat(h, np.float32(np.nan)) for h in self.values["half_I"]]

    @property
    def friedel_I(self):
        return [self._flat(h, np.float32(np.nan)) for h in self.values["friedel_I"]]

    @property
    def lut(self):
        if self._lut is None:
            from diffuse_cli.symmetry import grid_asu_map

            self._lut = grid_asu_map(self.grid, self.laue, self.unit_cell, d_min=self.d_min, d_max=self.d_max)
        return self._lut

    gather = MergedMap.gather  # the same lookup through lut and I


def merged_from_compact(grid: HKLGrid, lut: np.ndarray, reps: np.ndarray, values: dict,
                        friedel: bool = True) -> MergedMap:
    """The :class:`MergedMap` (flat-grid layout) of compact merged values."""
    n = grid.n_voxels

    def full(v, fill, dtype):
        out = np.full(n, fill, dtype=dtype)
        out[reps] = v
        return out

    return MergedMap(grid, lut, full(values["I"], np.nan, np.float64), full(values["sigma"], np.nan, np.float64),
                     full(values["counts"], 0, np.int64),
                     [full(h, np.nan, np.float32) for h in values["half_I"]],
                     [full(h, np.nan, np.float32) for h in values["friedel_I"]] if friedel else [])
