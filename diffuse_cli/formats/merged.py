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

import contextlib

import numpy as np

from diffuse_cli.formats.common import read_npz

MERGE_SCHEMA = "diffuse.merge/1"
REQUIRED = ("I", "sigma", "counts", "h", "k", "l", "unit_cell")


#: deflate level of the members, in zlib-ng: its level 2 is 4× faster than zlib's level 1
#: and 5–9 % smaller on merged maps (zlib-ng's level 1, a different "quick" deflate, is 30 %
#: larger); any zlib inflates the stream
NPZ_LEVEL = 2


def _block_planes(grid, itemsize: int, block_bytes: int = 4 << 20) -> int:
    """h-planes per block of a dense field: about ``block_bytes`` (small enough for malloc to
    reuse one block's memory for the next, instead of mapping fresh pages each time)."""
    return max(1, block_bytes // (itemsize * grid.shape[1] * grid.shape[2]))


def _open_member(zf, name: str):
    """A member of ``zf`` open for writing, deflated by zlib-ng at ``NPZ_LEVEL`` (zipfile's
    own zlib stream where zlib-ng or zipfile's writer attribute is missing: the same content)."""
    fh = zf.open(name, "w", force_zip64=True)
    try:
        from zlib_ng import zlib_ng
    except ImportError:  # pragma: no cover - zlib-ng is a dependency
        return fh
    if getattr(fh, "_compressor", None) is not None:  # CPython's _ZipWriteFile: raw deflate (wbits −15)
        fh._compressor = zlib_ng.compressobj(NPZ_LEVEL, zlib_ng.DEFLATED, -15)
    return fh


@contextlib.contextmanager
def _zlib_ng_crc32():
    """zipfile's CRC-32 computed by zlib-ng's (the same values, 8× faster than Debian's zlib)
    while the members are written; zipfile's own afterwards."""
    import zipfile

    try:
        from zlib_ng import zlib_ng
    except ImportError:  # pragma: no cover - zlib-ng is a dependency
        yield
        return
    own = getattr(zipfile, "crc32", None)
    if own is None:  # pragma: no cover - another zipfile
        yield
        return
    zipfile.crc32 = zlib_ng.crc32
    try:
        yield
    finally:
        zipfile.crc32 = own


def write_merged(path, grid, I, sigma, counts, unit_cell, space_group: str, **provenance) -> None:
    """Write merged.npz atomically (the only writer): I, sigma, counts [h,k,l], axes and provenance.

    grid: the HKLGrid (``axes()``, ``shape``, ``ndiv``). I, sigma, counts: dense arrays, or
    callables ``f(i0, i1)`` giving the block of h-planes [i0, i1) (then each field is
    written block by block and the whole grid is never held in memory). The members are
    deflated by zlib-ng at level ``NPZ_LEVEL`` (the dense grid is mostly NaN or smooth).
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
    with atomic_path(path) as tmp, _zlib_ng_crc32():
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=FAST_ZIP_LEVEL) as zf:
            for name, arr in small.items():
                with _open_member(zf, name + ".npy") as fh:
                    np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
            for name, (src, dtype) in dense.items():
                with _open_member(zf, name + ".npy") as fh:
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
                        fh.write(block.reshape(-1).view(np.uint8))  # the buffer itself, not a copy


def read_merged(path, fields=None) -> dict:
    """The arrays of a merged map (all, or ``fields``), schema and fields checked."""
    return read_npz(path, MERGE_SCHEMA, fields=fields,
                    required=REQUIRED if fields is None else [f for f in REQUIRED if f in fields])
