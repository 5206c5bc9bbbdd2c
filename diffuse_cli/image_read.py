"""Raw pixel values of one image, fast for multi-panel full CBF.

dxtbx's ``FormatCBFMultiTileHierarchy.get_raw_data`` (the simulator's
multi-panel stills, the CSPAD) took 0.6 s for a 6 M-pixel still, 0.5 s for a
2.3 M-pixel CSPAD shot:

* it turns each decoded array into a Python tuple (``struct.unpack``) and
  builds a ``flex.int`` from it: about 0.5 s for 6 M pixels;
* cbflib's CBF_PACKED decoder: 0.15 s for 6 M pixels;
* it builds the format's detector model to check the panel count: 128
  cbflib ``construct_detector`` calls for the 64-panel CSPAD (0.4 s).

:func:`raw_panels` lets cbflib parse the header, decodes CBF_PACKED arrays
with a numba port of cbflib's decoder (:func:`_unpack_py`; about 3 ns per
pixel) once their MIME header, MD5 digest and stream header agree with what
cbflib reports (any other array: cbflib's decoder, cbflib then checking the
digests as dxtbx has it do; it does not check them twice), cuts the panels as dxtbx
does (its ``array_structure_list_section`` rows, or one panel per array) and
checks the panel count and shapes against the imageset's detector model. The
arrays are identical to dxtbx's (tests/test_image_read.py). A layout it does
not recognise is read by dxtbx, with the reason logged once.

Other formats (miniCBF, SMV, NeXus, ...) are read by dxtbx as before.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from diffuse_cli import atomic_io

try:  # optional accelerator (Debian: python3-numba); without it cbflib decodes
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on the installation
    numba = None
    HAVE_NUMBA = False

logger = logging.getLogger("diffuse.image_read")

_logged: set = set()
#: the last file read here: (path and stat key, (panels, integration time)); dxtbx's ImageSet keeps one too
_last: list = [None, None]


class Unrecognised(Exception):
    """A multi-panel CBF layout this reader does not handle (dxtbx reads it)."""


def raw_panels(imageset, index: int) -> tuple:
    """Pixel values of image ``index`` of ``imageset`` per panel, as dxtbx's
    ``imageset.get_raw_data(index)`` (same panel order, shapes (slow, fast)
    and dtypes: int32 or float64), as read-only numpy arrays for the fast path.

    An unreadable file raises ``Sorry`` naming it (atomic_io.image_errors).
    """
    path = _multitile_path(imageset, index)
    if path is not None:
        with atomic_io.image_errors(imageset, index):
            try:
                return _read_cached(path, imageset.get_detector())[0]
            except Unrecognised as e:
                _log_once(f"{path}: read by dxtbx (slower): {e}")
    data = atomic_io.read_raw_data(imageset, index)
    if not isinstance(data, tuple):
        data = (data,)
    return tuple(d.as_numpy_array() for d in data)


def _log_once(message: str) -> None:
    reason = message.split(": ", 1)[-1]
    if reason not in _logged:
        _logged.add(reason)
        logger.warning(message)


def _multitile_path(imageset, index: int) -> str | None:
    """The file of image ``index`` when dxtbx would read it with
    ``FormatCBFMultiTileHierarchy.get_raw_data`` from a file, else None."""
    try:
        from dxtbx.format.Format import Reader
        from dxtbx.format.FormatCBFMultiTileHierarchy import FormatCBFMultiTileHierarchy
    except ImportError:
        return None
    get_format_class = getattr(imageset, "get_format_class", None)
    fmt = get_format_class() if get_format_class is not None else None
    if not (isinstance(fmt, type) and issubclass(fmt, FormatCBFMultiTileHierarchy)):
        return None
    if fmt.get_raw_data is not FormatCBFMultiTileHierarchy.get_raw_data:
        _log_once(f"{fmt.__name__}: read by dxtbx (slower): it has its own get_raw_data")
        return None
    reader = imageset.reader()
    if type(reader) is not Reader or reader.is_single_file_reader() or getattr(reader, "_kwargs", None):
        _log_once(f"{fmt.__name__}: read by dxtbx (slower): not a plain one-image-per-file reader")
        return None
    return imageset.get_path(index)


def _read_cached(path: str, detector=None) -> tuple:
    """(panels, integration time or None) of a file, from the last read if it was this file."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    if _last[0] != key:
        _last[0], _last[1] = None, None
        _last[1] = _read_file(path)
        _last[0] = key
    panels = _last[1][0]
    if detector is None:
        return _last[1]
    if len(panels) != len(detector):
        raise Unrecognised(f"{len(panels)} arrays in the file, {len(detector)} panels in the detector model")
    for a, panel in zip(panels, detector):
        fast, slow = panel.get_image_size()
        if a.shape != (slow, fast):
            raise Unrecognised(f"panel {panel.get_name()!r} is {fast}x{slow} px, its array {a.shape[::-1]}")
    return _last[1]


def still_integration_time(imageset, index: int) -> float | None:
    """``_diffrn_scan_frame.integration_time`` (s) of a multi-panel CBF still,
    what dials_compat.exposure_time finds for it, without building dxtbx's
    format instance (0.25 s for the 64-panel CSPAD: its detector model); None
    for other images or when the header has none (the caller asks dxtbx)."""
    from dxtbx.format.FormatStill import FormatStill

    path = _multitile_path(imageset, index)
    fmt = imageset.get_format_class() if path is not None else None
    if fmt is None or not issubclass(fmt, FormatStill) or fmt._scan is not FormatStill._scan:
        return None  # a format with a scan: its exposure times come first
    if hasattr(imageset, "get_scan") and imageset.get_scan() is not None:
        return None
    with atomic_io.image_errors(imageset, index):
        try:
            value = _read_cached(path)[1]
        except Unrecognised:
            return None
    return float(value) if value is not None else None


def _rows(cbf, category: bytes, columns) -> list[tuple]:
    """The values (bytes) of ``columns`` in every row of ``category``."""
    cbf.find_category(category)
    out = []
    for i in range(cbf.count_rows()):
        row = []
        for c in columns:
            cbf.find_column(c)
            cbf.select_row(i)  # cbflib selects a row within the current column
            row.append(cbf.get_value())
        out.append(tuple(row))
    return out


def read_multitile_cbf(path: str, use_numba: bool | None = None) -> tuple:
    """The panels of a multi-panel full CBF as FormatCBFMultiTileHierarchy cuts
    them (read-only numpy arrays); Unrecognised for any other layout."""
    return _read_file(path, use_numba)[0]


def _read_file(path: str, use_numba: bool | None = None) -> tuple:
    """(panels, ``_diffrn_scan_frame.integration_time`` as text or None) of a multi-panel CBF.

    cbflib parses the header; CBF_PACKED integer arrays are decoded by
    :func:`_unpack_nb` (numba) when their binary section checks out (see
    :func:`_packed_stream`), every other array by cbflib.
    """
    import pycbf

    use_numba = HAVE_NUMBA if use_numba is None else (use_numba and HAVE_NUMBA)
    sections = None
    if use_numba:
        with open(path, "rb") as fh:
            buf = fh.read()
        try:
            sections = _binary_sections(buf)
        except Unrecognised as e:
            _log_once(f"{path}: binary sections decoded by cbflib: {e}")
    # cbflib checks the MD5 digests as dxtbx asks it to (MSG_DIGEST: 1.5 ms per 1.5 M-pixel
    # array), unless every array is ours to decode: _packed_stream checks them then
    for digests in ((False, True) if sections is not None else (True,)):
        cbf = pycbf.cbf_handle_struct()
        try:
            cbf.read_widefile(os.fsencode(path), pycbf.MSG_DIGEST if digests else pycbf.MSG_NODIGEST)
            panels = _cut_panels(cbf, sections, path, digests)
            return panels, _integration_time(cbf)
        except _CbflibDecodes:
            continue  # read again, cbflib checking the digests
        except Exception as e:  # pycbf raises plain Exception("CBFlib Error(s): ...")
            if "CBFlib Error" in str(e):
                raise RuntimeError(str(e)) from None
            raise
    raise AssertionError("unreachable: the last pass checks the digests")


class _CbflibDecodes(Exception):
    """An array cbflib must decode was met in a file read without its digest checks."""


def _integration_time(cbf):
    try:  # as dials_compat.exposure_time reads it
        cbf.find_category(b"diffrn_scan_frame")
        cbf.find_column(b"integration_time")
        return cbf.get_value().decode()
    except Exception as e:  # pycbf: plain Exception
        if "CBF_NOTFOUND" not in str(e):
            raise
        return None


def _cut_panels(cbf, sections, path, digests: bool = True) -> tuple:
    """The panels; ``digests``: cbflib checks the MD5 of what it decodes (else an array
    it must decode raises _CbflibDecodes)."""
    structure = _rows(cbf, b"array_structure", (b"id", b"encoding_type"))
    data_rows = _rows(cbf, b"array_data", (b"array_id",))
    # dxtbx takes the encoding of array_data row i from array_structure row i
    if [r[0] for r in structure] != [r[0] for r in data_rows]:
        raise Unrecognised("array_structure and array_data list the arrays in different orders")
    arrays = {}
    cbf.find_category(b"array_data")
    for i, (name, encoding) in enumerate(structure):
        cbf.find_column(b"data")
        cbf.select_row(i)
        if cbf.get_typeofvalue().find(b"bnry") < 0:
            raise Unrecognised(f"array {name.decode()} is not a binary section")
        if encoding == b"signed 32-bit integer":
            p = cbf.get_integerarrayparameters_wdims_fs()
            shape, dtype = (p[11], p[10], p[9]), np.dtype("=i4")  # struct's "i": native int32
            if p[2] != 4 or p[3] != 1:
                raise Unrecognised(f"array {name.decode()}: element size {p[2]}, signed {p[3]}")
            raw = _decode_packed(sections, p, path) if sections is not None else None
            if raw is None:
                if not digests:
                    raise _CbflibDecodes
                raw = cbf.get_integerarray_as_string()
        elif encoding == b"signed 64-bit real IEEE":
            if not digests:
                raise _CbflibDecodes
            raw = cbf.get_realarray_as_string()
            p = cbf.get_realarrayparameters_wdims_fs()
            shape, dtype = (p[7], p[6], p[5]), np.dtype("=f8")
        else:
            raise Unrecognised(f"array {name.decode()}: encoding {encoding.decode()}")
        a = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=dtype)
        if a.size != shape[0] * shape[1] * shape[2]:
            raise Unrecognised(f"array {name.decode()}: {a.size} elements for dimensions {shape[::-1]}")
        arrays[name] = a.reshape(shape)
    try:
        cbf.find_category(b"array_structure_list_section")
        has_sections = True
    except Exception as e:  # pycbf: plain Exception
        if "CBF_NOTFOUND" not in str(e):
            raise
        has_sections = False
    panels = []
    if has_sections:
        cuts: dict = {}  # section id -> its array and (fast, mid, slow) slices, in dxtbx's order
        for section, array_id, axis, start, end in _rows(
                cbf, b"array_structure_list_section", (b"id", b"array_id", b"index", b"start", b"end")):
            s = cuts.setdefault(section, {"array_id": array_id})
            if s["array_id"] != array_id:
                raise Unrecognised(f"section {section.decode()} spans two arrays")
            s[int(axis) - 1] = slice(int(start) - 1, int(end))
        for section, s in cuts.items():
            if s["array_id"] not in arrays or any(k not in s for k in (0, 1, 2)):
                raise Unrecognised(f"section {section.decode()}: not a (fast, slow, plane) section of an array")
            a = arrays[s["array_id"]]
            if any(not 0 <= s[k].start < s[k].stop <= a.shape[2 - k] for k in (0, 1, 2)):
                raise Unrecognised(f"section {section.decode()} reaches outside its array")
            cut = a[s[2], s[1], s[0]]
            if cut.shape[0] != 1 or 0 in cut.shape:
                raise Unrecognised(f"section {section.decode()} is {cut.shape[0]} planes, not one")
            panels.append(np.ascontiguousarray(cut[0]))
    else:
        for name, a in arrays.items():
            if a.shape[0] != 1:
                raise Unrecognised(f"array {name.decode()} has {a.shape[0]} planes and no sections")
            panels.append(a[0])
    for a in panels:
        a.flags.writeable = False
    return tuple(panels)


# ---------------------------------------------------------------- CBF_PACKED decoding

_BOUNDARY = b"--CIF-BINARY-FORMAT-SECTION--"
_MARKER = b"\x0c\x1a\x04\xd5"  # start of the binary data (imgCIF)
CBF_PACKED, CBF_PACKED_V2 = 0x60, 0x90  # cbflib's compression codes (cbf.h)
CBF_UNCORRELATED_SECTIONS, CBF_FLAT_IMAGE = 0x100, 0x200


def _binary_sections(buf: bytes) -> dict:
    """Binary id -> (MIME header fields, lower-case keys; data bytes) of every
    binary section of a CBF file's contents."""
    out = {}
    pos = 0
    while True:
        i = buf.find(_BOUNDARY, pos)
        if i < 0:
            return out
        i += len(_BOUNDARY)
        if buf[i:i + 2] == b"--":  # the closing boundary of a section
            pos = i + 2
            continue
        j = buf.find(_MARKER, i)
        if j < 0:
            raise Unrecognised("a MIME header without binary data")
        fields = {}
        for line in buf[i:j].decode("latin-1").replace("\r\n", "\n").replace("\n ", " ").split("\n"):
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        try:
            bid, size = int(fields["x-binary-id"]), int(fields["x-binary-size"])
        except (KeyError, ValueError):
            raise Unrecognised("a binary section without X-Binary-ID or X-Binary-Size") from None
        start = j + len(_MARKER)
        if bid in out or start + size > len(buf):
            raise Unrecognised(f"binary section {bid} repeated or truncated")
        out[bid] = (fields, buf[start:start + size])
        pos = start + size


def _packed_stream(sections: dict, p) -> tuple:
    """(data bytes, compression code) of the array with cbflib parameters ``p``
    when it is a CBF_PACKED(_V2) signed 32-bit little-endian section whose MIME
    header, MD5 and stream header agree with cbflib; else a reason (str)."""
    import base64
    import hashlib

    compression, bid, n = p[0], p[1], p[5]
    if compression & 0xFF not in (CBF_PACKED, CBF_PACKED_V2):
        return f"compression 0x{compression:x}"
    if compression & ~0xFF & ~(CBF_UNCORRELATED_SECTIONS | CBF_FLAT_IMAGE):
        return f"compression flags 0x{compression:x}"
    if bid not in sections:
        return f"no binary section {bid}"
    fields, data = sections[bid]
    want = {"content-transfer-encoding": "BINARY", "x-binary-element-type": '"signed 32-bit integer"',
            "x-binary-element-byte-order": "LITTLE_ENDIAN", "x-binary-number-of-elements": str(n)}
    for key, value in want.items():
        if fields.get(key) != value:
            return f"{key} {fields.get(key)!r}"
    conversions = fields.get("content-type", "")
    expected = "x-cbf_packed_v2" if compression & 0xFF == CBF_PACKED_V2 else "x-cbf_packed"
    if f'conversions="{expected}"' not in conversions.lower().replace(" ", ""):
        return f"Content-Type {conversions!r}"
    try:
        dims = [int(fields.get(k, 0)) for k in ("x-binary-size-fastest-dimension", "x-binary-size-second-dimension",
                                                   "x-binary-size-third-dimension")]
    except ValueError:
        return "dimensions not integers"
    if dims != [p[9], p[10], p[11]] or dims[0] < 2 or dims[0] * dims[1] * max(dims[2], 1) != n:
        return f"dimensions {dims}"
    md5 = fields.get("content-md5")
    if md5 is not None and base64.b64encode(hashlib.md5(data).digest()).decode() != md5:
        return "MD5 mismatch"
    if len(data) < 32 or int.from_bytes(data[:8], "little") != n:
        return "stream header"
    return data, compression


def _decode_packed(sections: dict, p, path: str):
    """A CBF_PACKED array (native int32, cbflib's values), or None
    (cbflib decodes it) with the reason logged once."""
    checked = _packed_stream(sections, p)
    if isinstance(checked, str):
        _log_once(f"{path}: array decoded by cbflib: {checked}")
        return None
    data, compression = checked
    n, fast, mid = p[5], p[9], p[10]
    out = np.empty(n, dtype=np.int32)
    flat = bool(compression & CBF_FLAT_IMAGE)  # cbflib averages unless flat (the dimensions are given)
    status = _unpack_nb(np.frombuffer(data, dtype=np.uint8), 32, n, fast, mid,
                        compression & 0xFF == CBF_PACKED_V2, not flat,
                        not compression & CBF_UNCORRELATED_SECTIONS, out)
    if status < 0:  # ran out of data: cbflib reports it (or reads what we cannot)
        _log_once(f"{path}: array decoded by cbflib: packed stream ended early")
        return None
    return out


_V1_BITS = np.array([0, 4, 5, 6, 7, 8, 16, 65], dtype=np.int64)
_V2_BITS = np.array([0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 65], dtype=np.int64)
_AVERAGE_SHIFT = np.array([1, 2, 0, 3], dtype=np.int64)  # cbflib's shift for k = n_neighbours // 2 = 1..4


def _wrap32(x):
    """x as a wrapped signed 32-bit integer (cbflib's int arithmetic; wrapping once
    after several additions is the same as after each)."""
    return ((x + 2147483648) & 4294967295) - 2147483648


def _wrap32_nb(x):
    return np.int64(np.int32(x))  # numba: a truncating cast, the same value in one instruction


def _refill(stream, pos, acc, nacc, need):
    """(pos, acc, nacc) with at least ``need`` (<= 32) bits in the buffer, or pos -1 at the end."""
    if nacc >= need:
        return pos, acc, nacc
    if pos + 4 <= stream.size:  # a whole 32-bit word: acc stays below 2^63
        word = (np.int64(stream[pos]) | (np.int64(stream[pos + 1]) << 8) | (np.int64(stream[pos + 2]) << 16)
                | (np.int64(stream[pos + 3]) << 24))
        return pos + 4, acc | (word << nacc), nacc + 32
    while nacc < need:
        if pos >= stream.size:
            return -1, acc, nacc
        acc |= np.int64(stream[pos]) << nacc
        pos += 1
        nacc += 8
    return pos, acc, nacc


def _unpack_py(stream, start, nelem, dimfast, dimmid, v2, average, correlated, out):
    """CBFlib's cbf_decompress_packed for signed 32-bit elements (J. P. Abrahams'
    CCP4 packing): chunks of 2^k offsets of a fixed bit width (a 6-bit code,
    7-bit for V2), bits read least significant first; each offset is added to
    the previous value, or with ``average`` (array dimensions given, not
    CBF_FLAT_IMAGE) to cbflib's rounded mean of the already decoded neighbours
    (cbf_update_jpa_pointers: the row above; with ``correlated`` also the
    previous section).

    Writes ``out[:nelem]``; returns the bytes consumed, or -1 if the stream
    ends early.
    """
    pos = start
    acc = np.int64(0)  # bit buffer, least significant bit next
    nacc = 0
    plane = dimfast * dimmid
    code_bits = 7 if v2 else 6
    base = 0  # the predicted value of the next element
    count = 0
    fi = 0  # fast, mid, slow indices of the next element
    mi = 0
    si = 0
    while count < nelem:
        pos, acc, nacc = _refill(stream, pos, acc, nacc, code_bits)
        if pos < 0:
            return -1
        code = acc & ((1 << code_bits) - 1)
        acc >>= code_bits
        nacc -= code_bits
        pixels = 1 << (code & 7)
        bits = _V2_BITS[(code >> 3) & 15] if v2 else _V1_BITS[(code >> 3) & 7]
        if average and bits == 65:
            bits = 32
        if pixels > nelem - count:
            pixels = nelem - count
        width = 32 if bits == 65 else bits
        mask = (np.int64(1) << width) - 1
        sign = (np.int64(1) << width) >> 1  # the sign bit of an offset (0 when width is 0)
        if average and mi > 0 and (si == 0 or not correlated) and fi + pixels <= dimfast - 2 \
                and count + pixels < nelem and bits != 65:
            # the common chunk: every next element is inside a row below the first, so its
            # prediction is the rounded mean of left, above right, above, above left (the
            # general path below, without its bookkeeping); bits = 0 reads no bits
            for _ in range(pixels):
                pos, acc, nacc = _refill(stream, pos, acc, nacc, width)
                if pos < 0:
                    return -1
                offset = ((acc & mask) ^ sign) - sign
                acc >>= width
                nacc -= width
                value = _wrap32(base + offset)
                out[count] = value
                count += 1
                above = np.int64(out[count - dimfast + 1]) + out[count - dimfast] + out[count - dimfast - 1]
                base = _wrap32(above + 2 + value) >> 2
            fi += pixels
            continue
        for _ in range(pixels):
            offset = np.int64(0)
            if bits > 0:
                pos, acc, nacc = _refill(stream, pos, acc, nacc, width)
                if pos < 0:
                    return -1
                # sign-extended without a branch (the sign is as likely either way)
                offset = ((acc & mask) ^ sign) - sign
                acc >>= width
                nacc -= width
                if bits == 65:  # 65-bit offsets: the 33 high bits do not reach a 32-bit element
                    for w in (32, 1):
                        pos, acc, nacc = _refill(stream, pos, acc, nacc, w)
                        if pos < 0:
                            return -1
                        acc >>= w
                        nacc -= w
            value = _wrap32(base + offset)
            out[count] = value
            count += 1
            if not average:
                base = value
                continue
            fi += 1
            if fi == dimfast:
                fi = 0
                mi += 1
                if mi == dimmid:
                    mi = 0
                    si += 1
            if count >= nelem:
                break
            p = count
            if mi > 0 and 0 < fi < dimfast - 1:  # inside a row below the first: the common case
                # the left neighbour out[p - 1] is ``value``: added last, from a register, so that
                # the chain from one pixel to the next does not wait on a store and its reload
                above = np.int64(out[p - dimfast + 1]) + out[p - dimfast] + out[p - dimfast - 1]
                if si > 0 and correlated:
                    q = p - plane
                    above += np.int64(out[q]) + out[q - dimfast + 1] + out[q - dimfast] + out[q - dimfast - 1]
                    base = _wrap32(above + 4 + value) >> 3
                else:
                    base = _wrap32(above + 2 + value) >> 2
                continue
            # neighbours of the next element p as cbf_update_jpa_pointers picks them:
            # left, above right, above, above left; t4: p in the previous section
            t0 = p - 1
            t1 = -1
            t2 = -1
            t3 = -1
            t4 = -1
            below = False  # also t1..t3 in the previous section
            if mi > 0:
                t1 = p - dimfast + 1
                t2 = p - dimfast
                if fi > 0:
                    t3 = p - dimfast - 1
                    if fi == dimfast - 1:
                        t1 = -1
                        t3 = -1
                else:
                    t0 = -1
                if si > 0 and correlated:
                    below = True
                    if t0 >= 0:
                        t4 = p - plane
            elif fi == 0:  # first element of a section (cbflib: whatever the flags)
                t4 = p - plane
                t0 = -1
            total = np.int64(0)
            k = 0
            if t0 >= 0:
                total += out[t0]
                k += 1
            if t4 >= 0:
                total += out[t4]
                k += 1
            for t in (t1, t2, t3):
                if t >= 0:
                    total += out[t]
                    k += 1
                    if below:
                        total += out[t - plane]
                        k += 1
            half = k >> 1
            if half > 0:
                base = _wrap32(total + half) >> _AVERAGE_SHIFT[half - 1]
            else:
                base = _wrap32(total)
    return pos - start


if HAVE_NUMBA:
    _wrap32 = numba.njit(inline="always", cache=True)(_wrap32_nb)  # noqa: F811
    _refill = numba.njit(inline="always", cache=True)(_refill)
    _unpack_nb = numba.njit(nogil=True, cache=True)(_unpack_py)
else:  # pragma: no cover - without numba cbflib decodes (read_multitile_cbf)
    _unpack_nb = None
