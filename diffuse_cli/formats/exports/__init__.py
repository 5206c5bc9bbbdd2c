"""Exports of a 3D map on the hkl grid to the formats other diffuse tools read.

One module per format (layouts in docs/export.md):

=========  =========  ====================================================
format     file       read by
=========  =========  ====================================================
``hdf5``   ``.h5``    Yell (``data``, ``lower_limits``, ``step_sizes``, ``unit_cell``)
``nexus``  ``.nxs``   NeXus readers (nexusformat, h5py, mdx2): NXentry/NXdata
``lat``    ``.lat``   Lunus (LAT3D binary lattice)
``vtk``    ``.vtk``   ParaView, Lunus (legacy VTK STRUCTURED_POINTS)
``mtz``    ``.mtz``   Phenix, CCP4 (integer hkl only, I and SIGI)
``csv``    ``.csv``   anything (the non-empty voxels, one per row)
=========  =========  ====================================================

The input is a :class:`GridMap`: ``merged.npz`` from diffuse.merge, or any
``.npz`` on the same grid contract (``schema``; ``I``, ``sigma`` [h, k, l]
with NaN where unmeasured; uniform axes ``h``, ``k``, ``l`` in Miller
units; ``unit_cell`` in Å and degrees; optional ``counts``,
``space_group``, ``laue_group``, ``units``). Every writer is atomic (a
temporary file renamed into place).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from libtbx.utils import Sorry

#: format name -> file extension; the order is the order of the docs and of -c
EXTENSIONS = {"hdf5": ".h5", "nexus": ".nxs", "lat": ".lat", "vtk": ".vtk", "mtz": ".mtz", "csv": ".csv"}
REQUIRED = ("I", "sigma", "h", "k", "l", "unit_cell")
OPTIONAL = ("counts", "space_group", "laue_group", "units", "ndiv")


@dataclass
class GridMap:
    """A map on a dense, uniform hkl grid.

    I, sigma: float arrays [h, k, l], NaN where unmeasured; counts: int
    array [h, k, l] or None; h, k, l: voxel-centre Miller indices (uniform
    steps); unit_cell: a, b, c (Å), α, β, γ (degrees).
    """

    I: np.ndarray
    sigma: np.ndarray
    counts: np.ndarray | None
    h: np.ndarray
    k: np.ndarray
    l: np.ndarray
    unit_cell: np.ndarray
    space_group: str = "P1"
    laue_group: str = ""
    units: str = ""
    schema: str = ""
    source: str = ""

    @property
    def shape(self) -> tuple:
        return self.I.shape

    @property
    def axes(self) -> tuple:
        return self.h, self.k, self.l

    @property
    def lower_limits(self) -> np.ndarray:
        """Miller index of the first voxel centre along h, k, l."""
        return np.array([a[0] for a in self.axes], dtype=np.float64)

    @property
    def step_sizes(self) -> np.ndarray:
        """Voxel spacing along h, k, l in Miller units (1/ndiv)."""
        return np.array([_step(a) for a in self.axes], dtype=np.float64)

    @property
    def measured(self) -> np.ndarray:
        """Voxels with a value: finite I (and counts > 0 where counts are known)."""
        ok = np.isfinite(self.I)
        if self.counts is not None:
            ok &= self.counts > 0
        return ok


def _step(axis: np.ndarray) -> float:
    return float(axis[1] - axis[0]) if axis.size > 1 else 1.0


def _text(value) -> str:
    return str(np.asarray(value)[()]) if value is not None else ""


def read_map(path) -> GridMap:
    """The map in ``path``, its fields and grid checked (a problem is a Sorry naming the file)."""
    from diffuse_cli import program
    from diffuse_cli.formats.common import CORRUPT
    from diffuse_cli.formats.merged import MERGE_SCHEMA, read_merged

    path = os.fspath(path)
    with program.open_npz(path) as data:  # missing, empty, truncated: Sorry naming it
        if "schema" not in data.files:
            raise Sorry(f"{path}: no schema field; not a map of diffuse (expected merged.npz or a map on its "
                        f"grid with {', '.join(('schema',) + REQUIRED)})")
        schema = _text(data["schema"])
        missing = [n for n in REQUIRED if n not in data.files]
        if missing:
            raise Sorry(f"{path}: {schema} file without {', '.join(missing)}; not a map on the hkl grid "
                        f"(needs {', '.join(REQUIRED)})")
        names = [n for n in REQUIRED + OPTIONAL if n in data.files]
        if schema == MERGE_SCHEMA:
            fields = None
        else:
            fields = {}
            for name in names:
                try:
                    fields[name] = data[name]
                except CORRUPT as e:
                    raise Sorry(f"{path}: field {name} is unreadable ({type(e).__name__}); "
                                "is the file truncated?") from None
    if fields is None:
        fields = read_merged(path, fields=names)
    return _checked(path, schema, fields)


def _checked(path, schema, f) -> GridMap:
    I = np.asarray(f["I"])
    sigma = np.asarray(f["sigma"])
    axes = [np.asarray(f[n], dtype=np.float64).ravel() for n in ("h", "k", "l")]
    counts = np.asarray(f["counts"]) if "counts" in f else None
    if I.ndim != 3:
        raise Sorry(f"{path}: I has {I.ndim} dimensions, expected 3 ([h, k, l])")
    lengths = tuple(a.size for a in axes)
    if I.shape != lengths:
        raise Sorry(f"{path}: I has shape {I.shape} but the axes h, k, l have lengths {lengths}")
    if sigma.shape != I.shape or (counts is not None and counts.shape != I.shape):
        raise Sorry(f"{path}: I, sigma and counts do not have the same shape")
    for name, a in zip("hkl", axes):
        d = np.diff(a)
        if a.size > 1 and not (np.all(d > 0) and np.allclose(d, d[0], rtol=1e-6, atol=0)):
            raise Sorry(f"{path}: axis {name} is not uniform and increasing; not a map on the hkl grid")
    cell = np.asarray(f["unit_cell"], dtype=np.float64).ravel()
    if cell.shape != (6,) or not np.all(np.isfinite(cell)) or np.any(cell <= 0):
        raise Sorry(f"{path}: unit_cell must be six positive numbers (a, b, c in Å; α, β, γ in degrees)")
    return GridMap(
        I=I.astype(np.float32, copy=False), sigma=sigma.astype(np.float32, copy=False),
        counts=None if counts is None else counts.astype(np.int64, copy=False),
        h=axes[0], k=axes[1], l=axes[2], unit_cell=cell,
        space_group=_text(f.get("space_group")) or "P1", laue_group=_text(f.get("laue_group")),
        units=_text(f.get("units")), schema=schema, source=os.path.basename(path),
    )


def write(fmt: str, path, grid_map: GridMap, params) -> list[str]:
    """Write ``grid_map`` as ``fmt`` to ``path`` (with that format's PHIL scope
    ``params``, or None for defaults); the files written."""
    from importlib import import_module

    if fmt not in EXTENSIONS:
        raise Sorry(f"format={fmt}: not one of {', '.join(EXTENSIONS)}")
    module = import_module(f"diffuse_cli.formats.exports.{fmt}")
    return module.write(path, grid_map, params)


def option(params, name, default):
    """``params.name``, or ``default`` when no parameters are given."""
    return default if params is None else getattr(params, name)
