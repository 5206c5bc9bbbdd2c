"""Known-truth diffuse maps of motion models for testing diffuse.model (issue 14).

Writes a small random atomic model (PDB, P1) and evaluates on an hkl grid:

* LLM by direct summation in reciprocal space (the pipeline convolves by FFT
  with a real-space kernel instead):

      I_LLM(q) = e^{−x} Σ_n xⁿ/n! · (1/V) Σ_H |F_H|² · 8π(γ/n)³ / (1 + 4π²(γ/n)²|q − H|²)²,

  x = 4π²σ²|q|², |q| = 1/d (Å⁻¹), H every integer index of the grid box;
* RBT: (1 − e^{−x}) |F_mol(q)|², the molecular transform summed atom by atom
  at fractional hkl.

F from xraylib's form factors (:mod:`diffuse_cli.simulation.atomic`; the
pipeline uses cctbx's tables), B as exp(−B|q|²/4) per atom on F, cell metric
and orthogonalisation computed here. Nothing from the diffuse_cli pipeline.
"""

from __future__ import annotations

import math

import numpy as np

from diffuse_cli.simulation.atomic import form_factor

ELEMENTS = ("C", "N", "O", "S")


def real_metric(cell) -> np.ndarray:
    """G (Å²): G_ij = a_i · a_j from (a, b, c, α, β, γ)."""
    a, b, c = (float(v) for v in cell[:3])
    al, be, ga = (math.radians(float(v)) for v in cell[3:])
    return np.array([[a * a, a * b * math.cos(ga), a * c * math.cos(be)],
                     [a * b * math.cos(ga), b * b, b * c * math.cos(al)],
                     [a * c * math.cos(be), b * c * math.cos(al), c * c]])


def orthogonalisation(cell) -> np.ndarray:
    """PDB convention: a along x, b in the xy plane; Cartesian (Å) = M @ fractional."""
    a, b, c = (float(v) for v in cell[:3])
    al, be, ga = (math.radians(float(v)) for v in cell[3:])
    cy = (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)
    cz = math.sqrt(max(1.0 - math.cos(be) ** 2 - cy ** 2, 0.0))
    return np.array([[a, b * math.cos(ga), c * math.cos(be)],
                     [0.0, b * math.sin(ga), c * cy],
                     [0.0, 0.0, c * cz]])


def grid_axes(cell, d_min: float, ndiv: int):
    """Axes h, k, l of the grid: −ceil(a/d_min) … +ceil(a/d_min) in steps of 1/ndiv."""
    out = []
    for i in range(3):
        m = int(math.ceil(float(cell[i]) / d_min))
        out.append(np.arange(-m * ndiv, m * ndiv + 1, dtype=np.float64) / ndiv)
    return tuple(out)


def random_atoms(rng: np.random.Generator, n_atoms: int, spread: float = 0.6) -> list:
    """[(element, fractional xyz (3,), B Å²)]: a compact random 'molecule' around the cell centre."""
    out = []
    for _ in range(n_atoms):
        element = ELEMENTS[int(rng.choice(len(ELEMENTS), p=[0.55, 0.2, 0.2, 0.05]))]
        xyz = 0.5 + spread * (rng.random(3) - 0.5)
        out.append((element, xyz, float(rng.uniform(8.0, 20.0))))
    return out


def write_pdb(path, atoms: list, cell) -> None:
    """A PDB file: CRYST1 (P 1) and one HETATM line per atom (Cartesian Å, occupancy 1)."""
    M = orthogonalisation(cell)
    lines = ["CRYST1{:9.3f}{:9.3f}{:9.3f}{:7.2f}{:7.2f}{:7.2f} {:<11s}{:4d}".format(*cell, "P 1", 1)]
    for i, (element, xyz, b) in enumerate(atoms, start=1):
        x, y, z = M @ np.asarray(xyz, dtype=np.float64)
        lines.append("HETATM{:5d} {:<4s} UNK A   1    {:8.3f}{:8.3f}{:8.3f}{:6.2f}{:6.2f}          {:>2s}".format(
            i, element, x, y, z, 1.0, b, element))
    lines.append("END")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _form_factor_table(element: str, s: np.ndarray) -> np.ndarray:
    """f(s) by linear interpolation of xraylib's values on 2000 points up to max s."""
    top = float(np.max(s)) * 1.001 + 1e-6
    knots = np.linspace(0.0, top, 2000)
    return np.interp(s, knots, form_factor(element, knots))


def structure_factor(atoms: list, cell, hkl: np.ndarray) -> np.ndarray:
    """F (electrons, complex) at fractional or integer hkl (N, 3): Σ_j f_j(s) e^{−B_j s²/4} e^{2πi h·x_j}."""
    Gs = np.linalg.inv(real_metric(cell))
    hkl = np.asarray(hkl, dtype=np.float64)
    s2 = np.einsum("ni,ij,nj->n", hkl, Gs, hkl)
    s = np.sqrt(np.maximum(s2, 0.0))
    tables = {e: _form_factor_table(e, s) for e in {a[0] for a in atoms}}
    F = np.zeros(len(hkl), dtype=np.complex128)
    for element, xyz, b in atoms:
        F += tables[element] * np.exp(-0.25 * b * s2) * np.exp(2j * math.pi * (hkl @ np.asarray(xyz)))
    return F


def _voxels(axes) -> np.ndarray:
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def llm_map(atoms: list, cell, axes, sigma: float, gamma: float, tolerance: float = 1e-6,
            chunk: int = 1500, d_min: float | None = None) -> np.ndarray:
    """I_LLM on the grid (e² per unit cell) by direct summation over H (module doc).

    d_min (Å): evaluate only voxels with |q| ≤ 1/d_min (NaN beyond); H still runs over the whole box.
    """
    Gs = np.linalg.inv(real_metric(cell))
    volume = math.sqrt(np.linalg.det(real_metric(cell)))
    H = _voxels(tuple(np.arange(math.ceil(a[0]), math.floor(a[-1]) + 1, dtype=np.float64) for a in axes))
    I_H = np.abs(structure_factor(atoms, cell, H)) ** 2
    I_H[np.all(H == 0, axis=1)] = 0.0  # F(000) is no part of the diffuse model
    q_all = _voxels(axes)
    s2_all = np.einsum("ni,ij,nj->n", q_all, Gs, q_all)
    inside = s2_all <= (1.0 / d_min) ** 2 if d_min else np.ones(len(q_all), dtype=bool)
    q, s2 = q_all[inside], s2_all[inside]
    x = 4.0 * math.pi ** 2 * sigma ** 2 * s2
    x_max = float(x.max())
    # terms until the Poisson weight x^n e^{-x}/n! at x_max falls below the tolerance
    n_max = 1
    while math.exp(-x_max) * x_max ** n_max / math.factorial(n_max) > tolerance and n_max < 80:
        n_max += 1
    n_max = max(n_max, int(math.ceil(x_max)) + 1)
    out = np.zeros(len(q))
    qG = q @ Gs
    sH = np.einsum("ni,ij,nj->n", H, Gs, H)
    for start in range(0, len(q), chunk):
        sl = slice(start, start + chunk)
        d2 = s2[sl, None] + sH[None, :] - 2.0 * (qG[sl] @ H.T)
        d2 = np.maximum(d2, 0.0)
        coef = np.exp(-x[sl])
        acc = np.zeros(d2.shape[0])
        for n in range(1, n_max + 1):
            g = gamma / n
            kernel = 8.0 * math.pi * g ** 3 / (1.0 + 4.0 * math.pi ** 2 * g * g * d2) ** 2
            coef = coef * x[sl] / n
            acc += coef * (kernel @ I_H)
        out[sl] = acc / volume
    full = np.full(len(q_all), np.nan)
    full[inside] = out
    return full.reshape(tuple(len(a) for a in axes))


def rbt_map(atoms: list, cell, axes, sigma: float) -> np.ndarray:
    """I_RBT = (1 − e^{−x})|F_mol(q)|² on the grid (e² per unit cell), one molecule per cell."""
    Gs = np.linalg.inv(real_metric(cell))
    q = _voxels(axes)
    s2 = np.einsum("ni,ij,nj->n", q, Gs, q)
    x = 4.0 * math.pi ** 2 * sigma ** 2 * s2
    F = structure_factor(atoms, cell, q)
    return ((1.0 - np.exp(-x)) * np.abs(F) ** 2).reshape(tuple(len(a) for a in axes))


def s_of_grid(cell, axes) -> np.ndarray:
    """|q| = 1/d (Å⁻¹) of every voxel."""
    Gs = np.linalg.inv(real_metric(cell))
    q = _voxels(axes)
    return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", q, Gs, q), 0.0)).reshape(tuple(len(a) for a in axes))
