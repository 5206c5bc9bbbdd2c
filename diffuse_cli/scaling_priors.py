"""Bases and priors of the full scaling model (:class:`diffuse_cli.scaling_terms.ScalingTerms`;
docs/merge.md, "Scaling"): the piecewise-linear and bilinear node weights of the
absorption, detector and offset terms, the curvature penalties (second differences,
thin plate), and the identifiability priors of the offset (:func:`offset_prior`) and
of detector nodes the data barely see (:func:`detector_floor`).
"""

from __future__ import annotations

import numpy as np

N_RINGS = 12  # |s| bins of the ring-mean constraint on the detector response
GAUGE_WEIGHT = 1e3  # stiffness of the mean-one constraint on each absorption surface
RIDGE = 1e-8  # keeps nodes without data (and without curvature) determined


def offset_prior(M: np.ndarray, blk: slice, floor: float):
    """Prior matrix on the offset nodes that makes them identifiable; (P, smallest μ).

    M: the still's normal matrix with its priors, ``blk`` the offset block c, the
    rest m (g, a). The information on c with m fixed is M_cc; with m free (the
    Schur complement) S = M_cc − M_cm M_mm⁻¹ M_mc. The generalised eigenvalues
    μ_k of S u = μ M_cc u (0 ≤ μ ≤ 1) say which share of an offset mode's
    information survives the multiplicative terms: μ ≈ 0 where g·(I_ref + c)
    ≈ g'·(I_ref + c') (a map with little contrast beyond its radial profile).
    P = Σ_k max(0, floor − μ_k)·(M_cc u_k)(M_cc u_k)ᵀ (u_k normalised to
    u_kᵀ M_cc u_k = 1), a zero-mean prior on exactly those modes, raises every
    μ_k to at least ``floor`` (measured against M_cc without P); modes with
    μ_k ≥ floor get none.
    """
    Mcc = M[blk, blk]
    rest = np.r_[0:blk.start, blk.stop:M.shape[0]]
    try:
        L = np.linalg.cholesky(Mcc)
        S = Mcc - M[blk][:, rest] @ np.linalg.solve(M[np.ix_(rest, rest)], M[rest][:, blk])
        Li = np.linalg.inv(L)
        mu, Y = np.linalg.eigh(Li @ S @ Li.T)
    except np.linalg.LinAlgError:
        return np.zeros_like(Mcc), np.nan
    lift = np.maximum(floor - mu, 0.0)
    LY = L @ Y
    return (LY * lift) @ LY.T, float(mu.min())


def _second_differences(n: int) -> np.ndarray:
    """(n−2, n) rows (−½, 1, −½): the curvature penalty of mdx2 (empty for n < 3)."""
    if n < 3:
        return np.zeros((0, n))
    B = np.zeros((n - 2, n))
    r = np.arange(n - 2)
    B[r, r], B[r, r + 1], B[r, r + 2] = -0.5, 1.0, -0.5
    return B


def _grid_penalty(n: int) -> np.ndarray:
    """Thin-plate curvature BᵀB on an n×n grid (node index iy·n + ix).

    Rows: second differences (−½, 1, −½) along each axis (≈ ½h²f_xx, ½h²f_yy)
    and mixed differences ×√½ (≈ √½·h²f_xy), so that |Bθ|² ≈ ¼h⁴∫(f_xx² +
    2f_xy² + f_yy²): every quadratic but a plane is penalised, f_xy included.
    """
    B1 = _second_differences(n)
    eye = np.eye(n)
    rows = [np.kron(eye, B1), np.kron(B1, eye)]
    if n >= 2:
        D1 = np.diff(np.eye(n), axis=0)
        rows.append(np.sqrt(0.5) * np.kron(D1, D1))
    B = np.vstack(rows)
    return B.T @ B


def detector_floor(N: np.ndarray, n: int, floor: float) -> np.ndarray:
    """(P, n·n) prior weights towards d = 1 on the detector nodes the data barely see.

    N (P, n², n²): d's normal matrices per panel. A bilinear node's ∫B² is ½
    at an edge and ¼ at a corner of an interior node's, so with c_k =
    w_x·w_y (w = ½ at the ends of an axis, 1 inside) the information node k
    would hold if the data covered its support like the average node is
    c_k·tr(N)/Σc. A node with less than ``floor`` of that gets the rest as a
    prior towards 1: nodes beyond the data (past d_min, a panel edge seen by a
    few pixels) are held instead of extrapolated by the curvature prior, and
    well-covered nodes get none (the fixed point there is unchanged).
    """
    w = np.ones(n)
    w[[0, -1]] = 0.5
    c = np.outer(w, w).ravel()
    P = N.shape[0]
    expected = c * float(np.trace(N, axis1=1, axis2=2).sum()) / (P * c.sum())
    diag = np.einsum("pkk->pk", N)
    return np.maximum(floor * expected[None, :] - diag, 0.0)


def _linear_weights(t: np.ndarray, n: int):
    """Node j (N,) and fraction f (N,) of t ∈ [0, 1] on n equally spaced nodes (n ≥ 2)."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0) * (n - 1)
    j = np.minimum(t.astype(np.int64), n - 2)
    return j, t - j


def _bilinear(tx: np.ndarray, ty: np.ndarray, n: int):
    """Node indices (N, 4) (iy·n + ix) and weights (N, 4) of bilinear interpolation on n×n."""
    jx, fx = _linear_weights(tx, n)
    jy, fy = _linear_weights(ty, n)
    idx = np.stack([jy * n + jx, jy * n + jx + 1, (jy + 1) * n + jx, (jy + 1) * n + jx + 1], axis=1)
    w = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    return idx, w


def _dense(idx: np.ndarray, w: np.ndarray, n_cols: int) -> np.ndarray:
    """Dense (N, n_cols) basis from per-row node indices and weights (N, k)."""
    out = np.zeros((idx.shape[0], n_cols))
    rows = np.arange(idx.shape[0])
    for k in range(idx.shape[1]):  # one column per row and k: no duplicate (row, col)
        out[rows, idx[:, k]] += w[:, k]
    return out
