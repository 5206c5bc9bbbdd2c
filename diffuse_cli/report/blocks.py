"""The blocks the report's sections are made of (:mod:`diffuse_cli.report.sections`):
:class:`Section`, tables, plotly figures as plain dicts, notes, text and embedded PNGs,
the section titles, and the small readers and number formats the sections share.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import json
import math
import os

import numpy as np

#: steps -> section titles
TITLES = {
    "overview": "Overview",
    "inputs": "Inputs and parameters",
    "simulate": "simulate",
    "stills_process": "stills_process: spot finding, indexing, integration",
    "bragg_mask": "bragg_mask: pixel masks",
    "extract_correct": "extract / correct: usable pixels and corrections",
    "merge": "merge: map, scaling, statistics, absolute scale",
    "azimuthal_fit": "azimuthal_fit: profiles and fits",
    "analysis": "analysis programs",
}
INTENSITY_UNITS = "photons/µsr/s"


@dataclasses.dataclass
class Section:
    key: str
    title: str
    status: str  # "run" or "not run"
    folders: list
    blocks: list

    @property
    def run(self) -> bool:
        return self.status == "run"


def _clean(x):
    """JSON-safe values: NaN/inf -> None, numpy -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def plot(title: str, traces: list, x_title: str, y_title: str, y2_title: str | None = None, **layout) -> dict:
    """A plotly figure block; ``x_title``/``y_title`` must name the unit."""
    lay = {
        "title": {"text": title},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}},
        "margin": {"l": 70, "r": 30 if y2_title is None else 70, "t": 50, "b": 60},
        "height": 380,
        "legend": {"orientation": "h", "y": -0.25},
    }
    if y2_title is not None:
        lay["yaxis2"] = {"title": {"text": y2_title}, "overlaying": "y", "side": "right"}
    lay.update(layout)
    return {"kind": "plot", "title": title, "figure": _clean({"data": traces, "layout": lay})}


def line(x, y, name: str, mode: str = "lines+markers", **kw) -> dict:
    return {"type": "scatter", "x": list(np.asarray(x).tolist()), "y": list(np.asarray(y, dtype=float).tolist()),
            "name": name, "mode": mode, **kw}


def table(headers, rows, title: str | None = None) -> dict:
    return {"kind": "table", "title": title, "headers": list(headers), "rows": [[_fmt(v) for v in r] for r in rows]}


def note(text: str) -> dict:
    return {"kind": "note", "text": text}


def pre(text: str, title: str | None = None, collapsed: bool = False) -> dict:
    return {"kind": "pre", "title": title, "text": text, "collapsed": collapsed}


def image(path: str, title: str | None = None, max_kb: float = 2000) -> dict:
    """A PNG embedded as base64 (a note instead when larger than ``max_kb``)."""
    size = os.path.getsize(path)
    if max_kb < 0:
        return note(f"{path}: picture not embedded (embed_images=False)")
    if size > max_kb * 1024:
        return note(f"{path}: {size / 1024:.0f} kB picture not embedded (larger than max_image_kb={max_kb:g})")
    with open(path, "rb") as fh:
        uri = "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")
    return {"kind": "image", "title": title or os.path.basename(path), "uri": uri, "path": path}


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "–" if math.isnan(v) else ("∞" if v > 0 else "−∞")
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4g}"
    if v is None:
        return "–"
    return str(v)


def _json(path):
    with open(path) as fh:
        return json.load(fh)


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _stats(values) -> tuple:
    """(min, median, max) of the finite values, NaNs when none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"),) * 3
    return float(v.min()), float(np.median(v)), float(v.max())


def _pictures(folder: str, shown: set, max_kb: float, title: str = "More pictures in this folder") -> list:
    """The PNGs of ``folder`` (and its subfolders) not shown yet, embedded."""
    paths = sorted(set(glob.glob(os.path.join(folder, "*.png")) + glob.glob(os.path.join(folder, "*", "*.png"))))
    rest = [p for p in paths if os.path.abspath(p) not in shown]
    if not rest:
        return []
    blocks = [{"kind": "heading", "text": title}]
    for p in rest:
        shown.add(os.path.abspath(p))
        blocks.append(image(p, os.path.relpath(p, folder), max_kb))
    return blocks


def _not_run(key: str, why: str = "") -> Section:
    return Section(key, TITLES[key], "not run", [], [note("not run" + (f": {why}" if why else ""))])
