"""The series variable of ``diffuse.azimuthal_fit``: one number per image.

From a CSV (``series.csv``: columns image,<value>), a file-name pattern
(``series.filename_pattern``), an image-header line (``series.header_key``;
``timestamp`` counts seconds from the first image) or, by default, the
image's position in the run. Also :func:`image_stem`, the name an image's
output files carry.
"""

from __future__ import annotations

import csv
import datetime
import os
import re

from libtbx.utils import Sorry


def image_stem(iset, index) -> str:
    path = iset.get_path(index)
    base = os.path.basename(path)
    for ext in (".bz2", ".gz"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    stem = os.path.splitext(base)[0]
    if len(iset) > 1 and iset.get_path(0) == iset.get_path(len(iset) - 1):
        stem = f"{stem}_{index:05d}"  # several images in one file
    return stem


def _read_text_header(path, limit=65536) -> str:
    opener = open
    if path.endswith(".bz2"):
        import bz2

        opener = bz2.open
    elif path.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rb") as fh:
        head = fh.read(limit)
    for marker in (b"--CIF-BINARY-FORMAT-SECTION--", b"\x0c\x1a\x04\xd5", b"\x89HDF"):
        i = head.find(marker)
        if i == 0 and marker == b"\x89HDF":
            raise Sorry(f"{path}: series.header_key needs a text header (this is HDF5)")
        if i > 0:
            head = head[:i]
    return head.decode("latin-1")


_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_ISO = r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?)"


def header_value(path, key, iset=None, index=0) -> float:
    """A number from an image header line ``key value`` / ``key=value``."""
    if key == "exposure_time" and iset is not None and iset.get_scan(index) is not None:
        return float(iset.get_scan(index).get_exposure_times()[0])
    if key == "wavelength" and iset is not None:
        return float(iset.get_beam(index).get_wavelength())
    if key == "distance" and iset is not None:
        return float(iset.get_detector(index)[0].get_distance())
    text = _read_text_header(path)
    if key == "timestamp":
        m = re.search(_ISO, text)
        if not m:
            raise Sorry(f"{path}: no ISO date/time in the header")
        stamp = datetime.datetime.fromisoformat(m.group(1).replace(" ", "T"))
        return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
    pattern = r"(?im)^[#\s]*" + re.escape(key) + r"\s*[=:]?\s*\(?\s*" + _NUMBER
    m = re.search(pattern, text)
    if not m:
        raise Sorry(f"{path}: no header line '{key} <number>'")
    return float(m.group(1))


def load_series_csv(path) -> dict:
    """{image name: value} from a CSV with columns image,<value>."""
    table = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise Sorry(f"{path}: expected a header line 'image,<value>'")
        for row in reader:
            if len(row) < 2 or not row[0].strip():
                continue
            try:
                value = float(row[1])
            except ValueError:
                raise Sorry(f"{path}: not a number for {row[0]}: {row[1]!r}")
            name = os.path.basename(row[0].strip())
            table[name] = value
            table[os.path.splitext(name)[0]] = value
    return table


class SeriesValues:
    """The series value of an image: series.csv, else filename_pattern, else
    header_key, else the image's position in the run."""

    def __init__(self, params):
        s = params.series
        self.name = s.name
        self.csv = load_series_csv(s.csv) if s.csv else None
        self.pattern = re.compile(s.filename_pattern) if s.filename_pattern else None
        if self.pattern is not None and self.pattern.groups < 1:
            raise Sorry("series.filename_pattern needs one (group) holding the value")
        self.header_key = s.header_key
        self._t0 = None

    def __call__(self, iset, index, ordinal) -> float:
        path = iset.get_path(index)
        base = os.path.basename(path)
        if self.csv is not None:
            stem = image_stem(iset, index)
            for key in (base, stem, os.path.splitext(base)[0]):
                if key in self.csv:
                    return self.csv[key]
            raise Sorry(f"series.csv has no row for {base}")
        if self.pattern is not None:
            m = self.pattern.search(base)
            if not m:
                raise Sorry(f"series.filename_pattern does not match {base}")
            try:
                return float(m.group(1))
            except ValueError:
                raise Sorry(f"series.filename_pattern matched {m.group(1)!r} in {base}: not a number")
        if self.header_key:
            if hasattr(iset, "header_value"):  # EDF header / HDF5 attribute or dataset (saxs_inputs)
                value = iset.header_value(index, self.header_key)
            else:
                value = header_value(path, self.header_key, iset, index)
            if self.header_key == "timestamp":
                if self._t0 is None:
                    self._t0 = value
                value -= self._t0
            return value
        return float(ordinal)


SUMMARY_QUANTITIES = ("centre", "fwhm", "S", "S_total", "S_data")


def series_summary_rows(rows, series_name) -> list[dict]:
    """One row per successful fit, sorted by profile, model and series value:
    the series variable, the peak position (``centre``), width (``fwhm``)
    and the order parameters, each with its error (``series_summary.csv``)."""
    out = []
    for r in rows:
        if not r.get("success"):
            continue
        row = {series_name: r[series_name], "image": r["image"], "image_index": r["image_index"],
               "profile": r["profile"], "q_inv_angstrom": r["q_inv_angstrom"], "model": r["model"]}
        for q in SUMMARY_QUANTITIES:
            row[q] = r.get(q, float("nan"))
            row[q + "_error"] = r.get(q + "_error", float("nan"))
        row["significant"] = r.get("significant", "")
        out.append(row)
    out.sort(key=lambda r: (r["profile"], r["model"], float(r[series_name])))
    return out
