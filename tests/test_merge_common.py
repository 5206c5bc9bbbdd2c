"""Synthetic data for the diffuse.merge tests and benchmark (no tests here).

A known map with a given Laue symmetry is defined per voxel of an HKLGrid;
stills are Ewald-sphere slices (flat detector, random orientations) whose
pixels observe the voxel they fall in: I = k_i · truth(voxel) + noise.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import voxel_flat
from diffuse_cli.symmetry import LaueSymmetry, b_matrix


def symmetric_truth(grid: HKLGrid, laue: LaueSymmetry, unit_cell, n_blobs: int = 12,
                    seed: int = 0, width: float = 0.04, iso: float = 1.0) -> np.ndarray:
    """Dense truth map (grid.shape): isotropic falloff + Laue-symmetrised Gaussian blobs.

    Blobs sit at random hkl in reciprocal space with widths ``width`` Å⁻¹;
    each blob is replicated by every Laue operator, so the map has exactly
    that Laue symmetry (evaluated at voxel centres).
    """
    rng = np.random.default_rng(seed)
    axes = grid.axes()
    H = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    B = b_matrix(unit_cell)
    q = H @ B.T
    d2 = np.einsum("ni,ni->n", q, q)
    out = iso * (2.0 + np.exp(-d2 / 0.02)) * np.exp(-d2 / 0.2)
    hmax = np.asarray(grid.hkl_max) * 0.7
    for _ in range(n_blobs):
        c = rng.uniform(-hmax, hmax)
        amp = rng.uniform(0.5, 2.0)
        for r in laue.rotations:
            cq = (c @ r) @ B.T
            dd = q - cq
            out += amp * np.exp(-np.einsum("ni,ni->n", dd, dd) / (2 * width**2))
    return out.reshape(grid.shape)


def random_rotations(n: int, seed: int) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.random(n, random_state=seed).as_matrix()


def detector_q(n_side: int = 120, wavelength: float = 1.0, distance: float = 100.0,
               half_width: float = 80.0) -> np.ndarray:
    """q (Å⁻¹) of the pixels of a flat n_side² detector normal to the beam."""
    x = np.linspace(-half_width, half_width, n_side)
    X, Y = np.meshgrid(x, x)
    lab = np.stack([X, Y, np.full_like(X, distance)], -1).reshape(-1, 3)
    s1 = lab / np.linalg.norm(lab, axis=1)[:, None] / wavelength
    s0 = np.array([0.0, 0.0, 1.0 / wavelength])
    return s1 - s0


def make_stills(truth: np.ndarray, grid: HKLGrid, unit_cell, n_stills: int, seed: int = 0,
                scales=None, photons: float = 200.0, n_side: int = 120,
                flip: dict | None = None, dtype=np.float32) -> list[dict]:
    """Ewald-slice stills observing ``truth``: I = k·truth(voxel) + Poisson-like noise.

    photons: expected counts for intensity 1 (σ² = k·I_true·k/photons-ish).
    flip: {still index: M} reports hkl_reported = hkl_true @ M for those stills.
    Observations outside the grid are dropped.
    """
    rng = np.random.default_rng(seed)
    q = detector_q(n_side)
    B = b_matrix(unit_cell)
    U = random_rotations(n_stills, seed + 1)
    flat_truth = truth.ravel()
    stills = []
    for i in range(n_stills):
        A = U[i] @ B
        hkl = q @ np.linalg.inv(A).T
        flat, inside = voxel_flat(grid, hkl)
        hkl, flat = hkl[inside], flat[inside]
        k = 1.0 if scales is None else float(scales[i])
        expected = k * flat_truth[flat]
        counts = rng.poisson(np.maximum(expected, 0) * photons)
        I = counts / photons
        sigma = np.sqrt(np.maximum(counts, 1)) / photons
        if flip and i in flip:
            hkl = hkl @ np.asarray(flip[i], dtype=np.float64)
        stills.append({"hkl": hkl.astype(dtype), "I": I.astype(np.float64),
                       "sigma": sigma.astype(np.float64), "A": A})
    return stills


def symmetrize_dense(I: np.ndarray, sigma: np.ndarray, grid: HKLGrid, laue: LaueSymmetry):
    """Inverse-variance average of a dense P1 map over Laue equivalents (independent code).

    For each operator R, the value at v is taken from voxel v·R by integer
    index arithmetic on the dense array; voxels whose mate is off the grid
    or unmeasured contribute nothing.
    """
    off = np.asarray(grid.hkl_max) * np.asarray(grid.ndiv)
    shape = np.asarray(grid.shape)
    V = np.stack(np.meshgrid(*[np.arange(-o, o + 1) for o in off], indexing="ij"), -1).reshape(-1, 3)
    sw = np.zeros(len(V))
    swi = np.zeros(len(V))
    Iv, sv = I.ravel(), sigma.ravel()
    for r in laue.rotations:
        u = V @ r + off
        ok = np.all((u >= 0) & (u < shape), axis=1)
        src = np.ravel_multi_index(tuple(u[ok].T), grid.shape)
        val, s = Iv[src], sv[src]
        good = np.isfinite(val) & np.isfinite(s) & (s > 0)
        idx = np.flatnonzero(ok)[good]
        w = 1.0 / s[good] ** 2
        sw[idx] += w
        swi[idx] += w * val[good]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (swi / sw).reshape(grid.shape), (1 / np.sqrt(sw)).reshape(grid.shape)
