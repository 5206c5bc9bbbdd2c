"""CSV of the non-empty voxels (``.csv``): one row per measured voxel.

Comment lines (``#``) first: the source, unit cell (Å, degrees), space
group and units. Then the header ``h,k,l,I,sigma,counts`` (``counts`` only
when the map has them) and one row per voxel with finite I (and counts > 0),
in grid order (l fastest). h, k, l are voxel-centre Miller indices (10
significant digits), I and sigma float32 values written to 9 significant
digits (exact round trip). Unmeasured voxels have no row.
"""

from __future__ import annotations

import io
import os

import numpy as np

from diffuse_cli.formats.exports import GridMap


def write(path, grid_map: GridMap, params=None) -> list[str]:
    from diffuse_cli import __version__, program

    sel = grid_map.measured
    idx = np.nonzero(sel)
    columns = [grid_map.h[idx[0]], grid_map.k[idx[1]], grid_map.l[idx[2]],
               grid_map.I[sel].astype(np.float64), grid_map.sigma[sel].astype(np.float64)]
    names, fmt = ["h", "k", "l", "I", "sigma"], ["%.10g"] * 3 + ["%.9g"] * 2
    if grid_map.counts is not None:
        columns.append(grid_map.counts[sel])
        names.append("counts")
        fmt.append("%d")
    cell = ",".join(f"{v:.6g}" for v in grid_map.unit_cell)
    comments = (f"# diffuse.export {__version__}: measured voxels of {grid_map.source}\n"
                f"# unit_cell={cell} space_group={grid_map.space_group} units={grid_map.units}\n")
    buf = io.StringIO()
    # float64 holds the counts exactly (< 2**53); "%d" prints them as integers
    table = np.column_stack([np.asarray(c, dtype=np.float64) for c in columns])
    np.savetxt(buf, table, fmt=fmt, delimiter=",", header=",".join(names), comments="")
    program.write_text(path, comments + buf.getvalue())
    return [os.fspath(path)]
