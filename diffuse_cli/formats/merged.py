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

diffuse.merge writes the dense fields block by block from the merged ASU
voxels (the whole grid is never in memory); the file is the same.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.formats.common import read_npz

MERGE_SCHEMA = "diffuse.merge/1"
REQUIRED = ("I", "sigma", "counts", "h", "k", "l", "unit_cell")


def _block_planes(grid, itemsize: int, block_bytes: int = 32 << 20) -> int:
    return max(1, block_bytes // (itemsize * grid.shape[1] * grid.shape[2]))


def write_merged(path, grid, I, sigma, counts, unit_cell, space_group: str, **provenance) -> None:
    """Write merged.npz atomically (the only writer): I, sigma, counts [h,k,l], axes and provenance.

    grid: the HKLGrid (``axes()``, ``shape``, ``ndiv``). I, sigma, counts: dense arrays, or
    callables ``f(i0, i1)`` giving the block of h-planes [i0, i1) (then each field is
    written block by block and the whole grid is never held in memory). The members are
    deflated at zlib level ``FAST_ZIP_LEVEL`` (the dense grid is mostly NaN or smooth).
    """
    import zipfile

    from diffuse_cli import __version__
    from diffuse_cli.atomic_io import FAST_ZIP_LEVEL, atomic_path

    h, k, l = grid.axes()
    dense = {"I": (I, np.float32), "sigma": (sigma, np.float32), "counts": (counts, np.int64)}
    small = dict(schema=np.array(MERGE_SCHEMA), h=h, k=k, l=l, ndiv=np.asarray(grid.ndiv, dtype=np.int64),
                 unit_cell=np.asarray(unit_cell, dtype=np.float64), space_group=np.array(str(space_group)),
                 program_version=np.array(str(__version__)),
                 **{key: np.asarray(v) for key, v in provenance.items()})
    n0 = grid.shape[0]
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=FAST_ZIP_LEVEL) as zf:
            for name, arr in small.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
            for name, (src, dtype) in dense.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                    if not callable(src):
                        np.lib.format.write_array(fh, np.asarray(src, dtype=dtype).reshape(grid.shape),
                                                  allow_pickle=False)
                        continue
                    np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                              "fortran_order": False, "shape": tuple(grid.shape)})
                    step = _block_planes(grid, np.dtype(dtype).itemsize)
                    for i0 in range(0, n0, step):
                        i1 = min(n0, i0 + step)
                        block = np.ascontiguousarray(src(i0, i1), dtype=dtype)
                        if block.shape != (i1 - i0,) + tuple(grid.shape[1:]):
                            raise ValueError(f"{name}: block of shape {block.shape} for planes {i0}:{i1}")
                        fh.write(block.tobytes())


def read_merged(path, fields=None) -> dict:
    """The arrays of a merged map (all, or ``fields``), schema and fields checked."""
    return read_npz(path, MERGE_SCHEMA, fields=fields,
                    required=REQUIRED if fields is None else [f for f in REQUIRED if f in fields])
