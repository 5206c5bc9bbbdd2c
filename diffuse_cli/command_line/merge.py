"""Scale and merge corrected diffuse observations onto a 3D hkl grid.

Reads the stills' experiments (cells, orientations, space group) and the
corrected per-still observation files written by diffuse.correct (a directory
or individual files), resolves the indexing ambiguity when the lattice has
higher symmetry than the Laue group, refines one scale factor per still
(optionally with a smooth resolution-dependent term) against the merged
reference until converged, merges by inverse-variance weighting onto the
asymmetric unit of the Laue group, and writes:

  merged.npz        dense I, sigma, counts [h,k,l] + axes, cell, space group
  merged.ccp4       the map for ChimeraX / Coot / PyMOL (reciprocal space)
  slice_hk0.png, slice_h0l.png, slice_0kl.png, I_vs_q.png
  statistics.json   CC1/2 (total and anisotropic), completeness, multiplicity
  scales.json       per-still scales, residuals, reindexing
  absolute_scale.png (with composition=...): Krogh-Moe scale to electron units

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
  n_shells = 10
    .type = int(value_min=1)
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
    .help = "Å^2. The Bragg peaks were masked: compare with the scattering left"
            "between them, (1 - exp(-B d*^2/2)) sum f^2 + sum I_inc, instead of the"
            "total (e.g. the Wilson B from the Bragg data). None: the total, as"
            "for a map with the Bragg peaks in it or a fit range where they have died out."
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


def corrected_files(paths: list[str]) -> list[str]:
    """Per-still corrected files from directories and file names (sorted, no duplicates)."""
    from libtbx.utils import Sorry

    files = []
    for p in paths:
        if os.path.isdir(p):
            # keep per-still files only (not factors_*, background.npz, geometry_*)
            found = sorted(
                f for f in glob.glob(os.path.join(p, "*.npz"))
                if not os.path.basename(f).startswith(".") and _is_still_file(f)
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


def _schema_of(path: str) -> str:
    with np.load(path, allow_pickle=False) as z:
        return str(z["schema"]) if "schema" in z.files else ""


def _is_still_file(path: str) -> bool:
    schema = _schema_of(path)
    return schema.startswith(("diffuse.correct/", "diffuse.observations/"))


def load_still(path: str, cache: dict | None = None) -> dict:
    """Observations of one still: dict(hkl (N,3), I (N,), sigma (N,), ...).

    diffuse.correct files (schema diffuse.correct/2) are read with
    ``diffuse_cli.corrections.load_observations`` (upstream). Files that
    already hold ``hkl``, ``I`` and ``sigma`` arrays (schema
    ``diffuse.observations/1``) are read directly.
    """
    from libtbx.utils import Sorry

    with np.load(path, allow_pickle=False) as z:
        schema = str(z["schema"]) if "schema" in z else ""
        if schema == "diffuse.observations/1":
            out = {k: z[k] for k in z.files if k != "schema"}
            return out
    if schema.startswith("diffuse.correct/"):
        from diffuse_cli.corrections import load_observations

        return load_observations(path, cache=cache)
    raise Sorry(f"Unknown schema {schema!r} in {path}")


class FileSource:
    """StillSource over corrected files (loaded one at a time)."""

    def __init__(self, files):
        self.files = list(files)
        self._cache: dict = {}  # per-detector factors, shared between stills

    def __len__(self):
        return len(self.files)

    def load(self, i):
        return load_still(self.files[i], self._cache)


def reference_model(experiments, laue, reindex_by_experiment=None):
    """Average cell (symmetrised), mean orientation and their spreads.

    Cells: parameter-wise mean, then the space group's metric imposed.
    Orientation: proper-rotation mean (scipy Rotation.mean) of the U matrices,
    after reindexing; spread: rms misorientation angle (degrees).
    """
    from scipy.spatial.transform import Rotation

    cells = np.array([e.crystal.get_unit_cell().parameters() for e in experiments])
    mean_cell = laue.symmetrize_cell(cells.mean(axis=0))
    Us = []
    Bref = np.array(experiments[0].crystal.get_B()).reshape(3, 3)
    for i, e in enumerate(experiments):
        A = np.array(e.crystal.get_A()).reshape(3, 3)
        M = None if reindex_by_experiment is None else reindex_by_experiment.get(i)
        if M is not None:
            A = A @ np.linalg.inv(np.asarray(M, dtype=np.float64)).T
        B = np.array(e.crystal.get_B()).reshape(3, 3) if M is None else Bref
        u, _, vt = np.linalg.svd(A @ np.linalg.inv(B))
        U = u @ vt
        if np.linalg.det(U) < 0:
            U = -U
        Us.append(U)
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
    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0:
        raise Sorry("No experiments given (need the .expt from diffuse.stills_process)")
    if any(e.crystal is None for e in experiments):
        raise Sorry("Every experiment needs a crystal model (indexed stills)")
    files = corrected_files(unhandled)
    if not files:
        raise Sorry("No corrected observation files given (a directory or .npz files)")
    merge(experiments, files, params, comm=comm)


def merge(experiments, files, params, comm=None):
    """The program body (after parsing): see module doc."""
    from libtbx.utils import Sorry

    from diffuse_cli import absolute_scale as absc
    from diffuse_cli import map_output
    from diffuse_cli.grid import HKLGrid
    from diffuse_cli.merging import (format_statistics, scale_and_merge, shell_statistics,
                                     voxel_d_star)
    from diffuse_cli.scaling import ScaleModel
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
        raise Sorry(f"Unknown space group {sg_symbol!r}") from e
    logger.info("Space group %s, Laue group %s (%d operators); %d stills, %d experiments",
                sg_symbol, laue.laue_symbol, laue.order, len(files), len(experiments))
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

    source = FileSource(files)
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
                seed=params.ambiguity.seed, comm=comm)
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

    model = ScaleModel(params.scaling.n_control_points, d_star_sq_max=1.0 / d_min**2)
    result = scale_and_merge(
        source, grid, laue, cell, d_min=d_min, d_max=d_max, scale=params.scaling.enable,
        model=model, max_iterations=params.scaling.max_iterations,
        tolerance=params.scaling.tolerance, reindex=reindex,
        half_seed=params.merging.half_dataset_seed, fit_max_obs=params.scaling.fit_max_obs,
        comm=comm, chunk=params.mp.chunk_size, progress=program.progress,
        reject_sigma=params.merging.reject_sigma)
    merged = result.merged
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
    if params.absolute_scale.composition:
        try:
            comp = absc.parse_composition(params.absolute_scale.composition)
        except ValueError as e:
            raise Sorry(f"composition: {e}") from e
        if params.absolute_scale.composition_per == "asu":
            z = laue.space_group.order_z()
            comp = {k: v * z for k, v in comp.items()}
        lo = 1.0 / params.absolute_scale.fit_d_max if params.absolute_scale.fit_d_max else None
        hi = 1.0 / params.absolute_scale.fit_d_min if params.absolute_scale.fit_d_min else None
        fit_range = None
        if lo or hi:
            top = float(centres[np.isfinite(prof)].max())
            fit_range = (lo or 0.6 * (hi or top), hi or top)
        try:
            sc = absc.fit_absolute_scale(centres, prof, comp, fit_range=fit_range, counts=nprof,
                                         wilson_b=params.absolute_scale.wilson_b)
        except ValueError as e:
            raise Sorry(f"absolute scale: {e}") from e
        I_full, sig_full = absc.to_electron_units(I_full, sig_full, ds_full, sc)
        prof = sc.K * prof - sc.incoherent
        units = "electron units per unit cell (incoherent subtracted)"
        absc.plot_absolute_scale(sc, os.path.join(out, "absolute_scale.png"))
        program.write_json(os.path.join(out, "absolute_scale.json"), sc.as_dict())
        logger.info("Absolute scale K = %.5g e.u./unit (fit %.2f–%.2f Å, rms rel. residual %.3f)",
                    sc.K, 1 / sc.fit_range[1], 1 / sc.fit_range[0] if sc.fit_range[0] else np.inf,
                    sc.residual)
        extra["absolute_scale_K"] = sc.K
    del ds_full
    npz = os.path.join(out, f"{params.output.prefix}.npz")
    map_output.write_merged_npz(
        npz, grid, I_full, sig_full, cnt_full, cell, sg_symbol,
        units=units, laue_group=laue.laue_symbol, n_stills=len(files),
        n_observations=result.n_observations, files=np.array([os.path.basename(f) for f in files]),
        scales=result.params, half=result.half, d_min=d_min, d_max=d_max or 0.0,
        U_mean=ref["U_mean"], reindexed=np.array([f"{os.path.basename(f)}:{op}" for f, op in reindexed] or [""]),
        **extra)
    map_output.write_ccp4(os.path.join(out, f"{params.output.prefix}.ccp4"), grid, I_full, cell,
                          title=f"diffuse.merge {sg_symbol} ndiv={grid.ndiv[0]}")
    for plane in ("hk0", "h0l", "0kl"):
        map_output.plot_section(os.path.join(out, f"slice_{plane}.png"), grid, I_full, cell,
                                plane, title=f"{plane} section ({units.split(' (')[0]})")
    map_output.plot_radial(os.path.join(out, "I_vs_q.png"), centres, prof,
                           ylabel=f"⟨I⟩ ({units.split(' (')[0]})")
    program.write_json(os.path.join(out, "statistics.json"), stats)
    program.write_json(os.path.join(out, "scales.json"), _scales_json(result, files, reindexed))
    logger.info("Wrote %s, %s.ccp4, slices, I_vs_q.png, statistics.json, scales.json in %s",
                os.path.basename(npz), params.output.prefix, out)
    return result


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


def _scales_json(result, files, reindexed):
    reidx = dict(reindexed)
    rows = []
    for i, f in enumerate(files):
        fit = result.fits[i]
        rows.append({
            "file": os.path.basename(f),
            "scale": result.params[i].tolist(),
            "half": int(result.half[i]),
            "reindexed_by": reidx.get(f),
            "n_obs_fit": None if fit is None else fit.n_obs,
            "rms_normalised_residual": None if fit is None else fit.rms_normalised_residual,
            "cc_with_reference": None if fit is None else fit.cc,
            "outlier_fraction": None if fit is None else fit.outlier_fraction,
            "fit_ok": None if fit is None else fit.ok,
        })
    return {"converged": result.converged, "iterations": result.iterations,
            "history": result.history, "stills": rows}
