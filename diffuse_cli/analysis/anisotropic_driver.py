"""diffuse.anisotropic: merged.npz → I_iso(|q|), I − I_iso with σ, punch-and-fill; npz, CCP4, PNG, CSV.

Formulas: diffuse_cli.analysis.isotropic (shells, propagation) and
diffuse_cli.analysis.fill (punch, Laplace/biharmonic fill); docs/anisotropic.md.
"""

from __future__ import annotations

import csv
import logging
import os
import time

import numpy as np
from libtbx.utils import Sorry

from diffuse_cli import program

logger = logging.getLogger("diffuse.anisotropic")

#: shells and fill: the scope ``anisotropic`` of diffuse.anisotropic and diffuse.pdf
ANISOTROPIC_PHIL = """
shells {
  n_shells = None
    .type = int(value_min=1)
    .help = "Equal |q| shells from 0 to the largest measured |q|. Overrides width."
  width = None
    .type = float(value_min=0)
    .help = "Shell width in |q| = 1/d (Å⁻¹). Default: the smallest voxel step along a*, b*, c*."
  weights = *volume inverse_variance
    .type = choice
    .help = "Shell mean: plain spherical average (volume, as Lunus anisolt) or 1/σ² weighted"
            " (biased low when σ grows with I, as for counts)."
}
fill {
  enable = True
    .type = bool
    .help = "Fill punched and unmeasured voxels (up to the largest measured |q|) of the "
            "anisotropic map; written as I_aniso_filled (the ΔPDF uses it)."
  punch_radius = None
    .type = float(value_min=0)
    .help = "Also punch voxels within this distance of integer hkl (Miller-index units, "
            "‖h − round(h)‖ ≤ radius; 0 = the integer voxels only). None: no punch."
  method = laplace *biharmonic
    .type = choice
    .help = "laplace: ∇²f = 0 in the holes; biharmonic: minimum curvature (∇⁴f = 0), "
            "more accurate for smooth maps. docs/anisotropic.md."
  completeness = 0.9
    .type = float(value_min=0, value_max=1)
    .help = "Fill (and let diffuse.pdf transform) only up to the |q| where a shell first has fewer "
            "than this fraction of its voxels measured: beyond, gaps are too large to interpolate."
  d_min = None
    .type = float(value_min=0)
    .help = "Fill limit as a resolution (Å) instead of the completeness rule."
  tolerance = 1e-8
    .type = float(value_min=0)
    .help = "Relative residual at which the conjugate-gradient solve stops."
  max_iterations = 5000
    .type = int(value_min=1)
}
"""


def _grid_of(h, k, l, ndiv):
    """The HKLGrid of merged.npz axes (checked: the axes must be that grid's)."""
    from diffuse_cli.grid import HKLGrid

    hkl_max = [int(round(float(np.max(a)))) for a in (h, k, l)]
    grid = HKLGrid(np.asarray(ndiv).ravel(), hkl_max)
    for a, b in zip(grid.axes(), (h, k, l)):
        if len(a) != len(b) or not np.allclose(a, b):
            raise Sorry("map axes h, k, l are not an HKLGrid (−h_max..h_max in steps of 1/ndiv)")
    return grid


def compute(merged: dict, scope) -> tuple[dict, dict]:
    """The anisotropic map (isotropic.anisotropic_map) and its fill (fill.punch_and_fill) of a merged dict."""
    from diffuse_cli.analysis import fill as fill_mod
    from diffuse_cli.analysis.isotropic import anisotropic_map, s_map

    h, k, l, cell = merged["h"], merged["k"], merged["l"], merged["unit_cell"]
    t0 = time.perf_counter()
    s = s_map(h, k, l, cell)
    try:
        res = anisotropic_map(merged["I"], merged["sigma"], h, k, l, cell, s=s,
                              n_shells=scope.shells.n_shells, shell_width=scope.shells.width,
                              weights=scope.shells.weights)
    except ValueError as e:
        raise Sorry(f"anisotropic map: {e}") from None
    logger.info("I_iso in %d shells of %.4g Å⁻¹ (%.1f s)", len(res["I_iso"]),
                res["s_edges"][1] - res["s_edges"][0], time.perf_counter() - t0)
    aniso = res["I_aniso"].astype(np.float64)
    if scope.fill.enable:
        t0 = time.perf_counter()
        if scope.fill.d_min:
            s_limit = 1.0 / scope.fill.d_min
        else:
            s_limit = fill_mod.complete_limit(np.isfinite(aniso), s, res["s_edges"][1] - res["s_edges"][0],
                                              scope.fill.completeness)
        if s_limit > 0:
            logger.info("Fill limit |q| = %.4g Å⁻¹ (d = %.3g Å)", s_limit, 1.0 / s_limit)
        else:
            logger.warning("No |q| shell is %.0f %% measured: nothing is filled (lower "
                           "anisotropic.fill.completeness or set anisotropic.fill.d_min)",
                           100 * scope.fill.completeness)
        try:
            fl = fill_mod.punch_and_fill(aniso, h, k, l, cell, radius=scope.fill.punch_radius, s_limit=s_limit,
                                         method=scope.fill.method, tol=scope.fill.tolerance,
                                         max_iterations=scope.fill.max_iterations, s=s)
        except ValueError as e:
            raise Sorry(f"fill: {e}") from None
        logger.info("Filled %d voxels (%d punched; %s, %d CG iterations, residual %.2g; %d unfillable) in %.1f s",
                    int(fl["filled_mask"].sum()), int(fl["punched"].sum()), scope.fill.method,
                    fl["iterations"], fl["residual"], fl["n_unfillable"], time.perf_counter() - t0)
    else:
        fl = {"filled": aniso, "filled_mask": np.zeros(aniso.shape, dtype=bool),
              "punched": np.zeros(aniso.shape, dtype=bool), "n_unfillable": 0, "iterations": 0,
              "residual": 0.0, "s_limit": float(s[np.isfinite(aniso)].max())}
    return res, fl


def statistics(res: dict, fl: dict) -> dict:
    """Summary numbers: z = ΔI/σ_Δ over measured voxels (for an isotropic map mean 0, ⟨z²⟩ 1)."""
    sig = res["sigma_aniso"].astype(np.float64)
    ok = np.isfinite(res["I_aniso"]) & (sig > 0)       # σ_Δ = 0: a shell of one voxel, ΔI = 0
    z = res["I_aniso"][ok].astype(np.float64) / sig[ok]
    return {
        "n_measured": int(z.size), "n_shells": int(len(res["I_iso"])),
        "shell_width_inv_A": float(res["s_edges"][1] - res["s_edges"][0]),
        "z_mean": float(z.mean()) if z.size else None,
        "z_rms": float(np.sqrt(np.mean(z * z))) if z.size else None,
        "n_filled": int(fl["filled_mask"].sum()), "n_punched": int(fl["punched"].sum()),
        "n_unfillable": int(fl["n_unfillable"]), "fill_iterations": int(fl["iterations"]),
        "fill_residual": float(fl["residual"]), "fill_s_limit_inv_A": float(fl["s_limit"]),
    }


def write_shells_csv(path, res: dict) -> None:
    """isotropic.csv: one row per shell (|q| = 1/d in Å⁻¹; I in map units)."""
    with program.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["s_min_inv_A", "s_max_inv_A", "s_mean_inv_A", "I_iso", "sigma_iso", "n_voxels", "chi2"])
        e = res["s_edges"]
        for i in range(len(res["I_iso"])):
            w.writerow([f"{e[i]:.6g}", f"{e[i + 1]:.6g}", f"{res['s_mean'][i]:.6g}", f"{res['I_iso'][i]:.6g}",
                        f"{res['sigma_iso'][i]:.6g}", int(res["n_voxels"][i]), f"{res['chi2'][i]:.6g}"])


def plot_iso(path, res: dict, units: str) -> None:
    """I_iso(|q|) with ±σ against |q| = 1/d (Å⁻¹)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = np.isfinite(res["I_iso"])
    s, I, sig = res["s_mean"][ok], res["I_iso"][ok], res["sigma_iso"][ok]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.fill_between(s, I - sig, I + sig, color="0.7", lw=0, label="±σ")
    ax.plot(s, I, "k-", lw=1, label="I_iso (weighted shell mean)")
    ax.set_xlabel("|q| = d* = 1/d (Å⁻¹)")
    ax.set_ylabel(f"I_iso ({units.split(' (')[0] or 'map units'})")
    ax.set_title("Isotropic component")
    ax.legend(fontsize=8)
    program.save_figure(path, fig)


def run(params) -> dict:
    """The program: read params.input.merged, write everything into params.output.directory."""
    from diffuse_cli import map_output
    from diffuse_cli.formats import analysis_maps
    from diffuse_cli.formats.merged import read_merged

    path = params.input.merged
    if not path:
        raise Sorry("No merged map given (merged.npz from diffuse.merge)")
    out = params.output.directory
    program.check_output_path(out, "output.directory")
    merged = read_merged(path)
    units = str(merged.get("units", ""))
    grid = _grid_of(merged["h"], merged["k"], merged["l"], merged.get("ndiv", [1, 1, 1]))
    if merged["I"].shape != grid.shape:
        raise Sorry(f"{path}: I has shape {merged['I'].shape}, axes give {grid.shape}")
    logger.info("Read %s: grid %s (%d voxels), ndiv %s, units %s", path, grid.shape, grid.n_voxels,
                grid.ndiv, units or "not recorded")
    res, fl = compute(merged, params.anisotropic)
    os.makedirs(out, exist_ok=True)
    cell = merged["unit_cell"]
    npz = os.path.join(out, "anisotropic.npz")
    analysis_maps.write_anisotropic(
        npz, merged["h"], merged["k"], merged["l"], grid.ndiv, cell, res, fl, counts=merged.get("counts"),
        space_group=str(merged.get("space_group", "P1")), laue_group=str(merged.get("laue_group", "")),
        units=units, source=os.path.abspath(path), source_fingerprint=program.npz_fingerprint(path))
    map_output.write_ccp4(os.path.join(out, "anisotropic.ccp4"), grid, res["I_aniso"], cell,
                          title="diffuse.anisotropic I - I_iso")
    if params.anisotropic.fill.enable:
        map_output.write_ccp4(os.path.join(out, "anisotropic_filled.ccp4"), grid, fl["filled"], cell,
                              title="diffuse.anisotropic filled I - I_iso")
    for plane in ("hk0", "h0l", "0kl"):
        map_output.plot_section(os.path.join(out, f"anisotropic_{plane}.png"), grid, res["I_aniso"], cell,
                                plane, title=f"I − I_iso, {plane} section", percentiles=(2.0, 98.0))
    plot_iso(os.path.join(out, "I_iso.png"), res, units)
    write_shells_csv(os.path.join(out, "isotropic.csv"), res)
    stats = statistics(res, fl)
    stats.update(source=os.path.abspath(path), units=units)
    program.write_json(os.path.join(out, "anisotropic.json"), stats)
    logger.info("Anisotropic map: ⟨ΔI/σ⟩ = %.3f, rms ΔI/σ = %.3f over %d voxels",
                stats["z_mean"], stats["z_rms"], stats["n_measured"])
    logger.info("Wrote anisotropic.npz, anisotropic.ccp4, slices, I_iso.png, isotropic.csv, anisotropic.json in %s",
                out)
    return stats
