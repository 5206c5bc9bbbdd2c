"""Per-still Bragg processing for ``diffuse.stills_process``.

Drives DIALS stills processing through its Python API
(:class:`dials.command_line.stills_process.Processor`), one still at a time,
and adds what a diffuse pipeline needs around it:

* **inputs**: image files, directories, globs, multi-image containers
  (HDF5/NeXus: one item per frame) and imported ``.expt`` files are expanded
  into a list of :class:`Item` (one per image), each with a unique ``tag``;
* **route selection**: zero-oscillation images are stills. Images whose
  headers give an oscillation width > 0, or whose headers say width 0 while
  the goniometer angle advances by a constant step from one image to the next
  (the staphylococcal nuclease frames), are *rotation frames*: they go either
  through the ``sequence`` route (imported as one sweep, spots found,
  indexed, refined and integrated as rotation data:
  :func:`process_sequence_unit`) or are processed as stills of width ``Δφ``
  (route ``rotation_as_stills``) with the stills indexer's Ewald-proximity and
  σ_b limits raised to the values in ``rotation_frames`` (see
  docs/stills_process.md for which and why);
* **per-still outputs** written atomically, tagged by image name, with
  deterministic experiment identifiers (the tag), ``partiality`` and,
  optionally, shoeboxes;
* **q-consistency** validation: for the indexed spots of each still,
  ``Δq = |q_obs − A·h|`` (Å⁻¹), with ``q_obs = s1 − s0`` of the observed
  centroid and ``A = crystal.get_A()``;
* **resume bookkeeping**: a done-record per still, written atomically after
  its outputs and keyed by a hash of the input file (path, size, mtime, frame)
  and of the effective parameters;
* **drivers**: serial, local processes (``nproc``) and MPI (``mp.method=mpi``),
  all calling the same per-item function, so their per-still results are
  identical;
* one **summary row** per input image, the combined ``.expt``/``.refl`` pair
  and the QC plots (:mod:`diffuse_cli.qc_plots`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Iterable

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment, mono_sim shim)
from diffuse_cli import program

logger = logging.getLogger("diffuse.processing")

#: status values of a summary row
INDEXED = "indexed"
NOT_A_HIT = "not a hit"
FAILED = "failed"
FAILED_VALIDATION = "failed validation"

#: routes
ROUTE_STILLS = "stills"
ROUTE_ROTATION_AS_STILLS = "rotation_as_stills"

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
)


# ----------------------------------------------------------------- inputs


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


def _scan_width_start(scan, frame: int = 0) -> tuple[float, float | None]:
    """(oscillation width, start angle) in degrees of image ``frame`` of a scan."""
    if scan is None:
        return 0.0, None
    start, width = scan.get_oscillation()
    return float(width), float(start) + float(width) * frame


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
            return [Item(path=path, error=f"cannot read experiment list: {_one_line(e)}")]
        items = _image_items(path, (e for e in experiments if e.imageset is not None), source="expt")
        return items or [Item(path=path, error="experiment list has no images")]
    try:
        unhandled: list[str] = []
        experiments = ExperimentListFactory.from_filenames([path], unhandled=unhandled)
    except Exception as e:
        return [Item(path=path, error=f"cannot read image header: {_one_line(e)}")]
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
    for expt, j in _distinct_images(experiments):
        width, start = _scan_width_start(expt.scan, j)
        items.append(Item(path=path, frame=len(items), source=source, osc_width=width,
                          header_osc_width=width, osc_start=start))
    for it in items:
        it.n_in_file = len(items)
        it.tag = base if len(items) == 1 else f"{base}_{it.frame:05d}"
    return items


def _distinct_images(experiments) -> list[tuple[Any, int]]:
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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = [t.strip() for t in text if t.strip()]
    msg = text[0] if text else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _dataset_key(path: str) -> str:
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
            groups.setdefault(_dataset_key(it.path), []).append(it)
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


# --------------------------------------------------------- resume bookkeeping


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
    """sha256 of the input (path, size, mtime, frame, route) and the parameters."""
    st = os.stat(item.path)
    parts = {
        "path": os.path.abspath(item.path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "frame": item.frame,
        "route": item.route,
        "osc_width": round(item.osc_width, 6),
        "params": fingerprint,
        "version": DONE_RECORD_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def done_record_path(directory: str, tag: str) -> str:
    return os.path.join(directory, "done", f"{tag}.json")


def read_done_record(directory: str, item: Item, key: str) -> dict | None:
    """The stored row if this still was completed with the same key and its outputs exist."""
    path = done_record_path(directory, item.tag)
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if record.get("key") != key:
        return None
    for rel in record.get("outputs", []):
        if not os.path.isfile(os.path.join(directory, rel)):
            return None
    return record


# ------------------------------------------------------------ per-still work


@dataclasses.dataclass
class Config:
    """What a worker needs (picklable)."""

    params: Any  # extracted stills_process + diffuse parameters
    directory: str
    fingerprint: str
    overwrite: bool = False


def stills_params_for(item: Item, params):
    """The DIALS stills_process parameters used for this item's route.

    A fresh deep copy per still: DIALS's Processor and integrator modify
    parameters in place, and a still's result must not depend on the stills
    processed before it in the same process.
    """
    p = copy.deepcopy(params)
    p.output.output_dir = params.output.directory
    p.output.composite_output = True
    p.mp.debug.output_debug_logs = False
    p.mp.debug.cProfile = False
    if params.output.integrated_shoeboxes:
        p.integration.debug.output = True
        p.integration.debug.separate_files = False
        p.integration.debug.delete_shoeboxes = False
    if item.route == ROUTE_ROTATION_AS_STILLS:
        rf = params.rotation_frames
        p.indexing.stills.ewald_proximal_volume_max = max(
            p.indexing.stills.ewald_proximal_volume_max, rf.ewald_proximal_volume_max
        )
        cutoff = p.profile.gaussian_rs.parameters.sigma_b_cutoff
        if cutoff is not None:
            p.profile.gaussian_rs.parameters.sigma_b_cutoff = max(cutoff, rf.sigma_b_cutoff)
    return p


def load_item_experiments(item: Item, params):
    """One-image ExperimentList for ``item``, geometry overrides applied."""
    from dials.command_line.dials_import import ManualGeometryUpdater
    from dials.command_line.stills_process import do_import, sync_geometry
    from dxtbx.imageset import ImageSequence, ImageSetFactory
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    # the frame numbering of _probe: each distinct image once
    if item.source == "expt":
        expt, j = _distinct_images(ExperimentList.from_file(item.path, check_format=True))[item.frame]
    else:
        expt, j = _distinct_images(do_import(item.path, load_models=False))[item.frame]
    # a one-image ImageSet of image j (an experiment may hold a whole sequence)
    imageset = ImageSetFactory.imageset_from_anyset(expt.imageset)[j : j + 1]
    if item.source == "expt":  # the experiment's (possibly refined) models
        models = dict(detector=expt.detector, beam=expt.beam, scan=expt.scan, goniometer=expt.goniometer)
    else:  # image j's own models (an XFEL shot may have its own wavelength)
        source = expt.imageset
        if isinstance(source, ImageSequence):
            models = dict(detector=source.get_detector(), beam=source.get_beam(),
                          scan=source.get_scan(), goniometer=source.get_goniometer())
        else:
            models = dict(detector=source.get_detector(j), beam=source.get_beam(j),
                          scan=None, goniometer=source.get_goniometer(j))
    experiments = ExperimentList([Experiment(imageset=imageset, **models)])
    experiment = experiments[0]
    imageset = experiment.imageset
    ManualGeometryUpdater(params)(imageset)
    experiment.beam = imageset.get_beam()
    experiment.detector = imageset.get_detector()
    if params.input.reference_geometry is not None:
        reference = _reference_detector(params.input.reference_geometry)
        if params.input.sync_reference_geom:
            sync_geometry(reference.hierarchy(), imageset.get_detector().hierarchy())
            experiment.detector = imageset.get_detector()
        else:
            experiment.detector = copy.deepcopy(reference)
    if item.route == ROUTE_ROTATION_AS_STILLS or experiment.scan is not None:
        # processed as a still: its crystal model is the lab-frame orientation at
        # this image, so no goniometer/scan may be applied on top downstream
        experiment.goniometer = None
        experiment.scan = None
    return experiments


_REFERENCE_CACHE: dict[str, Any] = {}


def _reference_detector(path: str):
    if path not in _REFERENCE_CACHE:
        from dxtbx.model.experiment_list import ExperimentList

        try:
            detectors = ExperimentList.from_file(path, check_format=False).detectors()
        except Exception:
            import dxtbx

            detectors = [dxtbx.load(path).get_detector()]
        if len(detectors) != 1:
            raise ValueError(f"reference_geometry {path} must hold exactly one detector")
        _REFERENCE_CACHE[path] = detectors[0]
    return _REFERENCE_CACHE[path]


def q_consistency(experiments, reflections) -> tuple[np.ndarray, np.ndarray]:
    """|q_obs − A·h| (Å⁻¹) of every indexed reflection, and its experiment id.

    ``q_obs = s1 − s0`` from the observed centroid (``xyzobs.mm.value`` taken to
    the lab frame by its panel), ``A·h`` the refined crystal model's reciprocal
    lattice point for the assigned Miller index.
    """
    from scitbx.array_family import flex

    n = len(reflections)
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=int)
    ids = reflections["id"].as_numpy_array()
    panels = reflections["panel"].as_numpy_array()
    xyz = reflections["xyzobs.mm.value"].as_numpy_array()
    hkl = reflections["miller_index"].as_vec3_double().as_numpy_array()
    lab = np.zeros((n, 3))
    dq = np.full(n, np.nan)
    for i_expt, expt in enumerate(experiments):
        sel_e = ids == i_expt
        if not sel_e.any():
            continue
        detector = expt.detector
        for i_panel in np.unique(panels[sel_e]):
            sel = sel_e & (panels == i_panel)
            mm = flex.vec2_double(flex.double(xyz[sel, 0].copy()), flex.double(xyz[sel, 1].copy()))
            lab[sel] = detector[int(i_panel)].get_lab_coord(mm).as_numpy_array()
        wavelength = expt.beam.get_wavelength()
        s0 = np.asarray(expt.beam.get_s0())
        s1 = lab[sel_e] / (np.linalg.norm(lab[sel_e], axis=1, keepdims=True) * wavelength)
        A = np.asarray(expt.crystal.get_A()).reshape(3, 3)
        q_model = hkl[sel_e] @ A.T
        dq[sel_e] = np.linalg.norm(s1 - s0 - q_model, axis=1)
    return dq, ids


def stills_partiality(A, s0, hkl, domain_size_ang: float, half_mosaicity_deg: float):
    """Lorentzian stills partiality and excitation error (Sauter et al. 2014).

    ``rh = |s0 + A·h| − |s0|`` (Å⁻¹) is the distance of the reciprocal-lattice
    point from the Ewald sphere; ``rs = 1/D + η/(2d)`` (Å⁻¹) its radius, with D
    the mosaic domain size (Å), η the full mosaic angle (radians) and
    d = 1/|A·h| (Å); ``p = rs² / (2 rh² + rs²)``, 1 on the sphere.
    Arrays: ``A`` (3, 3), ``s0`` (3,), ``hkl`` (n, 3).
    """
    q = np.asarray(hkl, dtype=float) @ np.asarray(A, dtype=float).reshape(3, 3).T
    s0 = np.asarray(s0, dtype=float)
    rh = np.linalg.norm(q + s0, axis=1) - np.linalg.norm(s0)
    eta = 2.0 * np.deg2rad(half_mosaicity_deg)
    rs = 1.0 / domain_size_ang + eta * np.linalg.norm(q, axis=1) / 2.0
    return rs**2 / (2.0 * rh**2 + rs**2), rh


def set_stills_partiality(experiments, reflections) -> str:
    """Replace DIALS's stills ``partiality`` (always 1.0 in DIALS 3.12) in place.

    Uses each crystal's Nave mosaic model (domain size, half mosaicity) when
    it has one and also writes ``excitation_error`` (Å⁻¹). Returns the model
    used: ``"lorentzian_rs"``, or ``"dials"`` when a crystal has no mosaic
    model (DIALS's column is then kept as it is, and the row says so).
    """
    from scitbx.array_family import flex

    if len(reflections) == 0:
        return "lorentzian_rs"
    if not all(hasattr(e.crystal, "get_domain_size_ang") for e in experiments):
        return "dials"
    ids = reflections["id"].as_numpy_array()
    hkl = reflections["miller_index"].as_vec3_double().as_numpy_array()
    partiality = np.ones(len(reflections))
    rh = np.zeros(len(reflections))
    for i, expt in enumerate(experiments):
        sel = ids == i
        partiality[sel], rh[sel] = stills_partiality(
            expt.crystal.get_A(), expt.beam.get_s0(), hkl[sel],
            expt.crystal.get_domain_size_ang(), expt.crystal.get_half_mosaicity_deg(),
        )
    reflections["partiality"] = flex.double(partiality)
    reflections["excitation_error"] = flex.double(rh)
    return "lorentzian_rs"


@contextlib.contextmanager
def _still_log(path: str | None):
    """Send DIALS logging and stdout of one still to its own log file."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.DEBUG)
    names = ("dials", "dxtbx")
    saved = {}
    for name in names:
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    fh = handler.stream
    try:
        with contextlib.redirect_stdout(fh):
            yield
    finally:
        for name in names:
            lg = logging.getLogger(name)
            lg.removeHandler(handler)
            handlers, level, propagate = saved[name]
            for h in handlers:
                lg.addHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate
        handler.close()


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


def seed_random_generators(tag: str) -> None:
    """Seed Python, numpy and scitbx RNGs from the image tag.

    DIALS indexing draws random numbers; seeding per still makes a still's
    result independent of which process ran it and what it ran before, so
    serial, multiprocess and MPI runs agree.
    """
    import random

    from scitbx.array_family import flex

    seed = int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)
    random.seed(seed)
    np.random.seed(seed)
    flex.set_random_seed(seed)


class _StageError(Exception):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {_one_line(error)}")
        self.stage = stage
        self.error = error


def process_item(item: Item, config: Config) -> tuple[dict, list[int] | None]:
    """Process one image; return its summary row and partiality histogram.

    Never raises for a bad still when ``dispatch.squash_errors`` is True: the
    reason goes on the row. Writes the per-still files and then, atomically,
    the done-record.
    """
    row = empty_row(item)
    if item.error is not None:
        return row, None
    params = config.params
    directory = config.directory
    key = item_key(item, config.fingerprint)
    if not config.overwrite:
        record = read_done_record(directory, item, key)
        if record is not None:
            row = dict(record["row"])
            row["resumed"] = True
            return row, record.get("partiality_hist")
    t0 = time.perf_counter()
    hist = None
    seed_random_generators(item.tag)
    log_path = os.path.join(directory, "logs", f"{item.tag}.log")
    try:
        with _still_log(log_path):
            row, hist, outputs = _process_still(item, params, directory, row)
    except _StageError as e:
        if not params.dispatch.squash_errors:
            raise e.error
        row["status"] = FAILED
        row["reason"] = str(e)
        outputs = []
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:
        # a bug in our own per-still code: the still fails loudly (row + log
        # with traceback) but the batch goes on, as DIALS's squash_errors does
        if not params.dispatch.squash_errors:
            raise
        import traceback

        with open(log_path, "a") as fh:
            fh.write(traceback.format_exc())
        logger.warning("%s: internal error %s (traceback in %s)", item.tag, _one_line(e), log_path)
        row["status"] = FAILED
        row["reason"] = f"internal error: {_one_line(e)}"
        return row, None
    row["time_s"] = round(time.perf_counter() - t0, 3)
    program.write_json(
        done_record_path(directory, item.tag),
        {"key": key, "row": row, "outputs": outputs, "partiality_hist": hist},
    )
    return row, hist


def _process_still(item: Item, params, directory: str, row: dict):
    from dials.algorithms.indexing.stills_indexer import calc_2D_rmsd_and_displacements
    from dials.command_line.stills_process import Processor

    sp = stills_params_for(item, params)

    def stage(name, func, *args):
        try:
            return func(*args)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # recorded per still; squash_errors=False re-raises
            raise _StageError(name, e) from e

    experiments = stage("import", load_item_experiments, item, sp)
    processor = Processor(sp, composite_tag=item.tag)
    stage("pre-process", processor.pre_process, experiments)
    observed = stage("spot finding", processor.find_spots, experiments)
    row["n_spots"] = len(observed)
    hf = sp.dispatch.hit_finder
    if hf.enable and len(observed) < hf.minimum_number_of_reflections:
        row["status"] = NOT_A_HIT
        row["reason"] = f"{len(observed)} spots < hit_finder.minimum_number_of_reflections={hf.minimum_number_of_reflections}"
        return row, None, []
    if hf.enable and hf.maximum_number_of_reflections is not None and len(observed) > hf.maximum_number_of_reflections:
        row["status"] = NOT_A_HIT
        row["reason"] = f"{len(observed)} spots > hit_finder.maximum_number_of_reflections"
        return row, None, []
    experiments, indexed = stage("indexing", processor.index, experiments, observed)
    experiments, indexed = stage("refinement", processor.refine, experiments, indexed)
    row["n_indexed"] = len(indexed)
    stage("integration", processor.integrate, experiments, indexed)
    final_expts = processor.all_integrated_experiments
    integrated = processor.all_integrated_reflections
    if len(final_expts) == 0:
        raise _StageError("integration", RuntimeError("no experiment left after integration"))

    # indexed spots of the experiments that survived integration, renumbered
    kept = {e.identifier: i for i, e in enumerate(final_expts)}
    idx_tables = processor.all_indexed_reflections
    id_map = dict(idx_tables.experiment_identifiers())
    from scitbx.array_family import flex

    sel = flex.bool(len(idx_tables), False)
    new_ids = flex.int(len(idx_tables), -1)
    for old_id, ident in id_map.items():
        if ident in kept:
            s = idx_tables["id"] == old_id
            sel |= s
            new_ids.set_selected(s, kept[ident])
    idx_tables["id"] = new_ids
    indexed_kept = idx_tables.select(sel)

    # deterministic identifiers: the image tag (and lattice number)
    n_lat = len(final_expts)
    new_identifiers = [item.tag if n_lat == 1 else f"{item.tag}_{i}" for i in range(n_lat)]
    for table in (integrated, indexed_kept):
        for k in list(table.experiment_identifiers().keys()):
            del table.experiment_identifiers()[k]
    for i, (expt, ident) in enumerate(zip(final_expts, new_identifiers)):
        expt.identifier = ident
        integrated.experiment_identifiers()[i] = ident
        indexed_kept.experiment_identifiers()[i] = ident

    part_model = set_stills_partiality(final_expts, integrated)
    dq, _ = q_consistency(final_expts, indexed_kept)
    rmsd, _ = calc_2D_rmsd_and_displacements(indexed_kept)
    crystal = final_expts[0].crystal
    uc = crystal.get_unit_cell().parameters()
    part = integrated["partiality"].as_numpy_array() if "partiality" in integrated else np.zeros(0)
    hist = np.histogram(np.clip(part, 0, 1), bins=PARTIALITY_BINS)[0].tolist() if part.size else None
    row.update(
        {
            "status": INDEXED,
            "reason": "",
            "n_indexed": len(indexed_kept),
            "n_integrated": len(integrated),
            "n_lattices": n_lat,
            "space_group": str(crystal.get_space_group().info()),
            "a": uc[0], "b": uc[1], "c": uc[2], "alpha": uc[3], "beta": uc[4], "gamma": uc[5],
            "rmsd_px": float(rmsd),
            "delta_q_mean": float(np.nanmean(dq)) if dq.size else None,
            "delta_q_max": float(np.nanmax(dq)) if dq.size else None,
            "mean_partiality": float(part.mean()) if part.size else None,
            "partiality_model": part_model,
        }
    )
    threshold = params.q_consistency.max_mean_delta_q
    if threshold is not None and (row["delta_q_mean"] is None or row["delta_q_mean"] > threshold):
        row["status"] = FAILED_VALIDATION
        row["reason"] = (
            f"q-consistency: mean |dq| {row['delta_q_mean']:.5f} > "
            f"q_consistency.max_mean_delta_q={threshold}"
        )
    # write outputs, then (in the caller) the done-record
    stills_dir = os.path.join(directory, "stills")
    expt_rel = os.path.join("stills", f"{item.tag}_integrated.expt")
    refl_rel = os.path.join("stills", f"{item.tag}_integrated.refl")
    os.makedirs(stills_dir, exist_ok=True)
    program.write_experiments(os.path.join(directory, expt_rel), final_expts)
    program.write_reflections(os.path.join(directory, refl_rel), integrated)
    outputs = [expt_rel, refl_rel]
    if params.output.indexed_reflections:
        idx_rel = os.path.join("stills", f"{item.tag}_indexed.refl")
        program.write_reflections(os.path.join(directory, idx_rel), indexed_kept)
        outputs.append(idx_rel)
    row["experiments"] = expt_rel
    row["reflections"] = refl_rel
    return row, hist, outputs


# ------------------------------------------------------------------ drivers

_WORKER_CONFIG: Config | None = None


def _init_worker(config: Config) -> None:
    global _WORKER_CONFIG
    _WORKER_CONFIG = config
    # workers report through their results; DIALS output goes to per-still logs
    logging.getLogger("diffuse").handlers.clear()


def process_unit(unit: list[Item], config: Config) -> list:
    """Results [(row, hist), ...] of a work unit: one still, or one sweep."""
    if unit[0].route == ROUTE_SEQUENCE and unit[0].error is None:
        return process_sequence_unit(unit, config)
    return [process_item(it, config) for it in unit]


def _work(indexed_unit):
    i, unit = indexed_unit
    return i, process_unit(unit, _WORKER_CONFIG)


def _flatten(units, unit_results):
    return [r for res in unit_results for r in res]


def run_local(items: list[Item], config: Config, nproc: int, on_result=None) -> list:
    """Process items serially (nproc=1) or in ``nproc`` forked processes.

    Results (row, partiality histogram) come back in input order, one per
    item. ``on_result(i, row)`` is called as each row is ready.
    """
    units = group_sequences(items)
    results: list = [None] * len(units)

    def report(i, res):
        if on_result:
            for row, _ in res:
                on_result(i, row)

    if nproc <= 1 or len(units) <= 1:
        for i, unit in enumerate(units):
            results[i] = process_unit(unit, config)
            report(i, results[i])
        return _flatten(units, results)
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes=min(nproc, len(units)), initializer=_init_worker, initargs=(config,),
                  maxtasksperchild=None) as pool:
        for i, result in pool.imap_unordered(_work, list(enumerate(units)), chunksize=1):
            results[i] = result
            report(i, result)
    return _flatten(units, results)


def run_mpi(items: list[Item] | None, config: Config | None, comm, on_result=None):
    """MPI driver: rank 0 broadcasts the items; rank r takes work units r, r+size, ...

    Returns the results in input order on rank 0 and None elsewhere. The same
    :func:`process_unit` runs as in the local drivers.
    """
    items, config = comm.bcast((items, config), root=0)
    units = group_sequences(items)
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = []
    for i in range(rank, len(units), size):
        result = process_unit(units[i], config)
        mine.append((i, result))
        if on_result:
            for row, _ in result:
                on_result(i, row)
    gathered = comm.gather(mine, root=0)
    if rank != 0:
        return None
    results: list = [None] * len(units)
    for part in gathered:
        for i, result in part:
            results[i] = result
    return _flatten(units, results)


# ------------------------------------------------------------- run outputs

SUMMARY_COLUMNS = list(empty_row(Item(path="")).keys())


def write_summary(rows: list[dict], prefix: str) -> tuple[str, str]:
    """``<prefix>.csv`` and ``<prefix>.json`` with one row per input image."""
    import csv

    csv_path, json_path = prefix + ".csv", prefix + ".json"
    with program.atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
    program.write_json(json_path, {"schema": "diffuse.stills_process_summary/1", "rows": rows})
    return csv_path, json_path


def write_combined(rows: list[dict], directory: str, prefix: str) -> tuple[str, str, int]:
    """One ``.expt``/``.refl`` pair holding every still with status indexed.

    Experiments keep their identifiers (the image tags); reflection ``id``
    columns are renumbered to the combined experiment list.
    """
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList()
    tables = []
    seen = set()
    for row in rows:
        # the images of a sweep share one experiment file: take it once
        if row["status"] != INDEXED or row["experiments"] in seen:
            continue
        seen.add(row["experiments"])
        el = ExperimentList.from_file(os.path.join(directory, row["experiments"]), check_format=False)
        refl = flex.reflection_table.from_file(os.path.join(directory, row["reflections"]))
        experiments.extend(el)
        tables.append(refl)
    expt_path = os.path.join(directory, prefix + ".expt")
    refl_path = os.path.join(directory, prefix + ".refl")
    reflections = flex.reflection_table.concat(tables) if tables else flex.reflection_table()
    if tables:
        reflections.assert_experiment_identifiers_are_consistent(experiments)
    program.write_experiments(expt_path, experiments)
    program.write_reflections(refl_path, reflections)
    return expt_path, refl_path, len(experiments)


def summarise(rows: list[dict]) -> str:
    n = len(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    parts = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"{n} images: {parts}"


# ------------------------------------------------------------ sequence route

ROUTE_SEQUENCE = "sequence"


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
            and _dataset_key(prev.path) == _dataset_key(it.path)
            and abs(prev.osc_width - it.osc_width) < 1e-6
            and prev.osc_start is not None
            and it.osc_start is not None
            and abs(it.osc_start - prev.osc_start - it.osc_width) < 1e-3
        ):
            units[-1].append(it)
        else:
            units.append([it])
    return units


def build_sequence_experiments(items: list[Item]):
    """One ImageSequence experiment over the images of ``items``.

    The scan is rebuilt from each image's start angle and the detected width,
    so headers that say width 0 while the angle advances give a proper sweep.
    """
    import dxtbx
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model import ScanFactory
    from dxtbx.model.experiment_list import Experiment, ExperimentList
    from dxtbx.sequence_filenames import template_regex

    template, first = template_regex(items[0].path)
    indices = [template_regex(it.path)[1] for it in items]
    if indices != list(range(first, first + len(items))):
        raise ValueError("sequence images are not consecutively numbered")
    fmt = dxtbx.load(items[0].path)
    header_scan = fmt.get_scan()
    exposure = header_scan.get_exposure_times()[0] if header_scan is not None else 0.0
    scan = ScanFactory.make_scan(
        (first, first + len(items) - 1),
        [exposure] * len(items),
        (items[0].osc_start, items[0].osc_width),
        {i: 0.0 for i in range(first, first + len(items))},
        deg=True,
    )
    imageset = ImageSetFactory.make_sequence(
        template, indices, format_class=type(fmt), beam=fmt.get_beam(),
        detector=fmt.get_detector(), goniometer=fmt.get_goniometer(), scan=scan,
    )
    return ExperimentList([Experiment(imageset=imageset, beam=imageset.get_beam(),
                                      detector=imageset.get_detector(),
                                      goniometer=imageset.get_goniometer(), scan=scan)])


def sequence_params_for(params):
    """stills_process parameters turned back to DIALS's rotation defaults."""
    p = copy.deepcopy(params)
    p.indexing.method = "fft3d"
    p.indexing.stills.indexer = "sequences"
    p.refinement.reflections.weighting_strategy.override = None
    p.refinement.reflections.outlier.algorithm = "auto"
    p.refinement.parameterisation.scan_varying = bool(params.sequence.scan_varying)
    p.integration.integrator = "3d"
    if params.output.integrated_shoeboxes:
        p.integration.debug.output = True
        p.integration.debug.separate_files = False
        p.integration.debug.delete_shoeboxes = False
    return p


def _rotated_A(expt, frame_phi_deg: np.ndarray) -> np.ndarray:
    """Lab-frame setting matrices S R(φ) F A(φ) (n, 3, 3) at angles φ (degrees)."""
    gonio = expt.goniometer
    S = np.asarray(gonio.get_setting_rotation()).reshape(3, 3)
    F = np.asarray(gonio.get_fixed_rotation()).reshape(3, 3)
    axis = np.asarray(gonio.get_rotation_axis_datum(), dtype=float)
    axis /= np.linalg.norm(axis)
    phi = np.deg2rad(frame_phi_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = (np.eye(3)[None] + np.sin(phi)[:, None, None] * K[None]
         + (1 - np.cos(phi))[:, None, None] * (K @ K)[None])
    crystal = expt.crystal
    if crystal.num_scan_points > 0:
        arr = np.array([expt.scan.get_array_index_from_angle(float(p)) for p in frame_phi_deg])
        idx = np.clip(np.round(arr).astype(int), 0, crystal.num_scan_points - 1)
        A = np.array([np.asarray(crystal.get_A_at_scan_point(int(i))).reshape(3, 3) for i in idx])
    else:
        A = np.broadcast_to(np.asarray(crystal.get_A()).reshape(3, 3), (len(phi), 3, 3))
    return S[None] @ R @ F[None] @ A


def process_sequence_unit(items: list[Item], config: Config) -> list[tuple[dict, list[int] | None]]:
    """Import → find spots → index → refine → integrate a sweep; one row per image."""
    from dials.algorithms.indexing.indexer import Indexer
    from dials.algorithms.integration.integrator import create_integrator
    from dials.algorithms.profile_model.factory import ProfileModelFactory
    from dials.array_family import flex

    params = config.params
    directory = config.directory
    tag = f"{items[0].tag}_sequence"
    rows = [empty_row(it) for it in items]
    keys = [item_key(it, config.fingerprint) for it in items]
    group_key = hashlib.sha256("".join(keys).encode()).hexdigest()
    if not config.overwrite:
        record = read_done_record(directory, Item(path="", tag=tag), group_key)
        if record is not None:
            return [(dict(r, resumed=True), h) for r, h in zip(record["rows"], record["hists"])]
    t0 = time.perf_counter()
    seed_random_generators(tag)
    sp = sequence_params_for(params)
    stage_name = "import"
    outputs: list[str] = []
    hists: list = [None] * len(items)
    try:
        with _still_log(os.path.join(directory, "logs", f"{tag}.log")):
            experiments = build_sequence_experiments(items)
            stage_name = "spot finding"
            strong = flex.reflection_table.from_observations(experiments, sp)
            stage_name = "indexing"
            idxr = Indexer.from_parameters(strong, experiments, params=sp)
            idxr.index()
            experiments, indexed = idxr.refined_experiments, idxr.refined_reflections
            if sp.refinement.parameterisation.scan_varying:
                stage_name = "refinement"
                from dials.algorithms.refinement import RefinerFactory

                refiner = RefinerFactory.from_parameters_data_experiments(sp, indexed, experiments)
                refiner.run()
                experiments = refiner.get_experiments()
            stage_name = "integration"
            experiments = ProfileModelFactory.create(sp, experiments, indexed)
            predicted = flex.reflection_table.from_predictions_multi(
                experiments, dmin=sp.prediction.d_min, dmax=sp.prediction.d_max,
                margin=sp.prediction.margin, force_static=sp.prediction.force_static,
            )
            predicted.match_with_reference(indexed)
            integrated = create_integrator(sp, experiments, predicted).integrate()
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:
        if not params.dispatch.squash_errors:
            raise
        for row in rows:
            row["reason"] = f"{stage_name}: {_one_line(e)}"
        integrated = None
    if integrated is not None:
        expt = experiments[0]
        expt.identifier = tag
        for table in (integrated, indexed):
            for k in list(table.experiment_identifiers().keys()):
                del table.experiment_identifiers()[k]
            table.experiment_identifiers()[0] = tag
        uc = expt.crystal.get_unit_cell().parameters()
        # per-frame numbers: frame of each reflection from its z centroid
        z_idx = np.floor(indexed["xyzobs.px.value"].parts()[2].as_numpy_array()).astype(int)
        z_int = np.floor(integrated["xyzcal.px"].parts()[2].as_numpy_array()).astype(int)
        z0 = expt.scan.get_array_range()[0]
        phi_obs = np.rad2deg(indexed["xyzobs.mm.value"].parts()[2].as_numpy_array())
        # q-consistency with the rotated model at each spot's observed angle
        lab = np.zeros((len(indexed), 3))
        panels = indexed["panel"].as_numpy_array()
        xyz = indexed["xyzobs.mm.value"].as_numpy_array()
        for ip in np.unique(panels):
            sel = panels == ip
            mm = flex.vec2_double(flex.double(xyz[sel, 0].copy()), flex.double(xyz[sel, 1].copy()))
            lab[sel] = expt.detector[int(ip)].get_lab_coord(mm).as_numpy_array()
        s1 = lab / (np.linalg.norm(lab, axis=1, keepdims=True) * expt.beam.get_wavelength())
        hkl = indexed["miller_index"].as_vec3_double().as_numpy_array()
        A_lab = _rotated_A(expt, phi_obs)
        q_model = np.einsum("nij,nj->ni", A_lab, hkl)
        dq = np.linalg.norm(s1 - np.asarray(expt.beam.get_s0()) - q_model, axis=1)
        from dials.algorithms.indexing.stills_indexer import calc_2D_rmsd_and_displacements

        if "partiality" in integrated:
            part = integrated["partiality"].as_numpy_array()
        else:
            part = np.zeros(0)
        stills_dir = os.path.join(directory, "stills")
        os.makedirs(stills_dir, exist_ok=True)
        expt_rel = os.path.join("stills", f"{tag}_integrated.expt")
        refl_rel = os.path.join("stills", f"{tag}_integrated.refl")
        from dxtbx.model.experiment_list import ExperimentList

        program.write_experiments(os.path.join(directory, expt_rel), ExperimentList([expt]))
        program.write_reflections(os.path.join(directory, refl_rel), integrated)
        outputs = [expt_rel, refl_rel]
        for j, row in enumerate(rows):
            f_idx = z_idx == (z0 + j)
            f_int = z_int == (z0 + j)
            # reflections used in refinement have predictions (xyzcal) to compare with
            sub = indexed.select(flex.bool(f_idx) & indexed.get_flags(indexed.flags.used_in_refinement))
            rmsd = calc_2D_rmsd_and_displacements(sub)[0] if len(sub) and "xyzcal.px" in sub else None
            pj = part[f_int] if part.size else np.zeros(0)
            hists[j] = np.histogram(np.clip(pj, 0, 1), bins=PARTIALITY_BINS)[0].tolist() if pj.size else None
            row.update({
                "status": INDEXED,
                "reason": "",
                "n_spots": int(np.sum(np.floor(strong["xyzobs.px.value"].parts()[2].as_numpy_array()).astype(int) == z0 + j)),
                "n_indexed": int(f_idx.sum()),
                "n_integrated": int(f_int.sum()),
                "n_lattices": len(experiments),
                "space_group": str(expt.crystal.get_space_group().info()),
                "a": uc[0], "b": uc[1], "c": uc[2], "alpha": uc[3], "beta": uc[4], "gamma": uc[5],
                "rmsd_px": float(rmsd) if rmsd is not None else None,
                "delta_q_mean": float(dq[f_idx].mean()) if f_idx.any() else None,
                "delta_q_max": float(dq[f_idx].max()) if f_idx.any() else None,
                "mean_partiality": float(pj.mean()) if pj.size else None,
                "partiality_model": "dials",
                "experiments": expt_rel,
                "reflections": refl_rel,
            })
            threshold = params.q_consistency.max_mean_delta_q
            if threshold is not None and row["delta_q_mean"] is not None and row["delta_q_mean"] > threshold:
                row["status"] = FAILED_VALIDATION
                row["reason"] = f"q-consistency: mean |dq| {row['delta_q_mean']:.5f} > {threshold}"
    elapsed = round(time.perf_counter() - t0, 3)
    for row in rows:
        row["time_s"] = elapsed
    program.write_json(
        done_record_path(directory, tag),
        {"key": group_key, "rows": rows, "hists": hists, "outputs": outputs},
    )
    return list(zip(rows, hists))
