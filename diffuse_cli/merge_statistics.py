"""Statistics of a merged map: voxel resolution, shells, CC1/2 (total and anisotropic), agreement."""

from __future__ import annotations

import numpy as np

from diffuse_cli.grid import HKLGrid
from diffuse_cli.merge_accumulator import MergedMap
from diffuse_cli.symmetry import reciprocal_metric


# ---------------------------------------------------------------- statistics


def voxel_hkl(grid: HKLGrid, flat: np.ndarray) -> np.ndarray:
    """Fractional hkl (N, 3) of voxel centres given by flat indices."""
    u = np.stack(np.unravel_index(flat, grid.shape), axis=-1)
    off = np.asarray(grid.hkl_max) * np.asarray(grid.ndiv)
    return (u - off) / np.asarray(grid.ndiv, dtype=np.float64)


def voxel_d_star(grid: HKLGrid, flat: np.ndarray, unit_cell) -> np.ndarray:
    """d* (Å⁻¹) of voxel centres for the reference cell."""
    h = voxel_hkl(grid, flat)
    g = reciprocal_metric(unit_cell)
    return np.sqrt(np.einsum("ni,ij,nj->n", h, g, h))


def grid_d_star(grid: HKLGrid, unit_cell) -> np.ndarray:
    """d* (Å⁻¹) of every voxel centre, shape grid.shape (the quadratic form summed over
    the separable axes: no per-voxel index arrays)."""
    g = reciprocal_metric(unit_cell)
    h, k, l = grid.axes()
    h, k, l = h[:, None, None], k[None, :, None], l[None, None, :]
    out = g[0, 0] * h * h + g[1, 1] * k * k
    out = out + (g[2, 2] * l * l + 2 * g[1, 2] * k * l)
    out += 2 * g[0, 1] * h * k
    out += 2 * g[0, 2] * h * l
    return np.sqrt(np.maximum(out, 0.0, out=out), out=out)


def shell_edges(d_star_min: float, d_star_max: float, n_shells: int) -> np.ndarray:
    """Edges in d* (Å⁻¹) of shells of equal reciprocal-space volume."""
    v = np.linspace(d_star_min**3, d_star_max**3, n_shells + 1)
    return np.cbrt(v)


def _cc(x, y):
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return np.nan
    return float(np.corrcoef(x, y)[0, 1])


def anisotropic_part(values: np.ndarray, d_star_bin: np.ndarray, n_bins: int,
                     select: np.ndarray | None = None) -> np.ndarray:
    """values minus the mean of ``values[select]`` in their narrow d* bin."""
    sel = np.isfinite(values) if select is None else select
    b = d_star_bin[sel]
    n = np.maximum(np.bincount(b, None, n_bins), 1)
    iso = np.bincount(b, values[sel], n_bins) / n
    return values - iso[d_star_bin]


def map_agreement(reference: np.ndarray, I: np.ndarray, counts: np.ndarray,
                  d_star: np.ndarray, min_counts: int = 3, n_iso_bins: int = 100) -> dict:
    """Agreement of a merged map with a reference map on the same grid.

    Uses voxels with ``counts >= min_counts`` where both are finite. Returns
    the Pearson correlation of the total signal, of the anisotropic signal
    (each map minus its own isotropic mean in ``n_iso_bins`` d* bins), the
    least-squares scale ``I ≈ scale · reference`` and the number of voxels.
    """
    use = (counts >= min_counts) & np.isfinite(reference) & np.isfinite(I)
    ref, val, ds = reference[use], I[use], d_star[use]
    span = ds.max() - ds.min() if ds.size else 1.0
    fine = np.clip(((ds - ds.min()) / (span or 1.0) * n_iso_bins).astype(np.int64), 0, n_iso_bins - 1)
    return {
        "n_voxels": int(use.sum()),
        "cc_total": _cc(ref, val),
        "cc_anisotropic": _cc(anisotropic_part(ref, fine, n_iso_bins),
                              anisotropic_part(val, fine, n_iso_bins)),
        "scale": float(np.dot(ref, val) / np.dot(ref, ref)) if use.any() else float("nan"),
    }


def shell_statistics(merged: MergedMap, unit_cell, n_shells: int = 10,
                     d_min: float | None = None, d_max: float | None = None,
                     n_iso_bins: int = 100) -> dict:
    """Per-shell table: completeness, multiplicity, ⟨I⟩, ⟨I/σ⟩, CC½ (total, anisotropic), Friedel CC.

    Shells are equal-volume in d*; the voxel population is the ASU voxels
    inside the resolution range. CC½ uses voxels measured in both halves.
    The Friedel CC correlates, over acentric voxels measured on both sides,
    I merged from h's side of each orbit with I from −h's side (present
    when the map was merged with ``hand``).
    The anisotropic CC½ first subtracts from each half its isotropic mean,
    taken in ``n_iso_bins`` narrow d* bins (much finer than the shells, so
    the radial fall-off inside a shell is removed too), then correlates.
    """
    vox = merged.asu_voxels()
    ds = voxel_d_star(merged.grid, vox, unit_cell)
    lo = 1.0 / d_max if d_max else 0.0
    hi = 1.0 / d_min if d_min else float(ds.max()) * (1 + 1e-9)
    edges = shell_edges(lo, hi, n_shells)
    shell = np.clip(np.searchsorted(edges, ds, side="right") - 1, 0, n_shells - 1)
    fine = np.clip(((ds - lo) / (hi - lo) * n_iso_bins).astype(np.int64), 0, n_iso_bins - 1)
    I = merged.I[vox]
    sig = merged.sigma[vox]
    cnt = merged.counts[vox]
    measured = cnt > 0
    have_halves = len(merged.half_I) >= 2
    if have_halves:
        h1 = merged.half_I[0][vox]
        h2 = merged.half_I[1][vox]
        both = np.isfinite(h1) & np.isfinite(h2)
        a1 = anisotropic_part(h1, fine, n_iso_bins, both)
        a2 = anisotropic_part(h2, fine, n_iso_bins, both)
    have_friedel = len(merged.friedel_I) == 2
    if have_friedel:
        fp = merged.friedel_I[0][vox]
        fm = merged.friedel_I[1][vox]
        pair = np.isfinite(fp) & np.isfinite(fm)

    def row(sel, d_lo, d_hi):
        m = sel & measured
        r = {
            "d_max": float(1 / d_lo) if d_lo > 0 else float("inf"),
            "d_min": float(1 / d_hi),
            "n_voxels": int(sel.sum()),
            "n_measured": int(m.sum()),
            "completeness": float(m.sum() / max(sel.sum(), 1)),
            "multiplicity": float(cnt[m].mean()) if m.any() else 0.0,
            "mean_I": float(np.mean(I[m])) if m.any() else np.nan,
            "mean_I_over_sigma": float(np.mean(I[m] / sig[m])) if m.any() else np.nan,
        }
        if have_halves:
            sb = sel & both
            r["n_cc"] = int(sb.sum())
            r["cc_half"] = _cc(h1[sb], h2[sb])
            r["cc_half_aniso"] = _cc(a1[sb], a2[sb])
        if have_friedel:
            sp = sel & pair
            r["n_friedel"] = int(sp.sum())
            r["cc_friedel"] = _cc(fp[sp], fm[sp])
        return r

    rows = [row(shell == s, edges[s], edges[s + 1]) for s in range(n_shells)]
    overall = row(np.ones(len(vox), dtype=bool), edges[0], edges[-1])
    return {"shells": rows, "overall": overall, "edges_d_star": edges.tolist()}


def format_statistics(stats: dict) -> str:
    head = (f"{'d_max':>7} {'d_min':>6} {'voxels':>9} {'compl':>6} {'mult':>6} "
            f"{'<I>':>10} {'<I/sig>':>8} {'CC1/2':>6} {'CC1/2an':>7} {'CCfried':>7}")
    lines = [head]

    def fmt(r, label=None):
        dmax = "inf" if not np.isfinite(r["d_max"]) else f"{r['d_max']:.2f}"
        return (f"{dmax:>7} {r['d_min']:>6.2f} {r['n_voxels']:>9d} {r['completeness']:>6.3f} "
                f"{r['multiplicity']:>6.1f} {r['mean_I']:>10.4g} {r['mean_I_over_sigma']:>8.2f} "
                f"{r.get('cc_half', np.nan):>6.3f} {r.get('cc_half_aniso', np.nan):>7.3f} "
                f"{r.get('cc_friedel', np.nan):>7.3f}")

    for r in stats["shells"]:
        lines.append(fmt(r))
    lines.append("overall:")
    lines.append(fmt(stats["overall"]))
    return "\n".join(lines)
