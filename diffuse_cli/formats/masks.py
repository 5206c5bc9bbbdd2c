"""Mask files: DIALS mask pickles and diffuse's packed copies (True = usable).

* a DIALS mask file (``.mask``): a pickled tuple of ``flex.bool``, one
  (n_slow, n_fast) array per panel, as dials.generate_mask writes it;
* a packed copy (schema ``diffuse.mask_bits/1``, ``.npz``): ``bits``
  (``np.packbits`` of the flat mask in panel order), ``n_pixels``, and any
  provenance fields of the writer; about 50× faster to load.

In between, a mask is a flat bool array over all pixels in panel order.
"""

from __future__ import annotations

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry
from scitbx.array_family import flex


def to_dials(flat: np.ndarray, geometry) -> tuple:
    """Flat bool (Npix,) -> tuple of flex.bool (n_slow, n_fast) per panel."""
    return tuple(flex.bool(np.ascontiguousarray(a)) for a in geometry.split(np.asarray(flat, dtype=bool)))


def from_dials(masks) -> np.ndarray:
    """Tuple of flex.bool per panel -> flat bool (Npix,)."""
    if not isinstance(masks, (tuple, list)):
        masks = (masks,)
    return np.concatenate([m.as_numpy_array().ravel() for m in masks]).astype(bool)


def read_mask(path) -> np.ndarray:
    """Read a DIALS mask file (pickled tuple of flex.bool) as a flat bool array."""
    return from_dials(read_mask_panels(path))


def read_mask_panels(path) -> tuple:
    """Read a DIALS mask file as its tuple of flex.bool, one per panel (checked)."""
    import pickle

    try:
        with open(path, "rb") as fh:
            masks = pickle.load(fh)
    except FileNotFoundError:
        raise Sorry(f"File not found: {path}")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError) as e:
        raise Sorry(f"{path}: not a DIALS mask file (unreadable pickle: {type(e).__name__})")
    if not isinstance(masks, (tuple, list)):
        masks = (masks,)
    if not masks or not all(isinstance(m, flex.bool) for m in masks):
        raise Sorry(f"{path}: not a DIALS mask file (expected a pickled tuple of flex.bool)")
    return tuple(masks)


MASK_BITS_SCHEMA = "diffuse.mask_bits/1"


def write_mask_bits(path, flat: np.ndarray, **extra) -> None:
    """Packed copy of a flat mask (``np.packbits``, True = usable), fast to load.

    extra: further arrays (diffuse.bragg_mask stores its provenance fields).
    """
    from diffuse_cli import program

    program.write_npz(path, schema=np.array(MASK_BITS_SCHEMA), bits=np.packbits(flat), n_pixels=np.int64(flat.size), **extra)


def read_mask_any(path) -> np.ndarray:
    """Flat bool mask from a packed ``.npz`` (write_mask_bits) or a DIALS mask file."""
    path = str(path)
    if path.endswith(".npz"):
        from diffuse_cli.formats.common import read_npz

        z = read_npz(path, MASK_BITS_SCHEMA, fields=("bits", "n_pixels"), required=("bits", "n_pixels"))
        return np.unpackbits(z["bits"], count=int(z["n_pixels"])).astype(bool)
    return read_mask(path)


def read_mask_npy(path) -> np.ndarray:
    """A NumPy ``.npy`` mask array as stored (no pickles); the caller applies its
    convention (diffuse_cli.saxs_inputs.read_saxs_mask: a bool array is True = usable)."""
    try:
        return np.load(str(path), allow_pickle=False)
    except ValueError as e:
        raise Sorry(f"{path}: not a NumPy array file ({e})")
