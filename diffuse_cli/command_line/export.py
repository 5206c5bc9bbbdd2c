"""Export a 3D diffuse map to the formats other diffuse-scattering tools read.

Reads merged.npz from diffuse.merge, or any .npz on the same hkl grid
(schema, I, sigma, h, k, l, unit_cell; counts, space_group optional), and
writes, into output.directory, <prefix>.<ext> for each chosen format:

  hdf5   .h5   Yell's HDF5 arrays (data, lower_limits, step_sizes, unit_cell)
  nexus  .nxs  NeXus/HDF5: NXdata with intensity, errors, counts, axes h, k, l
  lat    .lat  Lunus lattice (LAT3D binary)
  vtk    .vtk  legacy VTK structured points (ParaView, Lunus)
  mtz    .mtz  MTZ of the voxels at integer hkl: I, SIGI (Phenix, CCP4)
  csv    .csv  the non-empty voxels: h, k, l, I, sigma, counts

Choose several formats with + (format=hdf5+mtz) or by repeating format=.
The prefix defaults to the input file's name without .npz. Layouts, units
and how each format marks unmeasured voxels: docs/export.md.

Examples::

  diffuse.export merged/merged.npz format=hdf5+mtz

  diffuse.export merged/merged.npz format=nexus format=csv output.directory=exports

  diffuse.export merged/merged.npz format=vtk vtk.encoding=binary vtk.unmeasured=nan

  diffuse.export merged/merged.npz format=hdf5 hdf5.weights=True hdf5.fft_grid=True

  diffuse.export merged/merged.npz format=lat+vtk output.prefix=lysozyme
"""

from __future__ import annotations

import logging
import os
import sys

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from libtbx.utils import Sorry

from diffuse_cli import program
from diffuse_cli.formats.exports import EXTENSIONS

logger = logging.getLogger("diffuse.export")

phil_scope = program.parse_phil(
    """
input {
  map = None
    .type = path
    .multiple = True
    .help = "A map on the hkl grid: merged.npz from diffuse.merge, or any .npz with"
            "schema, I, sigma, h, k, l and unit_cell. A plain argument lands here."
}
format = %s
  .type = choice(multi=True)
  .help = "Formats to write; several with + (format=hdf5+mtz) or repeated format=."
hdf5 {
  fill = None
    .type = float
    .help = "Value written in unmeasured voxels (default: NaN). Yell needs finite"
            "values: fill=0 with weights=True."
  fft_grid = False
    .type = bool
    .help = "Drop the last plane along each axis, so the size is even and the"
            "origin at n/2, as Yell's FFT (approximate method, delta-PDF) needs."
  weights = False
    .type = bool
    .help = "Also write <prefix>_weights.h5 (Yell weights: 1/sigma, 0 where"
            "unmeasured); unmeasured data are then 0 unless fill is set."
}
vtk {
  field = *intensity sigma counts
    .type = choice
    .help = "The one scalar field written (Lunus reads one per file)."
  encoding = *ascii binary
    .type = choice
    .help = "ascii (Lunus and ParaView) or binary (big-endian; ParaView)."
  coordinates = *hkl lunus
    .type = choice
    .help = "hkl: origin and spacing in Miller units (1/ndiv). lunus: Lunus's"
            "inverse-Angstrom scale 1/(a*ndiv), as in the .lat export."
  unmeasured = *mask_tag nan
    .type = choice
    .help = "Unmeasured voxels: Lunus's mask tag -32768, or NaN."
}
mtz {
  unique = True
    .type = bool
    .help = "Only the reflections in the space group's asymmetric unit (the"
            "merged map is symmetry-expanded); False: every integer hkl, in P1."
}
output {
  directory = exports
    .type = path
    .help = "The exported files go here."
  prefix = None
    .type = str
    .help = "File name without extension. Default: the input's, without .npz"
            "(with one input map only)."
}
""" % " ".join(EXTENSIONS),
    program="export",
)

_PHIL_EXTENSIONS = (".phil", ".param", ".params", ".eff", ".def")


def _split_args(args) -> list[str]:
    """Plain arguments are maps (input.map=); repeated format= are joined with +."""
    # a bare number is the level of -a/-e (-c -a 2), not a file
    is_map = lambda a: not a.lower().endswith(_PHIL_EXTENSIONS) and not a.isdigit()  # noqa: E731
    args = program.plain_args_to_phil(args, [(is_map, "input.map")])
    formats = [a.split("=", 1)[1] for a in args if a.startswith("format=")]
    rest = [a for a in args if not a.startswith("format=")]
    return rest + (["format=" + "+".join(f for f in formats if f)] if formats else [])


def _sizes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.1f} kB"


@program.entry_point("export")
def run(args=None, phil=phil_scope):
    from diffuse_cli.formats import exports

    parser = program.ArgumentParser(
        usage="diffuse.export merged.npz format=hdf5+mtz [options]",
        phil=phil,
        epilog=__doc__,
    )
    params, options = parser.parse_args(_split_args(list(args) if args is not None else sys.argv[1:]))
    program.configure_logging("export", params, options)
    program.log_diff_phil(parser)

    maps = program.unique_paths(params.input.map)
    if not maps:
        raise Sorry("No map given: diffuse.export merged.npz format=hdf5+mtz")
    formats = [f for f in (params.format or []) if f]
    if not formats:
        raise Sorry(f"format: none chosen; give one or more of {', '.join(EXTENSIONS)} (e.g. format=hdf5+mtz)")
    if params.output.prefix and len(maps) > 1:
        raise Sorry("output.prefix: give it with one input map only (each map is named after its file)")
    prefixes = [params.output.prefix or os.path.splitext(os.path.basename(m))[0] for m in maps]
    if len(set(prefixes)) < len(prefixes):
        raise Sorry(f"input.map: maps with the same file name ({', '.join(maps)}) would overwrite each other's "
                    "exports; export them one at a time with output.prefix")

    summary = []
    for path, prefix in zip(maps, prefixes):
        grid_map = exports.read_map(path)
        logger.info("%s: %s map, %d x %d x %d voxels (%d measured), cell %s, space group %s",
                    path, grid_map.schema, *grid_map.shape, int(grid_map.measured.sum()),
                    ", ".join(f"{v:g}" for v in grid_map.unit_cell), grid_map.space_group)
        for fmt in formats:
            target = os.path.join(params.output.directory, prefix + EXTENSIONS[fmt])
            for written in exports.write(fmt, target, grid_map, getattr(params, fmt, None)):
                size = os.path.getsize(written)
                logger.info("  %-5s -> %s (%s)", fmt, written, _sizes(size))
                summary.append({"map": path, "format": fmt, "file": written, "bytes": size})
    program.write_json(os.path.join(params.output.directory, "export.json"), {"exports": summary})
    logger.info("Exports listed in %s", os.path.join(params.output.directory, "export.json"))
