"""Bragg masks of rotation frames from each lattice point's own predicted spot (``peak_model=spots``).

Each lattice point crosses the Ewald sphere at its own rotation angle; its
spot on a frame is a Gaussian of the measured angular width holding the
frame's share of an upper estimate of its counts, masked where it exceeds a
fraction of the local diffuse background. See docs/bragg_mask.md (Rotation
frames, ``peak_model=spots``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli.extraction import DetectorGeometry
from diffuse_cli.mask_bragg import _absent, _hkl_key, _profile_sigma_m
from diffuse_cli.mask_rotation import _window_rank_kernel, filled_panels, local_background

# |s1 − s0|² (Å⁻², float64) of every pixel of the last geometry seen: [ŝ1 array, (s0 bytes, λ), values]
_Q2: list = [None, None, None]


def _pixel_q2(geometry: DetectorGeometry) -> np.ndarray:
    """|q|² = |s1 − s0|² of every pixel (Å⁻², float64), computed once per detector and beam
    (the views of one detector share their ŝ1 array; a sweep's frames, one beam)."""
    s0 = np.asarray(geometry.s0, dtype=np.float64)
    beam = (s0.tobytes(), float(geometry.wavelength))
    if _Q2[0] is not geometry.s1_unit or _Q2[1] != beam:
        _Q2[:] = [geometry.s1_unit, beam, np.sum((geometry.s1.astype(np.float64) - s0) ** 2, axis=1)]
    return _Q2[2]


@dataclass
class SpotModel:
    """Each lattice point's own predicted spot on the frames of one sweep (``peak_model=spots``).

    keys / intensity: sorted :func:`_hkl_key` of DIALS's integrated
    reflections and an upper estimate of each full reflection's counts,
    (max(I, 0) + n_sigma_i·σ(I)) / partiality. shell_d_star (edges, Å⁻¹) and
    shell_intensity: for a lattice point without a reflection, the
    ``unknown_quantile`` of those estimates in its resolution shell.
    sigma: the spot's angular width on the detector (radians, one Gaussian σ
    per axis; diffuse.bragg_mask measures it, :func:`spot_profile_moments`);
    sigma_m: DIALS's mosaicity (radians). See docs/bragg_mask.md
    (``peak_model=spots``) and :func:`spot_bragg_mask`.
    """

    keys: np.ndarray
    intensity: np.ndarray
    shell_d_star: np.ndarray
    shell_intensity: np.ndarray
    sigma: float
    sigma_m: float
    background_fraction: float
    background_size: int = 9
    sigma_residual: float = 0.0

    def intensity_at(self, keys: np.ndarray, d_star: np.ndarray) -> np.ndarray:
        """Full-reflection counts (upper estimate) of the lattice points with these keys and d* (Å⁻¹)."""
        j = np.clip(np.searchsorted(self.shell_d_star, d_star, side="right") - 1, 0, self.shell_intensity.size - 1)
        out = self.shell_intensity[j].astype(np.float64)
        if self.keys.size:
            i = np.clip(np.searchsorted(self.keys, keys), 0, self.keys.size - 1)
            found = self.keys[i] == keys
            out[found] = self.intensity[i[found]]
        return out

    def as_dict(self) -> dict:
        return {
            "model": "spots",
            "sigma_deg": float(np.degrees(self.sigma)),
            "sigma_residual_deg": float(np.degrees(self.sigma_residual)),
            "sigma_m_deg": float(np.degrees(self.sigma_m)),
            "background_fraction": self.background_fraction,
            "n_reflections": int(self.keys.size),
            "shell_d_star": [float(v) for v in self.shell_d_star],
            "shell_intensity": [float(v) for v in self.shell_intensity],
        }


def spot_model(experiment, table, background_fraction: float = 0.1, n_sigma_i: float = 3.0,
               unknown_quantile: float = 0.9, n_shells: int = 10, min_partiality: float = 0.1,
               background_size: int = 9, sigma: float | None = None) -> SpotModel:
    """The :class:`SpotModel` of a sweep from its DIALS-integrated reflection table (one experiment's rows).

    Needs a gaussian_rs profile (σ_b, σ_m) and ``intensity.sum.value``/``variance``.
    sigma: the spot's angular σ (radians, :func:`spot_profile_moments`); without
    it, DIALS's σ_b and the centroid residual in quadrature, the residual being
    the rms over reflections of |xyzobs.px − xyzcal.px| (x, y) / √2 per axis, in
    radians through the pixel size over the distance.
    """
    sigma_m = _profile_sigma_m(experiment)
    profile = experiment.profile
    if sigma_m is None or not hasattr(profile, "sigma_b"):
        raise Sorry("peak_model=spots needs a gaussian_rs profile model (sigma_b, sigma_m) in the .expt")
    if table is None or "intensity.sum.value" not in table:
        raise Sorry("peak_model=spots needs the sweep's integrated reflections (intensity.sum.value) in the .refl")
    sigma_b = float(profile.sigma_b(deg=False))
    if "flags" in table:
        table = table.select(table.get_flags(table.flags.integrated_sum))
    I = table["intensity.sum.value"].as_numpy_array()
    V = np.maximum(table["intensity.sum.variance"].as_numpy_array(), 0.0)
    p = table["partiality"].as_numpy_array() if "partiality" in table else np.ones(len(I))
    full = (np.maximum(I, 0.0) + n_sigma_i * np.sqrt(V)) / np.maximum(p, min_partiality)
    hkl = np.array(table["miller_index"], dtype=np.int64).reshape(-1, 3)
    keys = _hkl_key(hkl)
    order = np.argsort(keys, kind="stable")
    keys, full_sorted = keys[order], full[order]
    # a lattice point recorded twice in the sweep: the larger
    uniq, first = np.unique(keys, return_index=True)
    full_u = np.maximum.reduceat(full_sorted, first) if uniq.size else np.zeros(0)
    d_star = 1.0 / np.maximum(table["d"].as_numpy_array(), 1e-6) if "d" in table else np.zeros(len(I))
    if len(I) < n_shells:
        raise Sorry(f"peak_model=spots: only {len(I)} integrated reflections for the resolution shells")
    edges = np.quantile(d_star, np.linspace(0, 1, n_shells + 1))
    edges[0], edges[-1] = 0.0, np.inf
    j = np.clip(np.searchsorted(edges, d_star, side="right") - 1, 0, n_shells - 1)
    shell = np.array([np.quantile(full[j == i], unknown_quantile) if np.any(j == i) else np.max(full)
                      for i in range(n_shells)])
    # centroid residuals (x, y), per axis, in radians
    panel = experiment.detector[0]
    px_rad = float(np.mean(panel.get_pixel_size())) / max(abs(panel.get_distance()), 1e-6)
    obs = np.array(table["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3) if "xyzobs.px.value" in table else None
    cal = np.array(table["xyzcal.px"], dtype=np.float64).reshape(-1, 3) if "xyzcal.px" in table else None
    sigma_res = 0.0
    if obs is not None and cal is not None and len(obs):
        d = obs[:, :2] - cal[:, :2]
        ok = np.all(np.isfinite(d), axis=1)
        if ok.any():
            sigma_res = float(np.sqrt(np.mean(np.sum(d[ok] ** 2, axis=1)) / 2.0)) * px_rad
    if sigma is None:
        sigma = float(np.hypot(sigma_b, sigma_res))
    return SpotModel(uniq, full_u, edges[:-1], shell, float(sigma), float(sigma_m),
                     float(background_fraction), int(background_size), sigma_res)


def lattice_crossings(M: np.ndarray, axis: np.ndarray, s0: np.ndarray, hkl: np.ndarray):
    """Rotation angles δ (radians, about ``axis`` from the setting M) at which each h crosses the Ewald sphere.

    r(δ) = r∥ + cos δ·r⊥ + sin δ·(m2 × r⊥), r = M h; |r(δ) + s0| = |s0| ⇔
    a cos δ + b sin δ = c with a = 2 s0·r⊥, b = 2 s0·(m2 × r⊥), c = −|r|² −
    2 s0·r∥. Returns (row, δ) for both solutions where they exist, δ in (−π, π].
    """
    m2 = np.asarray(axis, dtype=np.float64)
    m2 = m2 / np.linalg.norm(m2)
    r = hkl @ np.asarray(M, dtype=np.float64).T
    r_par = (r @ m2)[:, None] * m2
    r_perp = r - r_par
    a = 2.0 * (r_perp @ s0)
    b = 2.0 * (np.cross(m2, r_perp) @ s0)
    c = -np.einsum("ij,ij->i", r, r) - 2.0 * (r_par @ s0)
    rho = np.hypot(a, b)
    ok = (rho > 0) & (np.abs(c) <= rho)
    rows = np.flatnonzero(ok)
    base = np.arctan2(b[rows], a[rows])
    half = np.arccos(np.clip(c[rows] / rho[rows], -1.0, 1.0))
    delta = np.concatenate([base + half, base - half])
    delta = (delta + np.pi) % (2 * np.pi) - np.pi
    return np.concatenate([rows, rows]), delta


#: radians from the frame centre: beyond this no rocking curve reaches the frame
NEAR_RAD = 0.5


def _near_box_points_py(n, M, m2, s0, q2_max, near, out):
    """Numba kernel of :func:`_box_lattice_points`: writes the candidates to ``out`` in box order
    and returns their count.

    :func:`lattice_crossings`'s equation a cos δ + b sin δ = c has a root with
    |δ| ≤ near iff c lies in the range of f(δ) = a cos δ + b sin δ over
    [−near, near]: between f(±near), raised to ρ = |(a, b)| when f's peak
    (δ = atan2(b, a)) is inside, lowered to −ρ when its trough is. Each test is
    widened by far more than its rounding (and near by 1e-6 rad), so a point
    lattice_crossings keeps is never left out here.
    """
    k = 0
    s0m2 = s0[0] * m2[0] + s0[1] * m2[1] + s0[2] * m2[2]
    cn, sn = np.cos(near + 1e-6), np.sin(near + 1e-6)
    tn = sn / cn
    for h0 in range(-n[0], n[0] + 1):
        for h1 in range(-n[1], n[1] + 1):
            for h2 in range(-n[2], n[2] + 1):
                if h0 == 0 and h1 == 0 and h2 == 0:
                    continue
                r0 = M[0, 0] * h0 + M[0, 1] * h1 + M[0, 2] * h2
                r1 = M[1, 0] * h0 + M[1, 1] * h1 + M[1, 2] * h2
                r2 = M[2, 0] * h0 + M[2, 1] * h1 + M[2, 2] * h2
                rr = r0 * r0 + r1 * r1 + r2 * r2
                if rr > q2_max * (1.0 + 1e-9):
                    continue
                rp = r0 * m2[0] + r1 * m2[1] + r2 * m2[2]
                p0, p1, p2 = r0 - rp * m2[0], r1 - rp * m2[1], r2 - rp * m2[2]
                a = 2.0 * (p0 * s0[0] + p1 * s0[1] + p2 * s0[2])
                b = 2.0 * ((m2[1] * p2 - m2[2] * p1) * s0[0] + (m2[2] * p0 - m2[0] * p2) * s0[1]
                           + (m2[0] * p1 - m2[1] * p0) * s0[2])
                c = -rr - 2.0 * rp * s0m2
                slack = 1e-9 * (rr + abs(2.0 * rp * s0m2) + abs(a) + abs(b))
                f_plus, f_minus = a * cn + b * sn, a * cn - b * sn
                hi, lo = max(f_plus, f_minus), min(f_plus, f_minus)
                if abs(b) <= abs(a) * tn + slack:
                    rho = np.sqrt(a * a + b * b)
                    if a >= 0:
                        hi = rho
                    if a <= 0:
                        lo = -rho
                if lo - slack <= c <= hi + slack:
                    out[k, 0], out[k, 1], out[k, 2] = h0, h1, h2
                    k += 1
    return k


_NEAR_KERNEL: list = []


def _box_lattice_points(n, M, m2, s0, q_max: float, near: float) -> np.ndarray:
    """The integer points h of the box |h_i| ≤ n_i (int64 (N, 3), in the box's C order).

    With numba, only those that may be within q_max (Å⁻¹) and cross the Ewald
    sphere within ``near`` radians of the setting M (a superset of what
    :func:`spot_bragg_mask` keeps after :func:`lattice_crossings`, which it
    then computes on these rows alone: row by row the same numbers, for a
    third of the rows). Without numba, the whole box.
    """
    if not _NEAR_KERNEL:
        from diffuse_cli.image_read import numba

        _NEAR_KERNEL.append(None if numba is None else numba.njit(nogil=True, cache=True)(_near_box_points_py))
    n = np.asarray(n, dtype=np.int64)
    if _NEAR_KERNEL[0] is None:
        return np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in n], indexing="ij"), -1).reshape(-1, 3)
    out = np.empty((int(np.prod(2 * n + 1)), 3), dtype=np.int64)
    k = _NEAR_KERNEL[0](n, np.ascontiguousarray(M, dtype=np.float64), np.ascontiguousarray(m2, dtype=np.float64),
                        np.ascontiguousarray(s0, dtype=np.float64), float(q_max) ** 2, float(near), out)
    return out[:k]


def _rotate(v: np.ndarray, axis: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Each row of v (N, 3) rotated by its δ (radians) about the unit axis (Rodrigues)."""
    c, s = np.cos(delta)[:, None], np.sin(delta)[:, None]
    return v * c + np.cross(axis, v) * s + (v @ axis)[:, None] * axis * (1 - c)


def _ray_pixels(detector, s1: np.ndarray):
    """(panel, fast px, slow px) where rays s1 (N, 3) meet the detector (panel −1: none)."""
    from dials.array_family import flex as dflex

    panel_of = np.full(len(s1), -1, dtype=np.int64)
    xy = np.zeros((len(s1), 2))
    for p_id, panel in enumerate(detector):
        todo = np.flatnonzero(panel_of < 0)
        if not todo.size:
            break
        D = np.array(panel.get_D_matrix(), dtype=np.float64).reshape(3, 3)
        v = s1[todo] @ D.T
        front = v[:, 2] > 0
        todo, v = todo[front], v[front]
        if not todo.size:
            continue
        mm = v[:, :2] / v[:, 2:3]
        px = panel.millimeter_to_pixel(dflex.vec2_double(
            dflex.double(np.ascontiguousarray(mm[:, 0])), dflex.double(np.ascontiguousarray(mm[:, 1]))))
        px = px.as_double().as_numpy_array().reshape(-1, 2)
        nf, ns = panel.get_image_size()
        inside = (px[:, 0] >= 0) & (px[:, 0] < nf) & (px[:, 1] >= 0) & (px[:, 1] < ns)
        panel_of[todo[inside]] = p_id
        xy[todo[inside]] = px[inside]
    return panel_of, xy[:, 0], xy[:, 1]


def spot_bragg_mask(geometry: DetectorGeometry, experiment, array_index: int, model: SpotModel,
                    counts: np.ndarray, valid: np.ndarray, d_min: float | None = None,
                    strong: np.ndarray | None = None, max_radius_px: int = 30) -> tuple[np.ndarray, dict]:
    """True on Bragg pixels (flat) of one rotation frame: where a predicted spot exceeds f of the local background.

    Every allowed lattice point h (≠ 000, not absent, |q| ≤ the detector's
    largest, or 1/d_min) that crosses the Ewald sphere at δ from the frame
    centre (:func:`lattice_crossings`, setting matrix at the frame centre) puts
    N = I_h · [Φ((w/2 − δ)/σ_φ) − Φ((−w/2 − δ)/σ_φ)] counts on the frame (w the
    oscillation width, σ_φ = σ_m/|ζ| DIALS's rocking width, ζ = m2·ê1), spread
    as a Gaussian of angular σ (``model.sigma``) about ŝ1 = (r(δ) + s0)/|s0|:
    its pixel at angle θ holds N·exp(−θ²/2σ²)/(2πσ_px²), σ_px = σ over the
    pixel's angular size. A pixel is Bragg when that exceeds f·b, b the local
    background at the spot's centre (:func:`local_background`, at least 1
    count), f = ``model.background_fraction``: θ² ≤ 2σ²·ln(N/(2πσ_px²·f·b)).
    Returns the mask and counts of spots.
    """
    from scipy.special import ndtr

    from diffuse_cli.frames import FrameRef

    frames = FrameRef.from_experiment(experiment)
    M = frames.setting_matrix(experiment.crystal, experiment.goniometer, float(array_index) + 0.5)
    s0 = np.asarray(geometry.s0, dtype=np.float64)
    m2 = np.asarray(experiment.goniometer.get_rotation_axis(), dtype=np.float64)
    m2 = m2 / np.linalg.norm(m2)
    width = abs(np.deg2rad(frames.width_deg))
    out = np.zeros(geometry.n_pixels, dtype=bool)
    if not valid.any():
        return out, {"n_spots": 0}
    q_max = float(np.sqrt(np.max(_pixel_q2(geometry), where=valid, initial=0.0)))
    if d_min:
        q_max = min(q_max, 1.0 / d_min)
    # every lattice point within q_max: |h_i| ≤ q_max·|a_i| (real-space axis lengths)
    a_len = np.linalg.norm(np.linalg.inv(M), axis=1)
    n = np.ceil(q_max * a_len).astype(int)
    grid = _box_lattice_points(n, M, m2, s0, q_max, NEAR_RAD)
    r_grid = grid @ M.T
    grid = grid[(np.einsum("ij,ij->i", r_grid, r_grid) <= q_max**2) & np.any(grid != 0, axis=1)]
    rows, delta = lattice_crossings(M, m2, s0, grid.astype(np.float64))
    near = np.abs(delta) < NEAR_RAD
    rows, delta = rows[near], delta[near]
    r = _rotate(grid[rows].astype(np.float64) @ M.T, m2, delta)
    s1 = r + s0
    u1 = s1 / np.linalg.norm(s1, axis=1, keepdims=True)
    e1 = np.cross(u1, s0 / np.linalg.norm(s0))
    zeta = np.abs(e1 @ m2) / np.maximum(np.linalg.norm(e1, axis=1), 1e-12)
    sigma_phi = model.sigma_m / np.maximum(zeta, 1e-3)
    frac = ndtr((0.5 * width - delta) / sigma_phi) - ndtr((-0.5 * width - delta) / sigma_phi)
    hkl = grid[rows].astype(np.int64)
    N = model.intensity_at(_hkl_key(hkl), np.linalg.norm(r, axis=1)) * frac
    # b >= 1 and a pixel spans at most pixel size / distance (rad, at normal incidence), so a
    # spot with N·(that/σ)²/2π below f is never masked
    widest = max(max(p.get_pixel_size()) / max(abs(p.get_distance()), 1e-6) for p in experiment.detector)
    some = N * (widest / model.sigma) ** 2 / (2 * np.pi) > model.background_fraction
    u1, N, hkl = u1[some], N[some], hkl[some]
    keep = ~_absent(hkl, experiment.crystal.get_space_group()) if len(hkl) else np.zeros(0, dtype=bool)
    u1, N = u1[keep], N[keep]
    panel, fx, fy = _ray_pixels(experiment.detector, u1)
    on = panel >= 0
    u1, N, panel, fx, fy = u1[on], N[on], panel[on], fx[on], fy[on]
    off = geometry.panel_offsets
    ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    shapes = geometry.panel_shapes
    centre = off[panel] + iy * shapes[panel, 1] + ix
    # the pixel's angular size at the spot: the step to the next pixel's direction
    nxt = off[panel] + iy * shapes[panel, 1] + np.where(ix + 1 < shapes[panel, 1], ix + 1, ix - 1)
    step = np.linalg.norm(geometry.s1_unit[nxt].astype(np.float64) - geometry.s1_unit[centre], axis=1)
    sigma_px = model.sigma / np.maximum(step, 1e-9)
    peak = N / (2 * np.pi * sigma_px**2)
    # b >= 1, so a spot below f count at its peak is never masked: no background needed
    some = peak > model.background_fraction
    u1, ix, iy, panel, centre, sigma_px, peak = (v[some] for v in (u1, ix, iy, panel, centre, sigma_px, peak))
    filled = filled_panels(counts, valid, geometry)
    b = _spot_background(counts, valid, geometry, model.background_size, centre, filled=filled,
                         peak=peak, fraction=model.background_fraction)
    n_predicted = len(peak)
    if strong is not None:
        # the spots the frame shows (indexed or not, however long they rock): each strong group
        # at its highest pixel, with its observed excess as the peak
        top = _strong_peaks(strong & valid, counts, geometry)
        bt = _spot_background(counts, valid, geometry, model.background_size, top, filled=filled)
        p_id = np.searchsorted(off, top, side="right") - 1
        ty, tx = np.divmod(top - off[p_id], shapes[p_id, 1])
        nxt_t = off[p_id] + ty * shapes[p_id, 1] + np.where(tx + 1 < shapes[p_id, 1], tx + 1, tx - 1)
        step_t = np.linalg.norm(geometry.s1_unit[nxt_t].astype(np.float64) - geometry.s1_unit[top], axis=1)
        u1 = np.concatenate([u1, geometry.s1_unit[top].astype(np.float64)])
        ix, iy, panel = np.concatenate([ix, tx]), np.concatenate([iy, ty]), np.concatenate([panel, p_id])
        b = np.concatenate([b, bt])
        sigma_px = np.concatenate([sigma_px, model.sigma / np.maximum(step_t, 1e-9)])
        peak = np.concatenate([peak, counts[top].astype(np.float64) - bt])
        out |= strong & valid
    rho2 = 2.0 * np.log(np.maximum(peak / (model.background_fraction * b), 1.0))  # in σ², 0: no mask
    lit = rho2 > 0
    half = np.minimum(np.ceil(np.sqrt(rho2) * sigma_px + 1.0), max_radius_px).astype(np.int64)
    grow = _grow_kernel()
    if grow is not None:
        k = np.flatnonzero(lit)
        grow(ix[k], iy[k], panel[k].astype(np.int64), half[k], rho2[k] * model.sigma**2,
             np.ascontiguousarray(u1[k], dtype=np.float64), off.astype(np.int64), shapes.astype(np.int64),
             geometry.s1_unit, out)
        return out, {"n_predicted": int(lit[:n_predicted].sum()), "n_strong": int(lit[n_predicted:].sum())}
    for w in np.unique(half[lit]):
        sel = np.flatnonzero(lit & (half == w))
        flat, ok = _box(ix[sel], iy[sel], panel[sel], w, off, shapes)
        theta2 = np.sum((geometry.s1_unit[flat].astype(np.float64) - u1[sel, None, None, :]) ** 2, axis=-1)
        hit = ok & (theta2 <= rho2[sel, None, None] * model.sigma**2)
        out[flat[hit]] = True
    return out, {"n_predicted": int(lit[:n_predicted].sum()), "n_strong": int(lit[n_predicted:].sum())}


def _grow_spots_py(ix, iy, panel, half, limit, u1, off, shapes, s1_unit, out):
    """Numba kernel of :func:`spot_bragg_mask`'s last step: ``out`` True at the pixels of the
    square of half-width ``half`` about each spot, on its panel, whose direction is within
    θ² ≤ ``limit`` of the spot's ŝ1 ``u1`` (θ² summed as numpy sums the three terms)."""
    for k in range(ix.size):
        p_id = panel[k]
        ns, nf, base = shapes[p_id, 0], shapes[p_id, 1], off[p_id]
        w = half[k]
        for y in range(max(iy[k] - w, 0), min(iy[k] + w, ns - 1) + 1):
            for x in range(max(ix[k] - w, 0), min(ix[k] + w, nf - 1) + 1):
                p = base + y * nf + x
                d0 = np.float64(s1_unit[p, 0]) - u1[k, 0]
                d1 = np.float64(s1_unit[p, 1]) - u1[k, 1]
                d2 = np.float64(s1_unit[p, 2]) - u1[k, 2]
                if d0 * d0 + d1 * d1 + d2 * d2 <= limit[k]:
                    out[p] = True


_GROW_KERNEL: list = []


def _grow_kernel():
    """The compiled :func:`_grow_spots_py` (numba, loaded at the first call), or None without numba."""
    if not _GROW_KERNEL:
        from diffuse_cli.image_read import numba

        _GROW_KERNEL.append(None if numba is None else numba.njit(nogil=True, cache=True)(_grow_spots_py))
    return _GROW_KERNEL[0]


def _spot_background(counts, valid, geometry, size: int, at: np.ndarray, filled=None, peak=None,
                     fraction: float | None = None) -> np.ndarray:
    """Diffuse background under spots (counts, at least 1): the lower of the :func:`local_background`
    medians over size² and (3·size)² squares, so a large bright spot does not raise its own.

    filled: :func:`filled_panels` of the counts. peak, fraction: a spot whose peak
    (counts) cannot exceed fraction·b gets b = inf without its medians (it is
    not masked either way): peak ≤ fraction·max(L, 1), L the minimum of the
    (3·size)² square, which no median of either square is below.
    """
    if filled is None:
        filled = filled_panels(counts, valid, geometry)
    at = np.asarray(at, dtype=np.int64)
    out = np.full(len(at), np.inf)
    todo = slice(None)
    if peak is not None and len(at):
        lower = np.maximum(_window_minimum(filled, geometry, 3 * size, at), 1.0)
        todo = np.flatnonzero(peak > fraction * lower)
    small = local_background(counts, valid, geometry, size, at=at[todo], filled=filled)
    large = local_background(counts, valid, geometry, 3 * size, at=at[todo], filled=filled)
    out[todo] = np.maximum(np.minimum(small, large), 1.0)
    return out


def _window_minimum(filled, geometry, size: int, at: np.ndarray) -> np.ndarray:
    """Minimum of each filled panel over an odd square of at least ``size`` covering
    :func:`local_background`'s ``size``² window at the flat pixels ``at`` (edges as "nearest")."""
    off = geometry.panel_offsets
    odd = size | 1  # an even window (offsets −size/2 .. size/2 − 1) lies inside the next odd one
    half = odd // 2
    out = np.empty(len(at), dtype=np.float32)
    for i, image in enumerate(filled):
        mine = np.flatnonzero((at >= off[i]) & (at < off[i + 1]))
        if not len(mine):
            continue
        # scipy's minimum_filter(image, odd, mode="nearest") at these pixels only: "nearest" is
        # numpy's "edge" padding (a few thousand spots: their windows, not the whole frame)
        r, col = np.divmod(at[mine] - off[i], image.shape[1])
        kernel = _window_rank_kernel()
        if kernel is not None:
            values = np.empty(len(mine), dtype=np.float32)
            kernel(np.ascontiguousarray(image, dtype=np.float32), r, col, int(odd), 0, values)
            out[mine] = values
            continue
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(image, half, mode="edge"), (odd, odd))
        for start in range(0, len(mine), 65536):  # bounded memory: 65536 windows of odd²
            part = slice(start, start + 65536)
            out[mine[part]] = windows[r[part], col[part]].min(axis=(1, 2))
    return out


def _strong_peaks(strong: np.ndarray, counts: np.ndarray, geometry: DetectorGeometry) -> np.ndarray:
    """Flat index of the highest pixel of each 8-connected group of strong pixels, per panel."""
    from scipy import ndimage

    off = geometry.panel_offsets
    tops = []
    for i, shape in enumerate(geometry.panel_shapes):
        sl = slice(off[i], off[i + 1])
        labels, n = ndimage.label(strong[sl].reshape(tuple(int(v) for v in shape)), structure=np.ones((3, 3)))
        if n:
            # ndimage.maximum_position(image as float64, labels, arange(1, n + 1)) without its
            # copies: the same argsort of the whole image, so ties resolve to the same pixel
            # (integer counts sorted as they are: numpy's introsort makes the same permutation
            # as for their float64 copy, in half the time; tests/test_masking.py checks it)
            image = counts[sl]
            if image.dtype.kind not in "iu":
                image = image.astype(np.float64)
            order = image.argsort()
            top = np.zeros(n + 2, dtype=np.int64)
            top[labels.ravel()[order]] = order
            tops.append(off[i] + top[1 : n + 1])
    return np.concatenate(tops).astype(np.int64) if tops else np.zeros(0, dtype=np.int64)


def _box(ix, iy, panel, w: int, off, shapes):
    """Flat pixel indices (N, 2w+1, 2w+1) of the square of half-width w about each (ix, iy) on its panel,
    and which of them lie on the panel (the others point at pixel 0)."""
    d = np.arange(-w, w + 1)
    X, Y = np.broadcast_arrays(ix[:, None, None] + d[None, None, :], iy[:, None, None] + d[None, :, None])
    nf, ns = shapes[panel, 1][:, None, None], shapes[panel, 0][:, None, None]
    ok = (X >= 0) & (Y >= 0) & (X < nf) & (Y < ns)
    return np.where(ok, off[panel][:, None, None] + Y * nf + X, 0), ok


def spot_profile_moments(geometry: DetectorGeometry, experiment, array_index: int, counts: np.ndarray,
                         valid: np.ndarray, s1: np.ndarray, z: np.ndarray, box_sigma: float = 3.0) -> np.ndarray:
    """Angular second moments (radians², per axis) of the spots DIALS predicts at the centre of one frame.

    s1, z: DIALS's ``s1`` and ``xyzcal.px`` z of bright integrated reflections.
    Those with z within half a frame of the frame centre are taken: over the
    square of half-width ⌈box_sigma·σ_b⌉ pixels about the predicted position,
    the excess e = counts − the median of the square's border, and
    Σ e·θ² / (2 Σ e), θ the angle between the pixel's ŝ1 and the predicted
    one (prediction error included). Squares with an invalid pixel are left out.
    """
    here = np.flatnonzero(np.abs(np.asarray(z) - (array_index + 0.5)) < 0.5)
    if not here.size:
        return np.zeros(0)
    u = np.asarray(s1, dtype=np.float64)[here]
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    panel, fx, fy = _ray_pixels(experiment.detector, u)
    on = panel >= 0
    u, panel, ix, iy = u[on], panel[on], np.floor(fx[on]).astype(np.int64), np.floor(fy[on]).astype(np.int64)
    off, shapes = geometry.panel_offsets, geometry.panel_shapes
    p0 = experiment.detector[0]
    px_rad = float(np.mean(p0.get_pixel_size())) / max(abs(p0.get_distance()), 1e-6)
    w = max(2, int(np.ceil(box_sigma * float(experiment.profile.sigma_b(deg=False)) / px_rad)))
    flat, ok = _box(ix, iy, panel, w, off, shapes)
    good = np.all(ok & valid[flat], axis=(1, 2))
    flat, u = flat[good], u[good]
    c = counts[flat].astype(np.float64)
    border = np.ones((2 * w + 1, 2 * w + 1), dtype=bool)
    border[1:-1, 1:-1] = False
    e = c - np.median(c[:, border], axis=1)[:, None, None]
    theta2 = np.sum((geometry.s1_unit[flat].astype(np.float64) - u[:, None, None, :]) ** 2, axis=-1)
    total = e.reshape(len(e), -1).sum(axis=1)
    m2 = (e * theta2).reshape(len(e), -1).sum(axis=1) / np.where(total > 0, 2.0 * total, 1.0)
    return m2[(total > 0) & (m2 > 0)]
