"""Scale and merge corrected diffuse observations onto a 3D hkl grid.

Reads the stills' experiments (cells, orientations, space group) and the
corrected per-still observation files written by diffuse.correct (a directory
or individual files), resolves the indexing ambiguity when the lattice has
higher symmetry than the Laue group, refines one scale factor per still
(optionally with a smooth resolution-dependent term; with scaling.model=full
also an absorption surface per still, a detector response per panel and an
additive offset per still) against the merged reference until converged, merges by inverse-variance weighting onto the
asymmetric unit of the Laue group, and writes:

  merged.npz        dense I, sigma, counts [h,k,l] + axes, cell, space group
  merged.ccp4       the map for ChimeraX / Coot / PyMOL (reciprocal space)
  slice_hk0.png, slice_h0l.png, slice_0kl.png, I_vs_q.png
  statistics.json   CC1/2 (total and anisotropic, block halves), Friedel CC,
                    completeness, multiplicity (per shell; statistics.png)
  scales.json       per-still scales, residuals, reindexing
  scaling_*.png     (scaling.model=full) each refined scaling term
  absolute_scale.png (with composition=...): Krogh-Moe scale to electron units
  wilson_plot.png   (Bragg peaks masked, B estimated): Wilson plot of the Bragg data

Memory is bounded by the grid, not by the number of observations: stills
are streamed one at a time (and in chunks within a still). With
mp.method=mpi under mpirun, ranks share the stills and sum their grids.

Examples:

  diffuse.merge combined.expt corrected/ ndiv=3 space_group=P43212 \\
      output.directory=merged

  diffuse.merge combined.expt corrected/*.npz ndiv=2 d_min=2.5 \\
      composition=C:1200,N:300,O:400,S:10,H:1900

  mpirun -n 4 diffuse.merge combined.expt corrected/ mp.method=mpi
"""

from __future__ import annotations

import logging
import os

from diffuse_cli import dials_compat

dials_compat.defer_imports()  # before DIALS is imported: sklearn and pandas only when used

from diffuse_cli import merge_driver, program  # noqa: E402
from diffuse_cli.absolute_scale_plan import _bragg_peaks_masked  # noqa: F401,E402
from diffuse_cli.merge_driver import merge, scaling_model  # noqa: F401,E402
from diffuse_cli.merge_inputs import _half_blocks, _warn_spreads, corrected_files, reference_model  # noqa: F401,E402

logger = logging.getLogger("diffuse.merge")

phil_scope = program.parse_phil(
    """
space_group = None
  .type = str
  .help = "Space group for merging (its Laue group is used). Default: the"
          "experiments' space group."
grid {
  ndiv = 3
    .type = ints(size_min=1, size_max=3, value_min=1)
    .help = "Voxels per reciprocal-lattice unit along h, k, l (one or three)."
  d_min = None
    .type = float(value_min=0)
    .help = "High-resolution limit (Å). Default: the detector corner of the"
            "first experiment."
  d_max = None
    .type = float(value_min=0)
    .help = "Low-resolution limit (Å). Default: none (the origin is included)."
}
ndiv = None
  .type = ints(size_min=1, size_max=3, value_min=1)
  .help = "Shortcut for grid.ndiv."
d_min = None
  .type = float(value_min=0)
  .help = "Shortcut for grid.d_min."
d_max = None
  .type = float(value_min=0)
  .help = "Shortcut for grid.d_max."
ambiguity {
  resolve = *auto true false
    .type = choice
    .help = "Resolve the indexing ambiguity when the lattice symmetry is"
            "higher than the Laue group (auto: whenever it is)."
  ndiv = 1
    .type = int(value_min=1)
    .help = "Voxels per lattice unit of the coarse grid used for the"
            "still-to-still correlations."
  d_min = None
    .type = float(value_min=0)
    .help = "Resolution limit (Å) of the ambiguity analysis (default: grid.d_min)."
  max_delta = 3.0
    .type = float(value_min=0)
    .help = "Tolerance (degrees) for the lattice symmetry search (cctbx)."
  min_overlap = 10
    .type = int(value_min=2)
    .help = "Fewest common coarse voxels for a pair of stills to count."
  seed = 0
    .type = int
  dense_max = 1000
    .type = int(value_min=2)
    .help = "Up to this many stills (sweeps count as one), correlate all pairs;"
            "above it, resolve a random subset by all pairs and assign every"
            "still against the subset's mean (memory and time linear in the"
            "number of stills)."
  subset = 500
    .type = int(value_min=2)
    .help = "Stills resolved by all pairs when there are more than dense_max."
  max_passes = 5
    .type = int(value_min=0)
    .help = "Above dense_max: passes reassigning every still against the mean"
            "of all the others, until none changes."
}
scaling {
  enable = True
    .type = bool
    .help = "Refine one scale per still against the merged reference."
  model = *simple full
    .type = choice
    .help = "simple: I = g_i(d*^2)·I_ref. full: I = a_i(u,v)·d(panel,x,y)·g_i·"
            "(I_ref + c_i(|s|)) with an absorption surface per still over the"
            "scattered-beam direction, a detector response per panel and an"
            "additive offset per still (each switchable below; docs/merge.md)."
  absorption {
    enable = None
      .type = bool
      .help = "Absorption a_i(u,v) over u, v = lab x, y of s1 (None: as model)."
    n_nodes = 5
      .type = int(value_min=2)
      .help = "Nodes per axis of the bilinear grid over (u, v)."
    smoothness = 30.0
      .type = float(value_min=0)
      .help = "Curvature (thin-plate) prior weight relative to the data:"
              "lambda·tr(N)/tr(B'B). A quadratic absorption is degenerate with an"
              "anisotropic modulation of the map; this prior resolves it."
  }
  detector {
    enable = None
      .type = bool
      .help = "Detector response d(panel, x, y), shared by all stills (None: as model)."
    n_nodes = 6
      .type = int(value_min=2)
      .help = "Nodes per axis of the bilinear grid over each panel."
    smoothness = 1.0
      .type = float(value_min=0)
      .help = "Curvature prior weight relative to the data (per panel)."
  }
  offset {
    enable = None
      .type = bool
      .help = "Additive offset c_i(|s|) per still, in merged-map units (None: as model)."
    n_nodes = 8
      .type = int(value_min=2)
      .help = "Nodes of the piecewise-linear function of |s| on [0, 1/d_min]."
    smoothness = 1.0
      .type = float(value_min=0)
      .help = "Curvature prior weight relative to the data."
  }
  neighbour_prior = 0.5
    .type = float(value_min=0)
    .help = "Rotation frames: prior weight tying a frame's absorption and offset"
            "to the mean of its neighbouring frames (smooth in phi). 0: independent."
  n_control_points = 1
    .type = int(value_min=1)
    .help = "1: constant scale per still. >1: piecewise-linear scale in d*^2"
            "with this many nodes (smooth resolution-dependent term)."
  max_iterations = 10
    .type = int(value_min=1)
  tolerance = 1e-3
    .type = float(value_min=0)
    .help = "Stop when no still's scale changes by more than this (relative)."
  fit_max_obs = 200000
    .type = int(value_min=100)
    .help = "Observations per still used to fit its scale (random subset)."
}
merging {
  reject_sigma = 6.0
    .type = float(value_min=0)
    .help = "Leave out an observation whose residual from the scaled reference "
            "exceeds this many robust sigmas (stray Bragg peaks, hot pixels). "
            "None keeps every observation."
  half_dataset_seed = 0
    .type = int
    .help = "Seed of the random split of stills into halves (CC1/2)."
  half_block_deg = 5.0
    .type = float(value_min=0)
    .help = "Rotation data: the CC1/2 halves are drawn by blocks of this much"
            "rotation (degrees), not by frame, since neighbouring frames share"
            "pixels and systematic errors. Stills: by still."
  friedel_cc = True
    .type = bool
    .help = "Also merge h and -h apart (point group without inversion) and"
            "report their correlation per shell (Friedel CC), a check of"
            "systematic errors such as absorption."
  n_shells = 10
    .type = int(value_min=1)
  allow_multiple_crystals = False
    .type = bool
    .help = "Merge stills of several crystals (one experiment-list file each):"
            "each further crystal is reindexed onto the first file's crystal by"
            "the integer change of basis that matches its cell. False: stills of"
            "a second .expt file are refused."
  cell_tolerance {
    length = 0.02
      .type = float(value_min=0)
      .help = "Largest relative difference of a, b, c between a still's cell"
              "(from its A) and the reference crystal's (median) cell."
    angle = 2.0
      .type = float(value_min=0)
      .help = "Largest difference of alpha, beta, gamma (degrees)."
  }
}
absolute_scale {
  composition = None
    .type = str
    .help = "Atoms, e.g. C:1200,N:300,O:400,S:10,H:1900 (see composition_per)."
  composition_per = *unit_cell asu
    .type = choice
    .help = "The composition counts atoms per unit cell or per asymmetric"
            "unit (multiplied by the number of ASUs, Z)."
  fit_d_min = None
    .type = float(value_min=0)
    .help = "High-resolution end (Å) of the Krogh-Moe fit (default: data limit)."
  fit_d_max = None
    .type = float(value_min=0)
    .help = "Low-resolution end (Å) of the fit (default: outer 40% in d*)."
  wilson_b = None
    .type = float(value_min=0)
    .help = "Å^2. Wilson B of the Bragg data, for a map whose Bragg peaks were"
            "masked: the theory is then the scattering left between them,"
            "(1 - exp(-B d*^2/2)) sum f^2 + sum I_inc. None: estimated from the"
            "integrated Bragg intensities (see wilson) when the peaks were masked."
  bragg_peaks = *auto masked kept
    .type = choice
    .help = "Were the Bragg peaks masked out of the map? masked: theory"
            "(1 - exp(-B d*^2/2)) sum f^2 + sum I_inc; kept: sum f^2 + sum I_inc."
            "auto: as diffuse.extract's summary.json records (bragg_masks); if it"
            "does not, masked for diffuse.correct files (the default chain masks"
            "them) or when wilson_b is given, otherwise kept (with a warning)."
  wilson {
    reflections = None
      .type = path
      .help = "Integrated Bragg reflections (.refl) for the Wilson B estimate."
              "Default: the .refl beside the .expt with the same stem (e.g."
              "combined.refl from diffuse.stills_process). Only with one .expt."
    d_max = 4.0
      .type = float(value_min=0)
      .help = "Low-resolution end (Å) of the Wilson fit (a protein's Wilson plot"
              "is not straight below about 4 Å)."
    d_min = None
      .type = float(value_min=0)
      .help = "High-resolution end (Å) of the Wilson fit (default: the reflections' limit)."
  }
}
composition = None
  .type = str
  .help = "Shortcut for absolute_scale.composition."
warn_smear_voxels = 0.5
  .type = float(value_min=0)
  .help = "Warn when the cell (or orientation) spread moves hkl at d_min by"
          "more than this many voxels."
mp {
  method = *serial mpi
    .type = choice
  chunk_size = 4000000
    .type = int(value_min=1000)
    .help = "Observations per accumulation chunk (bounds temporary memory)."
}
output {
  directory = merged
    .type = path
  prefix = merged
    .type = str
    .help = "merged.npz / merged.ccp4 file stem."
  plots = True
    .type = bool
    .help = "Write the pictures (slice_*.png, I_vs_q.png, statistics.png, scaling_*.png,"
            "absolute_scale.png, wilson_plot.png). False: the maps, statistics and JSON files"
            "only (the pictures are about 1 CPU-s of a small merge)."
}
""",
    program="merge",
)


@program.entry_point("merge")
def run(args=None, phil=phil_scope):
    from libtbx.utils import Sorry

    parser = program.ArgumentParser(
        usage="diffuse.merge combined.expt corrected/ [options]",
        phil=phil,
        read_experiments=True,
        read_reflections=False,
        check_format=False,
        epilog=__doc__,
        require_crystals=True,
    )
    import sys

    args = list(sys.argv[1:] if args is None else args)
    # corrected-observation directories / .npz files are ours, not DIALS's
    # (a missing one falls through to the parser: "Sorry: File not found: x")
    ours = [a for a in args if not a.startswith("-") and "=" not in a
            and (os.path.isdir(a) or (a.endswith(".npz") and os.path.isfile(a)))]
    rest = [a for a in args if a not in ours]
    if ours and not rest:
        raise Sorry("No experiments given (need the .expt from diffuse.stills_process)")
    params, options = parser.parse_args(rest)
    comm = None
    if params.mp.method == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank = comm.Get_rank() if comm is not None else 0
    if rank == 0:
        program.configure_logging("merge", params, options)
        program.log_diff_phil(parser)
    else:
        logging.getLogger("diffuse").setLevel(logging.WARNING)
    merge_driver.run_merge(params, ours, comm=comm)
