"""The detector response term d of the full scaling model (:class:`diffuse_cli.scaling_terms.ScalingTerms`;
docs/merge.md, "Scaling"): shared by all stills, its normal equations are accumulated
during a pass (:meth:`DetectorResponse._add_detector`) and solved after it with its
priors and the |s| ring constraint (:meth:`DetectorResponse._solve_detector`).
:class:`DetectorResponse` is a base of ScalingTerms and uses its state (panel_shapes,
n_d, n_a, det, detector, _ring).
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.scaling_priors import GAUGE_WEIGHT, N_RINGS, RIDGE, _grid_penalty, detector_floor

# Least information of a detector node (diagonal of d's normal matrix) as a share of what
# it would hold if the data covered its support like the average node: a node below it
# gets a prior towards 1 that makes up the difference (detector_floor, docs/merge.md).
DETECTOR_INFORMATION_FLOOR = 0.1


class DetectorResponse:
    """The detector response's normal equations (a base of ScalingTerms)."""

    def _reset_detector_sums(self):
        P, m = len(self.panel_shapes), self.n_d
        self._dN = np.zeros(P * m * m)
        self._db = np.zeros(P * m)
        self._dT = np.zeros((P * m, max(self.n_a, 1)))
        self._dS = np.zeros((P * m, N_RINGS))

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
