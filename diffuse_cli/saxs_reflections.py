"""Reflections by Miller index from a CIF, for ``diffuse.azimuthal_fit hkl=``
when no indexed crystal model exists (powders, fibres, liquid crystals).

The unit cell (``_cell_length_a`` ... ``_cell_angle_gamma``) is read with
gemmi; d(hkl) from the cell's metric, and the azimuthal band is centred on
q = 2π/d (q_inv_angstrom, Å⁻¹).
"""

from __future__ import annotations

import functools
import os

from libtbx.utils import Sorry


@functools.lru_cache(maxsize=8)
def unit_cell_from_cif(path) -> tuple:
    """(a, b, c, α, β, γ) in Å and degrees from the first block of a CIF with a cell."""
    import gemmi

    if not os.path.exists(path):
        raise Sorry(f"File not found: {path}")
    try:
        doc = gemmi.cif.read(str(path))
    except (RuntimeError, ValueError) as e:
        raise Sorry(f"{path}: not a readable CIF ({e})")
    names = ("_cell_length_a", "_cell_length_b", "_cell_length_c",
             "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")
    for block in doc:
        values = [block.find_value(n) for n in names]
        if all(v is not None for v in values):
            try:
                return tuple(gemmi.cif.as_number(v) for v in values)
            except (RuntimeError, ValueError):
                continue
    raise Sorry(f"{path}: no block with _cell_length_a..._cell_angle_gamma")


def d_spacing_from_cif(path, hkl) -> float:
    """d(hkl) in Å from the CIF's unit cell."""
    import math

    import gemmi

    cell = unit_cell_from_cif(str(path))
    if any(not math.isfinite(v) or v <= 0 for v in cell):
        raise Sorry(f"{path}: unit cell {cell} is not valid")
    return float(gemmi.UnitCell(*cell).calculate_d(list(map(int, hkl))))
