"""Lunus lattice (``.lat``), as Lunus's lwritelt()/lreadlt() write and read it.

Little-endian (x86 native) binary:

* bytes 0–11: ``xvoxels, yvoxels, zvoxels`` (uint32), the voxels along h, k, l;
* bytes 12–35: ``xbound.min, xbound.max, ybound.min, ybound.max, zbound.min,
  zbound.max`` (float32): the coordinate of the first and last voxel;
* then ``xvoxels·yvoxels·zvoxels`` float32 values, x (h) fastest:
  ``index = k·xvoxels·yvoxels + j·xvoxels + i``.

Coordinates follow Lunus's lprocimlt(): a voxel step of 1/(a·ndiv) along x
(1/(b·ndiv), 1/(c·ndiv) along y, z) in Å⁻¹, so x = h/a (|a*| = 1/a for
orthogonal cells; Lunus's nominal scale otherwise). Lunus derives the scale
as (max − min)/(n − 1) and the origin voxel as ⌊−min/scale + ½⌋.

Our grid has an odd size 2M+1 with h = 0 at voxel M. Lunus's own
lattices have an even size with the origin at n/2 − 1, so one voxel plane
of mask tag is appended at the high end of every odd axis: the size is
2M+2 and the origin voxel stays M (a form older lreadlt() versions, which
take the scale as (max − min)/n, also place correctly).

Unmeasured voxels (and the appended planes) hold Lunus's lattice mask tag
−32768 (DEFAULT_LATTICE_MASK_TAG). The unit cell and space group are not
in the file (Lunus takes them as ``cell_str``/``space_group`` parameters).
"""

from __future__ import annotations

import os

import numpy as np

from diffuse_cli.formats.exports import GridMap

MASK_TAG = -32768.0
HEADER_BYTES = 36


def lattice(grid_map: GridMap) -> tuple[np.ndarray, np.ndarray]:
    """(values [h, k, l] float32 padded to even sizes, bounds (3, 2) float32)."""
    values = np.where(grid_map.measured, grid_map.I, MASK_TAG).astype(np.float32)
    pad = [(0, n % 2) for n in values.shape]
    values = np.pad(values, pad, constant_values=np.float32(MASK_TAG))
    lengths = np.asarray(grid_map.unit_cell[:3], dtype=np.float64)
    scale = grid_map.step_sizes / lengths  # Å⁻¹ per voxel
    lower = grid_map.lower_limits / lengths
    upper = lower + (np.asarray(values.shape) - 1) * scale
    return values, np.stack([lower, upper], axis=1).astype(np.float32)


def write(path, grid_map: GridMap, params=None) -> list[str]:
    from diffuse_cli import program

    values, bounds = lattice(grid_map)
    header = np.asarray(values.shape, dtype="<u4").tobytes() + bounds.astype("<f4").tobytes()
    assert len(header) == HEADER_BYTES
    with program.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            # [h, k, l] -> [l, k, h] in C order: h fastest, as Lunus indexes
            fh.write(np.ascontiguousarray(values.transpose(2, 1, 0), dtype="<f4").tobytes())
    return [os.fspath(path)]
