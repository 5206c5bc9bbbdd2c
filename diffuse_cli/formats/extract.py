"""Per-still extracted pixels: ``<still>.npz`` (schema ``diffuse.extract/2``).

Written by diffuse.extract, one per image (per lattice when several share
an image); read by diffuse.correct, diffuse.merge (identity checks) and
tests. Fields:

* ``schema``; ``mask_bits`` (``np.packbits`` of the (Npix,) used-pixel mask,
  True = used) and ``n_pixels``;
* ``counts`` of the used pixels, in pixel order (:func:`pack_counts`:
  uint8 + ``overflow_index``/``overflow_counts``, or int32, or float32);
* ``A`` (3, 3) setting matrix (q = A·hkl), ``s0`` (3,) Å⁻¹ of the still's
  beam, ``exposure_time`` (s; 0 for XFEL shots), ``beam_flux`` (0 = unknown),
  ``geometry_key`` (its ``geometry_<key>.npz``);
* identity: ``experiment_identifier``, ``experiment_index``, ``image_path``,
  ``image_index`` (within the file), ``frame`` (−1 for stills), ``name``;
* provenance: ``provenance_key`` and ``provenance`` (JSON of its parts:
  image fingerprint, mask-file fingerprints, experiment fingerprint; see
  :mod:`diffuse_cli.provenance`).

``diffuse.extract/1`` files (no ``s0``: the geometry's beam is the still's)
are still read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from libtbx.utils import Sorry

from diffuse_cli.formats.common import CORRUPT, read_npz

EXTRACT_SCHEMA = "diffuse.extract/2"
#: extract schemas read back (/1: no per-still s0; the geometry's beam is the still's)
EXTRACT_SCHEMAS_READ = ("diffuse.extract/1", EXTRACT_SCHEMA)
#: the arrays that hold the counts (see pack_counts)
COUNT_ARRAYS = ("counts", "overflow_index", "overflow_counts")
#: what every extract file holds
REQUIRED = ("mask_bits", "n_pixels", "counts", "A", "exposure_time", "geometry_key", "experiment_index")
#: the scalars of an extract (read without decompressing its arrays)
HEADER_FIELDS = ("experiment_index", "geometry_key", "exposure_time", "beam_flux", "s0", "image_path",
                 "image_index", "frame", "name", "experiment_identifier", "provenance_key")


@dataclass
class Extracted:
    """A per-still extract file, read back (see docs/file_formats.md)."""

    mask: np.ndarray  # (Npix,) bool, True = used
    counts: np.ndarray  # (Nused,) float64 or int64
    A: np.ndarray  # (3, 3): q = A·hkl
    exposure_time: float  # s; 0 when the image has none (XFEL shots)
    geometry_key: str
    experiment_index: int
    image_path: str
    image_index: int
    frame: int
    name: str
    s0: np.ndarray | None = None  # (3,) Å⁻¹ of this still's beam (None in /1 files)
    beam_flux: float = 0.0  # the beam model's flux (header), 0 when unknown

    @property
    def n_used(self) -> int:
        return int(self.counts.shape[0])

    @property
    def wavelength(self) -> float | None:
        """λ (Å) of this still's beam, 1/|s0|; None in /1 files."""
        return None if self.s0 is None else float(1.0 / np.linalg.norm(self.s0))


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
    """Used-pixel counts from an extract file's arrays (int32, or float64; see :func:`pack_counts`)."""
    counts = z["counts"]
    if "overflow_index" in z:
        counts = counts.astype(np.int32)
        counts[z["overflow_index"].astype(np.int64)] = z["overflow_counts"]
    elif counts.dtype == np.float32:
        counts = counts.astype(np.float64)
    return counts


def write_extract(path, *, mask, counts, A, exposure_time, geometry_key, ref,
                  experiment_identifier: str = "", s0=None, beam_flux: float = 0.0, **extra):
    """Write one still's extract (schema diffuse.extract/2), atomically (the only writer).

    s0: this still's beam (Å⁻¹); q = ŝ1/λ − s0 with the per-detector ŝ1 of
    ``geometry_<key>.npz``. beam_flux: the beam model's flux (0 = unknown).

    experiment_identifier: the experiment's identifier (diffuse.merge matches
    stills to experiments by it); extra: further arrays (the provenance fields).
    """
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
        "experiment_identifier": np.array(experiment_identifier),
        "beam_flux": np.float64(beam_flux),
        **({} if s0 is None else {"s0": np.asarray(s0, dtype=np.float64).reshape(3)}),
        **extra,
    }
    from diffuse_cli import program

    program.write_npz(path, compresslevel=program.FAST_ZIP_LEVEL, **arrays)


def read_extract_arrays(path, fields=None) -> dict:
    """The arrays of an extract file (all, or ``fields``), schema and fields checked."""
    return read_npz(path, EXTRACT_SCHEMAS_READ, fields=fields,
                    required=REQUIRED if fields is None else [f for f in REQUIRED if f in fields])


def read_extract(path) -> Extracted:
    """Read a ``diffuse.extract/2`` (or /1) file."""
    z = read_extract_arrays(path)
    n = int(z["n_pixels"])
    mask = np.unpackbits(z["mask_bits"], count=n).astype(bool)
    counts = unpack_counts(z)
    if counts.shape[0] != int(mask.sum()):
        raise Sorry(f"{path}: {counts.shape[0]} counts for {int(mask.sum())} used pixels; rerun diffuse.extract")
    return Extracted(
        mask=mask,
        counts=counts,
        A=z["A"],
        exposure_time=float(z["exposure_time"]),
        geometry_key=str(z["geometry_key"]),
        experiment_index=int(z["experiment_index"]),
        image_path=str(z["image_path"]) if "image_path" in z else "",
        image_index=int(z["image_index"]) if "image_index" in z else 0,
        frame=int(z["frame"]) if "frame" in z else -1,
        name=str(z["name"]) if "name" in z else os.path.splitext(os.path.basename(os.fspath(path)))[0],
        s0=np.asarray(z["s0"], dtype=np.float64) if "s0" in z else None,
        beam_flux=float(z["beam_flux"]) if "beam_flux" in z else 0.0,
    )


def read_extract_header(path) -> dict:
    """The scalars of an extract file (its arrays are not decompressed), with defaults
    for fields older files lack: ``path``, ``experiment_index``, ``geometry_key``,
    ``exposure_time``, ``beam_flux`` (0), ``s0`` (None), ``image_path`` (""),
    ``image_index`` (0), ``frame`` (−1), ``name``, ``experiment_identifier`` (""),
    ``provenance_key`` ("")."""
    z = read_extract_arrays(path, fields=HEADER_FIELDS)
    return {
        "path": path,
        "experiment_index": int(z["experiment_index"]),
        "geometry_key": str(z["geometry_key"]),
        "exposure_time": float(z["exposure_time"]),
        "beam_flux": float(z["beam_flux"]) if "beam_flux" in z else 0.0,
        "s0": np.asarray(z["s0"], dtype=np.float64) if "s0" in z else None,
        "image_path": str(z["image_path"]) if "image_path" in z else "",
        "image_index": int(z["image_index"]) if "image_index" in z else 0,
        "frame": int(z["frame"]) if "frame" in z else -1,
        "name": str(z["name"]) if "name" in z else os.path.splitext(os.path.basename(os.fspath(path)))[0],
        "experiment_identifier": str(z["experiment_identifier"]) if "experiment_identifier" in z else "",
        "provenance_key": str(z["provenance_key"]) if "provenance_key" in z else "",
    }


def is_complete(path) -> bool:
    """True if ``path`` is a readable extract file of the current schema."""
    if not os.path.exists(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["schema"]) == EXTRACT_SCHEMA and "counts" in z and "A" in z
    except (KeyError, *CORRUPT):
        return False
