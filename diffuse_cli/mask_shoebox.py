"""Bragg mask from DIALS reflection shoeboxes (method=shoebox)."""

from __future__ import annotations

import logging

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli.extraction import DetectorGeometry

logger = logging.getLogger(__name__)


def shoebox_bragg_mask(reflections, geometry: DetectorGeometry, frame: int | None = None, codes=("foreground", "strong")) -> np.ndarray:
    """True on pixels inside shoebox Foreground/Strong masks (flat, Npix).

    reflections: rows of one image's experiment with a ``shoebox`` column.
    frame: for rotation data, the image's absolute dxtbx array index (the
    units of bbox z, see :mod:`diffuse_cli.frames`); only the z-slice of each
    shoebox at that frame is projected (a reflection spans its bbox z-range).
    Stills: every shoebox's single slice.
    """
    from dials.algorithms.shoebox import MaskCode

    if "shoebox" not in reflections:
        raise Sorry("method=shoebox needs reflections with shoeboxes")
    want = 0
    for c in codes:
        want |= {"foreground": MaskCode.Foreground, "strong": MaskCode.Strong}[c]
    out = np.zeros(geometry.n_pixels, dtype=bool)
    bbox = np.array(reflections["bbox"], dtype=np.int64).reshape(-1, 6)
    panel = reflections["panel"].as_numpy_array().astype(np.int64)
    if frame is not None:
        keep = (bbox[:, 4] <= frame) & (frame < bbox[:, 5])
    else:
        keep = np.ones(len(bbox), dtype=bool)
    sel = np.flatnonzero(keep)
    if sel.size == 0:
        return out
    # shoebox masks are separate C++ objects: gather them once (one call per
    # reflection), then everything else is array code
    shoeboxes = reflections["shoebox"]
    masks = [shoeboxes[int(i)].mask.as_numpy_array() for i in sel]
    x0, x1, y0, y1, z0, z1 = bbox[sel].T
    nz, ny, nx = z1 - z0, y1 - y0, x1 - x0
    # rows DIALS never integrated (e.g. indexed strong spots of a sweep) carry an
    # empty shoebox: they have no mask to project
    filled = np.array([m.size == a * b * c for m, a, b, c in zip(masks, nz, ny, nx)], dtype=bool)
    if not filled.any():
        raise Sorry("method=shoebox: the reflections have no shoebox data at this image "
                    "(use integrated reflections with shoeboxes, or method=predicted)")
    if not filled.all():
        logger.debug("method=shoebox: %d of %d reflections without shoebox data skipped",
                     int((~filled).sum()), filled.size)
        sel = sel[filled]
        masks = [m for m, f in zip(masks, filled) if f]
        x0, x1, y0, y1, z0, z1 = bbox[sel].T
        nz, ny, nx = z1 - z0, y1 - y0, x1 - x0
    zi = np.zeros(sel.size, dtype=np.int64) if frame is None else frame - z0
    flat_masks = np.concatenate([
        m.reshape(nz_, ny_ * nx_)[z_] for m, nz_, ny_, nx_, z_ in zip(masks, nz, ny, nx, zi)
    ])
    sizes = ny * nx
    owner = np.repeat(np.arange(sel.size), sizes)
    local = np.arange(flat_masks.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    yy = y0[owner] + local // nx[owner]
    xx = x0[owner] + local % nx[owner]
    pan = panel[sel][owner]
    n_slow = geometry.panel_shapes[pan, 0]
    n_fast = geometry.panel_shapes[pan, 1]
    ok = ((flat_masks & want) != 0) & (yy >= 0) & (yy < n_slow) & (xx >= 0) & (xx < n_fast)
    flat_index = geometry.panel_offsets[pan[ok]] + yy[ok] * n_fast[ok] + xx[ok]
    out[flat_index] = True
    return out
