"""All-pairs resolution of indexing ambiguity: still-to-still correlations under every operator, and
the choice of one operator per still maximising their sum (Brehm & Diederichs 2014, Acta D70:101).
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.ambiguity_cosets import Ambiguity


def pairwise_correlations(features: list, n_ops: int, n_voxels: int, min_overlap: int = 10):
    """CC[a, b, i, j]: correlation of still i under op a with still j under op b.

    Computed on the common voxels of each pair via sparse products. Also
    returns the overlap counts N[a, b, i, j]. Pairs with fewer than
    ``min_overlap`` common voxels get CC = 0.
    """
    import scipy.sparse as sp

    n = len(features)
    X = []
    for a in range(n_ops):
        rows = np.concatenate([np.full(len(f[a][0]), i) for i, f in enumerate(features)])
        cols = np.concatenate([f[a][0] for f in features])
        vals = np.concatenate([f[a][1] for f in features])
        X.append(sp.csr_matrix((vals, (rows, cols)), shape=(n, n_voxels)))
    return _pairwise_from_csr(X, min_overlap)


def _pairwise_from_csr(X: list, min_overlap: int = 10):
    """:func:`pairwise_correlations` from one (n_stills, n_voxels) CSR matrix per operator."""
    n_ops, n = len(X), X[0].shape[0]
    M = []
    for x in X:
        m = x.copy()
        m.data = np.ones_like(m.data)
        M.append(m)
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


def _mean_cc(cc, cnt, x, min_overlap):
    n = len(x)
    i, j = np.triu_indices(n, 1)
    c = cc[x[i], x[j], i, j]
    m = cnt[x[i], x[j], i, j] >= min_overlap
    return float(np.mean(c[m])) if m.any() else float("nan")
