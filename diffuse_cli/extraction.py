"""Per-still pixel extraction: geometry cache, used counts, and their hkl.

The unit direction ŝ1 of every pixel centre is computed once per detector
(and beam direction; never per wavelength) and cached in
``geometry_<key>.npz`` (schema ``diffuse.geometry/2``); each still then only
stores what cannot be recomputed (schema ``diffuse.extract/3``): the packed
total mask, the counts of the used pixels, the setting matrix ``A``
(q = A·hkl), its beam s0 (so s1 = ŝ1/λ) and the exposure time (0 for XFEL
shots).
``q``, ``hkl`` and ``d*`` of the used pixels are rebuilt from those with
:func:`used_q`, :func:`used_hkl` and :func:`used_d_star`.

Units: s0, s1, q in Å⁻¹ (DIALS convention, ``|q| = 1/d``, no 2π); lab
coordinates in mm; pixel coordinates in px with the centre of pixel
``(fast, slow)`` at ``(fast + 0.5, slow + 0.5)``.

Pixel order everywhere: panel-major, then slow, then fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli import dials_compat, image_read
from diffuse_cli.formats.extract import (  # noqa: F401  (re-exported: the readers' old home)
    EXTRACT_SCHEMA,
    SAMPLE_STRIDE,
    Extracted,
    is_complete,
    read_extract,
    write_extract,
)
from diffuse_cli.formats.geometry import (  # noqa: F401  (re-exported)
    DetectorGeometry,
    geometry_path,
    read_geometry,
    write_geometry,
)
from diffuse_cli.frames import FrameRef
from diffuse_cli.geometry import (
    hkl_from_q,
    lab_coordinates_at,
    pixel_lab_coordinates,
    s1_from_lab,
    setting_matrix,
)

logger = logging.getLogger("diffuse.extraction")


#: Parallax-corrected panels share one cached geometry while ln μ falls in
#: the same bin of this width (μ changes with the wavelength; see
#: docs/file_formats.md for the bound on the pixel directions this gives).
PARALLAX_LN_MU_BIN = 0.005
#: Geometries kept in memory by a GeometryCache (a 6M-pixel one is 75 MB).
GEOMETRY_CACHE_ENTRIES = 4

# ---------------------------------------------------------------- geometry


def s1_at(detector, beam, panel_ids, fast_px, slow_px) -> np.ndarray:
    """s1 (Å⁻¹, float64, shape (N, 3)) at arbitrary pixel positions.

    panel_ids: (N,) int; fast_px, slow_px: (N,) float positions in pixels.
    """
    panel_ids = np.asarray(panel_ids, dtype=np.int64)
    fast_px = np.asarray(fast_px, dtype=np.float64)
    slow_px = np.asarray(slow_px, dtype=np.float64)
    out = np.empty((len(panel_ids), 3), dtype=np.float64)
    for pid in np.unique(panel_ids):  # loop over panels, vectorized within
        sel = panel_ids == pid
        lab = lab_coordinates_at(detector[int(pid)], fast_px[sel], slow_px[sel])
        out[sel] = s1_from_lab(lab, beam.get_wavelength())
    return out


def _detector_payload(detector) -> dict:
    """The detector model as a dict, minus what varies with the wavelength only.

    ``mu`` moves no pixel unless the panel applies parallax (thickness > 0);
    then it enters as its ln-μ bin (PARALLAX_LN_MU_BIN).
    """
    d = detector.to_dict()
    for p in d.get("panels", []):
        mu, t = float(p.get("mu", 0.0)), float(p.get("thickness", 0.0))
        parallax = (p.get("px_mm_strategy") or {}).get("type") == "ParallaxCorrectedPxMmStrategy"
        p["mu"] = int(round(math.log(mu) / PARALLAX_LN_MU_BIN)) if (parallax and mu > 0 and t > 0) else 0
    return d


def _beam_direction_payload(beam) -> dict:
    """Beam direction and polarization (what the direction-only factors need), no wavelength."""
    def r(v):
        return [round(float(x), 9) + 0.0 for x in v]  # + 0.0: no "-0.0"

    return {
        "direction": r(beam.get_unit_s0()),
        "polarization_normal": r(beam.get_polarization_normal()),
        "polarization_fraction": round(float(beam.get_polarization_fraction()), 9),
    }


def geometry_key(detector, beam) -> str:
    """Short hash of what fixes the pixel directions: the detector model and
    the beam direction (with its polarization), never the wavelength.

    Every XFEL shot of one detector shares one key whatever its wavelength;
    its s1 is ŝ1/λ (:meth:`DetectorGeometry.for_beam`).
    """
    payload = {"detector": _detector_payload(detector), "beam": _beam_direction_payload(beam)}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def compute_geometry(detector, beam) -> DetectorGeometry:
    """Pixel-centre directions ŝ1 of every panel (vectorized per panel), bound to ``beam``."""
    shapes, units = [], []
    for panel in detector:
        n_fast, n_slow = panel.get_image_size()
        lab = pixel_lab_coordinates(panel).reshape(-1, 3)
        units.append((lab / np.linalg.norm(lab, axis=1, keepdims=True)).astype(np.float32))
        shapes.append((n_slow, n_fast))
    return DetectorGeometry(
        key=geometry_key(detector, beam),
        panel_shapes=np.array(shapes, dtype=np.int32),
        s1_unit=np.concatenate(units),
        s0=np.array(beam.get_s0(), dtype=np.float64),
        wavelength=float(beam.get_wavelength()),
    )


class GeometryCache:
    """Pixel directions per detector (and beam direction), computed once, kept
    on disk and in a bounded in-memory LRU of ``max_entries`` geometries.

    directory: where ``geometry_<key>.npz`` files are read from / written to
    (None: memory only). ``get`` returns a view bound to the given beam, so
    shots of one detector with different wavelengths share one entry.
    read_also: other folders whose geometry files are taken (and copied into
    ``directory``) before computing one, e.g. diffuse.bragg_mask's output.
    """

    def __init__(self, directory=None, max_entries: int = GEOMETRY_CACHE_ENTRIES, read_also=()):
        self.directory = directory
        self.max_entries = int(max_entries)
        self.read_also = [d for d in read_also if d]
        self._by_key: OrderedDict[str, DetectorGeometry] = OrderedDict()

    def _remember(self, key: str, geometry: DetectorGeometry) -> DetectorGeometry:
        self._by_key[key] = geometry
        self._by_key.move_to_end(key)
        while len(self._by_key) > self.max_entries:
            self._by_key.popitem(last=False)
        return geometry

    def _lookup(self, key: str) -> DetectorGeometry | None:
        geometry = self._by_key.get(key)
        if geometry is not None:
            self._by_key.move_to_end(key)
            return geometry
        path = geometry_path(self.directory, key) if self.directory else None
        if path and os.path.exists(path):
            return self._remember(key, read_geometry(path))
        for other in self.read_also:
            there = geometry_path(other, key)
            if os.path.exists(there) and os.path.abspath(there) != os.path.abspath(path or ""):
                geometry = read_geometry(there)
                if geometry.key != key:
                    continue
                if path:
                    write_geometry(path, geometry)
                return self._remember(key, geometry)
        return None

    def get(self, detector, beam) -> DetectorGeometry:
        key = geometry_key(detector, beam)
        geometry = self._lookup(key)
        if geometry is None:
            geometry = compute_geometry(detector, beam)
            if self.directory:
                path = geometry_path(self.directory, key)
                write_geometry(path, geometry)
                logger.debug("Wrote %s", path)
            self._remember(key, geometry)
        return geometry.for_beam(beam)

    def by_key(self, key: str) -> DetectorGeometry:
        """The geometry of ``key``, bound to its reference beam (the first it was computed with)."""
        geometry = self._lookup(key)
        if geometry is None:
            path = geometry_path(self.directory, key) if self.directory else key
            raise Sorry(f"Geometry file not found: {path}")
        return geometry


# ---------------------------------------------------------------- images


@dataclass
class StillRef:
    """One image to extract: which experiment, which image, which frame.

    name: output stem; image_index: index within the imageset; frame: the
    absolute dxtbx array index of the image for rotation data (image number
    − 1, as in ``scan.get_array_range()``; see :mod:`diffuse_cli.frames`),
    None for stills.
    """

    name: str
    experiment_index: int
    image_index: int
    image_path: str
    frame: int | None = None
    file_index: int = 0


def is_rotation(experiment) -> bool:
    scan = experiment.scan
    return (
        experiment.goniometer is not None
        and scan is not None
        and scan.get_oscillation()[1] != 0
    )


def image_refs(experiments) -> list[StillRef]:
    """Every image of every experiment, with a unique output name.

    Stills: one image per experiment. Rotation data: one per frame of the scan.
    Name: ``<file stem>_<index within the file, 5 digits>``; when several
    experiments (lattices) share an image, ``_<lattice>`` is appended.
    """
    refs = []
    for i, expt in enumerate(experiments):
        iset = expt.imageset
        if is_rotation(expt):
            frames = FrameRef.from_experiment(expt)
            for a in frames.array_indices():
                refs.append(_ref(i, iset, frames.imageset_index(a), a))
        else:
            if len(iset) != 1:
                raise Sorry(
                    f"Experiment {i} is a still with {len(iset)} images; expected one"
                )
            refs.append(_ref(i, iset, 0, None))
    # disambiguate several lattices on one image
    seen: dict[str, list[StillRef]] = {}
    for r in refs:
        seen.setdefault(r.name, []).append(r)
    for same in seen.values():
        if len({r.experiment_index for r in same}) > 1:
            lattices = sorted({r.experiment_index for r in same})
            for r in same:
                r.name = f"{r.name}_{lattices.index(r.experiment_index)}"
    return refs


def _ref(i, iset, image_index, frame) -> StillRef:
    path = iset.get_path(image_index)
    try:
        file_index = int(iset.indices()[image_index])
    except (AttributeError, IndexError):
        file_index = image_index
    stem = os.path.basename(path)
    for ext in (".bz2", ".gz", ".cbf", ".img", ".h5", ".nxs", ".mccd", ".tif", ".edf"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return StillRef(f"{stem}_{file_index:05d}", i, image_index, path, frame, file_index)


def raw_counts(imageset, image_index: int) -> np.ndarray:
    """Raw pixel values of one image, flat in pixel order (int32 or float64);
    dxtbx's values, multi-panel CBF read fast (image_read.raw_panels)."""
    arrays = [a.ravel() for a in image_read.raw_panels(imageset, image_index)]
    if len(arrays) == 1:  # the fast reader's arrays are read-only (its cache of the last image)
        return arrays[0] if arrays[0].flags.writeable else arrays[0].copy()
    return np.concatenate(arrays)


def in_trusted_range(value, lo, hi):
    """dxtbx's trusted-range test, lo < value < hi (NaN: outside), the one definition
    of it here: for numpy arrays (:func:`trusted_mask`) and, compiled, per pixel
    (:func:`used_counts`)."""
    return (value > lo) & (value < hi)


def trusted_mask(detector, counts: np.ndarray, geometry: DetectorGeometry) -> np.ndarray:
    """True where the value is in its panel's trusted range (:func:`in_trusted_range`)."""
    out = np.empty(counts.shape, dtype=bool)
    off = geometry.panel_offsets
    for i, panel in enumerate(detector):
        lo, hi = panel.get_trusted_range()
        sl = slice(off[i], off[i + 1])
        out[sl] = in_trusted_range(counts[sl], lo, hi)
    return out


def _select_used(counts, mask, start, lo, hi, stride, used, out, n_out, sample, n_sample):
    """One panel: used[start + i] = mask[start + i] and in_trusted_range(counts[i]); the used
    counts appended to out (from n_out), those at pixels ≡ 0 (mod stride) to
    sample (from n_sample). Returns (n_out, n_sample).

    Every count is stored and its slot kept only when used (no branch on the
    mask); ``k`` counts down to the next sampled pixel (no division per pixel)."""
    k = (stride - start % stride) % stride
    for i in range(counts.size):
        c = counts[i]
        u = mask[start + i] & _in_trusted_range_kernel(c, lo, hi)
        used[start + i] = u
        out[n_out] = c
        n_out += u
        if k == 0:
            sample[n_sample] = c
            n_sample += u
            k = stride
        k -= 1
    return n_out, n_sample


_in_trusted_range_kernel = in_trusted_range  # compiled below: the same function, per pixel
if image_read.numba is not None:
    _in_trusted_range_kernel = image_read.numba.njit(inline="always", cache=True)(in_trusted_range)
    _select_used = image_read.numba.njit(nogil=True, cache=True)(_select_used)


def used_counts(detector, panels, mask: np.ndarray, stride: int) -> tuple:
    """(used, counts[used], counts[::stride][used[::stride]]) of an image given
    per panel (flat pixel order across ``panels``): used = mask and
    :func:`in_trusted_range`, in one pass (numba) without joining the panels;
    numpy's result without numba."""
    if image_read.numba is None:  # pragma: no cover - exercised only without numba
        counts = np.concatenate([np.ravel(a) for a in panels])
        used = np.empty(counts.shape, dtype=bool)
        start = 0
        for a, panel in zip(panels, detector):
            lo, hi = panel.get_trusted_range()
            used[start:start + a.size] = in_trusted_range(counts[start:start + a.size], lo, hi)
            start += a.size
        used &= mask
        return used, counts[used], counts[::stride][used[::stride]]
    dtype = np.result_type(*[a.dtype for a in panels])
    used = np.empty(mask.size, dtype=bool)
    out = np.empty(mask.size, dtype=dtype)
    sample = np.empty(-(-mask.size // stride), dtype=dtype)
    n_out = n_sample = start = 0
    mask = np.ascontiguousarray(mask, dtype=bool)
    for a, panel in zip(panels, detector):
        lo, hi = panel.get_trusted_range()
        flat = np.ravel(a)
        if flat.dtype != dtype:
            flat = flat.astype(dtype)
        n_out, n_sample = _select_used(flat, mask, start, float(lo), float(hi), stride, used, out, n_out,
                                       sample, n_sample)
        start += flat.size
    return used, out[:n_out], sample[:n_sample].copy()


def exposure_time(experiment, image_index: int) -> float:
    """Exposure time (s) of an image (index within the experiment's imageset).

    0.0 when the image has none (an XFEL pulse: CSPAD headers say
    ``integration_time 0.0``); diffuse.correct then normalises the shot per
    shot instead of per second (docs/corrections.md, normalisation).
    """
    try:
        return dials_compat.exposure_time(experiment.imageset, image_index)
    except ValueError:
        return 0.0


# ---------------------------------------------------------------- rebuild q / hkl


def _still_wavelength(extracted: Extracted, geometry: DetectorGeometry):
    """(s0, λ) of the still: its own beam (/2 files), else the geometry's (/1)."""
    if extracted.s0 is None:
        return np.asarray(geometry.s0, dtype=np.float64), float(geometry.wavelength)
    return extracted.s0, extracted.wavelength


def used_s1(extracted: Extracted, geometry: DetectorGeometry) -> np.ndarray:
    """s1 = ŝ1/λ (Å⁻¹, float64, (Nused, 3)) of the used pixels, in pixel order, λ the still's."""
    _, wavelength = _still_wavelength(extracted, geometry)
    return geometry.s1_unit[_check_mask(extracted, geometry)].astype(np.float64) / wavelength


def _check_mask(extracted: Extracted, geometry: DetectorGeometry) -> np.ndarray:
    if geometry.key != extracted.geometry_key or geometry.n_pixels != extracted.mask.size:
        raise Sorry(f"geometry {geometry.key} does not match extract {extracted.geometry_key}")
    return extracted.mask


def used_q(extracted: Extracted, geometry: DetectorGeometry) -> np.ndarray:
    """q = s1 − s0 (Å⁻¹, (Nused, 3)) of the used pixels, with the still's own beam."""
    s0, _ = _still_wavelength(extracted, geometry)
    return used_s1(extracted, geometry) - s0


def used_hkl(extracted: Extracted, geometry: DetectorGeometry, q: np.ndarray | None = None) -> np.ndarray:
    """Fractional Miller indices A⁻¹q ((Nused, 3), float64) of the used pixels."""
    if q is None:
        q = used_q(extracted, geometry)
    return hkl_from_q(q, extracted.A)


def used_d_star(extracted: Extracted, geometry: DetectorGeometry, q: np.ndarray | None = None) -> np.ndarray:
    """|q| = 1/d (Å⁻¹) of the used pixels."""
    if q is None:
        q = used_q(extracted, geometry)
    return np.sqrt(np.einsum("ij,ij->i", q, q))


# ---------------------------------------------------------------- extract one still


def extract_still(experiment, ref: StillRef, mask: np.ndarray, geometry: DetectorGeometry) -> dict:
    """Read one image and return the arrays of its extract file.

    mask: (Npix,) bool total mask (True = usable), combined here with the
    image's trusted range. The setting matrix is ``setting_matrix`` of the
    experiment at the frame (stills: A = UB).
    """
    panels = image_read.raw_panels(experiment.imageset, ref.image_index)
    n_pixels = sum(a.size for a in panels)
    if n_pixels != geometry.n_pixels or len(panels) != len(experiment.detector):
        raise Sorry(f"{ref.name}: image has {n_pixels} pixels in {len(panels)} panels, "
                    f"geometry {geometry.n_pixels} in {len(experiment.detector)}")
    if mask.size != n_pixels:
        raise Sorry(f"{ref.name}: mask has {mask.size} pixels, image {n_pixels}")
    # the summary sample of diffuse.correct (formats.extract.sample_pixels)
    used, counts, sample = used_counts(experiment.detector, panels, mask, SAMPLE_STRIDE)
    A = setting_matrix(experiment.crystal, experiment.goniometer, experiment.scan, ref.frame)
    return {
        "mask": used,
        "counts": counts,
        "sample": sample,
        "A": A,
        "exposure_time": exposure_time(experiment, ref.image_index),
        "geometry_key": geometry.key,
        "s0": np.array(experiment.beam.get_s0(), dtype=np.float64),
        "beam_flux": float(experiment.beam.get_flux()),
    }
