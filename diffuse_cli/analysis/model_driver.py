"""diffuse.model: read the map and structure factors, fit LLM or RBT, write the maps, pictures and summary.

:func:`run_model` is the program's work after the parameters are parsed
(diffuse_cli/command_line/model.py); formulas in docs/model.md.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from libtbx.utils import Sorry

from diffuse_cli import program

logger = logging.getLogger("diffuse.model")


def _check_inputs(params) -> None:
    for name in ("merged", "model", "reflections"):
        path = getattr(params.input, name)
        if path and not os.path.exists(path):
            raise Sorry(f"File not found: {path}")
    if not params.input.merged:
        raise Sorry("No merged map given (merged.npz from diffuse.merge, or input.merged=)")
    if not params.input.model and not params.input.reflections:
        raise Sorry("No structure factors: give an atomic model (.pdb/.cif, input.model=) "
                    "or integrated reflections (.refl, input.reflections=)")
    if params.model == "rbt" and not params.input.model:
        raise Sorry("model=rbt needs an atomic model (input.model=): the molecular transform "
                    "between the lattice points is not in the Bragg intensities")
    for name in ("sigma_range", "gamma_range"):
        lo, hi = getattr(params.fit, name)
        if not 0 < lo < hi:
            raise Sorry(f"fit.{name}={lo},{hi}: need 0 < lower < upper")


def _grid_ndiv(axes) -> tuple:
    return tuple(int(round(1.0 / (a[1] - a[0]))) if len(a) > 1 else 1 for a in axes)


def fit_mask(merged, s, axes, params) -> np.ndarray:
    """True where a voxel enters the fit: finite I, σ > 0, inside fit.d_min/d_max, not at integer hkl (option)."""
    I, sigma = merged["I"], merged["sigma"]
    mask = np.isfinite(I) & np.isfinite(sigma) & (sigma > 0) & (s > 0)
    if params.fit.d_min:
        mask &= s <= 1.0 / params.fit.d_min
    if params.fit.d_max:
        mask &= s >= 1.0 / params.fit.d_max
    if params.fit.exclude_integer_hkl:
        on = [np.abs(a - np.rint(a)) < 1e-6 for a in axes]
        mask &= ~(on[0][:, None, None] & on[1][None, :, None] & on[2][None, None, :])
    if mask.sum() < 20:
        raise Sorry(f"{params.input.merged}: only {int(mask.sum())} usable voxels for the fit "
                    "(finite I, sigma > 0, inside fit.d_min/fit.d_max)")
    return mask


def crop_to_fit(merged, axes, mask, margin: int = 1):
    """Arrays and axes cut to the centred box of the fit voxels plus ``margin`` lattice units."""
    keep = []
    for i, ax in enumerate(axes):
        other = tuple(j for j in range(3) if j != i)
        used = np.any(mask, axis=other)
        h_max = min(int(round(ax[-1])), int(np.ceil(np.max(np.abs(ax[used])))) + margin)
        keep.append(np.abs(ax) <= h_max + 1e-9)
    sel = np.ix_(*keep)
    out = {k: (v[sel] if isinstance(v, np.ndarray) and v.shape == mask.shape else v) for k, v in merged.items()}
    return out, tuple(ax[k] for ax, k in zip(axes, keep)), mask[sel]


def build_model(params, merged, axes, s, s_fit_max):
    """model_of(σ, γ) -> map, whether γ is a parameter, and a description of the |F|² source."""
    from diffuse_cli.analysis import motion_models as mm

    cell = merged["unit_cell"]
    sg = str(merged.get("space_group", "P1"))
    t0 = time.time()
    if params.model == "rbt":
        f2 = mm.molecular_transform_sq(params.input.model, axes, cell, sg, b_iso=params.structure_factors.b_iso)
        logger.info("Molecular transform of %s on %d voxels (%.1f s)", params.input.model, f2.size, time.time() - t0)
        return (lambda sigma, gamma: mm.rbt_intensity(f2, s, sigma)), False, str(params.input.model)
    if params.input.model:
        lattice = mm.lattice_from_model(params.input.model, axes, cell, sg, b_iso=params.structure_factors.b_iso)
        source = str(params.input.model)
    else:
        lattice = mm.lattice_from_reflections(params.input.reflections, axes, cell, sg)
        source = str(params.input.reflections)
    logger.info("|F_H|² at %d lattice points from %s (%.1f s)", int(np.count_nonzero(lattice)), source,
                time.time() - t0)
    conv = mm.LLMConvolver(lattice, _grid_ndiv(axes), cell, padding=params.llm.padding)
    logger.info("LLM convolution grid %s (padded from %s)", conv.padded, conv.shape)

    def model_of(sigma, gamma):
        x_max = float(mm.displacement_exponent(s_fit_max, sigma))
        n = mm.series_length(x_max, params.llm.series_tolerance)
        return mm.llm_intensity(conv.terms(gamma, n), s, sigma)

    return model_of, True, source


def run_model(params, diff_phil: str = "") -> dict:
    """The whole program: returns the fit summary (also written as model_fit.json)."""
    from diffuse_cli import map_output
    from diffuse_cli.analysis import model_fit, model_plots
    from diffuse_cli.analysis.isotropic import s_map
    from diffuse_cli.formats.merged import read_merged
    from diffuse_cli.formats.model_map import write_model_map
    from diffuse_cli.grid import HKLGrid

    _check_inputs(params)
    start = time.time()
    merged = read_merged(params.input.merged)
    axes = (merged["h"], merged["k"], merged["l"])
    cell = tuple(float(v) for v in merged["unit_cell"])
    ndiv = _grid_ndiv(axes)
    grid = HKLGrid(ndiv, [int(round(a[-1])) for a in axes])
    if grid.shape != merged["I"].shape:
        raise Sorry(f"{params.input.merged}: I has shape {merged['I'].shape}, its axes give {grid.shape}")
    outdir = params.output.directory
    os.makedirs(outdir, exist_ok=True)
    s = s_map(*axes, cell)
    mask = fit_mask(merged, s, axes, params)
    merged, axes, mask = crop_to_fit(merged, axes, mask)
    grid = HKLGrid(ndiv, [int(round(a[-1])) for a in axes])
    s = s_map(*axes, cell)
    logger.info("Grid cut to the fit voxels' box: %s", grid.shape)
    logger.info("%s: %d voxels, %d in the fit (d %.2f–%.2f Å)", params.input.merged, s.size, int(mask.sum()),
                1.0 / s[mask].max(), 1.0 / s[mask].min())
    model_of, has_gamma, source = build_model(params, merged, axes, s, float(s[mask].max()))
    target = model_fit.AnisotropicTarget(merged["I"], merged["sigma"], axes, cell, mask,
                                         shell_width=params.fit.shell_width, weights=params.fit.shell_weights)
    t_fit = time.time()
    fit = model_fit.fit_model(target, model_of, has_gamma, params.fit.sigma_range, params.fit.gamma_range,
                              n_scan=params.fit.n_scan, xatol=params.fit.tolerance)
    fit["model"] = params.model
    logger.info("Fit (%d model evaluations, %.1f s): sigma = %.4f ± %.4f Å%s, scale %.4g, CC_aniso %.4f",
                fit["evaluations"], time.time() - t_fit, fit["sigma"], fit["sigma_error"],
                f", gamma = {fit['gamma']:.3f} ± {fit['gamma_error']:.3f} Å" if has_gamma else "",
                fit["scale"], fit["cc_aniso"])
    for name in ("sigma", "gamma"):
        if fit.get(f"{name}_at_bound"):
            logger.warning("%s = %.4g Å is at the edge of fit.%s_range: widen the range", name, fit[name], name)

    model = fit["scale"] * model_of(fit["sigma"], fit["gamma"])
    model_map = np.where(mask, model, np.nan)
    model_aniso = np.full(s.shape, np.nan)
    model_aniso[mask] = fit["scale"] * fit["delta_model"]
    data_aniso = np.where(mask, target.data_aniso_map, np.nan)
    shells = model_fit.shell_statistics(target, s, merged["I"], model, fit["delta_model"], params.fit.n_shells)
    summary = {
        "model": params.model, "structure_factors": source, "merged": str(params.input.merged),
        "sigma_A": fit["sigma"], "sigma_error_A": fit["sigma_error"],
        "gamma_A": fit["gamma"] if has_gamma else None,
        "gamma_error_A": fit["gamma_error"] if has_gamma else None,
        "sigma_gamma_correlation": fit.get("sigma_gamma_correlation"),
        "scale": fit["scale"], "scale_error": fit["scale_error"], "chi2_nu": fit["chi2_nu"],
        "cc_aniso": fit["cc_aniso"],
        "cc_total": model_fit.pearson(merged["I"][mask].astype(np.float64), model[mask]),
        "n_fit_voxels": int(mask.sum()), "evaluations": fit["evaluations"],
        "at_bound": {"sigma": fit["sigma_at_bound"], "gamma": fit["gamma_at_bound"]},
        "units": str(merged.get("units", "")), "shells": shells,
        "run_time_s": None,
    }
    maps = {"model": model_map, "model_aniso": model_aniso, "data_aniso": data_aniso, "fit_mask": mask}
    write_model_map(os.path.join(outdir, "model.npz"), *axes, ndiv, cell, maps, fit,
                    space_group=str(merged.get("space_group", "P1")), units=str(merged.get("units", "")),
                    source=np.array(os.path.abspath(params.input.merged)),
                    source_fingerprint=np.array(program.npz_fingerprint(params.input.merged)),
                    structure_factors=np.array(source), parameters=np.array(diff_phil))
    if params.output.ccp4:
        map_output.write_ccp4(os.path.join(outdir, "model.ccp4"), grid, model_map, cell, title="diffuse.model model")
        map_output.write_ccp4(os.path.join(outdir, "model_difference.ccp4"), grid, data_aniso - model_aniso, cell,
                              title="diffuse.model data_aniso - model_aniso")
    if params.output.plots:
        label = (f"{params.model.upper()}: σ = {fit['sigma']:.3f} Å"
                 + (f", γ = {fit['gamma']:.2f} Å" if has_gamma else "") + f", CC_aniso = {fit['cc_aniso']:.3f}")
        for plane in ("hk0", "h0l", "0kl"):
            model_plots.plot_sections(os.path.join(outdir, f"model_slices_{plane}.png"), plane, axes, cell,
                                      [data_aniso, model_aniso, data_aniso - model_aniso],
                                      ["data I − I_iso", "model (scaled) M − M_iso", "difference"], label)
        model_plots.plot_shell_cc(os.path.join(outdir, "model_cc_per_shell.png"), shells, label)
    summary["run_time_s"] = round(time.time() - start, 2)
    program.write_json(os.path.join(outdir, "model_fit.json"), summary)
    logger.info("CC total %.4f; per shell (d_max–d_min Å: CC total / CC aniso):\n%s", summary["cc_total"],
                "\n".join(f"  {r['d_max']:7.2f}–{r['d_min']:5.2f}: {r['cc_total']:7.4f} / {r['cc_aniso']:7.4f}"
                          f"  ({r['n_voxels']} voxels)" for r in shells))
    logger.info("Wrote %s (model.npz, %smodel_slices_*.png, model_fit.json) in %.1f s", outdir,
                "model.ccp4, model_difference.ccp4, " if params.output.ccp4 else "", summary["run_time_s"])
    return summary
