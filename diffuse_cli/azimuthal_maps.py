"""The (q∥, q⊥) map of ``diffuse.azimuthal_fit``: q resolved along a field direction.

For a unit field direction b̂ in the DIALS laboratory frame
(``maps.field_direction``, default +x, horizontal) and the beam direction
û (along s0): q∥ = q·b̂ and q⊥ = q·ê with ê = (b̂ × û)/|b̂ × û| (for b̂ = +x
and the beam along −z, ê = +y, up). q = 2π(s1 − s0) (Å⁻¹, q_inv_angstrom).
A pixel's small component along ê × b̂ (the curvature of the Ewald sphere)
is not shown. Drawn next to the (q_x, q_y) and cake maps (azimuthal_plots)
and stored in the same ``<stem>_maps.npz``.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli import azimuthal as az
from diffuse_cli import azimuthal_pixels as azp
from diffuse_cli import geometry


def field_axes(field_direction, beam):
    """(b̂, ê) unit vectors (lab frame); ValueError if b̂ is along the beam."""
    b = np.asarray(field_direction, dtype=np.float64)
    if b.shape != (3,) or not np.linalg.norm(b) > 0:
        raise ValueError("maps.field_direction must be three numbers, not all 0")
    b = b / np.linalg.norm(b)
    u = np.asarray(beam.get_unit_s0(), dtype=np.float64)
    e = np.cross(b, u)
    if np.linalg.norm(e) < 1e-6:
        raise ValueError("maps.field_direction is along the beam: q⊥ is undefined")
    return b, e / np.linalg.norm(e)


def pixel_q_components(detector, beam, field_direction):
    """(q∥, q⊥) of every pixel, flattened panel-major (Å⁻¹, 2π convention)."""
    b, e = field_axes(field_direction, beam)
    s0 = np.array(beam.get_s0(), dtype=np.float64)
    par, perp = [], []
    for panel in detector:
        s1 = geometry.s1_from_lab(geometry.pixel_lab_coordinates(panel).reshape(-1, 3), beam.get_wavelength())
        q = azp.TWO_PI * geometry.q_from_s1(s1, s0)
        par.append(q @ b)
        perp.append(q @ e)
    return np.concatenate(par), np.concatenate(perp)


def qpar_binning(detector, beam, mask, n, field_direction) -> az.Binning:
    """An n×n grid symmetric about 0 in (q∥ columns, q⊥ rows)."""
    qpar, qperp = pixel_q_components(detector, beam, field_direction)
    use = np.ones(qpar.size, dtype=bool) if mask is None else mask
    q_max = float(max(np.abs(qpar[use]).max(), np.abs(qperp[use]).max())) * (1 + 1e-6)
    ix = az._bin_index(qpar, -q_max, q_max, n, use)
    iy = az._bin_index(qperp, -q_max, q_max, n, use)
    index = np.where((ix < n) & (iy < n), iy * n + ix, n * n)
    edges = np.linspace(-q_max, q_max, n + 1)
    return az.Binning(index, n * n, None, None, "qpar_qperp", shape=(n, n),
                      meta={"qpar_edges": edges, "qperp_edges": edges})


def qpar_map(entry, image, params):
    """(map, n_pixels, edges) of one image in (q∥, q⊥), the binning cached in the
    driver's geometry ``entry``; Sorry for a field direction along the beam."""
    direction = tuple(params.maps.field_direction)
    key = ("qpar", direction, params.maps.n_bins)
    if key not in entry:
        try:
            entry[key] = qpar_binning(entry["detector"], entry["beam"], entry["mask"], params.maps.n_bins, direction)
        except ValueError as e:
            from libtbx.utils import Sorry

            raise Sorry(str(e))
    binning = entry[key]
    qmap, n_pix = binning.map2d(image)
    return qmap, n_pix, binning.meta["qpar_edges"]
