"""The body of diffuse.correct (after parsing): see :mod:`diffuse_cli.command_line.correct`.

Per detector geometry, the correction factors (cached beside the corrected
stills); optionally a background map; per still, a corrected file that refers
to its extract's counts. The resume rule is :mod:`diffuse_cli.provenance`'s.
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import corrections, detector_corrections, dials_compat, image_read, program, provenance
from diffuse_cli.formats import background as background_format
from diffuse_cli.formats import corrected as corrected_format
from diffuse_cli.formats import extract as extract_format
from diffuse_cli.formats import factors as factors_format
from diffuse_cli.formats import geometry as geometry_format
from diffuse_cli.formats import summaries

from libtbx.utils import Sorry

logger = logging.getLogger("diffuse.correct")


def find_extracted(paths) -> list[str]:
    """Per-still extract files (sorted, unique), skipping geometry caches."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.npz")))
            files.extend(f for f in found if not os.path.basename(f).startswith("geometry_"))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise Sorry(f"File not found: {p}")
    return program.unique_paths(files)


def correction_options(params) -> detector_corrections.CorrectionOptions:
    kapton = None
    if params.kapton.apply:
        kapton = corrections.KaptonParams(
            height_above_kapton_mm=params.kapton.height_above_kapton_mm,
            thickness_mm=params.kapton.thickness_mm,
            half_width_mm=params.kapton.half_width_mm,
            rotation_angle_deg=params.kapton.rotation_angle_deg,
        )
    return detector_corrections.CorrectionOptions(
        solid_angle_exact=params.solid_angle.exact,
        polarization=params.polarization.apply,
        efficiency=params.sensor.efficiency,
        sensor_material=params.sensor.material,
        sensor_thickness_mm=params.sensor.thickness_mm,
        air=params.air.apply,
        air_pressure_kpa=params.air.pressure_kpa,
        air_temperature_k=params.air.temperature_k,
        kapton=kapton,
    )


#: parameters that change the per-detector factors (the resume rule: diffuse_cli.provenance)
FACTORS_PARAMS = ("solid_angle", "polarization", "sensor", "air", "kapton")
#: parameters that change a corrected still besides its factors and normalisation
STILL_PARAMS = ("gain", "background.mode", "background.constant", "background.constant_sigma")
#: parameters that change the background map
BACKGROUND_PARAMS = ("gain", "background.exposure_time")


# ---------------------------------------------------------------- normalisation


def read_normalisation_table(path) -> tuple[str, dict]:
    """(quantity, {image: value}) from a normalisation.table CSV.

    quantity is ``photons`` or ``pulse_energy_mj``; image keys are file names
    (``name`` or ``name:index``).
    """
    import csv

    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].lstrip().startswith("#")]
    if not rows or len(rows[0]) != 2 or rows[0][0].strip() != "image" or rows[0][1].strip() not in ("photons", "pulse_energy_mj"):
        raise Sorry(f"{path}: normalisation.table needs a header line 'image,photons' or 'image,pulse_energy_mj'")
    quantity = rows[0][1].strip()
    values = {}
    for n, r in enumerate(rows[1:], start=2):
        try:
            value = float(r[1])
        except (IndexError, ValueError):
            raise Sorry(f"{path}, line {n}: expected 'image,{quantity}' with a number")
        if not value > 0:
            raise Sorry(f"{path}, line {n}: {quantity} must be positive, got {value}")
        values[r[0].strip()] = value
    return quantity, values


def still_normalisation(header: dict, mode: str, table, table_path) -> tuple[str, float, str]:
    """(normalisation, N, source) for one still; see docs/corrections.md.

    header: the extract's ``exposure_time``, ``beam_flux``, ``wavelength``,
    ``image_path``, ``image_index``; table: (quantity, values) or None.
    """
    t, flux = header["exposure_time"], header["beam_flux"]
    if mode == "unit":
        return "unit", 1.0, "normalisation.mode=unit"
    if mode in ("auto", "exposure_time") and t > 0:
        return "exposure_time", t, "exposure time (header)"
    if mode == "exposure_time":
        raise Sorry(f"{header['path']}: no exposure time (an XFEL shot?): use normalisation.mode=auto")
    name = os.path.basename(header["image_path"])
    if table is not None:
        quantity, values = table
        value = values.get(f"{name}:{header['image_index']}", values.get(name))
        if value is not None:
            photons = value if quantity == "photons" else corrections.photons_from_pulse_energy(value, header["wavelength"])
            return "incident_photons", photons / corrections.PHOTON_UNIT, f"{table_path} ({quantity})"
    if flux > 0:
        return "incident_photons", flux / corrections.PHOTON_UNIT, "beam flux (header)"
    if mode == "incident_photons":
        where = f"no row for {name} in {table_path}" if table is not None else "no normalisation.table and no flux in the header"
        raise Sorry(f"{header['path']}: normalisation.mode=incident_photons but {where}")
    return "unit", 1.0, "none available: per shot, scale left to merge"


# ---------------------------------------------------------------- per detector


def make_factors(path, key, detector, beam, geometry_file, options, **provenance_fields) -> dict:
    """Compute and write ``factors_<key>.npz`` (schema diffuse.factors/2); returns the multipliers.

    One file per detector (and beam direction), whatever the wavelengths of
    its shots: the direction-only factors (solid angle, polarization), the
    path lengths of the λ-dependent ones (air, sensor, Kapton) and, for
    ``beam``'s wavelength (the reference), every multiplier and their
    product ``total``. Pixel positions are rebuilt from the cached ŝ1
    (detector_corrections.geometry_from_s1) after checking, on a sparse grid of pixels
    of every panel, that the experiments give the same directions as the
    cache (i.e. they are the experiments extract used).
    """
    from scitbx.array_family import flex

    cache = geometry_format.read_geometry(geometry_file)
    shapes = np.array([p.get_image_size()[::-1] for p in detector], dtype=np.int32)
    n_pix = int(np.prod(shapes, axis=1).sum())
    if cache.s1_unit.shape != (n_pix, 3) or not np.array_equal(cache.panel_shapes, shapes):
        raise Sorry(f"{geometry_file}: {len(cache.s1_unit)} pixels, but the experiment's detector has {n_pix}")
    start, err = 0, 0.0
    for panel, (n_slow, n_fast) in zip(detector, shapes):
        jj, ii = np.meshgrid(np.linspace(0, n_slow - 1, 5).astype(int), np.linspace(0, n_fast - 1, 5).astype(int), indexing="ij")
        px = flex.vec2_double(flex.double(ii.ravel() + 0.5), flex.double(jj.ravel() + 0.5))
        lab = panel.get_lab_coord(panel.pixel_to_millimeter(px)).as_numpy_array()
        ref = lab / np.linalg.norm(lab, axis=1, keepdims=True)
        got = cache.s1_unit[start + jj.ravel() * n_fast + ii.ravel()].astype(np.float64)
        err = max(err, float(np.abs(got - ref).max()))
        start += n_slow * n_fast
    if err > 1e-5:
        raise Sorry(f"{geometry_file}: pixel directions differ from the experiments' (by {err:.2g} rad)")
    try:
        view = cache.for_beam(beam)
    except ValueError as e:
        raise Sorry(f"{geometry_file}: {e}")
    geometry = detector_corrections.geometry_from_s1(detector, view.s1_unit.astype(np.float64) / view.wavelength, view.s0)
    try:
        m = detector_corrections.detector_multipliers(detector, beam, options, geometry=geometry)
        paths = detector_corrections.path_lengths(detector, beam, geometry, options)
        coefficients = detector_corrections.wavelength_coefficients(detector, beam.get_wavelength(), options)
    except ValueError as e:
        raise Sorry(str(e))
    factors_format.write_factors(path, geometry_key=key, view=view, multipliers=m,
                                  names=detector_corrections.MULTIPLIER_NAMES, paths=paths, coefficients=coefficients,
                                  **provenance_fields)
    return m


def log_factors(key: str, m: dict) -> None:
    lines = [f"Corrections for detector {key} ({len(m['total'])} pixels), multipliers min / median / max:"]
    for name in (*detector_corrections.MULTIPLIER_NAMES, "total"):
        if name != "total" and name not in m["applied"]:
            lines.append(f"  {name:12s} not applied")
            continue
        v = m[name]
        lines.append(f"  {name:12s} {v.min():.5g} / {np.median(v):.5g} / {v.max():.5g}")
    logger.info("\n".join(lines))


# ---------------------------------------------------------------- background


def _image_exposure_time(imageset, i, fallback):
    try:
        return dials_compat.exposure_time(imageset, i)
    except ValueError:
        if fallback is None:
            raise Sorry(
                f"no exposure time for background image {imageset.get_path(i)}: "
                "set background.exposure_time"
            )
        return float(fallback)


def make_background(params, path, **provenance_fields) -> dict:
    """Read the background images and write the background-rate map."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    if not params.background.images:
        raise Sorry("background.mode=map needs background.images")
    for p in params.background.images:
        if not os.path.exists(p):
            raise Sorry(f"File not found: {p}")
    expts = ExperimentListFactory.from_filenames(params.background.images)
    images, times = [], []
    for imageset in expts.imagesets():
        for i in range(len(imageset)):
            raw = image_read.raw_panels(imageset, i)  # dxtbx's values; multi-panel CBF read fast
            images.append(np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in raw]))
            times.append(_image_exposure_time(imageset, i, params.background.exposure_time))
    rate, var = corrections.background_rate(images, times, gain=params.gain)
    background_format.write_background(path, rate=rate, rate_variance=var, exposure_times=times,
                                        gain=params.gain, images=params.background.images, **provenance_fields)
    logger.info("Background map from %d images: mean rate %.4g ADU/s per pixel", len(images), rate.mean())
    return {"rate": rate, "rate_variance": var}


# ---------------------------------------------------------------- per still


def still_name(extracted_path: str) -> str:
    return os.path.splitext(os.path.basename(extracted_path))[0]


def correct_still(task: dict) -> dict:
    """Write one corrected still; returns its summary row. Runs in workers.

    The corrected file refers to the extract's counts (by relative path and
    content fingerprint) instead of copying them: writing it costs no
    recompression of six million counts.
    """
    try:
        return _correct_one(task)
    except Sorry as e:  # the batch rule: recorded, its stale output removed, the batch goes on
        if os.path.exists(task["output"]):
            os.remove(task["output"])
        return {"still": still_name(task["source"]), "status": "failed", "reason": str(e)}


#: the fields of an extract file diffuse.correct reads: /3 files keep the number of
#: counts in their header, so the 3 MB count stream of a 6M-pixel still is not read
CORRECT_READS = ("n_pixels", "mask_bits", "name", "exposure_time", "geometry_key", "image_path", "image_index",
                 "frame", "counts_n", *extract_format.SAMPLE_ARRAYS)


def _read_extract(src) -> dict:
    """The extract's arrays diffuse.correct needs: CORRECT_READS, and the counts
    themselves when the file has no count of them or no sample (/1, /2 files;
    non-integral counts)."""
    ex = extract_format.read_extract_arrays(src, fields=CORRECT_READS)
    if "counts_n" not in ex or not extract_format.has_sample(ex):
        ex.update(extract_format.read_extract_arrays(src, fields=("mask_bits", *extract_format.COUNT_ARRAYS)))
    return ex


def _sampled(factors: dict) -> dict:
    """The per-detector arrays at the sampled pixels (every SAMPLE_STRIDE-th pixel,
    formats.extract.sample_pixels), made once per detector and kept with them:
    a still's sample then gathers from 85 k contiguous values, not from 6 M (cache
    misses). ``panel_offsets`` in sampled-pixel units (ceil(offset / stride):
    sampled pixel k is in panel i when offset_i ≤ stride·k < offset_i+1)."""
    if "sampled" not in factors:
        stride = extract_format.SAMPLE_STRIDE
        factors["sampled"] = {
            "total": np.ascontiguousarray(factors["total"][::stride]),
            "direction": np.ascontiguousarray(factors["direction"][::stride]),
            "paths": {k: np.ascontiguousarray(v[::stride]) for k, v in factors["paths"].items()},
            "panel_offsets": -(-np.asarray(factors["panel_offsets"]) // stride),
        }
    return factors["sampled"]


def _correct_one(task: dict) -> dict:
    src, out = task["source"], task["output"]
    # what this needs, no more (the counts stay encoded)
    ex = _read_extract(src)
    try:
        n_used = corrections.count_used(ex["mask_bits"], ex["n_pixels"])
    except ValueError as e:
        raise Sorry(f"{src}: {e}; rerun diffuse.extract")
    if n_used != extract_format.n_counts(ex):
        raise Sorry(f"{src}: {extract_format.n_counts(ex)} counts for {n_used} used pixels")
    name = str(ex["name"]) if "name" in ex else still_name(src)
    t = float(ex["exposure_time"])
    norm = float(task["normalisation_value"])
    gain = task["gain"]
    outdir = os.path.dirname(os.path.abspath(out))
    still = dict(
        still_id=np.array(name),
        extract_file=np.array(os.path.relpath(os.path.abspath(src), outdir)),
        extract_file_absolute=np.array(os.path.abspath(src)),
        extract_fingerprint=np.array(program.npz_fingerprint(src)),
        n_pixels=np.int64(ex["n_pixels"]),
        n_used=np.int64(n_used),
        exposure_time=np.float64(t),
        normalisation=np.array(task["normalisation"]),
        normalisation_value=np.float64(norm),
        # the shot's attenuation coefficients, when not the factors file's (another wavelength)
        **({} if task["at_reference"] else {"attenuation_mu_per_mm": detector_corrections.pack_coefficients(task)}),
        gain=np.float64(gain),
        background_mode=np.array(task["background_mode"]),
        background_constant=np.float64(task["background_constant"]),
        background_constant_variance=np.float64(task["background_constant_sigma"] ** 2),
        background_file=np.array(task["background_file"]),
        geometry_key=np.array(str(ex["geometry_key"])),
        factors_file=np.array(factors_format.factors_filename(str(ex["geometry_key"]))),
        experiment_index=np.int64(task["experiment_index"]),
        image_path=np.array(str(ex["image_path"])) if "image_path" in ex else np.array(""),
        image_index=np.int64(ex["image_index"]) if "image_index" in ex else np.int64(-1),
        frame=np.int64(ex["frame"]) if "frame" in ex else np.int64(-1),
        **provenance.npz_fields(task["provenance_key"], task["provenance"]),
    )
    corrected_format.write_corrected(out, **still)
    still["schema"] = np.array(corrected_format.CORRECT_SCHEMA)
    fpath = os.path.join(outdir, str(still["factors_file"]))
    factors = corrections._cached(_WORKER_CACHE, fpath, lambda: corrections._detector_arrays(fpath))
    if task["at_reference"] != detector_corrections.same_coefficients(task, factors["reference"]):
        raise Sorry(f"{fpath} changed while diffuse.correct ran")
    background = None
    if task["background_mode"] == "map":
        bpath = os.path.join(outdir, task["background_file"])
        background = corrections._cached(_WORKER_CACHE, bpath, lambda: background_format.read_background(bpath))
    # summary figures from a sample of the used pixels (all of them cost ~0.05 s/still):
    # /3 extracts keep the sample's counts apart, older ones every 8th used pixel
    if extract_format.has_sample(ex):
        pixels = extract_format.sample_pixels(ex["mask_bits"], ex["n_pixels"])
        counts = extract_format.unpack_counts(ex, "sample")
        if len(counts) != len(pixels):
            raise Sorry(f"{src}: {len(counts)} sampled counts for {len(pixels)} sampled pixels; rerun diffuse.extract")
        at, index = _sampled(factors), pixels // extract_format.SAMPLE_STRIDE
    else:
        pixels = corrections.used_pixels(ex["mask_bits"], ex["n_pixels"])[::8]
        counts = extract_format.unpack_counts(ex)[::8]
        at, index = factors, pixels
    bg, bg_var = corrections.still_background(still, pixels, background)
    coefficients = {n: task[n] for n in detector_corrections.WAVELENGTH_COEFFICIENTS}
    if detector_corrections.same_coefficients(coefficients, factors["reference"]):
        total = at["total"][index]
    else:
        total = corrections.shot_total(at["direction"], at["paths"], coefficients, index, at["panel_offsets"])
    intensity, _ = corrections.corrected_intensity(counts, total, norm, gain=gain, background=bg, background_variance=bg_var)
    return {
        "still": still_name(src),
        "status": "corrected",
        "provenance_key": task["provenance_key"],
        "n_pixels": n_used,
        "exposure_time": t,
        "wavelength": float(task["wavelength"]),
        "normalisation": task["normalisation"],
        "normalisation_value": norm,
        "normalisation_source": task["normalisation_source"],
        "mean_I": float(np.mean(intensity)) if n_used else None,
        "median_I": float(np.median(intensity)) if n_used else None,
    }


_WORKER_CACHE: dict = {}


def run_correct(params, experiments, return_rows=True):
    """Correct the extracted stills of ``params.input.extracted``; the summary rows (or None)."""
    if len(experiments) == 0:
        raise Sorry("No experiments given (the .expt that diffuse.extract used)")
    if not params.input.extracted:
        raise Sorry("No extracted pixels given (diffuse.extract output directory or .npz files)")
    files = find_extracted(params.input.extracted)
    if not files:
        raise Sorry(f"No per-still .npz files in {', '.join(params.input.extracted)}")
    if params.gain <= 0:
        raise Sorry("gain must be positive")
    outdir = params.output.directory
    os.makedirs(outdir, exist_ok=True)
    provenance.remove_temporaries(outdir)
    _WORKER_CACHE.clear()  # factors may have changed since an earlier run() in this process
    options_ = correction_options(params)
    summary_path = os.path.join(outdir, "summary.json")

    # read the extracted headers once (scalars only): group stills by detector geometry.
    # The batch rule: an unreadable extract is a failed row, and the batch goes on.
    # Extracts are matched to experiments by identifier (their list position
    # may differ from the one diffuse.extract saw); files without one by position.
    by_identifier = {e.identifier: i for i, e in enumerate(experiments) if e.identifier}
    stills, headers, failed, foreign = [], {}, [], []
    for f in files:
        try:
            header = extract_format.read_extract_header(f)
            fingerprint = program.npz_fingerprint(f)
        except Sorry as e:
            failed.append({"still": still_name(f), "status": "failed", "reason": str(e)})
            continue
        identifier = header["experiment_identifier"]
        if identifier and by_identifier and identifier not in by_identifier:
            foreign.append(f)  # no longer among the inputs: its corrected still is stale
            continue
        idx = by_identifier[identifier] if identifier and by_identifier else header["experiment_index"]
        if not 0 <= idx < len(experiments):
            raise Sorry(f"{f}: experiment_index {idx} but the experiments hold {len(experiments)}")
        header["experiment_index"] = idx
        header["fingerprint"] = fingerprint
        stills.append((f, header["geometry_key"], idx))
        headers[f] = header
    table = None
    if params.normalisation.table is not None:
        table = read_normalisation_table(params.normalisation.table)

    # per-detector factors; the resume rule (diffuse_cli.provenance): the geometry
    # file's content, the detector and beam models, the correction parameters.
    # The batch rule: a detector whose geometry file is missing or bad fails its stills.
    keys = {}
    for f, key, idx in stills:
        keys.setdefault(key, (f, idx))
    factors_keys, bad_keys = {}, {}
    for key, (f, idx) in keys.items():
        geometry_file = geometry_format.geometry_path(os.path.dirname(os.path.abspath(f)), key)
        if not os.path.exists(geometry_file):
            bad_keys[key] = (f"File not found: {geometry_file} (diffuse.extract's pixel directions of "
                             "this detector; rerun diffuse.extract)")
            continue
        path = factors_format.factors_path(outdir, key)
        expt = experiments[idx]
        parts = {
            "schema": factors_format.FACTORS_SCHEMA,
            "formulas": detector_corrections.FORMULAS_VERSION,
            "geometry": provenance.content_fingerprint(geometry_file),
            "models": provenance.models_fingerprint(expt, ("detector", "beam")),
            "params": provenance.phil_values(params, FACTORS_PARAMS),
        }
        factors_keys[key] = provenance.key_of(parts)
        if provenance.is_current(path, factors_keys[key], params.overwrite):
            logger.info("Corrections for detector %s are up to date: %s", key, path)
            continue
        try:
            m = make_factors(path, key, expt.detector, expt.beam, geometry_file, options_,
                             **provenance.npz_fields(factors_keys[key], parts))
        except Sorry as e:
            bad_keys[key] = str(e)
            continue
        log_factors(key, m)
    for key, reason in bad_keys.items():
        logger.warning("Detector %s: %s", key, reason)
        for f in [f for f, k, _ in stills if k == key]:
            failed.append({"still": still_name(f), "status": "failed", "reason": reason})
    stills = [s for s in stills if s[1] not in bad_keys]
    keys = {k: v for k, v in keys.items() if k not in bad_keys}
    n_unreadable = len(failed)
    for row in failed:  # their old outputs would be stale
        old = os.path.join(outdir, f"{row['still']}.npz")
        if os.path.exists(old):
            os.remove(old)
    reference = {}  # each factors file's wavelength coefficients
    for key in keys:
        reference[key] = factors_format.read_factors(factors_format.factors_path(outdir, key),
                                                     fields=detector_corrections.WAVELENGTH_COEFFICIENTS)

    background_file, background_key = "", None
    if params.background.mode == "map":
        background_file = background_format.BACKGROUND_FILENAME
        bpath = os.path.join(outdir, background_file)
        for p in params.background.images:
            if not os.path.exists(p):
                raise Sorry(f"File not found: {p} (background.images)")
        parts = {
            "schema": background_format.BACKGROUND_SCHEMA,
            "images": [provenance.image_fingerprint(p) for p in params.background.images],
            "params": provenance.phil_values(params, BACKGROUND_PARAMS),
        }
        background_key = provenance.key_of(parts)
        if not provenance.is_current(bpath, background_key, params.overwrite):
            make_background(params, bpath, **provenance.npz_fields(background_key, parts))
        n_bg = int(background_format.read_background(bpath, fields=("rate",))["rate"].shape[0])
        for key in keys:
            n = int(factors_format.read_factors(factors_format.factors_path(outdir, key), fields=("total",))["total"].shape[0])
            if n_bg != n:
                raise Sorry(f"background images have {n_bg} pixels, detector {key} has {n}")

    reference_beam = {}  # /1 extracts carry no s0: their geometry's beam is theirs
    experiment_fingerprint = {}
    tasks, rows = [], []
    previous = summaries.previous_stills(summary_path, summaries.CORRECT_SUMMARY_SCHEMA, key="still")
    for f, key, idx in stills:
        header = headers[f]
        if header["s0"] is None:
            if key not in reference_beam:
                gfile = geometry_format.geometry_path(os.path.dirname(os.path.abspath(f)), key)
                reference_beam[key] = geometry_format.read_reference_beam(gfile)
            header["s0"] = reference_beam[key]
        header["wavelength"] = float(1.0 / np.linalg.norm(header["s0"]))
        normalisation, norm_value, norm_source = still_normalisation(
            header, params.normalisation.mode, table, params.normalisation.table
        )
        if background_file and normalisation != "exposure_time":
            raise Sorry(f"{f}: background.mode=map scales the background by the exposure time, and this "
                        f"still has none ({norm_source}); use background.mode=constant or none")
        try:
            coefficients = detector_corrections.wavelength_coefficients(experiments[idx].detector, header["wavelength"], options_)
        except ValueError as e:
            raise Sorry(f"{f}: {e}")
        out = os.path.join(outdir, os.path.basename(f))
        # the resume rule: the extract's content, its experiment, its factors and
        # background, its normalisation and the per-still parameters
        if idx not in experiment_fingerprint:
            experiment_fingerprint[idx] = provenance.experiment_fingerprint(experiments[idx])
        parts = {
            "schema": corrected_format.CORRECT_SCHEMA,
            "extract": header["fingerprint"],
            "experiment": experiment_fingerprint[idx],
            "experiment_index": idx,  # recorded in the output
            "factors": factors_keys[key],
            "background": background_key,
            "normalisation": [normalisation, norm_value, norm_source],
            "params": provenance.phil_values(params, STILL_PARAMS),
        }
        pkey = provenance.key_of(parts)
        name = still_name(f)
        if provenance.is_current(out, pkey, params.overwrite):
            old = previous.get(name, {})
            kept = {k: v for k, v in old.items() if k not in ("status", "reason")} if old.get("provenance_key") == pkey else {}
            rows.append({**kept, "still": name, "status": "up to date", "provenance_key": pkey})
            continue
        tasks.append(
            {
                "source": f,
                "output": out,
                "experiment_index": idx,
                "gain": float(params.gain),
                "background_mode": params.background.mode,
                "background_constant": float(params.background.constant) if params.background.mode == "constant" else 0.0,
                "background_constant_sigma": float(params.background.constant_sigma) if params.background.mode == "constant" else 0.0,
                "background_file": background_file,
                "provenance_key": pkey,
                "provenance": parts,
                "normalisation": normalisation,
                "normalisation_value": norm_value,
                "normalisation_source": norm_source,
                "wavelength": header["wavelength"],
                "at_reference": detector_corrections.same_coefficients(coefficients, reference[key]),
                **coefficients,
            }
        )
    n_skip = len(rows)
    if n_skip:
        logger.info("%d of %d stills are up to date (overwrite=True redoes them)", n_skip, len(stills))

    nproc = min(program.resolve_nproc(params.nproc), max(1, len(tasks)))
    results = program.parallel_map(correct_still, tasks, nproc, desc="correct")
    failed += [r for r in results if r["status"] == "failed"]
    results = [r for r in results if r["status"] != "failed"]
    # corrected stills of extracts no longer among the inputs (diffuse.merge reads the whole directory)
    ours = [p for p in glob.glob(os.path.join(glob.escape(outdir), "*.npz"))
            if os.path.basename(p) not in {factors_format.factors_filename(k) for k in keys}
            and os.path.basename(p) != background_format.BACKGROUND_FILENAME
            and corrected_format.is_corrected_file(p)]
    if foreign:
        logger.info("%d extracted stills are not among the experiments given: not corrected", len(foreign))
    inputs = [os.path.join(outdir, os.path.basename(f)) for f in files if f not in foreign]
    provenance.stale_outputs(ours, inputs, params.output.stale)
    rows.extend(results)
    rows.extend(failed)
    rows.sort(key=lambda r: r["still"])
    summaries.write_summary(summary_path, summaries.CORRECT_SUMMARY_SCHEMA, rows)
    kinds = {}
    for r in results:
        kinds[r["normalisation"]] = kinds.get(r["normalisation"], 0) + 1
    units = {"exposure_time": "photons/µsr/s", "incident_photons": "photons/µsr per 1e12 incident photons",
             "unit": "photons/µsr per shot (scale left to merge)"}
    logger.info(
        "Corrected %d stills (%d up to date) into %s; intensities in %s",
        len(results),
        n_skip,
        outdir,
        ", ".join(f"{units[k]} ({n})" for k, n in sorted(kinds.items())) or "-",
    )
    for r in results[:10]:
        logger.info("  %-30s %9d pixels  median I %.4g", r["still"], r["n_pixels"], r["median_I"] or 0.0)
    summaries.report_failed("diffuse.correct", failed, len(stills) + n_unreadable, summary_path)
    if not stills and not failed:
        raise Sorry(f"None of the extracted stills in {', '.join(params.input.extracted)} is among the experiments given")
    # the summary rows for Python callers; None for the console script,
    # whose return value becomes the exit status
    return rows if return_rows else None
