"""Per-pixel diffraction geometry in the DIALS convention, as numpy arrays.

Conventions (see docs/conventions.md):

* lab frame: dxtbx's; the beam travels along ``s0``; ``|s0| = 1/lambda``.
* ``s1`` is the scattered wave vector towards the pixel centre, ``|s1| = 1/lambda``.
* ``q = s1 - s0`` so that ``|q| = 1/d`` (Å⁻¹), with no factor 2π.
* fractional Miller indices of a still: ``hkl = A⁻¹ q`` with ``A = U B`` from
  ``crystal.get_A()``; for a rotation frame ``hkl = (R(φ) A(φ))⁻¹ q``.
* pixel centres are at ``index + 0.5`` in dxtbx pixel coordinates and are taken
  to millimetres with ``Panel.pixel_to_millimeter`` (which applies parallax
  when the panel has a parallax-corrected strategy) before ``get_lab_coord``.
* χ (azimuth) = ``atan2(s1·y, s1·x)`` in the DIALS lab frame, in degrees, in
  (−180, 180]. pyFAI's chi is mirrored with respect to this.

Arrays for a panel have shape ``(n_slow, n_fast)`` or ``(n_slow, n_fast, 3)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from dxtbx import flumpy


def pixel_centres_px(panel) -> np.ndarray:
    """Pixel-centre coordinates (fast, slow) in pixels, shape (n_slow, n_fast, 2)."""
    n_fast, n_slow = panel.get_image_size()
    px = np.empty((n_slow, n_fast, 2), dtype=np.float64)
    px[..., 0] = np.arange(n_fast, dtype=np.float64)[None, :] + 0.5
    px[..., 1] = np.arange(n_slow, dtype=np.float64)[:, None] + 0.5
    return px


def lab_coordinates_at(panel, fast_px, slow_px) -> np.ndarray:
    """Lab coordinates (mm), shape (N, 3), of positions given in pixels.

    ``fast_px``/``slow_px`` are dxtbx pixel coordinates (pixel centres at
    index + 0.5). They go to mm with ``Panel.pixel_to_millimeter`` (parallax
    included when the panel has a parallax-corrected strategy), then to the lab
    frame with the panel's d-matrix, which is what ``get_lab_coord`` does
    (lab = D · (x_mm, y_mm, 1)), in numpy for speed.
    """
    xy = np.empty((np.size(fast_px), 2), dtype=np.float64)
    xy[:, 0] = np.ravel(fast_px)
    xy[:, 1] = np.ravel(slow_px)
    mm = flumpy.to_numpy(panel.pixel_to_millimeter(flumpy.vec_from_numpy(xy)))
    D = np.array(panel.get_d_matrix(), dtype=np.float64).reshape(3, 3)
    lab = mm @ D[:, :2].T
    lab += D[:, 2]
    return lab


def pixel_lab_coordinates(panel) -> np.ndarray:
    """Lab coordinates (mm) of every pixel centre, shape (n_slow, n_fast, 3)."""
    n_fast, n_slow = panel.get_image_size()
    px = pixel_centres_px(panel)
    return lab_coordinates_at(panel, px[..., 0], px[..., 1]).reshape(n_slow, n_fast, 3)


def s1_from_lab(lab_mm: np.ndarray, wavelength: float) -> np.ndarray:
    """Scattered wave vectors (Å⁻¹) for lab positions (mm) seen from the sample."""
    norm = np.linalg.norm(lab_mm, axis=-1, keepdims=True)
    return lab_mm / (norm * wavelength)


def q_from_s1(s1: np.ndarray, s0) -> np.ndarray:
    """Scattering vector q = s1 − s0 (Å⁻¹), |q| = 1/d."""
    return s1 - np.asarray(s0, dtype=np.float64)


def hkl_from_q(q: np.ndarray, A) -> np.ndarray:
    """Fractional Miller indices ``A⁻¹ q`` (float64) for q of shape (..., 3).

    ``A`` is the 3×3 setting matrix (``crystal.get_A()``, tuple of 9 or array),
    possibly already multiplied by the goniometer rotation for rotation data.
    Column by column in float64 rather than ``q @ A⁻¹ᵀ``: an (N, 3) @ (3, 3)
    product gains nothing from BLAS, whose threads fight other processes
    for the cores (measured 0.06–0.9 s for 6 M pixels).
    """
    A_inv = np.linalg.inv(np.asarray(A, dtype=np.float64).reshape(3, 3))
    q = np.asarray(q)
    flat = q.reshape(-1, 3)
    cols = [flat[:, i].astype(np.float64) for i in range(3)]
    out = np.empty((flat.shape[0], 3), dtype=np.float64)
    for j in range(3):
        out[:, j] = cols[0] * A_inv[j, 0] + cols[1] * A_inv[j, 1] + cols[2] * A_inv[j, 2]
    return out.reshape(q.shape)


def two_theta(s1: np.ndarray, s0) -> np.ndarray:
    """Scattering angle 2θ (radians) between s0 and s1."""
    s0 = np.asarray(s0, dtype=np.float64)
    cos2t = (s1 @ s0) / (np.linalg.norm(s1, axis=-1) * np.linalg.norm(s0))
    return np.arccos(np.clip(cos2t, -1.0, 1.0))


def chi_degrees(s1: np.ndarray) -> np.ndarray:
    """Azimuth χ = atan2(s1_y, s1_x) in the DIALS lab frame, degrees in (−180, 180]."""
    return np.degrees(np.arctan2(s1[..., 1], s1[..., 0]))


def setting_matrix(crystal, goniometer=None, scan=None, array_index: int | None = None) -> np.ndarray:
    """The matrix M with q = M hkl for a pixel on a given image.

    Stills: ``M = A``. Rotation data: ``M = S R(φ) F A(φ)`` at the centre of
    the frame with absolute dxtbx array index ``array_index`` (the scan's
    frames are ``scan.get_array_range()``, which starts at image_range[0] − 1).
    The arithmetic is :class:`diffuse_cli.frames.FrameRef`'s.
    """
    if goniometer is None or scan is None or array_index is None:
        return np.array(crystal.get_A(), dtype=np.float64).reshape(3, 3)
    from diffuse_cli.frames import FrameRef

    frames = FrameRef.from_scan(scan)
    if not frames.in_scan(array_index):
        raise ValueError(f"array index {array_index} is outside the scan {frames.array_range}")
    return frames.setting_matrix(crystal, goniometer, float(array_index) + 0.5)


@dataclass
class PanelGeometry:
    """Geometry of one panel for one beam, reused across stills that share it."""

    panel_id: int
    lab: np.ndarray  # (n_slow, n_fast, 3) mm, pixel centres
    s1: np.ndarray  # (n_slow, n_fast, 3) Å⁻¹
    q: np.ndarray  # (n_slow, n_fast, 3) Å⁻¹

    @property
    def shape(self) -> tuple[int, int]:
        return self.lab.shape[:2]

    @property
    def d_star(self) -> np.ndarray:
        """|q| = 1/d (Å⁻¹)."""
        return np.linalg.norm(self.q, axis=-1)


def detector_geometry(detector, beam) -> list[PanelGeometry]:
    """Per-panel pixel geometry for a detector and beam (pixel centres)."""
    wavelength = beam.get_wavelength()
    s0 = np.array(beam.get_s0(), dtype=np.float64)
    result = []
    for panel_id, panel in enumerate(detector):
        lab = pixel_lab_coordinates(panel)
        s1 = s1_from_lab(lab, wavelength)
        result.append(PanelGeometry(panel_id, lab, s1, q_from_s1(s1, s0)))
    return result
