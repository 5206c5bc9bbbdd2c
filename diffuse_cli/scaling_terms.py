"""The full scaling model (``scaling.model=full``): absorption, detector response and offset terms.

Formulas, priors and constraints: docs/merge.md, "Scaling". The per-still
scale g and the robust fit it extends are in :mod:`diffuse_cli.scaling`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffuse_cli.scaling import (HUBER_K, POISSON_OUTLIER_CUT, FitResult, ScaleModel, _median, _robust_scale,
                                 model_variance, normalisation)

# ---------------------------------------------------------------- richer scaling model
#
# For still i and observation j (docs/merge.md, "Scaling"):
#
#     E[I_ij] = a_i(u_j, v_j) · d(p_j, x_j, y_j) · g_i(d*²_j) · (I_ref(h_j) + c_i(|s_j|))
#
# g: per-still scale (ScaleModel above); a: absorption, bilinear on an n×n grid
# over (u, v), the lab x, y of the scattered-beam direction ŝ1; d: detector
# response, bilinear on an n×n grid per panel over (fast, slow)/panel size;
# c: additive offset in merged-map units, piecewise linear in |s| = d*.
# Per-still terms (g, a, c) are fitted jointly (Gauss–Newton inside IRLS);
# d, shared by all stills, is solved after each pass from normal equations
# accumulated during it (alternation, as in mdx2).

N_RINGS = 12  # |s| bins of the ring-mean constraint on the detector response
GAUGE_WEIGHT = 1e3  # stiffness of the mean-one constraint on each absorption surface
RIDGE = 1e-8  # keeps nodes without data (and without curvature) determined
# Share of the previous detector response kept in each pass (d = d_prev^s · d_solved^(1−s)).
# Fitted against the other stills (leave_one_out), d at a pixel is corrected from the
# pixels of other stills that saw the same voxels, which lie on the same |s| ring; where
# a ring crosses the detector in two separate arcs (the outer corners), the ring
# constraint leaves their difference, which flips sign every pass. A share s maps an
# iteration eigenvalue λ to s + (1 − s)λ, stable for s > (−1 − λ)/(1 − λ); the real
# nuclease sweep has λ ≈ −2.6 (s = 1/3 diverged there), so s = 2/3 (docs/merge.md).
DETECTOR_OWN_SHARE = 2.0 / 3.0
# Least information of a detector node (diagonal of d's normal matrix) as a share of what
# it would hold if the data covered its support like the average node: a node below it
# gets a prior towards 1 that makes up the difference (detector_floor, docs/merge.md).
DETECTOR_INFORMATION_FLOOR = 0.1
# Least share of an offset mode's information that must survive the multiplicative terms
# (offset_prior): the identifiability prior weight of the additive offset, docs/merge.md.
OFFSET_INFORMATION_FLOOR = 0.02


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


@dataclass(frozen=True)
class TermSettings:
    """One optional term: on/off, nodes per axis, smoothness prior weight."""

    enable: bool = False
    n_nodes: int = 5
    smoothness: float = 1.0


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


class ScalingTerms:
    """The scaling model with optional absorption, detector and offset terms, and its state.

    ``base`` is the per-still scale g (:class:`ScaleModel`). Per-still
    parameters: ``g`` (n_stills, n_g), ``alpha`` (n_stills, n_a·n_a) absorption
    node values, ``kappa`` (n_stills, n_c) offset node values (merged-map
    units). Global: ``det`` (P, n_d·n_d) detector node values, ``uv_range``
    (u_min, u_max, v_min, v_max) of the absorption grid, ``panel_shapes``.
    ``neighbours`` (n_stills, 2): previous/next still of the same sweep (−1:
    none); ``neighbour_prior`` ties their absorption and offset nodes.
    """

    def __init__(self, base: ScaleModel, absorption: TermSettings = TermSettings(),
                 detector: TermSettings = TermSettings(n_nodes=6),
                 offset: TermSettings = TermSettings(n_nodes=8), neighbour_prior: float = 0.0):
        self.base = base
        self.absorption = absorption
        self.detector = detector
        self.offset = offset
        self.neighbour_prior = float(neighbour_prior)
        self.n_g = base.n_control_points
        self.n_a = absorption.n_nodes ** 2 if absorption.enable else 0
        self.n_c = offset.n_nodes if offset.enable else 0
        self.n_d = detector.n_nodes ** 2 if detector.enable else 0
        self.s_max = float(np.sqrt(base.d_star_sq_max))
        self.uv_range = None
        self.panel_shapes = None
        self.det = None
        self.neighbours = None
        # Leave-one-out fits (leave_one_out, relax) and the damped d update (DETECTOR_OWN_SHARE).
        # With the additive offset, g and a smooth c(|s|) are nearly degenerate where the map has
        # little contrast beyond its radial profile; offset_prior keeps each still's fit regular
        # (without it, 8 thaumatin stills: g moved 4× in a pass).
        self.leave_one_out = True
        self.relax_detector = self.leave_one_out

    # ------------------------------------------------------------ set-up
    @property
    def n_control_points(self) -> int:
        return self.n_g

    @property
    def any_extra(self) -> bool:
        return bool(self.n_a or self.n_c or self.n_d)

    def start(self, n_stills: int, neighbours=None) -> None:
        self.g = np.ones((n_stills, self.n_g))
        self.alpha = np.ones((n_stills, self.n_a))
        self.kappa = np.zeros((n_stills, self.n_c))
        self.neighbours = (np.full((n_stills, 2), -1, dtype=np.int64) if neighbours is None
                           else np.asarray(neighbours, dtype=np.int64).reshape(n_stills, 2))
        self._uv = [np.inf, -np.inf, np.inf, -np.inf]
        self._aS = np.zeros((max(self.n_a, 1), N_RINGS))
        self._a_log = np.zeros(max(self.n_a, 1))  # Σ log α of the pass's fits (before relax)
        self._a_count = np.zeros(1)

    def observe(self, obs: dict) -> None:
        """Pass 0: note the range of ŝ1 directions and the panel shapes."""
        if self.n_a:
            uv = np.asarray(obs["s1_xy"])
            if uv.size:
                self._uv = [min(self._uv[0], float(uv[:, 0].min())), max(self._uv[1], float(uv[:, 0].max())),
                            min(self._uv[2], float(uv[:, 1].min())), max(self._uv[3], float(uv[:, 1].max()))]
        if self.n_d and self.panel_shapes is None:
            self.panel_shapes = np.asarray(obs["panel_shapes"], dtype=np.int64).reshape(-1, 2)

    def finish_setup(self, comm=None) -> None:
        if self.n_a:
            lo = np.array([self._uv[0], self._uv[2]])
            hi = np.array([self._uv[1], self._uv[3]])
            if comm is not None and comm.Get_size() > 1:
                from mpi4py import MPI

                comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
                comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
            if not np.all(np.isfinite(lo)) or not np.all(hi > lo):
                raise ValueError("absorption term: no ŝ1 directions in the observations")
            self.uv_range = (lo[0], hi[0], lo[1], hi[1])
        if self.n_d:
            if comm is not None and comm.Get_size() > 1:
                shapes = comm.allgather(self.panel_shapes)
                self.panel_shapes = next(s for s in shapes if s is not None)
            if self.panel_shapes is None:
                raise ValueError("detector term: no panel shapes in the observations")
            self.det = np.ones((len(self.panel_shapes), self.n_d))
            self._reset_detector_sums()

    def _reset_detector_sums(self):
        P, m = len(self.panel_shapes), self.n_d
        self._dN = np.zeros(P * m * m)
        self._db = np.zeros(P * m)
        self._dT = np.zeros((P * m, max(self.n_a, 1)))
        self._dS = np.zeros((P * m, N_RINGS))

    # ------------------------------------------------------------ bases
    def coordinates(self, obs: dict, dss: np.ndarray, select=None) -> dict:
        """Per-observation basis data (of ``select`` if given): d*², absorption, detector, offset."""
        sel = slice(None) if select is None else select
        co = {"dss": dss}
        if self.n_a:
            uv = np.asarray(obs["s1_xy"])[sel]
            u0, u1, v0, v1 = self.uv_range
            co["a_idx"], co["a_w"] = _bilinear((uv[:, 0] - u0) / (u1 - u0), (uv[:, 1] - v0) / (v1 - v0),
                                               self.absorption.n_nodes)
        if self.n_d:
            p = np.asarray(obs["panel"])[sel].astype(np.int64)
            shp = self.panel_shapes[p]
            tx = (np.asarray(obs["fast"])[sel] + 0.5) / shp[:, 1]
            ty = (np.asarray(obs["slow"])[sel] + 0.5) / shp[:, 0]
            idx, w = _bilinear(tx, ty, self.detector.n_nodes)
            co["d_panel"], co["d_idx"], co["d_w"] = p, idx, w
        if self.n_c:
            j, f = _linear_weights(np.sqrt(np.maximum(dss, 0.0)) / self.s_max, self.offset.n_nodes)
            co["c_idx"] = np.stack([j, j + 1], axis=1)
            co["c_w"] = np.stack([1 - f, f], axis=1)
        return co

    def detector_factor(self, co: dict) -> np.ndarray | float:
        if not self.n_d:
            return 1.0
        vals = self.det[co["d_panel"][:, None], co["d_idx"]]
        return np.einsum("nk,nk->n", vals, co["d_w"])

    def evaluate(self, i: int, co: dict, g=None, alpha=None, kappa=None):
        """(multiplier a·d·g (N,), offset c (N,) or 0) of still i at the observations."""
        g = self.g[i] if g is None else g
        m = self.base.evaluate(g, co["dss"]) * self.detector_factor(co)
        if self.n_a:
            alpha = self.alpha[i] if alpha is None else alpha
            m = m * np.einsum("nk,nk->n", alpha[co["a_idx"]], co["a_w"])
        c = 0.0
        if self.n_c:
            kappa = self.kappa[i] if kappa is None else kappa
            c = np.einsum("nk,nk->n", kappa[co["c_idx"]], co["c_w"])
        return m, c

    # ------------------------------------------------------------ per-still fit
    def fit_still(self, i: int, intensity, sigma, reference, co: dict, n_irls: int = 6,
                  variance_per_intensity=None, reference_variance=None) -> FitResult:
        """Fit g_i, a_i, c_i jointly: robust Gauss–Newton, the other stills and d fixed.

        Minimises Σ w (I − a·d·g·(I_ref + c))²/σ² plus the priors (docs/merge.md):
        curvature of g (ScaleModel.smoothness), of a and c (``smoothness`` ×
        tr(N_block)/tr(BᵀB)), mean(a nodes) = 1 (stiff), and, with neighbours,
        ``neighbour_prior`` × tr(N_block)/n_block × |θ − θ_neighbours|², and on c
        the identifiability prior of :func:`offset_prior` (OFFSET_INFORMATION_FLOOR).
        Also adds this still's contribution to the detector normal equations.
        ``reference_variance``: var(I_ref) (see :func:`fit_scale`), adds (a·d·g)²·var(I_ref).
        """
        I = np.asarray(intensity, dtype=np.float64)
        s = np.asarray(sigma, dtype=np.float64)
        ref = np.asarray(reference, dtype=np.float64)
        ng, na, nc = self.n_g, self.n_a, self.n_c
        n_par = ng + na + nc
        if I.size < max(10, 5 * n_par):
            return FitResult(np.full(ng, np.nan), int(I.size), np.nan, np.nan, np.nan, False)
        Phi = self.base.basis(co["dss"])
        Psi = _dense(co["a_idx"], co["a_w"], na) if na else None
        X = _dense(co["c_idx"], co["c_w"], nc) if nc else None
        D = self.detector_factor(co)
        D = np.broadcast_to(np.asarray(D, dtype=np.float64), I.shape)
        p = np.concatenate([self.g[i], self.alpha[i], self.kappa[i]]).astype(np.float64)
        blocks = [slice(0, ng), slice(ng, ng + na), slice(ng + na, n_par)]
        # priors: (block, BᵀB, weight) curvature; mean-one gauge on a; neighbour means
        Pg = np.zeros((ng, ng))
        if ng > 1:
            Dm = np.diff(np.eye(ng), axis=0)
            Pg = Dm.T @ Dm
        curv = [(blocks[0], Pg, None)]
        if na:
            curv.append((blocks[1], _grid_penalty(self.absorption.n_nodes), self.absorption.smoothness))
        if nc:
            B = _second_differences(nc)
            curv.append((blocks[2], B.T @ B, self.offset.smoothness))
        nb_mean = self._neighbour_mean(i)
        v1 = None if variance_per_intensity is None else np.asarray(variance_per_intensity, dtype=np.float64)

        def parts(p):
            g = Phi @ p[blocks[0]]
            a = Psi @ p[blocks[1]] if na else 1.0
            c = X @ p[blocks[2]] if nc else 0.0
            return g, a, c

        def model_of(p):
            g, a, c = parts(p)
            return a * D * g * (ref + c)

        v_ref = None if reference_variance is None else np.asarray(reference_variance, dtype=np.float64)

        def sigma_of(mu, p):
            var = s * s if v1 is None else model_variance(I, s, v1, mu)
            if v_ref is not None:
                g, a, _ = parts(p)
                m = a * D * g
                var = var + m * m * v_ref
            return np.sqrt(var)

        mu = model_of(p)
        s_model = sigma_of(mu, p)
        hub = np.ones_like(I)
        scale = 1.0
        for it in range(2 * n_irls):
            g, a, c = parts(p)
            rc = ref + c
            cols = [(a * D * rc)[:, None] * Phi]
            if na:
                cols.append((D * g * rc)[:, None] * Psi)
            if nc:
                cols.append((np.broadcast_to(a * D * g, I.shape))[:, None] * X)
            J = np.hstack(cols)
            w = hub / (s_model * s_model)
            z = I - mu + J @ p
            Jw = J * w[:, None]
            N = Jw.T @ J
            b = Jw.T @ z
            M = N.copy()
            for blk, P, lam in curv:
                tr_n = np.trace(N[blk, blk])
                n_b = blk.stop - blk.start
                if lam is None:  # ScaleModel's own smoothness of g
                    M[blk, blk] += self.base.smoothness * tr_n / max(n_b, 1) * P
                elif np.trace(P) > 0:
                    M[blk, blk] += lam * tr_n / np.trace(P) * P
                M[blk, blk] += RIDGE * tr_n / max(n_b, 1) * np.eye(n_b)
                b[blk] += RIDGE * tr_n / max(n_b, 1) * p[blk]
            if na:
                tr_a = np.trace(N[blocks[1], blocks[1]])
                k = GAUGE_WEIGHT * tr_a / na
                M[blocks[1], blocks[1]] += k / na**2
                b[blocks[1]] += k / na
            if nb_mean is not None and self.neighbour_prior > 0:
                for blk in blocks[1:]:
                    n_b = blk.stop - blk.start
                    if n_b:
                        k = self.neighbour_prior * np.trace(N[blk, blk]) / n_b
                        M[blk, blk] += k * np.eye(n_b)
                        b[blk] += k * nb_mean[blk]
            if nc and OFFSET_INFORMATION_FLOOR > 0:
                # zero-mean prior on the offset modes that g and a can mimic (offset_prior)
                M[blocks[2], blocks[2]] += offset_prior(M, blocks[2], OFFSET_INFORMATION_FLOOR)[0]
            try:
                p = np.linalg.solve(M, b)
            except np.linalg.LinAlgError:
                return FitResult(np.full(ng, np.nan), int(I.size), np.nan, np.nan, np.nan, False)
            mu = model_of(p)
            s_model = sigma_of(mu, p)
            r = (I - mu) / s_model
            mad = 1.4826 * _median(r, centre=_median(r))  # np.median(|r − np.median(r)|), bit for bit
            scale = mad if mad > 0 else (np.std(r) or 1.0)
            if v1 is not None:
                hub = (np.abs(r) <= POISSON_OUTLIER_CUT * scale).astype(np.float64)
            else:
                # Huber, and gross outliers out; no redescending (Tukey) weights:
                # while the other terms are still wrong, they would discard the
                # strong pixels that are needed to correct them
                u = np.abs(r) / (HUBER_K * scale)
                hub = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300))
                if it >= n_irls:
                    hub[np.abs(r) > POISSON_OUTLIER_CUT * scale] = 0.0
        g, a, c = parts(p)
        r = (I - mu) / s_model
        inl = hub > 0
        rms = float(np.sqrt(np.mean(r[inl] ** 2))) if inl.any() else np.nan
        cc = float(np.corrcoef(I[inl], ref[inl])[0, 1]) if inl.sum() > 2 and np.std(ref[inl]) > 0 else np.nan
        ok = bool(np.all(np.isfinite(p)) and np.all(g > 0) and np.all(np.asarray(a) > 0))
        if v_ref is not None:  # the outlier limit's scale: see _robust_scale
            s_obs = s if v1 is None else np.sqrt(model_variance(I, s, v1, mu))
            scale = _robust_scale((I - mu) / s_obs, scale)
        fit = FitResult(p[blocks[0]], int(I.size), rms, cc, float(np.mean(~inl)), ok, float(scale))
        fit.absorption = p[blocks[1]]
        fit.offset = p[blocks[2]]
        keep = (np.abs(r) <= POISSON_OUTLIER_CUT * scale).astype(np.float64)
        if ok and self.n_a:
            # the absorption held by this still's detector equations (end_pass moves its static part)
            self._a_log += np.log(np.maximum(p[blocks[1]], 1e-6))
            self._a_count += 1.0
            # which |s| rings each absorption node sees (information-weighted)
            wa = keep / (s_model * s_model) * (D * g * (ref + c)) ** 2
            ring = self._ring(co["dss"])
            S = self._aS.reshape(-1)
            for k in range(4):
                S += np.bincount(co["a_idx"][:, k] * N_RINGS + ring, wa * co["a_w"][:, k], minlength=S.size)
        if ok and self.n_d:
            # d enters linearly: E[I] = d·h with h = a·g·(I_ref + c). Only gross
            # outliers are left out: Huber/Tukey weights would drop the strong
            # pixels exactly where the current d is wrong, and d could not recover
            h = np.asarray(a) * g * (ref + c)
            self._add_detector(co, h, I, keep / (s_model * s_model))
        return fit

    def _ring(self, dss):
        return np.minimum((np.sqrt(np.maximum(dss, 0.0)) / self.s_max * N_RINGS).astype(np.int64), N_RINGS - 1)

    def ring_centres(self) -> np.ndarray:
        """|s| (Å⁻¹) at the centres of the N_RINGS rings."""
        return (np.arange(N_RINGS) + 0.5) / N_RINGS * self.s_max

    def _neighbour_mean(self, i: int):
        if self.neighbours is None or self.neighbour_prior <= 0:
            return None
        nb = [j for j in self.neighbours[i] if j >= 0]
        if not nb:
            return None
        return np.mean([np.concatenate([self.g[j], self.alpha[j], self.kappa[j]]) for j in nb], axis=0)

    def _add_detector(self, co, h, I, w):
        m = self.n_d
        P = co["d_panel"]
        idx, wt = co["d_idx"], co["d_w"]
        node = P[:, None] * m + idx  # (N, 4) global node
        wh = w * h
        for k in range(4):
            self._db += np.bincount(node[:, k], wh * I * wt[:, k], minlength=self._db.size)
            for l in range(4):
                key = (P * m + idx[:, k]) * m + idx[:, l]
                self._dN += np.bincount(key, wh * h * wt[:, k] * wt[:, l], minlength=self._dN.size)
        # which |s| rings each detector node sees (information-weighted)
        ring = self._ring(co["dss"])
        S = self._dS.reshape(-1)
        for k in range(4):
            S += np.bincount(node[:, k] * N_RINGS + ring, wh * h * wt[:, k], minlength=S.size)
        if self.n_a:
            # Σ w·h·I·B_d·B_a: d's right-hand side per absorption node, for moving the
            # static absorption into d through d's own normal equations (end_pass)
            na = self._dT.shape[1]
            T = self._dT.reshape(-1)
            for k in range(4):
                for l in range(4):
                    T += np.bincount(node[:, k] * na + co["a_idx"][:, l],
                                     wh * I * wt[:, k] * co["a_w"][:, l], minlength=T.size)

    # ------------------------------------------------------------ after a pass
    def end_pass(self, new_g, new_alpha, new_kappa, ok, comm=None, typical: float = 0.0) -> dict:
        """Solve d, impose the constraints; returns the changes and the map corrections.

        Returns dict(factor: multiply the merged map by it (overall scale),
        ring_factor: None or (N_RINGS,) multipliers of the map at the ring
        centres (the radial static absorption; NaN: ring without data),
        offset_shift: (n_c,) node values to add to the merged map as a function
        of |s| (the mean offset moved into the map), change: largest relative
        change of any term: g, a relative (max over nodes and stills), d
        relative (see :meth:`_detector_change`), c relative to ``typical``,
        a typical merged intensity).
        """
        ok = np.asarray(ok, dtype=bool)
        old = (self.g.copy(), self.alpha.copy(), self.kappa.copy(),
               None if self.det is None else self.det.copy())
        g, alpha, kappa = new_g.copy(), new_alpha.copy(), new_kappa.copy()
        ring_factor, a_static = None, None
        if self.n_a and ok.any():
            if comm is not None and comm.Get_size() > 1:
                from mpi4py import MPI

                for arr in (self._aS, self._a_log, self._a_count):
                    comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
            # static absorption: geometric mean over stills, per node. Its radial
            # part (a function of |s| alone) is the map's radial profile: moved
            # there exactly, (a, I_ref, c) -> (a/rho, rho·I_ref, rho·c); the rest
            # belongs to d (with a detector term), or stays in a (without one)
            log_m = np.mean(np.log(np.maximum(alpha[ok], 1e-6)), axis=0)
            S = self._aS
            cols, rows = S.sum(axis=0), S.sum(axis=1)

            def radial(log_nodes):  # (ring values, their value at each node)
                lr = np.zeros(N_RINGS)
                lr[cols > 0] = (S[:, cols > 0].T @ log_nodes) / cols[cols > 0]
                ln = np.zeros(self.n_a)
                ln[rows > 0] = (S[rows > 0] @ lr) / rows[rows > 0]
                return lr, ln

            log_rho, log_node = radial(log_m)
            ring_factor = np.exp(log_rho)
            have_rings = cols > 0
            if self.n_c:
                s_nodes = np.linspace(0.0, self.s_max, self.n_c)
                kappa *= np.exp(np.interp(s_nodes, self.ring_centres()[have_rings], log_rho[have_rings]))
            if self.n_d:
                # no static absorption at all (docs/merge.md, "a ↔ d"): the static part
                # held by the detector equations of this pass (the fits before relax)
                # goes to d through those equations (_solve_detector)
                alpha[ok] /= np.exp(log_m)
                if self._a_count[0] > 0:
                    log_fit = self._a_log / self._a_count[0]
                    a_static = log_fit - radial(log_fit)[1]
            else:
                alpha[ok] /= np.exp(log_node)
            ring_factor = np.where(have_rings, ring_factor, np.nan)
        if self.n_a:
            self._aS = np.zeros_like(self._aS)
            self._a_log = np.zeros_like(self._a_log)
            self._a_count = np.zeros(1)
        if self.n_d:
            if comm is not None and comm.Get_size() > 1:
                from mpi4py import MPI

                for arr in (self._dN, self._db, self._dT, self._dS):
                    comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
            det = self._solve_detector(None if a_static is None else self._dT @ a_static)
            info = np.einsum("pkk->pk", self._dN.reshape(len(self.det), self.n_d, self.n_d))
            if self.relax_detector and old[3] is not None:
                # damped update (see DETECTOR_OWN_SHARE); the fixed point is unchanged
                det = np.exp(DETECTOR_OWN_SHARE * np.log(np.maximum(old[3], 1e-6))
                             + (1 - DETECTOR_OWN_SHARE) * np.log(np.maximum(det, 1e-6)))
            have = info > 0
            k_d = float(np.sum(info[have] * det[have]) / np.sum(info[have])) if have.any() else 1.0
            det /= k_d
            g *= k_d
            self.det = det
            self._reset_detector_sums()
        if self.n_a:
            r = alpha.mean(axis=1, keepdims=True)  # mean-one per surface, exactly
            r[~(r > 0)] = 1.0
            alpha /= r
            g *= r
        k = normalisation(g, ok)
        g /= k
        kappa *= k
        shift = np.zeros(self.n_c)
        if self.n_c and ok.any():
            shift = kappa[ok].mean(axis=0)
            kappa[ok] -= shift
        # failed fits keep their previous values (renormalised)
        g[~ok], alpha[~ok], kappa[~ok] = old[0][~ok] / k, old[1][~ok], old[2][~ok] * k
        change = float(np.max(np.abs(g / old[0] - 1.0))) if g.size else 0.0
        if self.n_a:
            change = max(change, float(np.max(np.abs(alpha / old[1] - 1.0))))
        if self.n_d and old[3] is not None:
            change = max(change, self._detector_change(old[3], info))
        if self.n_c and typical > 0:
            change = max(change, float(np.max(np.abs(kappa - old[2]))) / typical)
        self.g, self.alpha, self.kappa = g, alpha, kappa
        return {"factor": k, "offset_shift": shift, "change": change, "ring_factor": ring_factor}

    def _detector_change(self, old: np.ndarray, info: np.ndarray) -> float:
        """Largest over panels of the information-weighted rms relative change of d's nodes.

        Weights: the diagonal of d's normal matrix (Σ w·h²·B_n², how strongly the
        observations fix each node). Nodes outside the observed pixels (e.g. the
        detector corners beyond d_min) are set by the priors alone, move with
        every change elsewhere and do not alter the map; by the max over nodes
        they kept the passes from stopping.
        """
        rel = self.det / old - 1.0
        out = 0.0
        for p in range(len(rel)):
            w = info[p]
            if np.sum(w) > 0:
                out = max(out, float(np.sqrt(np.sum(w * rel[p] ** 2) / np.sum(w))))
        return out

    def _solve_detector(self, static_rhs=None) -> np.ndarray:
        """d from this pass's normal equations N d = b, with its priors and the ring constraint.

        ``static_rhs`` (P·m,): Σ w·h·I·ā·B_d, the change of b when the static
        absorption ā (log, per pixel) of the fits is moved from a into d
        (h → h·e^(−ā), so the targets I/h → I/h·e^ā, to first order in ā):
        d is then the least-squares response for absorption surfaces without
        a static part, and where a node has little data its priors hold it
        (docs/merge.md, "a ↔ d").

        Ring constraint: with a fixed detector and wavelength each pixel sees
        one |s|, so a response that depends on |s| alone cannot be told from
        the map's radial profile: it is left to the map (and to diffuse.correct's
        multipliers). The mean of d over each |s| ring (information-weighted
        over the nodes) is held at 1.
        """
        P, m = len(self.panel_shapes), self.n_d
        N = self._dN.reshape(P, m, m)
        b = self._db if static_rhs is None else self._db + static_rhs
        b = b.reshape(P, m)
        pen = _grid_penalty(self.detector.n_nodes)
        # ring constraint: stiff penalty k·Σ_r (l_rᵀd − 1)², solved by Woodbury around the panel blocks
        S = self._dS
        cols = S.sum(axis=0)
        L = S[:, cols > 0] / cols[cols > 0]
        tr_all = float(np.trace(N, axis1=1, axis2=2).sum())
        k = GAUGE_WEIGHT * tr_all / max(P * m, 1)
        x = self.det.reshape(-1).copy()
        Y = np.zeros_like(L)
        solved = np.zeros(P * m, dtype=bool)
        lifts = detector_floor(N, self.detector.n_nodes, DETECTOR_INFORMATION_FLOOR)
        for p in range(P):
            tr = np.trace(N[p])
            if not tr > 0:
                continue  # no data on this panel: keep
            # nodes the data barely see (beyond d_min, a panel edge): held at 1 by the
            # missing information, instead of extrapolated by the curvature prior
            lift = lifts[p]
            M = (N[p] + self.detector.smoothness * tr / np.trace(pen) * pen + RIDGE * tr / m * np.eye(m)
                 + np.diag(lift))
            blk = slice(p * m, (p + 1) * m)
            rhs = b[p] + RIDGE * tr / m * self.det[p] + lift
            sol = np.linalg.solve(M, np.column_stack([rhs, L[blk]]))
            x[blk], Y[blk] = sol[:, 0], sol[:, 1:]
            solved[blk] = True
        if L.shape[1] and k > 0:
            # (M + k L Lᵀ)⁻¹(b + k L 1) = x + Y z with z = (I/k + LᵀY)⁻¹ (1 − Lᵀx)
            z = np.linalg.solve(np.eye(L.shape[1]) / k + L.T @ Y, np.ones(L.shape[1]) - L.T @ x)
            x[solved] += (Y @ z)[solved]
        return x.reshape(P, m)

    def offset_at(self, nodes: np.ndarray, d_star: np.ndarray) -> np.ndarray:
        """Piecewise-linear offset with node values ``nodes`` at d* (Å⁻¹)."""
        j, f = _linear_weights(np.asarray(d_star) / self.s_max, self.offset.n_nodes)
        return nodes[j] * (1 - f) + nodes[j + 1] * f

    def as_dict(self) -> dict:
        out = {"terms": [t for t, n in (("absorption", self.n_a), ("detector", self.n_d),
                                        ("offset", self.n_c)) if n]}
        if self.n_a:
            out["absorption_grid"] = {"n_nodes": self.absorption.n_nodes, "u_range": list(self.uv_range[:2]),
                                      "v_range": list(self.uv_range[2:]),
                                      "smoothness": self.absorption.smoothness}
        if self.n_d:
            out["detector"] = {"n_nodes": self.detector.n_nodes, "smoothness": self.detector.smoothness,
                               "panel_shapes": self.panel_shapes.tolist(), "nodes": self.det.tolist()}
        if self.n_c:
            out["offset_grid"] = {"n_nodes": self.offset.n_nodes, "d_star_max": self.s_max,
                                  "smoothness": self.offset.smoothness}
        out["neighbour_prior"] = self.neighbour_prior
        return out
