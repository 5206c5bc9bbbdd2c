"""Per-still extracted pixels: ``<still>.npz`` (schema ``diffuse.extract/3``).

Written by diffuse.extract, one per image (per lattice when several share
an image); read by diffuse.correct, diffuse.merge (identity checks) and
tests. Fields:

* ``schema``; ``header``: a JSON object of the scalars below and ``A``,
  ``s0`` (/1, /2: one member each); ``mask_deflate`` (zlib stream of ``np.packbits`` of the (Npix,)
  used-pixel mask, True = used; /1, /2: ``mask_bits`` as such) and ``n_pixels``;
* the counts of the used pixels, in pixel order (:func:`pack_counts`):
  ``counts_n``, ``counts_codec`` (nibble, byte or delta), ``counts_stream``
  (zlib stream of the 4- or 8-bit symbols) and ``counts_escaped`` (zlib
  stream of the int32 values of the escaped symbols, in order); or
  ``counts`` int32 / float32 (negative or non-integral data). /1, /2:
  ``counts`` uint8 + ``overflow_index``/``overflow_counts``;
* ``sample_n``, ``sample_codec``, ``sample_stream``, ``sample_escaped`` (or ``sample``): the
  same for the counts of the used pixels among every SAMPLE_STRIDE-th pixel
  (:func:`sample_pixels`; /3 only), for diffuse.correct's summary figures;
* ``A`` (3, 3) setting matrix (q = A·hkl), ``s0`` (3,) Å⁻¹ of the still's
  beam, ``exposure_time`` (s; 0 for XFEL shots), ``beam_flux`` (0 = unknown),
  ``geometry_key`` (its ``geometry_<key>.npz``);
* identity: ``experiment_identifier``, ``experiment_index``, ``image_path``,
  ``image_index`` (within the file), ``frame`` (−1 for stills), ``name``;
* provenance: ``provenance_key`` and ``provenance`` (JSON of its parts:
  image fingerprint, mask-file fingerprints, experiment fingerprint; see
  :mod:`diffuse_cli.provenance`).

The npz itself is stored (no zip deflate): the two big arrays are zlib
streams: the mask and nibble counts deflated with zlib's run-length strategy
(faster than level-1 LZ77 on counts and smaller), byte and delta counts of
≥ FAST_DEFLATE_MIN pixels Huffman-coded without matches by zlib-ng
(``zlib_ng``, strategy Z_HUFFMAN_ONLY: a standard zlib stream, 2–2.5× faster
than zlib's and the same size; any zlib reads it). :func:`read_extract_arrays` returns ``mask_bits`` decoded for every
schema, and :func:`unpack_counts` the exact counts.

``diffuse.extract/2`` and ``/1`` files (/1: no ``s0``: the geometry's beam is
the still's) are still read.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import numpy as np

from libtbx.utils import Sorry

from diffuse_cli.formats.common import CORRUPT, read_npz

EXTRACT_SCHEMA = "diffuse.extract/3"
#: extract schemas read back (/2: counts and mask zip-deflated; /1: no per-still s0)
EXTRACT_SCHEMAS_READ = ("diffuse.extract/1", "diffuse.extract/2", EXTRACT_SCHEMA)
#: the arrays that hold the counts (see pack_counts; /1, /2: counts + overflow)
COUNT_ARRAYS = ("counts", "overflow_index", "overflow_counts", "counts_n", "counts_codec", "counts_stream",
                "counts_escaped")
#: the arrays that hold the sampled counts (/3 only; see sample_pixels)
SAMPLE_ARRAYS = ("sample", "sample_n", "sample_codec", "sample_stream", "sample_escaped")
#: the arrays that hold the mask (/3: mask_deflate; /1, /2: mask_bits)
MASK_ARRAYS = ("mask_bits", "mask_deflate")
#: what every extract file holds (besides a mask and counts: _require_pixels)
REQUIRED = ("n_pixels", "A", "exposure_time", "geometry_key", "experiment_index")
#: nibble value meaning "15 or more: the value is in counts_escaped"
NIBBLE_ESCAPE = 15
#: the counts of every SAMPLE_STRIDE-th pixel (if used) are also kept apart, as ``sample``:
#: diffuse.correct's summary figures without decoding all counts (a multiple of 8, not a power of 2)
SAMPLE_STRIDE = 72
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


def _deflate(data) -> np.ndarray:
    """zlib stream (level 1, run-length strategy) of an array's bytes, as uint8."""
    c = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)
    raw = np.ascontiguousarray(data)
    return np.frombuffer(c.compress(raw) + c.flush(), dtype=np.uint8)


#: byte / delta streams at least this long are deflated by zlib-ng (:func:`_fast_deflate`)
FAST_DEFLATE_MIN = 1 << 16


def _fast_deflate(data) -> np.ndarray:
    """zlib stream of an array's bytes, Huffman-coded literals (zlib-ng, Z_HUFFMAN_ONLY), as uint8.

    Byte and delta symbols of counts have few runs for RLE or LZ77 to find, and their
    symbol statistics are all a coder can use. zlib-ng codes them 2–2.5× faster than
    zlib, to the same size (ISA-L, faster still, was 10 % larger on low counts; libdeflate
    has no Huffman-only mode: its level 1 is slower and 7 % larger)."""
    from zlib_ng import zlib_ng

    c = zlib_ng.compressobj(1, zlib_ng.DEFLATED, zlib_ng.MAX_WBITS, 9, zlib_ng.Z_HUFFMAN_ONLY)
    raw = np.ascontiguousarray(data)
    return np.frombuffer(c.compress(raw) + c.flush(), dtype=np.uint8)


def _inflate(stream, dtype) -> np.ndarray:
    return np.frombuffer(zlib.decompress(np.asarray(stream, dtype=np.uint8)), dtype=dtype)


def _zigzag(d: np.ndarray) -> np.ndarray:
    """Signed int64 -> non-negative (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...)."""
    return (d << 1) ^ (d >> 63)


def _delta_zigzag(counts: np.ndarray) -> np.ndarray:
    """Zig-zag code of c[i] − c[i−1] (c[−1] = 0) of non-negative counts: in
    int32 when they are int32 (the difference of two values in [0, 2³¹)
    fits; its zig-zag is read as uint32), else int64."""
    if counts.dtype == np.int32:
        d = np.empty(counts.size, dtype=np.int32)
        d[:1] = counts[:1]
        np.subtract(counts[1:], counts[:-1], out=d[1:])
        z = np.left_shift(d, 1)
        z ^= d >> 31
        return z.view(np.uint32)
    c = counts.astype(np.int64)
    return _zigzag(np.diff(c, prepend=0))


def _delta_symbols_py(counts, stream, escaped):
    """The ``delta`` codec's symbols min(z, 255) into ``stream`` and the escaped
    z ≥ 255 into ``escaped`` (returns their number), z the zig-zag of
    c[i] − c[i−1] (c[−1] = 0): :func:`_delta_zigzag` and the escape in one pass."""
    prev = 0
    n_escaped = 0
    for i in range(counts.size):
        c = np.int64(counts[i])
        d = c - prev
        prev = c
        z = (d << 1) ^ (d >> 63)
        if z >= 255:
            stream[i] = 255
            escaped[n_escaped] = z
            n_escaped += 1
        else:
            stream[i] = z
    return n_escaped


_DELTA_KERNEL: list = []


def _delta_kernel():
    """The compiled :func:`_delta_symbols_py` (numba: 4 ms instead of 32 ms of numpy for
    6 M counts), or None without numba; imported on first use (readers need no numba)."""
    if not _DELTA_KERNEL:
        try:
            import numba
        except ImportError:  # pragma: no cover - depends on the installation
            _DELTA_KERNEL.append(None)
        else:
            _DELTA_KERNEL.append(numba.njit(nogil=True, cache=True)(_delta_symbols_py))
    return _DELTA_KERNEL[0]


def _entropy_bits(symbols: np.ndarray, escape: int) -> float:
    """Estimated bits per value of a symbol stream with escapes (Shannon entropy
    of the symbols + ~24 bits per escaped value)."""
    h = np.bincount(symbols, minlength=escape + 1).astype(np.float64)
    if not h.sum():
        return 0.0
    p = h[h > 0] / h.sum()
    return float(-(p * np.log2(p)).sum() + 24.0 * h[escape] / h.sum())


def choose_codec(counts: np.ndarray) -> str:
    """The codec of non-negative integer counts: ``nibble`` (4 bits + escapes, the
    fastest: low counts), ``byte`` or ``delta`` (zig-zag differences of
    consecutive counts: high, smoothly varying counts), by the entropy of
    each on 32 windows of 2048 consecutive counts."""
    n = counts.size
    if n < 4096:
        windows = counts.astype(np.int64)[None, :]
    else:
        starts = np.linspace(0, n - 2048, 32).astype(np.int64)
        windows = counts[starts[:, None] + np.arange(2048)].astype(np.int64)
    flat = windows.ravel()
    est = {
        "nibble": _entropy_bits(np.minimum(flat, NIBBLE_ESCAPE), NIBBLE_ESCAPE),
        "byte": _entropy_bits(np.minimum(flat, 255), 255),
        "delta": _entropy_bits(np.minimum(_zigzag(np.diff(windows, axis=1).ravel()), 255), 255),
    }
    if est["nibble"] <= 1.1 * min(est["byte"], est["delta"]):  # nibbles: half the bytes to deflate
        return "nibble"
    return "byte" if est["byte"] <= est["delta"] else "delta"


def pack_counts(counts: np.ndarray, name: str = "counts") -> dict:
    """Compact storage of used-pixel counts (schema /3), under ``name``.

    Non-negative integers: ``<name>_codec`` (:func:`choose_codec`),
    ``<name>_stream``, the deflated (:func:`_deflate`) symbols, and
    ``<name>_escaped``, the deflated int32 (delta: int64) values of the
    escaped symbols, in order; ``<name>_n`` the number of counts. Codecs: ``nibble``: min(c, 15),
    two per byte, low nibble first, 15 escapes c; ``byte``: min(c, 255),
    255 escapes c; ``delta``: min(z, 255) with z the zig-zag of c[i] − c[i−1]
    (c[−1] = 0), 255 escapes z. Other integers: ``<name>`` int32.
    Non-integral values: ``<name>`` float32.
    """
    counts = np.asarray(counts)
    integral = np.issubdtype(counts.dtype, np.integer) or bool(
        np.all(np.equal(np.mod(counts, 1), 0))
    )
    if not integral:
        return {name: counts.astype(np.float32)}
    if counts.size and counts.min() < 0:
        return {name: counts.astype(np.int32)}
    n = counts.size
    codec = choose_codec(counts) if n else "nibble"
    if codec == "nibble":
        sym = np.empty(n + (n & 1), dtype=np.uint8)
        np.minimum(counts, NIBBLE_ESCAPE, out=sym[:n], casting="unsafe")
        sym[n:] = 0
        escaped = counts[sym[:n] == NIBBLE_ESCAPE]
        stream = sym[0::2] | (sym[1::2] << 4)
    elif codec == "delta" and counts.dtype == np.int32 and _delta_kernel() is not None:
        stream = np.empty(n, dtype=np.uint8)
        escaped = np.empty(n, dtype=np.int64)
        escaped = escaped[: _delta_kernel()(np.ascontiguousarray(counts), stream, escaped)].copy()
    else:
        values = counts if codec == "byte" else _delta_zigzag(counts)
        stream = np.empty(n, dtype=np.uint8)
        np.minimum(values, 255, out=stream, casting="unsafe")
        escaped = values[stream == 255]
    deflated = _deflate(stream) if codec == "nibble" or n < FAST_DEFLATE_MIN else _fast_deflate(stream)
    return {f"{name}_n": np.int64(n), f"{name}_codec": np.array(codec), f"{name}_stream": deflated,
            f"{name}_escaped": _deflate(escaped.astype(np.int64 if codec == "delta" else np.int32))}


def unpack_counts(z, name: str = "counts") -> np.ndarray:
    """Used-pixel counts from an extract file's arrays (int32, or float64; see :func:`pack_counts`)."""
    if f"{name}_stream" in z:
        n, codec = int(z[f"{name}_n"]), str(z[f"{name}_codec"])
        stream = _inflate(z[f"{name}_stream"], np.uint8)
        if codec == "nibble":
            if stream.size != (n + 1) // 2:
                raise Sorry(f"{stream.size} bytes of {name} for {n} pixels; rerun diffuse.extract")
            values = np.empty(2 * stream.size, dtype=np.int32)
            np.bitwise_and(stream, 15, out=values[0::2], casting="unsafe")
            np.right_shift(stream, 4, out=values[1::2], casting="unsafe")
            values, escape = values[:n], NIBBLE_ESCAPE
        elif codec in ("byte", "delta"):
            if stream.size != n:
                raise Sorry(f"{stream.size} bytes of {name} for {n} pixels; rerun diffuse.extract")
            values, escape = stream.astype(np.int32 if codec == "byte" else np.int64), 255
        else:
            raise Sorry(f"unknown {name} codec {codec!r}; a newer diffuse.extract wrote this file?")
        escaped = values == escape
        exact = _inflate(z[f"{name}_escaped"], np.int64 if codec == "delta" else np.int32)
        if exact.size != int(np.count_nonzero(escaped)):
            raise Sorry(f"{exact.size} escaped {name} for {int(np.count_nonzero(escaped))} pixels; rerun diffuse.extract")
        values[escaped] = exact
        if codec == "delta":
            values = np.cumsum((values >> 1) ^ -(values & 1)).astype(np.int32)
        return values
    counts = z[name]
    if "overflow_index" in z and name == "counts":  # /1, /2: uint8 clipped at 255 + exact overflows
        counts = counts.astype(np.int32)
        counts[z["overflow_index"].astype(np.int64)] = z["overflow_counts"]
    elif counts.dtype == np.float32:
        counts = counts.astype(np.float64)
    return counts


def n_counts(z, name: str = "counts") -> int:
    """Number of used-pixel counts in an extract's arrays, without decoding them."""
    return int(z[f"{name}_n"]) if f"{name}_n" in z else int(z[name].shape[0])


def has_sample(z) -> bool:
    """True when an extract's arrays hold the counts at :func:`sample_pixels` (schema /3)."""
    return "sample_stream" in z or "sample" in z


def sample_pixels(mask_bits: np.ndarray, n_pixels: int) -> np.ndarray:
    """Flat indices of the sampled used pixels: every SAMPLE_STRIDE-th pixel
    (0, SAMPLE_STRIDE, ...) that is used. Reads one bit of every
    SAMPLE_STRIDE/8-th mask byte (np.packbits: first pixel = high bit)."""
    candidates = np.arange(0, int(n_pixels), SAMPLE_STRIDE)
    bits = np.asarray(mask_bits, dtype=np.uint8)[:: SAMPLE_STRIDE // 8][: candidates.size] >> 7
    return candidates[bits.astype(bool)]


def write_extract(path, *, mask, counts, A, exposure_time, geometry_key, ref,
                  experiment_identifier: str = "", s0=None, beam_flux: float = 0.0, sample=None, **extra):
    """Write one still's extract (schema diffuse.extract/3), atomically (the only writer).

    sample: the counts at :func:`sample_pixels` (taken from ``counts`` when None).

    s0: this still's beam (Å⁻¹); q = ŝ1/λ − s0 with the per-detector ŝ1 of
    ``geometry_<key>.npz``. beam_flux: the beam model's flux (0 = unknown).

    experiment_identifier: the experiment's identifier (diffuse.merge matches
    stills to experiments by it); extra: further arrays (the provenance fields).
    """
    mask = np.asarray(mask, dtype=bool)
    header = {
        "n_pixels": int(mask.size),
        "A": np.asarray(A, dtype=np.float64).reshape(3, 3).tolist(),
        "exposure_time": float(exposure_time),
        "geometry_key": str(geometry_key),
        "experiment_index": int(ref.experiment_index),
        "image_path": str(ref.image_path),
        "image_index": int(ref.file_index),
        "frame": int(-1 if ref.frame is None else ref.frame),
        "name": str(ref.name),
        "experiment_identifier": str(experiment_identifier),
        "beam_flux": float(beam_flux),
        **({} if s0 is None else {"s0": np.asarray(s0, dtype=np.float64).reshape(3).tolist()}),
    }
    arrays = {"schema": np.array(EXTRACT_SCHEMA), "mask_deflate": _deflate(np.packbits(mask))}
    packed = {**pack_counts(np.asarray(counts)),
              **pack_counts(_sample_of(mask, counts) if sample is None else np.asarray(sample), "sample")}
    for k, v in packed.items():  # the codecs' scalars go in the header
        if np.ndim(v) == 0:
            header[k] = v.item()
        else:
            arrays[k] = v
    # one JSON member for the scalars: each npz member costs ~0.3 kB and a header parse
    # (floats as repr: exact round trip)
    arrays["header"] = np.array(json.dumps(header))
    arrays.update(extra)
    from diffuse_cli import program

    # stored: the big arrays are deflated already (pack_counts, _deflate)
    program.write_npz(path, compressed=False, **arrays)


def _sample_of(mask: np.ndarray, counts) -> np.ndarray:
    """The used-pixel counts at sample_pixels, from the mask and all used-pixel counts."""
    counts = np.asarray(counts)
    rank = np.cumsum(mask) - 1  # position of each used pixel among the used ones
    pixels = np.flatnonzero(mask[::SAMPLE_STRIDE]) * SAMPLE_STRIDE
    return counts[rank[pixels]]


def read_extract_arrays(path, fields=None) -> dict:
    """The arrays of an extract file (all, or ``fields``), schema and fields checked.

    ``mask_bits`` (np.packbits of the used-pixel mask) is returned decoded
    whatever the schema; ask for ``COUNT_ARRAYS`` and decode them with
    :func:`unpack_counts`.
    """
    wanted = None if fields is None else [*fields, "header"]
    if wanted is not None and "mask_bits" in wanted:
        wanted.append("mask_deflate")
    z = read_npz(path, EXTRACT_SCHEMAS_READ, fields=wanted)
    if "header" in z:  # /3: the scalars (and A, s0) as JSON
        try:
            header = json.loads(str(z.pop("header")))
        except ValueError:
            raise Sorry(f"{path}: unreadable header; rerun diffuse.extract") from None
        for k, v in header.items():
            if fields is None or k in fields:
                z[k] = np.array(v)
    missing = [f for f in (REQUIRED if fields is None else [f for f in REQUIRED if f in fields]) if f not in z]
    if missing:
        raise Sorry(f"{path}: {str(z.get('schema', 'extract'))} file without {', '.join(missing)}; "
                    "rerun the program that wrote it")
    if fields is None or "mask_bits" in fields:
        _require_pixels(z, path, counts=fields is None or "counts" in fields)
    if "mask_deflate" in z:
        z["mask_bits"] = _inflate(z.pop("mask_deflate"), np.uint8)
    return z


def _require_pixels(z, path, counts: bool) -> None:
    missing = []
    if not any(n in z for n in MASK_ARRAYS):
        missing.append("mask_bits")
    if counts and "counts" not in z and "counts_stream" not in z:
        missing.append("counts")
    if missing:
        raise Sorry(f"{path}: {str(z.get('schema', 'extract'))} file without {', '.join(missing)}; "
                    "rerun the program that wrote it")


def read_extract(path) -> Extracted:
    """Read a ``diffuse.extract/3`` (or /2, /1) file."""
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
            return str(z["schema"]) == EXTRACT_SCHEMA and ("counts_stream" in z or "counts" in z) and ("header" in z or "A" in z)
    except (KeyError, *CORRUPT):
        return False
