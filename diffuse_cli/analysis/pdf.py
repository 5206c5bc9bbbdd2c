"""3D-ΔPDF and Patterson of a map on the hkl grid by FFT, and its strongest features.

Transform. For a map I(h) on the grid h = i/ndiv (i = −H ndiv … H ndiv along
each axis, N_a = 2 H_a ndiv_a + 1 points), with the taper w(|q|),

    P(x) = ΔV* Σ_h w(s_h) I(h) cos(2π h·x),   ΔV* = Δh Δk Δl / V  (Å⁻³),

the Riemann sum of P(u) = ∫ w I(q) exp(−2πi q·u) d³q with q·u = h·x
(x fractional coordinates of u, V the cell volume). The cosine is the real
part of numpy.fft.fftn (the sine part is the Friedel-odd part of the map,
reported as imag_fraction). Unmeasured voxels (NaN) count as 0. For the
anisotropic map this is the 3D-ΔPDF, for the total map the Patterson of the
diffuse map. When I is in electron units per unit cell (merged.npz
``units``), P is in e²/Å³ and the integral of a pair peak over its
neighbourhood (Σ P ΔV_real) is its strength in e²: I(q) = 2A cos(2π q·r0)
gives peaks of strength +A at r0 and at −r0 (tests/test_analysis_pdf.py).

Taper (radial cosine, a Tukey window in s = |q|): w = 1 for s ≤ f s_max,
w = ½[1 + cos(π (s − f s_max)/((1 − f) s_max))] for f s_max < s < s_max,
w = 0 beyond s_max (default: the largest measured |q|; never beyond the
radius of the sphere inscribed in the grid box, min_a h_max,a/|a|);
f = ``taper_start`` (f = 1: no taper, a sharp cut-off with sinc ripples).
It suppresses the ripples of the resolution cut-off at the
cost of broader peaks.

Real-space grid: N_a points at Δx_a = ndiv_a/N_a (fractional), i.e. voxel
a·ndiv_a/N_a ≈ d_min/2 Å along a, spanning ndiv_a cells (extent ndiv_a·a Å);
the origin u = 0 is the centre voxel (index (N_a − 1)/2). The grid is periodic
(vectors beyond half the extent alias).
"""

from __future__ import annotations

import numpy as np


def taper(s, s_max: float, taper_start: float) -> np.ndarray:
    """Radial cosine (Tukey) window w(s) of the module doc (dimensionless)."""
    s = np.asarray(s, dtype=np.float64)
    f = float(taper_start)
    if not 0.0 <= f <= 1.0:
        raise ValueError("taper_start must be within [0, 1]")
    w = (s <= s_max).astype(np.float64)
    if f < 1.0:
        s0 = f * s_max
        band = (s > s0) & (s <= s_max)
        w[band] = 0.5 * (1.0 + np.cos(np.pi * (s[band] - s0) / (s_max - s0)))
    return w


def inscribed_s(h, k, l, unit_cell) -> float:
    """Radius (Å⁻¹) of the largest |q| sphere inside the grid box: min over axes of h_max/|a|
    (the face h = h_max is the plane q·a = h_max)."""
    from cctbx import uctbx

    params = uctbx.unit_cell(tuple(float(x) for x in unit_cell)).parameters()
    return float(min(np.max(np.abs(a)) / params[i] for i, a in enumerate((h, k, l))))


def real_space_axes(h, k, l) -> tuple:
    """Fractional coordinates of the real-space grid along x, y, z (origin at the centre)."""
    out = []
    for a in (h, k, l):
        n = len(a)
        step = abs(float(a[1] - a[0])) if n > 1 else 1.0
        out.append((np.arange(n) - (n - 1) // 2) / (n * step))
    return tuple(out)


def pdf_map(values, h, k, l, unit_cell, s_max=None, taper_start: float = 0.5, s=None) -> dict:
    """P(x) of the module doc: the ΔPDF of an anisotropic map, or the Patterson of a total map.

    values: dense map [h, k, l] (NaN = unmeasured → 0); s_max: taper end and
    cut-off (Å⁻¹; default the largest |q| of a finite voxel; at most the
    sphere inscribed in the grid box, so the cut-off is spherical);
    s: s_map(h, k, l, unit_cell) if at hand.
    Returns P (float32, [x, y, z], map units × Å⁻³), x, y, z (fractional
    axes), voxel_A and extent_A (3,), s_max, taper_start, delta_v_star (Å⁻³),
    imag_fraction (max |sine part| / max |P|).
    """
    from cctbx import uctbx

    from diffuse_cli.analysis.isotropic import s_map

    v = np.asarray(values, dtype=np.float64)
    if v.shape != (len(h), len(k), len(l)):
        raise ValueError(f"map {v.shape} and axes {(len(h), len(k), len(l))} disagree")
    finite = np.isfinite(v)
    if not finite.any():
        raise ValueError("no finite voxel in the map")
    s = s_map(h, k, l, unit_cell) if s is None else np.asarray(s)
    # a spherical cut-off: never beyond the sphere inscribed in the grid box
    s_max = min(float(s[finite].max()) if s_max is None else float(s_max), inscribed_s(h, k, l, unit_cell))
    if not s_max > 0:
        raise ValueError(f"cut-off |q| = {s_max:.4g} Å⁻¹: nothing to transform")
    w = taper(s, s_max, taper_start)
    v = np.where(finite, v, 0.0) * w
    del w
    uc = uctbx.unit_cell(tuple(float(x) for x in unit_cell))
    steps = [abs(float(a[1] - a[0])) if len(a) > 1 else 1.0 for a in (h, k, l)]
    dv_star = steps[0] * steps[1] * steps[2] / uc.volume()
    # h = 0 to index 0 (odd N: ifftshift), origin back to the centre afterwards
    F = np.fft.fftn(np.fft.ifftshift(v))
    del v
    F = np.fft.fftshift(F)
    P = F.real * dv_star
    top = float(np.max(np.abs(P))) or 1.0
    imag_fraction = float(np.max(np.abs(F.imag))) * dv_star / top
    del F
    x, y, z = real_space_axes(h, k, l)
    params = uc.parameters()
    n = np.array([len(h), len(k), len(l)])
    ndiv = np.array([1.0 / st for st in steps])
    return {
        "P": P.astype(np.float32), "x": x, "y": y, "z": z,
        "voxel_A": np.array(params[:3]) * ndiv / n, "extent_A": np.array(params[:3]) * ndiv,
        "s_max": float(s_max), "taper_start": float(taper_start), "delta_v_star": dv_star,
        "imag_fraction": imag_fraction,
    }


def orthogonalise(frac, unit_cell) -> np.ndarray:
    """Cartesian vectors (Å, cctbx orthogonalisation) of fractional vectors (N, 3)."""
    from cctbx import uctbx

    O = np.array(uctbx.unit_cell(tuple(float(x) for x in unit_cell)).orthogonalization_matrix(),
                 dtype=np.float64).reshape(3, 3)
    return np.asarray(frac, dtype=np.float64) @ O.T


def strongest_features(P, x, y, z, unit_cell, n_features: int = 20, min_distance=None) -> list:
    """The n strongest local extrema of P (maxima > 0 and minima < 0), one of each ± pair.

    A voxel is an extremum when it is the largest (smallest) of its 3×3×3
    neighbourhood (periodic). Positions are refined by a parabola through the
    voxel and its two neighbours along each axis (at most ±½ voxel).
    min_distance: vectors shorter than this (Å) are left out too (the origin
    voxel always is). Returns dicts sorted by |value|: frac (x,
    y, z), cart (Å), length (Å), value, sign ("positive"/"negative"), index.
    """
    from scipy import ndimage

    P = np.asarray(P, dtype=np.float64)
    centre = np.array([(len(a) - 1) // 2 for a in (x, y, z)])
    steps = np.array([a[1] - a[0] if len(a) > 1 else 1.0 for a in (x, y, z)])
    is_max = (P == ndimage.maximum_filter(P, size=3, mode="wrap")) & (P > 0)
    is_min = (P == ndimage.minimum_filter(P, size=3, mode="wrap")) & (P < 0)
    idx = np.argwhere(is_max | is_min)
    off = idx - centre
    # one of each centrosymmetric pair: first non-zero offset positive
    first = np.where(off[:, 0] != 0, off[:, 0], np.where(off[:, 1] != 0, off[:, 1], off[:, 2]))
    idx, off = idx[first > 0], off[first > 0]
    vals = P[tuple(idx.T)]
    delta = np.zeros(off.shape)
    shape = np.array(P.shape)
    for a in range(3):
        e = np.zeros(3, dtype=np.int64)
        e[a] = 1
        fm = P[tuple(((idx - e) % shape).T)]
        fp = P[tuple(((idx + e) % shape).T)]
        curv = fm - 2.0 * vals + fp
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(curv != 0, 0.5 * (fm - fp) / curv, 0.0)
        delta[:, a] = np.clip(d, -0.5, 0.5)
    frac = (off + delta) * steps
    cart = orthogonalise(frac, unit_cell)
    length = np.linalg.norm(cart, axis=1)
    keep = np.any(off != 0, axis=1)          # never the origin voxel
    if min_distance is not None:
        keep &= length >= float(min_distance)
    order = np.argsort(-np.abs(vals[keep]))[: int(n_features)]
    sel = np.flatnonzero(keep)[order]
    return [{"frac": frac[i].tolist(), "cart": cart[i].tolist(), "length": float(length[i]),
             "value": float(vals[i]), "sign": "positive" if vals[i] > 0 else "negative",
             "index": idx[i].tolist()} for i in sel]

