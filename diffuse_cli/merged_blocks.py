"""The merged map block by block, for diffuse.merge's outputs (:mod:`diffuse_cli.merge_driver`):
ranges of h-planes (:func:`map_blocks`), d* of their voxels, the radial profile summed
block by block and the dense I, σ and counts of a block from the merged ASU voxels.
"""

from __future__ import annotations

import numpy as np


def map_blocks(grid, block_bytes: int = 64 << 20) -> list[tuple[int, int]]:
    """Ranges [i0, i1) of h-planes, each about ``block_bytes`` of float64 (the outputs' unit)."""
    step = max(1, block_bytes // (8 * grid.shape[1] * grid.shape[2]))
    return [(i, min(grid.shape[0], i + step)) for i in range(0, grid.shape[0], step)]


def block_d_star(grid, unit_cell, i0: int, i1: int) -> np.ndarray:
    """d* (Å⁻¹) of the voxel centres of h-planes [i0, i1) (as merge_statistics.grid_d_star)."""
    from diffuse_cli.symmetry import reciprocal_metric

    g = reciprocal_metric(unit_cell)
    h, k, l = grid.axes()
    h, k, l = h[i0:i1, None, None], k[None, :, None], l[None, None, :]
    out = g[0, 0] * h * h + g[1, 1] * k * k
    out = out + (g[2, 2] * l * l + 2 * g[1, 2] * k * l)
    out += 2 * g[0, 1] * h * k
    out += 2 * g[0, 2] * h * l
    return np.sqrt(np.maximum(out, 0.0, out=out), out=out)


def radial_profile_blocks(merged, grid, unit_cell, d_star_max: float, blocks, n_bins: int = 60):
    """absolute_scale.radial_profile of the dense merged I, summed block by block:
    (bin centres Å⁻¹, means, counts)."""
    from diffuse_cli import merge_compact

    n = np.zeros(n_bins, dtype=np.int64)
    s = np.zeros(n_bins)
    I = merged.compact()["I"]
    if hasattr(merged, "slab_table") and merge_compact.HAVE_NUMBA:  # one compiled pass a block, no dense arrays
        from diffuse_cli.symmetry import reciprocal_metric

        g = reciprocal_metric(unit_cell)
        h, k, l = grid.axes()
        I = np.ascontiguousarray(I, dtype=np.float64)
        for i0, i1 in blocks:
            nb, sb = np.zeros(n_bins, dtype=np.int64), np.zeros(n_bins)  # a block's sums, then the total (as below)
            merge_compact._radial_sums(merged.slab_table(i0, i1), I, h[i0:i1], k, l, g, float(d_star_max), n_bins,
                                       nb, sb)
            n += nb
            s += sb
        blocks = ()
    for i0, i1 in blocks:
        v = merged.expand_slab(I, i0, i1).ravel()
        ds = block_d_star(grid, unit_cell, i0, i1).ravel()
        ok = np.isfinite(v) & (ds <= d_star_max)
        b = np.minimum((ds[ok] / d_star_max * n_bins).astype(np.int64), n_bins - 1)
        n += np.bincount(b, minlength=n_bins)
        s += np.bincount(b, v[ok], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / n, np.nan)
    return (np.arange(n_bins) + 0.5) * d_star_max / n_bins, mean, n


def dense_blocks(merged, grid, unit_cell, scale=None):
    """Functions (i0, i1) → the dense I, σ (float32; in electron units with an absolute
    ``scale``) and counts (int64) of h-planes [i0, i1), from the merged ASU voxels."""
    from diffuse_cli import absolute_scale as absc

    cm = merged.compact()
    # the float32 values per compact voxel once (rounding each value then copying it equals
    # copying then rounding): each block is then one gather
    I32 = cm["I"].astype(np.float32) if scale is None else None
    sig32 = (cm["sigma"] if scale is None else scale.K * cm["sigma"]).astype(np.float32)  # as to_electron_units

    def intensity(i0, i1):
        if I32 is not None:
            return merged.expand_slab(I32, i0, i1, fill=np.float32(np.nan))
        I = merged.expand_slab(cm["I"], i0, i1)
        I = absc.to_electron_units(I, 0.0, block_d_star(grid, unit_cell, i0, i1), scale)[0]
        return I.astype(np.float32)

    def sigma(i0, i1):
        return merged.expand_slab(sig32, i0, i1, fill=np.float32(np.nan))

    return intensity, sigma, lambda i0, i1: merged.expand_slab(cm["counts"], i0, i1, fill=0, dtype=np.int64)
