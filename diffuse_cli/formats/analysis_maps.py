"""Analysis maps: ``anisotropic.npz`` (``diffuse.anisotropic/1``) and ``pdf.npz`` (``diffuse.pdf/1``).

anisotropic.npz (diffuse.anisotropic), on the grid contract of merged.npz
(dense arrays indexed ``[h, k, l]``, axes ``h``, ``k``, ``l``, ``ndiv``,
``unit_cell``, ``space_group``, ``laue_group``, ``units``):

* ``I_aniso``, ``sigma_aniso`` (float32, NaN where unmeasured): I − I_iso(|q|)
  and its propagated σ; ``I_iso_map`` (float32): I_iso at every measured voxel
  (so the total map is I_aniso + I_iso_map); ``counts`` (int64, from merged);
* ``I_aniso_filled`` (float32): the anisotropic map after punch-and-fill (NaN
  beyond the fill limit); ``filled`` (bool): True where I_aniso_filled is an
  interpolation (not a mask); ``punched`` (bool): True where the punch removed
  a measured voxel; ``fill_s_limit`` (Å⁻¹): the fill limit, diffuse.pdf's
  default cut-off;
* shells: ``shell_edges`` (n+1, Å⁻¹), ``shell_s_mean``, ``shell_I_iso``,
  ``shell_sigma_iso``, ``shell_n_voxels``, ``shell_chi2``;
* provenance: ``source`` (the merged.npz), ``source_fingerprint``,
  ``parameters`` (PHIL diff), ``program_version``.

pdf.npz (diffuse.pdf), real space:

* ``delta_pdf``, ``patterson`` (float32, [x, y, z]; e²/Å³ on the absolute
  scale, else map units × Å⁻³, see ``pdf_units``); axes ``x``, ``y``, ``z``
  (fractional cell coordinates, origin at the centre voxel); ``voxel_A``,
  ``extent_A`` (3,), ``unit_cell``, ``ndiv``, ``s_max`` (Å⁻¹),
  ``taper_start``, ``delta_v_star`` (Å⁻³), ``imag_fraction``;
* features of the ΔPDF: ``feature_frac`` (n, 3), ``feature_cart`` (n, 3, Å),
  ``feature_value`` (n,); provenance as above.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.formats.common import read_npz

ANISOTROPIC_SCHEMA = "diffuse.anisotropic/1"
PDF_SCHEMA = "diffuse.pdf/1"
ANISOTROPIC_REQUIRED = ("I_aniso", "sigma_aniso", "I_iso_map", "I_aniso_filled", "filled",
                        "h", "k", "l", "ndiv", "unit_cell", "units")
PDF_REQUIRED = ("delta_pdf", "patterson", "x", "y", "z", "unit_cell", "ndiv", "pdf_units")


def _provenance_arrays(provenance: dict) -> dict:
    from diffuse_cli import __version__

    out = {key: np.asarray(v) for key, v in provenance.items()}
    out["program_version"] = np.array(str(__version__))
    return out


def write_anisotropic(path, h, k, l, ndiv, unit_cell, result: dict, fill: dict, counts=None,
                      space_group: str = "P1", laue_group: str = "", units: str = "", **provenance) -> None:
    """Write anisotropic.npz atomically (the only writer).

    result: diffuse_cli.analysis.isotropic.anisotropic_map's dict;
    fill: diffuse_cli.analysis.fill.punch_and_fill's dict on I_aniso.
    """
    from diffuse_cli import program

    shape = (len(h), len(k), len(l))
    arrays = dict(
        schema=np.array(ANISOTROPIC_SCHEMA),
        I_aniso=np.asarray(result["I_aniso"], dtype=np.float32).reshape(shape),
        sigma_aniso=np.asarray(result["sigma_aniso"], dtype=np.float32).reshape(shape),
        I_iso_map=np.asarray(result["I_iso_map"], dtype=np.float32).reshape(shape),
        I_aniso_filled=np.asarray(fill["filled"], dtype=np.float32).reshape(shape),
        filled=np.asarray(fill["filled_mask"], dtype=bool).reshape(shape),
        punched=np.asarray(fill["punched"], dtype=bool).reshape(shape),
        fill_s_limit=np.float64(fill["s_limit"]),
        h=np.asarray(h, dtype=np.float64), k=np.asarray(k, dtype=np.float64), l=np.asarray(l, dtype=np.float64),
        ndiv=np.asarray(ndiv, dtype=np.int64), unit_cell=np.asarray(unit_cell, dtype=np.float64),
        space_group=np.array(str(space_group)), laue_group=np.array(str(laue_group)), units=np.array(str(units)),
        shell_edges=result["s_edges"], shell_s_mean=result["s_mean"], shell_I_iso=result["I_iso"],
        shell_sigma_iso=result["sigma_iso"], shell_n_voxels=result["n_voxels"], shell_chi2=result["chi2"],
    )
    if counts is not None:
        arrays["counts"] = np.asarray(counts, dtype=np.int64).reshape(shape)
    arrays.update(_provenance_arrays(provenance))
    program.write_npz(path, compresslevel=program.FAST_ZIP_LEVEL, **arrays)  # large maps: fast zlib


def read_anisotropic(path, fields=None) -> dict:
    """The arrays of an anisotropic.npz (all, or ``fields``), schema and fields checked."""
    return read_npz(path, ANISOTROPIC_SCHEMA, fields=fields,
                    required=ANISOTROPIC_REQUIRED if fields is None
                    else [f for f in ANISOTROPIC_REQUIRED if f in fields])


def write_pdf(path, delta: dict, patterson: dict, features: list, unit_cell, ndiv, pdf_units: str,
              **provenance) -> None:
    """Write pdf.npz atomically (the only writer); delta/patterson: diffuse_cli.analysis.pdf.pdf_map dicts."""
    from diffuse_cli import program

    n = len(features)
    arrays = dict(
        schema=np.array(PDF_SCHEMA),
        delta_pdf=np.asarray(delta["P"], dtype=np.float32),
        patterson=np.asarray(patterson["P"], dtype=np.float32),
        x=delta["x"], y=delta["y"], z=delta["z"],
        voxel_A=delta["voxel_A"], extent_A=delta["extent_A"], s_max=np.float64(delta["s_max"]),
        taper_start=np.float64(delta["taper_start"]), delta_v_star=np.float64(delta["delta_v_star"]),
        imag_fraction=np.float64(delta["imag_fraction"]),
        unit_cell=np.asarray(unit_cell, dtype=np.float64), ndiv=np.asarray(ndiv, dtype=np.int64),
        pdf_units=np.array(str(pdf_units)),
        feature_frac=np.array([f["frac"] for f in features], dtype=np.float64).reshape(n, 3),
        feature_cart=np.array([f["cart"] for f in features], dtype=np.float64).reshape(n, 3),
        feature_value=np.array([f["value"] for f in features], dtype=np.float64).reshape(n),
    )
    arrays.update(_provenance_arrays(provenance))
    program.write_npz(path, compressed=False, **arrays)  # dense real-space maps hardly compress


def read_pdf(path, fields=None) -> dict:
    """The arrays of a pdf.npz (all, or ``fields``), schema and fields checked."""
    return read_npz(path, PDF_SCHEMA, fields=fields,
                    required=PDF_REQUIRED if fields is None else [f for f in PDF_REQUIRED if f in fields])


def read_anisotropic_or_merged(path) -> tuple[str, dict]:
    """(schema, arrays) of an anisotropic.npz or a merged.npz (diffuse.pdf's input), schema-checked."""
    from diffuse_cli import program
    from diffuse_cli.formats.common import check_schema
    from diffuse_cli.formats.merged import MERGE_SCHEMA, read_merged

    with program.open_npz(path) as data:
        schema = check_schema(data, (ANISOTROPIC_SCHEMA, MERGE_SCHEMA), path)
    return schema, (read_anisotropic(path) if schema == ANISOTROPIC_SCHEMA else read_merged(path))
