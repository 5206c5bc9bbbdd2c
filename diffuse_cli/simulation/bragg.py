"""Bragg spots of the simulated images: stills (DIALS's predictor) and rotation sweeps (own geometry).

Partiality / rocking model (docs/simulate.md): a Gaussian in the excitation
error ε = |r + s0| − 1/λ (Å⁻¹, r the reciprocal-lattice vector in the lab) of
width σ_ε = excitation_sigma + d* tan(mosaicity/2) (a domain-size plus a
mosaic-spread term, Nave's model as in DIALS stills). Stills: spot photons =
I_full · exp(−ε²/2σ_ε²). Rotation: the spot crosses the Ewald sphere at φ_c
where ε = 0; over φ its photons follow a Gaussian of width σ_φ = σ_ε / |dε/dφ|,
and a frame records the fraction of it inside its oscillation; the whole
passage gives I_full · L, L = |s0| / |dε/dφ| the rotation Lorentz factor
(1/sin 2θ for a reflection in the plane normal to the axis; DIALS's ``lp``
divides by it).
"""

from __future__ import annotations

import math

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)


def excitation_width(d_star: np.ndarray, excitation_sigma: float, mosaicity_deg: float) -> np.ndarray:
    """σ_ε (Å⁻¹) = excitation_sigma + d* tan(mosaicity/2)."""
    return excitation_sigma + np.asarray(d_star) * math.tan(math.radians(mosaicity_deg) / 2.0)


def still_spots(beam, detector, crystal, d_min, H, I_full, d_star, excitation_sigma, mosaicity_deg):
    """Spots of a still: (panel, x_px, y_px, photons at full exposure and scale 1, hkl) or None.

    Candidates within 4 σ_ε of the Ewald sphere go to DIALS's
    ``StillsDeltaPsiReflectionPredictor`` for their detector positions
    (what DIALS would predict); photons = I_full · exp(−ε²/2σ_ε²).
    """
    from cctbx.array_family import flex
    from dials.algorithms.spot_prediction import StillsDeltaPsiReflectionPredictor

    s0 = np.array(beam.get_s0())
    A = np.array(crystal.get_A()).reshape(3, 3)
    eps = np.linalg.norm(H @ A.T + s0, axis=1) - np.linalg.norm(s0)
    sigma = excitation_width(d_star, excitation_sigma, mosaicity_deg)
    sel = np.abs(eps) < 4.0 * sigma
    if not sel.any():
        return None
    predictor = StillsDeltaPsiReflectionPredictor(
        beam, detector, crystal.get_A(), crystal.get_unit_cell(), crystal.get_space_group().type(), d_min,
    )
    Hs = H[sel]
    refl = predictor(flex.miller_index([tuple(int(v) for v in h) for h in Hs]))
    if len(refl) == 0:
        return None
    mi = np.array(refl["miller_index"], dtype=np.float64).reshape(-1, 3)
    xyz = refl["xyzcal.px"].as_numpy_array()
    panel = refl["panel"].as_numpy_array().astype(np.int64)
    # map predictions back to the candidate list to get ε and I(H)
    lut = {tuple(h): j for j, h in enumerate(Hs.astype(np.int64).tolist())}
    j = np.array([lut[tuple(h)] for h in mi.astype(np.int64).tolist()])
    photons = I_full[sel][j] * np.exp(-0.5 * (eps[sel][j] / sigma[sel][j]) ** 2)
    return panel, xyz[:, 0], xyz[:, 1], photons, mi


def ray_intersections(detector, s1: np.ndarray):
    """Panel and dxtbx pixel coordinates (fast, slow) where rays s1 (N, 3) meet the detector.

    Per panel, v = D⁻¹ s1 gives the plane point (v_x/v_z, v_y/v_z) mm (rays
    with v_z > 0 only); ``Panel.millimeter_to_pixel`` then applies parallax.
    Rays hitting no panel get panel −1.
    """
    from scitbx.array_family import flex

    n = len(s1)
    panel_of = np.full(n, -1, dtype=np.int64)
    xy_px = np.full((n, 2), np.nan)
    for pid, panel in enumerate(detector):
        free = np.flatnonzero(panel_of < 0)
        if free.size == 0:
            break
        D_inv = np.linalg.inv(np.array(panel.get_d_matrix()).reshape(3, 3))
        v = s1[free] @ D_inv.T
        ahead = v[:, 2] > 0
        mm = v[ahead, :2] / v[ahead, 2:3]
        if len(mm) == 0:
            continue
        mm_flex = flex.vec2_double(flex.double(np.ascontiguousarray(mm[:, 0])), flex.double(np.ascontiguousarray(mm[:, 1])))
        px = np.array(panel.millimeter_to_pixel(mm_flex))
        n_fast, n_slow = panel.get_image_size()
        inside = (px[:, 0] >= 0) & (px[:, 0] < n_fast) & (px[:, 1] >= 0) & (px[:, 1] < n_slow)
        hit = free[ahead][inside]
        panel_of[hit] = pid
        xy_px[hit] = px[inside]
    return panel_of, xy_px


def _crossing_terms(r0: np.ndarray, s0: np.ndarray, e: np.ndarray):
    """(base, half, ok): the crossings are φ = base ± half (radians) where ok."""
    r_par = np.outer(r0 @ e, e)
    r_perp = r0 - r_par
    a = r_perp @ s0
    b = np.cross(e, r_perp) @ s0
    c = -0.5 * np.einsum("ij,ij->i", r0, r0) - r_par @ s0
    rho = np.hypot(a, b)
    ok = (rho > 0) & (np.abs(c) <= rho)
    half = np.arccos(np.clip(np.where(ok, c / np.where(rho > 0, rho, 1.0), 0.0), -1.0, 1.0))
    return np.arctan2(b, a), half, ok


def rotation_crossings(r0: np.ndarray, s0, axis, phi_range_deg, margin_deg: float):
    """Ewald-sphere crossings of reciprocal-lattice vectors r0 = A h (N, 3) rotating about ``axis``.

    The lab vector is r(φ) = R(axis, φ) r0. Writing r0 = r∥ + r⊥ (along and
    across the unit axis e), r(φ) = r∥ + r⊥ cos φ + (e × r⊥) sin φ, and
    |r + s0|² = |s0|² becomes ``a cos φ + b sin φ = c`` with a = s0·r⊥,
    b = s0·(e × r⊥), c = −|r0|²/2 − s0·r∥; so φ = atan2(b, a) ± arccos(c / √(a² + b²)).

    Returns (row of r0, φ_c in degrees) for the crossings inside
    ``phi_range_deg`` widened by ``margin_deg`` on both sides.
    """
    e = np.asarray(axis, dtype=np.float64)
    e = e / np.linalg.norm(e)
    base, half, ok = _crossing_terms(np.asarray(r0, dtype=np.float64), np.asarray(s0, dtype=np.float64), e)
    lo, hi = phi_range_deg[0] - margin_deg, phi_range_deg[1] + margin_deg
    rows, angles = [], []
    for phi in (base + half, base - half):
        deg = lo + np.mod(np.degrees(phi) - lo, 360.0)  # into [lo, lo + 360)
        keep = ok & (deg <= hi)
        rows.append(np.flatnonzero(keep))
        angles.append(deg[keep])
    return np.concatenate(rows), np.concatenate(angles)


def refine_crossings(H, phi_deg, A_at, s0, axis, iterations: int = 2):
    """Follow a scan-varying crystal: re-solve each crossing with A at its own φ.

    ``A_at(phi_deg array)`` → (N, 3, 3). Of the two solutions the one nearest
    the current φ is kept. Returns (φ in degrees, converged flag).
    """
    e = np.asarray(axis, dtype=np.float64)
    e = e / np.linalg.norm(e)
    phi = np.asarray(phi_deg, dtype=np.float64).copy()
    ok = np.ones(len(phi), dtype=bool)
    for _ in range(iterations):
        r0 = np.einsum("nij,nj->ni", A_at(phi), H)
        base, half, ok_now = _crossing_terms(r0, np.asarray(s0, dtype=np.float64), e)
        options = np.degrees(np.stack([base + half, base - half]))
        options = phi + (np.mod(options - phi + 180.0, 360.0) - 180.0)  # nearest branch to φ
        pick = np.argmin(np.abs(options - phi), axis=0)
        phi = np.where(ok_now, options[pick, np.arange(len(phi))], phi)
        ok &= ok_now
    return phi, ok


def rotation_spots(beam, detector, H, I_full, d_star, A_at, axis, phi_range_deg, excitation_sigma, mosaicity_deg):
    """Spots of a rotation sweep: dict of panel, x, y (px), phi, sigma_phi (deg), photons, hkl.

    ``A_at(phi_deg array)`` gives the crystal setting matrices (N, 3, 3) at φ
    (no goniometer rotation), so a scan-varying crystal is followed. Spot
    positions are those at the crossing, s1 = s0 + R(φ_c) A(φ_c) h, through
    :func:`ray_intersections`. σ_φ = σ_ε / |dε/dφ| with dε/dφ = ŝ1·(e × r)
    (per radian) at the crossing. ``photons`` = I_full · L over the whole
    passage, L = |s0| / |dε/dφ| (the Lorentz factor: time spent in reflection).
    """
    s0 = np.asarray(beam.get_s0(), dtype=np.float64)
    e = np.asarray(axis, dtype=np.float64)
    e = e / np.linalg.norm(e)
    sigma_eps = excitation_width(d_star, excitation_sigma, mosaicity_deg)
    centre = np.array([0.5 * (phi_range_deg[0] + phi_range_deg[1])])
    rows, phi = rotation_crossings(H @ A_at(centre)[0].T, s0, e, phi_range_deg, margin_deg=5.0)
    phi, ok = refine_crossings(H[rows], phi, A_at, s0, e)
    rows, phi = rows[ok], phi[ok]
    r0 = np.einsum("nij,nj->ni", A_at(phi), H[rows])
    r = np.einsum("nij,nj->ni", rotation_matrices(e, phi), r0)
    s1 = r + s0
    u1 = s1 / np.linalg.norm(s1, axis=1, keepdims=True)
    deps_dphi = np.abs(np.einsum("ij,ij->i", u1, np.cross(e, r)))
    sigma_phi = np.degrees(sigma_eps[rows] / np.maximum(deps_dphi, 1e-12))
    lorentz = np.linalg.norm(s0) / np.maximum(deps_dphi, 1e-12)
    panel, xy = ray_intersections(detector, s1)
    on = panel >= 0
    return {
        "panel": panel[on], "x": xy[on, 0], "y": xy[on, 1], "phi": phi[on], "sigma_phi": sigma_phi[on],
        "photons": I_full[rows[on]] * lorentz[on], "hkl": H[rows[on]],
    }


def rotation_matrices(axis, angles_deg) -> np.ndarray:
    """Right-handed rotations about ``axis`` by each angle (degrees), shape (N, 3, 3) (Rodrigues)."""
    e = np.asarray(axis, dtype=np.float64)
    e = e / np.linalg.norm(e)
    K = np.array([[0, -e[2], e[1]], [e[2], 0, -e[0]], [-e[1], e[0], 0]])
    a = np.radians(np.atleast_1d(np.asarray(angles_deg, dtype=np.float64)))
    return np.eye(3) + np.sin(a)[:, None, None] * K + (1 - np.cos(a))[:, None, None] * (K @ K)


def frame_fractions(phi_c, sigma_phi, phi_lo: float, phi_hi: float) -> np.ndarray:
    """Fraction of each spot's rocking Gaussian inside [phi_lo, phi_hi) (degrees)."""
    from scipy.special import ndtr

    return ndtr((phi_hi - phi_c) / sigma_phi) - ndtr((phi_lo - phi_c) / sigma_phi)


def render_spots(
    panel_shapes, panel, x_px, y_px, counts, sigma_px: float, half_width: int = 3
) -> list[np.ndarray]:
    """Add 2D Gaussian spots integrated over pixels; returns one image per panel.

    x_px/y_px are dxtbx pixel coordinates (fast, slow) of the spot centres;
    ``counts`` the total expected photons of each spot.
    """
    from scipy.special import ndtr

    images = [np.zeros(s) for s in panel_shapes]
    if len(counts) == 0:
        return images
    d = np.arange(-half_width, half_width + 1)
    ix = np.floor(x_px).astype(np.int64)[:, None] + d[None, :]  # (N, w)
    iy = np.floor(y_px).astype(np.int64)[:, None] + d[None, :]
    fx = ndtr((ix + 1 - x_px[:, None]) / sigma_px) - ndtr((ix - x_px[:, None]) / sigma_px)
    fy = ndtr((iy + 1 - y_px[:, None]) / sigma_px) - ndtr((iy - y_px[:, None]) / sigma_px)
    weight = counts[:, None, None] * fy[:, :, None] * fx[:, None, :]  # (N, wy, wx)
    for p_id, shape in enumerate(panel_shapes):
        sel = panel == p_id
        if not sel.any():
            continue
        ys = np.broadcast_to(iy[sel][:, :, None], weight[sel].shape)
        xs = np.broadcast_to(ix[sel][:, None, :], weight[sel].shape)
        ok = (ys >= 0) & (ys < shape[0]) & (xs >= 0) & (xs < shape[1])
        flat = ys[ok] * shape[1] + xs[ok]
        images[p_id] += np.bincount(flat, weights=weight[sel][ok], minlength=shape[0] * shape[1]).reshape(shape)
    return images
