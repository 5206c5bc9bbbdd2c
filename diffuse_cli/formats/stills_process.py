"""diffuse.stills_process's run files: the summary table and the per-still done-records.

* ``<directory>/<summary_prefix>.csv`` and ``.json``: one row per input image
  (columns :data:`diffuse_cli.stills.records.SUMMARY_COLUMNS`); the JSON is
  ``{"schema": "diffuse.stills_process_summary/1", "rows": [...]}``.
* ``<directory>/done/<tag>.json``: written atomically after a still's (or a
  sweep's) outputs, ``{"schema": "diffuse.stills_process_done/1", "key": ...,
  "outputs": [...], ...}`` with the row(s) and partiality histogram(s). The
  key fingerprints the input and the parameters that can change the result
  (:func:`diffuse_cli.stills.records.item_key`); a record with another key,
  another schema, unreadable, or whose outputs are gone means "redo".
"""

from __future__ import annotations

import json
import os

from libtbx.utils import Sorry

SUMMARY_SCHEMA = "diffuse.stills_process_summary/1"
DONE_RECORD_SCHEMA = "diffuse.stills_process_done/1"


def write_stills_process_summary(rows: list[dict], prefix: str, columns: list[str]) -> tuple[str, str]:
    """``<prefix>.csv`` (``columns``) and ``<prefix>.json`` (every field), atomically; their paths."""
    import csv

    from diffuse_cli import program

    csv_path, json_path = prefix + ".csv", prefix + ".json"
    with program.atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    program.write_json(json_path, {"schema": SUMMARY_SCHEMA, "rows": rows})
    return csv_path, json_path


def read_stills_process_summary(path) -> list[dict]:
    """The rows of a ``<summary_prefix>.json``; Sorry naming the file unless it is one."""
    if not os.path.exists(path):
        raise Sorry(f"File not found: {path}")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise Sorry(f"{path}: not a diffuse.stills_process summary (not JSON: {e})") from None
    if not isinstance(data, dict) or data.get("schema") != SUMMARY_SCHEMA or not isinstance(data.get("rows"), list):
        raise Sorry(f"{path}: not a diffuse.stills_process summary (expected schema {SUMMARY_SCHEMA!r})")
    return data["rows"]


def done_record_path(directory: str, tag: str) -> str:
    return os.path.join(directory, "done", f"{tag}.json")


def write_done_record(directory: str, tag: str, key: str, outputs: list[str], **fields) -> None:
    """The done-record of ``tag`` (atomic; write it after the outputs it lists)."""
    from diffuse_cli import program

    program.write_json(done_record_path(directory, tag),
                       {"schema": DONE_RECORD_SCHEMA, "key": key, **fields, "outputs": outputs})


def read_done_record(directory: str, tag: str, key: str) -> dict | None:
    """The stored record if ``tag`` was completed with this key and its outputs exist, else None."""
    path = done_record_path(directory, tag)
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("schema") != DONE_RECORD_SCHEMA or record.get("key") != key:
        return None
    for rel in record.get("outputs", []):
        if not os.path.isfile(os.path.join(directory, rel)):
            return None
    return record
