"""The body of diffuse.merge (after parsing): see :mod:`diffuse_cli.command_line.merge`.

Checks the stills against the experiments, resolves the indexing ambiguity,
scales and merges (:mod:`diffuse_cli.merging`), optionally puts the map on
the absolute scale (planned in :mod:`diffuse_cli.absolute_scale_plan`), and writes
the map (block by block, :mod:`diffuse_cli.merged_blocks`), its statistics and the summary.
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np

from diffuse_cli import program, provenance
from diffuse_cli.absolute_scale_plan import _extract_records_bragg_masks, absolute_scale_plan
from diffuse_cli.formats import merged as merged_format
from diffuse_cli.formats import summaries
from diffuse_cli.merge_inputs import (FileSource, _frame_neighbours, _half_blocks, _sweep_groups, _warn_spreads,
                                      corrected_files, detector_d_min, readable_stills, reference_model)
from diffuse_cli.merged_blocks import dense_blocks, map_blocks, radial_profile_blocks

logger = logging.getLogger("diffuse.merge")


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
    from diffuse_cli.scaling import ScaleModel
    from diffuse_cli.scaling_terms import ScalingTerms, TermSettings

    base = ScaleModel(sp.n_control_points, d_star_sq_max=1.0 / d_min**2)
    full = sp.model == "full"

    def term(t):
        on = full if t.enable is None else bool(t.enable)
        return TermSettings(on, t.n_nodes, t.smoothness)

    a, d, c = term(sp.absorption), term(sp.detector), term(sp.offset)
    if not (a.enable or d.enable or c.enable):
        return base
    return ScalingTerms(base, absorption=a, detector=d, offset=c, neighbour_prior=sp.neighbour_prior)


def run_merge(params, paths, comm=None):
    """Check the limits, read the experiments, find the corrected stills in ``paths``, merge."""
    from libtbx.utils import Sorry

    from dials.util.options import flatten_experiments

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
    files = corrected_files(paths)
    if not files:
        raise Sorry("No corrected observation files given (a directory or .npz files)")
    # one experiment-list file = one crystal (merging.allow_multiple_crystals)
    groups = [g for g, w in enumerate(params.input.experiments) for _ in w.data]
    expt_files = [w.filename for w in params.input.experiments]
    return merge(experiments, files, params, comm=comm, groups=groups, expt_files=expt_files)


#: parameters that change the merged map (the shortcuts ndiv, d_min, d_max, composition
#: are resolved into grid.* and absolute_scale.* before)
MERGE_PARAMS = ("space_group", "grid", "ambiguity", "scaling", "merging", "absolute_scale")


def merge_provenance(params, experiments, given, readable, failed, groups, expt_files, comm=None) -> dict:
    """The parts of the merged map's provenance key: every corrected still given (content),
    the per-detector files beside them, the experiments (models and crystal grouping), the
    parameters, and with an absolute scale the Bragg data it uses. ``failed``: the stills the
    batch rule leaves out (e.g. one whose extract changed since diffuse.correct ran)."""
    dirs = sorted({os.path.dirname(os.path.abspath(f)) for f in given})
    per_detector = sorted(p for d in dirs for p in glob.glob(os.path.join(glob.escape(d), "*.npz"))
                          if os.path.basename(p).startswith(("factors_", "background.")))
    parts = {
        "schema": merged_format.MERGE_SCHEMA,
        "stills": [[os.path.abspath(f), fp]
                   for f, fp in zip(given, program.rank_map(provenance.content_fingerprint, given, comm))],
        "left_out": sorted(r["name"] for r in failed),
        "per_detector": [[p, provenance.content_fingerprint(p)] for p in per_detector],
        "experiments": [provenance.experiment_fingerprint(e) for e in experiments],
        "crystals": list(groups) if groups is not None else None,
        "params": provenance.phil_values(params, MERGE_PARAMS),
    }
    a = params.absolute_scale
    if a.composition:
        parts["bragg_masks"] = _extract_records_bragg_masks(readable[0])
        refls = [a.wilson.reflections] if a.wilson.reflections else \
            [os.path.splitext(name)[0] + ".refl" for name in expt_files or []]
        parts["wilson"] = [[r, provenance.file_fingerprint(r)] for r in refls if os.path.isfile(r)]
    return parts


def merge(experiments, files, params, comm=None, groups=None, expt_files=None):
    """The program body (after parsing): see module doc.

    groups: per experiment, the index of the experiment-list file it came
    from (one file = one crystal); expt_files: those files' names.
    """
    from libtbx.utils import Sorry

    from diffuse_cli import absolute_scale as absc
    from diffuse_cli import absolute_scale_wilson as absw
    from diffuse_cli import map_output
    from diffuse_cli.grid import HKLGrid
    from diffuse_cli.merging import check_stills, format_statistics, scale_and_merge, shell_statistics
    from diffuse_cli.scaling_terms import ScalingTerms
    from diffuse_cli.ambiguity import determine_reindexing
    from diffuse_cli.ambiguity_cosets import ambiguity_operators
    from diffuse_cli.symmetry import LaueSymmetry

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
    given, n_given = list(files), len(files)
    files, failed = readable_stills(files, comm)
    summary_path = os.path.join(params.output.directory, "summary.json")
    if failed and rank == 0:
        for row in failed:
            logger.warning("Left out %s", row["reason"])
        if not files:
            summaries.write_summary(summary_path, summaries.MERGE_SUMMARY_SCHEMA, failed, n_merged=0, map="")
            summaries.report_failed("diffuse.merge", failed, n_given, summary_path)
    if not files:
        raise Sorry(f"diffuse.merge: every still failed ({n_given}); the first: {failed[0]['reason']}")
    # the resume rule (diffuse_cli.provenance): same stills, experiments and parameters -> nothing to do
    out = params.output.directory
    npz = os.path.join(out, f"{params.output.prefix}.npz")
    parts = merge_provenance(params, experiments, given, files, failed, groups, expt_files, comm)
    key = provenance.key_of(parts)
    if os.path.isdir(out) and rank == 0:
        provenance.remove_temporaries(out)
    also = [os.path.join(out, name) for name in (f"{params.output.prefix}.ccp4", "statistics.json", "scales.json",
                                                 "summary.json")]
    if params.output.plots:  # a run with output.plots=False before: the pictures are still to be made
        also += [os.path.join(out, name) for name in ("slice_hk0.png", "I_vs_q.png", "statistics.png")]
    if provenance.is_current(npz, key, also=also):
        logger.info("Nothing to do: %s is up to date (the same %d corrected stills, experiments and "
                    "parameters as the run that wrote it)", npz, n_given)
        return None
    logger.info("Space group %s, Laue group %s (%d operators); %d stills, %d experiments",
                sg_symbol, laue.laue_symbol, laue.order, len(files), len(experiments))
    # every still must belong to the experiments (identifier + image) with a compatible cell
    tol = params.merging.cell_tolerance
    checked = check_stills(experiments, files, groups, expt_files, tol.length, tol.angle,
                           params.merging.allow_multiple_crystals, comm=comm)
    crystal_ops = checked["reindex"]
    used = sorted({i for i in checked["experiment_index"] if i is not None})
    if used:
        op_of = {i: M for i, M in zip(checked["experiment_index"], crystal_ops) if i is not None}
        n_crystals = len({c for c in checked["crystal"] if c is not None})
        if n_crystals > 1:
            from diffuse_cli.ambiguity_cosets import _op_string

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
                seed=params.ambiguity.seed, comm=comm, dense_max=params.ambiguity.dense_max,
                subset=params.ambiguity.subset, max_passes=params.ambiguity.max_passes,
                groups=_sweep_groups(experiments, checked["experiment_index"]))
            reindex = res["reindex"]
            names = amb.names()
            reindexed = [(files[i], names[a]) for i, a in enumerate(res["assignment"]) if a]
            if res.get("method") == "single":
                logger.info("One sweep (or still): a single indexing, no ambiguity to resolve")
            else:
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
    plots = params.output.plots
    # under MPI every rank holds the merged map: rank 1 draws the sections while rank 0
    # writes the files and the other pictures (alone, rank 0 does everything)
    size = comm.Get_size() if comm is not None else 1
    painter = 1 if size > 1 and plots else 0
    if rank not in (0, painter):
        _pictures_done(comm, size, plots)
        return result
    if rank == 0:
        logger.info("Merged %d observations\n%s", result.n_observations, format_statistics(stats))
        _log_scales(result, files)

    os.makedirs(out, exist_ok=True)
    extra = {}
    # the dense grid is made block by block of h-planes from the merged ASU voxels (never whole)
    blocks = map_blocks(grid)
    centres, prof, nprof = radial_profile_blocks(merged, grid, cell, 1.0 / d_min, blocks, n_bins=60)
    units = "arbitrary (merged) units"
    sc = None
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
        prof = sc.K * prof - sc.incoherent
        units = "electron units per unit cell (incoherent subtracted)"
        if plots and rank == painter:
            absc.plot_absolute_scale(sc, os.path.join(out, "absolute_scale.png"))
            if abs_plan["wilson_fit"] is not None:
                absw.plot_wilson(abs_plan["wilson_fit"], os.path.join(out, "wilson_plot.png"))
        if rank == 0:
            program.write_json(os.path.join(out, "absolute_scale.json"),
                               {**sc.as_dict(), "bragg_peaks": abs_plan["bragg_peaks"]})
            logger.info("Absolute scale K = %.5g e.u./unit (fit %.2f–%.2f Å, rms rel. residual %.3f)",
                        sc.K, 1 / sc.fit_range[1], 1 / sc.fit_range[0] if sc.fit_range[0] else np.inf,
                        sc.residual)
        extra["absolute_scale_K"] = sc.K
    I_block, sigma_block, counts_block = dense_blocks(merged, grid, cell, sc)
    sections = {"hk0": [], "h0l": [], "0kl": None}
    off = [m * n for m, n in zip(grid.hkl_max, grid.ndiv)]

    def I_blocks():  # the dense I block by block; the three central sections kept on the way
        for i0, i1 in blocks:
            v = I_block(i0, i1)
            if plots and rank == painter:
                sections["hk0"].append(v[:, :, off[2]].copy())
                sections["h0l"].append(v[:, off[1], :].copy())
                if i0 <= off[0] < i1:
                    sections["0kl"] = v[off[0] - i0].copy()
            yield v

    if rank == 0:
        map_output.write_ccp4_slabs(os.path.join(out, f"{params.output.prefix}.ccp4"), grid, I_blocks(), cell,
                                    title=f"diffuse.merge {sg_symbol} ndiv={grid.ndiv[0]}")
    else:  # the painter alone: the sections only
        for _ in I_blocks():
            pass
    label = units.split(" (")[0]
    if plots and rank == painter:
        for plane in ("hk0", "h0l", "0kl"):
            sec = sections[plane] if plane == "0kl" else np.concatenate(sections[plane])
            map_output.plot_section_values(os.path.join(out, f"slice_{plane}.png"), grid, sec, cell,
                                           plane, title=f"{plane} section ({label})")
    if rank != 0:
        _pictures_done(comm, size, plots)
        return result
    if plots:
        map_output.plot_radial(os.path.join(out, "I_vs_q.png"), centres, prof, ylabel=f"⟨I⟩ ({label})")
        map_output.plot_shell_statistics(os.path.join(out, "statistics.png"), stats)
        if result.terms is not None and params.scaling.enable:
            from diffuse_cli.scaling_plots import plot_terms

            for name in plot_terms(result.terms, out, [os.path.basename(f) for f in files]):
                logger.info("Wrote %s", name)
    program.write_json(os.path.join(out, "statistics.json"), stats)
    program.write_json(os.path.join(out, "scales.json"), _scales_json(result, files, reindexed, crystal_ops))
    rows = [{"name": os.path.basename(f), "status": "merged"} for f in files] + failed
    summaries.write_summary(summary_path, summaries.MERGE_SUMMARY_SCHEMA, rows, n_merged=len(files),
                            map=os.path.basename(npz))
    # the map last: its provenance key says that every output above is of this run
    # (the sections drawn by rank 1 included)
    _pictures_done(comm, size, plots)
    stored = provenance.npz_fields(key, parts)
    merged_format.write_merged(
        npz, grid, I_block, sigma_block, counts_block, cell, sg_symbol,
        units=units, laue_group=laue.laue_symbol, n_stills=len(files),
        n_observations=result.n_observations, files=np.array([os.path.basename(f) for f in files]),
        scales=result.params, half=result.half, d_min=d_min, d_max=d_max or 0.0,
        U_mean=ref["U_mean"], reindexed=np.array([f"{os.path.basename(f)}:{op}" for f, op in reindexed] or [""]),
        skipped=np.array([f"{r['name']}: {r['reason']}" for r in failed] or [""]),
        provenance_key=stored["provenance_key"], provenance=stored["provenance"],
        **extra)
    if hasattr(merged, "release_tables"):  # the dense outputs' voxel table (4 bytes per grid voxel)
        merged.release_tables()
    summaries.report_failed("diffuse.merge", failed, n_given, summary_path)
    logger.info("Wrote %s, %s.ccp4, %sstatistics.json%s, scales.json in %s", os.path.basename(npz),
                params.output.prefix, "slices, I_vs_q.png, " if params.output.plots else "",
                "/.png" if params.output.plots else "", out)
    return result


def _pictures_done(comm, size: int, plots: bool) -> None:
    """Every rank waits until rank 1 has drawn the sections (MPI with output.plots only)."""
    if size > 1 and plots:
        comm.Barrier()


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
    from diffuse_cli.ambiguity_cosets import _op_string

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
