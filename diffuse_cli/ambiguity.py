"""Indexing ambiguities of stills, and their resolution.

Indexing ambiguity: when the lattice metric has higher symmetry than the Laue
group (e.g. P4 on a tetragonal lattice), each still can be indexed in one of
``|lattice point group| / |Laue group|`` equivalent ways, related by the coset
representatives of the Laue group in the lattice group (e.g. ``k,h,-l``).
:func:`resolve_ambiguity` brings independently indexed stills to one indexing
by maximising pairwise correlations of their anisotropic (shell-mean
subtracted) intensities (Brehm & Diederichs 2014, Acta D70:101).

Operators are row-vector reciprocal-space matrices, as in :mod:`diffuse_cli.symmetry`.
The operators (:func:`~diffuse_cli.ambiguity_cosets.ambiguity_operators`) are in
:mod:`diffuse_cli.ambiguity_cosets`, the all-pairs solver in :mod:`diffuse_cli.ambiguity_pairwise`.
"""

from __future__ import annotations

import logging

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli.ambiguity_cosets import Ambiguity
from diffuse_cli.ambiguity_pairwise import _mean_cc, _pairwise_from_csr, pairwise_correlations, resolve_ambiguity
from diffuse_cli.symmetry import LaueSymmetry, grid_asu_map, reciprocal_metric

logger = logging.getLogger("diffuse.ambiguity")


def still_features(hkl, intensity, ambiguity: Ambiguity, grid, lut, shell_of_voxel):
    """Anisotropic binned signal of one still under each ambiguity operator.

    hkl: (N, 3) fractional Miller indices of the still's observations;
    intensity: (N,). grid/lut: a coarse grid and its ASU map (grid_asu_map);
    shell_of_voxel: (n_voxels,) int resolution-shell number of each voxel.
    Returns a list (one per operator) of (voxel ids, values): the mean
    intensity per ASU voxel minus the still's mean in that voxel's shell,
    divided by the still's rms anisotropic signal.
    """
    out = []
    I = np.asarray(intensity, dtype=np.float64)
    for m in ambiguity.operators:
        flat, inside = grid.flat_index(np.asarray(hkl, dtype=np.float64) @ m)
        rep = lut[flat]
        ok = rep >= 0
        rep = rep[ok]
        vals = I[inside][ok]
        uniq, inv = np.unique(rep, return_inverse=True)
        n = np.bincount(inv)
        mean = np.bincount(inv, vals) / n
        shells = shell_of_voxel[uniq]
        s_n = np.bincount(shells)
        s_sum = np.bincount(shells, mean)
        with np.errstate(invalid="ignore", divide="ignore"):
            shell_mean = s_sum / s_n
        x = mean - shell_mean[shells]
        rms = np.sqrt(np.mean(x * x)) if len(x) else 0.0
        out.append((uniq, x / rms if rms > 0 else x))
    return out


def ambiguity_grid(laue: LaueSymmetry, unit_cell, d_min: float, d_max: float | None = None,
                   ndiv: int = 1, n_shells: int = 10):
    """The coarse grid of the ambiguity features: (grid, ASU lookup, shell of each voxel).

    ``ndiv`` voxels per lattice unit; ``n_shells`` resolution shells of equal
    volume in d* between 1/d_max (or 0) and 1/d_min, for :func:`still_features`.
    """
    from diffuse_cli.grid import HKLGrid

    grid = HKLGrid.for_resolution(ndiv, unit_cell, d_min)
    lut = grid_asu_map(grid, laue, unit_cell, d_min=d_min, d_max=d_max)
    u = np.stack(np.unravel_index(np.arange(grid.n_voxels), grid.shape), -1)
    h = (u - np.asarray(grid.hkl_max) * ndiv) / float(ndiv)
    ds = np.sqrt(np.einsum("ni,ij,nj->n", h, reciprocal_metric(unit_cell), h))
    lo = 1.0 / d_max if d_max else 0.0
    edges = np.cbrt(np.linspace(lo**3, (1.0 / d_min) ** 3, n_shells + 1))
    shell_of_voxel = np.clip(np.searchsorted(edges, ds, side="right") - 1, 0, n_shells - 1)
    return grid, lut, shell_of_voxel


def determine_reindexing(source, ambiguity: Ambiguity, unit_cell, d_min: float,
                         d_max: float | None = None, ndiv: int = 1, n_shells: int = 10,
                         min_overlap: int = 10, seed: int = 0, comm=None,
                         groups=None, dense_max: int = 1000, subset: int = 500,
                         max_passes: int = 5) -> dict:
    """Resolve the indexing ambiguity of the stills in ``source`` (see module doc).

    groups: optional (n,) ints; stills with the same value share one indexing
    by construction (the frames of one rotation sweep) and are resolved as
    one unit, their features averaged, so they are never reindexed against
    each other.

    Each still's observations are binned on a coarse grid (``ndiv`` voxels per
    lattice unit, ASU of the Laue group) under every ambiguity operator; memory
    is O(n_stills × coarse voxels per still) plus the n_stills² correlation
    matrices. Under MPI the per-still features are gathered on every rank and
    every rank solves the same problem.

    Up to ``dense_max`` units (stills, or sweeps with ``groups``) all pairs are
    correlated (:func:`resolve_ambiguity`). Above it the features are stored
    compactly (:class:`FeatureStore`, float32) and :func:`resolve_by_reference`
    resolves a random ``subset`` of units by all pairs, then assigns every
    unit against the resolved mean (at most ``max_passes`` refinement passes):
    memory O(n_stills × k × coarse voxels per still), time linear in n_stills.

    Returns dict(assignment (n,) int, operators (k,3,3), names, score,
    reindex: list of (3,3) arrays or None per still, mean_cc_same, method:
    "dense" or "reference"; for "reference" also info: see
    :func:`resolve_by_reference`, plus feature_bytes and the features and
    resolution times in s, wall and CPU).
    """
    import time

    n = len(source)
    k = ambiguity.n
    if k == 1:
        return {"assignment": np.zeros(n, dtype=np.int64), "operators": ambiguity.operators,
                "names": ambiguity.names(), "score": 0.0, "reindex": [None] * n}
    unit = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_units = int(unit.max()) + 1 if n else 0
    if n_units <= 1:  # one still or one sweep: a single indexing by construction
        return {"assignment": np.zeros(n, dtype=np.int64), "operators": ambiguity.operators,
                "names": ambiguity.names(), "score": 0.0, "reindex": [None] * n,
                "mean_cc_same": float("nan"), "method": "single"}
    grid, lut, shell_of_voxel = ambiguity_grid(ambiguity.laue, unit_cell, d_min, d_max=d_max,
                                               ndiv=ndiv, n_shells=n_shells)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    t_start, c_start = time.perf_counter(), time.process_time()
    dense = n_units <= dense_max
    # many single stills: stored block by block as they are binned (no list of all)
    streamed = not dense and n_units == n
    store = FeatureStore(k, grid.n_voxels) if streamed else None
    mine, pending = {}, []
    for i in range(rank, n, size):
        obs = source.load(i)
        hkl = np.asarray(obs["hkl"], dtype=np.float64)
        I = np.asarray(obs["I"], dtype=np.float64)
        s = np.asarray(obs["sigma"], dtype=np.float64)
        ok = np.isfinite(I) & np.isfinite(s) & (s > 0) & np.all(np.isfinite(hkl), axis=1)
        f = still_features(hkl[ok], I[ok], ambiguity, grid, lut, shell_of_voxel)
        if not dense:  # compact: 8 bytes per (operator, voxel)
            f = [(ids.astype(np.int32), vals.astype(np.float32)) for ids, vals in f]
        if streamed:
            pending.append(f)
            if len(pending) == 4096:
                store.append_features(pending)
                pending = []
        else:
            mine[i] = f
    if streamed and pending:
        store.append_features(pending)
    row_units = None
    if streamed and comm is not None and size > 1:
        # rank r holds stills r, r + size, ...: rows keep that order, mapped by row_units
        whole = FeatureStore(k, grid.n_voxels)
        for blocks in comm.allgather(store.blocks):
            for mats in blocks:
                whole.append(mats)
        store = whole
        row_units = np.concatenate([np.arange(r, n, size) for r in range(size)])
    elif not streamed:
        if comm is not None and size > 1:
            for part in comm.allgather(mine):
                mine.update(part)
        features = [mine.pop(i) for i in range(n)]
        if n_units < n:
            features = [_mean_features([features[i] for i in np.flatnonzero(unit == u)], k)
                        for u in range(n_units)]
        if not dense:
            store = FeatureStore.from_features(features, k, grid.n_voxels)
            del features
    if not dense:
        t_features, c_features = time.perf_counter(), time.process_time()
        unit_assignment, score, info = resolve_by_reference(
            store, ambiguity, subset=subset, max_passes=max_passes, min_overlap=min_overlap,
            seed=seed, row_units=row_units)
        info.update(feature_bytes=store.nbytes, features_s=t_features - t_start,
                    resolve_s=time.perf_counter() - t_features,
                    features_cpu_s=c_features - c_start,
                    resolve_cpu_s=time.process_time() - c_features)
        assignment = np.asarray(unit_assignment, dtype=np.int64)[unit]
        reindex = [None if a == 0 else ambiguity.operators[a] for a in assignment]
        return {"assignment": assignment, "operators": ambiguity.operators,
                "names": ambiguity.names(), "score": score, "reindex": reindex,
                "mean_cc_same": info["mean_cc_same"], "method": "reference", "info": info}
    if n_units == 1:
        unit_assignment, score = np.zeros(1, dtype=np.int64), 0.0
        cc = cnt = None
    else:
        cc, cnt = pairwise_correlations(features, k, grid.n_voxels, min_overlap=min_overlap)
        unit_assignment, score = resolve_ambiguity(cc, cnt, ambiguity, seed=seed)
    assignment = np.asarray(unit_assignment, dtype=np.int64)[unit]
    reindex = [None if a == 0 else ambiguity.operators[a] for a in assignment]
    return {"assignment": assignment, "operators": ambiguity.operators,
            "names": ambiguity.names(), "score": score, "reindex": reindex,
            "mean_cc_same": (_mean_cc(cc, cnt, unit_assignment, min_overlap)
                             if cc is not None else float("nan")), "method": "dense"}


def _mean_features(features: list, n_ops: int) -> list:
    """Per operator, the mean over stills of their (voxel ids, values) features."""
    out = []
    for a in range(n_ops):
        ids = np.concatenate([f[a][0] for f in features])
        vals = np.concatenate([f[a][1] for f in features])
        uniq, inv = np.unique(ids, return_inverse=True)
        out.append((uniq, np.bincount(inv, vals) / np.bincount(inv)))
    return out


# ------------------------------------------------ ambiguity at scale (10⁵ stills)


class FeatureStore:
    """Per-unit features under every operator, compactly: row blocks of CSR matrices.

    ``blocks[b][a]`` is a scipy CSR matrix (rows of block b × n_voxels) of the
    features under operator a: float32 values, int32 voxel ids sorted within
    each row. 8 bytes per (unit, operator, voxel). Blocks are never joined, so
    no transient copy of the whole store is made.
    """

    def __init__(self, n_ops: int, n_voxels: int):
        self.n_ops, self.n_voxels = int(n_ops), int(n_voxels)
        self.blocks: list[list] = []
        self.starts = [0]

    @property
    def n(self) -> int:
        return self.starts[-1]

    @property
    def nbytes(self) -> int:
        return int(sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
                       for mats in self.blocks for m in mats))

    def append(self, mats: list) -> None:
        """Add one block: a CSR matrix per operator, all with the same rows."""
        import scipy.sparse as sp

        if len(mats) != self.n_ops:
            raise ValueError(f"a block needs {self.n_ops} matrices, got {len(mats)}")
        rows = mats[0].shape[0]
        block = []
        for m in mats:
            m = sp.csr_matrix(m, dtype=np.float32)
            if m.shape != (rows, self.n_voxels):
                raise ValueError(f"block matrix of shape {m.shape}, expected {(rows, self.n_voxels)}")
            m.sort_indices()
            block.append(m)
        self.blocks.append(block)
        self.starts.append(self.n + rows)

    def append_features(self, features: list) -> None:
        """Add one block from a list (one per unit) of per-operator (voxel ids, values)."""
        import scipy.sparse as sp

        mats = []
        for a in range(self.n_ops):
            ids = [np.asarray(f[a][0]) for f in features]
            indptr = np.zeros(len(features) + 1, dtype=np.int64)
            np.cumsum([len(x) for x in ids], out=indptr[1:])
            data = np.concatenate([np.asarray(f[a][1], dtype=np.float32) for f in features])
            mats.append(sp.csr_matrix((data, np.concatenate(ids).astype(np.int32), indptr),
                                      shape=(len(features), self.n_voxels)))
        self.append(mats)

    @classmethod
    def from_features(cls, features: list, n_ops: int, n_voxels: int, block: int = 4096):
        """From a list (one per unit) of per-operator (voxel ids, values), as :func:`still_features`.

        Entries of ``features`` are released (set to None) as they are stored.
        """
        store = cls(n_ops, n_voxels)
        for r0 in range(0, len(features), block):
            r1 = min(len(features), r0 + block)
            store.append_features(features[r0:r1])
            for i in range(r0, r1):
                features[i] = None
        return store

    def iter_blocks(self):
        """(first row, last row + 1, [CSR per operator]) of each block."""
        for b, mats in enumerate(self.blocks):
            yield self.starts[b], self.starts[b + 1], mats

    def rows(self, a: int, idx) -> "object":
        """float64 CSR (len(idx) × n_voxels) of units ``idx`` (in that order) under operator a."""
        import scipy.sparse as sp

        idx = np.asarray(idx, dtype=np.int64)
        blk = np.searchsorted(self.starts, idx, side="right") - 1
        parts, where = [], []
        for b in np.unique(blk):
            sel = np.flatnonzero(blk == b)
            parts.append(self.blocks[b][a][idx[sel] - self.starts[b]])
            where.append(sel)
        out = sp.vstack(parts, format="csr")[np.argsort(np.concatenate(where))]
        return out.astype(np.float64)


def _entry_rows(m) -> np.ndarray:
    """Row number of every stored entry of a CSR matrix."""
    return np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))


def _reference_sums(store: FeatureStore, x: np.ndarray, use: np.ndarray):
    """Per voxel, the sum and count of the features of units ``use`` in their setting ``x``."""
    S = np.zeros(store.n_voxels)
    N = np.zeros(store.n_voxels)
    for r0, r1, mats in store.iter_blocks():
        for a, m in enumerate(mats):
            e = (use[r0:r1] & (x[r0:r1] == a))[_entry_rows(m)]
            S += np.bincount(m.indices[e], m.data[e].astype(np.float64), minlength=store.n_voxels)
            N += np.bincount(m.indices[e], minlength=store.n_voxels)
    return S, N


def reference_correlations(store: FeatureStore, x: np.ndarray, use: np.ndarray,
                           min_overlap: int = 10):
    """CC[i, a]: unit i under operator a against the mean of the other units in their settings.

    The reference is the per-voxel mean of the features of units ``use`` in
    setting ``x``, leaving unit i itself out (its own contribution is
    subtracted voxel by voxel). The correlation is the same uncentred one as
    :func:`pairwise_correlations`, on the voxels the reference covers; fewer
    than ``min_overlap`` of them gives CC = 0. Also returns the overlap counts.
    Vectorised per block of units: O(stored entries) time, O(block) temporaries.
    """
    S, N = _reference_sums(store, x, use)
    V = store.n_voxels
    cc = np.zeros((store.n, store.n_ops))
    cnt = np.zeros((store.n, store.n_ops), dtype=np.int64)
    for r0, r1, mats in store.iter_blocks():
        rows = r1 - r0
        mine = use[r0:r1]
        # this block's own contributions, keyed row * V + voxel (sorted)
        keys, vals = [], []
        for a, m in enumerate(mats):
            er = _entry_rows(m)
            e = (mine & (x[r0:r1] == a))[er]
            keys.append(er[e] * V + m.indices[e])
            vals.append(m.data[e])
        keys = np.concatenate(keys)
        order = np.argsort(keys, kind="stable")
        keys, vals = keys[order], np.concatenate(vals)[order]
        for a, m in enumerate(mats):
            er = _entry_rows(m)
            zk = er * V + m.indices
            if len(keys):
                pos = np.minimum(np.searchsorted(keys, zk), len(keys) - 1)
                own = keys[pos] == zk
                y = np.where(own, vals[pos], 0.0)
            else:
                own, y = np.zeros(len(zk), dtype=bool), np.zeros(len(zk))
            n_other = N[m.indices] - own
            common = n_other > 0.5
            r = np.where(common, (S[m.indices] - y) / np.where(common, n_other, 1.0), 0.0)
            z = np.where(common, m.data.astype(np.float64), 0.0)
            num = np.bincount(er, z * r, minlength=rows)
            ssz = np.bincount(er, z * z, minlength=rows)
            ssr = np.bincount(er, r * r, minlength=rows)
            c = np.bincount(er, common, minlength=rows).astype(np.int64)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = num / np.sqrt(ssz * ssr)
            v[~np.isfinite(v) | (c < min_overlap)] = 0.0
            cc[r0:r1, a] = v
            cnt[r0:r1, a] = c
    return cc, cnt


def resolve_by_reference(store: FeatureStore, ambiguity: Ambiguity, subset: int = 500,
                         max_passes: int = 5, min_overlap: int = 10, seed: int = 0,
                         row_units=None):
    """Resolve many units: all pairs on a random subset, then each unit against the mean.

    1. ``subset`` units drawn at random (``seed``) are resolved by all pairs
       (:func:`pairwise_correlations`, :func:`resolve_ambiguity`).
    2. Every unit takes the operator of highest CC against the mean of the
       subset in its resolved setting (:func:`reference_correlations`).
    3. Up to ``max_passes`` times: the reference becomes the mean of all units
       in their current settings (each unit leaving itself out), and every unit
       is reassigned; stops when no unit changes. A unit changes only for a
       strictly higher CC.
    4. Relabelled, as :func:`resolve_ambiguity`, so the largest group keeps
       its indexing.

    row_units: unit number of each row of the store (default: row i is unit i),
    so that the subset, and thus the result, does not depend on the row order.

    Memory: the store plus O(n·k) and 2·k²·subset² float64 for step 1.
    Returns (assignment (n,) per unit, score = Σ_i CC[i, x_i] against the
    reference, info dict).
    """
    n, k = store.n, ambiguity.n
    if k == 1 or n == 0:
        return np.zeros(n, dtype=np.int64), 0.0, {"mean_cc_same": float("nan")}
    rng = np.random.default_rng(seed)
    m = min(n, int(subset))
    sub = np.sort(rng.choice(n, m, replace=False))  # units
    if row_units is not None:
        row_units = np.asarray(row_units, dtype=np.int64)
        row_of_unit = np.empty(n, dtype=np.int64)
        row_of_unit[row_units] = np.arange(n)
        sub = row_of_unit[sub]  # rows, in unit order
    cc_s, cnt_s = _pairwise_from_csr([store.rows(a, sub) for a in range(k)], min_overlap)
    x_sub, _ = resolve_ambiguity(cc_s, cnt_s, ambiguity, seed=seed)
    x = np.zeros(n, dtype=np.int64)
    x[sub] = x_sub
    use = np.zeros(n, dtype=bool)
    use[sub] = True
    changed = []
    rows = np.arange(n)
    for p in range(max_passes + 1):
        cc, cnt = reference_correlations(store, x, use, min_overlap)
        best = np.argmax(cc, axis=1)
        new = np.where(cc[rows, best] > cc[rows, x] + 1e-12, best, x)
        changed.append(int(np.sum(new != x)))
        x = new
        use[:] = True
        if p > 0 and changed[-1] == 0:
            break
    score = float(cc[rows, x].sum())
    ok = cnt[rows, x] >= min_overlap
    mean_ref = float(np.mean(cc[rows, x][ok])) if ok.any() else float("nan")
    table = ambiguity.product_table()
    candidates = [(int(np.sum(table[x, g] == 0)), -g, table[x, g]) for g in range(k)]
    x = max(candidates, key=lambda t: (t[0], t[1]))[2].astype(np.int64)
    info = {"subset": m, "passes": len(changed) - 1, "changed": changed,
            "converged": changed[-1] == 0 if len(changed) > 1 else False,
            "mean_cc_reference": mean_ref,
            "n_without_overlap": int(np.sum(~ok)),
            "mean_cc_same": _mean_cc(cc_s, cnt_s, x[sub], min_overlap)}
    logger.info("Ambiguity of %d units: subset of %d by all pairs, then %d pass(es) against the "
                "mean; units changed per pass %s", n, m, info["passes"], changed)
    if not info["converged"]:
        logger.warning("Ambiguity passes stopped at ambiguity.max_passes=%d with %d units still "
                       "changing", max_passes, changed[-1])
    if row_units is not None:
        x_unit = np.empty(n, dtype=np.int64)
        x_unit[row_units] = x
        x = x_unit
    return x, score, info
