"""The body of diffuse.extract (after parsing): see :mod:`diffuse_cli.command_line.extract`.

Per image: its total mask (:class:`MaskSource`), the per-still arrays of
:func:`diffuse_cli.extraction.extract_still` written as ``<still>.npz``
(forked workers), the resume rule of :mod:`diffuse_cli.provenance`, stale
outputs and the summary.
"""

from __future__ import annotations

import logging
import os

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli import program, provenance
from diffuse_cli.extraction import GeometryCache, StillRef, extract_still, image_refs
from diffuse_cli.formats import summaries
from diffuse_cli.formats.common import CORRUPT
from diffuse_cli.formats.extract import EXTRACT_SCHEMA, is_complete, write_extract

logger = logging.getLogger("diffuse.extraction")

# State shared with forked worker processes (set before the pool starts).
_STATE: dict = {}


class MaskSource:
    """Total masks per image: from diffuse.bragg_mask's summary, or one static mask.

    summary: path of ``bragg_masks/summary.json``; static: a DIALS mask file
    applied to every still (no Bragg masking).
    """

    def __init__(self, summary=None, static=None):
        self.by_image: dict = {}
        self.failed: dict = {}  # images diffuse.bragg_mask recorded as failed: key -> its reason
        self.static = None
        self.static_fingerprint = None
        if summary:
            data = summaries.read_summary(summary, summaries.BRAGG_MASK_SUMMARY_SCHEMA)
            directory = os.path.dirname(os.path.abspath(summary))
            for e in data["stills"]:
                key = (os.path.abspath(e["image_path"]), int(e["image_index"]), e["frame"])
                if e.get("status") == "failed":
                    self.failed[key] = e.get("reason", "no reason given")
                    continue
                # the packed copy loads ~50x faster than the DIALS pickle
                name = e.get("mask_bits") or e["mask"]
                self.by_image[key] = os.path.join(directory, name)
        if static:
            from diffuse_cli.formats.masks import read_mask

            self.static = read_mask(static)
            self.static_fingerprint = provenance.file_fingerprint(static)
        if not self.by_image and not self.failed and self.static is None:
            raise Sorry(
                "Give masks.summary=bragg_masks/summary.json (from diffuse.bragg_mask) "
                "or masks.static=<mask file>"
            )

    def _path(self, ref: StillRef) -> str:
        key = (os.path.abspath(ref.image_path), ref.file_index, ref.frame)
        path = self.by_image.get(key)
        if path is None and key in self.failed:
            raise Sorry(f"No Bragg mask for {ref.name}: diffuse.bragg_mask failed on it ({self.failed[key]})")
        if path is None:
            raise Sorry(f"No Bragg mask for {ref.name} in the bragg_mask summary")
        if not os.path.exists(path):
            raise Sorry(f"File not found: {path} (listed in the bragg_mask summary)")
        return path

    def fingerprint(self, ref: StillRef) -> dict:
        """Content fingerprints of the mask file(s) ``ref`` gets (see diffuse_cli.provenance)."""
        bragg = None
        if self.by_image or self.failed:
            path = self._path(ref)
            try:
                bragg = provenance.file_fingerprint(path)
            except CORRUPT as e:
                raise Sorry(f"{path}: not a readable mask file ({type(e).__name__}); rerun diffuse.bragg_mask") from None
        return {"bragg": bragg, "static": self.static_fingerprint}

    def mask_for(self, ref: StillRef, n_pixels: int) -> np.ndarray:
        from diffuse_cli.formats.masks import read_mask_any as read_mask

        mask = None
        if self.by_image or self.failed:
            mask = read_mask(self._path(ref))
        if self.static is not None:
            mask = self.static if mask is None else (mask & self.static)
        if mask.size != n_pixels:
            raise Sorry(f"{ref.name}: mask has {mask.size} pixels, detector {n_pixels}")
        return mask


def _extract_one(ref: StillRef) -> dict:
    """Worker: extract one image (or skip it if done) -> summary entry.

    The batch rule: a still that cannot be extracted (missing or corrupt
    image or mask) is a ``status: failed`` entry with its ``reason``, its
    old output removed (it would be stale), and the batch goes on.
    """
    path = os.path.join(_STATE["params"].output.directory, f"{ref.name}.npz")
    entry = {"name": ref.name, "file": os.path.basename(path), "experiment_index": ref.experiment_index}
    try:
        return _extract_still_entry(ref, path, entry)
    except Sorry as e:
        if os.path.exists(path):
            os.remove(path)
        return {**entry, "status": "failed", "reason": str(e)}


def _extract_still_entry(ref: StillRef, path: str, entry: dict) -> dict:
    import time

    st = _STATE
    params, experiments = st["params"], st["experiments"]
    expt = experiments[ref.experiment_index]
    if not os.path.isfile(ref.image_path):
        raise Sorry(f"File not found: {ref.image_path}")
    # the resume rule (diffuse_cli.provenance): image, mask content, models
    parts = {
        "schema": EXTRACT_SCHEMA,
        "image": provenance.image_fingerprint(ref.image_path, ref.file_index),
        "frame": ref.frame,
        "masks": st["masks"].fingerprint(ref),
        "experiment": st["experiment_fingerprint"][ref.experiment_index],
    }
    key = provenance.key_of(parts)
    entry["provenance_key"] = key
    if provenance.is_current(path, key, params.output.overwrite):
        entry.update(status="up to date", skipped=True)
        return entry
    t0 = time.perf_counter()
    geometry = st["cache"].get(expt.detector, expt.beam)
    mask = st["masks"].mask_for(ref, geometry.n_pixels)
    arrays = extract_still(expt, ref, mask, geometry)
    write_extract(path, ref=ref, experiment_identifier=expt.identifier, **arrays,
                  **provenance.npz_fields(key, parts))
    entry.update(
        status="extracted",
        n_used=int(arrays["counts"].size),  # = mask.sum(), without another pass
        fraction_used=arrays["counts"].size / arrays["mask"].size,
        exposure_time=arrays["exposure_time"],
        seconds=time.perf_counter() - t0,
    )
    return entry


def run_extract(experiments, params) -> list[dict]:
    """Extract every image of ``experiments`` into ``params.output.directory``."""

    nproc = program.resolve_nproc(params.nproc)
    os.makedirs(params.output.directory, exist_ok=True)
    provenance.remove_temporaries(params.output.directory)
    masks = MaskSource(params.masks.summary, params.masks.static)
    # diffuse.bragg_mask leaves the geometry next to its summary: not computed twice
    cache = GeometryCache(params.output.directory, read_also=[
        os.path.dirname(os.path.abspath(params.masks.summary)) if params.masks.summary else None])
    refs = image_refs(experiments)
    # geometry once per detector + beam, before forking (workers share it)
    for expt in experiments:
        cache.get(expt.detector, expt.beam)
    logger.info("%d images to extract, %d geometry file(s) in %s", len(refs), len(cache._by_key), params.output.directory)
    _STATE.update(params=params, experiments=experiments, cache=cache, masks=masks,
                  experiment_fingerprint=[provenance.experiment_fingerprint(e) for e in experiments])
    try:
        entries = program.parallel_map(_extract_one, refs, nproc, desc="extract")
    finally:
        _STATE.clear()
    # extracts of stills no longer among the inputs (diffuse.correct reads the whole directory)
    import glob

    ours = [
        p for p in glob.glob(os.path.join(glob.escape(params.output.directory), "*.npz"))
        if not os.path.basename(p).startswith("geometry_") and is_complete(p)
    ]
    provenance.stale_outputs(ours, [os.path.join(params.output.directory, e["file"]) for e in entries],
                             params.output.stale)
    summary_path = os.path.join(params.output.directory, "summary.json")
    # a rerun keeps the figures of skipped stills
    previous = summaries.previous_stills(summary_path, summaries.EXTRACT_SUMMARY_SCHEMA)
    for e in entries:
        old = previous.get(e["name"])
        if e.get("skipped") and old is not None and old.get("provenance_key") == e["provenance_key"]:
            e.update({k: v for k, v in old.items() if k not in e})
    failed = [e for e in entries if e.get("status") == "failed"]
    done = [e for e in entries if not e.get("skipped") and e.get("status") != "failed"]
    skipped = len(entries) - len(done) - len(failed)
    if done:
        t = np.array([e["seconds"] for e in done])
        f = np.array([e["fraction_used"] for e in done])
        logger.info(
            "Extracted %d images (%.3f s each, median), %.1f %% of pixels used (median); %d already done",
            len(done), float(np.median(t)), 100 * float(np.median(f)), skipped,
        )
    elif not failed:
        logger.info("Nothing to do: all %d images extracted from the same inputs (overwrite=True to redo)", skipped)
    # bragg_masks: read by diffuse.merge (absolute scale: Bragg part missing from the map)
    summaries.write_summary(summary_path, summaries.EXTRACT_SUMMARY_SCHEMA, entries, bragg_masks=bool(masks.by_image))
    summaries.report_failed("diffuse.extract", failed, len(entries), summary_path)
    return entries
