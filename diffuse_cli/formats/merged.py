"""The merged map: ``merged.npz`` (schema ``diffuse.merge/1``).

Written by diffuse.merge, read by diffuse.azimuthal_fit (radial profile of
the 3D map), scripts/demo_compare.py and tests. Fields:

* ``schema``; ``I``, ``sigma`` (float32, NaN where unmeasured) and ``counts``
  (int64) on the dense grid ``[h, k, l]``; the axes ``h``, ``k``, ``l``
  (fractional Miller indices of the grid points) and ``ndiv`` (3,);
* ``unit_cell`` (a, b, c in Å; α, β, γ in degrees) and ``space_group`` of
  the reference crystal, ``laue_group``, ``units`` (photons/µsr/s, or
  electron units per unit cell);
* provenance: ``files`` (the corrected stills merged), ``n_stills``,
  ``n_observations``, ``scales``, ``half``, ``d_min``/``d_max`` (Å),
  ``U_mean``, ``reindexed`` (``file:operator``), ``skipped`` (stills left
  out by the batch rule, ``file: reason``), ``program_version``, and what
  the absolute scale adds (``absolute_scale_K``).
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.formats.common import read_npz

MERGE_SCHEMA = "diffuse.merge/1"
REQUIRED = ("I", "sigma", "counts", "h", "k", "l", "unit_cell")


def write_merged(path, grid, I, sigma, counts, unit_cell, space_group: str, **provenance) -> None:
    """Write merged.npz atomically (the only writer): I, sigma, counts [h,k,l], axes and provenance.

    grid: the HKLGrid (``axes()``, ``shape``, ``ndiv``).
    """
    from diffuse_cli import __version__, program

    h, k, l = grid.axes()
    program.write_npz(
        path,
        schema=np.array(MERGE_SCHEMA),
        I=np.asarray(I, dtype=np.float32).reshape(grid.shape),
        sigma=np.asarray(sigma, dtype=np.float32).reshape(grid.shape),
        counts=np.asarray(counts, dtype=np.int64).reshape(grid.shape),
        h=h, k=k, l=l,
        ndiv=np.asarray(grid.ndiv, dtype=np.int64),
        unit_cell=np.asarray(unit_cell, dtype=np.float64),
        space_group=np.array(str(space_group)),
        program_version=np.array(str(__version__)),
        **{key: np.asarray(v) for key, v in provenance.items()},
    )


def read_merged(path, fields=None) -> dict:
    """The arrays of a merged map (all, or ``fields``), schema and fields checked."""
    return read_npz(path, MERGE_SCHEMA, fields=fields,
                    required=REQUIRED if fields is None else [f for f in REQUIRED if f in fields])
