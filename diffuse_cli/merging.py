"""Scaling and merging of diffuse.merge: stills streamed onto the hkl grid, refined scales, the map.

Pieces: :mod:`diffuse_cli.merge_accumulator` (the per-voxel sums and the merged
map over the P1 box), :mod:`diffuse_cli.merge_compact` (the same per compact ASU
voxel, for the cached passes), :mod:`diffuse_cli.merge_statistics` (CC1/2, shells),
:mod:`diffuse_cli.merge_consistency` (which stills may be merged); their
public names are importable from here too. The passes' control (acceleration,
outlier phase) is in :mod:`diffuse_cli.merge_passes`, the per-still fits against
the reference in :mod:`diffuse_cli.still_fits`, the sources of stills in
:mod:`diffuse_cli.still_sources`.

Observations (fractional hkl, intensity I, σ) are accumulated still by still
into dense **P1** arrays over the whole grid (:class:`diffuse_cli.grid.HKLGrid`)
for two half-datasets (stills assigned to halves at random with a fixed seed):
Σw, Σw·I and the count, with w = 1/σ². Memory is therefore bounded by the grid,
never by the number of observations. The Laue-group merge is obtained by
folding these P1 sums onto the asymmetric unit with the grid's ASU map
(:func:`diffuse_cli.symmetry.grid_asu_map`), so a P1 merge symmetrised later
and a merge in the Laue group are the same thing. Merged voxel value:
I = Σw·I / Σw, σ = 1/sqrt(Σw) (inverse-variance weighted mean).

The per-observation hot loop (hkl → voxel → three sums) is a numba kernel
when numba is importable (≈ 20–40 M observations per CPU-second here for
detector-ordered pixels), with a numpy ``unique``/``bincount`` fallback
(≈ 4 M/s) that gives the same sums to rounding.

The default (simple model, numba) path reads each still once and keeps its
sums per compact ASU voxel only; its result is a
:class:`~diffuse_cli.compact_map.CompactMergedMap` (see
``scale_and_merge(cached=...)``).

Distributed runs (MPI): every rank accumulates its own stills; the arrays are
summed with ``Allreduce``, giving the same map as a serial run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from diffuse_cli.grid import HKLGrid
from diffuse_cli import merge_compact as _mc
from diffuse_cli.merge_accumulator import HAVE_NUMBA, Accumulator, MergedMap, voxel_flat  # noqa: F401
from diffuse_cli.merge_compact import CompactAccumulator, compact_tables
from diffuse_cli.compact_map import CompactMergedMap, merged_from_compact  # noqa: F401
from diffuse_cli.merge_consistency import (StillIdentity, cell_deviation, cell_of,  # noqa: F401  (re-exported)
                                           change_of_basis_onto, check_stills, still_identity)
from diffuse_cli.merge_statistics import (anisotropic_part, format_statistics,  # noqa: F401  (re-exported)
                                          map_agreement, shell_edges, shell_statistics, voxel_d_star,
                                          voxel_hkl)
from diffuse_cli.scaling import ScaleModel, model_variance
from diffuse_cli.scaling_terms import ScalingTerms
from diffuse_cli.symmetry import LaueSymmetry, grid_asu_map, reciprocal_metric
from diffuse_cli.merge_prepared import (CACHE_BYTES, _SCRATCH, _buffer, _fit_prepared, _floor, _floor_weighted,
                                        _PreparedStore, prepare_still)
from diffuse_cli.merge_passes import (ACCELERATION_MEMORY, PassAcceleration, _carried_map, _gather_fits,
                                      _gather_params, _pass_scales, _reject_limit)
from diffuse_cli.still_fits import _expected_intensity, _fit_still, _fit_still_terms, _outliers
from diffuse_cli.still_sources import ListSource, StillSource, _loaded  # noqa: F401  (ListSource: docs/merge.md)

logger = logging.getLogger("diffuse.merging")

# ---------------------------------------------------------------- scale and merge


@dataclass
class MergeResult:
    merged: MergedMap
    params: np.ndarray  # (n_stills, n_control_points) scale g per still (normalised)
    fits: list  # FitResult per still (last iteration), None if not fitted
    half: np.ndarray  # (n_stills,) half-dataset of each still
    iterations: int
    converged: bool
    history: list  # max relative scale change per iteration
    n_observations: int
    terms: ScalingTerms | None = None  # the richer model's refined terms (scaling.model=full)


def _asu_maps(grid, laue, unit_cell, d_min, d_max, lut=None, friedel: bool = True):
    """(lut, hand): the ASU map of the grid (the caller's ``lut`` when given) and,
    with ``friedel``, each voxel's Bijvoet side (``grid_asu_map(return_hand=True)``)."""
    if not friedel:
        return (grid_asu_map(grid, laue, unit_cell, d_min=d_min, d_max=d_max) if lut is None else lut), None
    computed, hand = grid_asu_map(grid, laue, unit_cell, d_min=d_min, d_max=d_max, return_hand=True)
    return (computed if lut is None else lut), hand


def half_assignment(n_stills: int, seed: int = 0, blocks=None) -> np.ndarray:
    """Random halves (0/1) by still, reproducible from the seed.

    blocks: optional (n_stills,) block label per still; whole blocks are
    assigned to a half (equal numbers of blocks), so that neighbouring frames
    of a sweep, which share pixels and systematic errors, never end up in
    different halves. None: every still is its own block.
    """
    rng = np.random.default_rng(seed)
    if blocks is None:
        half = np.zeros(n_stills, dtype=np.int64)
        half[rng.permutation(n_stills)[: n_stills // 2]] = 1
        return half
    labels, block_of = np.unique(np.asarray(blocks), return_inverse=True)
    block_half = np.zeros(len(labels), dtype=np.int64)
    block_half[rng.permutation(len(labels))[: len(labels) // 2]] = 1
    return block_half[block_of]


def scale_and_merge(
    source: StillSource,
    grid: HKLGrid,
    laue: LaueSymmetry,
    unit_cell,
    d_min: float | None = None,
    d_max: float | None = None,
    scale: bool = True,
    model: ScaleModel | None = None,
    max_iterations: int = 10,
    tolerance: float = 1e-3,
    reindex: Sequence | None = None,
    half_seed: int = 0,
    half_blocks=None,
    friedel: bool = True,
    fit_max_obs: int = 200_000,
    min_reference_counts: int = 2,
    comm=None,
    lut: np.ndarray | None = None,
    reject_sigma: float | None = 6.0,
    chunk: int = 4_000_000,
    use_numba: bool | None = None,
    progress: Callable | None = None,
    neighbours=None,
    cached: bool | None = None,
    cache_bytes: int | None = None,
    acceleration_memory: int = ACCELERATION_MEMORY,
) -> MergeResult:
    """Merge stills (optionally with per-still scales refined to convergence).

    Pass 0 merges unscaled data; each further pass fits every still's scale
    against the previous pass's merged map (reference) and accumulates the
    still with its new scale. Iterates until the largest relative change of
    any still's scale is below ``tolerance`` or ``max_iterations`` passes.
    Scales are normalised to a geometric mean of 1 after each pass.

    half_blocks: block label per still for the CC½ halves (see
    :func:`half_assignment`). friedel: also merge h's and −h's sides apart
    for the Friedel CC (MergedMap.friedel_I).

    reindex: per still, None or an integer (3,3) operator applied as hkl @ M
    (indexing-ambiguity resolution). reject_sigma: in scaling passes, an
    observation whose residual (I/g − I_ref)/(σ/g) exceeds this many robust
    standard deviations of its still's residuals is left out of the merge
    (None: keep everything). Two phases (simple model; docs/merge.md,
    "Outlier rejection"): passes without rejection, the fits with Huber
    weights only (σ weights; with a variance model its gross-outlier cut),
    until the change is below ``tolerance``; then rejection and Tukey's
    biweight from those scales until it is below ``tolerance`` again (at
    least one more pass). Under MPI (``comm``), rank r handles
    stills r, r+size, ...; sums and scales are reduced across ranks.

    model: a :class:`ScaleModel` (g only), or :class:`ScalingTerms` with
    absorption, detector and offset terms (see :func:`_scale_and_merge_terms`);
    neighbours (n_stills, 2): previous/next still of the same sweep, −1 for
    none (ScalingTerms.neighbour_prior).

    cached (the default with numba, unless use_numba=False; simple model):
    every still is read once; its compact ASU voxel indices and the arrays
    the passes need are kept
    (:func:`prepare_still`; in memory up to ``cache_bytes``, default
    :data:`CACHE_BYTES`, then in temporary ``.npy`` files read back memory-mapped),
    and each pass only fits and accumulates. ``cached=False``: the reference
    implementation, which reloads every still in every pass (same map to
    float32 rounding of I, σ and v1; tests).

    acceleration_memory (simple model): passes of history for the Anderson
    step on log g once the passes converge slowly (:class:`PassAcceleration`;
    0: plain damped passes). The fixed point and the convergence test are
    the plain ones.
    """
    if isinstance(model, ScalingTerms):
        if model.any_extra and scale:
            return _scale_and_merge_terms(
                source, grid, laue, unit_cell, model, d_min=d_min, d_max=d_max,
                max_iterations=max_iterations, tolerance=tolerance, reindex=reindex,
                half_seed=half_seed, half_blocks=half_blocks, friedel=friedel,
                fit_max_obs=fit_max_obs, min_reference_counts=min_reference_counts, comm=comm,
                lut=lut, reject_sigma=reject_sigma, chunk=chunk, use_numba=use_numba,
                progress=progress, neighbours=neighbours)
        model = model.base
    if (HAVE_NUMBA and use_numba is not False) if cached is None else cached:
        return _scale_and_merge_cached(
            source, grid, laue, unit_cell, d_min=d_min, d_max=d_max, scale=scale, model=model,
            max_iterations=max_iterations, tolerance=tolerance, reindex=reindex, half_seed=half_seed,
            half_blocks=half_blocks, friedel=friedel, fit_max_obs=fit_max_obs,
            min_reference_counts=min_reference_counts, comm=comm, lut=lut, reject_sigma=reject_sigma,
            progress=progress, cache_bytes=CACHE_BYTES if cache_bytes is None else cache_bytes,
            acceleration_memory=acceleration_memory)
    n_stills = len(source)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    mine = list(range(rank, n_stills, size))
    lut, hand = _asu_maps(grid, laue, unit_cell, d_min, d_max, lut, friedel)
    if model is None:
        model = ScaleModel(1, d_star_sq_max=(1.0 / d_min**2) if d_min else 1.0)
    gstar = reciprocal_metric(unit_cell)
    half = half_assignment(n_stills, half_seed, half_blocks)
    params = np.ones((n_stills, model.n_control_points))
    fits: list = [None] * n_stills
    reference = None
    history = []
    converged = not scale
    iterations = 0
    n_passes = (max_iterations + 1) if scale else 1
    merged = None
    n_obs = 0
    accelerate = PassAcceleration(acceleration_memory)
    rejecting = False  # phase 2 (docs/merge.md, "Outlier rejection"): redescending fits, outliers rejected
    for it in range(n_passes):
        scaled = reference is not None
        new = np.zeros_like(params)
        ok = np.zeros(n_stills)
        # every still's fit first: the pass's scales (accelerated, PassAcceleration) need them all
        for i in (progress(mine, desc=f"fit {it}") if (progress and scaled) else mine):
            if scaled:
                hkl, I, sig, v1 = _loaded(source, i, reindex)
                fits[i] = _fit_still(model, grid, gstar, reference, hkl, I, sig, fit_max_obs,
                                     min_reference_counts, seed=i, variance_per_intensity=v1,
                                     previous=(params[i], _reject_limit(fits[i], rejecting and reject_sigma),
                                               1.0 / n_stills), redescending=rejecting)
                if fits[i].ok:
                    new[i] = fits[i].params
                    ok[i] = 1
                else:
                    new[i] = params[i]
            else:
                new[i] = params[i]
                ok[i] = 1
        raw, normalised, fits, c, change = _gather_params(comm, new, ok, fits, mine, params, scaled)
        normalised, raw, start, last, note, rejecting, accelerate = _pass_scales(
            accelerate, acceleration_memory, params, normalised, raw, ok, c, scaled, rejecting, change, tolerance,
            it == n_passes - 1)
        acc = Accumulator(grid, 2, use_numba=use_numba)
        for i in (progress(mine, desc=f"pass {it}") if progress else mine):
            hkl, I, sig, v1 = _loaded(source, i, reindex)
            if model.n_control_points == 1:
                factor = 1.0 / raw[i, 0]
            else:
                h = np.asarray(hkl, dtype=np.float64)
                dss = np.einsum("ni,ij,nj->n", h, gstar, h)
                factor = 1.0 / model.evaluate(raw[i], dss)
            weight = None
            model_sigma = sig
            if v1 is not None:
                I_f = np.asarray(I, dtype=np.float64)
                var = model_variance(I_f, sig, v1, _expected_intensity(grid, reference, hkl, I_f, 1.0 / factor))
                weight = 1.0 / (np.asarray(factor) ** 2 * var)
                model_sigma = np.sqrt(var)
            if scaled and rejecting and reject_sigma and fits[i] is not None and fits[i].ok:
                bad = _outliers(grid, reference, hkl, I, model_sigma, factor,
                                reject_sigma * fits[i].residual_scale)
                if weight is None:
                    sig = np.where(bad, 0.0, sig)  # the accumulator skips σ ≤ 0
                else:
                    weight = np.where(bad, 0.0, weight)
            # with a variance model, the merged σ uses the model σ too: a voxel
            # whose observations all have zero counts still gets σ > 0
            acc.add(hkl, I, sig if weight is None else model_sigma, factor,
                    half=int(half[i]), chunk=chunk, weight=weight)
        acc.reduce(comm)
        params = normalised
        merged = acc.merge(lut, factor=c, hand=hand)
        n_obs = acc.n_added
        iterations = it
        del acc
        if scaled:
            history.append(change)
            logger.info("scaling pass %d: max relative scale change %.2e%s", it, change, note)
            if change < tolerance and not start:
                converged = True
                break
        reference = _carried_map(merged, reference)
    return MergeResult(merged, params, fits, half, iterations, converged, history, n_obs)


def _scale_and_merge_terms(source, grid, laue, unit_cell, terms: ScalingTerms, d_min=None, d_max=None,
                           max_iterations=10, tolerance=1e-3, reindex=None, half_seed=0,
                           half_blocks=None, friedel=True, fit_max_obs=200_000,
                           min_reference_counts=2, comm=None, lut=None, reject_sigma=6.0,
                           chunk=4_000_000, use_numba=None, progress=None,
                           neighbours=None) -> MergeResult:
    """scale_and_merge with the richer model a·d·g·(I_ref + c) (:class:`ScalingTerms`).

    Pass 0 merges unscaled and records the range of ŝ1 and the panels. Each
    further pass, per still: fit (g, a, c) against the previous map with the
    current d, add its detector normal equations, accumulate the still
    scaled, I → I/(a·d·g) − c, σ → σ/(a·d·g). After the pass: solve d,
    impose the constraints (ScalingTerms.end_pass) and correct the map for
    the overall factor and the mean offset. Stops when no term changes by
    more than ``tolerance`` (relative; c relative to the median merged I).
    """
    n_stills = len(source)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    mine = list(range(rank, n_stills, size))
    lut, hand = _asu_maps(grid, laue, unit_cell, d_min, d_max, lut, friedel)
    gstar = reciprocal_metric(unit_cell)
    half = half_assignment(n_stills, half_seed, half_blocks)
    terms.start(n_stills, neighbours)
    fits: list = [None] * n_stills
    reference = None
    history = []
    converged = False
    merged = None
    n_obs = 0
    iterations = 0
    for it in range(max_iterations + 1):
        acc = Accumulator(grid, 2, use_numba=use_numba)
        new_g = np.zeros_like(terms.g)
        new_a = np.zeros_like(terms.alpha)
        new_c = np.zeros_like(terms.kappa)
        ok = np.zeros(n_stills)
        iterator = progress(mine, desc=f"pass {it}") if progress else mine
        for i in iterator:
            obs = source.load(i)
            hkl, I, sig = obs["hkl"], np.asarray(obs["I"]), np.asarray(obs["sigma"])
            v1 = obs.get("variance_per_intensity")
            if reindex is not None and reindex[i] is not None:
                hkl = np.asarray(hkl) @ np.asarray(reindex[i]).astype(np.asarray(hkl).dtype)
            if reference is None:
                terms.observe(obs)
                factor, offset = 1.0, 0.0
                ok[i] = 1
            else:
                h = np.asarray(hkl, dtype=np.float64)
                dss = np.einsum("ni,ij,nj->n", h, gstar, h)
                co = terms.coordinates(obs, dss)
                fits[i] = _fit_still_terms(terms, i, grid, reference, hkl, I, sig, co, fit_max_obs,
                                           min_reference_counts, seed=i, variance_per_intensity=v1,
                                           previous=((*terms.evaluate(i, co), _reject_limit(fits[i], reject_sigma),
                                                      1.0 / n_stills) if terms.leave_one_out else None))
                if fits[i].ok:
                    new_g[i], new_a[i], new_c[i] = fits[i].params, fits[i].absorption, fits[i].offset
                    ok[i] = 1
                    m, offset = terms.evaluate(i, co, new_g[i], new_a[i], new_c[i])
                else:
                    m, offset = terms.evaluate(i, co)
                factor = 1.0 / m
            if reference is None:
                new_g[i], new_a[i], new_c[i] = terms.g[i], terms.alpha[i], terms.kappa[i]
            # the offset is in merged units: (I − c·m)/m = I/m − c
            I_adj = np.asarray(I, dtype=np.float64) - np.asarray(offset) / np.asarray(factor)
            weight = None
            model_sigma = sig
            if v1 is not None:
                I_f = np.asarray(I, dtype=np.float64)
                expected = _expected_intensity(grid, reference, hkl, I_f, 1.0 / np.asarray(factor))
                if reference is not None:
                    expected = expected + np.asarray(offset) / np.asarray(factor)
                var = model_variance(I_f, sig, v1, expected)
                weight = 1.0 / (np.asarray(factor) ** 2 * var)
                model_sigma = np.sqrt(var)
            if reference is not None and reject_sigma and fits[i] is not None and fits[i].ok:
                bad = _outliers(grid, reference, hkl, I_adj, model_sigma, factor,
                                reject_sigma * fits[i].residual_scale)
                if weight is None:
                    sig = np.where(bad, 0.0, sig)
                else:
                    weight = np.where(bad, 0.0, weight)
            acc.add(hkl, I_adj, sig if weight is None else model_sigma, factor,
                    half=int(half[i]), chunk=chunk, weight=weight)
        acc.reduce(comm)
        if comm is not None and size > 1:
            from mpi4py import MPI

            for arr in (new_g, new_a, new_c, ok):
                comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
            fits = _gather_fits(comm, fits, mine, n_stills)
        n_obs = acc.n_added
        iterations = it
        if reference is None:
            terms.finish_setup(comm)
            merged = acc.merge(lut, factor=1.0, hand=hand)
            reference = merged
            del acc
            continue
        typical = float(np.nanmedian(np.abs(reference.I[reference.counts > 0]))) if np.any(reference.counts > 0) else 0.0
        step = terms.end_pass(new_g, new_a, new_c, ok > 0, comm=comm, typical=typical)
        merged = acc.merge(lut, factor=step["factor"], hand=hand)
        del acc
        _adjust_map(merged, unit_cell, terms, step["ring_factor"], step["offset_shift"])
        history.append(step["change"])
        logger.info("scaling pass %d: max relative change %.2e", it, step["change"])
        if step["change"] < tolerance:
            converged = True
            break
        reference = _carried_map(merged, reference)
    return MergeResult(merged, terms.g.copy(), fits, half, iterations, converged, history, n_obs, terms)


def _adjust_map(merged: MergedMap, unit_cell, terms: ScalingTerms, ring_factor, offset_nodes) -> None:
    """The map's share of the gauge moves (in place): I → ρ(d*)·I + c̄(d*).

    ρ: the radial static absorption at the ring centres (None: 1), c̄: the
    mean offset, node values ``offset_nodes`` (see ScalingTerms.end_pass).
    """
    has_ring = ring_factor is not None and np.any(np.isfinite(ring_factor))
    has_shift = terms.n_c > 0 and np.any(offset_nodes)
    if not (has_ring or has_shift):
        return
    vox = np.flatnonzero(np.isfinite(merged.I))
    ds = voxel_d_star(merged.grid, vox, unit_cell)
    mul = np.ones(len(vox))
    if has_ring:
        have = np.isfinite(ring_factor)
        mul = np.exp(np.interp(ds, terms.ring_centres()[have], np.log(ring_factor[have])))
    add = terms.offset_at(offset_nodes, ds) if has_shift else np.zeros(len(vox))
    merged.I[vox] = merged.I[vox] * mul + add
    merged.sigma[vox] = merged.sigma[vox] * mul
    for arr in list(merged.half_I) + list(merged.friedel_I):
        fin = np.isfinite(arr[vox])
        arr[vox[fin]] = (arr[vox[fin]] * mul[fin] + add[fin]).astype(arr.dtype)


def _scale_and_merge_cached(source, grid, laue, unit_cell, d_min=None, d_max=None, scale=True, model=None,
                            max_iterations=10, tolerance=1e-3, reindex=None, half_seed=0, half_blocks=None,
                            friedel=True, fit_max_obs=200_000, min_reference_counts=2, comm=None, lut=None,
                            reject_sigma=6.0, progress=None, cache_bytes=CACHE_BYTES,
                            acceleration_memory=ACCELERATION_MEMORY) -> MergeResult:
    """scale_and_merge (simple model) with every still read once (see its ``cached``)."""
    n_stills = len(source)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    mine = list(range(rank, n_stills, size))
    if lut is None:  # no full-grid int64 map: the int32 table and the hand, freed after reading
        reps, table, hand = _mc.compact_asu(grid, laue, unit_cell, d_min, d_max, friedel=friedel)
    else:
        lut, hand = _asu_maps(grid, laue, unit_cell, d_min, d_max, lut, friedel)
        reps, table = compact_tables(lut)
    n_c = len(reps)
    centric = None if hand is None else hand[reps] == 0
    if model is None:
        model = ScaleModel(1, d_star_sq_max=(1.0 / d_min**2) if d_min else 1.0)
    gstar = reciprocal_metric(unit_cell)
    half = half_assignment(n_stills, half_seed, half_blocks)
    params = np.ones((n_stills, model.n_control_points))
    fits: list = [None] * n_stills
    history = []
    converged = not scale
    iterations = 0
    n_passes = (max_iterations + 1) if scale else 1
    values = None
    n_obs = 0
    load = getattr(source, "load_deferred", None) or source.load
    store = _PreparedStore(cache_bytes)
    accelerate = PassAcceleration(acceleration_memory)
    try:
        for i in (progress(mine, desc="read") if progress else mine):
            store.put(i, prepare_still(load(i), grid, table, hand, gstar,
                                       None if reindex is None else reindex[i], fit_max_obs, seed=i,
                                       with_dss=model.n_control_points > 1))
        if store.n_spilled:
            logger.info("Observations of %d stills kept on disk (%s), %d in memory",
                        store.n_spilled, store.directory, len(store.items) - store.n_spilled)
        del table, hand
        # reference: the previous pass's map per compact voxel (I, sigma, counts)
        reference = None
        empty = np.empty(0)
        rejecting = False  # phase 2 (docs/merge.md, "Outlier rejection"): redescending fits, outliers rejected
        for it in range(n_passes):
            scaled = reference is not None
            new = np.zeros_like(params)
            ok = np.zeros(n_stills)
            # every still's fit first, so that the pass knows whether it is the last one
            # (only the last one needs the half-dataset and Friedel sums)
            for i in (progress(mine, desc=f"fit {it}") if (progress and scaled) else mine):
                if scaled:
                    fits[i] = _fit_prepared(model, store.get(i), reference["I"], reference["counts"],
                                            min_reference_counts,
                                            previous=(params[i], _reject_limit(fits[i], rejecting and reject_sigma),
                                                      1.0 / n_stills, reference["sigma"]),
                                            redescending=rejecting)
                    ok[i] = fits[i].ok
                    new[i] = fits[i].params if fits[i].ok else params[i]
                else:
                    new[i] = params[i]
                    ok[i] = 1
            raw, normalised, fits, norm, change = _gather_params(comm, new, ok, fits, mine, params, scaled)
            normalised, raw, start, last, note, rejecting, accelerate = _pass_scales(
                accelerate, acceleration_memory, params, normalised, raw, ok, norm, scaled, rejecting, change,
                tolerance, it == n_passes - 1)
            ref = reference["I"] if scaled else empty
            if last:
                reference = None  # σ and counts were for the fits only
            acc = CompactAccumulator(n_c, statistics=last)
            for i in (progress(mine, desc=f"pass {it}") if progress else mine):
                p = store.get(i)
                if model.n_control_points == 1:
                    factor = np.array([1.0 / raw[i, 0]])
                else:
                    factor = 1.0 / model.evaluate(raw[i], np.asarray(p.dss, dtype=np.float64))
                limit = 0.0
                if scaled and rejecting and reject_sigma and fits[i] is not None and fits[i].ok:
                    limit = float(reject_sigma * fits[i].residual_scale)
                expected, floor = empty, 0.0
                if p.v1 is not None:
                    expected = _buffer("expected", len(p.c))
                    if not scaled:
                        expected.fill(p.typical)
                    else:
                        _mc._expected(p.c, ref, 1.0 / factor, p.typical, expected)
                    g = 1.0 / factor
                    if scaled and len(g) == 1 and g[0] > 0 and p.voxels is not None:
                        floor = _floor_weighted(ref, p.voxels, float(g[0]), p.typical, p.n_dropped)
                    else:
                        floor = _floor(expected, p.typical, p.n_dropped)
                acc.n_added += _mc._pass(p.c, p.side, p.I, p.sigma, empty if p.v1 is None else p.v1,
                                         factor, ref, expected, floor, limit if np.isfinite(limit) else 0.0,
                                         int(half[i]), acc.sw, acc.swi, acc.cnt, *acc.stats)
            acc.reduce(comm)
            ref = None
            params = normalised
            n_obs = acc.n_added
            iterations = it
            if scaled:
                history.append(change)
                logger.info("scaling pass %d: max relative scale change %.2e%s", it, change, note)
                converged = converged or (change < tolerance and not start)
            if last:
                values = acc.take_means(factor=norm, centric=centric, friedel=centric is not None)
                break
            reference = acc.next_reference(norm, reference)
            del acc
    finally:
        store.close()
        _SCRATCH.clear()
    merged = CompactMergedMap(grid, laue, tuple(unit_cell), d_min, d_max, reps, values,
                                  centric=centric, _lut=lut)
    return MergeResult(merged, params, fits, half, iterations, converged, history, n_obs)


