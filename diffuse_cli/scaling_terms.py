"""The full scaling model (``scaling.model=full``): absorption, detector response and offset terms.

Formulas, priors and constraints: docs/merge.md, "Scaling". The per-still
scale g and the robust fit it extends are in :mod:`diffuse_cli.scaling`; the node
bases and priors of the terms in :mod:`diffuse_cli.scaling_priors`, the detector
response's normal equations in :mod:`diffuse_cli.detector_response`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffuse_cli.scaling import (HUBER_K, POISSON_OUTLIER_CUT, FitResult, ScaleModel, _robust_scale,
                                 model_variance, normalisation)
from diffuse_cli.scaling_kernels import _median
from diffuse_cli.detector_response import DetectorResponse
from diffuse_cli.scaling_priors import (GAUGE_WEIGHT, N_RINGS, RIDGE, _bilinear, _dense, _grid_penalty,
                                        _linear_weights, _second_differences, offset_prior)

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

# Share of the previous detector response kept in each pass (d = d_prev^s · d_solved^(1−s)).
# Fitted against the other stills (leave_one_out), d at a pixel is corrected from the
# pixels of other stills that saw the same voxels, which lie on the same |s| ring; where
# a ring crosses the detector in two separate arcs (the outer corners), the ring
# constraint leaves their difference, which flips sign every pass. A share s maps an
# iteration eigenvalue λ to s + (1 − s)λ, stable for s > (−1 − λ)/(1 − λ); the real
# nuclease sweep has λ ≈ −2.6 (s = 1/3 diverged there), so s = 2/3 (docs/merge.md).
DETECTOR_OWN_SHARE = 2.0 / 3.0
# Least share of an offset mode's information that must survive the multiplicative terms
# (offset_prior): the identifiability prior weight of the additive offset, docs/merge.md.
OFFSET_INFORMATION_FLOOR = 0.02


@dataclass(frozen=True)
class TermSettings:
    """One optional term: on/off, nodes per axis, smoothness prior weight."""

    enable: bool = False
    n_nodes: int = 5
    smoothness: float = 1.0


class ScalingTerms(DetectorResponse):
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
