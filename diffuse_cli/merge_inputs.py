"""diffuse.merge's inputs: the corrected stills, their loading, and the reference crystal.

Finds the per-still corrected files (directories or names), applies the batch
rule (a still that cannot be read is recorded and left out), streams one still
at a time (:class:`FileSource`), and derives from the experiments the
reference cell and orientation, the detector's resolution limit, and the
frame/sweep structure used by scaling and CC1/2.
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np

from diffuse_cli.formats import corrected as corrected_format
from diffuse_cli.formats import extract as extract_format
from diffuse_cli.formats import factors as factors_format

logger = logging.getLogger("diffuse.merge")


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


def readable_stills(files, comm=None) -> tuple[list[str], list[dict]]:
    """The batch rule: (stills that can be merged, summary rows of those that cannot).

    A corrected still is checked with the files it needs (its extract, by
    content fingerprint, and its factors file, once per factors file); a bad
    one is a ``failed`` row with the reason, and the merge goes on without it.
    Under MPI (``comm``) the ranks share the files (:func:`program.rank_map`).
    """
    from libtbx.utils import Sorry

    from diffuse_cli import program

    factors_checked: dict[str, str | None] = {}  # factors file -> None (readable) or why not

    def reason(f):
        try:
            schema = corrected_format.schema_of(f)
            if schema == corrected_format.OBSERVATIONS_SCHEMA:
                corrected_format.read_observations(f)
                return None
            still = corrected_format.read_corrected(f)
            extract_format.read_extract_header(corrected_format.extract_path(f, still))
            factors = os.path.join(os.path.dirname(os.path.abspath(f)), str(still["factors_file"]))
            if factors not in factors_checked:
                try:
                    factors_format.read_factors(factors, fields=("geometry_key",))
                    factors_checked[factors] = None
                except Sorry as e:
                    factors_checked[factors] = str(e)
            return factors_checked[factors]
        except Sorry as e:
            return str(e)

    reasons = program.rank_map(reason, files, comm)
    good = [f for f, r in zip(files, reasons) if r is None]
    failed = [{"name": os.path.basename(f), "status": "failed", "reason": r}
              for f, r in zip(files, reasons) if r is not None]
    return good, failed


def load_still(path: str, cache: dict | None = None, with_geometry: bool = False, with_hkl: bool = True) -> dict:
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

        return load_observations(path, cache=cache, with_pixels=with_geometry, with_hkl=with_hkl)
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

    def load_deferred(self, i):
        """Still i without ``hkl`` for diffuse.correct files: ``pixel``, ``q_unit``, ``hkl_matrix``
        (see ``load_observations(with_hkl=False)``) and ``operator`` (the crystal's M or None),
        for :func:`diffuse_cli.merge_prepared.prepare_still`; other files as :meth:`load`."""
        obs = load_still(self.files[i], self._cache, with_hkl=False)
        M = self.operators[i]
        if "hkl" not in obs:
            return dict(obs, operator=M)
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
