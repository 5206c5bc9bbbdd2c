"""The control of the scaling passes of :func:`diffuse_cli.merging.scale_and_merge`:
Anderson acceleration of the scales (:class:`PassAcceleration`), the start of the
outlier-rejection phase, the rejection limits, the reference carried over voxels
whose observations were all rejected, and the per-pass gather of the scales over
MPI ranks (docs/merge.md, "Acceleration" and "Outlier rejection").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from diffuse_cli.merge_accumulator import MergedMap
from diffuse_cli.scaling import normalisation

ACCELERATION_MEMORY = 5  # passes of history for the Anderson step (0: plain damped passes)
ACCELERATION_STEP_LIMIT = 10.0  # most the extrapolation may add, in units of the plain step
ACCELERATION_START_RATIO = 0.5  # accelerate once a pass's change falls by less than this factor


def _carry_rejected(new_I, new_sigma, new_counts, old_I, old_sigma, old_counts):
    """The next pass's reference: the new means, and, at voxels whose every observation
    this pass rejected as an outlier, the previous reference's values.

    Without it such a voxel (e.g. pixels at the beam-stop edge, mutually inconsistent)
    has no reference in the next pass, keeps all its observations, is rejected again in
    the one after, and so on: the final map would depend on the parity of the pass count.
    With it the rejection is the same in every pass (the voxel stays empty in the map).
    Returns (I, sigma, counts) arrays.
    """
    lost = (np.asarray(new_counts) == 0) & (np.asarray(old_counts) > 0)
    if not lost.any():
        return new_I, new_sigma, new_counts
    I, sig, cnt = np.array(new_I), np.array(new_sigma), np.array(new_counts)
    I[lost], sig[lost], cnt[lost] = np.asarray(old_I)[lost], np.asarray(old_sigma)[lost], np.asarray(old_counts)[lost]
    return I, sig, cnt


def _carried_map(merged: MergedMap, previous: MergedMap | None) -> MergedMap:
    """:func:`_carry_rejected` on merged maps (the reference of the next pass)."""
    if previous is None:
        return merged
    I, sig, cnt = _carry_rejected(merged.I, merged.sigma, merged.counts, previous.I, previous.sigma, previous.counts)
    return merged if I is merged.I else replace(merged, I=I, sigma=sig, counts=cnt)


def _phase_start(scaled, rejecting, change, tolerance, final):
    """Whether this pass starts phase 2 (docs/merge.md, "Outlier rejection"): the scales
    converged with Huber fits and no outlier rejection (or no pass is left); from this
    pass's map on outliers are rejected and the fits are redescending. Returns (start,
    the note for the pass's log line)."""
    start = scaled and not rejecting and (change < tolerance or final)
    return start, (" (phase 1 converged: outliers rejected from this map on)" if start else "")


def _reject_limit(fit, reject_sigma):
    """The outlier limit the previous pass applied to a still (None: none applied)."""
    return reject_sigma * fit.residual_scale if reject_sigma and fit is not None and fit.ok else None


def _gather_fits(comm, fits, mine, n_stills):
    """Every rank gets every still's fit (each rank sends only its own stills)."""
    parts = comm.allgather([(i, fits[i]) for i in mine])
    out = [None] * n_stills
    for part in parts:
        for i, f in part:
            out[i] = f
    return out


class PassAcceleration:
    """Anderson acceleration of the scaling passes on x = log g (docs/merge.md, "Acceleration").

    A pass maps the scales x_k its reference was built with to the damped
    leave-one-out update G(x_k), residual f_k = G(x_k) − x_k. With the
    differences ΔF, ΔG of the last ``memory`` passes' f and G, the next
    scales are x_{k+1} = G(x_k) − ΔG·γ, γ = argmin |f_k − ΔF·γ|₂ (Walker & Ni's
    type II, mixing 1): on a linear iteration this is GMRES, so a few slow
    modes (weakly coupled groups of stills) cost one pass each instead of
    log(tol)/log(λ) passes. The fixed point (f = 0) is the plain one.
    Every pass enters the history; accelerated steps start at the first pass
    whose change is more than ``start_ratio`` times the previous one (a slow
    mode; while the plain passes contract faster, an extrapolation from the
    nonlinear first passes gains nothing). Safeguard: when a pass's change
    is not below the previous pass's, the history is dropped and the plain
    step G(x_k) taken; the extrapolation beyond G(x_k) is at most
    ``step_limit`` × |f_k| (max norm).
    """

    def __init__(self, memory: int = ACCELERATION_MEMORY, step_limit: float = ACCELERATION_STEP_LIMIT,
                 start_ratio: float = ACCELERATION_START_RATIO):
        self.memory = int(memory)
        self.step_limit = float(step_limit)
        self.start_ratio = float(start_ratio)
        self.slow = False  # a pass's change fell by less than start_ratio: accelerate from now on
        self.history: list = []  # (G(x_j), f_j) in log, flattened
        self.last_change = np.inf
        self.n_accelerated = 0
        self.n_restarts = 0
        self.note = ""  # what the last step did, for the pass's log line

    def step(self, params: np.ndarray, plain: np.ndarray, ok: np.ndarray, change: float) -> np.ndarray | None:
        """The scales for this pass's map: ``params`` (n, n_nodes) built the reference, ``plain`` the
        pass's normalised damped update, ``change`` its max relative change. None: use ``plain``."""
        if self.memory <= 0:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.log(np.asarray(plain, dtype=np.float64)).ravel()
            f = g - np.log(np.asarray(params, dtype=np.float64)).ravel()
        self.note = ""
        if not (np.all(np.isfinite(f)) and change < self.last_change):
            if self.history and self.slow:
                self.n_restarts += 1
                self.note = " (change not reduced: plain step, acceleration restarted)"
            self.history = []  # not reduced (or a non-positive scale): start again from the plain step
        self.slow = self.slow or change > self.start_ratio * self.last_change
        self.last_change = change
        if not np.all(np.isfinite(f)):
            return None
        self.history = (self.history + [(g, f)])[-(self.memory + 1):]
        if len(self.history) < 2 or not self.slow:
            return None
        dG = np.stack([b[0] - a[0] for a, b in zip(self.history[:-1], self.history[1:])], axis=1)
        dF = np.stack([b[1] - a[1] for a, b in zip(self.history[:-1], self.history[1:])], axis=1)
        gamma = np.linalg.lstsq(dF, f, rcond=1e-6)[0]
        extra = -dG @ gamma
        size, limit = np.max(np.abs(extra)), self.step_limit * np.max(np.abs(f))
        if not np.isfinite(size):
            self.history = self.history[-1:]
            return None
        if size > limit:
            extra *= limit / size
        p = np.exp(g + extra).reshape(np.shape(plain))
        self.n_accelerated += 1
        self.note = (f" (this map: accelerated scales, {len(self.history) - 1} passes of history"
                     f"{', step limited' if size > limit else ''})")
        return p / normalisation(p, ok > 0)


def _gather_params(comm, new, ok, fits, mine, params, scaled: bool):
    """A pass's new per-still parameters and fits gathered over MPI ranks, and normalised
    (:func:`normalisation`). Returns (gathered, normalised, fits, normalisation factor,
    max relative change; inf on the unscaled first pass)."""
    if comm is not None and comm.Get_size() > 1:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, new, op=MPI.SUM)
        comm.Allreduce(MPI.IN_PLACE, ok, op=MPI.SUM)
        fits = _gather_fits(comm, fits, mine, len(fits))
    if not scaled:
        return new, new, fits, 1.0, np.inf
    norm = normalisation(new, ok > 0)
    normalised = new / norm
    return new, normalised, fits, norm, float(np.max(np.abs(normalised / params - 1.0)))


def _pass_scales(accelerate: PassAcceleration, memory: int, params, normalised, raw, ok, norm, scaled: bool,
                 rejecting: bool, change: float, tolerance: float, final: bool):
    """The scales a pass's map is built with, after its fits were gathered (:func:`_gather_params`):
    whether the pass starts phase 2 (:func:`_phase_start`; then a fresh :class:`PassAcceleration`
    with ``memory`` passes of history), whether it is the last, and, on other passes, the
    accelerated step (``raw`` = accelerated × ``norm``, the normalisation factor). Returns
    (normalised, raw, start, last, note for the log line, rejecting, accelerate)."""
    start, note = _phase_start(scaled, rejecting, change, tolerance, final)
    if start:  # the map and the fits change: the acceleration's history no longer applies
        rejecting, accelerate = True, PassAcceleration(memory)
    last = final or (scaled and change < tolerance and not start)
    if scaled and not last and not start:  # the last map takes the plain update
        accelerated = accelerate.step(params, normalised, ok, change)
        note = accelerate.note
        if accelerated is not None:
            normalised, raw = accelerated, accelerated * norm
    return normalised, raw, start, last, note, rejecting, accelerate
