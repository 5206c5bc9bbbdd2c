"""What diffuse.merge's absolute scale (Krogh-Moe) will be, decided before merging
(:func:`absolute_scale_plan`): the composition, whether the Bragg peaks were masked
(from the parameters or diffuse.extract's summary) and the Wilson B (given, or from
the integrated Bragg intensities). docs/merge.md, step 8 "Absolute scale".
"""

from __future__ import annotations

import logging
import os

import numpy as np

from diffuse_cli.formats import corrected as corrected_format
from diffuse_cli.formats import summaries

logger = logging.getLogger("diffuse.merge")


def _extract_records_bragg_masks(path: str) -> bool | None:
    """diffuse.extract's ``bragg_masks`` for the extract a corrected still refers to; None if unknown."""
    from libtbx.utils import Sorry

    if corrected_format.schema_of(path) != corrected_format.CORRECT_SCHEMA:
        return None
    still = corrected_format.read_corrected(path, fields=("extract_file", "extract_file_absolute"))
    try:
        extract = corrected_format.extract_path(path, still, check=False)
    except Sorry:
        return None
    summary = os.path.join(os.path.dirname(extract), "summary.json")
    flag = summaries.read_summary(summary, summaries.EXTRACT_SUMMARY_SCHEMA).get("bragg_masks") \
        if os.path.exists(summary) else None
    return None if flag is None else bool(flag)


def _bragg_peaks_masked(a, files) -> tuple[bool, str]:
    """(masked, why) for absolute_scale.bragg_peaks (see its help)."""
    if a.bragg_peaks != "auto":
        return a.bragg_peaks == "masked", f"absolute_scale.bragg_peaks={a.bragg_peaks}"
    flag = _extract_records_bragg_masks(files[0])
    if flag is not None:
        return flag, f"diffuse.extract's summary.json: bragg_masks={str(flag).lower()}"
    if a.wilson_b is not None:
        return True, "absolute_scale.wilson_b is given"
    if corrected_format.schema_of(files[0]) == corrected_format.CORRECT_SCHEMA:
        return True, "diffuse.correct files (the default chain masks the Bragg peaks)"
    logger.warning("Absolute scale: the input files do not record whether the Bragg peaks were masked; "
                   "comparing with the total scattering sum f^2 + sum I_inc. If they were masked, set "
                   "absolute_scale.bragg_peaks=masked")
    return False, "not recorded by the input files (assumed kept)"


def _wilson_sources(a, experiments, expt_files, groups) -> list[tuple[str, list]]:
    """(reflection file, its experiments) pairs for the Wilson B estimate."""
    from libtbx.utils import Sorry

    expt_files = list(expt_files or [])
    groups = list(groups) if groups is not None else [0] * len(experiments)
    if a.wilson.reflections:
        if not os.path.exists(a.wilson.reflections):
            raise Sorry(f"File not found: {a.wilson.reflections} (absolute_scale.wilson.reflections)")
        if len(expt_files) > 1:
            raise Sorry("absolute_scale.wilson.reflections pairs with one .expt; with several, keep each "
                        ".refl beside its .expt (same stem)")
        return [(a.wilson.reflections, list(experiments))]
    pairs = []
    for k, name in enumerate(expt_files):
        refl = os.path.splitext(name)[0] + ".refl"
        if os.path.exists(refl):
            pairs.append((refl, [e for e, g in zip(experiments, groups) if g == k]))
    return pairs


def absolute_scale_plan(params, experiments, files, expt_files, groups, sg_symbol, laue) -> dict | None:
    """What the Krogh-Moe theory will be, decided before merging. None without a composition.

    Returns dict(composition (per unit cell), bragg_peaks (dict: masked, why),
    wilson_b (Å² or None), wilson (provenance dict), wilson_fit (WilsonFit or
    None), wavelength (Å, mean of the experiments' beams, or None)).
    Bragg peaks masked and no wilson_b: B from the integrated Bragg
    intensities (Wilson plot); without them, Sorry naming the parameters.
    """
    from libtbx.utils import Sorry

    from diffuse_cli import absolute_scale as absc
    from diffuse_cli import absolute_scale_wilson as absw

    a = params.absolute_scale
    if not a.composition:
        return None
    try:
        comp = absc.parse_composition(a.composition)
    except ValueError as e:
        raise Sorry(f"composition: {e}") from e
    if a.composition_per == "asu":
        z = laue.space_group.order_z()
        comp = {k: v * z for k, v in comp.items()}
    masked, why = _bragg_peaks_masked(a, files)
    wilson_b, wilson, fit = a.wilson_b, None, None
    if not masked and wilson_b:
        raise Sorry(f"absolute_scale.wilson_b is for maps whose Bragg peaks were masked, but they were "
                    f"kept ({why}); leave wilson_b unset or set absolute_scale.bragg_peaks=masked")
    if masked and wilson_b is not None:
        wilson = {"source": "absolute_scale.wilson_b", "B": float(wilson_b)}
    elif masked:
        pairs = _wilson_sources(a, experiments, expt_files, groups)
        if not pairs:
            expected = (os.path.splitext(expt_files[0])[0] + ".refl") if expt_files else "a .refl"
            raise Sorry(f"Absolute scale: the Bragg peaks were masked ({why}) and there are no integrated "
                        f"Bragg intensities ({expected} not found) to estimate the Wilson B: set "
                        "absolute_scale.wilson_b=<B in Å^2> or absolute_scale.wilson.reflections=<.refl>, "
                        "or absolute_scale.bragg_peaks=kept if the map holds the Bragg peaks")
        from dials.array_family import flex

        arrays, offset = [], 0
        for refl, expts in pairs:
            try:
                arr = absw.bragg_intensities(flex.reflection_table.from_file(refl), expts, sg_symbol)
            except ValueError as e:
                raise Sorry(f"{refl}: {e} (Wilson B for the absolute scale; or set absolute_scale.wilson_b)") from e
            arr["group"] = arr["group"] + offset
            offset += len(expts)
            arrays.append(arr)
        cat = {k: np.concatenate([x[k] for x in arrays]) for k in arrays[0]}
        try:
            fit = absw.estimate_wilson_b(cat["d_star"], cat["intensity"], comp,
                                         partiality=cat["partiality"], group=cat["group"],
                                         d_max=a.wilson.d_max, d_min=a.wilson.d_min,
                                         excitation_error=cat["excitation_error"],
                                         variance=cat["variance"], centric=cat["centric"])
        except ValueError as e:
            raise Sorry(f"Wilson B from {', '.join(r for r, _ in pairs)}: {e}; set absolute_scale.wilson_b "
                        "or absolute_scale.wilson.d_max/d_min") from e
        fit.source = ", ".join(r for r, _ in pairs)
        wilson_b, wilson = fit.B, fit.as_dict()
        logger.info("Wilson B = %.1f ± %.1f Å^2 from %d Bragg reflections of %d stills (%.2f–%.2f Å, %s)",
                    fit.B, fit.sigma_B, fit.n_reflections, fit.n_groups, fit.d_range[0], fit.d_range[1],
                    fit.source)
        if not fit.B > 0:
            raise Sorry(f"Wilson B from {fit.source} is {fit.B:.1f} Å^2 (not positive): set absolute_scale.wilson_b")
    waves = [e.beam.get_wavelength() for e in experiments if e.beam is not None]
    wavelength = float(np.mean(waves)) if waves else None
    logger.info("Absolute scale: Bragg peaks %s (%s)%s; Compton recoil %s", "masked" if masked else "kept",
                why, f", B = {wilson_b:.1f} Å^2" if masked else "",
                f"at λ = {wavelength:.4f} Å" if wavelength else "not applied (no beam model)")
    return {"composition": comp, "bragg_peaks": {"masked": masked, "why": why}, "wilson_b": wilson_b if masked else None,
            "wilson": wilson, "wilson_fit": fit, "wavelength": wavelength}
