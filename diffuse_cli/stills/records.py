"""Summary rows and resume bookkeeping of ``diffuse.stills_process``.

A still is done when its done-record (``done/<tag>.json``,
:mod:`diffuse_cli.formats.stills_process`, written atomically after its outputs) carries the key of its input file (path, size, mtime,
frame, route, shared detector) and of the parameters that can change its
result, and its outputs still exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from diffuse_cli.stills.inputs import Item

#: status values of a summary row
INDEXED = "indexed"
NOT_A_HIT = "not a hit"
FAILED = "failed"
FAILED_VALIDATION = "failed validation"

#: bins of the per-still partiality histograms stored in the done-records
PARTIALITY_BINS = np.linspace(0.0, 1.0, 51)

DONE_RECORD_VERSION = 1

#: parameters that do not change a still's result (excluded from the resume key)
_NOT_IN_KEY = (
    "nproc",
    "overwrite",
    "output.log",
    "output.directory",
    "output.output_dir",
    "output.plots",
    "output.summary_prefix",
    "output.combined_prefix",
    "output.logging_dir",
    "mp.",
    "input.glob",
    "input.file_list",
    "input.max_images",
    "input.image_tag",
    "input.show_image_tags",
    "integration.sample",  # its effect per still is Item.integrate, in the key
)


@dataclasses.dataclass
class Config:
    """What a worker needs (picklable)."""

    params: Any  # extracted stills_process + diffuse parameters
    directory: str
    fingerprint: str
    overwrite: bool = False


def empty_row(item: Item) -> dict:
    return {
        "image": item.path,
        "frame": item.frame,
        "tag": item.tag,
        "route": item.route,
        "osc_width_deg": item.osc_width,
        "status": FAILED,
        "reason": item.error or "",
        "n_spots": 0,
        "n_indexed": 0,
        "n_integrated": 0,
        "integrated": False,
        "n_lattices": 0,
        "space_group": "",
        "a": None, "b": None, "c": None, "alpha": None, "beta": None, "gamma": None,
        "rmsd_px": None,
        "delta_q_mean": None,
        "delta_q_max": None,
        "mean_partiality": None,
        "partiality_model": "",
        "time_s": 0.0,
        "resumed": False,
        "experiments": "",
        "reflections": "",
    }


SUMMARY_COLUMNS = list(empty_row(Item(path="")).keys())


def params_fingerprint(phil_scope, params) -> str:
    """sha256 of every parameter that can change a still's result."""
    working = phil_scope.format(python_object=params)
    lines = []
    for d in working.all_definitions():
        path = d.path
        if any(path == k or (k.endswith(".") and path.startswith(k)) for k in _NOT_IN_KEY):
            continue
        lines.append(f"{path}={d.object.as_str().strip().split('=', 1)[-1].strip()}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def item_key(item: Item, fingerprint: str) -> str:
    """sha256 of the input (path, size, mtime, frame, route, integrated or not) and the parameters."""
    st = os.stat(item.path)
    parts = {
        "path": os.path.abspath(item.path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "frame": item.frame,
        "route": item.route,
        "osc_width": round(item.osc_width, 6),
        "reference_geometry": _file_sha256(item.reference_geometry) if item.reference_geometry else None,
        # (full-integration keys stay as before this field existed)
        **({} if item.integrate else {"integrate": False}),
        "params": fingerprint,
        "version": DONE_RECORD_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()
