"""Stage summaries: ``summary.json`` of diffuse.bragg_mask, extract, correct and merge.

One JSON object per stage output directory, written atomically at the end of
every run (a rerun rewrites it):

* ``schema``: ``diffuse.bragg_mask/1``, ``diffuse.extract_summary/1``,
  ``diffuse.correct_summary/1`` or ``diffuse.merge_summary/1``;
* ``stills``: one entry per still of the run. Every entry has ``name`` (the
  still's file stem; ``still`` in correct's rows) and, for a still the batch
  rule skipped, ``status: "failed"`` and ``reason`` (the one-line message);
  done or kept stills carry their figures and, for bragg_mask, extract and
  correct, their ``provenance_key`` (:mod:`diffuse_cli.provenance`);
* ``n_failed``: how many stills were skipped;
* stage fields: bragg_mask ``method``, ``static_masks``; extract
  ``bragg_masks`` (whether Bragg masks were applied, read by diffuse.merge's
  absolute scale); merge ``n_merged``, ``map``.

The bragg_mask summary is also extract's input (``masks.summary``): each
entry's ``image_path``, ``image_index``, ``frame`` and ``mask_bits`` (or
``mask``) name the mask of one image; a ``failed`` entry (same image fields,
no mask) makes extract record that still as failed with bragg_mask's reason.
"""

from __future__ import annotations

import json
import os

from libtbx.utils import Sorry

BRAGG_MASK_SUMMARY_SCHEMA = "diffuse.bragg_mask/1"
EXTRACT_SUMMARY_SCHEMA = "diffuse.extract_summary/1"
CORRECT_SUMMARY_SCHEMA = "diffuse.correct_summary/1"
MERGE_SUMMARY_SCHEMA = "diffuse.merge_summary/1"
#: what each stage calls its summary in messages
_PROGRAM = {
    BRAGG_MASK_SUMMARY_SCHEMA: "diffuse.bragg_mask",
    EXTRACT_SUMMARY_SCHEMA: "diffuse.extract",
    CORRECT_SUMMARY_SCHEMA: "diffuse.correct",
    MERGE_SUMMARY_SCHEMA: "diffuse.merge",
}


def write_summary(path, schema: str, stills: list, **fields) -> None:
    """Write a stage summary atomically (the only writer)."""
    from diffuse_cli import program

    n_failed = sum(1 for e in stills if e.get("status") == "failed")
    program.write_json(path, {"schema": schema, **fields, "n_failed": n_failed, "stills": stills})


def read_summary(path, schema: str) -> dict:
    """A stage summary, checked: Sorry naming the file unless it is a ``schema`` summary."""
    what = f"not a {_PROGRAM.get(schema, schema)} summary"
    if not os.path.exists(path):
        raise Sorry(f"File not found: {path}")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Sorry(f"{path}: {what} (not JSON: {e})") from None
    except IsADirectoryError:
        raise Sorry(f"{path}: a directory, {what}") from None
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else None
        raise Sorry(f"{path}: {what}" + (f" (schema {found!r}, expected {schema!r})" if found else ""))
    if not isinstance(data.get("stills"), list):
        raise Sorry(f"{path}: {what} (no list of stills)")
    return data


def previous_stills(path, schema: str, key: str = "name") -> dict:
    """``{name: entry}`` of the summary an earlier run left, or {} (none, or unreadable:
    a rerun rewrites it)."""
    try:
        data = read_summary(path, schema)
    except Sorry:
        return {}
    return {e[key]: e for e in data["stills"] if isinstance(e, dict) and key in e}


def report_failed(program_name: str, failed: list, n_stills: int, summary_path) -> None:
    """The end of a batch: warn how many stills were skipped; a Sorry if every one was.

    failed: the ``status: failed`` entries (each with its ``reason``).
    """
    import logging

    if not failed:
        return
    name = failed[0].get("name", failed[0].get("still", "?"))
    first = f"{name}: {failed[0].get('reason', '')}".replace("\n", " ")
    if len(failed) >= n_stills:
        raise Sorry(f"{program_name}: every still failed ({n_stills}); the first: {first} (all in {summary_path})")
    logging.getLogger("diffuse.summaries").warning(
        "Skipped %d of %d stills that could not be read (reasons in %s); the first: %s",
        len(failed), n_stills, summary_path, first)
