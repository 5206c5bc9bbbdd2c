"""Yell's HDF5 array format (``.h5``), as Yell 1.0 writes it (src/IntensityMap.cpp).

Root datasets:

* ``data``: float64 [h, k, l], row-major (l fastest): I;
* ``lower_limits``: float64 (3,), Miller index of the first voxel along h, k, l;
* ``step_sizes``: float64 (3,), voxel spacing in Miller units (1/ndiv);
* ``unit_cell``: float64 (6,), direct cell a, b, c (Å), α, β, γ (degrees);
* ``is_direct``: uint8 scalar 0 (a reciprocal-space grid; HDF5 native hbool);
* ``format``: string ``"Yell 1.0"``.

Root attributes: ``filetype = "Yell 1.0"`` (what Yell 1.0's manual asks
for), and as metadata ``space_group``, ``laue_group``, ``units``,
``source``, ``creator``.

Unmeasured voxels are NaN unless ``fill`` is given (Yell needs finite
values: use ``fill=0`` with a weights file whose weight is 0 there).
``fft_grid`` drops the last plane along each axis longer than 1, so the
size is even and the origin sits at index n/2, which Yell's FFT
(approximate method, ΔPDF) requires. ``weights`` also writes
``<stem>_weights.h5`` (Yell's weights.h5: 1/σ where measured, else 0;
Yell minimises weights·(I_exp − I_model)).
"""

from __future__ import annotations

import os

import numpy as np

from diffuse_cli.formats.exports import GridMap, option

YELL_FORMAT = "Yell 1.0"


def _fft_cut(shape) -> tuple:
    return tuple(slice(0, n - 1) if n > 1 else slice(None) for n in shape)


def write_array(path, values: np.ndarray, grid_map: GridMap, what: str) -> None:
    """One Yell array file: ``values`` [h, k, l] on ``grid_map``'s grid (values may be cut by fft_grid)."""
    import h5py

    from diffuse_cli import __version__, program

    with program.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("data", data=np.ascontiguousarray(values, dtype=np.float64))
            fh.create_dataset("lower_limits", data=grid_map.lower_limits)
            fh.create_dataset("step_sizes", data=grid_map.step_sizes)
            fh.create_dataset("unit_cell", data=np.asarray(grid_map.unit_cell, dtype=np.float64))
            fh.create_dataset("is_direct", data=np.uint8(0))
            fh.create_dataset("format", data=YELL_FORMAT, dtype=h5py.string_dtype())
            fh.attrs["filetype"] = YELL_FORMAT
            fh.attrs["space_group"] = grid_map.space_group
            fh.attrs["laue_group"] = grid_map.laue_group
            fh.attrs["units"] = grid_map.units
            fh.attrs["contents"] = what
            fh.attrs["source"] = grid_map.source
            fh.attrs["creator"] = f"diffuse.export {__version__}"


def write(path, grid_map: GridMap, params=None) -> list[str]:
    fill = option(params, "fill", None)
    fft_grid = option(params, "fft_grid", False)
    weights = option(params, "weights", False)
    if weights and fill is None:
        fill = 0.0  # Yell's sums cannot skip NaN; the weight is 0 there anyway
    cut = _fft_cut(grid_map.shape) if fft_grid else (slice(None),) * 3
    data = grid_map.I.astype(np.float64)
    measured = grid_map.measured
    if fill is not None:
        data[~measured] = fill
    else:
        data[~measured] = np.nan
    write_array(path, data[cut], grid_map, "I")
    written = [os.fspath(path)]
    if weights:
        sigma = grid_map.sigma.astype(np.float64)
        good = measured & np.isfinite(sigma) & (sigma > 0)
        w = np.zeros(grid_map.shape)
        w[good] = 1.0 / sigma[good]
        stem, ext = os.path.splitext(os.fspath(path))
        wpath = f"{stem}_weights{ext}"
        write_array(wpath, w[cut], grid_map, "weights 1/sigma (0: unmeasured)")
        written.append(wpath)
    return written
