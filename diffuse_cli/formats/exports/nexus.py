"""NeXus/HDF5 (``.nxs``): the map as an NXdata group that NeXus readers plot.

Layout::

  /                      NX_class=NXroot, default=entry, creator, file_name
  /entry                 NXentry, default=data; title, program_name
  /entry/data            NXdata, signal=intensity, axes=[h, k, l],
                         h_indices=0, k_indices=1, l_indices=2,
                         auxiliary_signals=[counts]
    intensity            float32 [h, k, l], NaN where unmeasured; units
    intensity_errors     float32 [h, k, l] (σ), NaN where unmeasured
    counts               int64 [h, k, l], observations per voxel (if known)
    h, k, l              float64 voxel centres, units "rlu" (Miller units)
  /entry/sample          NXsample: unit_cell (1, 6), unit_cell_abc (Å),
                         unit_cell_alphabetagamma (degrees), space_group,
                         laue_group
"""

from __future__ import annotations

import os

import numpy as np

from diffuse_cli.formats.exports import GridMap


def write(path, grid_map: GridMap, params=None) -> list[str]:
    import h5py

    from diffuse_cli import __version__, program

    strings = h5py.string_dtype()
    intensity = np.where(grid_map.measured, grid_map.I, np.nan).astype(np.float32)
    errors = np.where(grid_map.measured, grid_map.sigma, np.nan).astype(np.float32)
    with program.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["NX_class"] = "NXroot"
            fh.attrs["default"] = "entry"
            fh.attrs["file_name"] = os.path.basename(os.fspath(path))
            fh.attrs["creator"] = f"diffuse.export {__version__}"
            entry = fh.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "data"
            entry.create_dataset("title", data=f"diffuse map from {grid_map.source}", dtype=strings)
            entry.create_dataset("program_name", data=f"diffuse {__version__}", dtype=strings)
            data = entry.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "intensity"
            data.attrs["axes"] = np.array(["h", "k", "l"], dtype=object).astype(strings)
            for i, name in enumerate("hkl"):
                data.attrs[f"{name}_indices"] = np.int32(i)
            d = data.create_dataset("intensity", data=intensity, compression="gzip", compression_opts=1)
            d.attrs["units"] = grid_map.units
            d.attrs["long_name"] = f"I ({grid_map.units})" if grid_map.units else "I"
            e = data.create_dataset("intensity_errors", data=errors, compression="gzip", compression_opts=1)
            e.attrs["units"] = grid_map.units
            if grid_map.counts is not None:
                data.attrs["auxiliary_signals"] = np.array(["counts"], dtype=object).astype(strings)
                c = data.create_dataset("counts", data=grid_map.counts, compression="gzip", compression_opts=1)
                c.attrs["long_name"] = "observations per voxel"
            for name, axis in zip("hkl", grid_map.axes):
                a = data.create_dataset(name, data=axis)
                a.attrs["units"] = "rlu"
                a.attrs["long_name"] = f"{name} (r.l.u.)"
            sample = entry.create_group("sample")
            sample.attrs["NX_class"] = "NXsample"
            cell = np.asarray(grid_map.unit_cell, dtype=np.float64)
            sample.create_dataset("unit_cell", data=cell.reshape(1, 6))
            abc = sample.create_dataset("unit_cell_abc", data=cell[:3])
            abc.attrs["units"] = "angstrom"
            angles = sample.create_dataset("unit_cell_alphabetagamma", data=cell[3:])
            angles.attrs["units"] = "degrees"
            sample.create_dataset("space_group", data=grid_map.space_group, dtype=strings)
            sample.create_dataset("laue_group", data=grid_map.laue_group, dtype=strings)
    return [os.fspath(path)]
