"""Per-still pixel extraction: geometry cache, used counts, and their hkl.

The per-pixel geometry of a detector + beam (``s1`` of every pixel centre) is
computed once and cached in ``geometry_<key>.npz`` (schema
``diffuse.geometry/1``); each still then only stores what cannot be
recomputed (schema ``diffuse.extract/1``): the packed total mask, the counts of
the used pixels, the setting matrix ``A`` (q = A·hkl) and the exposure time.
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
import os
import zipfile
from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli import dials_compat, program
from diffuse_cli.geometry import (
    hkl_from_q,
    lab_coordinates_at,
    pixel_lab_coordinates,
    s1_from_lab,
    setting_matrix,
)

logger = logging.getLogger("diffuse.extraction")

EXTRACT_SCHEMA = "diffuse.extract/1"
GEOMETRY_SCHEMA = "diffuse.geometry/1"

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


def geometry_key(detector, beam) -> str:
    """Short hash of everything that fixes per-pixel s1: detector model and s0."""
    payload = {
        "detector": detector.to_dict(),
        "s0": [round(float(v), 12) for v in beam.get_s0()],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class DetectorGeometry:
    """Per-pixel geometry of one detector + beam, flat in pixel order.

    s1: (Npix, 3) float32, Å⁻¹, at pixel centres. s0: (3,) float64 Å⁻¹.
    panel_shapes: (P, 2) int (n_slow, n_fast).
    """

    key: str
    panel_shapes: np.ndarray
    s1: np.ndarray
    s0: np.ndarray
    wavelength: float

    @property
    def n_pixels(self) -> int:
        return int(self.s1.shape[0])

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
        """q = s1 − s0 (Å⁻¹, float64) for all pixels or a selection."""
        s1 = self.s1 if select is None else self.s1[select]
        return s1.astype(np.float64) - self.s0

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


def compute_geometry(detector, beam) -> DetectorGeometry:
    """Per-pixel s1 at pixel centres for every panel (vectorized per panel)."""
    shapes, s1s = [], []
    for panel in detector:
        n_fast, n_slow = panel.get_image_size()
        lab = pixel_lab_coordinates(panel).reshape(-1, 3)
        s1s.append(s1_from_lab(lab, beam.get_wavelength()).astype(np.float32))
        shapes.append((n_slow, n_fast))
    return DetectorGeometry(
        key=geometry_key(detector, beam),
        panel_shapes=np.array(shapes, dtype=np.int32),
        s1=np.concatenate(s1s),
        s0=np.array(beam.get_s0(), dtype=np.float64),
        wavelength=float(beam.get_wavelength()),
    )


def geometry_path(directory, key: str) -> str:
    return os.path.join(os.fspath(directory), f"geometry_{key}.npz")


def write_geometry(path, geometry: DetectorGeometry) -> None:
    program.write_npz(
        path,
        compressed=False,  # float32 s1 hardly compresses; loading stays fast
        schema=np.array(GEOMETRY_SCHEMA),
        key=np.array(geometry.key),
        panel_shapes=geometry.panel_shapes,
        s1=geometry.s1,
        s0=geometry.s0,
        wavelength=np.float64(geometry.wavelength),
    )


def read_geometry(path) -> DetectorGeometry:
    with np.load(path) as z:
        _check_schema(z, GEOMETRY_SCHEMA, path)
        return DetectorGeometry(
            key=str(z["key"]),
            panel_shapes=z["panel_shapes"],
            s1=z["s1"],
            s0=z["s0"],
            wavelength=float(z["wavelength"]),
        )


class GeometryCache:
    """Geometry per (detector, beam), computed once, kept in memory and on disk.

    directory: where ``geometry_<key>.npz`` files are read from / written to
    (None: memory only).
    """

    def __init__(self, directory=None):
        self.directory = directory
        self._by_key: dict[str, DetectorGeometry] = {}

    def get(self, detector, beam) -> DetectorGeometry:
        key = geometry_key(detector, beam)
        geometry = self._by_key.get(key)
        if geometry is not None:
            return geometry
        path = geometry_path(self.directory, key) if self.directory else None
        if path and os.path.exists(path):
            geometry = read_geometry(path)
        else:
            geometry = compute_geometry(detector, beam)
            if path:
                write_geometry(path, geometry)
                logger.debug("Wrote %s", path)
        self._by_key[key] = geometry
        return geometry

    def by_key(self, key: str) -> DetectorGeometry:
        geometry = self._by_key.get(key)
        if geometry is None:
            path = geometry_path(self.directory, key)
            if not os.path.exists(path):
                raise Sorry(f"Geometry file not found: {path}")
            geometry = self._by_key[key] = read_geometry(path)
        return geometry


# ---------------------------------------------------------------- images


@dataclass
class StillRef:
    """One image to extract: which experiment, which image, which frame.

    name: output stem; image_index: index within the imageset; frame: array
    index within the scan for rotation data (None for stills).
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
            for frame in range(len(iset)):
                refs.append(_ref(i, iset, frame, frame))
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


def image_name_key(ref: StillRef) -> str:
    """Name of the image alone (without the lattice suffix); masks are per image."""
    stem = os.path.basename(ref.image_path)
    return f"{stem}:{ref.file_index}"


def raw_counts(imageset, image_index: int) -> np.ndarray:
    """Raw pixel values of one image, flat in pixel order (int32 or float64)."""
    data = imageset.get_raw_data(image_index)
    if not isinstance(data, tuple):
        data = (data,)
    arrays = [d.as_numpy_array().ravel() for d in data]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def trusted_mask(detector, counts: np.ndarray, geometry: DetectorGeometry) -> np.ndarray:
    """True where lo < value < hi (dxtbx's trusted-range test), per panel."""
    out = np.empty(counts.shape, dtype=bool)
    off = geometry.panel_offsets
    for i, panel in enumerate(detector):
        lo, hi = panel.get_trusted_range()
        c = counts[off[i] : off[i + 1]]
        out[off[i] : off[i + 1]] = (c > lo) & (c < hi)
    return out


def exposure_time(experiment, image_index: int) -> float:
    """Exposure time (s) of an image (index within the experiment's imageset)."""
    try:
        return dials_compat.exposure_time(experiment.imageset, image_index)
    except ValueError as e:
        raise Sorry(f"{e}: the corrections need it") from e


# ---------------------------------------------------------------- per-still files


@dataclass
class Extracted:
    """A per-still extract file, read back (see docs/file_formats.md)."""

    mask: np.ndarray  # (Npix,) bool, True = used
    counts: np.ndarray  # (Nused,) float64 or int64
    A: np.ndarray  # (3, 3): q = A·hkl
    exposure_time: float
    geometry_key: str
    experiment_index: int
    image_path: str
    image_index: int
    frame: int
    name: str

    @property
    def n_used(self) -> int:
        return int(self.counts.shape[0])


def pack_counts(counts: np.ndarray) -> dict:
    """Compact storage of used-pixel counts.

    Non-negative integers: ``counts`` as uint8 (values clipped to 255) plus
    ``overflow_index`` (uint32, positions within the used pixels) and
    ``overflow_counts`` (int32) holding the exact values >= 255. Other integers:
    int32. Non-integral values: float32.
    """
    integral = np.issubdtype(counts.dtype, np.integer) or bool(
        np.all(np.equal(np.mod(counts, 1), 0))
    )
    if not integral:
        return {"counts": counts.astype(np.float32)}
    if counts.size == 0 or counts.min() >= 0:
        over = np.flatnonzero(counts >= 255)
        return {
            "counts": np.minimum(counts, 255).astype(np.uint8),
            "overflow_index": over.astype(np.uint32),
            "overflow_counts": counts[over].astype(np.int32),
        }
    return {"counts": counts.astype(np.int32)}


def unpack_counts(z) -> np.ndarray:
    counts = z["counts"]
    if "overflow_index" in z:
        counts = counts.astype(np.int32)
        counts[z["overflow_index"].astype(np.int64)] = z["overflow_counts"]
    elif counts.dtype == np.float32:
        counts = counts.astype(np.float64)
    return counts


def write_extract(path, *, mask, counts, A, exposure_time, geometry_key, ref: StillRef):
    """Write one still's extract (schema diffuse.extract/1), atomically."""
    mask = np.asarray(mask, dtype=bool)
    arrays = {
        "schema": np.array(EXTRACT_SCHEMA),
        "mask_bits": np.packbits(mask),
        "n_pixels": np.int64(mask.size),
        **pack_counts(np.asarray(counts)),
        "A": np.asarray(A, dtype=np.float64).reshape(3, 3),
        "exposure_time": np.float64(exposure_time),
        "geometry_key": np.array(geometry_key),
        "experiment_index": np.int64(ref.experiment_index),
        "image_path": np.array(ref.image_path),
        "image_index": np.int64(ref.file_index),
        "frame": np.int64(-1 if ref.frame is None else ref.frame),
        "name": np.array(ref.name),
    }
    program.write_npz(path, compresslevel=program.FAST_ZIP_LEVEL, **arrays)


def read_extract(path) -> Extracted:
    """Read a ``diffuse.extract/1`` file."""
    if not os.path.exists(path):
        raise Sorry(f"File not found: {path}")
    with np.load(path) as z:
        _check_schema(z, EXTRACT_SCHEMA, path)
        n = int(z["n_pixels"])
        mask = np.unpackbits(z["mask_bits"], count=n).astype(bool)
        counts = unpack_counts(z)
        if counts.shape[0] != int(mask.sum()):
            raise Sorry(f"{path}: {counts.shape[0]} counts for {int(mask.sum())} used pixels")
        return Extracted(
            mask=mask,
            counts=counts,
            A=z["A"],
            exposure_time=float(z["exposure_time"]),
            geometry_key=str(z["geometry_key"]),
            experiment_index=int(z["experiment_index"]),
            image_path=str(z["image_path"]),
            image_index=int(z["image_index"]),
            frame=int(z["frame"]),
            name=str(z["name"]),
        )


def is_complete(path) -> bool:
    """True if ``path`` is a readable extract file of the current schema."""
    if not os.path.exists(path):
        return False
    try:
        with np.load(path) as z:
            return str(z["schema"]) == EXTRACT_SCHEMA and "counts" in z and "A" in z
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False


def _check_schema(z, expected: str, path) -> None:
    schema = str(z["schema"]) if "schema" in z else "none"
    if schema != expected:
        raise Sorry(f"{path}: schema {schema}, expected {expected}")


# ---------------------------------------------------------------- rebuild q / hkl


def geometry_for(extracted: Extracted, directory=None, cache: GeometryCache | None = None):
    """The geometry of an extract: from ``cache``, else ``geometry_<key>.npz`` in ``directory``."""
    if cache is None:
        cache = GeometryCache(directory)
    return cache.by_key(extracted.geometry_key)


def used_s1(extracted: Extracted, geometry: DetectorGeometry) -> np.ndarray:
    """s1 (Å⁻¹, float64, (Nused, 3)) of the used pixels, in pixel order."""
    return geometry.s1[_check_mask(extracted, geometry)].astype(np.float64)


def _check_mask(extracted: Extracted, geometry: DetectorGeometry) -> np.ndarray:
    if geometry.key != extracted.geometry_key or geometry.n_pixels != extracted.mask.size:
        raise Sorry(f"geometry {geometry.key} does not match extract {extracted.geometry_key}")
    return extracted.mask


def used_q(extracted: Extracted, geometry: DetectorGeometry) -> np.ndarray:
    """q = s1 − s0 (Å⁻¹, (Nused, 3)) of the used pixels."""
    return used_s1(extracted, geometry) - geometry.s0


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
    counts = raw_counts(experiment.imageset, ref.image_index)
    if counts.size != geometry.n_pixels:
        raise Sorry(f"{ref.name}: image has {counts.size} pixels, geometry {geometry.n_pixels}")
    if mask.size != counts.size:
        raise Sorry(f"{ref.name}: mask has {mask.size} pixels, image {counts.size}")
    used = mask & trusted_mask(experiment.detector, counts, geometry)
    A = setting_matrix(experiment.crystal, experiment.goniometer, experiment.scan, ref.frame)
    return {
        "mask": used,
        "counts": counts[used],
        "A": A,
        "exposure_time": exposure_time(experiment, ref.image_index),
        "geometry_key": geometry.key,
    }


# ---------------------------------------------------------------- program driver

# State shared with forked worker processes (set before the pool starts).
_STATE: dict = {}


class MaskSource:
    """Total masks per image: from diffuse.bragg_mask's summary, or one static mask.

    summary: path of ``bragg_masks/summary.json``; static: a DIALS mask file
    applied to every still (no Bragg masking).
    """

    def __init__(self, summary=None, static=None):
        self.by_image: dict = {}
        self.static = None
        if summary:
            if not os.path.exists(summary):
                raise Sorry(f"File not found: {summary}")
            with open(summary) as fh:
                data = json.load(fh)
            if data.get("schema") != "diffuse.bragg_mask/1":
                raise Sorry(f"{summary}: not a diffuse.bragg_mask summary")
            directory = os.path.dirname(os.path.abspath(summary))
            for e in data["stills"]:
                key = (os.path.abspath(e["image_path"]), int(e["image_index"]), e["frame"])
                # the packed copy loads ~50x faster than the DIALS pickle
                name = e.get("mask_bits") or e["mask"]
                self.by_image[key] = os.path.join(directory, name)
        if static:
            from diffuse_cli.masking import read_mask

            self.static = read_mask(static)
        if not self.by_image and self.static is None:
            raise Sorry(
                "Give masks.summary=bragg_masks/summary.json (from diffuse.bragg_mask) "
                "or masks.static=<mask file>"
            )

    def mask_for(self, ref: StillRef, n_pixels: int) -> np.ndarray:
        from diffuse_cli.masking import read_mask_any as read_mask

        mask = None
        if self.by_image:
            key = (os.path.abspath(ref.image_path), ref.file_index, ref.frame)
            path = self.by_image.get(key)
            if path is None:
                raise Sorry(f"No Bragg mask for {ref.name} in the bragg_mask summary")
            mask = read_mask(path)
        if self.static is not None:
            mask = self.static if mask is None else (mask & self.static)
        if mask.size != n_pixels:
            raise Sorry(f"{ref.name}: mask has {mask.size} pixels, detector {n_pixels}")
        return mask


def _extract_one(ref: StillRef) -> dict:
    """Worker: extract one image (or skip it if done) -> summary entry."""
    import time

    st = _STATE
    params, experiments = st["params"], st["experiments"]
    path = os.path.join(params.output.directory, f"{ref.name}.npz")
    entry = {"name": ref.name, "file": os.path.basename(path), "experiment_index": ref.experiment_index}
    if not params.output.overwrite and is_complete(path):
        entry["skipped"] = True
        return entry
    t0 = time.perf_counter()
    expt = experiments[ref.experiment_index]
    geometry = st["cache"].get(expt.detector, expt.beam)
    mask = st["masks"].mask_for(ref, geometry.n_pixels)
    arrays = extract_still(expt, ref, mask, geometry)
    write_extract(path, ref=ref, **arrays)
    entry.update(
        n_used=int(arrays["mask"].sum()),
        fraction_used=float(arrays["mask"].mean()),
        exposure_time=arrays["exposure_time"],
        seconds=time.perf_counter() - t0,
    )
    return entry


def run_extract(experiments, params) -> list[dict]:
    """Extract every image of ``experiments`` into ``params.output.directory``."""

    nproc = program.resolve_nproc(params.nproc)
    os.makedirs(params.output.directory, exist_ok=True)
    masks = MaskSource(params.masks.summary, params.masks.static)
    cache = GeometryCache(params.output.directory)
    refs = image_refs(experiments)
    # geometry once per detector + beam, before forking (workers share it)
    for expt in experiments:
        cache.get(expt.detector, expt.beam)
    logger.info("%d images to extract, %d geometry file(s) in %s", len(refs), len(cache._by_key), params.output.directory)
    _STATE.update(params=params, experiments=experiments, cache=cache, masks=masks)
    try:
        entries = program.parallel_map(_extract_one, refs, nproc, desc="extract")
    finally:
        _STATE.clear()
    summary_path = os.path.join(params.output.directory, "summary.json")
    if os.path.exists(summary_path):  # a rerun keeps the figures of skipped stills
        with open(summary_path) as fh:
            previous = {e["name"]: e for e in json.load(fh).get("stills", [])}
        for e in entries:
            old = previous.get(e["name"])
            if e.get("skipped") and old is not None:
                e.update({k: v for k, v in old.items() if k not in e})
    done = [e for e in entries if not e.get("skipped")]
    skipped = len(entries) - len(done)
    if done:
        t = np.array([e["seconds"] for e in done])
        f = np.array([e["fraction_used"] for e in done])
        logger.info(
            "Extracted %d images (%.3f s each, median), %.1f %% of pixels used (median); %d already done",
            len(done), float(np.median(t)), 100 * float(np.median(f)), skipped,
        )
    else:
        logger.info("Nothing to do: all %d images already extracted (overwrite=True to redo)", skipped)
    summary = {"schema": "diffuse.extract_summary/1", "stills": entries}
    program.write_json(summary_path, summary)
    return entries
