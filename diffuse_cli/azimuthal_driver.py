"""Driver of ``diffuse.azimuthal_fit``: images to profiles, fits, tables and pictures.

:func:`run_azimuthal_fit` checks the parameters, reads the mask, bins every
image (pixel geometry and binnings cached per detector, beam and mask:
:class:`GeometryCache`), fits the radial and azimuthal profiles
(:mod:`diffuse_cli.profile_fitting`) and writes per-image profile CSVs,
SasView files, plots, maps and one ``fits.csv``. Images are spread over
``nproc`` forked processes; a merged map (``merged.npz``) gives I(|q|) of the
3D data.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle

import numpy as np

from diffuse_cli import azimuthal as az
from diffuse_cli import azimuthal_pixels as azp
from diffuse_cli import dials_compat
from diffuse_cli import profile_fitting as pf
from diffuse_cli import program
from diffuse_cli.azimuthal_plots import plot_profile, plot_summary, write_maps
from diffuse_cli.azimuthal_series import SeriesValues, image_stem, series_summary_rows
from libtbx.utils import Sorry

logger = logging.getLogger("diffuse.azimuthal_fit")


def images_from_experiments(experiments):
    """(imageset, index, experiment) for every distinct image, in order."""
    from dxtbx.imageset import ImageSequence

    seen = set()
    out = []
    for expt in experiments:
        iset = expt.imageset
        if iset is None:
            continue
        if len(iset) == 1:
            indices = [0]
        elif expt.scan is not None and isinstance(iset, ImageSequence):
            from diffuse_cli.frames import FrameRef

            frames = FrameRef.from_experiment(expt)
            indices = [frames.imageset_index(a) for a in frames.array_indices()]
        else:
            indices = range(len(iset))
        for i in indices:
            key = (id(iset), i)
            if key not in seen:
                seen.add(key)
                out.append((iset, i, expt))
    return out


def external_mask(iset):
    """The imageset's attached mask (dials.apply_mask), or None."""
    if not hasattr(iset, "external_lookup"):
        return None  # a SAXS file read without dxtbx (saxs_inputs.SaxsFile)
    data = iset.external_lookup.mask.data
    if data is None or data.empty():
        return None
    return tuple(data.tile(i).data() for i in range(data.n_tiles()))


class GeometryCache:
    """Pixels and binnings per (detector, beam, mask), reused across images.

    Keeps the ``max_entries`` most recently used geometries (a 6M-pixel one
    with its binnings holds a few hundred MB).
    """

    max_entries = 2

    def __init__(self, params, user_mask):
        self.params = params
        self.user_mask = user_mask
        self.entries = []
        self.n_computed = 0

    def get(self, detector, beam, iset):
        ext = external_mask(iset)
        ext_key = iset.external_lookup.mask.filename if ext is not None else None
        for i, entry in enumerate(self.entries):
            if entry["ext_key"] == ext_key and entry["detector"] == detector and entry["beam"] == beam:
                self.entries.append(self.entries.pop(i))  # most recent last
                return entry
        self.n_computed += 1
        logger.info("Computing pixel geometry %d (%d panels)", self.n_computed, len(detector))
        pixels = azp.DetectorPixels.from_models(detector, beam)
        try:
            mask = pixels.flat_mask(self.user_mask)
            if ext is not None:
                mask &= pixels.flat_mask(ext)
        except ValueError as e:
            raise Sorry(f"mask does not fit the detector: {e}")
        entry = {"detector": detector, "beam": beam, "ext_key": ext_key, "pixels": pixels, "mask": mask,
                 "corrections": "none"}
        if self.params.corrections.apply:
            from diffuse_cli import corrections

            try:
                factors = corrections.detector_multipliers(detector, beam, corrections.CorrectionOptions())
            except ValueError as e:
                raise Sorry(f"corrections: {e}")
            entry["multiplier"] = np.asarray(factors["total"], dtype=np.float64)
            entry["corrections"] = "+".join(factors["applied"]) or "none"
            logger.info("Corrections applied (corrections.apply=True): %s; profiles in photons/µsr/s",
                        ", ".join(factors["applied"]) or "none")
        self.entries.append(entry)
        del self.entries[: -self.max_entries]
        return entry


def radial_binnings(entry, params):
    if "radial" in entry:
        return entry["radial"]
    pixels, mask = entry["pixels"], entry["mask"]
    r = params.radial
    q_range = (r.q_min, r.q_max)
    out = {"radial": az.radial_binning(pixels, mask, r.n_bins, q_range)}
    # sectors share the full profile's bins, so profiles line up
    edges = out["radial"].edges
    for sec in r.sector or []:
        if sec is None:
            continue
        centre, width = sec
        if not 0 < width <= 360:
            raise Sorry(f"radial.sector width must be in (0, 360] degrees, got {width:g}")
        label = f"radial_chi{centre:g}_w{width:g}"
        out[label] = az.radial_binning(pixels, mask, r.n_bins, (edges[0], edges[-1]), [(centre, width)])
    entry["radial"] = out
    return out


def azimuthal_targets(params, expt):
    """[(label, q_inv_angstrom, meta)] for q=, d_star=, d= and hkl=."""
    targets = []
    for q in params.q or []:
        targets.append((f"azimuthal_q{q:.4f}", float(q), {}))
    for ds in params.d_star or []:
        q = float(az.q_from_d_star(ds))
        targets.append((f"azimuthal_q{q:.4f}", q, {"d_star": ds}))
    for d in params.d or []:
        if d <= 0:
            raise Sorry("d= must be positive")
        q = float(az.q_from_d_star(1.0 / d))
        targets.append((f"azimuthal_q{q:.4f}", q, {"d": d}))
    for hkl in params.hkl or []:
        if not any(hkl):
            raise Sorry("hkl=0,0,0 is the direct beam")
        if expt.crystal is not None:
            A = np.array(expt.crystal.get_A()).reshape(3, 3)
            q = float(az.q_from_d_star(np.linalg.norm(A @ np.array(hkl, dtype=float))))
        elif params.input.cif:
            from diffuse_cli.saxs_reflections import d_spacing_from_cif

            q = float(az.q_from_d_star(1.0 / d_spacing_from_cif(params.input.cif, hkl)))
        else:
            raise Sorry("hkl= needs a crystal model: give an indexed .expt, or a CIF (input.cif=)")
        targets.append(("azimuthal_hkl{}_{}_{}".format(*hkl), q, {"hkl": tuple(hkl)}))
    return targets


def azimuthal_binning(entry, label, q, params):
    cache = entry.setdefault("azimuthal", {})
    key = (round(q, 9), params.q_tolerance, params.azimuthal.n_bins)
    if key not in cache:
        b = az.azimuthal_binning(entry["pixels"], q, params.q_tolerance, entry["mask"], params.azimuthal.n_bins)
        if b.static_counts.sum() == 0:
            logger.warning("No usable pixel within %.4g of q = %.4g Å⁻¹", params.q_tolerance, q)
        cache[key] = b
    return cache[key]


def fit_rows(base, profile_label, target_q, prof, fits):
    rows = []
    for res in fits:
        row = dict(base)
        row["profile"] = profile_label
        row["q_inv_angstrom"] = target_q
        row.update(res.row())
        rows.append(row)
    return rows


def fit_azimuthal(prof, params):
    fits = []
    ok = prof.n_pixels > 0
    for model in params.fit.azimuthal_models:
        if model == "pseudo_voigt":
            fits.append(pf.fit_pseudo_voigt_azimuthal(prof.x[ok], prof.I[ok], prof.sigma[ok], pair=params.fit.pair,
                                                      smooth_window=params.fit.smooth, significance=params.fit.significance))
        elif model == "maier_saupe":
            fits.append(pf.fit_maier_saupe(prof.x[ok], prof.I[ok], prof.sigma[ok], smooth_window=params.fit.smooth,
                                           centre=params.fit.centre, significance=params.fit.significance))
    return fits


def fit_radial(prof, params):
    if not params.fit.radial_range:
        return []
    ok = prof.n_pixels > 0
    return [pf.fit_pseudo_voigt(prof.x[ok], prof.I[ok], prof.sigma[ok], x_range=params.fit.radial_range, smooth_window=params.fit.smooth)]


def write_table(path, rows):
    if not rows:
        return
    names = []
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    with program.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        for r in rows:
            w.writerow([_cell(r.get(k, "")) for k in names])


def _cell(v):
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else f"{float(v):.8g}"
    return v


def process_merged(path, params, outdir):
    from diffuse_cli.formats.merged import read_merged

    merged = read_merged(path, fields=("I", "sigma", "counts", "h", "k", "l", "unit_cell"))
    q_range = None
    if params.radial.q_min is not None and params.radial.q_max is not None:
        q_range = (params.radial.q_min, params.radial.q_max)
    try:
        prof = az.merged_radial_profile(merged, n_bins=params.radial.n_bins, q_range=q_range)
    except ValueError as e:
        raise Sorry(f"{path}: {e}")
    stem = os.path.splitext(os.path.basename(path))[0]
    prof.write_csv(os.path.join(outdir, "profiles", f"{stem}_radial.csv"))
    if params.output.sasview:
        prof.write_sasview(os.path.join(outdir, "profiles", f"{stem}_radial.dat"))
    fits = fit_radial(prof, params)
    if params.output.plots:
        plot_profile(os.path.join(outdir, "plots", f"{stem}_radial.png"), prof, fits, f"{stem}: merged map I(|q|)")
    logger.info("Merged map %s: radial profile over %d voxels", path, int(prof.n_pixels.sum()))
    # the map's intensities were corrected by diffuse.correct before merging
    base = {"image": os.path.basename(path), "image_index": 0, params.series.name: 0.0, "corrections": "merged"}
    return fit_rows(base, "radial", float("nan"), prof, fits)


# State shared with forked workers (set before the pool starts).
_STATE: dict = {}


def process_image(ordinal: int) -> list[dict]:
    """Profiles, fits, plots and maps of image ``ordinal``; returns its fits.csv rows."""
    st = _STATE
    params, outdir, cache = st["params"], st["outdir"], st["cache"]
    iset, index, expt = st["images"][ordinal]
    rows: list[dict] = []
    stem = image_stem(iset, index)
    detector, beam = expt.detector, expt.beam
    entry = cache.get(detector, beam, iset)
    multiplier = None
    if "multiplier" in entry:  # photons/µsr/s, as diffuse.correct
        if hasattr(iset, "exposure_time"):  # SAXS file: header, else per exposure (logged once)
            t = iset.exposure_time(index) or 1.0
        else:
            try:
                t = dials_compat.exposure_time(iset, index)
            except ValueError as e:
                raise Sorry(f"corrections.apply=True needs the exposure time ({e}); or set corrections.apply=False")
        multiplier = entry["multiplier"] * (1.0 / t)
    image = azp.ImageData(program.read_raw_data(iset, index), entry["pixels"], multiplier=multiplier)
    value = st["series_values"][ordinal]
    base = {"image": os.path.basename(iset.get_path(index)), "image_index": index, params.series.name: value,
            "corrections": entry["corrections"]}

    ring_qs = []
    for label, binning in radial_binnings(entry, params).items():
        prof = binning.profile(image, params.error_model)
        prof.write_csv(os.path.join(outdir, "profiles", f"{stem}_{label}.csv"))
        if params.output.sasview:
            prof.write_sasview(os.path.join(outdir, "profiles", f"{stem}_{label}.dat"))
        fits = fit_radial(prof, params)
        rows += fit_rows(base, label, float("nan"), prof, fits)
        if params.output.plots:
            plot_profile(os.path.join(outdir, "plots", f"{stem}_{label}.png"), prof, fits, f"{stem} {label}", params.q or [])
    for label, q, meta in azimuthal_targets(params, expt):
        ring_qs.append(q)
        prof = azimuthal_binning(entry, label, q, params).profile(image, params.error_model)
        prof.write_csv(os.path.join(outdir, "profiles", f"{stem}_{label}.csv"))
        fits = fit_azimuthal(prof, params)
        for res in fits:
            if not res.success:
                logger.warning("%s %s %s: fit failed: %s", stem, label, res.model, res.message)
            elif res.significant:
                logger.info("%s %s %s: S = %.4g ± %.2g, S_data = %.4g ± %.2g (z = %.3g, significant)", stem, label,
                            res.model, res.S, res.S_error, res.S_data, res.S_data_error, res.anisotropy_z)
            else:
                logger.info("%s %s %s: anisotropy not significant (S_data = %.4g ± %.2g, z = %.3g < %g): S = 0",
                            stem, label, res.model, res.S_data, res.S_data_error, res.anisotropy_z,
                            params.fit.significance)
        rows += fit_rows(base, label, q, prof, fits)
        if params.output.plots:
            plot_profile(
                os.path.join(outdir, "plots", f"{stem}_{label}.png"),
                prof,
                fits,
                f"{stem} {label}: |q − {q:.4g}| ≤ {params.q_tolerance:g} Å⁻¹",
            )
    if params.maps.enable:
        rings = params.maps.rings if params.maps.rings else ring_qs
        write_maps(os.path.join(outdir, "maps"), stem, entry, image, params, rings)

    return rows


def run_azimuthal_fit(experiments, params) -> list[dict]:
    """Profiles and fits of every image of ``experiments`` (and of ``input.merged``); the fits.csv rows."""
    if len(experiments) == 0 and not params.input.merged and not params.input.image:
        raise Sorry("No experiments (.expt), images with a .poni, or merged map (.npz) given")
    if len(experiments) and params.input.image:
        raise Sorry("give either DIALS experiments/images or SAXS images with a .poni (input.image), not both")
    user_mask = None
    saxs = []
    if params.input.image:
        from diffuse_cli import saxs_inputs

        saxs, user_mask = saxs_inputs.saxs_images(params)
    if params.input.mask and user_mask is None:
        if not os.path.exists(params.input.mask):
            raise Sorry(f"File not found: {params.input.mask}")
        try:
            user_mask = azp.read_mask(params.input.mask)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
            raise Sorry(f"{params.input.mask}: not a DIALS mask ({type(e).__name__})")
    reserved = {"image", "image_index", "profile", "q_inv_angstrom", "corrections"} | set(pf.FitResult("x", True).row())
    if params.series.name in reserved or not params.series.name:
        raise Sorry(f"series.name={params.series.name} clashes with a column of fits.csv")
    if params.fit.radial_range and not params.fit.radial_range[0] < params.fit.radial_range[1]:
        raise Sorry("fit.radial_range must be lo,hi with lo < hi")

    outdir = params.output.directory
    for sub in ("profiles", "plots", "maps"):
        os.makedirs(os.path.join(outdir, sub), exist_ok=True)

    rows = []
    if params.input.merged:
        rows += process_merged(params.input.merged, params, outdir)

    images = images_from_experiments(experiments) + saxs
    if saxs and params.corrections.apply and saxs[0][0].exposure_time(saxs[0][1]) is None:
        logger.warning("No exposure time in the header of %s: corrected profiles are per exposure "
                       "(photons/µsr), not per second", saxs[0][0].get_path(0))
    if experiments and not images:
        raise Sorry("The experiments hold no images")
    series = SeriesValues(params)
    cache = GeometryCache(params, user_mask)
    if images:
        logger.info("%d image(s); q convention: q_inv_angstrom = 4π sinθ/λ = 2π/d", len(images))
        if not params.corrections.apply:
            logger.warning("corrections.apply=False: raw counts per pixel; the polarization and solid-angle "
                           "modulation stays in I(χ) and biases the order parameters")
    nproc = min(program.resolve_nproc(params.nproc), max(1, len(images)))
    # series values in image order (a timestamp series counts from the first
    # image) and the geometry, before the workers fork
    series_values = [series(iset, index, ordinal) for ordinal, (iset, index, _) in enumerate(images)]
    for iset, _, expt in images:
        cache.get(expt.detector, expt.beam, iset)
    _STATE.update(params=params, outdir=outdir, cache=cache, images=images, series_values=series_values)
    try:
        for image_rows in program.parallel_map(process_image, range(len(images)), nproc, desc="images", unit="image"):
            rows += image_rows
    finally:
        _STATE.clear()

    table = os.path.join(outdir, "fits.csv")
    if rows:
        write_table(table, rows)
        n_ok = sum(1 for r in rows if r["success"])
        logger.info("%d fits (%d failed) written to %s", len(rows), len(rows) - n_ok, table)
        if len(images) > 1:
            summary = os.path.join(outdir, "series_summary.csv")
            write_table(summary, series_summary_rows(rows, params.series.name))
            logger.info("Series table: %s", summary)
        if params.output.plots and len(images) > 1:
            for p in plot_summary(outdir, rows, params.series.name):
                logger.info("Summary plot: %s", p)
    elif images:
        logger.info("No fits asked for (give q=, d=, d_star=, hkl= or fit.radial_range=)")
    logger.info("Profiles in %s", os.path.join(outdir, "profiles"))
    return rows
