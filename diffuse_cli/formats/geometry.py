"""Per-detector pixel directions: ``geometry_<key>.npz`` (schema ``diffuse.geometry/2``).

Written once per detector (and beam direction) by diffuse.extract, beside its
per-still files; read by extract, correct and bragg_mask. Fields:

* ``schema``, ``key`` (the geometry key: hash of the detector model and the
  beam direction, never the wavelength; ``diffuse_cli.extraction.geometry_key``);
* ``panel_shapes`` (P, 2) int32 (n_slow, n_fast);
* ``s1_unit`` (Npix, 3) float32 unit directions ŝ1 of the pixel centres;
* ``beam_direction`` (3,) ŝ0, ``s0`` (3,) Å⁻¹ and ``wavelength`` (Å) of the
  reference beam (the first it was computed with).

``diffuse.geometry/1`` files (``s1`` = ŝ1/λ of one beam instead of
``s1_unit``) are still read. Provenance: the key itself (the file name) is
the fingerprint of the models it was computed from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np

from diffuse_cli.formats.common import read_npz

GEOMETRY_SCHEMA = "diffuse.geometry/2"
#: geometry schemas read back (/1 held s1 = ŝ1/λ for one beam)
GEOMETRY_SCHEMAS_READ = ("diffuse.geometry/1", GEOMETRY_SCHEMA)


@dataclass
class DetectorGeometry:
    """Per-pixel geometry of one detector, flat in pixel order, seen with one beam.

    s1_unit: (Npix, 3) float32 unit directions ŝ1 of the pixel centres: what
    is cached, once per detector and beam direction. s0: (3,) float64 Å⁻¹ and
    wavelength (Å) of the beam this view is bound to (:meth:`for_beam`);
    ``s1`` = ŝ1/λ. panel_shapes: (P, 2) int (n_slow, n_fast).
    """

    key: str
    panel_shapes: np.ndarray
    s1_unit: np.ndarray
    s0: np.ndarray
    wavelength: float
    _s1: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def n_pixels(self) -> int:
        return int(self.s1_unit.shape[0])

    @property
    def s1(self) -> np.ndarray:
        """s1 = ŝ1/λ (Å⁻¹, float32, (Npix, 3)) for this view's beam, computed once per view."""
        if self._s1 is None:
            if self.wavelength == 1.0:
                self._s1 = self.s1_unit
            else:
                self._s1 = self.s1_unit * np.float32(1.0 / self.wavelength)
        return self._s1

    @property
    def beam_direction(self) -> np.ndarray:
        """ŝ0 (unit, float64)."""
        return np.asarray(self.s0, dtype=np.float64) * self.wavelength

    def for_beam(self, beam) -> "DetectorGeometry":
        """The same cached directions seen with ``beam`` (its s0 and λ).

        Raises ValueError if the beam direction differs from the cached one.
        """
        s0 = np.array(beam.get_s0(), dtype=np.float64)
        wavelength = float(beam.get_wavelength())
        if np.abs(s0 * wavelength - self.beam_direction).max() > 1e-8:
            raise ValueError(f"geometry {self.key}: beam direction {tuple(s0 * wavelength)} is not the cached one")
        if wavelength == self.wavelength and np.array_equal(s0, self.s0):
            return self
        return replace(self, s0=s0, wavelength=wavelength, _s1=None)

    @property
    def panel_offsets(self) -> np.ndarray:
        """Flat index of the first pixel of each panel, plus the total, (P+1,)."""
        sizes = self.panel_shapes[:, 0].astype(np.int64) * self.panel_shapes[:, 1]
        return np.concatenate([[0], np.cumsum(sizes)])

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """Split a flat per-pixel array into per-panel (n_slow, n_fast, ...) arrays."""
        off = self.panel_offsets
        return [
            flat[off[i] : off[i + 1]].reshape(tuple(self.panel_shapes[i]) + flat.shape[1:])
            for i in range(len(self.panel_shapes))
        ]

    def q(self, select: np.ndarray | None = None) -> np.ndarray:
        """q = ŝ1/λ − s0 (Å⁻¹, float64) for all pixels or a selection."""
        u = self.s1_unit if select is None else self.s1_unit[select]
        return u.astype(np.float64) / self.wavelength - self.s0

    def pixel_panel_fast_slow(self, select: np.ndarray | None = None):
        """(panel, fast, slow) integer indices of all pixels or a selection."""
        if select is None:
            flat = np.arange(self.n_pixels, dtype=np.int64)
        elif np.asarray(select).dtype == bool:
            flat = np.flatnonzero(select)
        else:
            flat = np.asarray(select, dtype=np.int64)
        off = self.panel_offsets
        panel = np.searchsorted(off, flat, side="right") - 1
        local = flat - off[panel]
        n_fast = self.panel_shapes[panel, 1]
        return panel, local % n_fast, local // n_fast



def geometry_path(directory, key: str) -> str:
    """Where the geometry of ``key`` lives in ``directory``."""
    return os.path.join(os.fspath(directory), f"geometry_{key}.npz")


def write_geometry(path, geometry: DetectorGeometry) -> None:
    """Write ``geometry_<key>.npz`` (schema diffuse.geometry/2) atomically: ŝ1, plus the
    beam it was first computed with (s0, wavelength) as the reference view."""
    from diffuse_cli import program

    program.write_npz(
        path,
        compressed=False,  # float32 directions hardly compress; loading stays fast
        schema=np.array(GEOMETRY_SCHEMA),
        key=np.array(geometry.key),
        panel_shapes=geometry.panel_shapes,
        s1_unit=geometry.s1_unit,
        beam_direction=geometry.beam_direction,
        s0=geometry.s0,
        wavelength=np.float64(geometry.wavelength),
    )


def read_geometry(path) -> DetectorGeometry:
    """Read a geometry file (diffuse.geometry/2, or /1), bound to its reference beam."""
    z = read_npz(path, GEOMETRY_SCHEMAS_READ, required=("panel_shapes", "s0", "wavelength"))
    wavelength = float(z["wavelength"])
    if str(z["schema"]) == GEOMETRY_SCHEMA:
        if "s1_unit" not in z:
            from libtbx.utils import Sorry

            raise Sorry(f"{path}: {GEOMETRY_SCHEMA} file without s1_unit; rerun diffuse.extract")
        units = z["s1_unit"]
    else:  # /1: s1 = ŝ1/λ of one beam
        units = (z["s1"].astype(np.float64) * wavelength).astype(np.float32)
    return DetectorGeometry(
        key=str(z["key"]) if "key" in z else os.path.basename(os.fspath(path))[9:-4],
        panel_shapes=z["panel_shapes"],
        s1_unit=units,
        s0=np.asarray(z["s0"], dtype=np.float64),
        wavelength=wavelength,
    )


def read_reference_beam(path) -> np.ndarray:
    """s0 (Å⁻¹) of a geometry file's reference beam, without reading its directions."""
    return np.asarray(read_npz(path, GEOMETRY_SCHEMAS_READ, fields=("s0",), required=("s0",))["s0"], dtype=np.float64)
