"""Per-pixel |q| (q_inv_angstrom = 2π/d), χ and trusted range of a detector + beam, and one image's
values ready for binning (:mod:`diffuse_cli.azimuthal`); pixels flattened panel-major, masks True = usable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli import geometry

TWO_PI = 2.0 * np.pi


# ------------------------------------------------------------------ pixels


def flatten_panels(panels) -> np.ndarray:
    """Concatenate per-panel 2D arrays (flex or numpy) panel-major into 1D."""
    if not isinstance(panels, (tuple, list)):
        panels = (panels,)
    arrays = [p.as_numpy_array() if hasattr(p, "as_numpy_array") else np.asarray(p) for p in panels]
    if len(arrays) == 1:
        return arrays[0].reshape(-1)
    return np.concatenate([a.reshape(-1) for a in arrays])


# a DIALS mask file as its tuple of flex.bool per panel (True = usable)
from diffuse_cli.formats.masks import read_mask_panels as read_mask  # noqa: E402,F401


@dataclass
class DetectorPixels:
    """Per-pixel |q|, χ and (q_x, q_y) of a detector + beam, flattened panel-major.

    q: q_inv_angstrom = 2π|s1 − s0| (Å⁻¹), float64, shape (Npix,)
    chi: χ = atan2(s1_y, s1_x) in degrees, (−180, 180], float64
    qx, qy: 2π·(q_x, q_y) lab-frame components (Å⁻¹), float32, for q-space maps
    panel_shapes: (n_slow, n_fast) per panel
    trusted_low, trusted_high: per-pixel trusted range (float64 arrays), or
        scalars when every panel shares one range. DIALS keeps a pixel when
        ``low < value < high``.
    """

    q: np.ndarray
    chi: np.ndarray
    qx: np.ndarray
    qy: np.ndarray
    panel_shapes: list
    wavelength: float
    trusted_low: object = None
    trusted_high: object = None

    @classmethod
    def from_models(cls, detector, beam) -> "DetectorPixels":
        wavelength = beam.get_wavelength()
        s0 = np.array(beam.get_s0(), dtype=np.float64)
        qs, chis, qxs, qys, shapes, lows, highs = [], [], [], [], [], [], []
        for panel in detector:
            # one panel at a time keeps the (n, 3) temporaries small
            lab = geometry.pixel_lab_coordinates(panel).reshape(-1, 3)
            s1 = geometry.s1_from_lab(lab, wavelength)
            del lab
            qv = geometry.q_from_s1(s1, s0)
            qs.append(TWO_PI * np.linalg.norm(qv, axis=-1))
            chis.append(geometry.chi_degrees(s1))
            qxs.append((TWO_PI * qv[:, 0]).astype(np.float32))
            qys.append((TWO_PI * qv[:, 1]).astype(np.float32))
            n_fast, n_slow = panel.get_image_size()
            shapes.append((n_slow, n_fast))
            lo, hi = panel.get_trusted_range()
            lows.append(lo)
            highs.append(hi)
        if len(set(lows)) == 1 and len(set(highs)) == 1:
            trusted_low, trusted_high = float(lows[0]), float(highs[0])
        else:
            sizes = [s[0] * s[1] for s in shapes]
            trusted_low = np.repeat(np.array(lows, dtype=np.float64), sizes)
            trusted_high = np.repeat(np.array(highs, dtype=np.float64), sizes)
        return cls(
            q=np.concatenate(qs),
            chi=np.concatenate(chis),
            qx=np.concatenate(qxs),
            qy=np.concatenate(qys),
            panel_shapes=shapes,
            wavelength=wavelength,
            trusted_low=trusted_low,
            trusted_high=trusted_high,
        )

    @property
    def n_pixels(self) -> int:
        return int(self.q.size)

    def usable(self, mask=None) -> np.ndarray:
        """1D bool of usable pixels from None, a flat bool array, or a per-panel mask."""
        if isinstance(mask, np.ndarray) and mask.ndim == 1:
            if mask.size != self.n_pixels:
                raise ValueError(f"flat mask has {mask.size} pixels, the detector {self.n_pixels}")
            return mask.astype(bool, copy=False)
        return self.flat_mask(mask)

    def flat_mask(self, mask=None) -> np.ndarray:
        """A DIALS mask (tuple of flex.bool / arrays, True = usable) as 1D bool."""
        if mask is None:
            return np.ones(self.n_pixels, dtype=bool)
        if not isinstance(mask, (tuple, list)):
            mask = (mask,)
        if len(mask) != len(self.panel_shapes):
            raise ValueError(
                f"mask has {len(mask)} panels but the detector has {len(self.panel_shapes)}"
            )
        for m, shape in zip(mask, self.panel_shapes):
            m_shape = np.shape(m) if isinstance(m, np.ndarray) else tuple(m.all())  # flex: grid
            if tuple(m_shape) != tuple(shape):
                raise ValueError(f"mask panel shape {tuple(m_shape)} differs from detector panel {shape}")
        return flatten_panels(mask).astype(bool, copy=False)


# ------------------------------------------------------------------ image data


class ImageData:
    """One image's pixel values ready for binning.

    values: (Npix,) the raw values, flattened panel-major (dtype kept: no
        float copy of a 6M-pixel image; np.bincount converts on the fly)
    bad: flat indices of unusable pixels (outside the trusted range
        ``low < v < high``, or not finite); :meth:`Binning.integrate` removes
        them from the sums and from the pixel counts
    bad_values: float64 values at ``bad`` (0 where not finite, in which case
        ``values`` is a float copy with those pixels set to 0)
    multiplier: None, or (Npix,) per-pixel factors m applied to the raw
        counts c (e.g. diffuse.correct's multipliers / exposure time):
        ``values`` = m·c, and the Poisson variance of a value is m·(m·c)

    Consecutive images with the same bad pixels (detector gaps, dead pixels)
    reuse each binning's per-bin bad-pixel counts (see ``bad_key``).
    """

    __slots__ = ("values", "bad", "bad_values", "bad_key", "_bad_flags", "multiplier")

    def __init__(self, raw, pixels: DetectorPixels, multiplier: np.ndarray | None = None):
        values = flatten_panels(raw)
        if values.size != pixels.n_pixels:
            raise ValueError(f"image has {values.size} pixels, the detector {pixels.n_pixels}")
        lo, hi = pixels.trusted_low, pixels.trusted_high
        is_float = values.dtype.kind == "f"
        nonfinite = ~np.isfinite(values) if is_float else None
        if lo is None:
            bad_flags = nonfinite
        else:
            bad_flags = (values <= lo) | (values >= hi)
            if nonfinite is not None:
                bad_flags |= nonfinite
        if bad_flags is None:
            self.bad = np.zeros(0, dtype=np.intp)
        else:
            self.bad = np.flatnonzero(bad_flags)
        if multiplier is not None:
            if multiplier.shape != values.shape:
                raise ValueError(f"multiplier has {multiplier.size} pixels, the image {values.size}")
            values = values.astype(np.float64) * multiplier  # trusted range judged on the raw counts
        if nonfinite is not None and nonfinite.any():
            values = values.astype(np.float64)  # NaN would poison the sums
            values[self.bad] = 0.0
        self.multiplier = multiplier
        self.values = values
        self.bad_values = values[self.bad].astype(np.float64)
        # cheap fingerprint of the bad-pixel set, for caching per binning
        self.bad_key = (self.bad.size, hash(self.bad[:: max(1, self.bad.size // 997)].tobytes()))
        self._bad_flags = None

    @property
    def bad_flags(self) -> np.ndarray:
        """Boolean (Npix,) True on unusable pixels."""
        if self._bad_flags is None:
            flags = np.zeros(self.values.size, dtype=bool)
            flags[self.bad] = True
            self._bad_flags = flags
        return self._bad_flags

    @classmethod
    def from_array(cls, values, pixels: DetectorPixels) -> "ImageData":
        return cls(np.asarray(values).reshape(-1), pixels)
