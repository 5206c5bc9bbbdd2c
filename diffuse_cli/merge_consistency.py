"""Input consistency of diffuse.merge: each corrected still's identity, cell and crystal.

A corrected still is accepted only if it belongs to the experiment list
(identifier and image, never list position), was extracted with the
experiment's setting matrix, and has a cell compatible with the reference
crystal's (several crystals: reindexed onto it when the user asks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from diffuse_cli.symmetry import b_matrix

logger = logging.getLogger("diffuse.merging")


# ---------------------------------------------------------------- input consistency
#
# diffuse.merge accepts a corrected still only if it belongs to the experiment
# list: matched by experiment identifier and image (path, index in the file),
# never by list position, with the setting matrix the still was extracted with
# equal to the experiment's, and a cell compatible with the reference crystal's.


@dataclass
class StillIdentity:
    """Where a corrected still comes from (read from its file and the extract it refers to)."""

    path: str
    identifier: str  # "" for files written before identifiers were recorded
    image_path: str
    image_index: int
    frame: int  # -1 for stills
    A: np.ndarray | None  # (3, 3) setting matrix it was extracted with; None if unknown
    experiment_index: int = -1  # used only for experiment lists without identifiers and images


def still_identity(path: str) -> StillIdentity | None:
    """Identity of a ``diffuse.correct/*`` still; None for files without provenance
    (``diffuse.observations/1``, which carry hkl directly)."""
    from diffuse_cli.formats import corrected, extract

    if corrected.schema_of(path) != corrected.CORRECT_SCHEMA:
        return None
    z = corrected.read_corrected(path, fields=("image_path", "image_index", "frame", "experiment_index",
                                               "extract_file", "extract_file_absolute", "extract_fingerprint"))
    image_path = str(z["image_path"]) if "image_path" in z else ""
    image_index = int(z["image_index"]) if "image_index" in z else -1
    frame = int(z["frame"]) if "frame" in z else -1
    experiment_index = int(z["experiment_index"]) if "experiment_index" in z else -1
    ex = extract.read_extract_arrays(corrected.extract_path(path, z, check=False),
                                     fields=("experiment_identifier", "A"))
    identifier = str(ex["experiment_identifier"]) if "experiment_identifier" in ex else ""
    A = np.asarray(ex["A"], dtype=np.float64).reshape(3, 3)
    return StillIdentity(path, identifier, image_path, image_index, frame, A, experiment_index)


def cell_of(A: np.ndarray) -> np.ndarray:
    """Unit cell (a, b, c in Å; α, β, γ in degrees) of setting matrices A ((3, 3) or (n, 3, 3)), q = A·hkl."""
    A = np.asarray(A, dtype=np.float64)
    G = np.linalg.inv(np.swapaxes(A, -1, -2) @ A)  # direct metric from the reciprocal one
    abc = np.sqrt(np.stack([G[..., 0, 0], G[..., 1, 1], G[..., 2, 2]], axis=-1))
    cos = np.stack([G[..., 1, 2] / (abc[..., 1] * abc[..., 2]),
                    G[..., 0, 2] / (abc[..., 0] * abc[..., 2]),
                    G[..., 0, 1] / (abc[..., 0] * abc[..., 1])], axis=-1)
    return np.concatenate([abc, np.degrees(np.arccos(np.clip(cos, -1, 1)))], axis=-1)


def cell_deviation(cell, reference) -> tuple[np.ndarray, np.ndarray]:
    """Largest relative length difference and largest angle difference (degrees)."""
    cell = np.asarray(cell, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    rel = np.max(np.abs(cell[..., :3] / reference[:3] - 1.0), axis=-1)
    ang = np.max(np.abs(cell[..., 3:] - reference[3:]), axis=-1)
    return rel, ang


def _unimodular_candidates() -> np.ndarray:
    """Integer matrices with entries in {-1, 0, 1} and determinant ±1, identity first."""
    import itertools

    m = np.array(list(itertools.product((-1, 0, 1), repeat=9)), dtype=np.int64).reshape(-1, 3, 3)
    m = m[np.abs(np.rint(np.linalg.det(m))) == 1]
    order = np.argsort(np.abs(m - np.eye(3, dtype=np.int64)).sum(axis=(1, 2)), kind="stable")
    return m[order]


def change_of_basis_onto(A: np.ndarray, reference_cell, length_tolerance: float,
                         angle_tolerance: float) -> np.ndarray | None:
    """Integer M (h' = h @ M) that puts A's lattice onto the reference cell, or None.

    The reindexed setting matrix is A' = A·(M⁻¹)ᵀ; M is the simplest (closest
    to the identity, proper rotations first) whose cell(A') is within
    ``length_tolerance`` (relative) and ``angle_tolerance`` (degrees) of
    ``reference_cell``. The identity comes first, so a cell that matches as
    it is keeps its indexing.
    """
    M = _unimodular_candidates()
    A_new = np.asarray(A, dtype=np.float64) @ np.swapaxes(np.linalg.inv(M), -1, -2)
    rel, ang = cell_deviation(cell_of(A_new), reference_cell)
    ok = (rel <= length_tolerance) & (ang <= angle_tolerance)
    if not ok.any():
        return None
    proper = np.rint(np.linalg.det(M)) > 0
    pick = np.flatnonzero(ok & proper)
    return M[(pick if pick.size else np.flatnonzero(ok))[0]]


def _fmt_cell(cell) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in cell) + ")"


def check_stills(experiments, files, groups=None, expt_files=None, length_tolerance: float = 0.02,
                 angle_tolerance: float = 2.0, allow_multiple_crystals: bool = False, comm=None) -> dict:
    """Match corrected stills to experiments and check their cells; Sorry on any mismatch.

    experiments: the ExperimentList; groups: per experiment, the index of
    the experiment-list file (crystal) it came from (default: one crystal);
    expt_files: those files' names (for messages). Per still:

    * it must be in the experiment list: same experiment identifier and same
      image (real path and index in the file), or the same image when the
      still carries no identifier. Never matched by list position;
    * (stills) the setting matrix it was extracted with must equal the
      experiment's (relative difference ≤ 1e-6): otherwise it was extracted
      with other models and is stale;
    * its cell (from A) must be within ``length_tolerance`` (relative) and
      ``angle_tolerance`` (degrees) of its crystal's cell, the
      parameter-wise median of that crystal's matched stills.

    Stills of a second experiment-list file are another crystal: refused
    unless ``allow_multiple_crystals``; then that crystal's cell must match the
    reference crystal's (the first file) within the same tolerance, directly
    or after an integer change of basis, and its stills are reindexed by it.

    Returns {"experiment_index": [...], "reindex": [M or None per file],
    "crystal": [...], "reference_cell": (6,)}; files without provenance
    (``diffuse.observations/1``) are passed through with experiment index None.
    Under MPI (``comm``) the ranks share the reading of the stills' identities.
    """
    import os

    from libtbx.utils import Sorry

    from diffuse_cli import program

    groups = [0] * len(experiments) if groups is None else list(groups)
    expt_files = expt_files or ["the experiments"]
    by_identifier: dict = {}
    by_image: dict = {}
    for i, e in enumerate(experiments):
        if e.identifier:
            by_identifier.setdefault(e.identifier, []).append(i)
        iset = e.imageset
        if iset is None:
            continue
        for j in range(len(iset)):
            try:
                index = int(iset.indices()[j])
            except (AttributeError, IndexError):
                index = j
            by_image.setdefault((os.path.realpath(iset.get_path(j)), index), []).append(i)

    # models-only experiment lists (no identifiers, no images) leave nothing but
    # the list position; the setting-matrix check below still guards them
    models_only = not by_identifier and not by_image
    if models_only:
        logger.warning("The experiments carry neither identifiers nor images: stills matched by "
                       "experiment index, checked by their setting matrices")
    matched = []
    identities = program.rank_map(still_identity, files, comm)
    for f, ident in zip(files, identities):
        if ident is None:
            matched.append(None)
            continue
        on_image = by_image.get((os.path.realpath(ident.image_path), ident.image_index), [])
        if models_only:
            i = ident.experiment_index
            if not 0 <= i < len(experiments):
                raise Sorry(f"{f}: experiment_index {i}, but the experiments hold {len(experiments)}")
            same = [i]
        elif ident.identifier:
            same = [i for i in by_identifier.get(ident.identifier, []) if i in on_image]
            if not same:
                where = ("with that identifier, but of another image" if ident.identifier in by_identifier
                         else "with that identifier")
                raise Sorry(
                    f"{f}: still of experiment {ident.identifier!r} ({ident.image_path}) is not in the experiment "
                    f"list ({', '.join(expt_files)}: none {where}); give the .expt it was processed with"
                )
        else:
            same = on_image
            if not same:
                raise Sorry(f"{f}: its image {ident.image_path} is not in the experiment list ({', '.join(expt_files)})")
        if len(same) > 1 and ident.A is not None:
            # several lattices on one image: the one whose A it was extracted with
            same = [i for i in same if _same_A(experiments[i], ident)] or same
        i = same[0]
        if ident.frame < 0 and not _same_A(experiments[i], ident):
            raise Sorry(
                f"{f}: extracted with another crystal model than experiment {experiments[i].identifier or i} of "
                f"{expt_files[groups[i]]}; run diffuse.extract and diffuse.correct again with this .expt"
            )
        matched.append(i)

    # cells per crystal (experiment-list file)
    n_files = len(files)
    crystal = [None if m is None else groups[m] for m in matched]
    present = sorted({c for c in crystal if c is not None})
    reindex: list = [None] * n_files
    reference_cell = None
    if present:
        if len(present) > 1 and not allow_multiple_crystals:
            other = next(k for k, c in enumerate(crystal) if c is not None and c != present[0])
            raise Sorry(
                f"{files[other]}: still of another crystal ({expt_files[present[1]]}, besides "
                f"{expt_files[present[0]]}); set merging.allow_multiple_crystals=True to merge several crystals"
            )
        cells = {k: cell_of(identities[k].A) for k in range(n_files) if crystal[k] is not None}
        crystal_cell = {c: np.median([cells[k] for k in cells if crystal[k] == c], axis=0) for c in present}
        reference_cell = crystal_cell[present[0]]
        ops = {present[0]: None}
        for c in present[1:]:
            # the crystal's change of basis, found on its median cell (B has that metric)
            M = change_of_basis_onto(b_matrix(crystal_cell[c]), reference_cell, length_tolerance, angle_tolerance)
            if M is None:
                raise Sorry(
                    f"{expt_files[c]}: crystal cell {_fmt_cell(crystal_cell[c])} is incompatible with the reference "
                    f"{_fmt_cell(reference_cell)} from {expt_files[present[0]]} (tolerance "
                    f"merging.cell_tolerance: {100 * length_tolerance:g} % on lengths, {angle_tolerance:g}° on angles), "
                    "even after a change of basis"
                )
            ops[c] = None if np.array_equal(M, np.eye(3)) else M
        for k, c in enumerate(crystal):
            if c is None:
                continue
            M = ops[c]
            A_k = identities[k].A if M is None else identities[k].A @ np.linalg.inv(M).T
            rel, ang = cell_deviation(cell_of(A_k), reference_cell)
            if rel > length_tolerance or ang > angle_tolerance:
                raise Sorry(
                    f"{files[k]}: cell {_fmt_cell(cell_of(A_k))} is incompatible with the reference "
                    f"{_fmt_cell(reference_cell)} ({100 * rel:.1f} % on lengths, {ang:.1f}° on angles; tolerance "
                    f"merging.cell_tolerance: {100 * length_tolerance:g} %, {angle_tolerance:g}°)"
                )
            reindex[k] = M
    return {"experiment_index": matched, "reindex": reindex, "crystal": crystal,
            "reference_cell": reference_cell,
            "frame": [ident.frame if ident is not None else -1 for ident in identities]}


def _same_A(experiment, ident: StillIdentity) -> bool:
    if ident.A is None or experiment.crystal is None:
        return True
    if ident.frame >= 0:  # rotation frame: S R(φ) F A(φ) at its absolute array index
        from diffuse_cli.extraction import is_rotation
        from diffuse_cli.geometry import setting_matrix

        if not is_rotation(experiment):
            return False
        try:
            A = setting_matrix(experiment.crystal, experiment.goniometer, experiment.scan, ident.frame)
        except ValueError:  # frame outside the experiment's scan
            return False
    else:
        A = np.asarray(experiment.crystal.get_A(), dtype=np.float64).reshape(3, 3)
    return bool(np.linalg.norm(A - ident.A) <= 1e-6 * np.linalg.norm(A))
