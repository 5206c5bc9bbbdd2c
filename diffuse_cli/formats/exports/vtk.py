"""Legacy VTK STRUCTURED_POINTS (``.vtk``), for ParaView and Lunus's lreadvtk().

::

  # vtk DataFile Version 2.0
  diffuse <field> from <source> lattice_type=P1;unit_cell=a,b,c,al,be,ga;space_group=<sg>
  ASCII                                   (or BINARY)
  DATASET STRUCTURED_POINTS
  DIMENSIONS nh nk nl
  SPACING dx dy dz
  ORIGIN x0 y0 z0
  POINT_DATA nh*nk*nl
  SCALARS <field> float 1                 (counts: int)
  LOOKUP_TABLE default
  values, x (h) fastest; ASCII: one x row per line

The tags on the title line are those Lunus's lreadvtk() parses
(``tag=value`` up to ``;`` or the line end). One scalar field per file
(``field``): Lunus reads every number after LOOKUP_TABLE into one lattice.
BINARY is big-endian, as the VTK legacy format defines.

Coordinates: ``hkl`` (default), ORIGIN the first voxel's Miller indices and
SPACING 1/ndiv (ParaView's axes are then h, k, l, drawn orthogonal);
``lunus``, Lunus's Å⁻¹ scale 1/(a·ndiv), as in the ``.lat`` export.
Unmeasured voxels: ``mask_tag`` writes Lunus's −32768, ``nan`` writes NaN
(ParaView reads NaN in BINARY files; Lunus's atof() reads ``nan`` in ASCII).
"""

from __future__ import annotations

import os

import numpy as np

from diffuse_cli.formats.exports import GridMap, option

MASK_TAG = -32768.0


def header(grid_map: GridMap, field: str, encoding: str, coordinates: str) -> str:
    cell = ",".join(f"{v:.6g}" for v in grid_map.unit_cell)
    sg = grid_map.space_group.replace(" ", "")
    title = f"diffuse {field} from {grid_map.source[:80]} lattice_type=P1;unit_cell={cell};space_group={sg}"
    spacing, origin = grid_map.step_sizes, grid_map.lower_limits
    if coordinates == "lunus":
        lengths = np.asarray(grid_map.unit_cell[:3], dtype=np.float64)
        spacing, origin = spacing / lengths, origin / lengths
    nh, nk, nl = grid_map.shape
    kind = "int" if field == "counts" else "float"
    return "\n".join([
        "# vtk DataFile Version 2.0",
        title[:255],
        encoding.upper(),
        "DATASET STRUCTURED_POINTS",
        f"DIMENSIONS {nh} {nk} {nl}",
        "SPACING " + " ".join(f"{v:.9g}" for v in spacing),
        "ORIGIN " + " ".join(f"{v:.9g}" for v in origin),
        f"POINT_DATA {nh * nk * nl}",
        f"SCALARS {field} {kind} 1",
        "LOOKUP_TABLE default",
    ]) + "\n"


def values(grid_map: GridMap, field: str, unmeasured: str) -> np.ndarray:
    """The field [h, k, l] with the unmeasured voxels filled (float32, or int32 for counts)."""
    if field == "counts":
        if grid_map.counts is None:
            from libtbx.utils import Sorry

            raise Sorry(f"vtk.field=counts: {grid_map.source} has no counts")
        return grid_map.counts.astype(np.int32)
    source = grid_map.I if field == "intensity" else grid_map.sigma
    fill = np.nan if unmeasured == "nan" else MASK_TAG
    return np.where(grid_map.measured, source, fill).astype(np.float32)


def write(path, grid_map: GridMap, params=None) -> list[str]:
    from diffuse_cli import program

    field = option(params, "field", "intensity")
    encoding = option(params, "encoding", "ascii")
    coordinates = option(params, "coordinates", "hkl")
    unmeasured = option(params, "unmeasured", "mask_tag")
    data = values(grid_map, field, unmeasured)
    # [h, k, l] -> [l, k, h] in C order: h (VTK x) fastest
    rows = np.ascontiguousarray(data.transpose(2, 1, 0)).reshape(-1, data.shape[0])
    with program.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header(grid_map, field, encoding, coordinates).encode("ascii"))
            if encoding == "binary":
                fh.write(rows.astype(">i4" if field == "counts" else ">f4").tobytes())
                fh.write(b"\n")
            else:
                np.savetxt(fh, rows, fmt="%d" if field == "counts" else "%.7g", delimiter=" ")
    return [os.fspath(path)]
