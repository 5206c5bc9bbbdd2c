"""Crystal-side building blocks of the simulator: Laue operators, cell, lattice tables, hkl grid.

Everything here comes from cctbx (space groups, unit cells) and numpy; nothing
from the diffuse_cli pipeline.
"""

from __future__ import annotations

import math

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)


# --------------------------------------------------------------------------- symmetry


def check_symmetry(params) -> None:
    """Normalise diffuse.simulate's space_group to cctbx's symbol; check its unit_cell fits it."""
    from cctbx import crystal, sgtbx, uctbx
    from libtbx.utils import Sorry

    try:
        info = sgtbx.space_group_info(params.space_group)
    except RuntimeError as e:
        raise Sorry(f"space_group={params.space_group}: unknown space group") from e
    try:
        uc = uctbx.unit_cell(tuple(params.unit_cell))
    except RuntimeError as e:
        raise Sorry(f"Bad unit cell: {params.unit_cell}") from e
    if not info.group().is_compatible_unit_cell(uc):
        cell = ",".join(f"{x:g}" for x in params.unit_cell)
        raise Sorry(f"unit_cell={cell}: not compatible with space_group {info}")
    crystal.symmetry(unit_cell=uc, space_group_info=info)
    params.space_group = str(info)


def laue_rotations(space_group: str) -> np.ndarray:
    """Matrices Q acting on Miller indices as columns, h' = Q h; shape (n, 3, 3).

    Q = Rᵀ for each rotation part R of the Laue group (x' = R x on fractional
    coordinates maps h to the row vector h R). For arrays of row vectors H
    (N, 3) the images are ``H @ Q.T``.

    Taken from cctbx's derived Laue group (includes the inversion); duplicates
    from lattice centring are removed. Integer-valued float64 matrices.
    """
    from cctbx import sgtbx

    group = sgtbx.space_group_info(space_group).group().build_derived_laue_group()
    mats = set()
    for op in group.all_ops():
        r = op.r()
        assert r.den() == 1
        mats.add(tuple(r.num()))
    # a symmetry op maps x -> R x; Miller indices transform as h' = h R,
    # i.e. h' = Rᵀ h in column form
    return np.array([np.array(m, dtype=np.float64).reshape(3, 3).T for m in sorted(mats)])


def symmetrise_quadratic_form(G0: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Group average ``mean_Q Qᵀ G0 Q`` of a form acting on fractional hkl.

    ``rotations`` are the matrices Q of :func:`laue_rotations` (h' = Q h). The
    form δᵀGδ is invariant when Qᵀ G Q = G for every Q, which the group
    average satisfies exactly (Q ranges over a group).
    """
    G = np.einsum("nji,jk,nkl->il", rotations, G0, rotations) / len(rotations)
    return 0.5 * (G + G.T)


def rotation_about(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """n rotation matrices uniform on SO(3) (normalised Gaussian quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def b_matrix(unit_cell) -> np.ndarray:
    """DIALS B matrix (Å⁻¹): q_crystal = B h, B = fractionalisation matrixᵀ."""
    from cctbx import uctbx

    uc = uctbx.unit_cell(tuple(unit_cell))
    return np.array(uc.fractionalization_matrix(), dtype=np.float64).reshape(3, 3).T


def quadratic_form(x: np.ndarray, G: np.ndarray) -> np.ndarray:
    """xᵀ G x for x of shape (..., 3) (symmetric G), via one matmul."""
    return np.sum((x @ G) * x, axis=-1)


# --------------------------------------------------------------------------- lattice tables


class LatticeTable:
    """Values on integer Miller indices in a box, looked up vectorised.

    Holds a dense array over ``|h| <= hkl_max`` (per axis); indices outside the
    box read as 0.
    """

    def __init__(self, values: np.ndarray, hkl_max):
        self.values = values
        self.hkl_max = np.asarray(hkl_max, dtype=np.int64)
        self.shape = np.asarray(values.shape, dtype=np.int64)

    @staticmethod
    def box_indices(hkl_max) -> np.ndarray:
        """All integer (h, k, l) of the box, shape (N, 3), C order of the table."""
        axes = [np.arange(-m, m + 1) for m in hkl_max]
        H = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        return H.reshape(-1, 3)

    def flat(self, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat table index of integer-valued H (..., 3) and an inside-box flag."""
        inside = np.ones(H.shape[:-1], dtype=bool)
        flat = np.zeros(H.shape[:-1], dtype=np.int64)
        for axis in range(3):
            i = H[..., axis].astype(np.int64) + self.hkl_max[axis]
            inside &= (i >= 0) & (i < self.shape[axis])
            flat = flat * self.shape[axis] + i
        return np.where(inside, flat, 0), inside

    def lookup(self, H: np.ndarray) -> np.ndarray:
        flat, inside = self.flat(H)
        return np.where(inside, self.values.ravel()[flat], 0.0)


def symmetric_random_table(
    rng: np.random.Generator,
    draw,
    B: np.ndarray,
    rotations: np.ndarray,
    d_min: float,
    hkl_max,
) -> LatticeTable:
    """A random table over integer H, exactly invariant under the Laue group.

    ``draw(rng, n)`` gives n raw values; each H takes the raw value of a
    canonical member of its orbit (the largest flat index among {QH}), so the
    orbit shares one value and the value distribution is that of ``draw``.
    Entries with d* > 1/d_min are 0 (the sphere is itself invariant, so the
    box needs no closure beyond it).
    """
    H = LatticeTable.box_indices(hkl_max).astype(np.float64)
    table = LatticeTable(np.zeros([2 * m + 1 for m in hkl_max]), hkl_max)
    d_star = np.linalg.norm(H @ B.T, axis=1)
    in_sphere = d_star <= 1.0 / d_min
    Hs = H[in_sphere]
    canon = np.full(len(Hs), -1, dtype=np.int64)
    for Q in rotations:
        flat, inside = table.flat(np.rint(Hs @ Q.T).astype(np.int64))
        assert inside.all(), "Laue image of an in-sphere index left the box"
        canon = np.maximum(canon, flat)
    raw = draw(rng, table.values.size)
    values = np.zeros(table.values.size)
    values[np.flatnonzero(in_sphere)] = raw[canon]
    table.values = values.reshape(table.values.shape)
    return table


# --------------------------------------------------------------------------- truth grid


def grid_hkl_max(unit_cell, d_min: float) -> tuple:
    """Largest |h|, |k|, |l| with d ≥ d_min: ceil(a/d_min) etc.

    h = a·q (the real-space axis vector dotted into q), so |h| ≤ |a|·|q| ≤ a/d_min
    for any cell. This is the layout diffuse.merge's grid documents
    (docs/conventions.md); the simulator computes it itself.
    """
    return tuple(int(math.ceil(float(unit_cell[i]) / float(d_min))) for i in range(3))


class TruthGrid:
    """The dense hkl grid of truth.npz: ndiv voxels per lattice unit, centres at i/ndiv.

    The same layout as diffuse.merge's grid (docs/conventions.md), written here
    independently: axes run from −hkl_max to +hkl_max, shape 2·hkl_max·ndiv + 1.
    """

    def __init__(self, ndiv: int, hkl_max):
        self.ndiv = (int(ndiv),) * 3
        self.hkl_max = tuple(int(m) for m in hkl_max)

    @classmethod
    def for_resolution(cls, ndiv: int, unit_cell, d_min: float) -> "TruthGrid":
        return cls(ndiv, grid_hkl_max(unit_cell, d_min))

    @property
    def shape(self) -> tuple:
        return tuple(2 * m * n + 1 for m, n in zip(self.hkl_max, self.ndiv))

    def axes(self) -> tuple:
        """Voxel-centre fractional indices along h, k, l."""
        return tuple(np.arange(-m * n, m * n + 1, dtype=np.float64) / n for m, n in zip(self.hkl_max, self.ndiv))


def make_crystal(unit_cell, space_group: str, U: np.ndarray):
    """dxtbx Crystal with the given cell, space group and orientation U."""
    from cctbx import sgtbx, uctbx
    from dxtbx.model import Crystal

    uc = uctbx.unit_cell(tuple(unit_cell))
    O = np.array(uc.orthogonalization_matrix()).reshape(3, 3)
    crystal = Crystal(
        tuple(O[:, 0]), tuple(O[:, 1]), tuple(O[:, 2]),
        space_group=sgtbx.space_group_info(space_group).group(),
    )
    crystal.set_U(tuple(np.asarray(U, dtype=np.float64).ravel()))
    return crystal
