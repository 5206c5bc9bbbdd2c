"""MTZ at integer hkl (``.mtz``, written with gemmi), for Phenix and CCP4.

Reflections: the voxels whose centre is an integer h, k, l and that are
measured (unmeasured voxels are left out, as MTZ has no "missing" row
convention beyond absence), except 0 0 0. Each holds the diffuse intensity of the voxel
around the lattice point (Bragg pixels were masked before merging), not a
Bragg intensity.

Columns: ``H K L`` (type H), ``I`` (J), ``SIGI`` (Q), ``N`` (I: observations
in the voxel, when counts are known). Cell: the map's unit cell; space
group: the map's. ``unique=True`` keeps only the reflections in the space
group's reciprocal asymmetric unit (CCP4's, as gemmi defines it): the
merged map is symmetry-expanded, so the others repeat them. ``unique=False``
writes every integer-hkl voxel in space group P1.
"""

from __future__ import annotations

import os

import numpy as np
from libtbx.utils import Sorry

from diffuse_cli.formats.exports import GridMap, option


def integer_indices(axis: np.ndarray) -> np.ndarray:
    """Positions along an axis whose voxel centre is an integer Miller index."""
    return np.flatnonzero(np.abs(axis - np.rint(axis)) < 1e-6)


def gemmi_space_group(name: str):
    """gemmi's space group for a symbol cctbx understands (any setting)."""
    import gemmi
    from cctbx import sgtbx

    try:
        info = sgtbx.space_group_info(name)
    except RuntimeError as e:
        raise Sorry(f"space group {name!r}: not a space group symbol ({str(e).splitlines()[0]})") from None
    return gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(info.type().hall_symbol()))


def reflections(grid_map: GridMap, unique: bool = True):
    """(hkl (N, 3) int, I, SIGI, N or None, gemmi space group) at the measured integer-hkl voxels."""
    import gemmi

    idx = [integer_indices(a) for a in grid_map.axes]
    sub = np.ix_(*idx)
    hkl = np.stack(np.meshgrid(*[np.rint(a[i]) for a, i in zip(grid_map.axes, idx)], indexing="ij"), axis=-1)
    hkl = hkl.reshape(-1, 3).astype(np.int32)
    keep = grid_map.measured[sub].ravel() & np.isfinite(grid_map.sigma[sub].ravel())
    keep &= np.any(hkl != 0, axis=1)  # no 0 0 0: the direct beam, not a reflection
    sg = gemmi_space_group(grid_map.space_group) if unique else gemmi.find_spacegroup_by_name("P 1")
    if unique:
        asu = gemmi.ReciprocalAsu(sg)
        keep &= np.fromiter((asu.is_in(list(map(int, x))) for x in hkl), dtype=bool, count=len(hkl))
    counts = None if grid_map.counts is None else grid_map.counts[sub].ravel()[keep]
    return hkl[keep], grid_map.I[sub].ravel()[keep], grid_map.sigma[sub].ravel()[keep], counts, sg


def write(path, grid_map: GridMap, params=None) -> list[str]:
    import gemmi

    from diffuse_cli import __version__, program

    unique = option(params, "unique", True)
    hkl, I, sigma, counts, sg = reflections(grid_map, unique)
    if len(hkl) == 0:
        raise Sorry(f"{grid_map.source}: no measured voxel at integer hkl; nothing to write as MTZ")
    mtz = gemmi.Mtz(with_base=True)
    mtz.title = f"diffuse map from {grid_map.source}"
    mtz.history = [f"diffuse.export {__version__}: voxels at integer hkl of {grid_map.source}"]
    mtz.spacegroup = sg
    mtz.set_cell_for_all(gemmi.UnitCell(*grid_map.unit_cell))
    mtz.add_dataset("diffuse")
    mtz.add_column("I", "J")
    mtz.add_column("SIGI", "Q")
    columns = [hkl.astype(np.float32), I[:, None], sigma[:, None]]
    if counts is not None:
        mtz.add_column("N", "I")
        columns.append(counts.astype(np.float32)[:, None])
    mtz.set_data(np.hstack(columns).astype(np.float32))
    mtz.update_reso()
    with program.atomic_path(path) as tmp:
        mtz.write_to_file(tmp)
    return [os.fspath(path)]
