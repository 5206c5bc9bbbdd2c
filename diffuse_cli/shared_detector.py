"""One detector for all the frames of a dataset processed as stills.

Rotation frames processed as stills (route ``rotation_as_stills``) are each
indexed against the header's detector, which for real beamlines is often
tilted by a degree or more from the header's (nuclease frames: 2.4°). Each
frame then absorbs the error into its own cell and orientation. Here the
detector is refined once, jointly against the indexed spots of every frame of
the dataset (a rigid body at the top of the detector hierarchy; each frame's
orientation and cell free, the beam fixed), as a sweep refinement or Lunus's
metrology would, and the frames are processed again with it as their
reference geometry (``input.reference_geometry``, synchronised as DIALS
does).

Resume: the refined detector is stored as ``shared_detector/<dataset>.expt``
with a record of the first-pass inputs it came from (the frames' done-record
keys). A rerun whose frames and parameters are unchanged reuses it and goes
straight to the second pass, whose done-records then match: nothing is redone.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re

import numpy as np

from diffuse_cli import program
from diffuse_cli.stills import inputs, records

logger = logging.getLogger("diffuse.stills_process")

#: at most this many frames (evenly spaced) enter the joint refinement
MAX_FRAMES = 100


def datasets(items, min_frames: int) -> dict[str, list]:
    """rotation_as_stills items (no error) per dataset, datasets of ≥ min_frames only."""
    groups: dict[str, list] = {}
    for it in items:
        if it.error is None and it.route == inputs.ROUTE_ROTATION_AS_STILLS:
            key = it.path if it.source == "expt" else inputs.dataset_key(it.path)
            groups.setdefault(key, []).append(it)
    return {k: v for k, v in groups.items() if len(v) >= min_frames}


def _paths(directory: str, dataset_key: str) -> tuple[str, str]:
    """(detector .expt, record .json) of a dataset: its file-name template plus a hash of its path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(dataset_key)).strip("_.-") or "dataset"
    base = os.path.join(directory, "shared_detector",
                        f"{stem}_{hashlib.sha256(dataset_key.encode()).hexdigest()[:8]}")
    return base + ".expt", base + ".json"


def _first_pass_key(items, fingerprint: str) -> str:
    """Hash of the frames' first-pass done-record keys (header detector, these parameters)."""
    keys = [records.item_key(dataclasses.replace(it, reference_geometry=None), fingerprint) for it in items]
    return hashlib.sha256("".join(keys).encode()).hexdigest()


def use_stored(items, config, min_frames: int) -> int:
    """Point each dataset with a valid stored detector at it; return how many datasets."""
    n = 0
    for key, group in datasets(items, min_frames).items():
        expt_path, record_path = _paths(config.directory, key)
        try:
            with open(record_path) as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            continue
        if record.get("first_pass_key") != _first_pass_key(group, config.fingerprint) or not os.path.isfile(expt_path):
            continue
        for it in group:
            it.reference_geometry = expt_path
        logger.info("Shared detector for %d frames of %s: %s (refined earlier)", len(group), key, expt_path)
        n += 1
    return n


def refine_datasets(items, rows, config, min_frames: int) -> list:
    """Refine one detector per dataset still without one; return the items to process again."""
    by_tag = {r["tag"]: r for r in rows}
    again = []
    for key, group in datasets(items, min_frames).items():
        if any(it.reference_geometry for it in group):
            continue
        done = [it for it in group if by_tag.get(it.tag, {}).get("status") == records.INDEXED]
        if len(done) < min_frames:
            logger.warning("Shared detector for %s skipped: %d of %d frames indexed (need %d)",
                           key, len(done), len(group), min_frames)
            continue
        expt_path, record_path = _paths(config.directory, key)
        stats = refine_detector([by_tag[it.tag] for it in done], config.directory, expt_path)
        stats["first_pass_key"] = _first_pass_key(group, config.fingerprint)
        stats["frames"] = [it.tag for it in done]
        program.write_json(record_path, stats)
        logger.info(
            "Shared detector for %s from %d frames (%d spots): tilt %.3f° from the header's, distance "
            "%.3f -> %.3f mm, RMSD (x, y) %.3f, %.3f -> %.3f, %.3f mm; processing the frames again with it",
            key, stats["n_frames"], stats["n_reflections"], stats["tilt_deg"], stats["distance_before_mm"],
            stats["distance_after_mm"], *stats["rmsd_before_mm"][:2], *stats["rmsd_after_mm"][:2])
        for it in group:
            it.reference_geometry = expt_path
            again.append(it)
    return again


def refine_detector(rows: list[dict], directory: str, out_path: str) -> dict:
    """Joint refinement of one detector against the indexed spots of ``rows``' stills.

    rows: summary rows of indexed stills (their ``experiments`` and
    reflections under ``directory``). Writes the refined detector (with the
    first still's beam) to ``out_path``; returns figures for the log.
    """
    from dials.algorithms.refinement import RefinerFactory
    from dials.array_family import flex
    from dials.command_line.refine import working_phil
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    pick = np.unique(np.linspace(0, len(rows) - 1, min(MAX_FRAMES, len(rows))).round().astype(int))
    experiments = ExperimentList()
    reflections = flex.reflection_table()
    for i, r in enumerate(rows[j] for j in pick):
        expt = ExperimentList.from_file(os.path.join(directory, r["experiments"]), check_format=False)[0]
        indexed = os.path.join(directory, r["experiments"].replace("_integrated.expt", "_indexed.refl"))
        refl = flex.reflection_table.from_file(
            indexed if os.path.isfile(indexed) else os.path.join(directory, r["reflections"]))
        refl = refl.select(refl.get_flags(refl.flags.indexed))
        for k in list(refl.experiment_identifiers().keys()):
            del refl.experiment_identifiers()[k]
        refl["id"] = flex.int(len(refl), i)
        refl.experiment_identifiers()[i] = expt.identifier
        experiments.append(expt)
        reflections.extend(refl)
    header = experiments[0].detector
    detector = copy.deepcopy(header)
    for e in experiments:
        e.detector = detector  # one model shared by every still
    params = working_phil.extract()
    params.refinement.parameterisation.beam.fix = "all"
    params.refinement.parameterisation.detector.hierarchy_level = 0
    params.refinement.parameterisation.auto_reduction.action = "fix"
    params.refinement.reflections.weighting_strategy.override = "stills"
    params.refinement.reflections.outlier.algorithm = "sauter_poon"
    refiner = RefinerFactory.from_parameters_data_experiments(params, reflections, experiments)
    history = refiner.run()
    refined = refiner.get_experiments()[0].detector
    n0 = np.asarray(header[0].get_normal())
    n1 = np.asarray(refined[0].get_normal())
    tilt = float(np.degrees(np.arccos(np.clip(abs(n0 @ n1) / (np.linalg.norm(n0) * np.linalg.norm(n1)), -1, 1))))
    out = ExperimentList([Experiment(detector=refined, beam=experiments[0].beam)])
    program.write_experiments(out_path, out)
    return {
        "n_frames": len(experiments),
        "n_reflections": len(reflections),
        "tilt_deg": tilt,
        "distance_before_mm": float(header[0].get_distance()),
        "distance_after_mm": float(refined[0].get_distance()),
        "rmsd_before_mm": [float(v) for v in history["rmsd"][0]],
        "rmsd_after_mm": [float(v) for v in history["rmsd"][-1]],
    }
