"""Picture of an image's masks (diffuse.bragg_mask output.png)."""

from __future__ import annotations

import logging

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli.extraction import raw_counts, trusted_mask
from diffuse_cli.formats.masks import read_mask

logger = logging.getLogger("diffuse.masking")


def write_png(entries, experiments, geometry_by_key, static_by_key, params) -> str:
    """Draw the image with static-masked pixels (blue) and Bragg pixels (red)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffuse_cli import program

    i = params.output.png.still
    if not 0 <= i < len(entries):
        raise Sorry(f"output.png.still={i} out of range (0..{len(entries) - 1})")
    e = entries[i]
    expt = experiments[e["experiments"][0]]
    geometry = geometry_by_key[e["geometry_key"]]
    counts = raw_counts(expt.imageset, e.get("imageset_index", 0)).astype(np.float64)
    total = read_mask(os.path.join(params.output.directory, e["mask"]))
    static = static_by_key[e["geometry_key"]]
    valid = static & trusted_mask(expt.detector, counts, geometry)
    bragg = valid & ~total
    panels = list(zip(geometry.split(counts), geometry.split(valid), geometry.split(bragg)))
    # tile panels in a grid (single panel: just the panel)
    ncol = int(np.ceil(np.sqrt(len(panels))))
    h = max(p[0].shape[0] for p in panels)
    w = max(p[0].shape[1] for p in panels)
    nrow = int(np.ceil(len(panels) / ncol))
    img = np.full((nrow * h, ncol * w), np.nan)
    rgba = np.zeros((nrow * h, ncol * w, 4))
    for k, (c, v, b) in enumerate(panels):
        r0, c0 = (k // ncol) * h, (k % ncol) * w
        img[r0 : r0 + c.shape[0], c0 : c0 + c.shape[1]] = np.where(v, c, np.nan)
        ov = rgba[r0 : r0 + c.shape[0], c0 : c0 + c.shape[1]]
        ov[~v] = (0.2, 0.3, 1.0, 0.6)
        ov[b] = (1.0, 0.0, 0.0, 0.45)
    vmax = np.nanpercentile(img, 99.5) if np.isfinite(img).any() else 1
    region = params.output.png.region
    ncols = 2 if region else 1
    fig, axes = plt.subplots(1, ncols, figsize=(8 * ncols, 8), squeeze=False)
    for ax, reg in zip(axes[0], [None, region]):
        ax.imshow(img, cmap="Greys", vmin=0, vmax=vmax, interpolation="nearest")
        ax.imshow(rgba, interpolation="nearest")
        if reg:
            x0, x1, y0, y1 = reg
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)
            axes[0][0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime"))
        ax.set_xlabel("fast (px)")
        ax.set_ylabel("slow (px)")
    axes[0][0].set_title(
        f"{e['name']}: Bragg (red) {100 * e.get('bragg_fraction', float('nan')):.1f} %, "
        f"static (blue); total masked {100 * e['total_fraction_masked']:.1f} %"
    )
    fname = os.path.join(params.output.directory, params.output.png.filename)
    if "%d" in fname:
        fname = fname % i
    program.save_figure(fname, fig)
    logger.info("Wrote %s", fname)
    return fname
