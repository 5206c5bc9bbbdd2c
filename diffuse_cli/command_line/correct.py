"""Apply per-pixel intensity corrections to extracted diffuse pixels.

diffuse.correct reads the per-still pixel files written by diffuse.extract
(``extracted/<still>.npz``, schema diffuse.extract/1, with their
``geometry_<key>.npz``) and the experiments they came from, and writes:

- ``corrected/factors_<key>.npz``: per detector geometry, every multiplier
  array in pixel order (solid angle per microsteradian, polarization, sensor
  efficiency, air and optional Kapton absorption) and their product ``total``,
  with the pixel ``s1`` needed to rebuild q;
- ``corrected/<still>.npz`` (schema diffuse.correct/2, a few kB): the
  per-still scalars (exposure time, gain, background) and a reference to the
  extracted file whose raw counts they apply to (relative path plus content
  fingerprint). ``I = (counts − background)·total/(gain·t)`` and its Poisson
  σ are rebuilt from the two (``diffuse_cli.corrections.load_observations``),
  so keep ``extracted/`` next to ``corrected/``;
- ``corrected/background.npz`` when a background map is made from
  background images; ``corrected/summary.json`` (one row per still).

Intensities come out in photons per microsteradian per second. No rotation
Lorentz factor is applied. Formulas: docs/corrections.md; files: docs/correct.md.

A rerun skips stills whose output is newer than its inputs and was made
with the same parameters (``overwrite=True`` redoes them).

Examples::

  diffuse.correct processed/combined.expt extracted/

  diffuse.correct combined.expt extracted/ nproc=4 output.directory=corrected

  diffuse.correct combined.expt extracted/ gain=2.1 sensor.efficiency=on \\
      sensor.material=Si sensor.thickness_mm=0.45

  diffuse.correct combined.expt extracted/ background.mode=map \\
      background.images=dark_0001.cbf background.images=dark_0002.cbf

  diffuse.correct combined.expt extracted/ kapton.apply=True air.apply=False
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import corrections, dials_compat, program

from libtbx.utils import Sorry

logger = logging.getLogger("diffuse.correct")

phil_scope = program.parse_phil(
    """
input {
  extracted = None
    .type = path
    .multiple = True
    .help = "diffuse.extract output: a directory (every <still>.npz in it) or "
            "per-still .npz files. Directories and .npz files given as plain "
            "arguments land here."
}
solid_angle {
  exact = False
    .type = bool
    .help = "Integrate the solid angle over each pixel rectangle instead of "
            "A·cosψ/r² (relative difference ~(a/2r)², 1e-6 for 172 µm at 100 mm)."
    .expert_level = 1
}
polarization {
  apply = True
    .type = bool
    .help = "Divide by the polarization factor P (beam polarization normal and "
            "fraction from the experiments, DIALS convention)."
}
sensor {
  efficiency = *auto on off
    .type = choice
    .help = "Divide by the sensor absorption efficiency 1 − exp(−μt/cosψ). auto: "
            "when the panel has a thickness and mu or material (logged per "
            "detector); on: required (error otherwise); off: never."
  material = None
    .type = str
    .help = "Sensor material (e.g. Si, CdTe) overriding the panel's, for μ."
  thickness_mm = None
    .type = float(value_min=0)
    .help = "Sensor thickness (mm) overriding the panel's."
}
air {
  apply = True
    .type = bool
    .help = "Divide by the air transmission along sample-to-pixel paths."
  pressure_kpa = 101.325
    .type = float(value_min=0)
  temperature_k = 293.15
    .type = float(value_min=0)
}
kapton {
  apply = False
    .type = bool
    .help = "Divide by the transmission through Kapton tape (XFEL tape drives); "
            "DIALS fuller_kapton model, 6-13 keV."
  height_above_kapton_mm = 0.02
    .type = float
  thickness_mm = 0.05
    .type = float
  half_width_mm = 1.5875
    .type = float
  rotation_angle_deg = 1.15
    .type = float
}
gain = 1.0
  .type = float(value_min=0)
  .help = "Detector gain, ADU per photon. var(counts) = gain·counts."
background {
  mode = *none constant map
    .type = choice
    .help = "none; constant: subtract background.constant ADU from every pixel; "
            "map: subtract the mean rate of background.images times the "
            "still's exposure time."
  constant = 0.0
    .type = float
    .help = "ADU per pixel per image, for mode=constant."
  constant_sigma = 0.0
    .type = float(value_min=0)
    .help = "Uncertainty (ADU) of background.constant."
  images = None
    .type = path
    .multiple = True
    .help = "Background (no-sample) images for mode=map."
  exposure_time = None
    .type = float(value_min=0)
    .help = "Exposure time (s) of the background images, if their headers lack it."
}
overwrite = False
  .type = bool
  .help = "Redo stills whose outputs are up to date."
output {
  directory = corrected
    .type = path
}
""",
    program="correct",
)


# ---------------------------------------------------------------- inputs


def _split_args(args):
    """Turn plain directory / .npz arguments into input.extracted=... ."""
    return program.plain_args_to_phil(args, [(lambda a: os.path.isdir(a) or a.endswith(".npz"), "input.extracted")])


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


def correction_options(params) -> corrections.CorrectionOptions:
    kapton = None
    if params.kapton.apply:
        kapton = corrections.KaptonParams(
            height_above_kapton_mm=params.kapton.height_above_kapton_mm,
            thickness_mm=params.kapton.thickness_mm,
            half_width_mm=params.kapton.half_width_mm,
            rotation_angle_deg=params.kapton.rotation_angle_deg,
        )
    return corrections.CorrectionOptions(
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


def params_hash(params) -> str:
    """Hash of every parameter that changes the outputs."""
    relevant = {
        "solid_angle": params.solid_angle.exact,
        "polarization": params.polarization.apply,
        "sensor": [params.sensor.efficiency, params.sensor.material, params.sensor.thickness_mm],
        "air": [params.air.apply, params.air.pressure_kpa, params.air.temperature_k],
        "kapton": [
            params.kapton.apply,
            params.kapton.height_above_kapton_mm,
            params.kapton.thickness_mm,
            params.kapton.half_width_mm,
            params.kapton.rotation_angle_deg,
        ],
        "gain": params.gain,
        "background": [
            params.background.mode,
            params.background.constant,
            params.background.constant_sigma,
            [os.path.abspath(p) for p in params.background.images],
            params.background.exposure_time,
        ],
    }
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _up_to_date(output: str, inputs: list[str], phash: str, schema: str) -> bool:
    if not os.path.exists(output):
        return False
    mtime = os.path.getmtime(output)
    if any(os.path.getmtime(p) > mtime for p in inputs if os.path.exists(p)):
        return False
    try:
        with np.load(output, allow_pickle=False) as data:
            return str(data["schema"]) == schema and str(data["params_hash"]) == phash
    except (OSError, KeyError, ValueError):
        return False


# ---------------------------------------------------------------- per detector


def write_factors(path, key, detector, beam, geometry_file, options, phash) -> dict:
    """Compute and write ``factors_<key>.npz``; returns the multipliers.

    Pixel positions are rebuilt from the cached s1 (corrections.geometry_from_s1)
    after checking, on a sparse grid of pixels of every panel, that the
    experiments give the same directions as the cache (i.e. they are the
    experiments extract used).
    """
    from diffuse_cli.geometry import s1_from_lab
    from scitbx.array_family import flex

    cache = corrections.load_npz(geometry_file, corrections.GEOMETRY_SCHEMA)
    shapes = np.array([p.get_image_size()[::-1] for p in detector], dtype=np.int32)
    n_pix = int(np.prod(shapes, axis=1).sum())
    if cache["s1"].shape != (n_pix, 3) or not np.array_equal(cache["panel_shapes"], shapes):
        raise Sorry(f"{geometry_file}: {len(cache['s1'])} pixels, but the experiment's detector has {n_pix}")
    wavelength = beam.get_wavelength()
    start, err = 0, 0.0
    for panel, (n_slow, n_fast) in zip(detector, shapes):
        jj, ii = np.meshgrid(np.linspace(0, n_slow - 1, 5).astype(int), np.linspace(0, n_fast - 1, 5).astype(int), indexing="ij")
        px = flex.vec2_double(flex.double(ii.ravel() + 0.5), flex.double(jj.ravel() + 0.5))
        lab = panel.get_lab_coord(panel.pixel_to_millimeter(px)).as_numpy_array()
        ref = s1_from_lab(lab, wavelength)
        got = cache["s1"][start + jj.ravel() * n_fast + ii.ravel()].astype(np.float64)
        err = max(err, float(np.abs(got - ref).max() * wavelength))
        start += n_slow * n_fast
    if err > 1e-5:
        raise Sorry(f"{geometry_file}: pixel directions differ from the experiments' (by {err:.2g} rad)")
    geometry = corrections.geometry_from_s1(detector, cache["s1"], beam.get_s0())
    try:
        m = corrections.detector_multipliers(detector, beam, options, geometry=geometry)
    except ValueError as e:
        raise Sorry(str(e))
    arrays = {name: m[name].astype(np.float32) for name in corrections.MULTIPLIER_NAMES}
    program.write_npz(
        path,
        compressed=False,  # float arrays hardly compress; writing and loading stay fast
        schema=np.array(corrections.FACTORS_SCHEMA),
        geometry_key=np.array(key),
        panel_shapes=shapes,
        s1=cache["s1"].astype(np.float32),
        s0=np.asarray(cache["s0"], dtype=np.float64),
        wavelength=np.float64(cache["wavelength"]),
        total=m["total"].astype(np.float64),
        applied=np.array(m["applied"], dtype=str),
        params_hash=np.array(phash),
        **arrays,
    )
    return m


def log_factors(key: str, m: dict) -> None:
    lines = [f"Corrections for detector {key} ({len(m['total'])} pixels), multipliers min / median / max:"]
    for name in (*corrections.MULTIPLIER_NAMES, "total"):
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


def make_background(params, path, phash) -> dict:
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
            raw = imageset.get_raw_data(i)
            images.append(np.concatenate([np.asarray(r.as_numpy_array(), dtype=np.float64).ravel() for r in raw]))
            times.append(_image_exposure_time(imageset, i, params.background.exposure_time))
    rate, var = corrections.background_rate(images, times, gain=params.gain)
    program.write_npz(
        path,
        schema=np.array(corrections.BACKGROUND_SCHEMA),
        rate=rate,
        rate_variance=var,
        n_images=np.int64(len(images)),
        exposure_times=np.array(times),
        gain=np.float64(params.gain),
        images=np.array([os.path.abspath(p) for p in params.background.images], dtype=str),
        params_hash=np.array(phash),
    )
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
    src, out = task["source"], task["output"]
    ex = corrections.load_npz(src, corrections.EXTRACT_SCHEMA)
    pixels = corrections.used_pixels(ex["mask_bits"], ex["n_pixels"])
    n_used = len(pixels)
    if n_used != len(ex["counts"]):
        raise Sorry(f"{src}: {len(ex['counts'])} counts for {n_used} used pixels")
    name = str(ex["name"]) if "name" in ex else still_name(src)
    t = float(ex["exposure_time"])
    if not t > 0:
        raise Sorry(f"{src}: exposure_time must be positive, got {t}")
    gain = task["gain"]
    outdir = os.path.dirname(os.path.abspath(out))
    still = dict(
        schema=np.array(corrections.CORRECT_SCHEMA),
        still_id=np.array(name),
        extract_file=np.array(os.path.relpath(os.path.abspath(src), outdir)),
        extract_file_absolute=np.array(os.path.abspath(src)),
        extract_fingerprint=np.array(program.npz_fingerprint(src)),
        n_pixels=np.int64(ex["n_pixels"]),
        n_used=np.int64(n_used),
        exposure_time=np.float64(t),
        gain=np.float64(gain),
        k=np.float64(1.0 / (t * gain)),
        background_mode=np.array(task["background_mode"]),
        background_constant=np.float64(task["background_constant"]),
        background_constant_variance=np.float64(task["background_constant_sigma"] ** 2),
        background_file=np.array(task["background_file"]),
        geometry_key=np.array(str(ex["geometry_key"])),
        factors_file=np.array(corrections.factors_filename(str(ex["geometry_key"]))),
        experiment_index=np.int64(ex["experiment_index"]),
        image_path=np.array(str(ex["image_path"])) if "image_path" in ex else np.array(""),
        image_index=np.int64(ex["image_index"]) if "image_index" in ex else np.int64(-1),
        frame=np.int64(ex["frame"]) if "frame" in ex else np.int64(-1),
        params_hash=np.array(task["params_hash"]),
    )
    program.write_npz(out, **still)
    fpath = os.path.join(outdir, str(still["factors_file"]))
    total = corrections._cached(
        _WORKER_CACHE, fpath, lambda: corrections.load_npz(fpath, corrections.FACTORS_SCHEMA)["total"]
    )
    background = None
    if task["background_mode"] == "map":
        bpath = os.path.join(outdir, task["background_file"])
        background = corrections._cached(
            _WORKER_CACHE, bpath, lambda: corrections.load_npz(bpath, corrections.BACKGROUND_SCHEMA)
        )
    # summary figures from every 8th used pixel (the full set costs ~0.1 s/still)
    pixels = pixels[::8]
    counts = corrections.unpack_counts(ex)[::8]
    bg, bg_var = corrections.still_background(still, pixels, background)
    intensity, _ = corrections.corrected_intensity(counts, total[pixels], t, gain=gain, background=bg, background_variance=bg_var)
    return {
        "still": still_name(src),
        "status": "corrected",
        "n_pixels": n_used,
        "exposure_time": t,
        "mean_I": float(np.mean(intensity)) if n_used else None,
        "median_I": float(np.median(intensity)) if n_used else None,
    }


_WORKER_CACHE: dict = {}


# ---------------------------------------------------------------- program


@program.entry_point("correct")
def run(args=None, phil=phil_scope):
    from dials.util.options import flatten_experiments

    usage = "diffuse.correct combined.expt extracted/ [options]"
    parser = program.ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=True,
        check_format=False,
        epilog=__doc__,
    )
    raw = list(args) if args is not None else None
    import sys

    arg_list = _split_args(raw if raw is not None else sys.argv[1:])
    params, options = parser.parse_args(arg_list)
    program.configure_logging("correct", params, options)
    program.log_diff_phil(parser)

    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0:
        raise Sorry("No experiments given (the .expt that diffuse.extract used)")
    if not params.input.extracted:
        raise Sorry("No extracted pixels given (diffuse.extract output directory or .npz files)")
    files = find_extracted(params.input.extracted)
    if not files:
        raise Sorry(f"No per-still .npz files in {', '.join(params.input.extracted)}")
    if params.gain <= 0:
        raise Sorry("gain must be positive")
    expt_files = [os.path.abspath(e.filename) for e in params.input.experiments]

    outdir = params.output.directory
    os.makedirs(outdir, exist_ok=True)
    _WORKER_CACHE.clear()  # factors may have changed since an earlier run() in this process
    phash = params_hash(params)
    options_ = correction_options(params)

    # read the extracted headers once: group stills by detector geometry
    stills = []
    for f in files:
        ex = corrections.load_npz(f, corrections.EXTRACT_SCHEMA)
        idx = int(ex["experiment_index"])
        if not 0 <= idx < len(experiments):
            raise Sorry(f"{f}: experiment_index {idx} but the experiments hold {len(experiments)}")
        stills.append((f, str(ex["geometry_key"]), idx))

    # per-detector factors
    keys = {}
    for f, key, idx in stills:
        keys.setdefault(key, (f, idx))
    for key, (f, idx) in keys.items():
        geometry_file = os.path.join(os.path.dirname(os.path.abspath(f)), f"geometry_{key}.npz")
        if not os.path.exists(geometry_file):
            raise Sorry(f"File not found: {geometry_file}")
        path = os.path.join(outdir, corrections.factors_filename(key))
        expt = experiments[idx]
        if not params.overwrite and _up_to_date(path, [geometry_file, *expt_files], phash, corrections.FACTORS_SCHEMA):
            logger.info("Corrections for detector %s are up to date: %s", key, path)
            continue
        m = write_factors(path, key, expt.detector, expt.beam, geometry_file, options_, phash)
        log_factors(key, m)

    background_file = ""
    if params.background.mode == "map":
        background_file = "background.npz"
        bpath = os.path.join(outdir, background_file)
        if params.overwrite or not _up_to_date(bpath, list(params.background.images), phash, corrections.BACKGROUND_SCHEMA):
            make_background(params, bpath, phash)
        bg = corrections.load_npz(bpath, corrections.BACKGROUND_SCHEMA)
        for key in keys:
            n = int(np.load(os.path.join(outdir, corrections.factors_filename(key)))["total"].shape[0])
            if bg["rate"].shape[0] != n:
                raise Sorry(f"background images have {bg['rate'].shape[0]} pixels, detector {key} has {n}")

    tasks, rows = [], []
    for f, key, idx in stills:
        out = os.path.join(outdir, os.path.basename(f))
        inputs = [f, *expt_files, os.path.join(outdir, corrections.factors_filename(key))]
        if background_file:
            inputs.append(os.path.join(outdir, background_file))
        if not params.overwrite and _up_to_date(out, inputs, phash, corrections.CORRECT_SCHEMA):
            rows.append({"still": still_name(f), "status": "up to date"})
            continue
        tasks.append(
            {
                "source": f,
                "output": out,
                "gain": float(params.gain),
                "background_mode": params.background.mode,
                "background_constant": float(params.background.constant) if params.background.mode == "constant" else 0.0,
                "background_constant_sigma": float(params.background.constant_sigma) if params.background.mode == "constant" else 0.0,
                "background_file": background_file,
                "params_hash": phash,
            }
        )
    n_skip = len(rows)
    if n_skip:
        logger.info("%d of %d stills are up to date (overwrite=True redoes them)", n_skip, len(stills))

    nproc = min(program.resolve_nproc(params.nproc), max(1, len(tasks)))
    results = program.parallel_map(correct_still, tasks, nproc, desc="correct")
    rows.extend(results)
    rows.sort(key=lambda r: r["still"])
    program.write_json(os.path.join(outdir, "summary.json"), {"params_hash": phash, "stills": rows})
    logger.info(
        "Corrected %d stills (%d up to date) into %s; intensities in photons/µsr/s",
        len(results),
        n_skip,
        outdir,
    )
    for r in results[:10]:
        logger.info("  %-30s %9d pixels  median I %.4g", r["still"], r["n_pixels"], r["median_I"] or 0.0)
    # the summary rows for Python callers; None for the console script,
    # whose return value becomes the exit status
    return rows if args is not None else None
