"""Drivers of ``diffuse.stills_process``: serial, local processes, MPI; run outputs.

Every driver hands the same work units (:func:`~diffuse_cli.stills.inputs.
group_sequences`) to the same :func:`process_unit`, so per-still results do
not depend on how the run was spread. Then one summary (CSV + JSON) and one
combined ``.expt``/``.refl`` pair per run.
"""

from __future__ import annotations

import logging
import os

from diffuse_cli import program
from diffuse_cli.stills.inputs import ROUTE_SEQUENCE, Item, group_sequences
from diffuse_cli.stills.records import INDEXED, SUMMARY_COLUMNS, Config
from diffuse_cli.stills.sequence_route import process_sequence_unit
from diffuse_cli.stills.still_route import process_item


_WORKER_CONFIG: Config | None = None


def _init_worker(config: Config) -> None:
    global _WORKER_CONFIG
    _WORKER_CONFIG = config
    # workers report through their results; DIALS output goes to per-still logs
    logging.getLogger("diffuse").handlers.clear()
    program.ignore_sigint()  # Ctrl-C: the parent stops the pool, one line


def process_unit(unit: list[Item], config: Config) -> list:
    """Results [(row, hist), ...] of a work unit: one still, or one sweep."""
    if unit[0].route == ROUTE_SEQUENCE and unit[0].error is None:
        return process_sequence_unit(unit, config)
    return [process_item(it, config) for it in unit]


def _work(indexed_unit):
    i, unit = indexed_unit
    return i, process_unit(unit, _WORKER_CONFIG)


def _flatten(units, unit_results):
    return [r for res in unit_results for r in res]


def run_local(items: list[Item], config: Config, nproc: int, on_result=None) -> list:
    """Process items serially (nproc=1) or in ``nproc`` forked processes.

    Results (row, partiality histogram) come back in input order, one per
    item. ``on_result(i, row)`` is called as each row is ready.
    """
    units = group_sequences(items)
    results: list = [None] * len(units)

    def report(i, res):
        if on_result:
            for row, _ in res:
                on_result(i, row)

    if nproc <= 1 or len(units) <= 1:
        for i, unit in enumerate(units):
            results[i] = process_unit(unit, config)
            report(i, results[i])
        return _flatten(units, results)
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes=min(nproc, len(units)), initializer=_init_worker, initargs=(config,),
                  maxtasksperchild=None) as pool:
        for i, result in pool.imap_unordered(_work, list(enumerate(units)), chunksize=1):
            results[i] = result
            report(i, result)
    return _flatten(units, results)


def run_mpi(items: list[Item] | None, config: Config | None, comm, on_result=None):
    """MPI driver: rank 0 broadcasts the items; rank r takes work units r, r+size, ...

    Returns the results in input order on rank 0 and None elsewhere. The same
    :func:`process_unit` runs as in the local drivers.
    """
    items, config = comm.bcast((items, config), root=0)
    units = group_sequences(items)
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = []
    for i in range(rank, len(units), size):
        result = process_unit(units[i], config)
        mine.append((i, result))
        if on_result:
            for row, _ in result:
                on_result(i, row)
    gathered = comm.gather(mine, root=0)
    if rank != 0:
        return None
    results: list = [None] * len(units)
    for part in gathered:
        for i, result in part:
            results[i] = result
    return _flatten(units, results)


def write_summary(rows: list[dict], prefix: str) -> tuple[str, str]:
    """``<prefix>.csv`` and ``<prefix>.json`` with one row per input image."""
    import csv

    csv_path, json_path = prefix + ".csv", prefix + ".json"
    with program.atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
    program.write_json(json_path, {"schema": "diffuse.stills_process_summary/1", "rows": rows})
    return csv_path, json_path


def write_combined(rows: list[dict], directory: str, prefix: str) -> tuple[str, str, int]:
    """One ``.expt``/``.refl`` pair holding every still with status indexed.

    Experiments keep their identifiers (the image tags); reflection ``id``
    columns are renumbered to the combined experiment list.
    """
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList()
    tables = []
    seen = set()
    for row in rows:
        # the images of a sweep share one experiment file: take it once
        if row["status"] != INDEXED or row["experiments"] in seen:
            continue
        seen.add(row["experiments"])
        el = ExperimentList.from_file(os.path.join(directory, row["experiments"]), check_format=False)
        refl = flex.reflection_table.from_file(os.path.join(directory, row["reflections"]))
        experiments.extend(el)
        tables.append(refl)
    expt_path = os.path.join(directory, prefix + ".expt")
    refl_path = os.path.join(directory, prefix + ".refl")
    reflections = flex.reflection_table.concat(tables) if tables else flex.reflection_table()
    if tables:
        reflections.assert_experiment_identifiers_are_consistent(experiments)
    program.write_experiments(expt_path, experiments)
    program.write_reflections(refl_path, reflections)
    return expt_path, refl_path, len(experiments)


def summarise(rows: list[dict]) -> str:
    n = len(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    parts = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"{n} images: {parts}"
