"""The stills route: one image through DIALS stills processing.

Import (geometry overrides, reference detector) → spot finding → hit finding
→ indexing → refinement → integration with :class:`dials.command_line.
stills_process.Processor` (in the XFEL mode, ``Item.integrate`` False: the
profile model only, no integration); then deterministic identifiers,
Lorentzian stills partialities, q-consistency and the per-still files, and
the done-record.
Also the route ``rotation_as_stills`` (rotation frames processed as stills of
their width, with wider indexing limits).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

import numpy as np

from diffuse_cli import program
from diffuse_cli.formats.stills_process import read_done_record, write_done_record
from diffuse_cli.stills.inputs import ROUTE_ROTATION_AS_STILLS, Item, distinct_images, one_line
from diffuse_cli.stills.isolation import seed_random_generators, still_log
from diffuse_cli.stills.records import (
    FAILED,
    FAILED_VALIDATION,
    INDEXED,
    NOT_A_HIT,
    PARTIALITY_BINS,
    Config,
    empty_row,
    item_key,
)

logger = logging.getLogger("diffuse.processing")


def stills_params_for(item: Item, params):
    """The DIALS stills_process parameters used for this item's route.

    A fresh deep copy per still: DIALS's Processor and integrator modify
    parameters in place, and a still's result must not depend on the stills
    processed before it in the same process.
    """
    p = copy.deepcopy(params)
    p.output.output_dir = params.output.directory
    p.output.composite_output = True
    p.mp.debug.output_debug_logs = False
    p.mp.debug.cProfile = False
    if params.output.integrated_shoeboxes:
        p.integration.debug.output = True
        p.integration.debug.separate_files = False
        p.integration.debug.delete_shoeboxes = False
    if item.route == ROUTE_ROTATION_AS_STILLS:
        rf = params.rotation_frames
        p.indexing.stills.ewald_proximal_volume_max = max(
            p.indexing.stills.ewald_proximal_volume_max, rf.ewald_proximal_volume_max
        )
        cutoff = p.profile.gaussian_rs.parameters.sigma_b_cutoff
        if cutoff is not None:
            p.profile.gaussian_rs.parameters.sigma_b_cutoff = max(cutoff, rf.sigma_b_cutoff)
    return p


def load_item_experiments(item: Item, params):
    """One-image ExperimentList for ``item``, geometry overrides applied."""
    from dials.command_line.dials_import import ManualGeometryUpdater
    from dials.command_line.stills_process import do_import, sync_geometry
    from dxtbx.imageset import ImageSequence, ImageSetFactory
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    # the frame numbering of _probe: each distinct image once
    if item.source == "expt":
        expt, j = distinct_images(ExperimentList.from_file(item.path, check_format=True))[item.frame]
    else:
        expt, j = distinct_images(do_import(item.path, load_models=False))[item.frame]
    # a one-image ImageSet of image j (an experiment may hold a whole sequence)
    imageset = ImageSetFactory.imageset_from_anyset(expt.imageset)[j : j + 1]
    if item.source == "expt":  # the experiment's (possibly refined) models
        models = dict(detector=expt.detector, beam=expt.beam, scan=expt.scan, goniometer=expt.goniometer)
    else:  # image j's own models (an XFEL shot may have its own wavelength)
        source = expt.imageset
        if isinstance(source, ImageSequence):
            models = dict(detector=source.get_detector(), beam=source.get_beam(),
                          scan=source.get_scan(), goniometer=source.get_goniometer())
        else:
            models = dict(detector=source.get_detector(j), beam=source.get_beam(j),
                          scan=None, goniometer=source.get_goniometer(j))
    experiments = ExperimentList([Experiment(imageset=imageset, **models)])
    experiment = experiments[0]
    imageset = experiment.imageset
    ManualGeometryUpdater(params)(imageset)
    experiment.beam = imageset.get_beam()
    experiment.detector = imageset.get_detector()
    reference_path = item.reference_geometry or params.input.reference_geometry
    if reference_path is not None:
        reference = _reference_detector(reference_path)
        if params.input.sync_reference_geom:
            sync_geometry(reference.hierarchy(), imageset.get_detector().hierarchy())
            experiment.detector = imageset.get_detector()
        else:
            experiment.detector = copy.deepcopy(reference)
    if item.route == ROUTE_ROTATION_AS_STILLS or experiment.scan is not None:
        # processed as a still: its crystal model is the lab-frame orientation at
        # this image, so no goniometer/scan may be applied on top downstream
        experiment.goniometer = None
        experiment.scan = None
    return experiments


_REFERENCE_CACHE: dict[str, Any] = {}


def _reference_detector(path: str):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)  # a rewritten file is read again
    if key not in _REFERENCE_CACHE:
        from dxtbx.model.experiment_list import ExperimentList

        try:
            detectors = ExperimentList.from_file(path, check_format=False).detectors()
        except Exception:
            import dxtbx

            detectors = [dxtbx.load(path).get_detector()]
        if len(detectors) != 1:
            raise ValueError(f"reference_geometry {path} must hold exactly one detector")
        _REFERENCE_CACHE[key] = detectors[0]
    return _REFERENCE_CACHE[key]


def q_consistency(experiments, reflections) -> tuple[np.ndarray, np.ndarray]:
    """|q_obs − A·h| (Å⁻¹) of every indexed reflection, and its experiment id.

    ``q_obs = s1 − s0`` from the observed centroid (``xyzobs.mm.value`` taken to
    the lab frame by its panel), ``A·h`` the refined crystal model's reciprocal
    lattice point for the assigned Miller index.
    """
    from scitbx.array_family import flex

    n = len(reflections)
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=int)
    ids = reflections["id"].as_numpy_array()
    panels = reflections["panel"].as_numpy_array()
    xyz = reflections["xyzobs.mm.value"].as_numpy_array()
    hkl = reflections["miller_index"].as_vec3_double().as_numpy_array()
    lab = np.zeros((n, 3))
    dq = np.full(n, np.nan)
    for i_expt, expt in enumerate(experiments):
        sel_e = ids == i_expt
        if not sel_e.any():
            continue
        detector = expt.detector
        for i_panel in np.unique(panels[sel_e]):
            sel = sel_e & (panels == i_panel)
            mm = flex.vec2_double(flex.double(xyz[sel, 0].copy()), flex.double(xyz[sel, 1].copy()))
            lab[sel] = detector[int(i_panel)].get_lab_coord(mm).as_numpy_array()
        wavelength = expt.beam.get_wavelength()
        s0 = np.asarray(expt.beam.get_s0())
        s1 = lab[sel_e] / (np.linalg.norm(lab[sel_e], axis=1, keepdims=True) * wavelength)
        A = np.asarray(expt.crystal.get_A()).reshape(3, 3)
        q_model = hkl[sel_e] @ A.T
        dq[sel_e] = np.linalg.norm(s1 - s0 - q_model, axis=1)
    return dq, ids


def stills_partiality(A, s0, hkl, domain_size_ang: float, half_mosaicity_deg: float):
    """Lorentzian stills partiality and excitation error (Sauter et al. 2014).

    ``rh = |s0 + A·h| − |s0|`` (Å⁻¹) is the distance of the reciprocal-lattice
    point from the Ewald sphere; ``rs = 1/D + η/(2d)`` (Å⁻¹) its radius, with D
    the mosaic domain size (Å), η the full mosaic angle (radians) and
    d = 1/|A·h| (Å); ``p = rs² / (2 rh² + rs²)``, 1 on the sphere.
    Arrays: ``A`` (3, 3), ``s0`` (3,), ``hkl`` (n, 3).
    """
    q = np.asarray(hkl, dtype=float) @ np.asarray(A, dtype=float).reshape(3, 3).T
    s0 = np.asarray(s0, dtype=float)
    rh = np.linalg.norm(q + s0, axis=1) - np.linalg.norm(s0)
    eta = 2.0 * np.deg2rad(half_mosaicity_deg)
    rs = 1.0 / domain_size_ang + eta * np.linalg.norm(q, axis=1) / 2.0
    return rs**2 / (2.0 * rh**2 + rs**2), rh


def set_stills_partiality(experiments, reflections) -> str:
    """Replace DIALS's stills ``partiality`` (always 1.0 in DIALS 3.12) in place.

    Uses each crystal's Nave mosaic model (domain size, half mosaicity) when
    it has one and also writes ``excitation_error`` (Å⁻¹). Returns the model
    used: ``"lorentzian_rs"``, or ``"dials"`` when a crystal has no mosaic
    model (DIALS's column is then kept as it is, and the row says so).
    """
    from scitbx.array_family import flex

    if len(reflections) == 0:
        return "lorentzian_rs"
    if not all(hasattr(e.crystal, "get_domain_size_ang") for e in experiments):
        return "dials"
    ids = reflections["id"].as_numpy_array()
    hkl = reflections["miller_index"].as_vec3_double().as_numpy_array()
    partiality = np.ones(len(reflections))
    rh = np.zeros(len(reflections))
    for i, expt in enumerate(experiments):
        sel = ids == i
        partiality[sel], rh[sel] = stills_partiality(
            expt.crystal.get_A(), expt.beam.get_s0(), hkl[sel],
            expt.crystal.get_domain_size_ang(), expt.crystal.get_half_mosaicity_deg(),
        )
    reflections["partiality"] = flex.double(partiality)
    reflections["excitation_error"] = flex.double(rh)
    return "lorentzian_rs"


def profile_models(processor, params, experiments, indexed):
    """The experiments ``processor.integrate`` would integrate, without integrating.

    As DIALS 3.12's ``Processor.integrate`` does before it predicts: the
    integration-only trusted range, the profile model from the indexed spots
    (``ProfileModelFactory``) and the rejection of experiments whose σ_b
    exceeds ``profile.gaussian_rs.parameters.sigma_b_cutoff``; an
    ExperimentList (possibly empty).
    """
    from dials.algorithms.profile_model.factory import ProfileModelFactory
    from dxtbx.model.experiment_list import ExperimentList

    reference, _ = processor.process_reference(indexed)
    trusted = params.integration.integration_only_overrides.trusted_range
    if trusted:
        for detector in experiments.detectors():
            for panel in detector:
                panel.set_trusted_range(trusted)
    experiments = ProfileModelFactory.create(params, experiments, reference)
    cutoff = params.profile.gaussian_rs.parameters.sigma_b_cutoff
    return ExperimentList([e for e in experiments if cutoff is None or e.profile.sigma_b() < cutoff])


class _StageError(Exception):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {one_line(error)}")
        self.stage = stage
        self.error = error


def process_item(item: Item, config: Config) -> tuple[dict, list[int] | None]:
    """Process one image; return its summary row and partiality histogram.

    Never raises for a bad still when ``dispatch.squash_errors`` is True: the
    reason goes on the row. Writes the per-still files and then, atomically,
    the done-record.
    """
    row = empty_row(item)
    if item.error is not None:
        return row, None
    params = config.params
    directory = config.directory
    key = item_key(item, config.fingerprint)
    if not config.overwrite:
        record = read_done_record(directory, item.tag, key)
        if record is not None:
            row = dict(record["row"])
            row["resumed"] = True
            row.setdefault("integrated", row["status"] == INDEXED)  # records from before the XFEL mode
            return row, record.get("partiality_hist")
    t0 = time.perf_counter()
    hist = None
    seed_random_generators(item.tag)
    log_path = os.path.join(directory, "logs", f"{item.tag}.log")
    try:
        with still_log(log_path):
            row, hist, outputs = _process_still(item, params, directory, row)
    except _StageError as e:
        if not params.dispatch.squash_errors:
            raise e.error
        row["status"] = FAILED
        row["reason"] = str(e)
        outputs = []
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:
        # a bug in our own per-still code: the still fails loudly (row + log
        # with traceback) but the batch goes on, as DIALS's squash_errors does
        if not params.dispatch.squash_errors:
            raise
        import traceback

        with open(log_path, "a") as fh:
            fh.write(traceback.format_exc())
        logger.warning("%s: internal error %s (traceback in %s)", item.tag, one_line(e), log_path)
        row["status"] = FAILED
        row["reason"] = f"internal error: {one_line(e)}"
        return row, None
    row["time_s"] = round(time.perf_counter() - t0, 3)
    write_done_record(directory, item.tag, key, outputs, row=row, partiality_hist=hist)
    return row, hist


def _process_still(item: Item, params, directory: str, row: dict):
    from dials.algorithms.indexing.stills_indexer import calc_2D_rmsd_and_displacements
    from dials.command_line.stills_process import Processor

    sp = stills_params_for(item, params)

    def stage(name, func, *args):
        try:
            return func(*args)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # recorded per still; squash_errors=False re-raises
            raise _StageError(name, e) from e

    experiments = stage("import", load_item_experiments, item, sp)
    processor = Processor(sp, composite_tag=item.tag)
    stage("pre-process", processor.pre_process, experiments)
    observed = stage("spot finding", processor.find_spots, experiments)
    row["n_spots"] = len(observed)
    hf = sp.dispatch.hit_finder
    if hf.enable and len(observed) < hf.minimum_number_of_reflections:
        row["status"] = NOT_A_HIT
        row["reason"] = f"{len(observed)} spots < hit_finder.minimum_number_of_reflections={hf.minimum_number_of_reflections}"
        return row, None, []
    if hf.enable and hf.maximum_number_of_reflections is not None and len(observed) > hf.maximum_number_of_reflections:
        row["status"] = NOT_A_HIT
        row["reason"] = f"{len(observed)} spots > hit_finder.maximum_number_of_reflections"
        return row, None, []
    experiments, indexed = stage("indexing", processor.index, experiments, observed)
    experiments, indexed = stage("refinement", processor.refine, experiments, indexed)
    row["n_indexed"] = len(indexed)
    if item.integrate:
        stage("integration", processor.integrate, experiments, indexed)
        final_expts = processor.all_integrated_experiments
        integrated = processor.all_integrated_reflections
    else:  # XFEL mode (integration.sample): the models integration would use, no integration
        final_expts = stage("profile model", profile_models, processor, sp, experiments, indexed)
        integrated = None
    if len(final_expts) == 0:
        raise _StageError("integration", RuntimeError(
            "no experiment left after integration" if item.integrate else "no experiment within sigma_b_cutoff"))

    # indexed spots of the experiments that survived integration, renumbered
    kept = {e.identifier: i for i, e in enumerate(final_expts)}
    idx_tables = processor.all_indexed_reflections
    id_map = dict(idx_tables.experiment_identifiers())
    from scitbx.array_family import flex

    sel = flex.bool(len(idx_tables), False)
    new_ids = flex.int(len(idx_tables), -1)
    for old_id, ident in id_map.items():
        if ident in kept:
            s = idx_tables["id"] == old_id
            sel |= s
            new_ids.set_selected(s, kept[ident])
    idx_tables["id"] = new_ids
    indexed_kept = idx_tables.select(sel)

    # deterministic identifiers: the image tag (and lattice number)
    n_lat = len(final_expts)
    new_identifiers = [item.tag if n_lat == 1 else f"{item.tag}_{i}" for i in range(n_lat)]
    tables = [t for t in (integrated, indexed_kept) if t is not None]
    for table in tables:
        for k in list(table.experiment_identifiers().keys()):
            del table.experiment_identifiers()[k]
    for i, (expt, ident) in enumerate(zip(final_expts, new_identifiers)):
        expt.identifier = ident
        for table in tables:
            table.experiment_identifiers()[i] = ident

    part_model = set_stills_partiality(final_expts, integrated) if integrated is not None else ""
    dq, _ = q_consistency(final_expts, indexed_kept)
    rmsd, _ = calc_2D_rmsd_and_displacements(indexed_kept)
    crystal = final_expts[0].crystal
    uc = crystal.get_unit_cell().parameters()
    part = (integrated["partiality"].as_numpy_array() if integrated is not None and "partiality" in integrated
            else np.zeros(0))
    hist = np.histogram(np.clip(part, 0, 1), bins=PARTIALITY_BINS)[0].tolist() if part.size else None
    row.update(
        {
            "status": INDEXED,
            "reason": "",
            "n_indexed": len(indexed_kept),
            "n_integrated": len(integrated) if integrated is not None else 0,
            "integrated": integrated is not None,
            "n_lattices": n_lat,
            "space_group": str(crystal.get_space_group().info()),
            "a": uc[0], "b": uc[1], "c": uc[2], "alpha": uc[3], "beta": uc[4], "gamma": uc[5],
            "rmsd_px": float(rmsd),
            "delta_q_mean": float(np.nanmean(dq)) if dq.size else None,
            "delta_q_max": float(np.nanmax(dq)) if dq.size else None,
            "mean_partiality": float(part.mean()) if part.size else None,
            "partiality_model": part_model,
        }
    )
    threshold = params.q_consistency.max_mean_delta_q
    if threshold is not None and (row["delta_q_mean"] is None or row["delta_q_mean"] > threshold):
        row["status"] = FAILED_VALIDATION
        row["reason"] = (
            f"q-consistency: mean |dq| {row['delta_q_mean']:.5f} > "
            f"q_consistency.max_mean_delta_q={threshold}"
        )
    # write outputs, then (in the caller) the done-record
    stills_dir = os.path.join(directory, "stills")
    os.makedirs(stills_dir, exist_ok=True)
    if integrated is None:  # refined models and indexed spots are the still's files
        expt_rel = os.path.join("stills", f"{item.tag}_indexed.expt")
        refl_rel = os.path.join("stills", f"{item.tag}_indexed.refl")
        program.write_experiments(os.path.join(directory, expt_rel), final_expts)
        program.write_reflections(os.path.join(directory, refl_rel), indexed_kept)
        row["experiments"], row["reflections"] = expt_rel, refl_rel
        return row, hist, [expt_rel, refl_rel]
    expt_rel = os.path.join("stills", f"{item.tag}_integrated.expt")
    refl_rel = os.path.join("stills", f"{item.tag}_integrated.refl")
    program.write_experiments(os.path.join(directory, expt_rel), final_expts)
    program.write_reflections(os.path.join(directory, refl_rel), integrated)
    outputs = [expt_rel, refl_rel]
    if params.output.indexed_reflections:
        idx_rel = os.path.join("stills", f"{item.tag}_indexed.refl")
        program.write_reflections(os.path.join(directory, idx_rel), indexed_kept)
        outputs.append(idx_rel)
    row["experiments"] = expt_rel
    row["reflections"] = refl_rel
    return row, hist, outputs
