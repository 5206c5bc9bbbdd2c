"""A DIALS reflection table seen by diffuse.bragg_mask: its rows per experiment, and the
fingerprint of the columns a Bragg mask uses (for resuming, :mod:`diffuse_cli.provenance`)."""

from __future__ import annotations

import logging

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli import provenance

logger = logging.getLogger("diffuse.masking")


def reflections_by_experiment(reflections, experiments, reflection_file: str = "reflections") -> dict:
    """``{experiment index: its reflections}``, matched by experiment identifier.

    The table's ``experiment_identifiers()`` (id -> identifier) are matched to
    ``experiment.identifier``, never the table ``id`` to the list position: a
    ``.refl`` of four stills with the ``.expt`` of one of them selects that
    still's rows. Reflections of experiments not in the list are left out
    (logged). Only when neither side carries identifiers are ids taken as list
    positions, and then the ids must be exactly ``0 .. len(experiments) - 1``.
    Mismatches are a ``Sorry`` naming ``reflection_file``.
    """
    from dials.array_family import flex as dflex

    ids = reflections["id"].as_numpy_array() if "id" in reflections else np.zeros(len(reflections), int)
    table_ids = dict(reflections.experiment_identifiers())
    expt_ids = [e.identifier for e in experiments]
    by_identifier: dict = {}
    for k, ident in table_ids.items():
        by_identifier.setdefault(ident, []).append(int(k))
    if not table_ids and not any(expt_ids):
        present = sorted(int(i) for i in np.unique(ids) if i >= 0)
        if present != list(range(len(experiments))):
            raise Sorry(
                f"{reflection_file}: no experiment identifiers, and its reflection ids "
                f"{present[:5]}{'...' if len(present) > 5 else ''} do not number the "
                f"{len(experiments)} experiment(s) one to one; give the .expt and .refl of the same run"
            )
        logger.warning("%s: no experiment identifiers: reflection id i taken as experiment i", reflection_file)
        ids_of = {i: [i] for i in range(len(experiments))}
    elif not table_ids or not all(expt_ids):
        raise Sorry(
            f"{reflection_file}: experiment identifiers on only one side (reflections "
            f"{'with' if table_ids else 'without'}, experiments {'with' if all(expt_ids) else 'without'}); "
            "give the .expt and .refl of the same run"
        )
    else:
        ids_of = {i: by_identifier.get(ident, []) for i, ident in enumerate(expt_ids)}
        if not any(ids_of.values()):
            raise Sorry(
                f"{reflection_file}: its experiment identifiers match none of the "
                f"{len(experiments)} experiment(s) (e.g. {expt_ids[0]!r}); give the .refl of the same run as the .expt"
            )
    out = {}
    for i, table_id_list in ids_of.items():
        out[i] = reflections.select(dflex.bool(np.isin(ids, table_id_list)))
    missing = [expt_ids[i] or str(i) for i, t in out.items() if len(t) == 0]
    if missing:
        logger.warning("%s: no reflections for %d experiment(s): %s", reflection_file, len(missing), ", ".join(missing[:5]))
    n_unused = len(reflections) - sum(len(t) for t in out.values())
    if n_unused:
        logger.info("%s: %d reflections of experiments not in the experiment list left out", reflection_file, n_unused)
    return out


def _reflection_fingerprint(table, shoeboxes: bool = True) -> str:
    """Fingerprint of the reflection columns a Bragg mask uses (one experiment's rows).

    shoeboxes: include the shoebox masks (only method=shoebox reads them, and
    hashing them is most of the cost for a table that keeps them)."""
    cols = []
    for name in ("miller_index", "panel", "xyzobs.px.value", "bbox", "intensity.sum.value", "intensity.sum.variance", "flags"):
        if name in table:
            col = table[name]
            cols.append(np.array(col.as_numpy_array() if hasattr(col, "as_numpy_array") else list(col)))
    if shoeboxes and "shoebox" in table and len(table):
        # shoebox masks: the foreground/strong codes change with integration
        cols.append(np.concatenate([sb.mask.as_numpy_array().ravel() for sb in table["shoebox"]]))
    return provenance.array_fingerprint(*cols) if cols else "empty"
