"""Radial I(|q|) and azimuthal I(χ) profiles from per-pixel arrays.

Units and conventions (see docs/conventions.md and docs/azimuthal_fit.md):

* ``q`` here is **q_inv_angstrom = 4π sin θ / λ = 2π/d = 2π·d*** (Å⁻¹), the
  SAXS / pyFAI ``q_A^-1`` convention. DIALS' ``|q| = |s1 − s0| = d* = 1/d`` is
  called ``d_star``. Conversions: :func:`q_from_d_star`, :func:`d_star_from_q`.
* χ (``chi_deg``) = ``atan2(s1_y, s1_x)`` in the DIALS lab frame, degrees in
  (−180, 180]. pyFAI's chi is mirrored with respect to it.
* Pixels are flattened panel-major, then slow, then fast (as in
  docs/file_formats.md), so multi-panel detectors are one 1D array.
* Masks follow DIALS: True = usable pixel.

Binning is vectorised: a :class:`Binning` stores one bin index per pixel
(masked or out-of-range pixels get the overflow index ``n_bins``), computed
once per geometry and reused for every image with ``np.bincount`` (in
cache-sized chunks, :func:`bincount_chunked`). Pixels
outside the detector's trusted range are found per image and removed from the
sums and pixel counts (:class:`ImageData`), so a bin that holds no usable pixel
is NaN, never zero.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli.azimuthal_pixels import TWO_PI, DetectorPixels, ImageData

logger = logging.getLogger("diffuse.azimuthal")


# ------------------------------------------------------------------ units


def q_from_d_star(d_star):
    """q_inv_angstrom (2π/d, Å⁻¹) from d* = 1/d (Å⁻¹)."""
    return TWO_PI * np.asarray(d_star, dtype=np.float64)


def d_star_from_q(q):
    """d* = 1/d (Å⁻¹) from q_inv_angstrom = 2π/d (Å⁻¹)."""
    return np.asarray(q, dtype=np.float64) / TWO_PI


def wrap_degrees(angle):
    """Wrap angles (degrees) into [−180, 180)."""
    return (np.asarray(angle, dtype=np.float64) + 180.0) % 360.0 - 180.0


def in_sector(chi_deg, centre_deg: float, width_deg: float) -> np.ndarray:
    """True where χ lies within ``width/2`` of ``centre`` (wrapping across ±180°)."""
    return np.abs(wrap_degrees(np.asarray(chi_deg) - centre_deg)) <= 0.5 * width_deg


# ------------------------------------------------------------------ binning


@dataclass
class Profile:
    """A 1D profile. ``x`` is q_inv_angstrom (radial) or chi_deg (azimuthal).

    I: mean intensity per bin (NaN where no usable pixel)
    sigma: standard error of the mean (see :meth:`Binning.integrate`)
    n_pixels: usable pixels per bin
    """

    kind: str
    x: np.ndarray
    edges: np.ndarray
    I: np.ndarray
    sigma: np.ndarray
    n_pixels: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def valid(self) -> np.ndarray:
        return self.n_pixels > 0

    def columns(self) -> dict:
        """Columns for CSV output, as documented in docs/azimuthal_fit.md."""
        if self.kind == "radial":
            q = self.x
            d_star = d_star_from_q(q)
            with np.errstate(divide="ignore"):
                d = np.where(d_star > 0, 1.0 / np.where(d_star > 0, d_star, 1.0), np.inf)
            return {
                "q_inv_angstrom": q,
                "d_star": d_star,
                "d": d,
                "I": self.I,
                "sigma": self.sigma,
                "n_pixels": self.n_pixels,
            }
        return {"chi_deg": self.x, "I": self.I, "sigma": self.sigma, "n_pixels": self.n_pixels}

    def write_csv(self, path) -> None:
        from diffuse_cli import program

        cols = self.columns()
        names = list(cols)
        with program.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(names)
            for row in zip(*(cols[n] for n in names)):
                w.writerow([_fmt(v) for v in row])

    def write_sasview(self, path) -> None:
        """SasView/SASfit-readable 3-column ASCII: q (Å⁻¹, 2π/d), I, dI.

        Empty bins are left out (SasView has no missing-value marker).
        """
        if self.kind != "radial":
            raise ValueError("SasView export is for radial profiles")
        from diffuse_cli import program

        ok = self.valid & np.isfinite(self.I) & np.isfinite(self.sigma)
        # one comment line: SasView's ASCII reader skips non-numeric lines
        lines = ["# diffuse.azimuthal_fit radial profile: q (1/A, 4 pi sin(theta)/lambda), I, sigma"]
        lines += [f"{q:.8g} {i:.8g} {s:.8g}" for q, i, s in zip(self.x[ok], self.I[ok], self.sigma[ok])]
        program.write_text(path, "\n".join(lines) + "\n")


_CHUNK = 1 << 16


def bincount_chunked(index, weights, minlength: int, chunk: int = _CHUNK) -> np.ndarray:
    """``np.bincount(index, weights, minlength)`` in cache-sized chunks.

    np.bincount first converts all the weights to float64; doing it 64k
    pixels at a time keeps that copy in cache (about 2.5x faster on a
    6M-pixel image than one call). Same result to the last bit for integer
    weights; float sums may differ in rounding order only. Many bins (2D
    maps) make the per-chunk output arrays cost more than they save, so
    those go in one call.
    """
    if index.size <= chunk or minlength > 8192:
        return np.bincount(index, weights=weights, minlength=minlength)
    out = np.zeros(minlength, dtype=np.float64)
    for start in range(0, index.size, chunk):
        stop = start + chunk
        out += np.bincount(index[start:stop], weights=weights[start:stop], minlength=minlength)
    return out


def _fmt(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if not np.isfinite(v):
        return "nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.8g}"


class Binning:
    """A precomputed assignment of pixels to bins, reused across images.

    index: (Npix,) intp; ``n_bins`` marks pixels not used (masked, out of range)
    centres, edges: bin centres/edges along x (None for 2D binnings; see
        ``shape`` and ``meta``)
    shape: None for 1D, or the 2D shape of the bins (C order) for maps

    When fewer than a quarter of the pixels are used (an azimuthal band, a
    sector), only the used pixels and their bins are kept, and each image is
    gathered at those pixels instead of binning the whole detector.
    """

    def __init__(self, index, n_bins: int, centres, edges, kind: str, shape=None, meta=None):
        index = np.asarray(index, dtype=np.intp)
        self.n_pixels_total = index.size
        self.n_bins = int(n_bins)
        used = index < self.n_bins
        n_used = int(np.count_nonzero(used))
        if n_used < index.size // 4:
            self.pixels = np.flatnonzero(used)
            self.index = np.ascontiguousarray(index[self.pixels])
        else:
            self.pixels = None
            self.index = np.ascontiguousarray(index)
        self.centres = None if centres is None else np.asarray(centres)
        self.edges = None if edges is None else np.asarray(edges)
        self.kind = kind
        self.shape = shape
        self.meta = dict(meta or {})
        self.static_counts = np.bincount(self.index, minlength=self.n_bins + 1)[: self.n_bins]
        self._bad_cache: tuple | None = None

    def _bad_counts(self, image: ImageData) -> np.ndarray:
        if image.bad.size == 0:
            return np.zeros(self.n_bins, dtype=np.int64)
        if self._bad_cache is not None and self._bad_cache[0] == image.bad_key:
            if np.array_equal(self._bad_cache[1], image.bad):
                return self._bad_cache[2]
        if self.pixels is None:
            bad_bins = self.index[image.bad]
        else:
            bad_bins = self.index[image.bad_flags[self.pixels]]
        counts = np.bincount(bad_bins, minlength=self.n_bins + 1)[: self.n_bins]
        self._bad_cache = (image.bad_key, image.bad, counts)
        return counts

    def integrate(self, image: ImageData, error_model: str = "poisson"):
        """Mean intensity per bin.

        Returns (I, sigma, n_pixels) as arrays of length ``n_bins``.

        error_model:
          ``poisson``: σ(mean) = sqrt(max(Σ I, 1)) / n, for raw counts (the
            variance of a sum of Poisson counts is its expectation);
          ``spread``: σ(mean) = std(I in bin) / sqrt(n), from the scatter of
            the pixels in the bin (includes any real anisotropy in the bin).
        """
        if image.values.size != self.n_pixels_total:
            raise ValueError(f"image has {image.values.size} pixels, the binning {self.n_pixels_total}")
        n = self.static_counts - self._bad_counts(image)
        nb = self.n_bins + 1
        if self.pixels is None:
            values = image.values
            sums = bincount_chunked(self.index, values, nb)[: self.n_bins]
            if image.bad.size:
                # take the unusable pixels back out (cheaper than zeroing a copy)
                bad_bins = self.index[image.bad]
                sums -= np.bincount(bad_bins, weights=image.bad_values, minlength=nb)[: self.n_bins]
        else:
            values = image.values[self.pixels].astype(np.float64)
            if image.bad.size:
                values[image.bad_flags[self.pixels]] = 0.0
            sums = np.bincount(self.index, weights=values, minlength=nb)[: self.n_bins]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, sums / n, np.nan)
            if error_model == "poisson":
                sigma = self._poisson_sigma(image, values, sums, n)
            elif error_model == "spread":
                v2 = np.square(values, dtype=np.float64)
                sq = bincount_chunked(self.index, v2, nb)[: self.n_bins]
                if self.pixels is None and image.bad.size:
                    sq -= np.bincount(bad_bins, weights=np.square(image.bad_values), minlength=nb)[: self.n_bins]
                var = np.maximum(sq / n - mean * mean, 0.0) * n / np.maximum(n - 1, 1)
                sigma = np.sqrt(var / n)
            else:
                raise ValueError(f"unknown error model {error_model!r}")
        sigma = np.where(n > 0, sigma, np.nan)
        return mean, sigma, n

    def _poisson_sigma(self, image: ImageData, values, sums, n) -> np.ndarray:
        """σ(mean) for counts: sqrt(Σ c)/n, floored at one count; with a
        multiplier m (values v = m·c), sqrt(Σ m·v)/n, floored at one count at
        the bin's mean multiplier."""
        m = image.multiplier
        if m is None:
            return np.sqrt(np.maximum(sums, 1.0)) / n
        nb = self.n_bins + 1
        if self.pixels is None:
            var = bincount_chunked(self.index, values * m, nb)[: self.n_bins]
            m_sum = bincount_chunked(self.index, m, nb)[: self.n_bins]
            if image.bad.size:
                bad_bins = self.index[image.bad]
                var -= np.bincount(bad_bins, weights=image.bad_values * m[image.bad], minlength=nb)[: self.n_bins]
                m_sum -= np.bincount(bad_bins, weights=m[image.bad], minlength=nb)[: self.n_bins]
        else:
            m_used = m[self.pixels].astype(np.float64)
            if image.bad.size:
                m_used[image.bad_flags[self.pixels]] = 0.0
            var = np.bincount(self.index, weights=values * m_used, minlength=nb)[: self.n_bins]
            m_sum = np.bincount(self.index, weights=m_used, minlength=nb)[: self.n_bins]
        return np.sqrt(np.maximum(var, (m_sum / n) ** 2)) / n

    def used_pixels(self) -> np.ndarray:
        """Flat indices of the pixels this binning uses (before per-image bad pixels)."""
        if self.pixels is not None:
            return self.pixels
        return np.flatnonzero(self.index < self.n_bins)

    def bin_of_pixels(self) -> np.ndarray:
        """(Npix,) bin index of every pixel, ``n_bins`` where unused."""
        if self.pixels is None:
            return self.index
        full = np.full(self.n_pixels_total, self.n_bins, dtype=np.intp)
        full[self.pixels] = self.index
        return full

    def profile(self, image: ImageData, error_model: str = "poisson") -> Profile:
        mean, sigma, n = self.integrate(image, error_model)
        return Profile(self.kind, self.centres, self.edges, mean, sigma, n, dict(self.meta))

    def map2d(self, image: ImageData, error_model: str = "poisson"):
        """Mean intensity as a 2D array of ``shape`` (NaN where empty) and counts."""
        mean, _, n = self.integrate(image, error_model)
        return mean.reshape(self.shape), n.reshape(self.shape)


def _bin_index(x, lo, hi, n_bins, use) -> np.ndarray:
    """Uniform bins on [lo, hi); pixels outside or not ``use`` get ``n_bins``."""
    width = (hi - lo) / n_bins
    idx = np.floor((x - lo) / width)
    ok = use & (idx >= 0) & (idx < n_bins)
    out = np.full(x.shape, n_bins, dtype=np.intp)
    out[ok] = idx[ok].astype(np.intp)
    return out


def default_q_range(pixels: DetectorPixels, mask: np.ndarray | None = None) -> tuple[float, float]:
    q = pixels.q if mask is None else pixels.q[mask]
    return float(q.min()), float(q.max()) * (1 + 1e-9)


def radial_binning(
    pixels: DetectorPixels,
    mask=None,
    n_bins: int = 500,
    q_range: tuple | None = None,
    sectors: list | None = None,
) -> Binning:
    """Bins uniform in q_inv_angstrom over ``q_range`` (default: the unmasked pixels).

    sectors: optional list of (centre_deg, width_deg); a pixel is used if it
    lies in any of them (each wraps across ±180°).
    """
    use = pixels.usable(mask)
    if sectors:
        sec = np.zeros(pixels.n_pixels, dtype=bool)
        for centre, width in sectors:
            sec |= in_sector(pixels.chi, centre, width)
        use = use & sec
    if q_range is None or q_range[0] is None or q_range[1] is None:
        lo, hi = default_q_range(pixels, use if use.any() else None)
        if q_range is not None:
            lo = q_range[0] if q_range[0] is not None else lo
            hi = q_range[1] if q_range[1] is not None else hi
    else:
        lo, hi = map(float, q_range)
    if not hi > lo:
        raise ValueError(f"empty q range [{lo}, {hi}]")
    edges = np.linspace(lo, hi, n_bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    index = _bin_index(pixels.q, lo, hi, n_bins, use)
    meta = {"sectors": [tuple(map(float, s)) for s in sectors] if sectors else []}
    return Binning(index, n_bins, centres, edges, "radial", meta=meta)


def azimuthal_binning(
    pixels: DetectorPixels,
    q_centre: float,
    q_tolerance: float,
    mask=None,
    n_bins: int = 180,
) -> Binning:
    """I(χ) of the pixels with |q − q_centre| <= q_tolerance (q_inv_angstrom).

    χ bins cover [−180°, 180°) uniformly; bin i is [−180 + i·w, −180 + (i+1)·w).
    """
    use = pixels.usable(mask)
    sel = np.flatnonzero(use & (np.abs(pixels.q - q_centre) <= q_tolerance))
    width = 360.0 / n_bins
    edges = -180.0 + width * np.arange(n_bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    index = np.full(pixels.n_pixels, n_bins, dtype=np.intp)
    index[sel] = np.floor((pixels.chi[sel] + 180.0) / width).astype(np.intp) % n_bins  # χ = 180 -> bin 0
    meta = {"q_centre": float(q_centre), "q_tolerance": float(q_tolerance)}
    return Binning(index, n_bins, centres, edges, "azimuthal", meta=meta)


def cake_binning(
    pixels: DetectorPixels, mask=None, n_q: int = 400, n_chi: int = 360, q_range: tuple | None = None
) -> Binning:
    """2D (|q|, χ) 'cake': shape (n_q, n_chi); q_inv_angstrom rows, χ columns."""
    use = pixels.usable(mask)
    lo, hi = q_range if q_range is not None else default_q_range(pixels, use if use.any() else None)
    iq = _bin_index(pixels.q, lo, hi, n_q, use)
    width = 360.0 / n_chi
    ichi = np.floor((pixels.chi + 180.0) / width).astype(np.intp) % n_chi
    index = np.where(iq < n_q, iq * n_chi + ichi, n_q * n_chi)
    q_edges = np.linspace(lo, hi, n_q + 1)
    chi_edges = -180.0 + width * np.arange(n_chi + 1)
    meta = {"q_edges": q_edges, "chi_edges": chi_edges}
    return Binning(index, n_q * n_chi, None, None, "cake", shape=(n_q, n_chi), meta=meta)


def qmap_binning(pixels: DetectorPixels, mask=None, n: int = 500, q_max: float | None = None) -> Binning:
    """Detector projected onto (q_x, q_y) (2π convention, Å⁻¹), an n×n grid.

    The grid is symmetric about 0 (centres at ±(i + ½)·w), so the
    centrosymmetric partner of cell [iy, ix] is [n−1−iy, n−1−ix].
    Array rows are q_y, columns q_x.
    """
    use = pixels.usable(mask)
    if q_max is None:
        q_max = float(max(np.abs(pixels.qx[use]).max(), np.abs(pixels.qy[use]).max())) * (1 + 1e-6)
    ix = _bin_index(pixels.qx.astype(np.float64), -q_max, q_max, n, use)
    iy = _bin_index(pixels.qy.astype(np.float64), -q_max, q_max, n, use)
    ok = (ix < n) & (iy < n)
    index = np.where(ok, iy * n + ix, n * n)
    edges = np.linspace(-q_max, q_max, n + 1)
    meta = {"qx_edges": edges, "qy_edges": edges}
    return Binning(index, n * n, None, None, "qmap", shape=(n, n), meta=meta)


def fill_centrosymmetric(map2d: np.ndarray, kind: str) -> np.ndarray:
    """Display-only: fill empty (NaN) cells from their centrosymmetric partner.

    qmap: partner of (q_x, q_y) is (−q_x, −q_y); cake: partner of (|q|, χ) is
    (|q|, χ + 180°) (needs an even number of χ bins). Friedel symmetry of
    diffuse intensity makes this a fair picture, not data.
    """
    out = map2d.copy()
    if kind == "qmap":
        partner = map2d[::-1, ::-1]
    elif kind == "cake":
        n_chi = map2d.shape[1]
        if n_chi % 2:
            raise ValueError("centrosymmetric fill of a cake needs an even number of χ bins")
        partner = np.roll(map2d, n_chi // 2, axis=1)
    else:
        raise ValueError(kind)
    empty = ~np.isfinite(out)
    out[empty] = partner[empty]
    return out


# ------------------------------------------------------------------ merged maps


def merged_map_d_star(h, k, l, unit_cell) -> np.ndarray:
    """d* = 1/d (Å⁻¹) of every voxel of a [h, k, l] grid, shape (nh, nk, nl)."""
    from cctbx import uctbx

    G = np.array(uctbx.unit_cell(tuple(float(v) for v in unit_cell)).reciprocal_metrical_matrix())
    # (a*², b*², c*², a*b*, a*c*, b*c*) : d*² = hᵀ G* h
    a2, b2, c2, ab, ac, bc = G
    H, K, L = np.meshgrid(h, k, l, indexing="ij")
    d2 = a2 * H * H + b2 * K * K + c2 * L * L + 2 * (ab * H * K + ac * H * L + bc * K * L)
    return np.sqrt(np.maximum(d2, 0.0))


def merged_radial_profile(merged: dict, n_bins: int = 200, q_range=None) -> Profile:
    """I(|q|) of a merged map (diffuse.merge's merged.npz arrays).

    The mean of the voxel intensities in each q_inv_angstrom shell over voxels
    with counts > 0 and finite I; sigma = sqrt(Σσ²)/n; n_pixels = voxels used.
    """
    I = np.asarray(merged["I"], dtype=np.float64)
    sig = np.asarray(merged["sigma"], dtype=np.float64)
    counts = np.asarray(merged["counts"])
    q = q_from_d_star(merged_map_d_star(merged["h"], merged["k"], merged["l"], merged["unit_cell"]))
    use = (counts > 0) & np.isfinite(I)
    if not use.any():
        raise ValueError("the merged map has no observed voxels")
    qu, Iu, su = q[use], I[use], np.where(np.isfinite(sig[use]), sig[use], 0.0)
    lo, hi = q_range if q_range is not None else (float(qu.min()), float(qu.max()) * (1 + 1e-9))
    edges = np.linspace(lo, hi, n_bins + 1)
    idx = _bin_index(qu, lo, hi, n_bins, np.ones(qu.shape, dtype=bool))
    n = np.bincount(idx, minlength=n_bins + 1)[:n_bins]
    s = np.bincount(idx, weights=Iu, minlength=n_bins + 1)[:n_bins]
    v = np.bincount(idx, weights=su * su, minlength=n_bins + 1)[:n_bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / n, np.nan)
        sigma = np.where(n > 0, np.sqrt(v) / n, np.nan)
    return Profile("radial", 0.5 * (edges[1:] + edges[:-1]), edges, mean, sigma, n, {"source": "merged"})
