"""The diffuse.bragg_mask driver: per-image total masks, in parallel, resumable.

Static (and dynamic) mask per detector, a peak model per sweep, then one
worker per image (:func:`run_bragg_mask`).
"""

from __future__ import annotations

import logging

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry
from scitbx.array_family import flex

from diffuse_cli import provenance
from diffuse_cli.extraction import raw_counts, trusted_mask
from diffuse_cli.formats.masks import MASK_BITS_SCHEMA, read_mask_any, write_dials_mask, write_mask_bits
from diffuse_cli.mask_bragg import (_hkl_key, estimate_bragg_shape, has_intensities, pixel_scale,
                                    predicted_bragg_mask, sample_size)
from diffuse_cli.mask_pixels import dynamic_mask, static_mask, strong_pixel_mask
from diffuse_cli.mask_plots import write_png
from diffuse_cli.mask_rotation import fit_peak_model, fitted_bragg_mask, peak_observations, rotation_bragg_mask
from diffuse_cli.mask_spots import spot_bragg_mask, spot_model, spot_profile_moments
from diffuse_cli.mask_reflections import _reflection_fingerprint, reflections_by_experiment  # noqa: F401
from diffuse_cli.mask_shoebox import shoebox_bragg_mask

logger = logging.getLogger("diffuse.masking")

# State shared with forked worker processes (set before the pool starts).
_STATE: dict = {}

# Frames the dynamic mask and the spot/peak model read, kept (read-only) for the
# per-image masks so each frame is read from disk once: {(path, file index): counts}
_FRAMES: dict = {}
FRAME_CACHE_BYTES = 256 * 2**20


def _frame_counts(imageset, image_index: int, keep: bool = True) -> np.ndarray:
    """raw_counts of one image, read once per run: kept while the kept frames fit
    FRAME_CACHE_BYTES (keep=True); keep=False hands a kept frame over (last use)."""
    try:
        file_index = int(imageset.indices()[image_index])
    except (AttributeError, IndexError):
        file_index = image_index
    key = (imageset.get_path(image_index), file_index)
    counts = _FRAMES.get(key) if keep else _FRAMES.pop(key, None)
    if counts is None:
        counts = raw_counts(imageset, image_index)
        if keep and counts.nbytes + sum(c.nbytes for c in _FRAMES.values()) <= FRAME_CACHE_BYTES:
            counts.flags.writeable = False  # shared by later readers
            _FRAMES[key] = counts
    return counts


def _image_groups(experiments):
    """Images (not lattices) to mask: name -> list of StillRef (one per lattice)."""
    from diffuse_cli.extraction import image_refs

    groups: dict[str, list] = {}
    for ref in image_refs(experiments):
        key = (ref.image_path, ref.file_index, ref.frame)
        groups.setdefault(key, []).append(ref)
    out = []
    for refs in groups.values():
        name = refs[0].name
        if len(refs) > 1:  # several lattices: drop the lattice suffix
            name = name.rsplit("_", 1)[0]
        out.append((name, refs))
    return out


def bragg_mask_for_image(refs, experiments, reflections, geometry, params, valid, counts=None, strong=None):
    """True on Bragg pixels of one image, over all its lattices; and per-lattice shapes.

    reflections: None, or ``{experiment index: reflection table}`` from
    :func:`reflections_by_experiment`. counts, strong: the image's counts and
    undilated strong pixels, for the ``peak_model=spots`` frames.
    """
    from diffuse_cli.geometry import setting_matrix

    bragg = np.zeros(geometry.n_pixels, dtype=bool)
    shapes = []
    for ref in refs:
        expt = experiments[ref.experiment_index]
        # reflections: {experiment index: its rows}, matched by identifier
        refl = None if reflections is None else reflections.get(ref.experiment_index)
        peak_model = _STATE.get("peak_models", {}).get(ref.experiment_index)
        spots = _STATE.get("spot_models", {}).get(ref.experiment_index)
        if params.method == "predicted" and ref.frame is not None and spots is not None:
            mask, counted = spot_bragg_mask(geometry, expt, ref.frame, spots, counts, valid, strong=strong)
            bragg |= mask
            shapes.append({**spots.as_dict(), "n_spots_masked": counted})
        elif params.method == "predicted" and ref.frame is not None and peak_model is not None:
            M = setting_matrix(expt.crystal, expt.goniometer, expt.scan, ref.frame)
            bragg |= fitted_bragg_mask(geometry, M, expt.crystal.get_space_group(), peak_model, select=valid)
            shapes.append(peak_model.as_dict())
        elif params.method == "predicted":
            # a sweep's frames share one estimate (from all its reflections)
            cache = _STATE.setdefault("shapes", {})
            shape = cache.get(ref.experiment_index)
            if shape is None:
                shape = cache[ref.experiment_index] = estimate_bragg_shape(
                    expt, refl, params.predicted, _STATE.get("bragg_sample"))
            sg = expt.crystal.get_space_group()
            if ref.frame is not None:
                bragg |= rotation_bragg_mask(geometry, expt, ref.frame, shape,
                                             params.predicted.n_sigma_m, select=valid)
            else:
                M = setting_matrix(expt.crystal, expt.goniometer, expt.scan, ref.frame)
                bragg |= predicted_bragg_mask(geometry, M, sg, shape, select=valid)
            shapes.append(shape.as_dict(pixel_scale(expt.detector, expt.beam)))
        else:
            bragg |= shoebox_bragg_mask(refl, geometry, ref.frame, tuple(params.shoebox.codes))
    return bragg, shapes


def _mask_provenance(refs, key) -> dict:
    """What one image's total mask depends on (see :mod:`diffuse_cli.provenance`)."""
    st = _STATE
    parts = {
        "schema": MASK_BITS_SCHEMA,
        "image": provenance.image_fingerprint(refs[0].image_path, refs[0].file_index),
        "frame": refs[0].frame,
        "static_mask": st["static_fingerprint"][key],
        "lattices": [
            {"experiment": st["experiment_fingerprint"][r.experiment_index],
             "reflections": st["reflection_fingerprint"].get(r.experiment_index)}
            for r in refs
        ],
        "params": st["params_fingerprint"],
    }
    # a still indexed without integration takes its size from the integrated sample
    if st.get("bragg_sample") is not None and any(r.experiment_index in st["uses_sample"] for r in refs):
        parts["bragg_sample"] = st["bragg_sample"].as_dict()
    # a fitted peak model depends on the sweep's other frames too
    models = [st.get("peak_model_fingerprint", {}).get(r.experiment_index) for r in refs]
    if any(models):
        parts["peak_models"] = models
    return parts


def _mask_one(job):
    """Worker: total mask of one image -> summary entry (writes the mask file).

    The batch rule (as diffuse.extract): an image that cannot be masked (its
    file missing or unreadable, its reflections unusable: any Sorry) is a
    ``status: failed`` entry with its one-line ``reason``, its old mask files
    removed (they would be stale), and the batch goes on. Other errors are bugs
    and propagate.
    """
    import os

    name, refs = job
    directory = _STATE["params"].output.directory
    entry = {"name": name, "image_path": refs[0].image_path, "image_index": refs[0].file_index,
             "frame": refs[0].frame, "mask": f"{name}.mask", "mask_bits": f"{name}_mask_bits.npz"}
    try:
        return _mask_one_entry(name, refs)
    except Sorry as e:
        for f in (entry["mask"], entry["mask_bits"]):
            if os.path.exists(os.path.join(directory, f)):
                os.remove(os.path.join(directory, f))
        return {**entry, "status": "failed", "reason": str(e)}


def _mask_one_entry(name, refs):
    import os

    st = _STATE
    params, geometry_by_key = st["params"], st["geometry"]
    experiments = st["experiments"]
    expt = experiments[refs[0].experiment_index]
    from diffuse_cli.extraction import geometry_key

    key = geometry_key(expt.detector, expt.beam)
    geometry = geometry_by_key[key].for_beam(expt.beam)  # one geometry per detector; s1 = ŝ1/λ of this shot
    static = st["static"][key]
    path = os.path.join(params.output.directory, f"{name}.mask")
    entry = {
        "name": name,
        "image_path": refs[0].image_path,
        "image_index": refs[0].file_index,
        "frame": refs[0].frame,
        "imageset_index": refs[0].image_index,
        "experiments": [r.experiment_index for r in refs],
        "mask": os.path.basename(path),
        "mask_bits": f"{name}_mask_bits.npz",
        "geometry_key": key,
    }
    bits_path = os.path.join(params.output.directory, entry["mask_bits"])
    if not os.path.isfile(refs[0].image_path):
        raise Sorry(f"File not found: {refs[0].image_path}")
    parts = _mask_provenance(refs, key)
    pkey = provenance.key_of(parts)
    entry["provenance_key"] = pkey
    # the packed copy is written last: it holds the key, so it commits the still
    if provenance.is_current(bits_path, pkey, params.output.overwrite, also=[path]):
        total = read_mask_any(bits_path)
        entry["skipped"] = True
        bragg = None
    else:
        counts = _frame_counts(expt.imageset, refs[0].image_index, keep=False)
        valid = static & trusted_mask(expt.detector, counts, geometry)
        sp = params.strong_pixels
        # spots-model frames: strong spots grown by their own peak (spot_bragg_mask), not dilated
        by_spots = any(r.experiment_index in st.get("spot_models", {}) for r in refs)
        strong0 = None
        if sp.enable and by_spots:
            strong0 = strong_pixel_mask(
                counts, valid, geometry, n_sigma_b=sp.n_sigma_b, n_sigma_s=sp.n_sigma_s,
                global_threshold=sp.global_threshold, min_local=sp.min_local, gain=sp.gain,
                min_spot_size=sp.min_spot_size, dilation_px=0,
            )
        bragg, shapes = bragg_mask_for_image(refs, experiments, st["reflections"], geometry, params, valid,
                                             counts=counts, strong=strong0)
        if strong0 is not None:
            entry["strong_only_fraction"] = float((strong0 & ~bragg).sum() / max(valid.sum(), 1))
        elif sp.enable:
            strong = strong_pixel_mask(
                counts, valid, geometry, n_sigma_b=sp.n_sigma_b, n_sigma_s=sp.n_sigma_s,
                global_threshold=sp.global_threshold, min_local=sp.min_local, gain=sp.gain,
                min_spot_size=sp.min_spot_size, dilation_px=sp.dilation_px,
            )
            entry["strong_only_fraction"] = float((strong & ~bragg).sum() / max(valid.sum(), 1))
            bragg |= strong
        total = valid & ~bragg
        write_dials_mask(path, total, geometry)
        write_mask_bits(bits_path, total, **provenance.npz_fields(pkey, parts))
        entry["bragg_shape"] = shapes
        entry["bragg_fraction"] = float((bragg & valid).sum() / max(valid.sum(), 1))
    entry["static_fraction_masked"] = float(1 - static.mean())
    entry["total_fraction_masked"] = float(1 - total.mean())
    return entry


def fit_peak_models(groups, experiments, geometry_by_key, static_by_key, params) -> dict:
    """``{experiment index: PeakModel}`` for every sweep among the images (rotation frames).

    Up to ``predicted.fit.n_images`` frames per sweep, evenly spaced; their
    spots are DIALS's dispersion-threshold pixels (the ``strong_pixels``
    thresholds, not dilated).
    """
    from diffuse_cli.extraction import geometry_key

    fit, sp = params.predicted.fit, params.strong_pixels
    reflections = _STATE.get("reflections_for_fit") or {}
    models = {}
    for index, refs in _sweep_frames(groups).items():
        expt = experiments[index]
        key = geometry_key(expt.detector, expt.beam)
        geometry = geometry_by_key[key].for_beam(expt.beam)
        pick = np.unique(np.linspace(0, len(refs) - 1, min(fit.n_images, len(refs))).round().astype(int))
        integrated = _integrated_spots(reflections.get(index), params.predicted.min_i_over_sigma)
        if integrated is not None:
            integrated, heights = integrated
        if integrated is None:
            raise Sorry(
                "The fitted Bragg peak model needs the sweep's integrated reflections: give the .refl "
                "of stills_process, or set predicted.peak_model=mosaic"
            )
        observations = []
        for i in pick:
            ref = refs[i]
            counts = _frame_counts(expt.imageset, ref.image_index)
            valid = static_by_key[key] & trusted_mask(expt.detector, counts, geometry)
            strong = strong_pixel_mask(
                counts, valid, geometry, n_sigma_b=sp.n_sigma_b, n_sigma_s=sp.n_sigma_s,
                global_threshold=sp.global_threshold, min_local=sp.min_local, gain=sp.gain,
                min_spot_size=sp.min_spot_size, dilation_px=0,
            )
            observations.append(peak_observations(geometry, expt, ref.frame, counts, valid, strong,
                                                  fit.background_size, integrated))
        model = models[index] = fit_peak_model(
            observations, n_sigma=fit.n_sigma, background_fraction=fit.background_fraction,
            outlier_sigma=fit.outlier_sigma, min_spots=fit.min_spots, reflections=heights,
        )
        d = model.as_dict()
        logger.info(
            "Peak model of experiment %d from %d spots on %d frames: sigma(h,k,l) = %s, "
            "median peak/background %.2f, mask at %.2f sigma; %d integrated reflections at %s sigma "
            "(5/50/95 %%)", index, model.n_spots, len(pick),
            np.array2string(np.sqrt(np.diag(model.covariance)), precision=4), model.peak_to_background,
            model.n_sigma, d["n_reflections"], d["n_sigma_of_reflections_percentiles_5_50_95"],
        )
    return models


def _sweep_frames(groups) -> dict[int, list]:
    """``{experiment index: its rotation-frame refs}`` over all groups (stills left out)."""
    frames_of: dict[int, list] = {}
    for _, refs in groups:
        for ref in refs:
            if ref.frame is not None:
                frames_of.setdefault(ref.experiment_index, []).append(ref)
    return frames_of


def fit_spot_models(groups, experiments, geometry_by_key, static_by_key, params, reflections) -> dict:
    """``{experiment index: SpotModel}`` for every sweep among the images (``peak_model=spots``).

    The spot's angular σ is the square root of the median
    :func:`spot_profile_moments` of the bright integrated reflections (intensity
    above the median, I/σ(I) ≥ ``min_i_over_sigma``) on up to
    ``predicted.fit.n_images`` frames of the sweep, evenly spaced.
    """
    from diffuse_cli.extraction import geometry_key

    fit, sp = params.predicted.fit, params.predicted.spots
    models = {}
    for index, refs in _sweep_frames(groups).items():
        expt = experiments[index]
        table = None if reflections is None else reflections.get(index)
        if table is None or len(table) == 0 or "intensity.sum.value" not in table:
            raise Sorry("predicted.peak_model=spots needs the sweep's integrated reflections: give the .refl "
                        "of stills_process, or set predicted.peak_model=fitted")
        key = geometry_key(expt.detector, expt.beam)
        geometry = geometry_by_key[key].for_beam(expt.beam)
        I = table["intensity.sum.value"].as_numpy_array()
        V = table["intensity.sum.variance"].as_numpy_array()
        bright = (V > 0) & (I >= params.predicted.min_i_over_sigma * np.sqrt(np.maximum(V, 0)))
        if bright.any():
            bright &= I >= np.median(I[bright])
        s1 = np.array(table["s1"], dtype=np.float64).reshape(-1, 3)[bright]
        z = table["xyzcal.px"].parts()[2].as_numpy_array()[bright]
        pick = np.unique(np.linspace(0, len(refs) - 1, min(fit.n_images, len(refs))).round().astype(int))
        moments = []
        for i in pick:
            ref = refs[i]
            counts = _frame_counts(expt.imageset, ref.image_index)
            valid = static_by_key[key] & trusted_mask(expt.detector, counts, geometry)
            moments.append(spot_profile_moments(geometry, expt, ref.frame, counts, valid, s1, z))
        moments = np.concatenate(moments) if moments else np.zeros(0)
        if moments.size < fit.min_spots:
            raise Sorry(f"Only {moments.size} spots to measure the spot width (predicted.fit.min_spots="
                        f"{fit.min_spots}); set predicted.peak_model=fitted")
        model = models[index] = spot_model(
            expt, table, background_fraction=sp.background_fraction, n_sigma_i=sp.n_sigma_i,
            unknown_quantile=sp.unknown_quantile, background_size=fit.background_size,
            sigma=float(np.sqrt(np.median(moments))))
        logger.info(
            "Spot model of experiment %d: spot sigma %.4f deg from %d spots on %d frames (DIALS sigma_b %.4f deg), "
            "rocking sigma_m %.4f deg, %d integrated reflections, mask where the spot exceeds %.3g of the background",
            index, np.degrees(model.sigma), moments.size, len(pick), expt.profile.sigma_b(deg=True),
            np.degrees(model.sigma_m), model.keys.size, model.background_fraction)
    return models


def _integrated_spots(table, min_i_over_sigma: float):
    """(miller indices, centroid z) of reflections with I/σ(I) >= min_i_over_sigma, and for
    :func:`fit_peak_model` ``{"key", "intensity", "background"}`` (None without
    intensities); None without reflections."""
    if table is None or len(table) == 0:
        return None
    heights = None
    if "intensity.sum.value" in table:
        I = table["intensity.sum.value"].as_numpy_array()
        V = table["intensity.sum.variance"].as_numpy_array()
        table = table.select(flex.bool((V > 0) & (I >= min_i_over_sigma * np.sqrt(np.maximum(V, 0)))))
    hkl = np.array(table["miller_index"], dtype=np.int64).reshape(-1, 3)
    if "intensity.sum.value" in table and "background.mean" in table:
        heights = {"key": _hkl_key(hkl), "intensity": table["intensity.sum.value"].as_numpy_array(),
                   "background": table["background.mean"].as_numpy_array()}
    return (hkl, table["xyzobs.px.value"].parts()[2].as_numpy_array()), heights


def run_bragg_mask(experiments, reflections, params, reflection_file: str = "reflections") -> list[dict]:
    """Static mask, dynamic mask and per-image total masks; returns summary entries.

    reflections: one table (or None), matched to ``experiments`` by
    identifier (:func:`reflections_by_experiment`). Resume: a still is redone
    when its provenance key (image, static mask content, experiment models,
    reflections, parameters) differs from the one in its ``_mask_bits.npz``.
    """
    import os

    from diffuse_cli import program
    from diffuse_cli.extraction import GeometryCache, geometry_key

    nproc = program.resolve_nproc(params.nproc)
    os.makedirs(params.output.directory, exist_ok=True)
    provenance.remove_temporaries(params.output.directory)
    _FRAMES.clear()
    if reflections is not None:
        reflections = reflections_by_experiment(reflections, experiments, reflection_file)
    cache = GeometryCache(params.output.directory)  # geometry_<key>.npz, which diffuse.extract reuses
    groups = _image_groups(experiments)
    group_keys = [
        geometry_key(experiments[refs[0].experiment_index].detector, experiments[refs[0].experiment_index].beam)
        for _, refs in groups
    ]
    # one static mask per detector + beam
    static_by_key, geometry_by_key, static_files = {}, {}, {}
    for (name, refs), key in zip(groups, group_keys):
        expt = experiments[refs[0].experiment_index]
        if key in static_by_key:
            continue
        logger.info("Computing pixel geometry for detector/beam %s", key)
        geometry = cache.get(expt.detector, expt.beam)
        geometry_by_key[key] = geometry
        same = [g for g, k in zip(groups, group_keys) if k == key]
        static = _static_from_first_readable(same, experiments, params, geometry)
        logger.info("Static mask: %.2f %% of %d pixels masked", 100 * (1 - static.mean()), static.size)
        if params.dynamic.enable and len(same) < params.dynamic.min_images:
            # with one or two images a Bragg peak looks like a hot pixel
            logger.warning(
                "Dynamic (hot/dead pixel) mask skipped: %d image(s), dynamic.min_images=%d",
                len(same), params.dynamic.min_images,
            )
        elif params.dynamic.enable:
            pick = np.unique(np.linspace(0, len(same) - 1, min(params.dynamic.n_images, len(same))).round().astype(int))
            def images():
                return (
                    _frame_counts(experiments[same[i][1][0].experiment_index].imageset, same[i][1][0].image_index)
                    for i in pick
                )
            dyn, stats = dynamic_mask(
                images, geometry, static,
                hot_n_sigma=params.dynamic.hot_n_sigma,
                hot_min_excess=params.dynamic.hot_min_excess,
                dead_min_expected=params.dynamic.dead_min_expected,
                filter_size=params.dynamic.filter_size,
                hot_fraction=params.dynamic.hot_fraction,
                min_hot_images=params.dynamic.min_images,
            )
            logger.info("Dynamic mask from %d images: %d hot, %d dead pixels", stats["n_images"], stats["hot"], stats["dead"])
            static &= dyn
        static_by_key[key] = static
        # output names are relative to output.directory, like the per-still masks
        fname = os.path.join(params.output.directory, params.output.static_mask)
        if static_files:
            stem, ext = os.path.splitext(fname)
            fname = f"{stem}_{key}{ext}"
        write_dials_mask(fname, static, geometry)
        static_files[key] = os.path.relpath(fname, params.output.directory)
        logger.info("Wrote static mask %s", fname)

    os.makedirs(params.output.directory, exist_ok=True)
    peak_models, spot_models = {}, {}
    if params.method == "predicted" and params.predicted.peak_model == "spots":
        spot_models = fit_spot_models(groups, experiments, geometry_by_key, static_by_key, params, reflections)
    if params.method == "predicted" and params.predicted.peak_model == "fitted":
        _STATE["reflections_for_fit"] = reflections
        try:
            peak_models = fit_peak_models(groups, experiments, geometry_by_key, static_by_key, params)
        finally:
            _STATE.clear()
    # stills indexed without integration (stills_process integration.sample): size from the sample
    bragg_sample, uses_sample = None, set()
    if params.method == "predicted" and reflections is not None:
        uses_sample = {i for i, t in reflections.items() if not has_intensities(t)}
        if uses_sample:
            bragg_sample = sample_size(experiments, reflections, params.predicted)
        if bragg_sample is not None:
            logger.info("%d stills without integrated reflections take their Bragg mask size from the %d "
                        "integrated ones: %s", len(uses_sample), bragg_sample.n_stills, bragg_sample.as_dict())
    _STATE.update(
        bragg_sample=bragg_sample, uses_sample=uses_sample,
        peak_models=peak_models, spot_models=spot_models,
        peak_model_fingerprint={
            **{i: provenance.array_fingerprint(
                m.center, m.covariance, np.array([m.n_sigma]),
                *(() if m.n_sigma_of is None else (m.hkl_keys, m.n_sigma_of)))
               for i, m in peak_models.items()},
            **{i: provenance.array_fingerprint(
                m.keys, m.intensity, m.shell_d_star, m.shell_intensity,
                np.array([m.sigma, m.sigma_m, m.background_fraction, m.background_size]))
               for i, m in spot_models.items()},
        },
        params=params, geometry=geometry_by_key, static=static_by_key,
        experiments=experiments, reflections=reflections,
        static_fingerprint={k: provenance.array_fingerprint(v) for k, v in static_by_key.items()},
        experiment_fingerprint=[provenance.experiment_fingerprint(e) for e in experiments],
        reflection_fingerprint={} if reflections is None else {
            i: _reflection_fingerprint(t, shoeboxes=params.method == "shoebox") for i, t in reflections.items()
        },
        params_fingerprint=provenance.phil_values(params, ("method", "predicted", "shoebox", "strong_pixels")),
    )
    try:
        entries = program.parallel_map(_mask_one, groups, nproc, desc="bragg_mask")
    finally:
        _STATE.clear()
        _FRAMES.clear()
    _stale_masks(params.output.directory, [e["mask_bits"] for e in entries], params.output.stale)
    failed = [e for e in entries if e.get("status") == "failed"]

    # a rerun keeps the figures of the masks it skipped
    from diffuse_cli.formats import summaries

    previous = summaries.previous_stills(params.output.summary, summaries.BRAGG_MASK_SUMMARY_SCHEMA)
    if previous:
        for e in entries:
            old = previous.get(e["name"])
            if e.get("skipped") and old is not None and old.get("provenance_key") == e["provenance_key"]:
                for k in ("bragg_shape", "bragg_fraction", "strong_only_fraction"):
                    if k in old:
                        e[k] = old[k]
    logger.info("%-32s %10s %10s", "still", "Bragg %", "masked %")
    for e in entries:
        if e.get("status") == "failed":
            logger.info("%-32s %10s %10s (failed)", e["name"], "-", "-")
            continue
        bf = e.get("bragg_fraction")
        bf = "n/a" if bf is None else f"{100 * bf:.2f}"
        logger.info("%-32s %10s %10.2f%s", e["name"], bf, 100 * e["total_fraction_masked"], " (kept)" if e.get("skipped") else "")
    summaries.write_summary(params.output.summary, summaries.BRAGG_MASK_SUMMARY_SCHEMA, entries,
                            method=params.method, static_masks=static_files)
    logger.info("Wrote %s", params.output.summary)
    summaries.report_failed("diffuse.bragg_mask", failed, len(entries), params.output.summary)
    png = params.output.png.still
    if png is not None and 0 <= png < len(entries) and entries[png].get("status") == "failed":
        logger.warning("output.png.still=%d: %s failed, no figure", png, entries[png]["name"])
    elif png is not None:
        write_png(entries, experiments, geometry_by_key, static_by_key, params)
    return entries


def _static_from_first_readable(same, experiments, params, geometry) -> np.ndarray:
    """Static mask from the first image of ``same`` (one detector's images) that reads.

    An unreadable image is left to its worker, which records it (the batch
    rule); only when none reads is the first image's Sorry raised.
    """
    from diffuse_cli import program

    first = None
    for name, refs in same:
        expt = experiments[refs[0].experiment_index]
        try:
            with program.image_errors(expt.imageset, refs[0].image_index):
                return static_mask(expt.imageset, params, geometry, refs[0].image_index,
                                   counts=_frame_counts(expt.imageset, refs[0].image_index))
        except Sorry as e:
            logger.warning("Static mask: %s skipped (%s)", name, str(e))
            first = first or e
    raise first


def _stale_masks(directory: str, current_bits: list[str], action: str) -> list[str]:
    """Masks (``<name>_mask_bits.npz`` + ``<name>.mask``) of images no longer among the inputs."""
    import glob
    import os

    ours = [
        p for p in glob.glob(os.path.join(glob.escape(directory), "*_mask_bits.npz"))
        if provenance.stored_key(p) is not None  # written by this rule, not a user's file
    ]
    keep = [os.path.join(directory, b) for b in current_bits]
    stale_bits = [p for p in ours if os.path.abspath(p) not in {os.path.abspath(k) for k in keep}]
    pickles = [p[: -len("_mask_bits.npz")] + ".mask" for p in stale_bits]
    return provenance.stale_outputs(stale_bits + [p for p in pickles if os.path.isfile(p)], [], action)
