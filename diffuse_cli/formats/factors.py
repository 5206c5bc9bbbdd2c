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

from diffuse_cli.formats.common import read_npz

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
    """The arrays of a factors file (all, or only ``fields``), schema and fields checked."""
    return read_npz(path, FACTORS_SCHEMA, fields=fields,
                    required=REQUIRED if fields is None else [f for f in REQUIRED if f in fields])
