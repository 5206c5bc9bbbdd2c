"""Laue-group symmetry on integer voxel indices.

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

Indexing ambiguities are resolved in :mod:`diffuse_cli.ambiguity`.

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

    def is_inside_broadcast(self, h, k, l) -> np.ndarray:
        """:meth:`is_inside` of the integer indices (h, k, l) given as arrays that broadcast
        against each other (e.g. (n, 1, 1), (1, m, 1), (1, 1, p) for a block of a grid):
        each condition is evaluated on the axes it involves, only their combination is
        full-sized. The result may have a smaller (broadcastable) shape."""
        h, k, l = (np.asarray(x, dtype=np.int64) for x in (h, k, l))
        exact = True
        if self._to_reference is not None:
            m, den = self._to_reference
            w = [h * m[0, j] + k * m[1, j] + l * m[2, j] for j in range(3)]  # the row vector times m
            exact = (w[0] % den == 0) & (w[1] % den == 0) & (w[2] % den == 0)
            h, k, l = (x // den for x in w)
        inside = eval(self._asu_code, {"__builtins__": {}}, {"h": h, "k": k, "l": l})  # noqa: S307
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


def _orbit_fill_py(fr, v, rot, dets, offset, shape, lut, hand):
    """grid_asu_map's inner loop: every image v·R of each representative (flat index fr)
    points at it; hand as in grid_asu_map (2 = reached by both hands, set to 0 later)."""
    has_hand = hand.shape[0] > 0
    for i in range(v.shape[0]):
        for o in range(rot.shape[0]):
            u0 = v[i, 0] * rot[o, 0, 0] + v[i, 1] * rot[o, 1, 0] + v[i, 2] * rot[o, 2, 0] + offset[0]
            u1 = v[i, 0] * rot[o, 0, 1] + v[i, 1] * rot[o, 1, 1] + v[i, 2] * rot[o, 2, 1] + offset[1]
            u2 = v[i, 0] * rot[o, 0, 2] + v[i, 1] * rot[o, 1, 2] + v[i, 2] * rot[o, 2, 2] + offset[2]
            if u0 < 0 or u0 >= shape[0] or u1 < 0 or u1 >= shape[1] or u2 < 0 or u2 >= shape[2]:
                continue
            k = (u0 * shape[1] + u1) * shape[2] + u2
            lut[k] = fr[i]
            if has_hand:
                h = hand[k]
                if h == 0:
                    hand[k] = dets[o]
                elif h != dets[o]:
                    hand[k] = 2


try:  # optional accelerator (Debian: python3-numba); else the numpy loop below
    import numba as _numba

    _orbit_fill = _numba.njit(nogil=True, cache=True)(_orbit_fill_py)
except ImportError:  # pragma: no cover - depends on the installation
    _orbit_fill = None


def representatives_in_range(v: np.ndarray, laue: LaueSymmetry, ndiv, gstar, d_min=None, d_max=None) -> np.ndarray:
    """True where grid index vector v (N, 3; hkl·ndiv) is its ASU representative within d_min…d_max (Å).

    d is taken in the reference cell (``gstar``, its reciprocal metric); with
    ``gstar`` None or no limit, every representative is kept.
    """
    rep = laue.is_inside(v)
    if gstar is not None and (d_min is not None or d_max is not None):
        h = v[rep] / np.asarray(ndiv, dtype=np.float64)
        dss = np.einsum("ni,ij,nj->n", h, gstar, h)
        keep = np.ones(len(h), dtype=bool)
        if d_min is not None:
            keep &= dss <= 1.0 / d_min**2
        if d_max is not None:
            keep &= dss >= 1.0 / d_max**2
        rep[np.flatnonzero(rep)[~keep]] = False
    return rep


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
        rep = representatives_in_range(v, laue, ndiv, gstar, d_min, d_max)
        fr = flat[rep]
        if _orbit_fill is not None:
            _orbit_fill(fr, np.ascontiguousarray(v[rep]), laue.rotations, dets, offset, shape, lut,
                        hand if hand is not None else np.zeros(0, dtype=np.int8))
            continue
        vr = v[rep].astype(np.float64)
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
