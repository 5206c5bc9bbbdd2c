"""Laue-group symmetry on integer voxel indices, and indexing ambiguities.

Convention: Miller indices are **row vectors**; a reciprocal-space operator
is an integer matrix ``R`` (3×3) acting as ``h' = h @ R`` (cctbx's
``miller_index * rot_mx``). Voxel indices ``v = round(h · ndiv)`` are integers
and transform with the same matrices, exactly, in integer arithmetic.

Asymmetric unit: cctbx's reciprocal-space ASU of the Laue group
(``sgtbx.reciprocal_space_asu``). Its definition (e.g. ``h>=k and k>=0 and
l>=0``) is a set of homogeneous linear conditions on (h, k, l), so it applies
unchanged to voxel indices, which are the Miller indices scaled by ``ndiv``.
We evaluate cctbx's own ASU expression on numpy integer arrays, so the map to
the ASU is identical to ``cctbx.miller.map_to_asu`` (tested).

Indexing ambiguity: when the lattice metric has higher symmetry than the Laue
group (e.g. P4 on a tetragonal lattice), each still can be indexed in one of
``|lattice point group| / |Laue group|`` equivalent ways, related by the coset
representatives of the Laue group in the lattice group (e.g. ``k,h,-l``).
:func:`resolve_ambiguity` brings independently indexed stills to one indexing
by maximising pairwise correlations of their anisotropic (shell-mean
subtracted) intensities (Brehm & Diederichs 2014, Acta D70:101).
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)

logger = logging.getLogger("diffuse.symmetry")


# ---------------------------------------------------------------- Laue group


def _rot_as_int(r) -> np.ndarray:
    """cctbx rot_mx -> integer numpy 3×3 (row-vector convention for hkl)."""
    num = np.array(r.num(), dtype=np.int64).reshape(3, 3)
    den = int(r.den())
    if np.any(num % den):
        raise ValueError("rotation matrix is not integral")
    return num // den


class _BoolOpToBitwise(ast.NodeTransformer):
    """``a and b`` -> ``a & b``; ``a or b`` -> ``a | b`` (numpy element-wise)."""

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        op = ast.BitAnd() if isinstance(node.op, ast.And) else ast.BitOr()
        expr = node.values[0]
        for v in node.values[1:]:
            expr = ast.BinOp(left=expr, op=op, right=v)
        return ast.copy_location(expr, node)


def _compile_asu(expression: str):
    tree = ast.parse(expression, mode="eval")
    tree = ast.fix_missing_locations(_BoolOpToBitwise().visit(tree))
    return compile(tree, f"<asu {expression}>", "eval")


@dataclass
class LaueSymmetry:
    """The Laue group of a space group, acting on integer (voxel) indices.

    space_group: anything ``sgtbx.space_group_info`` accepts (symbol or number),
    or None for P1.
    """

    symbol: str = "P1"
    rotations: np.ndarray = field(init=False, repr=False)  # (n, 3, 3) int64

    def __post_init__(self):
        from cctbx import sgtbx

        self.space_group_info = sgtbx.space_group_info(str(self.symbol or "P1"))
        self.space_group = self.space_group_info.group()
        self.laue_group = self.space_group.build_derived_laue_group()
        mats = {}
        for smx in self.laue_group.all_ops():
            m = _rot_as_int(smx.r())
            mats[m.tobytes()] = m
        self.rotations = np.array(list(mats.values()), dtype=np.int64)
        self.asu = sgtbx.reciprocal_space_asu(self.laue_group.type())
        self.asu_expression = self.asu.reference_as_string()
        self._asu_code = _compile_asu(self.asu_expression)
        if self.asu.is_reference():
            self._to_reference = None
        else:
            r = self.asu.cb_op().c_inv().r()
            self._to_reference = (
                np.array(r.num(), dtype=np.int64).reshape(3, 3),
                int(r.den()),
            )

    # -- descriptions
    @property
    def laue_symbol(self) -> str:
        return self.laue_group.type().lookup_symbol()

    @property
    def order(self) -> int:
        return len(self.rotations)

    # -- ASU
    def is_inside(self, v: np.ndarray) -> np.ndarray:
        """True for integer indices (N, 3) inside cctbx's reciprocal ASU."""
        v = np.asarray(v, dtype=np.int64)
        if self._to_reference is not None:
            m, den = self._to_reference
            w = v @ m
            exact = np.all(w % den == 0, axis=-1)
            w = w // den
        else:
            w, exact = v, True
        env = {"h": w[..., 0], "k": w[..., 1], "l": w[..., 2]}
        inside = eval(self._asu_code, {"__builtins__": {}}, env)  # noqa: S307 (cctbx's own ASU text)
        return np.asarray(inside, dtype=bool) & exact

    def map_to_asu(self, v: np.ndarray) -> np.ndarray:
        """ASU representative (N, 3) of integer indices (N, 3); one pass per operator."""
        v = np.asarray(v, dtype=np.int64).reshape(-1, 3)
        out = np.empty_like(v)
        done = np.zeros(len(v), dtype=bool)
        for r in self.rotations:
            w = v @ r
            take = ~done & self.is_inside(w)
            out[take] = w[take]
            done |= take
            if done.all():
                break
        if not done.all():
            raise RuntimeError("ASU test left indices unmapped (bug)")
        return out

    def equivalents(self, v: np.ndarray) -> np.ndarray:
        """All images (n_ops, N, 3) of integer indices under the Laue group."""
        v = np.asarray(v, dtype=np.int64).reshape(-1, 3)
        return np.einsum("ni,oij->onj", v, self.rotations)

    def symmetrize_cell(self, unit_cell):
        """Unit cell parameters made to obey the space group's metric."""
        return tuple(self.space_group.average_unit_cell(_uc(unit_cell)).parameters())


def _uc(unit_cell):
    from cctbx import uctbx

    if isinstance(unit_cell, uctbx.ext.unit_cell):
        return unit_cell
    return uctbx.unit_cell(tuple(float(x) for x in unit_cell))


def reciprocal_metric(unit_cell) -> np.ndarray:
    """G* (3×3, Å⁻²) such that d*² = h · G* · h (h a row vector)."""
    b = b_matrix(unit_cell)
    return b.T @ b


def b_matrix(unit_cell) -> np.ndarray:
    """B (3×3, Å⁻¹) with q = B·h in a Cartesian frame (cctbx/DIALS convention)."""
    uc = _uc(unit_cell)
    return np.array(uc.fractionalization_matrix(), dtype=np.float64).reshape(3, 3).T


# ---------------------------------------------------------------- ASU map on a grid


def grid_asu_map(grid, laue: LaueSymmetry, unit_cell=None, d_min=None, d_max=None,
                 chunk: int = 4_000_000, return_hand: bool = False):
    """For every voxel of ``grid``, the flat index of its ASU representative.

    Returns int64 array (n_voxels,): representative's flat index, or −1 when
    the voxel is outside the resolution range (d from the reference cell) or
    its representative lies outside the grid. Inclusion is decided on the
    representative, so all symmetry mates are in or out together.

    With ``return_hand``, also an int8 array (n_voxels,): +1 where the voxel
    is an image of its representative under a proper rotation of the Laue
    group only (the point group without inversion: h's Bijvoet side), −1
    under an improper one only (−h's side), 0 where both (centric) or none.

    Built from the representatives: the voxels inside cctbx's ASU are found
    with one vectorised test, then each one's images under every Laue
    operator (exact integer arithmetic) are pointed at it. Every voxel lies in
    exactly one orbit, so this equals mapping each voxel to the ASU
    (tested against :meth:`LaueSymmetry.map_to_asu`). Memory: O(n_voxels)
    plus ``chunk``-sized temporaries.
    """
    shape = np.asarray(grid.shape, dtype=np.int64)
    offset = np.asarray(grid.hkl_max, dtype=np.int64) * np.asarray(grid.ndiv)
    n = grid.n_voxels
    lut = np.full(n, -1, dtype=np.int64)
    hand = np.zeros(n, dtype=np.int8) if return_hand else None
    dets = np.rint(np.linalg.det(laue.rotations.astype(np.float64))).astype(np.int8)
    gstar = reciprocal_metric(unit_cell) if unit_cell is not None else None
    ndiv = np.asarray(grid.ndiv, dtype=np.float64)
    rot = laue.rotations.astype(np.float64)  # small integers: exact in float64 BLAS
    for start in range(0, n, chunk):
        flat = np.arange(start, min(n, start + chunk), dtype=np.int64)
        v = np.stack(np.unravel_index(flat, grid.shape), axis=-1) - offset
        rep = laue.is_inside(v)
        if gstar is not None and (d_min is not None or d_max is not None):
            h = v[rep] / ndiv
            dss = np.einsum("ni,ij,nj->n", h, gstar, h)
            keep = np.ones(len(h), dtype=bool)
            if d_min is not None:
                keep &= dss <= 1.0 / d_min**2
            if d_max is not None:
                keep &= dss >= 1.0 / d_max**2
            idx = np.flatnonzero(rep)
            rep[idx[~keep]] = False
        vr = v[rep].astype(np.float64)
        fr = flat[rep]
        for r, det in zip(rot, dets):
            u = np.rint(vr @ r).astype(np.int64) + offset
            ok = np.all((u >= 0) & (u < shape), axis=-1)
            dest = (u[ok, 0] * shape[1] + u[ok, 1]) * shape[2] + u[ok, 2]
            lut[dest] = fr[ok]
            if hand is not None:
                # first time: this operator's hand; reached by both hands: centric (0)
                h = hand[dest]
                hand[dest] = np.where(h == 0, det, np.where(h == det, h, 2)).astype(np.int8)
    if hand is not None:
        hand[hand == 2] = 0
        return lut, hand
    return lut


# ---------------------------------------------------------------- ambiguity


def _op_string(m: np.ndarray) -> str:
    """Row-vector operator h' = h @ m as a cctbx-style 'k,h,-l' string."""
    names = "hkl"
    parts = []
    for j in range(3):
        terms = []
        for i in range(3):
            c = int(m[i, j])
            if c == 0:
                continue
            sign = "-" if c < 0 else "+"
            mag = "" if abs(c) == 1 else f"{abs(c)}*"
            terms.append(f"{sign}{mag}{names[i]}")
        s = "".join(terms)
        parts.append(s[1:] if s.startswith("+") else s)
    return ",".join(parts)


def lattice_rotations(unit_cell, max_delta: float = 3.0) -> np.ndarray:
    """Operators (n, 3, 3) of the lattice point group (holohedry, with −1), in the cell's basis.

    The lattice symmetry is found by cctbx on the Niggli cell
    (``sgtbx.lattice_symmetry_group``, obliquity tolerance ``max_delta`` degrees)
    and transformed back to the setting of ``unit_cell``.
    """
    from cctbx import crystal, sgtbx

    cs = crystal.symmetry(unit_cell=_uc(unit_cell), space_group_symbol="P1")
    cb = cs.change_of_basis_op_to_niggli_cell()
    niggli = cs.change_basis(cb)
    group = sgtbx.lattice_symmetry_group(niggli.unit_cell(), max_delta=max_delta)
    group = group.change_basis(cb.inverse())
    mats = {}
    for smx in group.all_ops():
        m = _rot_as_int(smx.r())
        # cctbx gives the proper rotations; the lattice is centrosymmetric
        for x in (m, -m):
            mats[x.tobytes()] = x
    return np.array(list(mats.values()), dtype=np.int64)


def _key(m):
    return np.asarray(m, dtype=np.int64).tobytes()


@dataclass
class Ambiguity:
    """Indexing ambiguity operators (coset representatives), identity first."""

    operators: np.ndarray  # (k, 3, 3) int, h' = h @ M
    laue: LaueSymmetry

    @property
    def n(self) -> int:
        return len(self.operators)

    def names(self) -> list[str]:
        return [_op_string(m) for m in self.operators]

    def coset_of(self, m: np.ndarray) -> int:
        """Index of the coset (operator) that ``m`` belongs to."""
        m = np.asarray(m, dtype=np.int64)
        for a, rep in enumerate(self.operators):
            # m ∈ L·rep  <=>  m @ rep⁻¹ ∈ L
            x = np.rint(m @ np.linalg.inv(rep)).astype(np.int64)
            if any(np.array_equal(x, r) for r in self.laue.rotations):
                return a
        raise ValueError("operator is not in the lattice group")

    def product_table(self) -> np.ndarray:
        """table[a, b] = coset of M_a @ M_b (apply a, then b)."""
        k = self.n
        t = np.zeros((k, k), dtype=np.int64)
        for a in range(k):
            for b in range(k):
                t[a, b] = self.coset_of(self.operators[a] @ self.operators[b])
        return t

    def inverse(self, a: int) -> int:
        return self.coset_of(np.rint(np.linalg.inv(self.operators[a])).astype(np.int64))


def ambiguity_operators(unit_cell, laue: LaueSymmetry, max_delta: float = 3.0) -> Ambiguity:
    """Coset representatives of the Laue group in the lattice point group.

    One operator (identity) means no indexing ambiguity.
    """
    lattice = lattice_rotations(unit_cell, max_delta=max_delta)
    laue_keys = {_key(r) for r in laue.rotations}
    for r in laue.rotations:
        if not any(np.array_equal(r, m) for m in lattice):
            raise ValueError(
                f"space group {laue.symbol} is not compatible with the cell {unit_cell}"
            )
    reps = [np.eye(3, dtype=np.int64)]
    covered = set(laue_keys)
    # proper rotations first, so representatives are rotations where possible
    order = sorted(lattice, key=lambda m: (round(np.linalg.det(m)) < 0, np.abs(m - np.eye(3)).sum()))
    for m in order:
        if _key(m) in covered:
            continue
        reps.append(m)
        for r in laue.rotations:
            covered.add(_key(r @ m))
    return Ambiguity(np.array(reps, dtype=np.int64), laue)


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


def pairwise_correlations(features: list, n_ops: int, n_voxels: int, min_overlap: int = 10):
    """CC[a, b, i, j]: correlation of still i under op a with still j under op b.

    Computed on the common voxels of each pair via sparse products. Also
    returns the overlap counts N[a, b, i, j]. Pairs with fewer than
    ``min_overlap`` common voxels get CC = 0.
    """
    import scipy.sparse as sp

    n = len(features)
    X, M = [], []
    for a in range(n_ops):
        rows = np.concatenate([np.full(len(f[a][0]), i) for i, f in enumerate(features)])
        cols = np.concatenate([f[a][0] for f in features])
        vals = np.concatenate([f[a][1] for f in features])
        X.append(sp.csr_matrix((vals, (rows, cols)), shape=(n, n_voxels)))
        M.append(sp.csr_matrix((np.ones_like(vals), (rows, cols)), shape=(n, n_voxels)))
    X2 = [x.multiply(x) for x in X]
    cc = np.zeros((n_ops, n_ops, n, n))
    cnt = np.zeros((n_ops, n_ops, n, n))
    for a in range(n_ops):
        for b in range(n_ops):
            num = (X[a] @ X[b].T).toarray()
            ssa = (X2[a] @ M[b].T).toarray()
            ssb = (M[a] @ X2[b].T).toarray()
            nab = (M[a] @ M[b].T).toarray()
            with np.errstate(invalid="ignore", divide="ignore"):
                c = num / np.sqrt(ssa * ssb)
            c[~np.isfinite(c) | (nab < min_overlap)] = 0.0
            cc[a, b] = c
            cnt[a, b] = nab
    return cc, cnt


def resolve_ambiguity(cc: np.ndarray, cnt: np.ndarray, ambiguity: Ambiguity,
                      n_starts: int = 10, seed: int = 0, max_sweeps: int = 50):
    """Choose one operator per still maximising the summed pairwise correlation.

    cc, cnt: from :func:`pairwise_correlations`. Score of an assignment x:
    Σ_{i≠j} w_ij CC[x_i, x_j, i, j] with w_ij = sqrt(max(N_ij − 3, 0))
    (Fisher-z style weight). Optimised by coordinate ascent (Gauss-Seidel
    over stills, not observations) from the all-identity start, a spectral
    start (two operators: sign of the leading eigenvector of CC_same − CC_other)
    and random starts; the best score wins. The result is relabelled so that
    the largest group of stills keeps its indexing (operator 0).

    Returns (assignment (n,) int, score).
    """
    k = ambiguity.n
    n = cc.shape[-1]
    if k == 1 or n == 0:
        return np.zeros(n, dtype=np.int64), 0.0
    w = np.sqrt(np.clip(cnt - 3.0, 0.0, None))
    wcc = w * cc
    for a in range(k):
        for b in range(k):
            np.fill_diagonal(wcc[a, b], 0.0)
    rng = np.random.default_rng(seed)
    starts = [np.zeros(n, dtype=np.int64)]
    if k == 2:
        r = wcc[0, 0] - wcc[0, 1]
        r = 0.5 * (r + r.T)
        vals, vecs = np.linalg.eigh(r)
        starts.append((vecs[:, -1] < 0).astype(np.int64))
    starts += [rng.integers(0, k, n) for _ in range(n_starts)]

    def score(x):
        return float(wcc[x[:, None], x[None, :], np.arange(n)[:, None], np.arange(n)[None, :]].sum())

    best, best_score = None, -np.inf
    for x in starts:
        x = x.copy()
        for _ in range(max_sweeps):
            changed = False
            for i in rng.permutation(n):
                # gain of each operator a for still i, with the others fixed
                g = wcc[:, x, i, np.arange(n)].sum(axis=1)
                a = int(np.argmax(g))
                if g[a] > g[x[i]] + 1e-12:
                    x[i] = a
                    changed = True
            if not changed:
                break
        s = score(x)
        if s > best_score + 1e-9:
            best, best_score = x, s
    # relabel: apply a global operator G so the most stills end at identity.
    table = ambiguity.product_table()
    candidates = []
    for g in range(k):
        y = table[best, g]
        candidates.append((np.sum(y == 0), -g, y))
    best = max(candidates, key=lambda t: (t[0], t[1]))[2]
    return best.astype(np.int64), best_score


def determine_reindexing(source, ambiguity: Ambiguity, unit_cell, d_min: float,
                         d_max: float | None = None, ndiv: int = 1, n_shells: int = 10,
                         min_overlap: int = 10, seed: int = 0, comm=None,
                         groups=None) -> dict:
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

    Returns dict(assignment (n,) int, operators (k,3,3), names, score,
    reindex: list of (3,3) arrays or None per still).
    """
    from diffuse_cli.grid import HKLGrid

    n = len(source)
    k = ambiguity.n
    if k == 1:
        return {"assignment": np.zeros(n, dtype=np.int64), "operators": ambiguity.operators,
                "names": ambiguity.names(), "score": 0.0, "reindex": [None] * n}
    grid = HKLGrid.for_resolution(ndiv, unit_cell, d_min)
    lut = grid_asu_map(grid, ambiguity.laue, unit_cell, d_min=d_min, d_max=d_max)
    # resolution shell of every coarse voxel (equal volume in d*)
    u = np.stack(np.unravel_index(np.arange(grid.n_voxels), grid.shape), -1)
    h = (u - np.asarray(grid.hkl_max) * ndiv) / float(ndiv)
    ds = np.sqrt(np.einsum("ni,ij,nj->n", h, reciprocal_metric(unit_cell), h))
    lo = 1.0 / d_max if d_max else 0.0
    edges = np.cbrt(np.linspace(lo**3, (1.0 / d_min) ** 3, n_shells + 1))
    shell_of_voxel = np.clip(np.searchsorted(edges, ds, side="right") - 1, 0, n_shells - 1)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    mine = {}
    for i in range(rank, n, size):
        obs = source.load(i)
        hkl = np.asarray(obs["hkl"], dtype=np.float64)
        I = np.asarray(obs["I"], dtype=np.float64)
        s = np.asarray(obs["sigma"], dtype=np.float64)
        ok = np.isfinite(I) & np.isfinite(s) & (s > 0) & np.all(np.isfinite(hkl), axis=1)
        mine[i] = still_features(hkl[ok], I[ok], ambiguity, grid, lut, shell_of_voxel)
    if comm is not None and size > 1:
        for part in comm.allgather(mine):
            mine.update(part)
    features = [mine[i] for i in range(n)]
    unit = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_units = int(unit.max()) + 1 if n else 0
    if n_units < n:
        features = [_mean_features([features[i] for i in np.flatnonzero(unit == u)], k)
                    for u in range(n_units)]
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
                             if cc is not None else float("nan"))}


def _mean_features(features: list, n_ops: int) -> list:
    """Per operator, the mean over stills of their (voxel ids, values) features."""
    out = []
    for a in range(n_ops):
        ids = np.concatenate([f[a][0] for f in features])
        vals = np.concatenate([f[a][1] for f in features])
        uniq, inv = np.unique(ids, return_inverse=True)
        out.append((uniq, np.bincount(inv, vals) / np.bincount(inv)))
    return out


def _mean_cc(cc, cnt, x, min_overlap):
    n = len(x)
    i, j = np.triu_indices(n, 1)
    c = cc[x[i], x[j], i, j]
    m = cnt[x[i], x[j], i, j] >= min_overlap
    return float(np.mean(c[m])) if m.any() else float("nan")
