"""Drivers of ``diffuse.stills_process``: serial, local processes, MPI; run outputs.

Every driver hands the same work units (:func:`~diffuse_cli.stills.inputs.
group_sequences`) to the same :func:`process_unit`, so per-still results do
not depend on how the run was spread. Then one summary (CSV + JSON, :mod:`diffuse_cli.formats.stills_process`) and one
combined ``.expt``/``.refl`` pair per run.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from diffuse_cli import program
from diffuse_cli.formats.stills_process import write_stills_process_summary
from diffuse_cli.stills.inputs import ROUTE_SEQUENCE, Item, group_sequences
from diffuse_cli.stills.records import INDEXED, SUMMARY_COLUMNS, Config
from diffuse_cli.stills.sequence_route import process_sequence_unit
from diffuse_cli.stills.still_route import process_item

logger = logging.getLogger("diffuse.stills_process")

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


def choose_integration_sample(items: list[Item], n: int) -> list[Item]:
    """XFEL mode: mark all but ``n`` evenly spaced stills (route stills) ``integrate=False``.

    Rotation frames (routes sequence, rotation_as_stills) are always
    integrated. Returns the sample.
    """
    from diffuse_cli.stills.inputs import ROUTE_STILLS

    stills = [it for it in items if it.route == ROUTE_STILLS and it.error is None]
    pick = set(np.unique(np.linspace(0, len(stills) - 1, min(n, len(stills))).round().astype(int)).tolist()) \
        if stills else set()
    for i, it in enumerate(stills):
        it.integrate = i in pick
    return [it for i, it in enumerate(stills) if i in pick]


def sample_top_up(items: list[Item], rows: list[dict], n: int) -> list[Item]:
    """Stills to process again with integration when sample stills failed to index.

    Up to ``n`` integrated stills in all: the shortfall is taken, evenly spaced,
    from the stills that were indexed without integration (marked
    ``integrate=True`` here). Empty when the sample is complete.
    """
    from diffuse_cli.stills.inputs import ROUTE_STILLS

    done = sum(1 for it, r in zip(items, rows) if it.route == ROUTE_STILLS and it.integrate and r.get("integrated"))
    spare = [it for it, r in zip(items, rows) if not it.integrate and r["status"] == INDEXED]
    missing = min(n - done, len(spare))
    if missing <= 0:
        return []
    pick = np.unique(np.linspace(0, len(spare) - 1, missing).round().astype(int))
    again = [spare[i] for i in pick]
    for it in again:
        it.integrate = True
    return again


def run_stills_process(params, paths, phil, comm=None):
    """The body of diffuse.stills_process after parsing (``phil``: the parser's working PHIL,
    for the parameter fingerprint); every rank calls it under MPI."""
    import time

    from libtbx.utils import Sorry

    from diffuse_cli import shared_detector
    from diffuse_cli.stills import inputs, records

    rank = comm.Get_rank() if comm is not None else 0
    directory = params.output.directory
    bad = [p for p in paths if p.endswith(".phil")]
    if bad:
        raise Sorry(f"PHIL file not understood: {bad[0]}")
    for mask_path in (params.spotfinder.lookup.mask, params.integration.lookup.mask):
        if mask_path is not None and not os.path.isfile(mask_path):
            raise Sorry(f"File not found: {mask_path}")
    if params.input.file_list is not None and not os.path.isfile(params.input.file_list):
        raise Sorry(f"File not found: {params.input.file_list}")

    items = config = None
    if rank == 0:
        all_paths = inputs.expand_paths(paths, params.input.glob, params.input.file_list)
        if not all_paths:
            raise Sorry("No input images given")
        items = inputs.discover(all_paths, params.processing_mode)
        if params.input.image_tag:
            items = [it for it in items if it.tag in set(params.input.image_tag)]
        if params.input.max_images:
            items = items[: params.input.max_images]
        if params.input.show_image_tags:
            for it in items:
                print(it.tag)
            return None
        os.makedirs(directory, exist_ok=True)
        routes = {}
        for it in items:
            routes[it.route] = routes.get(it.route, 0) + 1
        logger.info("%d input images; routes: %s", len(items),
                    ", ".join(f"{k} {v}" for k, v in routes.items()))
        for it in items:
            if it.route in (inputs.ROUTE_ROTATION_AS_STILLS, inputs.ROUTE_SEQUENCE):
                logger.info("  %s: rotation frame of %.3f deg (header width %.3f deg) -> route %s",
                            it.tag, it.osc_width, it.header_osc_width, it.route)
        sample = params.integration.sample
        if sample is not None:
            chosen = choose_integration_sample(items, sample)
            logger.info("XFEL mode (integration.sample=%d): %d stills integrated, the other %d indexed and "
                        "refined only", sample, len(chosen), sum(not it.integrate for it in items))
        config = records.Config(
            params=params,
            directory=directory,
            fingerprint=records.params_fingerprint(phil, params),
            overwrite=params.overwrite,
        )

    t0 = time.perf_counter()

    def report(i, row):
        reason = f" ({row['reason']})" if row["reason"] else ""
        extra = " [done earlier]" if row.get("resumed") else ""
        logger.info("%s: %s%s, %d indexed, %d integrated%s", row["tag"], row["status"],
                    reason, row["n_indexed"], row["n_integrated"], extra)

    nproc = program.resolve_nproc(params.nproc)
    if nproc == 1 and params.mp.nproc > 1:
        nproc = params.mp.nproc

    def run_items(batch):
        if comm is not None:  # every rank takes part; rank 0 holds the batch
            return run_mpi(batch, config, comm, on_result=report if rank == 0 else None)
        return run_local(batch, config, nproc, on_result=report)

    shared = params.rotation_frames.shared_detector and params.input.reference_geometry is None
    min_frames = params.rotation_frames.shared_detector_min_frames
    if shared and rank == 0:
        shared_detector.use_stored(items, config, min_frames)
    results = run_items(items)
    again = None
    if shared and rank == 0:
        again = shared_detector.refine_datasets(items, [r[0] for r in results], config, min_frames)
    if shared and comm is not None:
        again = comm.bcast(again, root=0)
    if again:
        redone = run_items(again)
        if rank == 0:
            position = {it.tag: i for i, it in enumerate(items)}
            for it, res in zip(again, redone):
                results[position[it.tag]] = res
    if params.integration.sample is not None:
        top_up = None
        if rank == 0:
            top_up = sample_top_up(items, [r[0] for r in results], params.integration.sample)
            if top_up:
                logger.info("Integration sample short (sample stills not indexed): integrating %d other "
                            "indexed stills", len(top_up))
        if comm is not None:
            top_up = comm.bcast(top_up, root=0)
        if top_up:
            redone = run_items(top_up)
            if rank == 0:
                position = {it.tag: i for i, it in enumerate(items)}
                for it, res in zip(top_up, redone):
                    results[position[it.tag]] = res
    if rank != 0:
        return None
    elapsed = time.perf_counter() - t0

    rows = [r[0] for r in results]
    hists = [r[1] for r in results]
    csv_path, _ = write_stills_process_summary(rows, os.path.join(directory, params.output.summary_prefix),
                                               SUMMARY_COLUMNS)
    expt_path, refl_path, n_combined = write_combined(
        rows, directory, params.output.combined_prefix
    )
    if params.output.plots:
        from diffuse_cli import qc_plots

        qc_plots.make_all(rows, hists, directory)
    logger.info("%s in %.1f s", summarise(rows), elapsed)
    logger.info("Summary: %s", csv_path)
    logger.info("Combined: %s, %s (%d experiments)", expt_path, refl_path, n_combined)
    if n_combined == 0:
        first = next((r for r in rows if r["reason"]), None)
        why = f"; {first['image']}: {first['reason']}" if first else ""
        raise Sorry(f"No image was indexed ({summarise(rows)}{why}); see {csv_path}")
