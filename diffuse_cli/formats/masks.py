"""Mask files: DIALS mask pickles and diffuse's packed copies (True = usable).

* a DIALS mask file (``.mask``): a pickled tuple of ``flex.bool``, one
  (n_slow, n_fast) array per panel, as dials.generate_mask writes it
  (:func:`write_dials_mask` writes the same bytes as pickling flex, faster);
* a packed copy (schema ``diffuse.mask_bits/1``, ``.npz``): ``bits``
  (``np.packbits`` of the flat mask in panel order), ``n_pixels``, and any
  provenance fields of the writer; about 50× faster to load.

In between, a mask is a flat bool array over all pixels in panel order.
"""

from __future__ import annotations

import pickle

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


class _PanelMask:
    """One panel's bool mask (n_slow, n_fast), pickled as the flex.bool it stands for."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask


def _flex_bool_state(mask: np.ndarray) -> bytes:
    """flex.bool's pickle state bytes of ``mask``: the element count (a length byte, then
    little-endian), then b"1" or b"0" per element."""
    n = int(mask.size)
    nb = max(1, (n.bit_length() + 7) // 8)
    return bytes([nb + 1]) + n.to_bytes(nb, "little") + np.where(mask.ravel(), np.uint8(49), np.uint8(48)).tobytes()


class _MaskPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj) is _PanelMask:
            return (flex.bool, (), (flex.grid(*obj.mask.shape), _flex_bool_state(obj.mask)))
        return NotImplemented


def _mask_pickle(panels) -> bytes:
    import io

    buf = io.BytesIO()
    _MaskPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(tuple(_PanelMask(np.asarray(a, dtype=bool)) for a in panels))
    return buf.getvalue()


_FAST_MASK_PICKLE: list = []


def write_dials_mask(path, flat: np.ndarray, geometry) -> None:
    """``atomic_io.write_pickle(path, to_dials(flat, geometry))``, the same bytes, ~15× faster.

    flex.bool's own pickling is ~50 ms per 10⁶ pixels; here each panel's state
    is built with numpy (:func:`_flex_bool_state`), checked once per process
    against flex's pickle of a small mask (else flex pickles it).
    """
    from diffuse_cli import atomic_io

    if not _FAST_MASK_PICKLE:
        probe = [np.random.default_rng(0).random((3, 300)) < 0.5, np.zeros((1, 7), dtype=bool)]
        reference = pickle.dumps(tuple(flex.bool(np.ascontiguousarray(a)) for a in probe),
                                 protocol=pickle.HIGHEST_PROTOCOL)
        _FAST_MASK_PICKLE.append(_mask_pickle(probe) == reference)
    if not _FAST_MASK_PICKLE[0]:
        atomic_io.write_pickle(path, to_dials(flat, geometry))
        return
    data = _mask_pickle(geometry.split(np.asarray(flat, dtype=bool)))
    with atomic_io.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


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
        return np.unpackbits(z["bits"], count=int(z["n_pixels"])).view(bool)  # 0/1 bytes: no copy
    return read_mask(path)


def read_mask_npy(path) -> np.ndarray:
    """A NumPy ``.npy`` mask array as stored (no pickles); the caller applies its
    convention (diffuse_cli.saxs_inputs.read_saxs_mask: a bool array is True = usable)."""
    try:
        return np.load(str(path), allow_pickle=False)
    except ValueError as e:
        raise Sorry(f"{path}: not a NumPy array file ({e})")
