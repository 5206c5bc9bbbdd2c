"""Indexing-ambiguity operators: coset representatives of the Laue group in the lattice point group.

Operators are row-vector reciprocal-space matrices, as in :mod:`diffuse_cli.symmetry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli.symmetry import LaueSymmetry, _rot_as_int, _uc


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
