"""Input discovery of ``diffuse.stills_process``: files to images, images to routes.

Arguments, globs, directories and file lists are expanded into files; each
file is probed (dxtbx) into one :class:`Item` per distinct image; rotation
frames are recognised (header width > 0, or a steadily advancing start angle)
and every image gets its route. Consecutive sequence-route images of one
dataset form one work unit (:func:`group_sequences`).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from typing import Any, Iterable

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment, mono_sim shim)
from diffuse_cli import program

logger = logging.getLogger("diffuse.processing")

#: routes
ROUTE_STILLS = "stills"
ROUTE_ROTATION_AS_STILLS = "rotation_as_stills"
ROUTE_SEQUENCE = "sequence"


@dataclasses.dataclass
class Item:
    """One input image (one row of the summary).

    ``frame`` is the 0-based image index inside ``path`` for multi-image
    containers and ``.expt`` inputs, else 0. ``osc_width`` (degrees) is the
    oscillation width used for the route decision: the header's, or the
    goniometer-angle step between consecutive images when the header says 0.
    """

    path: str
    frame: int = 0
    tag: str = ""
    source: str = "image"  # image | expt
    n_in_file: int = 1
    route: str = ROUTE_STILLS
    osc_width: float = 0.0
    osc_start: float | None = None
    header_osc_width: float = 0.0
    error: str | None = None  # set when the input cannot be used at all
    # a detector to process this image with (diffuse_cli.shared_detector), else
    # the user's input.reference_geometry, else the header's
    reference_geometry: str | None = None
    # False: index and refine only (integration.sample, the XFEL mode)
    integrate: bool = True


#: files found by listing a directory (unrecognised ones are skipped, not rows)
_FROM_DIRECTORY: set[str] = set()


def expand_paths(args: Iterable[str], globs: Iterable[str] = (), file_list: str | None = None) -> list[str]:
    """Files named by arguments, globs, directories (their files) and a file list.

    Globs that match nothing and missing files are kept as they are, so that
    they end up as a summary row saying "file not found". Files found by
    listing a directory that turn out not to be images are skipped (logged)
    rather than reported as failed rows.
    """
    out: list[str] = []
    for arg in list(args) + list(globs or []):
        if glob.has_magic(arg):
            matches = sorted(glob.glob(arg))
            out.extend(matches if matches else [arg])
        elif os.path.isdir(arg):
            listed = sorted(
                os.path.join(arg, f)
                for f in os.listdir(arg)
                if not f.startswith(".") and os.path.isfile(os.path.join(arg, f))
            )
            _FROM_DIRECTORY.update(os.path.abspath(p) for p in listed)
            out.extend(listed)
        else:
            out.append(arg)
    if file_list:
        with open(file_list) as fh:
            out.extend(line.strip() for line in fh if line.strip() and not line.startswith("#"))
    return program.unique_paths(out)


def _scan_width_start(scan, imageset=None, index: int = 0) -> tuple[float, float | None]:
    """(oscillation width, start angle) in degrees of ``imageset[index]`` in a scan."""
    if scan is None:
        return 0.0, None
    from diffuse_cli.frames import FrameRef

    frames = FrameRef.from_scan(scan, imageset)
    start = frames.phi_deg(frames.array_index_of_imageset_index(index))  # z at the frame's start
    return frames.width_deg, float(start)


def _probe(path: str) -> list[Item]:
    """Items (one per image) of one input file, or one Item with ``error``."""
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    if not os.path.exists(path):
        return [Item(path=path, error="file not found")]
    if not os.path.isfile(path):
        return [Item(path=path, error="not a file")]
    if os.path.getsize(path) == 0:
        return [Item(path=path, error="empty file")]
    if path.endswith(".expt") or path.endswith(".json"):
        try:
            experiments = ExperimentList.from_file(path, check_format=False)
        except Exception as e:  # report the reason on the row, never stop the batch
            if path.endswith(".json"):
                return [Item(path=path, error="not a recognised image format or experiment list")]
            return [Item(path=path, error=f"cannot read experiment list: {one_line(e)}")]
        items = _image_items(path, (e for e in experiments if e.imageset is not None), source="expt")
        return items or [Item(path=path, error="experiment list has no images")]
    try:
        unhandled: list[str] = []
        experiments = ExperimentListFactory.from_filenames([path], unhandled=unhandled)
    except Exception as e:
        if isinstance(e, ValueError) and "filename template" in str(e):
            return [Item(path=path, error=program.TEMPLATE_HINT)]
        return [Item(path=path, error=f"cannot read image header: {one_line(e)}")]
    if unhandled or len(experiments) == 0:
        return [Item(path=path, error="not a recognised image format")]
    return _image_items(path, experiments, source="image")


def _image_items(path: str, experiments, source: str) -> list[Item]:
    """One Item per distinct image of ``experiments`` (read from ``path``).

    ``frame`` is the image's index among the distinct images (dials.import
    gives stills as one experiment per image, all sharing one ImageSet); the
    tag is the file stem, with ``_<frame>`` when the file holds several.
    """
    base = os.path.splitext(os.path.basename(path))[0]
    items = []
    for expt, j in distinct_images(experiments):
        width, start = _scan_width_start(expt.scan, expt.imageset, j)
        items.append(Item(path=path, frame=len(items), source=source, osc_width=width,
                          header_osc_width=width, osc_start=start))
    for it in items:
        it.n_in_file = len(items)
        it.tag = base if len(items) == 1 else f"{base}_{it.frame:05d}"
    return items


def distinct_images(experiments) -> list[tuple[Any, int]]:
    """(experiment, index in its imageset) of each distinct image, in order.

    Several experiments can share one imageset:

    * stills from dials.import: one experiment per image, sharing an ImageSet
      of all the images; experiment k is image k (DIALS's convention);
    * a multi-image file of zero-width images with a scan (e.g. NXmx stills
      with a fixed goniometer): one experiment per image, each holding the
      whole ImageSequence.

    Counting every experiment's images would list each image once per
    experiment. Images are identified by (file, index in file).
    """
    experiments = list(experiments)
    # experiments sharing an imageset share the Python object: list its
    # images once (not once per experiment, O(N²) for N frames)
    by_imageset: dict = {}

    def image_keys(imageset):
        if id(imageset) not in by_imageset:
            indices = imageset.indices()
            keys = tuple((imageset.get_path(j), int(indices[j])) for j in range(len(imageset)))
            by_imageset[id(imageset)] = (imageset, keys)  # the reference keeps id() unique
        return by_imageset[id(imageset)][1]

    keys = [image_keys(e.imageset) for e in experiments]
    sharing: dict = {}
    for k in keys:
        sharing[k] = sharing.get(k, 0) + 1
    position: dict = {}
    seen: set = set()
    out = []
    for expt, k in zip(experiments, keys):
        rank = position.get(k, 0)
        position[k] = rank + 1
        if expt.scan is None and sharing[k] == len(k) > 1:
            owned = [rank]  # stills: the k-th experiment of the set is image k
        else:
            owned = range(len(k))
        for j in owned:
            if k[j] not in seen:
                seen.add(k[j])
                out.append((expt, j))
    return out


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = [t.strip() for t in text if t.strip()]
    msg = text[0] if text else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def dataset_key(path: str) -> str:
    """Directory + file name with its last run of digits replaced by '#'."""
    d, b = os.path.split(os.path.abspath(path))
    return os.path.join(d, re.sub(r"\d+(?=\D*$)", "#", b))


def detect_rotation_steps(items: list[Item], tolerance_deg: float = 1e-3) -> None:
    """Set ``osc_width`` of zero-width frames whose angle advances steadily.

    Single-image files of one dataset (same directory and file-name template),
    taken in file-name order, are rotation frames when their header start
    angles advance by the same non-zero step. That step becomes ``osc_width``.
    Headers with a width > 0 are trusted and left alone.
    """
    groups: dict[str, list[Item]] = {}
    for it in items:
        if it.error is None and it.source == "image" and it.n_in_file == 1:
            groups.setdefault(dataset_key(it.path), []).append(it)
    for group in groups.values():
        if len(group) < 2 or any(it.osc_start is None or it.header_osc_width != 0 for it in group):
            continue
        starts = np.array([it.osc_start for it in group], dtype=float)
        steps = np.diff(starts)
        step = float(np.median(steps))
        if abs(step) > tolerance_deg and np.all(np.abs(steps - step) < max(tolerance_deg, 1e-3 * abs(step))):
            for it in group:
                it.osc_width = abs(step)


def discover(paths: list[str], processing_mode: str = "auto") -> list[Item]:
    """Probe every input file and decide each image's route.

    Zero-width images are always ``stills``. Rotation frames go through the
    ``sequence`` route with ``processing_mode=sequence``, or with ``auto``
    when the header itself gives a width > 0 (single-image files); otherwise
    (``stills``, or ``auto`` with a header width of 0 and an advancing angle)
    they are processed as stills of their width (``rotation_as_stills``).
    """
    items: list[Item] = []
    for p in paths:
        probed = _probe(p)
        if (
            len(probed) == 1
            and probed[0].error is not None
            and probed[0].error.startswith("not a recognised")
            and os.path.abspath(p) in _FROM_DIRECTORY
        ):
            logger.info("Skipping %s: %s", p, probed[0].error)
            continue
        items.extend(probed)
    detect_rotation_steps(items)
    for it in items:
        if not it.tag:
            it.tag = os.path.splitext(os.path.basename(it.path))[0] or "input"
        if it.osc_width <= 0:
            it.route = ROUTE_STILLS
        elif processing_mode == "sequence" or (
            processing_mode == "auto" and it.header_osc_width > 0 and it.n_in_file == 1
        ):
            it.route = ROUTE_SEQUENCE
        else:
            it.route = ROUTE_ROTATION_AS_STILLS
    # tags must be unique: they name the output files and the identifiers
    counts: dict[str, int] = {}
    for it in items:
        counts[it.tag] = counts.get(it.tag, 0) + 1
    if any(c > 1 for c in counts.values()):
        for i, it in enumerate(items):
            if counts[it.tag] > 1:
                it.tag = f"{it.tag}_{i:05d}"
    return items


def group_sequences(items: list[Item]) -> list[list[Item]]:
    """Work units: consecutive ``sequence``-route images of one dataset form one unit.

    Every other item is a unit of its own. Units keep input order.
    """
    units: list[list[Item]] = []
    for it in items:
        prev = units[-1][-1] if units else None
        if (
            it.route == ROUTE_SEQUENCE
            and prev is not None
            and prev.route == ROUTE_SEQUENCE
            and dataset_key(prev.path) == dataset_key(it.path)
            and abs(prev.osc_width - it.osc_width) < 1e-6
            and prev.osc_start is not None
            and it.osc_start is not None
            and abs(it.osc_start - prev.osc_start - it.osc_width) < 1e-3
        ):
            units[-1].append(it)
        else:
            units.append([it])
    return units
