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

import glob
import logging
import os

import numpy as np

from diffuse_cli import program
from diffuse_cli.formats import corrected as corrected_format
from diffuse_cli.formats import extract as extract_format
from diffuse_cli.formats import factors as factors_format
from diffuse_cli.formats import merged as merged_format
from diffuse_cli.formats import summaries

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
}
""",
    program="merge",
)


def _resolve_shortcuts(params):
    if params.ndiv:
        params.grid.ndiv = params.ndiv
    if params.d_min:
        params.grid.d_min = params.d_min
    if params.d_max:
        params.grid.d_max = params.d_max
    if params.composition:
        params.absolute_scale.composition = params.composition


def scaling_model(sp, d_min: float):
    """ScaleModel (scaling.model=simple, no extra term) or ScalingTerms from the scaling scope."""
    from diffuse_cli.scaling import ScaleModel, ScalingTerms, TermSettings

    base = ScaleModel(sp.n_control_points, d_star_sq_max=1.0 / d_min**2)
    full = sp.model == "full"

    def term(t):
        on = full if t.enable is None else bool(t.enable)
        return TermSettings(on, t.n_nodes, t.smoothness)

    a, d, c = term(sp.absorption), term(sp.detector), term(sp.offset)
    if not (a.enable or d.enable or c.enable):
        return base
    return ScalingTerms(base, absorption=a, detector=d, offset=c, neighbour_prior=sp.neighbour_prior)


def _frame_neighbours(experiments, experiment_index, frames) -> np.ndarray:
    """(n_stills, 2) previous/next frame of the same rotation experiment (−1: none; stills: none)."""
    from diffuse_cli.extraction import is_rotation

    n = len(experiment_index)
    out = np.full((n, 2), -1, dtype=np.int64)
    by_exp: dict = {}
    for j, (i, a) in enumerate(zip(experiment_index, frames)):
        if i is not None and a is not None and a >= 0 and is_rotation(experiments[i]):
            by_exp.setdefault(i, []).append((a, j))
    for items in by_exp.values():
        items.sort()
        for k, (a, j) in enumerate(items):
            if k > 0 and a - items[k - 1][0] == 1:
                out[j, 0] = items[k - 1][1]
            if k + 1 < len(items) and items[k + 1][0] - a == 1:
                out[j, 1] = items[k + 1][1]
    return out


def corrected_files(paths: list[str]) -> list[str]:
    """Per-still corrected files from directories and file names (sorted, no duplicates).

    In a directory: every ``.npz`` but diffuse.correct's per-detector files
    (``factors_*``, ``background.npz``) and other programs' files; an
    unreadable one is kept, for the batch rule to record (:func:`readable_stills`).
    """
    from libtbx.utils import Sorry

    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                f for f in glob.glob(os.path.join(p, "*.npz"))
                if not os.path.basename(f).startswith(("factors_", "background.", "geometry_"))
                and corrected_format.probe(f) in ("still", "unreadable")
            )
            if not found:
                raise Sorry(f"No corrected per-still .npz files in {p}")
            files.extend(found)
        elif p.endswith(".npz"):
            files.append(p)
        else:
            raise Sorry(f"Not a corrected-observation file or directory: {p}")
    seen = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def readable_stills(files) -> tuple[list[str], list[dict]]:
    """The batch rule: (stills that can be merged, summary rows of those that cannot).

    A corrected still is checked with the files it needs (its extract, by
    content fingerprint, and its factors file); a bad one is a ``failed`` row
    with the reason, and the merge goes on without it.
    """
    from libtbx.utils import Sorry

    good, failed = [], []
    for f in files:
        try:
            schema = corrected_format.schema_of(f)
            if schema == corrected_format.OBSERVATIONS_SCHEMA:
                corrected_format.read_observations(f)
            else:
                still = corrected_format.read_corrected(f)
                extract_format.read_extract_header(corrected_format.extract_path(f, still))
                factors = os.path.join(os.path.dirname(os.path.abspath(f)), str(still["factors_file"]))
                factors_format.read_factors(factors, fields=("geometry_key",))
        except Sorry as e:
            failed.append({"name": os.path.basename(f), "status": "failed", "reason": str(e)})
            continue
        good.append(f)
    return good, failed


def load_still(path: str, cache: dict | None = None, with_geometry: bool = False) -> dict:
    """Observations of one still: dict(hkl (N,3), I (N,), sigma (N,), ...).

    diffuse.correct files (schema diffuse.correct/3) are read with
    ``diffuse_cli.corrections.load_observations`` (upstream). Files that
    already hold ``hkl``, ``I`` and ``sigma`` arrays (schema
    ``diffuse.observations/1``) are read directly.
    """
    from libtbx.utils import Sorry

    schema = corrected_format.schema_of(path)
    if schema == corrected_format.OBSERVATIONS_SCHEMA:
        return corrected_format.read_observations(path)
    if schema == corrected_format.CORRECT_SCHEMA:
        from diffuse_cli.corrections import load_observations

        return load_observations(path, cache=cache, with_pixels=with_geometry)
    raise Sorry(f"{path}: schema {schema!r}, expected {' or '.join(map(repr, corrected_format.STILL_SCHEMAS))}")


class FileSource:
    """StillSource over corrected files (loaded one at a time).

    operators: per file, None or the integer change of basis M (h' = h @ M)
    that puts its crystal onto the reference crystal (several crystals).
    """

    def __init__(self, files, operators=None):
        self.files = list(files)
        self.operators = list(operators) if operators is not None else [None] * len(self.files)
        self._cache: dict = {}  # per-detector factors, shared between stills
        self.with_geometry = False  # pixel positions and ŝ1 (scaling.model=full)

    def __len__(self):
        return len(self.files)

    def load(self, i):
        from libtbx.utils import Sorry

        obs = load_still(self.files[i], self._cache, self.with_geometry)
        if self.with_geometry and not {"s1_xy", "panel"} <= set(obs):
            raise Sorry(f"{self.files[i]}: no pixel positions or directions for the absorption/detector "
                        "scaling terms (only diffuse.correct files have them); use scaling.model=simple")
        M = self.operators[i]
        if M is not None:
            obs = dict(obs, hkl=np.asarray(obs["hkl"]) @ np.asarray(M, dtype=np.asarray(obs["hkl"]).dtype))
        return obs


def reference_model(experiments, laue, reindex_by_experiment=None):
    """Average cell (symmetrised), mean orientation and their spreads.

    Cells: parameter-wise mean, then the space group's metric imposed.
    Orientation: proper-rotation mean (scipy Rotation.mean) of the U matrices,
    after reindexing; spread: rms misorientation angle (degrees).
    """
    from scipy.spatial.transform import Rotation

    from diffuse_cli.merging import cell_of

    cells = []
    Us = []
    Bref = np.array(experiments[0].crystal.get_B()).reshape(3, 3)
    for i, e in enumerate(experiments):
        A = np.array(e.crystal.get_A()).reshape(3, 3)
        M = None if reindex_by_experiment is None else reindex_by_experiment.get(i)
        if M is not None:
            A = A @ np.linalg.inv(np.asarray(M, dtype=np.float64)).T
        cells.append(cell_of(A) if M is not None else e.crystal.get_unit_cell().parameters())
        B = np.array(e.crystal.get_B()).reshape(3, 3) if M is None else Bref
        u, _, vt = np.linalg.svd(A @ np.linalg.inv(B))
        U = u @ vt
        if np.linalg.det(U) < 0:
            U = -U
        Us.append(U)
    cells = np.array(cells, dtype=np.float64)
    mean_cell = laue.symmetrize_cell(cells.mean(axis=0))
    rot = Rotation.from_matrix(np.array(Us))
    mean = rot.mean()
    angles = np.degrees((mean.inv() * rot).magnitude())
    return {
        "cells": cells,
        "unit_cell": mean_cell,
        "cell_rms": cells.std(axis=0),
        "U_mean": mean.as_matrix(),
        "orientation_rms_deg": float(np.sqrt(np.mean(angles**2))),
        "orientation_max_deg": float(angles.max()),
    }


def detector_d_min(experiments) -> float:
    """Smallest d (Å) reached at any panel corner of any experiment."""
    best = 0.0
    for e in experiments[:50]:
        s0 = np.array(e.beam.get_s0())
        for panel in e.detector:
            nf, ns = panel.get_image_size()
            for f, s in ((0, 0), (nf, 0), (0, ns), (nf, ns)):
                mm = panel.pixel_to_millimeter((f, s))
                lab = np.array(panel.get_lab_coord(mm))
                s1 = lab / np.linalg.norm(lab) * np.linalg.norm(s0)
                best = max(best, float(np.linalg.norm(s1 - s0)))
    return 1.0 / best


@program.entry_point("merge")
def run(args=None, phil=phil_scope):
    from libtbx.utils import Sorry

    from dials.util.options import flatten_experiments

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
    unhandled = ours
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
    _resolve_shortcuts(params)
    program.check_resolution_limits(params.grid, "grid.")
    try:
        experiments = flatten_experiments(params.input.experiments)
    except RuntimeError as e:
        if "already in ExperimentList" not in str(e):
            raise
        names = ", ".join(w.filename for w in params.input.experiments)
        raise Sorry(f"{names}: {e}: experiment lists with the same identifiers (images of the same "
                    "names?) cannot be merged together") from e
    if len(experiments) == 0:
        raise Sorry("No experiments given (need the .expt from diffuse.stills_process)")
    if any(e.crystal is None for e in experiments):
        raise Sorry("Every experiment needs a crystal model (indexed stills)")
    files = corrected_files(unhandled)
    if not files:
        raise Sorry("No corrected observation files given (a directory or .npz files)")
    # one experiment-list file = one crystal (merging.allow_multiple_crystals)
    groups = [g for g, w in enumerate(params.input.experiments) for _ in w.data]
    expt_files = [w.filename for w in params.input.experiments]
    merge(experiments, files, params, comm=comm, groups=groups, expt_files=expt_files)


def merge(experiments, files, params, comm=None, groups=None, expt_files=None):
    """The program body (after parsing): see module doc.

    groups: per experiment, the index of the experiment-list file it came
    from (one file = one crystal); expt_files: those files' names.
    """
    from libtbx.utils import Sorry

    from diffuse_cli import absolute_scale as absc
    from diffuse_cli import map_output
    from diffuse_cli.grid import HKLGrid
    from diffuse_cli.merging import (check_stills, format_statistics, scale_and_merge,
                                     shell_statistics, voxel_d_star)
    from diffuse_cli.scaling import ScalingTerms
    from diffuse_cli.symmetry import (LaueSymmetry, ambiguity_operators,
                                      determine_reindexing)

    rank = comm.Get_rank() if comm is not None else 0
    if params.space_group is not None:
        sg_symbol = str(params.space_group)
    else:
        sg_symbol = str(experiments[0].crystal.get_space_group().info())
    try:
        laue = LaueSymmetry(sg_symbol)
    except RuntimeError as e:
        raise Sorry(f"space_group={sg_symbol}: unknown space group") from e
    # the batch rule: a still that cannot be read is recorded and left out
    n_given = len(files)
    files, failed = readable_stills(files)
    summary_path = os.path.join(params.output.directory, "summary.json")
    if failed and rank == 0:
        for row in failed:
            logger.warning("Left out %s", row["reason"])
        if not files:
            summaries.write_summary(summary_path, summaries.MERGE_SUMMARY_SCHEMA, failed, n_merged=0, map="")
            summaries.report_failed("diffuse.merge", failed, n_given, summary_path)
    if not files:
        raise Sorry(f"diffuse.merge: every still failed ({n_given}); the first: {failed[0]['reason']}")
    logger.info("Space group %s, Laue group %s (%d operators); %d stills, %d experiments",
                sg_symbol, laue.laue_symbol, laue.order, len(files), len(experiments))
    # every still must belong to the experiments (identifier + image) with a compatible cell
    tol = params.merging.cell_tolerance
    checked = check_stills(experiments, files, groups, expt_files, tol.length, tol.angle,
                           params.merging.allow_multiple_crystals)
    crystal_ops = checked["reindex"]
    used = sorted({i for i in checked["experiment_index"] if i is not None})
    if used:
        op_of = {i: M for i, M in zip(checked["experiment_index"], crystal_ops) if i is not None}
        n_crystals = len({c for c in checked["crystal"] if c is not None})
        if n_crystals > 1:
            from diffuse_cli.symmetry import _op_string

            for c in sorted({c for c in checked["crystal"] if c is not None}):
                k = checked["crystal"].index(c)
                M = crystal_ops[k]
                logger.info("Crystal %s: %d stills%s", (expt_files or ["?"] * (c + 1))[c],
                            checked["crystal"].count(c), "" if M is None else f", reindexed by {_op_string(M)}")
        ref = reference_model([experiments[i] for i in used], laue,
                              {j: op_of[i] for j, i in enumerate(used) if op_of[i] is not None})
    else:  # files without provenance (diffuse.observations/1)
        ref = reference_model(experiments, laue)
    cell = ref["unit_cell"]
    if params.grid.d_min:
        d_min = params.grid.d_min
    elif all(e.detector is not None and e.beam is not None for e in experiments[:1]):
        d_min = detector_d_min(experiments)
    else:
        raise Sorry("The experiments have no detector/beam models: give d_min=")
    d_max = params.grid.d_max
    ndiv = params.grid.ndiv
    grid = HKLGrid.for_resolution(ndiv, cell, d_min)
    logger.info("Reference cell %s; grid ndiv=%s, hkl_max=%s, shape %s (%.1f M voxels), "
                "d_min %.2f Å", "(" + ", ".join(f"{x:.3f}" for x in cell) + ")",
                grid.ndiv, grid.hkl_max, grid.shape, grid.n_voxels / 1e6, d_min)

    # decided before merging, so that a refusal costs nothing
    abs_plan = absolute_scale_plan(params, experiments, files, expt_files, groups, sg_symbol, laue)

    source = FileSource(files, crystal_ops)
    # indexing ambiguity
    amb = ambiguity_operators(cell, laue, max_delta=params.ambiguity.max_delta)
    reindex = None
    reindexed = []
    if amb.n > 1:
        logger.info("Lattice symmetry is higher than the Laue group: %d indexing choices (%s)",
                    amb.n, ", ".join(amb.names()))
        if params.ambiguity.resolve in ("auto", "true"):
            res = determine_reindexing(
                source, amb, cell, d_min=params.ambiguity.d_min or d_min, d_max=d_max,
                ndiv=params.ambiguity.ndiv, min_overlap=params.ambiguity.min_overlap,
                seed=params.ambiguity.seed, comm=comm,
                groups=_sweep_groups(experiments, checked["experiment_index"]))
            reindex = res["reindex"]
            names = amb.names()
            reindexed = [(files[i], names[a]) for i, a in enumerate(res["assignment"]) if a]
            logger.info("Ambiguity resolved (mean CC between stills %.3f); %d of %d stills "
                        "reindexed", res["mean_cc_same"], len(reindexed), len(files))
            for f, op in reindexed:
                logger.info("  reindexed %s by %s", os.path.basename(f), op)
        else:
            logger.warning("Indexing ambiguity NOT resolved (ambiguity.resolve=false)")
    elif params.ambiguity.resolve == "true":
        logger.info("No indexing ambiguity: the lattice symmetry equals the Laue group")

    _warn_spreads(ref, grid, d_min, params.warn_smear_voxels)

    model = scaling_model(params.scaling, d_min)
    neighbours = None
    if isinstance(model, ScalingTerms):
        source.with_geometry = bool(model.n_a or model.n_d)
        neighbours = _frame_neighbours(experiments, checked["experiment_index"], checked["frame"])
    result = scale_and_merge(
        source, grid, laue, cell, d_min=d_min, d_max=d_max, scale=params.scaling.enable,
        model=model, max_iterations=params.scaling.max_iterations,
        tolerance=params.scaling.tolerance, reindex=reindex,
        half_seed=params.merging.half_dataset_seed, fit_max_obs=params.scaling.fit_max_obs,
        half_blocks=_half_blocks(experiments, checked["experiment_index"], checked["frame"],
                                 params.merging.half_block_deg),
        friedel=params.merging.friedel_cc,
        comm=comm, chunk=params.mp.chunk_size, progress=program.progress,
        reject_sigma=params.merging.reject_sigma, neighbours=neighbours)
    merged = result.merged
    if len(set(result.half.tolist())) < 2:
        logger.warning("CC1/2 not available: fewer than two half-dataset blocks (rotation data is "
                       "split by merging.half_block_deg=%g degrees of rotation)", params.merging.half_block_deg)
    if params.scaling.enable:
        logger.info("Scaling: %s after %d iterations (max relative change %s)",
                    "converged" if result.converged else "NOT converged", result.iterations,
                    f"{result.history[-1]:.1e}" if result.history else "n/a")
    stats = shell_statistics(merged, cell, params.merging.n_shells, d_min=d_min, d_max=d_max)
    if rank != 0:
        return result
    logger.info("Merged %d observations\n%s", result.n_observations, format_statistics(stats))
    _log_scales(result, files)

    out = params.output.directory
    os.makedirs(out, exist_ok=True)
    I_full = merged.expand(merged.I)
    sig_full = merged.expand(merged.sigma)
    cnt_full = merged.expand(merged.counts, fill=0)
    extra = {}
    # radial profile over the full expanded grid
    all_flat = np.arange(grid.n_voxels)
    ds_full = voxel_d_star(grid, all_flat, cell).reshape(grid.shape)
    centres, prof, nprof = absc.radial_profile(I_full, ds_full, 1.0 / d_min, n_bins=60)
    units = "arbitrary (merged) units"
    if abs_plan is not None:
        comp = abs_plan["composition"]
        lo = 1.0 / params.absolute_scale.fit_d_max if params.absolute_scale.fit_d_max else None
        hi = 1.0 / params.absolute_scale.fit_d_min if params.absolute_scale.fit_d_min else None
        fit_range = None
        if lo or hi:
            top = float(centres[np.isfinite(prof)].max())
            fit_range = (lo or 0.6 * (hi or top), hi or top)
        try:
            sc = absc.fit_absolute_scale(centres, prof, comp, fit_range=fit_range, counts=nprof,
                                         wilson_b=abs_plan["wilson_b"],
                                         wavelength=abs_plan["wavelength"])
        except ValueError as e:
            raise Sorry(f"absolute scale: {e}") from e
        sc.wilson = abs_plan["wilson"]
        I_full, sig_full = absc.to_electron_units(I_full, sig_full, ds_full, sc)
        prof = sc.K * prof - sc.incoherent
        units = "electron units per unit cell (incoherent subtracted)"
        absc.plot_absolute_scale(sc, os.path.join(out, "absolute_scale.png"))
        if abs_plan["wilson_fit"] is not None:
            absc.plot_wilson(abs_plan["wilson_fit"], os.path.join(out, "wilson_plot.png"))
        program.write_json(os.path.join(out, "absolute_scale.json"),
                           {**sc.as_dict(), "bragg_peaks": abs_plan["bragg_peaks"]})
        logger.info("Absolute scale K = %.5g e.u./unit (fit %.2f–%.2f Å, rms rel. residual %.3f)",
                    sc.K, 1 / sc.fit_range[1], 1 / sc.fit_range[0] if sc.fit_range[0] else np.inf,
                    sc.residual)
        extra["absolute_scale_K"] = sc.K
    del ds_full
    npz = os.path.join(out, f"{params.output.prefix}.npz")
    merged_format.write_merged(
        npz, grid, I_full, sig_full, cnt_full, cell, sg_symbol,
        units=units, laue_group=laue.laue_symbol, n_stills=len(files),
        n_observations=result.n_observations, files=np.array([os.path.basename(f) for f in files]),
        scales=result.params, half=result.half, d_min=d_min, d_max=d_max or 0.0,
        U_mean=ref["U_mean"], reindexed=np.array([f"{os.path.basename(f)}:{op}" for f, op in reindexed] or [""]),
        skipped=np.array([f"{r['name']}: {r['reason']}" for r in failed] or [""]),
        **extra)
    map_output.write_ccp4(os.path.join(out, f"{params.output.prefix}.ccp4"), grid, I_full, cell,
                          title=f"diffuse.merge {sg_symbol} ndiv={grid.ndiv[0]}")
    for plane in ("hk0", "h0l", "0kl"):
        map_output.plot_section(os.path.join(out, f"slice_{plane}.png"), grid, I_full, cell,
                                plane, title=f"{plane} section ({units.split(' (')[0]})")
    map_output.plot_radial(os.path.join(out, "I_vs_q.png"), centres, prof,
                           ylabel=f"⟨I⟩ ({units.split(' (')[0]})")
    program.write_json(os.path.join(out, "statistics.json"), stats)
    map_output.plot_shell_statistics(os.path.join(out, "statistics.png"), stats)
    program.write_json(os.path.join(out, "scales.json"), _scales_json(result, files, reindexed, crystal_ops))
    if result.terms is not None and params.scaling.enable:
        from diffuse_cli.scaling import plot_terms

        for name in plot_terms(result.terms, out, [os.path.basename(f) for f in files]):
            logger.info("Wrote %s", name)
    rows = [{"name": os.path.basename(f), "status": "merged"} for f in files] + failed
    summaries.write_summary(summary_path, summaries.MERGE_SUMMARY_SCHEMA, rows, n_merged=len(files),
                            map=os.path.basename(npz))
    summaries.report_failed("diffuse.merge", failed, n_given, summary_path)
    logger.info("Wrote %s, %s.ccp4, slices, I_vs_q.png, statistics.json/.png, scales.json in %s",
                os.path.basename(npz), params.output.prefix, out)
    return result


def _extract_records_bragg_masks(path: str) -> bool | None:
    """diffuse.extract's ``bragg_masks`` for the extract a corrected still refers to; None if unknown."""
    from libtbx.utils import Sorry

    if corrected_format.schema_of(path) != corrected_format.CORRECT_SCHEMA:
        return None
    still = corrected_format.read_corrected(path, fields=("extract_file", "extract_file_absolute"))
    try:
        extract = corrected_format.extract_path(path, still, check=False)
    except Sorry:
        return None
    summary = os.path.join(os.path.dirname(extract), "summary.json")
    flag = summaries.read_summary(summary, summaries.EXTRACT_SUMMARY_SCHEMA).get("bragg_masks") \
        if os.path.exists(summary) else None
    return None if flag is None else bool(flag)


def _bragg_peaks_masked(a, files) -> tuple[bool, str]:
    """(masked, why) for absolute_scale.bragg_peaks (see its help)."""
    if a.bragg_peaks != "auto":
        return a.bragg_peaks == "masked", f"absolute_scale.bragg_peaks={a.bragg_peaks}"
    flag = _extract_records_bragg_masks(files[0])
    if flag is not None:
        return flag, f"diffuse.extract's summary.json: bragg_masks={str(flag).lower()}"
    if a.wilson_b is not None:
        return True, "absolute_scale.wilson_b is given"
    if corrected_format.schema_of(files[0]) == corrected_format.CORRECT_SCHEMA:
        return True, "diffuse.correct files (the default chain masks the Bragg peaks)"
    logger.warning("Absolute scale: the input files do not record whether the Bragg peaks were masked; "
                   "comparing with the total scattering sum f^2 + sum I_inc. If they were masked, set "
                   "absolute_scale.bragg_peaks=masked")
    return False, "not recorded by the input files (assumed kept)"


def _wilson_sources(a, experiments, expt_files, groups) -> list[tuple[str, list]]:
    """(reflection file, its experiments) pairs for the Wilson B estimate."""
    from libtbx.utils import Sorry

    expt_files = list(expt_files or [])
    groups = list(groups) if groups is not None else [0] * len(experiments)
    if a.wilson.reflections:
        if not os.path.exists(a.wilson.reflections):
            raise Sorry(f"File not found: {a.wilson.reflections} (absolute_scale.wilson.reflections)")
        if len(expt_files) > 1:
            raise Sorry("absolute_scale.wilson.reflections pairs with one .expt; with several, keep each "
                        ".refl beside its .expt (same stem)")
        return [(a.wilson.reflections, list(experiments))]
    pairs = []
    for k, name in enumerate(expt_files):
        refl = os.path.splitext(name)[0] + ".refl"
        if os.path.exists(refl):
            pairs.append((refl, [e for e, g in zip(experiments, groups) if g == k]))
    return pairs


def absolute_scale_plan(params, experiments, files, expt_files, groups, sg_symbol, laue) -> dict | None:
    """What the Krogh-Moe theory will be, decided before merging. None without a composition.

    Returns dict(composition (per unit cell), bragg_peaks (dict: masked, why),
    wilson_b (Å² or None), wilson (provenance dict), wilson_fit (WilsonFit or
    None), wavelength (Å, mean of the experiments' beams, or None)).
    Bragg peaks masked and no wilson_b: B from the integrated Bragg
    intensities (Wilson plot); without them, Sorry naming the parameters.
    """
    from libtbx.utils import Sorry

    from diffuse_cli import absolute_scale as absc

    a = params.absolute_scale
    if not a.composition:
        return None
    try:
        comp = absc.parse_composition(a.composition)
    except ValueError as e:
        raise Sorry(f"composition: {e}") from e
    if a.composition_per == "asu":
        z = laue.space_group.order_z()
        comp = {k: v * z for k, v in comp.items()}
    masked, why = _bragg_peaks_masked(a, files)
    wilson_b, wilson, fit = a.wilson_b, None, None
    if not masked and wilson_b:
        raise Sorry(f"absolute_scale.wilson_b is for maps whose Bragg peaks were masked, but they were "
                    f"kept ({why}); leave wilson_b unset or set absolute_scale.bragg_peaks=masked")
    if masked and wilson_b is not None:
        wilson = {"source": "absolute_scale.wilson_b", "B": float(wilson_b)}
    elif masked:
        pairs = _wilson_sources(a, experiments, expt_files, groups)
        if not pairs:
            expected = (os.path.splitext(expt_files[0])[0] + ".refl") if expt_files else "a .refl"
            raise Sorry(f"Absolute scale: the Bragg peaks were masked ({why}) and there are no integrated "
                        f"Bragg intensities ({expected} not found) to estimate the Wilson B: set "
                        "absolute_scale.wilson_b=<B in Å^2> or absolute_scale.wilson.reflections=<.refl>, "
                        "or absolute_scale.bragg_peaks=kept if the map holds the Bragg peaks")
        from dials.array_family import flex

        arrays, offset = [], 0
        for refl, expts in pairs:
            try:
                arr = absc.bragg_intensities(flex.reflection_table.from_file(refl), expts, sg_symbol)
            except ValueError as e:
                raise Sorry(f"{refl}: {e} (Wilson B for the absolute scale; or set absolute_scale.wilson_b)") from e
            arr["group"] = arr["group"] + offset
            offset += len(expts)
            arrays.append(arr)
        cat = {k: np.concatenate([x[k] for x in arrays]) for k in arrays[0]}
        try:
            fit = absc.estimate_wilson_b(cat["d_star"], cat["intensity"], comp,
                                         partiality=cat["partiality"], group=cat["group"],
                                         d_max=a.wilson.d_max, d_min=a.wilson.d_min)
        except ValueError as e:
            raise Sorry(f"Wilson B from {', '.join(r for r, _ in pairs)}: {e}; set absolute_scale.wilson_b "
                        "or absolute_scale.wilson.d_max/d_min") from e
        fit.source = ", ".join(r for r, _ in pairs)
        wilson_b, wilson = fit.B, fit.as_dict()
        logger.info("Wilson B = %.1f ± %.1f Å^2 from %d Bragg reflections of %d stills (%.2f–%.2f Å, %s)",
                    fit.B, fit.sigma_B, fit.n_reflections, fit.n_groups, fit.d_range[0], fit.d_range[1],
                    fit.source)
        if not fit.B > 0:
            raise Sorry(f"Wilson B from {fit.source} is {fit.B:.1f} Å^2 (not positive): set absolute_scale.wilson_b")
    waves = [e.beam.get_wavelength() for e in experiments if e.beam is not None]
    wavelength = float(np.mean(waves)) if waves else None
    logger.info("Absolute scale: Bragg peaks %s (%s)%s; Compton recoil %s", "masked" if masked else "kept",
                why, f", B = {wilson_b:.1f} Å^2" if masked else "",
                f"at λ = {wavelength:.4f} Å" if wavelength else "not applied (no beam model)")
    return {"composition": comp, "bragg_peaks": {"masked": masked, "why": why}, "wilson_b": wilson_b if masked else None,
            "wilson": wilson, "wilson_fit": fit, "wavelength": wavelength}


def _warn_spreads(ref, grid, d_min, limit):
    cell_rms = ref["cell_rms"][:3]
    # hkl at d_min moves by |Δa|/d_min for a cell-edge change Δa
    smear = float(np.max(cell_rms / d_min * np.asarray(grid.ndiv)))
    logger.info("Cell spread (rms a, b, c): %s Å -> %.2f voxels at d_min", 
                ", ".join(f"{x:.3f}" for x in cell_rms), smear)
    if smear > limit:
        logger.warning("The stills' cells differ enough to smear features by %.2f voxels at "
                       "d_min (> %.2f): consider a coarser ndiv or a larger d_min", smear, limit)
    ang = np.radians(ref["orientation_rms_deg"])
    osmear = float(ang * max(grid.hkl_max) * max(grid.ndiv))
    logger.info("Orientation spread about the mean: rms %.2f°, max %.2f°",
                ref["orientation_rms_deg"], ref["orientation_max_deg"])
    if osmear > limit:
        # a spread of a few degrees looks like one crystal whose orientations
        # wander (worth a warning); serial stills are randomly oriented by design
        report = logger.warning if ref["orientation_rms_deg"] < 10.0 else logger.info
        report(
            "Orientation spread would move hkl at d_min by %.1f voxels if one orientation were "
            "used: each still is placed with its own A, so this only matters if the stills' "
            "A matrices are not trustworthy (e.g. one crystal with poorly refined orientations)",
            osmear)


def _log_scales(result, files):
    p = result.params
    g = p.mean(axis=1)
    ok = [f for f in result.fits if f is not None and f.ok]
    logger.info("Per-still scales: min %.3f, median %.3f, max %.3f", g.min(), np.median(g), g.max())
    if ok:
        rms = np.array([f.rms_normalised_residual for f in ok])
        cc = np.array([f.cc for f in ok])
        out = np.array([f.outlier_fraction for f in ok])
        logger.info("Residuals (I − g·I_ref)/σ: median rms %.2f (max %.2f); CC with reference "
                    "median %.3f (min %.3f); Huber-downweighted fraction median %.3f",
                    np.median(rms), rms.max(), np.median(cc), np.nanmin(cc), np.median(out))
    bad = [os.path.basename(files[i]) for i, f in enumerate(result.fits) if f is not None and not f.ok]
    if bad:
        logger.warning("Scale fit failed for %d stills (kept previous scale): %s", len(bad),
                       ", ".join(bad[:10]))


def _scales_json(result, files, reindexed, crystal_ops=None):
    from diffuse_cli.symmetry import _op_string

    reidx = dict(reindexed)
    crystal_ops = crystal_ops or [None] * len(files)
    rows = []
    for i, f in enumerate(files):
        fit = result.fits[i]
        rows.append({
            "file": os.path.basename(f),
            "scale": result.params[i].tolist(),
            "half": int(result.half[i]),
            "crystal_change_of_basis": None if crystal_ops[i] is None else _op_string(crystal_ops[i]),
            "reindexed_by": reidx.get(f),
            "n_obs_fit": None if fit is None else fit.n_obs,
            "rms_normalised_residual": None if fit is None else fit.rms_normalised_residual,
            "cc_with_reference": None if fit is None else fit.cc,
            "outlier_fraction": None if fit is None else fit.outlier_fraction,
            "fit_ok": None if fit is None else fit.ok,
        })
        if result.terms is not None:
            t = result.terms
            if t.n_a:
                rows[-1]["absorption_nodes"] = t.alpha[i].tolist()
            if t.n_c:
                rows[-1]["offset_nodes"] = t.kappa[i].tolist()
    extra = {} if result.terms is None else {"model": result.terms.as_dict()}
    return {"converged": result.converged, "iterations": result.iterations,
            "history": result.history, **extra, "stills": rows}


def _sweep_groups(experiments, experiment_index) -> np.ndarray:
    """Ambiguity units: the frames of one rotation experiment share one (its index); stills one each."""
    from diffuse_cli.extraction import is_rotation

    groups = np.empty(len(experiment_index), dtype=np.int64)
    for j, i in enumerate(experiment_index):
        rotation = i is not None and is_rotation(experiments[i])
        groups[j] = i if rotation else len(experiments) + j
    return groups


def _half_blocks(experiments, experiment_index, frames, block_deg: float) -> np.ndarray:
    """CC½ block label per still: (experiment, block of ``block_deg`` of rotation) for
    rotation frames, one block per still otherwise."""
    from diffuse_cli.extraction import is_rotation
    from diffuse_cli.frames import FrameRef

    labels = np.empty(len(experiment_index), dtype=np.int64)
    n_blocks = 1_000_000  # label space per experiment
    for j, (i, a) in enumerate(zip(experiment_index, frames)):
        if i is not None and a is not None and a >= 0 and is_rotation(experiments[i]):
            fr = FrameRef.from_experiment(experiments[i])
            offset = float(fr.phi_centre_deg(a)) - fr.phi0_deg
            labels[j] = i * n_blocks + int(np.floor(abs(offset) / max(block_deg, 1e-9)))
        else:
            labels[j] = -1 - j
    return labels
