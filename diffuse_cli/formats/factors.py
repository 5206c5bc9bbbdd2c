"""Per-detector correction multipliers: ``factors_<key>.npz`` (schema ``diffuse.factors/2``).

Written by diffuse.correct once per detector (and beam direction; not per
wavelength), read by diffuse.correct and diffuse.merge
(``corrections.load_observations``). Fields, per pixel in pixel order unless
said:

* ``schema``, ``geometry_key``, ``panel_shapes`` (P, 2);
* ``s1_unit`` (Npix, 3) float32 ŝ1, ``beam_direction`` ŝ0, and ``s0`` (Å⁻¹),
  ``wavelength`` (Å) of the reference beam;
* the multipliers (float32) ``solid_angle`` (1e-6/Ω), ``polarization``
  (1/P), ``efficiency`` (1/η), ``air`` (1/T_air), ``kapton`` (1/T_kapton) at
  the reference wavelength, their product ``total`` (float64) and the names
  of those ``applied``;
* the path lengths (float32, mm) ``air_path_mm``, ``sensor_path_mm``,
  ``kapton_path_mm`` of the λ-dependent factors, and the reference
  attenuation coefficients (``corrections.WAVELENGTH_COEFFICIENTS``);
* provenance: ``provenance_key`` and ``provenance`` (JSON: its geometry
  file's content fingerprint, the experiment models, the correction
  parameters; :mod:`diffuse_cli.provenance`).
"""

from __future__ import annotations

import os

import numpy as np

from libtbx.utils import Sorry

FACTORS_SCHEMA = "diffuse.factors/2"
REQUIRED = ("geometry_key", "panel_shapes", "s1_unit", "beam_direction", "s0", "wavelength", "total")


def factors_filename(geometry_key: str) -> str:
    return f"factors_{geometry_key}.npz"


def factors_path(directory, geometry_key: str) -> str:
    return os.path.join(os.fspath(directory), factors_filename(geometry_key))


def write_factors(path, *, geometry_key: str, view, multipliers: dict, names, paths: dict,
                  coefficients: dict, **provenance) -> None:
    """Write ``factors_<key>.npz`` atomically (the only writer).

    view: the DetectorGeometry bound to the reference beam; multipliers: the
    per-pixel multipliers named in ``names``, with ``total`` and ``applied``;
    paths: path lengths (mm); coefficients: the reference attenuation
    coefficients; provenance: the provenance fields (``provenance.npz_fields``).
    """
    from diffuse_cli import program

    program.write_npz(
        path,
        compressed=False,  # float arrays hardly compress; writing and loading stay fast
        schema=np.array(FACTORS_SCHEMA),
        geometry_key=np.array(geometry_key),
        panel_shapes=np.asarray(view.panel_shapes, dtype=np.int32),
        s1_unit=view.s1_unit.astype(np.float32),
        beam_direction=view.beam_direction,
        s0=np.asarray(view.s0, dtype=np.float64),
        wavelength=np.float64(view.wavelength),
        total=multipliers["total"].astype(np.float64),
        applied=np.array(multipliers["applied"], dtype=str),
        **{name: multipliers[name].astype(np.float32) for name in names},
        **{name: v.astype(np.float32) for name, v in paths.items()},
        **{name: np.asarray(v, dtype=np.float64) for name, v in coefficients.items()},
        **provenance,
    )


def read_factors(path, fields=None) -> dict:
    """The arrays of a factors file (all, or only ``fields``), schema and fields checked.

    The file is stored (not deflated): each array is read straight from the file into
    its own memory, in one read, its CRC-32 checked (zlib-ng) as zipfile checks it; the
    same arrays as ``np.load`` at a fraction of its copies (the per-pixel fields of a
    Pilatus 6M are 250 MB). A member zipfile would have to inflate is read by np.load."""
    from diffuse_cli import program
    from diffuse_cli.formats.common import CORRUPT, check_schema, require

    required = REQUIRED if fields is None else [f for f in REQUIRED if f in fields]
    with program.open_npz(path) as data:  # missing, empty, truncated, foreign: Sorry naming it
        schema = check_schema(data, FACTORS_SCHEMA, path)
        require(data, required, path, schema)
        names = data.files if fields is None else [n for n in fields if n in data.files]
        out = {}
        with open(path, "rb") as raw:
            for name in names:
                try:
                    arr = _read_stored(data.zip, raw, name + ".npy")
                    out[name] = data[name] if arr is None else arr
                except CORRUPT as e:  # as read_npz: a bad CRC, a short read
                    raise Sorry(f"{path}: field {name} is unreadable ({type(e).__name__}); is the file "
                                "truncated? Rerun the program that wrote it") from None
        return out


def _read_stored(zf, raw, member: str):
    """The array of a stored (ZIP_STORED) ``.npy`` member of ``zf``, read from the open file
    ``raw`` into a fresh array; None when np.load must read it (deflated, Fortran order,
    objects, an .npy version it has no reader for)."""
    import struct
    import zipfile

    from zlib_ng import zlib_ng

    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # deflated or encrypted
        return None
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of {member}")
    n_name, n_extra = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + n_name + n_extra
    raw.seek(start)
    version = np.lib.format.read_magic(raw)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        return None
    shape, fortran_order, dtype = readers[version](raw)
    if fortran_order or dtype.hasobject:
        return None
    header = raw.tell() - start
    count = int(np.prod(shape, dtype=np.int64))
    if header + count * dtype.itemsize != info.file_size:
        raise ValueError(f"{member}: {info.file_size} bytes for a {dtype} array of shape {shape}")
    raw.seek(start)
    crc = zlib_ng.crc32(raw.read(header))
    arr = np.empty(count, dtype=dtype)
    body = arr.view(np.uint8) if count else memoryview(b"")
    if count and raw.readinto(body) != body.size:
        raise EOFError(f"{member}: short read")
    if zlib_ng.crc32(body, crc) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {member!r}")
    return arr.reshape(shape)
