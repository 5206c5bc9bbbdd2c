"""q-space maps of one image: ``<stem>_maps.npz`` (schema ``diffuse.azimuthal_maps/1``).

Written by diffuse.azimuthal_fit (``maps/``) next to the pictures of the same
maps. Fields (azimuthal_fit's SAXS convention: q = 2π/d = 2π|s1 − s0|, Å⁻¹;
docs/azimuthal_fit.md):

* ``schema``;
* ``qmap`` (n, n) float32 mean intensity on a (q_x, q_y) detector-plane grid
  with edges ``qx_edges``, ``qy_edges`` (n+1,); ``qmap_n_pixels`` (n, n) int32
  pixels per bin (0: empty, ``qmap`` NaN);
* ``cake`` (n_q, n_chi) float32 mean intensity on a (|q|, χ) grid with edges
  ``q_edges`` (n_q+1,) and ``chi_edges`` (n_chi+1,, degrees);
  ``cake_n_pixels`` likewise;
* optional ``qmap_filled``, ``cake_filled``: the same maps with empty bins
  filled from their centrosymmetric mates (``maps.fill_centrosymmetric``);
* optional ``qpar_qperp`` (n, n) float32 mean intensity in (q∥ columns, q⊥
  rows; q = 2π(s1 − s0), Å⁻¹) with edges ``qpar_edges`` (n+1,) on both axes,
  ``qpar_n_pixels`` and ``field_direction`` (3,) (diffuse_cli.azimuthal_maps).
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.formats.common import read_npz

AZIMUTHAL_MAPS_SCHEMA = "diffuse.azimuthal_maps/1"
_REQUIRED = ("qmap", "qmap_n_pixels", "qx_edges", "qy_edges", "cake", "cake_n_pixels", "q_edges", "chi_edges")


def write_azimuthal_maps(path, *, qmap, qmap_n_pixels, qx_edges, qy_edges, cake, cake_n_pixels, q_edges,
                         chi_edges, qmap_filled=None, cake_filled=None, qpar_qperp=None, qpar_n_pixels=None,
                         qpar_edges=None, field_direction=None) -> None:
    """Write one image's maps atomically (the only writer)."""
    from diffuse_cli import program

    filled = {k: np.asarray(v, dtype=np.float32) for k, v in
              (("qmap_filled", qmap_filled), ("cake_filled", cake_filled), ("qpar_qperp", qpar_qperp))
              if v is not None}
    if qpar_qperp is not None:
        filled.update(qpar_n_pixels=np.asarray(qpar_n_pixels, dtype=np.int32),
                      qpar_edges=np.asarray(qpar_edges, dtype=np.float64),
                      field_direction=np.asarray(field_direction, dtype=np.float64))
    program.write_npz(
        path,
        schema=np.array(AZIMUTHAL_MAPS_SCHEMA),
        qmap=np.asarray(qmap, dtype=np.float32),
        qmap_n_pixels=np.asarray(qmap_n_pixels, dtype=np.int32),
        qx_edges=np.asarray(qx_edges, dtype=np.float64),
        qy_edges=np.asarray(qy_edges, dtype=np.float64),
        cake=np.asarray(cake, dtype=np.float32),
        cake_n_pixels=np.asarray(cake_n_pixels, dtype=np.int32),
        q_edges=np.asarray(q_edges, dtype=np.float64),
        chi_edges=np.asarray(chi_edges, dtype=np.float64),
        **filled,
    )


def read_azimuthal_maps(path, fields=None) -> dict:
    """The arrays of a ``<stem>_maps.npz`` (all, or ``fields``), schema checked."""
    return read_npz(path, AZIMUTHAL_MAPS_SCHEMA, fields=fields, required=_REQUIRED if fields is None else ())
