"""The hkl voxel grid shared by diffuse.merge and diffuse.simulate's truth map.

``ndiv`` voxels per reciprocal-lattice unit along each axis. Voxel centres sit
at ``h = i / ndiv`` for integer ``i``, so every integer lattice point is a voxel
centre and a voxel covers ``[i − ½, i + ½) / ndiv``. Axes run symmetrically
from ``−h_max`` to ``+h_max`` (integers), so the dense arrays have shape
``(2 h_max ndiv + 1, 2 k_max ndiv + 1, 2 l_max ndiv + 1)``, indexed ``[h, k, l]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as3(x) -> np.ndarray:
    a = np.atleast_1d(np.asarray(x, dtype=np.int64))
    if a.size == 1:
        a = np.repeat(a, 3)
    if a.shape != (3,):
        raise ValueError(f"expected one or three integers, got {x!r}")
    return a


@dataclass(frozen=True)
class HKLGrid:
    """A dense, centred hkl grid.

    ndiv: voxels per lattice unit along h, k, l (int or 3 ints).
    hkl_max: largest |h|, |k|, |l| (integers) covered by the grid.
    """

    ndiv: tuple
    hkl_max: tuple

    def __init__(self, ndiv, hkl_max):
        object.__setattr__(self, "ndiv", tuple(int(v) for v in _as3(ndiv)))
        object.__setattr__(self, "hkl_max", tuple(int(v) for v in _as3(hkl_max)))
        if min(self.ndiv) < 1 or min(self.hkl_max) < 0:
            raise ValueError("ndiv must be >= 1 and hkl_max >= 0")

    @classmethod
    def for_resolution(cls, ndiv, unit_cell, d_min: float) -> "HKLGrid":
        """Smallest grid holding every hkl with d >= d_min for this cell.

        unit_cell: (a, b, c, alpha, beta, gamma) in Å and degrees.
        |h|max = a·d*max bounds h for any cell since h = a · q (projected).
        """
        from cctbx import uctbx

        uc = uctbx.unit_cell(tuple(unit_cell))
        # h = q · a_vector, so |h| <= |a| |q| = |a| / d_min
        params = uc.parameters()
        hkl_max = [int(np.ceil(params[i] / d_min)) for i in range(3)]
        return cls(ndiv, hkl_max)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(2 * m * n + 1 for m, n in zip(self.hkl_max, self.ndiv))

    @property
    def n_voxels(self) -> int:
        s = self.shape
        return s[0] * s[1] * s[2]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fractional Miller index of each voxel centre along h, k, l."""
        return tuple(
            np.arange(-m * n, m * n + 1, dtype=np.float64) / n
            for m, n in zip(self.hkl_max, self.ndiv)
        )

    def voxel_index(self, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer voxel indices (N, 3) of fractional hkl (N, 3), and an in-grid flag."""
        ndiv = np.asarray(self.ndiv, dtype=np.float64)
        offset = np.asarray(self.hkl_max, dtype=np.int64) * np.asarray(self.ndiv)
        idx = np.rint(hkl * ndiv).astype(np.int64) + offset
        inside = np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=-1)
        return idx, inside

    def flat_index(self, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat (C-order) voxel index of each in-grid hkl, and the in-grid flag."""
        idx, inside = self.voxel_index(hkl)
        flat = np.ravel_multi_index(tuple(idx[inside].T), self.shape)
        return flat, inside
