"""Pixel masks that do not depend on the crystal: static, dynamic (hot/dead) and strong pixels.

True = usable (see :mod:`diffuse_cli.masking`); flat numpy bool arrays in
pixel order.
"""

from __future__ import annotations

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry
from scitbx.array_family import flex

from diffuse_cli.extraction import DetectorGeometry, raw_counts
from diffuse_cli.formats.masks import from_dials


def static_mask(imageset, masking_params, geometry: DetectorGeometry, image_index: int = 0,
                counts: np.ndarray | None = None) -> np.ndarray:
    """Static mask (True = usable), flat.

    Combines ``dials.util.masking.generate_mask`` (border, untrusted panels /
    circles / rectangles / polygons / pixels, d_min, d_max, resolution ranges,
    ice rings) with the image's own mask (``imageset.get_mask``: the format's
    static mask, e.g. panel gaps, and the trusted range of one image). Pixels
    above the upper trusted value are not put in the static mask (overloads
    move from still to still; they are removed per still). counts: the
    image's raw counts, when the caller has read them.
    """
    import copy

    from dials.util.masking import generate_mask

    # an .extract()ed .multiple scope holds one all-None "untrusted" entry,
    # which generate_mask reads as "mask the whole of panel 0": drop it
    masking_params = copy.deepcopy(masking_params)
    masking_params.untrusted = [
        u for u in masking_params.untrusted
        if any(v is not None for v in (u.panel, u.circle, u.rectangle, u.polygon, u.pixel))
    ]
    user = from_dials(generate_mask(imageset, masking_params))
    image = from_dials(imageset.get_mask(image_index))
    if counts is None:
        counts = raw_counts(imageset, image_index)
    over = np.zeros(counts.shape, dtype=bool)
    off = geometry.panel_offsets
    for i, panel in enumerate(imageset.get_detector()):
        over[off[i] : off[i + 1]] = counts[off[i] : off[i + 1]] >= panel.get_trusted_range()[1]
    return user & (image | over)


def dynamic_mask(
    images,
    geometry: DetectorGeometry,
    valid: np.ndarray,
    hot_n_sigma: float = 10.0,
    hot_min_excess: float = 5.0,
    dead_min_expected: float = 20.0,
    filter_size: int = 5,
    hot_fraction: float = 1.0,
    min_hot_images: int = 1,
) -> tuple[np.ndarray, dict]:
    """Hot and dead pixels from a set of images (True = usable), flat.

    images: flat count arrays (one per still), as a sequence or a callable
    returning a fresh iterable (read up to three times: for the reference,
    then twice to count, with hot_fraction < 1); valid: the static mask. Per
    pixel over the N images: mean m, maximum hi. The local reference b is the median of m over a
    ``filter_size`` square (per panel, invalid pixels replaced by the panel
    median).

    * hot: above b + hot_min_excess + hot_n_sigma·sqrt(b), i.e. above the
      Poisson range of the neighbourhood, in at least ``hot_fraction``·N and
      ``min_hot_images`` of the images (a Bragg peak moves from still to still
      and lasts a few frames of a sweep; a hot pixel stays);
    * dead: hi == 0 (never counted) while N·b >= dead_min_expected counts were
      expected (Poisson probability e^-N·b).
    """
    from scipy.ndimage import maximum_filter, minimum_filter

    from diffuse_cli.mask_rotation import filled_panels, local_background

    def each_image():
        return images() if callable(images) else iter(images)

    total = lo = hi = None
    n = 0
    for counts in each_image():
        c = counts.astype(np.float32)
        if total is None:
            total = np.zeros(c.shape, dtype=np.float64)
            lo, hi = c.copy(), c.copy()
        total += c
        np.minimum(lo, c, out=lo)
        np.maximum(hi, c, out=hi)
        n += 1
    if n == 0:
        raise Sorry("No images for the dynamic mask")
    mean = (total / n).astype(np.float32)
    filled = filled_panels(mean, valid, geometry)

    def threshold(b):
        return b + hot_min_excess + hot_n_sigma * np.sqrt(np.maximum(b, 0))

    # b lies between its window's minimum and maximum, and the threshold and N·b grow with b
    # (also as rounded): b, the filter_size² median, is taken only where those bounds leave
    # a test open (a few pixels; the same values as the whole-frame median filter)
    b_lo = np.concatenate([minimum_filter(f, size=filter_size, mode="nearest").ravel() for f in filled])
    b_hi = np.concatenate([maximum_filter(f, size=filter_size, mode="nearest").ravel() for f in filled])
    need = max(int(np.ceil(hot_fraction * n)), int(min_hot_images))
    if hot_fraction >= 1.0:
        maybe_hot = valid & (lo > threshold(b_lo))
    else:
        above = np.zeros(mean.shape, dtype=np.int32)
        t_lo = threshold(b_lo)
        for counts in each_image():
            above += counts > t_lo
        maybe_hot = valid & (above >= need)
    at = np.flatnonzero(maybe_hot | (valid & (hi == 0) & (n * b_hi >= dead_min_expected)))
    ref = local_background(mean, valid, geometry, filter_size, at=at, filled=filled)
    t_at = threshold(ref)
    if hot_fraction >= 1.0:
        hot_at = lo[at] > t_at
    else:
        above_at = np.zeros(len(at), dtype=np.int32)
        for counts in each_image():
            above_at += counts[at] > t_at
        hot_at = above_at >= need
    hot = np.zeros(mean.shape, dtype=bool)
    dead = np.zeros(mean.shape, dtype=bool)
    hot[at] = hot_at & maybe_hot[at]
    dead[at] = valid[at] & (hi[at] == 0) & (n * ref >= dead_min_expected)
    stats = {"n_images": n, "hot": int(hot.sum()), "dead": int(dead.sum())}
    return ~(hot | dead), stats


def strong_pixel_mask(
    counts: np.ndarray,
    valid: np.ndarray,
    geometry: DetectorGeometry,
    n_sigma_b: float = 6.0,
    n_sigma_s: float = 3.0,
    global_threshold: float = 0.0,
    min_local: int = 2,
    gain: float | None = None,
    min_spot_size: int = 3,
    dilation_px: int = 3,
) -> np.ndarray:
    """True on pixels of observed spots (flat, Npix), indexed or not.

    DIALS's spot-finding dispersion threshold (``DispersionThreshold``, 7×7
    window, the ``n_sigma_b``/``n_sigma_s`` tests of ``dials.find_spots``)
    per panel; connected groups smaller than ``min_spot_size`` pixels are
    dropped (isolated noise), the rest grown by ``dilation_px`` pixels (disc).
    This catches spots of lattices the indexer missed, which the predicted
    mask cannot know about. ``gain``: detector gain (counts per photon).
    """
    from scipy import ndimage

    from dials.algorithms.image import threshold

    out = np.zeros(geometry.n_pixels, dtype=bool)
    off = geometry.panel_offsets
    r = int(dilation_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = xx**2 + yy**2 <= r * r + 0.5
    for i, shape in enumerate(geometry.panel_shapes):
        sl = slice(off[i], off[i + 1])
        shape = tuple(int(v) for v in shape)
        image = flex.double(np.ascontiguousarray(counts[sl].reshape(shape), dtype=np.float64))
        mask = flex.bool(np.ascontiguousarray(valid[sl].reshape(shape)))
        algorithm = threshold.DispersionThreshold(image.all(), (3, 3), n_sigma_b, n_sigma_s, global_threshold, min_local)
        result = flex.bool(flex.grid(image.all()))
        if gain:
            algorithm(image, mask, flex.double(image.accessor(), gain), result)
        else:
            algorithm(image, mask, result)
        strong = result.as_numpy_array()
        if min_spot_size > 1 and strong.any():
            labels, n = ndimage.label(strong, structure=np.ones((3, 3)))
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_spot_size
            keep[0] = False
            strong = keep[labels]
        if r > 0 and strong.any():
            strong = ndimage.binary_dilation(strong, structure=disc)
        out[sl] = strong.ravel()
    return out & valid
