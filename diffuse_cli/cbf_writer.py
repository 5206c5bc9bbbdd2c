"""Write simulated images as CBF files that dxtbx / dials.import read back.

* Single panel: a miniCBF via ``FormatCBFMini.as_file`` (dxtbx); a still has a
  zero-width scan, a rotation frame its own one-image scan (start angle and
  oscillation in the header; the axis is not carried, dxtbx reads 1,0,0). Read back as
  ``FormatCBFMini``: distance, beam centre, pixel size, wavelength, exposure
  time, trusted range (−1, Count_cutoff) and the Si/CdTe sensor thickness (with
  dxtbx's parallax-corrected px→mm strategy) round-trip. The beam polarisation
  fraction does not: dxtbx reads 0.999 whatever the header says.
* Several panels: a full imgCIF via ``dxtbx.format.cbf_writer.FullCBFWriter``,
  which wants an imageset; :class:`_ModelImageSet` supplies the models and the
  pixels, and the integer pixel arrays are added by :func:`_add_int_arrays`
  (dxtbx 3.11's ``add_data_to_cbf`` fails on int32 data). We also fill
  ``_diffrn_scan_frame.integration_time`` (the writer puts 0.0) and
  ``_diffrn_radiation.polarizn_source_ratio``. Read back as
  ``FormatCBFMultiTileHierarchyStill``: panel origins/axes, pixel sizes,
  trusted ranges, wavelength and polarisation fraction round-trip; the format
  makes no scan (so no exposure time in the experiment: use
  :func:`diffuse_cli.dials_compat.exposure_time`) and sets no sensor material/thickness.
"""

from __future__ import annotations

import os

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli import program


def _flex_int(a: np.ndarray):
    from scitbx.array_family import flex

    return flex.int(np.ascontiguousarray(a, dtype=np.int32))


def write_minicbf(path, detector, beam, exposure_time: float, panel_data, goniometer=None, scan=None) -> None:
    """Single-panel miniCBF, written atomically. ``panel_data``: one int array.

    Without ``scan`` a still (zero-width scan). A rotation frame passes its
    one-image scan (start angle, oscillation); the header carries those, not
    the goniometer axis (dxtbx reads 1,0,0 for any miniCBF).
    """
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import ScanFactory

    assert len(detector) == 1
    (data,) = panel_data
    if scan is None:
        # zero-width scan: dxtbx/DIALS treat the image as a still but keep the exposure
        scan = ScanFactory.make_scan((1, 1), exposure_time, (0.0, 0.0), {1: 0.0}, deg=True)
    with program.atomic_path(path) as tmp:
        FormatCBFMini.as_file(detector, beam, goniometer, scan, _flex_int(data), tmp)


class _Reader:
    class format_class:  # noqa: N801  (FullCBFWriter reads format_class.__name__)
        pass

    format_class.__name__ = "diffuse_simulate"


class _ModelImageSet:
    """The parts of an imageset that FullCBFWriter uses, from models we own."""

    def __init__(self, detector, beam, path, data):
        self._detector, self._beam, self._path, self._data = detector, beam, path, data

    def get_detector(self, index=None):
        return self._detector

    def get_beam(self, index=None):
        return self._beam

    def paths(self):
        return [self._path]

    def reader(self):
        return _Reader()

    def __getitem__(self, index):
        return self._data


def _set_value(cbf, category: bytes, column: bytes, value: str, row: int = 0) -> None:
    cbf.find_category(category)
    try:
        cbf.find_column(column)
    except Exception as e:  # cbflib raises a bare Exception with CBF_NOTFOUND
        if "CBF_NOTFOUND" not in str(e):
            raise
        cbf.new_column(column)
    cbf.select_row(row)
    cbf.set_value(value.encode())


def _add_int_arrays(cbf, data) -> None:
    """FullCBFWriter.add_data_to_cbf for int32 panels.

    dxtbx 3.11's version passes the byte order as ``str`` for integer arrays,
    which pycbf rejects (TypeError: argument 9 of type 'char *'); this is the
    same table layout with ``bytes``.
    """
    import pycbf

    array_names = []
    cbf.find_category(b"diffrn_data_frame")
    cbf.find_column(b"array_id")
    for row in range(cbf.count_rows()):
        cbf.select_row(row)
        array_names.append(cbf.get_value())
    assert len(array_names) == len(data)
    cbf.add_category("array_structure", ["id", "encoding_type", "compression_type", "byte_order"])
    for name in array_names:
        cbf.add_row([name, "signed 32-bit integer", "packed", "little_endian"])
    cbf.add_category("array_data", ["array_id", "binary_id", "data"])
    for i, (panel_data, name) in enumerate(zip(data, array_names)):
        slow, fast = panel_data.focus()
        cbf.add_row([name, str(i + 1)])
        cbf.set_integerarray_wdims_fs(
            pycbf.CBF_PACKED, i + 1, panel_data.copy_to_byte_str(), 4, 1, len(panel_data),
            b"little_endian", fast, slow, 1, 0,
        )


def write_full_cbf(path, detector, beam, exposure_time: float, panel_data) -> None:
    """Multi-panel full CBF (imgCIF), written atomically."""
    import pycbf
    from dxtbx.format.cbf_writer import FullCBFWriter

    data = tuple(_flex_int(a) for a in panel_data)
    path = os.fspath(path)
    writer = FullCBFWriter(imageset=_ModelImageSet(detector, beam, path, data))
    cbf = writer.get_cbf_handle(header_only=True)
    _set_value(cbf, b"diffrn_scan_frame", b"integration_time", "%.7f" % exposure_time)
    _set_value(cbf, b"diffrn_radiation", b"polarizn_source_ratio", "%.6f" % beam.get_polarization_fraction())
    _set_value(cbf, b"diffrn_radiation", b"polarizn_source_norm", "0.0")
    _add_int_arrays(cbf, data)
    with program.atomic_path(path) as tmp:
        cbf.write_widefile(tmp.encode(), pycbf.CBF, pycbf.MIME_HEADERS | pycbf.MSG_DIGEST | pycbf.PAD_4K, 0)


def write_image(path, detector, beam, exposure_time: float, panel_data, goniometer=None, scan=None) -> None:
    if len(detector) == 1:
        write_minicbf(path, detector, beam, exposure_time, panel_data, goniometer=goniometer, scan=scan)
    elif scan is not None:
        raise ValueError("rotation frames are written for single-panel detectors only")
    else:
        write_full_cbf(path, detector, beam, exposure_time, panel_data)
