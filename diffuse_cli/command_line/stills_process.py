"""Index and integrate stills (and rotation frames) with DIALS, for diffuse work.

diffuse.stills_process drives DIALS stills processing through its Python API
(one ``dials.command_line.stills_process.Processor`` call chain per image),
accepts every ``dials.stills_process`` parameter (spot finding, indexing with
known_symmetry, refinement, integration, reference_geometry), and adds:

- one summary row per input image (``stills_process_summary.csv``/``.json``):
  status (indexed / not a hit / failed / failed validation) and reason, route,
  unit cell, numbers of spots/indexed/integrated reflections, RMSD (px) and
  q-consistency (mean and max |q_obs − A·h|, Å⁻¹);
- per-still ``stills/<image>_integrated.expt/.refl`` (with ``partiality`` and,
  by default, shoeboxes) and ONE combined pair ``combined.expt``/``.refl``
  holding every indexed still (experiment identifier = image tag);
- QC pictures ``qc_*.png`` (indexing rate, unit cells, RMSD and q-consistency,
  partiality);
- resume: a rerun skips stills already done with the same input and
  parameters (``overwrite=True`` redoes them);
- local processes (``nproc=N``) or MPI (``mp.method=mpi`` under mpirun).

Inputs are image files, directories, globs (quote them, or use
``input.glob=``), multi-image containers (HDF5/NeXus: one row per frame) or
imported ``.expt`` files. Route: zero-oscillation images are processed as
stills; rotation frames (oscillation > 0, or a header width of 0 with a
goniometer angle that advances steadily from image to image) are either
imported as a sweep and indexed/refined/integrated as rotation data (route
``sequence``) or processed as stills of their width with
``rotation_frames.*`` limits (route ``rotation_as_stills``); see
processing_mode. The summary says which route each image took.

Examples::

  diffuse.stills_process images/*.cbf \\
      indexing.known_symmetry.space_group=P41212 \\
      indexing.known_symmetry.unit_cell=58.4,58.4,152.3 nproc=4

  diffuse.stills_process data/ output.directory=sp mp.method=mpi   # under mpirun

  diffuse.stills_process idx-*.cbf spotfinder.threshold.dispersion.gain=25 \\
      spotfinder.threshold.dispersion.global_threshold=100 \\
      spotfinder.filter.min_spot_size=2 indexing.refinement_protocol.d_min_start=2

  diffuse.stills_process my_params.phil images/ overwrite=True

  diffuse.stills_process shots/ integration.sample=20 nproc=8   # XFEL mode

  diffuse.stills_process snc_*.img processing_mode=sequence \\
      indexing.known_symmetry.space_group=P4
"""

from __future__ import annotations

import glob
import logging
import os
import sys

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import program
from diffuse_cli.stills import drivers

from libtbx.utils import Sorry

logger = logging.getLogger("diffuse.stills_process")

phil_scope = program.parse_phil(
    """
include scope dials.command_line.stills_process.phil_scope

processing_mode = *auto stills sequence
  .type = choice
  .help = "Route selection. Zero-width images are always stills. Rotation "
          "frames: sequence -> imported as a sweep (scan rebuilt from the "
          "image angles), found spots, indexed, refined (sequence.scan_varying) "
          "and integrated as rotation data (route sequence); stills -> "
          "processed as stills of their width with rotation_frames.* limits "
          "(route rotation_as_stills); auto -> sequence when the header gives "
          "a width > 0, rotation_as_stills when the header says 0 but the "
          "goniometer angle advances."
overwrite = False
  .type = bool
  .help = "Reprocess stills that already have a done-record from an earlier run "
          "with the same input and parameters."
integration {
  sample = None
    .type = int(value_min=1)
    .help = "XFEL mode: integrate only this many stills (route stills; evenly "
            "spaced over the inputs, topped up from the other indexed stills when "
            "some fail), and index and refine the rest: their refined models "
            "(with the profile model DIALS would integrate with, and its sigma_b "
            "cutoff) and indexed spots go to the combined files. diffuse.bragg_mask "
            "takes their Bragg mask size from the integrated sample, diffuse.merge "
            "its Wilson B. None: integrate every still."
}
sequence {
  scan_varying = False
    .type = bool
    .help = "Scan-varying refinement of the crystal model on the sequence route."
  refine_detector = True
    .type = bool
    .help = "Refine the detector (and the beam direction in the spindle plane) "
            "with the crystal on the sequence route, as dials.index/dials.refine "
            "do by default for a sweep; stills_process's own defaults fix both."
}
rotation_frames {
  ewald_proximal_volume_max = 0.01
    .type = float(value_min=0)
    .help = "indexing.stills.ewald_proximal_volume_max used (at least) for "
            "rotation frames, which record ~Δφ of rotation each."
  sigma_b_cutoff = 0.3
    .type = float(value_min=0)
    .help = "profile.gaussian_rs.parameters.sigma_b_cutoff used (at least) for "
            "rotation frames (degrees)."
  shared_detector = True
    .type = bool
    .help = "Refine one detector jointly against the indexed spots of all the "
            "frames of a dataset processed as stills (route rotation_as_stills; "
            "each frame's orientation and cell free, beam fixed), then process "
            "the frames again with it as reference geometry, so that frames are "
            "not fitted with an untilted header detector. Not used when "
            "input.reference_geometry is given."
  shared_detector_min_frames = 3
    .type = int(value_min=2)
    .help = "Fewest indexed frames of a dataset for the shared detector."
}
q_consistency {
  max_mean_delta_q = 0.005
    .type = float(value_min=0)
    .help = "A still whose mean |q_obs - A.h| over its indexed spots exceeds this "
            "(1/Angstrom, no 2pi) is marked 'failed validation' and left out of "
            "the combined files. None disables the check."
}
output {
  directory = stills_process
    .type = path
    .help = "Directory for all outputs (replaces output.output_dir)."
  integrated_shoeboxes = True
    .type = bool
    .help = "Keep the pixel shoeboxes in the integrated reflections (sets "
            "integration.debug.output=True separate_files=False "
            "delete_shoeboxes=False)."
  indexed_reflections = True
    .type = bool
    .help = "Also write stills/<image>_indexed.refl (the refined strong spots)."
  combined_prefix = combined
    .type = str
    .help = "Combined files <directory>/<prefix>.expt and .refl"
  summary_prefix = stills_process_summary
    .type = str
    .help = "Summary table <directory>/<prefix>.csv and .json"
  plots = True
    .type = bool
    .help = "Write the QC pictures qc_*.png"
}
""",
    program="stills_process",
)


def _expand_glob_args(args):
    """Expand quoted globs on the command line (missing matches stay as they are)."""
    out = []
    for a in args:
        if not a.startswith("-") and "=" not in a and glob.has_magic(a):
            matches = sorted(glob.glob(a))
            out.extend(matches if matches else [a])
        else:
            out.append(a)
    return out


def _mpi_comm(params):
    if params.mp.method != "mpi":
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise Sorry("mp.method=mpi needs mpi4py")
    return MPI.COMM_WORLD


@program.entry_point("stills_process")
def run(args=None, phil=phil_scope):
    usage = "diffuse.stills_process [options] [param.phil] images|directories|globs|imported.expt"
    parser = program.ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=False,
        read_reflections=False,
        check_format=False,
        epilog=__doc__,
    )
    if args is None:
        args = sys.argv[1:]
    params, options, paths = parser.parse_args(_expand_glob_args(args), return_unhandled=True)
    comm = _mpi_comm(params)
    rank = comm.Get_rank() if comm is not None else 0
    directory = os.path.abspath(params.output.directory)
    params.output.directory = directory
    if rank != 0:
        os.makedirs(os.path.join(directory, "logs"), exist_ok=True)
        params.output.log = os.path.join(directory, "logs", f"rank{rank:04d}.log")
    program.configure_logging("stills_process", params, options)
    if rank == 0:
        program.log_diff_phil(parser)

    return drivers.run_stills_process(params, paths, parser.phil, comm)


if __name__ == "__main__":
    run()
