"""Punch-and-fill of a map on the hkl grid: punch voxels near integer hkl, fill holes by a Laplace fill.

Punch: a voxel at fractional hkl h is punched when its distance to the
nearest integer point, ‖h − round(h)‖ (Euclidean in Miller-index units), is
at most ``radius`` (the same ball around every lattice point, so the punch is
Friedel- and Laue-symmetric). radius = 0 punches the integer voxels only.

Holes: punched voxels and unmeasured (NaN) voxels, except those beyond the
largest measured |q| (s_max, or the given limit): there the map stays NaN
(the ΔPDF sets them to 0 after its taper).

Fill: with the discrete Laplacian (voxel steps Δ_a = |B e_a|/ndiv_a along
a*, b*, c* in Å⁻¹, neighbours outside the grid or beyond s_max dropped:
zero flux; cross terms of oblique cells neglected)

    (∇²f)_i = Σ_a [f(i + e_a) + f(i − e_a) − 2 f(i)] / Δ_a²,

the hole values are either

* ``laplace`` (harmonic): (∇²f)_i = 0 at every hole voxel i, measured voxels
  fixed (Dirichlet), so each filled value is the 1/Δ²-weighted mean of its six
  neighbours; error O(Δ² ∇²I) (second order);
* ``biharmonic`` (default; minimum curvature): the values minimising
  Σ_j (∇²f)_j² over the hole voxels and their neighbours j, i.e. the
  discrete ∇⁴f = 0 with measured voxels fixed; exact for a locally quadratic
  map, error O(Δ⁴ ∇⁴I), several times smaller than Laplace for small holes.

Both are sparse symmetric positive-definite systems over the hole voxels,
solved by Jacobi-preconditioned conjugate gradients (scipy.sparse, no
per-voxel loop). A hole component (6-connected) with no measured voxel on
its boundary has no solution and stays NaN (counted as n_unfillable).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("diffuse.analysis.fill")


def punch_mask(h, k, l, radius: float) -> np.ndarray:
    """True where a voxel is within ``radius`` (Miller-index units) of an integer hkl (shape (nh, nk, nl))."""
    d2 = [(np.asarray(a, dtype=np.float64) - np.rint(a)) ** 2 for a in (h, k, l)]
    dist2 = d2[0][:, None, None] + d2[1][None, :, None] + d2[2][None, None, :]
    return dist2 <= float(radius) ** 2 + 1e-12


def axis_steps(h, k, l, unit_cell) -> np.ndarray:
    """Voxel step Δ_a along the three axes (Å⁻¹): |B column a| × axis step."""
    from diffuse_cli.analysis.isotropic import reciprocal_metric

    G = reciprocal_metric(unit_cell)
    steps = [abs(float(a[1] - a[0])) if len(a) > 1 else 1.0 for a in (h, k, l)]
    return np.array([np.sqrt(G[i, i]) * steps[i] for i in range(3)])


def laplace_fill(values, holes, outside=None, steps=(1.0, 1.0, 1.0), method: str = "biharmonic",
                 tol: float = 1e-8, max_iterations: int = 5000) -> dict:
    """Fill ``holes`` of a 3D map by the Laplace or biharmonic equation (module doc).

    values: 3D map (NaN allowed in holes/outside); holes: bool, voxels to
    fill; outside: bool, voxels neither used nor filled (default none);
    steps: voxel steps Δ_a along the axes (any common unit);
    method: "laplace" or "biharmonic"; tol: relative residual at which CG stops.

    Returns filled (float64 map: measured values kept, also outside; holes
    filled; NaN in unfillable holes and unmeasured outside voxels),
    filled_mask (bool: True where the value is an interpolation),
    n_unfillable, iterations, residual.
    """
    if method not in ("laplace", "biharmonic"):
        raise ValueError(f"method {method!r}: laplace or biharmonic")
    values = np.asarray(values, dtype=np.float64)
    holes = np.asarray(holes, dtype=bool)
    shape = values.shape
    outside = np.zeros(shape, dtype=bool) if outside is None else np.asarray(outside, dtype=bool)
    holes = holes & ~outside
    known = ~holes & ~outside & np.isfinite(values)
    holes = holes | (~known & ~outside)      # unmeasured voxels inside are holes too
    filled = np.where(holes, np.nan, values)     # outside the fill region: as measured
    holes, n_unfillable = _drop_unbounded(holes, known)
    idx = np.flatnonzero(holes.ravel())
    if idx.size == 0:
        return {"filled": filled, "filled_mask": holes, "n_unfillable": n_unfillable,
                "iterations": 0, "residual": 0.0}
    flat = filled.ravel()
    if method == "laplace":
        M, c = _split(_laplacian_rows(idx, holes | known, shape, steps), idx, flat, holes.ravel())
        A, b = -M, c                     # L_HH x + c = 0 as (−L_HH) x = c: symmetric positive definite
    else:
        # minimise Σ_j (∇²f)_j² over hole voxels and their neighbours: normal equations
        rows = _with_neighbours(idx, holes | known, shape)
        LH, c = _split(_laplacian_rows(rows, holes | known, shape, steps), idx, flat, holes.ravel())
        A = (LH.T @ LH).tocsr()          # minimises ‖LH x + c‖²: LHᵀLH x = −LHᵀc
        b = -(LH.T @ c)
    x, iterations, residual = _pcg(A, b, tol, max_iterations)
    if residual > tol:
        logger.warning("%s fill: CG stopped after %d iterations at relative residual %.2g (tol %.2g)",
                       method, iterations, residual, tol)
    flat[idx] = x
    return {"filled": flat.reshape(shape), "filled_mask": holes, "n_unfillable": n_unfillable,
            "iterations": iterations, "residual": residual}


def _drop_unbounded(holes, known):
    """Hole components (6-connected) without a known neighbour cannot be filled: drop them."""
    from scipy import ndimage

    labels, n = ndimage.label(holes)
    if n == 0:
        return holes, 0
    touching = ndimage.binary_dilation(known) & holes
    good = np.zeros(n + 1, dtype=bool)
    good[np.unique(labels[touching])] = True
    good[0] = False
    keep = good[labels]
    return keep, int(np.count_nonzero(holes & ~keep))


def _neighbours(idx, shape):
    """For each of the 6 directions: (axis, positions in idx with an in-grid neighbour, its flat index)."""
    coords = np.unravel_index(idx, shape)
    strides = (shape[1] * shape[2], shape[2], 1)
    for axis in range(3):
        for sign in (-1, 1):
            c = coords[axis] + sign
            me = np.flatnonzero((c >= 0) & (c < shape[axis]))
            yield axis, me, idx[me] + sign * strides[axis]


def _with_neighbours(idx, valid, shape):
    """idx and the valid voxels next to them (sorted flat indices)."""
    parts = [idx] + [nb[valid.ravel()[nb]] for _, _, nb in _neighbours(idx, shape)]
    return np.unique(np.concatenate(parts))


def _laplacian_rows(rows, valid, shape, steps):
    """Discrete Laplacian at voxels ``rows``: (row position, column flat index, weight) triplets.

    Neighbours outside the grid or not ``valid`` drop out (zero flux).
    """
    valid = valid.ravel()
    diag = np.zeros(rows.size)
    r, c, d = [], [], []
    for axis, me, nb in _neighbours(rows, shape):
        w = 1.0 / float(steps[axis]) ** 2
        ok = valid[nb]
        diag[me[ok]] += w
        r.append(me[ok])
        c.append(nb[ok])
        d.append(np.full(int(ok.sum()), w))
    r.append(np.arange(rows.size))
    c.append(rows)
    d.append(-diag)
    return np.concatenate(r), np.concatenate(c), np.concatenate(d), rows.size


def _split(triplets, idx, flat_values, hole):
    """Columns on hole voxels → sparse matrix over the unknowns; known columns → constant per row."""
    from scipy import sparse

    r, c, d, n_rows = triplets
    number = np.full(hole.size, -1, dtype=np.int64)
    number[idx] = np.arange(idx.size)
    on_hole = hole[c]
    M = sparse.csr_matrix((d[on_hole], (r[on_hole], number[c[on_hole]])), shape=(n_rows, idx.size))
    const = np.bincount(r[~on_hole], weights=d[~on_hole] * flat_values[c[~on_hole]], minlength=n_rows)
    return M, const


def _pcg(A, b, tol, max_iterations):
    """Jacobi-preconditioned conjugate gradients for SPD A; returns x, iterations, ‖r‖/‖b‖."""
    inv_d = 1.0 / A.diagonal()
    x = b * inv_d                      # start: the known neighbours' weighted mean
    r = b - A @ x
    norm_b = float(np.linalg.norm(b)) or 1.0
    z = inv_d * r
    p = z.copy()
    rz = float(r @ z)
    it = 0
    res = float(np.linalg.norm(r)) / norm_b
    while res > tol and it < max_iterations:
        Ap = A @ p
        alpha = rz / float(p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        res = float(np.linalg.norm(r)) / norm_b
        it += 1
        z = inv_d * r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it, res


def complete_limit(measured, s, width: float, min_completeness: float) -> float:
    """The |q| (Å⁻¹) up to which every shell of ``width`` has at least ``min_completeness`` of its
    voxels measured, counting from the first shell that has (low-|q| gaps such as the beamstop's
    do not stop it): the upper edge of the last shell of that run."""
    m = np.asarray(measured, dtype=bool).ravel()
    shell = (np.asarray(s).ravel() / width).astype(np.int64)
    n = int(shell[m].max()) + 1 if m.any() else 0
    total = np.bincount(shell, minlength=n)[:n]
    have = np.bincount(shell[m], minlength=n)[:n]
    frac = np.divide(have, total, out=np.zeros(n), where=total > 0)
    good = frac >= min_completeness
    if not good.any():
        return 0.0
    first = int(np.argmax(good))              # incomplete low-|q| shells (beamstop) do not stop it
    bad = np.flatnonzero(~good[first:] & (total[first:] > 0))
    last = first + (int(bad[0]) if bad.size else n - first)   # shells first .. last−1 are complete enough
    return float(last * width)


def punch_and_fill(values, h, k, l, unit_cell, radius=None, fill_missing: bool = True,
                   s_limit=None, method: str = "biharmonic", tol: float = 1e-8,
                   max_iterations: int = 5000, s=None) -> dict:
    """Punch voxels within ``radius`` of integer hkl (None: no punch) and fill them (laplace_fill).

    fill_missing: also fill unmeasured (NaN) voxels with |q| ≤ s_limit
    (default: the largest measured |q|); False leaves them NaN (they are
    then neither used nor filled). s: s_map(h, k, l, unit_cell) if at hand.
    Returns laplace_fill's dict plus ``punched`` (bool map) and ``s_limit`` (Å⁻¹).
    """
    from diffuse_cli.analysis.isotropic import s_map

    values = np.asarray(values, dtype=np.float64)
    punched = punch_mask(h, k, l, radius) if radius is not None else np.zeros(values.shape, dtype=bool)
    s = s_map(h, k, l, unit_cell) if s is None else np.asarray(s)
    measured = np.isfinite(values) & ~punched
    if not measured.any():
        raise ValueError("no measured voxel left after punching")
    if s_limit is None:
        s_limit = float(s[np.isfinite(values)].max())
    outside = s > s_limit
    if not fill_missing:
        outside |= ~np.isfinite(values) & ~punched
    out = laplace_fill(values, punched, outside=outside, steps=axis_steps(h, k, l, unit_cell),
                       method=method, tol=tol, max_iterations=max_iterations)
    out["punched"] = punched & ~outside
    out["s_limit"] = float(s_limit)
    return out
