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


def voxel_d_star(grid: HKLGrid, flat: np.ndarray, unit_cell, chunk: int = 1 << 20) -> np.ndarray:
    """d* (Å⁻¹) of voxel centres for the reference cell (in chunks: no (N, 3) temporaries)."""
    g = reciprocal_metric(unit_cell)
    flat = np.asarray(flat)
    out = np.empty(len(flat))
    for a in range(0, len(flat), chunk):
        h = voxel_hkl(grid, flat[a:a + chunk])
        out[a:a + chunk] = np.sqrt(np.einsum("ni,ij,nj->n", h, g, h))
    return out


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
    """Pearson correlation (NaN for < 3 points or a constant input), in float64 chunks."""
    if len(x) < 3:
        return np.nan
    mx, my = np.mean(x, dtype=np.float64), np.mean(y, dtype=np.float64)
    sxx = syy = sxy = 0.0
    for a in range(0, len(x), 1 << 20):
        dx = np.asarray(x[a:a + (1 << 20)], dtype=np.float64) - mx
        dy = np.asarray(y[a:a + (1 << 20)], dtype=np.float64) - my
        sxx, syy, sxy = sxx + float(dx @ dx), syy + float(dy @ dy), sxy + float(dx @ dy)
    if sxx == 0 or syy == 0:
        return np.nan
    return float(sxy / np.sqrt(sxx * syy))


def _cc_split(x, y, mask, shell, shells):
    """Pearson correlation of x and y where ``mask``, over the voxels of ``shells`` (shell
    number per voxel ``shell``, or per shell its voxels' indices in increasing order), two-pass
    in float64 one shell at a time (NaN: < 3 points)."""
    def parts():
        for k in shells:
            if isinstance(shell, list):
                sel = shell[k][mask[shell[k]]]  # the same voxels in the same order as the mask
            else:
                sel = mask & (shell == k)
            yield x[sel], y[sel]

    n, sx, sy = 0, 0.0, 0.0
    for a, b in parts():
        n, sx, sy = n + len(a), sx + float(a.sum(dtype=np.float64)), sy + float(b.sum(dtype=np.float64))
    if n < 3:
        return np.nan
    mx, my = sx / n, sy / n
    sxx = syy = sxy = 0.0
    for a, b in parts():
        dx, dy = a.astype(np.float64) - mx, b.astype(np.float64) - my
        sxx, syy, sxy = sxx + float(dx @ dx), syy + float(dy @ dy), sxy + float(dx @ dy)
    if sxx == 0 or syy == 0:
        return np.nan
    return float(sxy / np.sqrt(sxx * syy))


def anisotropic_part(values: np.ndarray, d_star_bin: np.ndarray, n_bins: int,
                     select: np.ndarray | None = None) -> np.ndarray:
    """values minus the mean of ``values[select]`` in their narrow d* bin."""
    sel = np.isfinite(values) if select is None else select
    b = d_star_bin[sel]
    n = np.maximum(np.bincount(b, None, n_bins), 1)
    iso = np.bincount(b, values[sel], n_bins) / n
    return values - iso[d_star_bin]


def _anisotropic_part32(values, d_star_bin, n_bins, select):
    """:func:`anisotropic_part` of float32 half maps, in float32 (their precision)."""
    b = d_star_bin[select]
    n = np.maximum(np.bincount(b, None, n_bins), 1)
    iso = (np.bincount(b, values[select], n_bins) / n).astype(np.float32)
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
    cm = merged.compact()  # values at the ASU voxels only (no full-grid arrays)
    vox = cm.pop("voxels")
    lo = 1.0 / d_max if d_max else 0.0
    chunk = 1 << 20  # voxels at a time: d* and the bins without map-sized float64 temporaries
    hi = 1.0 / d_min if d_min else max((float(voxel_d_star(merged.grid, vox[a:a + chunk], unit_cell).max())
                                        for a in range(0, len(vox), chunk)), default=1.0) * (1 + 1e-9)
    edges = shell_edges(lo, hi, n_shells)
    shell = np.empty(len(vox), dtype=np.int16 if n_shells < 2**15 else np.int32)
    fine = np.empty(len(vox), dtype=np.int16 if n_iso_bins < 2**15 else np.int32)
    for a in range(0, len(vox), chunk):
        ds = voxel_d_star(merged.grid, vox[a:a + chunk], unit_cell)
        shell[a:a + chunk] = np.clip(np.searchsorted(edges, ds, side="right") - 1, 0, n_shells - 1)
        fine[a:a + chunk] = np.clip(((ds - lo) / (hi - lo) * n_iso_bins).astype(np.int64), 0, n_iso_bins - 1)
    del vox
    I = cm["I"]
    sig = cm["sigma"]
    cnt = cm["counts"]
    measured = cnt > 0
    have_halves = len(cm["half_I"]) >= 2
    if have_halves:
        h1 = cm["half_I"][0]
        h2 = cm["half_I"][1]
        both = np.isfinite(h1) & np.isfinite(h2)
        a1 = _anisotropic_part32(h1, fine, n_iso_bins, both)
        a2 = _anisotropic_part32(h2, fine, n_iso_bins, both)
    have_friedel = len(cm["friedel_I"]) == 2
    if have_friedel:
        fp = cm["friedel_I"][0]
        fm = cm["friedel_I"][1]
        pair = np.isfinite(fp) & np.isfinite(fm)

    # each shell's voxels (indices, increasing): a shell's selections then cost its own size;
    # the same elements in the same order as the boolean masks, so the same sums. One shell
    # at a time and in int32: an argsort of the whole map would hold 8 bytes per voxel twice
    index_type = np.int32 if len(shell) < 2**31 else np.int64
    members = [np.flatnonzero(shell == k).astype(index_type) for k in range(n_shells)]

    def row(shells, d_lo, d_hi):
        # the row's voxels are those of ``shells``, taken one shell at a time (no copies of the whole map)
        n_vox = n_meas = 0
        s_cnt = s_I = s_ios = 0.0
        for k in shells:
            sel = members[k]
            m = sel[measured[sel]]
            n_vox += len(sel)
            n_meas += len(m)
            s_cnt += float(cnt[m].sum(dtype=np.float64))
            s_I += float(I[m].sum(dtype=np.float64))
            s_ios += float((I[m] / sig[m]).sum(dtype=np.float64))
        r = {
            "d_max": float(1 / d_lo) if d_lo > 0 else float("inf"),
            "d_min": float(1 / d_hi),
            "n_voxels": n_vox,
            "n_measured": n_meas,
            "completeness": float(n_meas / max(n_vox, 1)),
            "multiplicity": s_cnt / n_meas if n_meas else 0.0,
            "mean_I": s_I / n_meas if n_meas else np.nan,
            "mean_I_over_sigma": s_ios / n_meas if n_meas else np.nan,
        }
        if have_halves:
            r["n_cc"] = int(sum(int(both[members[k]].sum()) for k in shells))
            r["cc_half"] = _cc_split(h1, h2, both, members, shells)
            r["cc_half_aniso"] = _cc_split(a1, a2, both, members, shells)
        if have_friedel:
            r["n_friedel"] = int(sum(int(pair[members[k]].sum()) for k in shells))
            r["cc_friedel"] = _cc_split(fp, fm, pair, members, shells)
        return r

    rows = [row([k], edges[k], edges[k + 1]) for k in range(n_shells)]
    overall = row(range(n_shells), edges[0], edges[-1])
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
