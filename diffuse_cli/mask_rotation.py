"""Bragg masks of rotation frames: the fitted peak model and the mosaic φ-extent rule.

The default, each lattice point's own predicted spot, is in :mod:`diffuse_cli.mask_spots`.
See docs/bragg_mask.md (Rotation frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli.extraction import DetectorGeometry
from diffuse_cli.mask_bragg import (BraggShape, _absent, _hkl_key, _profile_sigma_m, pixel_q_chunks,
                                   predicted_bragg_mask, store_chunk)


def rotation_bragg_mask(
    geometry: DetectorGeometry,
    experiment,
    array_index: int,
    shape: BraggShape,
    n_sigma_m: float,
    select: np.ndarray | None = None,
) -> np.ndarray:
    """True on Bragg pixels (flat) of one rotation frame, from the rotation geometry.

    A lattice point h is recorded on frame a when it crosses the Ewald sphere
    at an angle φ_h in [φ_start − n·σ_m/|ζ|, φ_end + n·σ_m/|ζ|] (σ_m: the
    profile model's mosaicity; ζ = ê1·m2, ê1 = ŝ1×ŝ0/|ŝ1×ŝ0|, DIALS's
    factor, taken at each pixel: DIALS's own foreground φ extent; near the
    rotation axis a reflection takes many frames to cross), capped at the
    scan's length, on the pixels within ``shape.radius`` (Å⁻¹, tangential)
    of its crossing point. The range is swept in steps Δφ small
    enough that a lattice point moves at most radius/2 per step
    (Δφ = radius / max|q|); at each step a point counts as crossing when
    |ε| ≤ |G|·Δφ/2, so each crossing falls in one step. The stills
    excitation estimate (shape.excitation) is not used.
    """
    from diffuse_cli.frames import FrameRef

    frames = FrameRef.from_experiment(experiment)
    sigma_m = _profile_sigma_m(experiment)
    if sigma_m is None:
        raise Sorry("Rotation frames need a gaussian_rs profile model (sigma_m) for the Bragg mask")
    width = np.deg2rad(abs(frames.width_deg))
    s0 = np.asarray(geometry.s0, dtype=np.float32)
    # per-pixel φ half-extent beyond the frame (in frames): n·σ_m/|ζ|
    e1 = np.cross(geometry.s1, s0)
    m2 = np.asarray(experiment.goniometer.get_rotation_axis(), dtype=np.float32)
    zeta = np.abs(e1 @ m2) / np.maximum(np.sqrt(np.einsum("ij,ij->i", e1, e1)), 1e-12)
    pad_px = np.minimum(n_sigma_m * sigma_m / width / np.maximum(zeta, 1e-6), frames.n_frames)
    usable = np.ones(geometry.n_pixels, dtype=bool) if select is None else select
    pad = float(pad_px[usable].max()) if usable.any() else 0.0
    z0, z1 = array_index - pad, array_index + 1.0 + pad
    q2 = sum((geometry.s1[:, i] - s0[i]) ** 2 for i in range(3))
    q_max = float(np.sqrt(max(float(q2.max()), 1e-12)))
    step = shape.radius / q_max / width  # frames per step
    n_steps = max(1, int(np.ceil((z1 - z0) / step)))
    dz = (z1 - z0) / n_steps
    crossing = BraggShape(0.0, shape.radius, shape.shape, shape.source, shape.n_reflections,
                          0.5 * dz * width * 1.05)
    sg = experiment.crystal.get_space_group()
    out = np.zeros(geometry.n_pixels, dtype=bool)
    for z in z0 + (np.arange(n_steps) + 0.5) * dz:
        # frames from this step's φ to frame a, less the step's own half-width
        beyond = max(array_index - z, z - (array_index + 1.0), 0.0) - 0.5 * dz
        sel = usable & (pad_px >= beyond) if beyond > 0 else usable
        if not sel.any():
            continue
        M = frames.setting_matrix(experiment.crystal, experiment.goniometer, z)
        out |= predicted_bragg_mask(geometry, M, sg, crossing, select=sel)
    return out


@dataclass
class PeakModel:
    """A Bragg peak shape in fractional-hkl offset space, fitted to the observed spots.

    Offsets Δh = h − rint(h) (h = M⁻¹q, M the setting matrix at the centre of
    the pixel's frame, as diffuse.extract indexes pixels). The peak's excess
    over the diffuse background is modelled as A·exp(−d²/2) with
    d² = (Δh − center)ᵀ covariance⁻¹ (Δh − center), mdx2's Gaussian peak model;
    a pixel is Bragg when d <= n for its lattice point: ``n_sigma_of[i]`` for
    the lattice point with key ``hkl_keys[i]`` (:func:`_hkl_key`, sorted), else
    ``n_sigma``. Derived (:func:`fit_peak_model`): n² = 2·ln(R / f), R the
    peak excess over the local background, f = background_fraction: the mask
    ends where the peak has fallen to f of the diffuse background.
    """

    center: np.ndarray
    covariance: np.ndarray
    n_sigma: float
    n_spots: int = 0
    n_pixels: int = 0
    peak_to_background: float = float("nan")
    background_fraction: float = float("nan")
    source: str = "fitted"
    hkl_keys: np.ndarray | None = None
    n_sigma_of: np.ndarray | None = None
    peak_per_photon: float = float("nan")

    def n_sigma_at(self, keys: np.ndarray) -> np.ndarray:
        """Mask radius (sigmas) of the lattice points with these :func:`_hkl_key` keys."""
        n = np.full(keys.shape, self.n_sigma, dtype=np.float64)
        if self.hkl_keys is not None and self.hkl_keys.size:
            i = np.clip(np.searchsorted(self.hkl_keys, keys), 0, self.hkl_keys.size - 1)
            found = self.hkl_keys[i] == keys
            n[found] = self.n_sigma_of[i[found]]
        return n

    def as_dict(self) -> dict:
        return {
            "model": "fitted",
            "center_hkl": [float(v) for v in self.center],
            "covariance_hkl": np.asarray(self.covariance, dtype=float).tolist(),
            "sigma_hkl": [float(v) for v in np.sqrt(np.diag(self.covariance))],
            "n_sigma": self.n_sigma,
            "n_spots": self.n_spots,
            "n_pixels": self.n_pixels,
            "peak_to_background": self.peak_to_background,
            "background_fraction": self.background_fraction,
            "source": self.source,
            "peak_per_photon": self.peak_per_photon,
            "n_reflections": 0 if self.n_sigma_of is None else int(self.n_sigma_of.size),
            "n_sigma_of_reflections_percentiles_5_50_95": (
                None if self.n_sigma_of is None or not self.n_sigma_of.size
                else [float(v) for v in np.percentile(self.n_sigma_of, [5, 50, 95])]
            ),
        }


def filled_panels(counts: np.ndarray, valid: np.ndarray, geometry: DetectorGeometry) -> list[np.ndarray]:
    """Per panel, the counts as a float32 (n_slow, n_fast) image, invalid pixels set to the panel's median."""
    off = geometry.panel_offsets
    images = []
    for i, shape in enumerate(geometry.panel_shapes):
        sl = slice(off[i], off[i + 1])
        c = counts[sl].astype(np.float32)
        ok = valid[sl]
        c[~ok] = np.median(c[ok]) if ok.any() else 0.0
        images.append(c.reshape(tuple(int(v) for v in shape)))
    return images


#: histogram bins of :func:`_window_rank_py` (counts 0 .. 4095)
_RANK_BINS = 4096


def _window_rank_py(image, rows, cols, size, rank, out):
    """Numba kernel of :func:`local_background` at given pixels: the value of ``rank`` (0-based)
    of the size² window at each (row, col) of ``image``, its edges clamped (scipy's "nearest"),
    the window centred as median_filter's (origin 0). Rank 0: the minimum.

    A window of whole counts 0 .. _RANK_BINS − 1 up to that rank is ranked by a
    histogram of its values (exact for whole numbers, a few times np.partition's
    speed); any other (a fraction, a negative value, a rank among larger
    counts) by np.partition, as the numpy path does.
    """
    ny, nx = image.shape
    lo = size // 2
    hist = np.zeros(_RANK_BINS, dtype=np.int32)
    buf = np.empty(size * size, dtype=image.dtype)
    ys = np.empty(size, dtype=np.int64)
    xs = np.empty(size, dtype=np.int64)
    for k in range(rows.size):
        for d in range(size):
            ys[d] = min(max(rows[k] - lo + d, 0), ny - 1)
            xs[d] = min(max(cols[k] - lo + d, 0), nx - 1)
        x0 = cols[k] - lo
        if rank == 0 and x0 >= 0 and x0 + size <= nx:  # the minimum, of whole rows of the window
            least = image[ys[0], x0]
            for dy in range(size):
                least = min(least, image[ys[dy], x0 : x0 + size].min())
            out[k] = least
            continue
        m = 0
        for dy in range(size):  # the window, edges clamped, into buf
            row = image[ys[dy]]
            for dx in range(size):
                buf[m] = row[xs[dx]]
                m += 1
        if rank == 0:
            out[k] = buf.min()
            continue
        whole = True
        top = 0
        for j in range(m):
            v = buf[j]
            if v >= 0.0 and v < _RANK_BINS:
                iv = int(v)
                if iv != v:
                    whole = False
                hist[iv] += 1
                top = max(top, iv)
            elif not v >= _RANK_BINS:  # negative, or NaN
                whole = False
        value = -1
        if whole:
            seen = 0
            for j in range(top + 1):
                seen += hist[j]
                if seen > rank:
                    value = j
                    break
        hist[: top + 1] = 0
        out[k] = value if value >= 0 else np.partition(buf, rank)[rank]


_RANK_KERNEL: list = []


def _window_rank_kernel():
    """The compiled :func:`_window_rank_py` (numba, loaded at the first call), or None without numba."""
    if not _RANK_KERNEL:
        from diffuse_cli.image_read import numba

        _RANK_KERNEL.append(None if numba is None else numba.njit(nogil=True, cache=True)(_window_rank_py))
    return _RANK_KERNEL[0]


def local_background(counts: np.ndarray, valid: np.ndarray, geometry: DetectorGeometry, size: int,
                     at: np.ndarray | None = None, filled: list[np.ndarray] | None = None) -> np.ndarray:
    """Diffuse background per pixel (counts, flat): median over a ``size``² square, per panel.

    Invalid pixels take the panel median first. A spot covering fewer than
    half the square does not move the median. at: flat pixel indices; when
    given, the median is taken at those pixels only (the same values, for a
    few strong pixels at a fraction of the cost of the whole-frame filter).
    filled: :func:`filled_panels` of these counts, when the caller has them.
    """
    from scipy.ndimage import median_filter

    off = geometry.panel_offsets
    if at is not None:
        at = np.asarray(at, dtype=np.int64)
        out = np.empty(len(at), dtype=np.float32)
    else:
        out = np.empty(counts.shape, dtype=np.float32)
    if filled is None:
        filled = filled_panels(counts, valid, geometry)
    for i, image in enumerate(filled):
        sl = slice(off[i], off[i + 1])
        if at is None:
            out[sl] = median_filter(image, size=size, mode="nearest").ravel()
            continue
        mine = np.flatnonzero((at >= off[i]) & (at < off[i + 1]))
        if not len(mine):
            continue
        kernel = _window_rank_kernel()
        if kernel is not None:
            r, col = np.divmod(at[mine] - off[i], image.shape[1])
            values = np.empty(len(mine), dtype=np.float32)
            kernel(np.ascontiguousarray(image, dtype=np.float32), r, col, int(size), size * size // 2, values)
            out[mine] = values
            continue
        # scipy's "nearest" mode is numpy's "edge" padding; the window of an
        # odd size is centred as median_filter's is (origin 0)
        lo = size // 2
        windows = np.lib.stride_tricks.sliding_window_view(
            np.pad(image, ((lo, size - 1 - lo), (lo, size - 1 - lo)), mode="edge"), (size, size))
        r, col = np.divmod(at[mine] - off[i], image.shape[1])
        for start in range(0, len(mine), 65536):  # bounded memory: 65536 windows of size²
            part = slice(start, start + 65536)
            w = windows[r[part], col[part]].reshape(-1, size * size)
            # rank size²//2, as median_filter takes it (no mean of two for an even count)
            out[mine[part]] = np.partition(w, size * size // 2, axis=1)[:, size * size // 2]
    return out


def peak_observations(geometry: DetectorGeometry, experiment, array_index: int, counts: np.ndarray,
                      valid: np.ndarray, strong: np.ndarray, background_size: int = 9,
                      reflections=None) -> dict:
    """Strong pixels of one rotation frame in fractional-hkl offset space.

    strong: the frame's spot pixels (flat bool, e.g. :func:`strong_pixel_mask`
    without dilation). reflections: (miller indices (N, 3), centroid z (N,))
    of DIALS's integrated reflections; when given, only pixels nearest a
    lattice point that DIALS integrated with its centroid on this frame or a
    neighbour are kept (a strong diffuse feature is not a Bragg spot).
    Returns ``dh`` (N, 3) = h − rint(h) at the frame centre, ``excess``
    (counts above the :func:`local_background`), ``background`` and ``spot``
    (one int64 key per frame and lattice point). Pixels nearest 000 or a
    systematically absent lattice point are left out.
    """
    from diffuse_cli.frames import FrameRef

    idx = np.flatnonzero(strong & valid)
    frames = FrameRef.from_experiment(experiment)
    M = frames.setting_matrix(experiment.crystal, experiment.goniometer, float(array_index) + 0.5)
    q = geometry.s1[idx].astype(np.float64) - np.asarray(geometry.s0, dtype=np.float64)
    h = q @ np.linalg.inv(M).T
    H = np.rint(h).astype(np.int64)
    keep = np.any(H != 0, axis=1)
    if reflections is not None:
        hkl, z = reflections
        near = np.abs(frames.array_index_of_z(z) - int(array_index)) <= 1
        keep &= np.isin(_hkl_key(H), _hkl_key(np.asarray(hkl, dtype=np.int64)[near]))
    if keep.any():
        keep[keep] = ~_absent(H[keep], experiment.crystal.get_space_group())
    idx, h, H = idx[keep], h[keep], H[keep]
    background = local_background(counts, valid, geometry, background_size, at=idx).astype(np.float64)
    excess = np.maximum(counts[idx].astype(np.float64) - background, 0.0)
    # a spot is one lattice point on one frame: key (array index, hkl key)
    return {"dh": h - H, "excess": excess, "background": background,
            "spot": np.stack([np.full(len(H), int(array_index), dtype=np.int64), _hkl_key(H)], axis=1)}


def fit_peak_model(observations: list[dict], n_sigma: float | None = None, background_fraction: float = 0.1,
                   outlier_sigma: float = 3.0, min_spots: int = 20, reflections: dict | None = None) -> PeakModel:
    """The peak model (:class:`PeakModel`) of a sweep from its frames' :func:`peak_observations`.

    Each spot (one lattice point on one frame) has unit weight, shared among
    its pixels in proportion to their excess counts, so the centre and the
    covariance are the mean, over spots, of each spot's first and second
    moments about its lattice point: the spot's profile, not the extent of its
    pixels above a threshold. Pixels beyond ``outlier_sigma`` of a first fit
    are dropped and the fit is repeated once (mdx2's rejection); the
    covariance is then divided by P(χ²₅ < c²)/P(χ²₃ < c²) (c =
    outlier_sigma), the narrowing that cut gives a Gaussian. Unless given,
    n_sigma = sqrt(2·ln(R/background_fraction)), R the median over spots of
    peak excess / local background at the peak (background at least 1 count).

    reflections: DIALS's integrated reflections of the sweep, ``{"key":
    _hkl_key(hkl), "intensity": I (counts), "background": mean background per
    pixel (counts)}``. Each gets its own radius from its own peak height: R_i =
    k·I_i / b_i with k = the median, over the fitted spots of those
    reflections, of the spot's highest peak excess (over frames) / I_i; n_i =
    sqrt(2·ln(max(R_i / f, 1))). Other lattice points keep n_sigma.
    """
    dh = np.concatenate([o["dh"] for o in observations]) if observations else np.zeros((0, 3))
    excess = np.concatenate([o["excess"] for o in observations]) if observations else np.zeros(0)
    background = np.concatenate([o["background"] for o in observations]) if observations else np.zeros(0)
    spot = np.concatenate([o["spot"] for o in observations]) if observations else np.zeros((0, 2), np.int64)
    good = excess > 0
    dh, excess, background, spot = dh[good], excess[good], background[good], spot[good]
    _, inverse = np.unique(spot, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    n_spots = int(inverse.max()) + 1 if inverse.size else 0
    if n_spots < min_spots:
        raise Sorry(
            f"Only {n_spots} spots to fit the Bragg peak model (predicted.fit.min_spots={min_spots}); "
            "set predicted.peak_model=mosaic"
        )

    def moments(sel):
        inv = np.unique(inverse[sel], return_inverse=True)[1].ravel()
        n = int(inv.max()) + 1
        w = excess[sel] / np.bincount(inv, excess[sel], n)[inv] / n
        mean = w @ dh[sel]
        d = dh[sel] - mean
        return mean, (w[:, None] * d).T @ d, n

    center, cov, _ = moments(np.ones(dh.shape[0], dtype=bool))
    d = dh - center
    inlier = np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d) <= outlier_sigma**2
    center, cov, n_spots = moments(inlier)
    # undo the cut's narrowing: for a Gaussian, E[d²; d < c] / P(d < c) = 3·P(χ²₅ < c²)/P(χ²₃ < c²)
    from scipy.stats import chi2

    cov = cov * (chi2.cdf(outlier_sigma**2, 3) / chi2.cdf(outlier_sigma**2, 5))
    ratio = excess[inlier] / np.maximum(background[inlier], 1.0)
    peak = np.zeros(n_spots)
    inv = np.unique(inverse[inlier], return_inverse=True)[1].ravel()
    np.maximum.at(peak, inv, ratio)
    R = float(np.median(peak))
    source = "user" if n_sigma is not None else "fitted"
    keys = n_of = None
    k = float("nan")
    if n_sigma is None:
        n_sigma = float(np.sqrt(2.0 * np.log(max(R / background_fraction, 1.0))))
        if reflections is not None and len(reflections["key"]):
            # the highest peak excess of each lattice point over its frames
            hkl_of_spot = np.zeros(n_spots, dtype=np.int64)
            hkl_of_spot[inv] = spot[inlier][:, 1]
            peak_excess = np.zeros(n_spots)
            np.maximum.at(peak_excess, inv, excess[inlier])
            order = np.argsort(hkl_of_spot, kind="stable")
            uniq, first = np.unique(hkl_of_spot[order], return_index=True)
            best = np.maximum.reduceat(peak_excess[order], first)
            rk, ri = reflections["key"], np.asarray(reflections["intensity"], dtype=np.float64)
            rb = np.maximum(np.asarray(reflections["background"], dtype=np.float64), 1.0)
            j = np.searchsorted(uniq, rk)
            j = np.clip(j, 0, max(uniq.size - 1, 0))
            matched = (uniq.size > 0) & (uniq[j] == rk) & (ri > 0)
            if matched.sum() >= min_spots:
                k = float(np.median(best[j[matched]] / ri[matched]))
                order = np.argsort(rk)
                keys = rk[order]
                R_i = k * np.maximum(ri[order], 0.0) / rb[order]
                n_of = np.sqrt(2.0 * np.log(np.maximum(R_i / background_fraction, 1.0)))
    return PeakModel(center, cov, float(n_sigma), n_spots, int(inlier.sum()), R, float(background_fraction), source,
                     keys, n_of, k)


def fitted_bragg_mask(geometry: DetectorGeometry, M: np.ndarray, space_group, model: PeakModel,
                      select: np.ndarray | None = None) -> np.ndarray:
    """True on Bragg pixels (flat) of one frame with setting matrix M (frame centre): d <= n.

    d is the Mahalanobis distance of the pixel's Δh = M⁻¹q − rint(M⁻¹q) from
    the peak model's centre and n its lattice point's radius
    (:meth:`PeakModel.n_sigma_at`); 000 and systematically absent lattice
    points are never Bragg.
    """
    M = np.asarray(M, dtype=np.float64).reshape(3, 3)
    M_inv = np.linalg.inv(M)
    P = np.linalg.inv(np.asarray(model.covariance, dtype=np.float64))
    f32 = np.float32
    n_max = model.n_sigma if model.n_sigma_of is None or not model.n_sigma_of.size else max(
        model.n_sigma, float(model.n_sigma_of.max()))
    n2 = f32(n_max**2)
    out = np.zeros(geometry.n_pixels, dtype=bool)
    for sl, idx, _, q in pixel_q_chunks(geometry, select):
        x = [q[0] * f32(M_inv[j, 0]) + q[1] * f32(M_inv[j, 1]) + q[2] * f32(M_inv[j, 2]) for j in range(3)]
        h = [np.rint(v) for v in x]
        d = [x[j] - h[j] - f32(model.center[j]) for j in range(3)]
        d2 = sum(f32(P[i, j]) * d[i] * d[j] for i in range(3) for j in range(3))
        hit = (d2 <= n2) & ((h[0] != 0) | (h[1] != 0) | (h[2] != 0))
        cand = np.flatnonzero(hit)
        if cand.size:
            hkl = np.stack([h[j][cand] for j in range(3)], axis=1).astype(np.int64)
            hit[cand[(d2[cand] > model.n_sigma_at(_hkl_key(hkl)) ** 2) | _absent(hkl, space_group)]] = False
        store_chunk(out, sl, idx, hit)
    return out
