"""diffuse.pdf: anisotropic.npz (or merged.npz) → 3D-ΔPDF and Patterson; npz, CCP4, PNG, features CSV/JSON.

Formulas: diffuse_cli.analysis.pdf (transform, taper, grid); docs/pdf.md.
"""

from __future__ import annotations

import csv
import logging
import os
import time

import numpy as np
from libtbx.utils import Sorry

from diffuse_cli import program

logger = logging.getLogger("diffuse.pdf")

PDF_PHIL = """
d_min = None
  .type = float(value_min=0)
  .help = "Cut-off and end of the taper (Å; s_max = 1/d_min). Default: the fill limit of the "
          "anisotropic map (its fill.completeness rule), at most the sphere inscribed in the grid box."
taper_start = 0.5
  .type = float(value_min=0, value_max=1)
  .help = "The radial cosine taper starts at taper_start × s_max (1: no taper, sharp cut-off)."
patterson = True
  .type = bool
  .help = "Also the Patterson of the total (filled) map I_aniso_filled + I_iso."
features {
  n = 20
    .type = int(value_min=0)
    .help = "Number of strongest ΔPDF extrema listed (one of each ± pair)."
  min_distance = None
    .type = float(value_min=0)
    .help = "Leave out vectors shorter than this (Å). Default: 1/s_max, the resolution of the "
            "transform (the origin peak's width)."
}
"""


def _is_absolute(units: str) -> bool:
    return units.startswith("electron units")


def pdf_units(units: str) -> str:
    """Units of P: e²/Å³ for maps in electron units per unit cell, else (map units)·Å⁻³."""
    return "e^2/A^3" if _is_absolute(units) else f"({units or 'map units'}) x A^-3"


def read_input(path, params) -> dict:
    """anisotropic.npz as is; merged.npz through the anisotropic step (params.anisotropic)."""
    from diffuse_cli.analysis import anisotropic_driver
    from diffuse_cli.formats import analysis_maps

    schema, a = analysis_maps.read_anisotropic_or_merged(path)
    if schema == analysis_maps.ANISOTROPIC_SCHEMA:
        a["shells"] = (a["shell_s_mean"], a["shell_I_iso"])
        return a
    merged = a
    anisotropic_driver._grid_of(merged["h"], merged["k"], merged["l"], merged.get("ndiv", [1, 1, 1]))
    res, fl = anisotropic_driver.compute(merged, params.anisotropic)
    return {"I_aniso": res["I_aniso"], "I_aniso_filled": fl["filled"], "I_iso_map": res["I_iso_map"],
            "h": merged["h"], "k": merged["k"], "l": merged["l"], "unit_cell": merged["unit_cell"],
            "ndiv": merged.get("ndiv", np.ones(3)), "units": merged.get("units", ""),
            "shells": (res["s_mean"], res["I_iso"]), "fill_s_limit": fl["s_limit"]}


def total_map(a: dict, s) -> np.ndarray:
    """I_aniso_filled + I_iso(|q|) (I_iso interpolated from the shells at filled voxels too); s = |q| map."""
    s_mean, I_iso = (np.asarray(v, dtype=np.float64) for v in a["shells"])
    ok = np.isfinite(I_iso) & np.isfinite(s_mean)
    iso = np.interp(s, s_mean[ok], I_iso[ok])
    return np.asarray(a["I_aniso_filled"], dtype=np.float64) + iso


def write_real_ccp4(path, P, ndiv, unit_cell, title: str) -> None:
    """Real-space map as CCP4/MRC (iotbx.ccp4_map): the cell is the grid's extent, ndiv_a × a (Å),
    with the origin u = 0 at grid index 0 (the array runs from −(N−1)/2 to (N−1)/2)."""
    import iotbx.ccp4_map
    from cctbx import sgtbx, uctbx
    from scitbx.array_family import flex

    P = np.asarray(P, dtype=np.float64)
    half = [(n - 1) // 2 for n in P.shape]
    data = flex.double(np.ascontiguousarray(P).ravel())
    data.reshape(flex.grid(tuple(-o for o in half), tuple(n - o for n, o in zip(P.shape, half))))
    p = uctbx.unit_cell(tuple(float(v) for v in unit_cell)).parameters()
    cell = uctbx.unit_cell(tuple(float(ndiv[i]) * p[i] for i in range(3)) + tuple(p[3:]))
    with program.atomic_path(path) as tmp:
        iotbx.ccp4_map.write_ccp4_map(
            file_name=tmp, unit_cell=cell, space_group=sgtbx.space_group_info("P1").group(),
            map_data=data, labels=flex.std_string([title[:80]]))


def plot_real_section(path, P, x, y, z, unit_cell, plane: str, title: str, label: str) -> None:
    """Section through the origin of a real-space map over one unit cell centred on it, in Cartesian Å,
    true aspect, colours symmetric about 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cctbx import uctbx

    c = [(len(a) - 1) // 2 for a in (x, y, z)]
    i0, i1, sec = {"xy0": (0, 1, P[:, :, c[2]]), "x0z": (0, 2, P[:, c[1], :]),
                   "0yz": (1, 2, P[c[0], :, :])}[plane]
    # one unit cell centred on the origin (|x| ≤ ½): the short vectors are what one reads here
    keep = [np.abs(np.asarray(a)) <= 0.5 + 1e-9 for a in (x, y, z)]
    sec = np.asarray(sec)[np.ix_(keep[i0], keep[i1])]
    axes = tuple(np.asarray(a)[m] for a, m in zip((x, y, z), keep))
    c = [int(np.argmin(np.abs(a))) for a in axes]
    O = np.array(uctbx.unit_cell(tuple(float(v) for v in unit_cell)).orthogonalization_matrix()).reshape(3, 3)
    e0 = O[:, i0] / np.linalg.norm(O[:, i0])
    u1 = O[:, i1] - (O[:, i1] @ e0) * e0
    e1 = u1 / np.linalg.norm(u1)

    def edges(a):
        step = a[1] - a[0] if len(a) > 1 else 1.0
        return np.concatenate([a - step / 2, [a[-1] + step / 2]])

    F0, F1 = np.meshgrid(edges(axes[i0]), edges(axes[i1]), indexing="ij")
    r = F0[..., None] * O[:, i0] + F1[..., None] * O[:, i1]
    X, Y = r @ e0, r @ e1
    sec = np.asarray(sec, dtype=np.float64)
    away = np.abs(sec)
    away[c[i0] - 1:c[i0] + 2, c[i1] - 1:c[i1] + 2] = 0.0   # the origin peak would set the colour scale alone
    vmax = float(np.percentile(away, 99.9)) or float(away.max()) or 1.0
    fig, ax = plt.subplots(figsize=(6, 5.4))
    mesh = ax.pcolormesh(X, Y, sec, shading="flat", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    fig.colorbar(mesh, ax=ax, label=label)
    names = "xyz"
    ax.set_aspect("equal")
    ax.set_xlabel(f"along {'abc'[i0]} (Å)")
    ax.set_ylabel(f"⊥ {'abc'[i0]} in the {plane} plane (Å)")
    ax.set_title(title or f"{names[i0]}{names[i1]} section")
    program.save_figure(path, fig)


def write_features(out, features: list, units: str) -> None:
    """features.csv and features.json: vector (fractional, Å), length, value, sign."""
    with program.atomic_path(os.path.join(out, "features.csv")) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "x_frac", "y_frac", "z_frac", "u_x_A", "u_y_A", "u_z_A", "length_A",
                    f"value_{units}", "sign"])
        for i, f in enumerate(features, 1):
            w.writerow([i, *(f"{v:.4f}" for v in f["frac"]), *(f"{v:.3f}" for v in f["cart"]),
                        f"{f['length']:.3f}", f"{f['value']:.6g}", f["sign"]])
    program.write_json(os.path.join(out, "features.json"), {"units": units, "features": features})


def run(params) -> dict:
    """The program: read params.input.map, write everything into params.output.directory."""
    from diffuse_cli.analysis import pdf as pdf_mod
    from diffuse_cli.analysis.isotropic import s_map
    from diffuse_cli.formats import analysis_maps

    path = params.input.map
    if not path:
        raise Sorry("No map given (anisotropic.npz from diffuse.anisotropic, or merged.npz)")
    out = params.output.directory
    program.check_output_path(out, "output.directory")
    a = read_input(path, params)
    units = str(a.get("units", ""))
    cell = a["unit_cell"]
    ndiv = np.asarray(a["ndiv"]).ravel()
    # default cut-off: the fill limit (beyond it the map has gaps counted as 0)
    s_max = 1.0 / params.d_min if params.d_min else float(a.get("fill_s_limit", 0.0))
    if s_max <= 0:                      # no fill limit (sparse map): the largest measured |q|
        s_max = None
    t0 = time.perf_counter()
    s = s_map(a["h"], a["k"], a["l"], cell)
    try:
        delta = pdf_mod.pdf_map(a["I_aniso_filled"], a["h"], a["k"], a["l"], cell, s_max=s_max,
                                taper_start=params.taper_start, s=s)
    except ValueError as e:
        raise Sorry(f"{path}: ΔPDF: {e}") from None
    logger.info("ΔPDF on %s real-space voxels of %s Å (extent %s Å), s_max %.4g Å⁻¹, "
                "taper from %.2g s_max (%.1f s)",
                delta["P"].shape, np.round(delta["voxel_A"], 3), np.round(delta["extent_A"], 1),
                delta["s_max"], params.taper_start, time.perf_counter() - t0)
    if delta["imag_fraction"] > 1e-3:
        logger.info("Friedel-odd part of the map: max |sine part| / max |P| = %.3g (left out)",
                    delta["imag_fraction"])
    if params.patterson:
        patt = pdf_mod.pdf_map(total_map(a, s), a["h"], a["k"], a["l"], cell, s_max=delta["s_max"],
                               taper_start=params.taper_start, s=s)
    else:
        patt = {"P": np.zeros((0, 0, 0), dtype=np.float32)}
    # default: leave out the origin peak, one resolution element 1/s_max wide
    min_distance = params.features.min_distance
    if min_distance is None:
        min_distance = 1.0 / delta["s_max"]
    features = pdf_mod.strongest_features(delta["P"], delta["x"], delta["y"], delta["z"], cell,
                                          n_features=params.features.n, min_distance=min_distance)
    punits = pdf_units(units)
    os.makedirs(out, exist_ok=True)
    analysis_maps.write_pdf(os.path.join(out, "pdf.npz"), delta, patt, features, cell, ndiv, punits,
                            units=units, source=os.path.abspath(path),
                            source_fingerprint=program.npz_fingerprint(path))
    write_real_ccp4(os.path.join(out, "delta_pdf.ccp4"), delta["P"], ndiv, cell, "diffuse.pdf 3D-DPDF")
    maps = [("delta_pdf", delta, "3D-ΔPDF")]
    if params.patterson:
        write_real_ccp4(os.path.join(out, "patterson.ccp4"), patt["P"], ndiv, cell, "diffuse.pdf Patterson")
        maps.append(("patterson", patt, "Patterson of the total map"))
    for name, m, title in maps:
        for plane in ("xy0", "x0z", "0yz"):
            plot_real_section(os.path.join(out, f"{name}_{plane}.png"), m["P"], delta["x"], delta["y"],
                              delta["z"], cell, plane, f"{title}, {plane} section", f"P ({punits})")
    write_features(out, features, punits)
    summary = {"source": os.path.abspath(path), "units": punits, "shape": list(delta["P"].shape),
               "voxel_A": delta["voxel_A"].tolist(), "extent_A": delta["extent_A"].tolist(),
               "s_max_inv_A": delta["s_max"], "taper_start": params.taper_start,
               "delta_v_star_inv_A3": delta["delta_v_star"], "imag_fraction": delta["imag_fraction"],
               "origin_value": float(delta["P"][tuple((n - 1) // 2 for n in delta["P"].shape)]),
               "features_min_distance_A": float(min_distance), "n_features": len(features)}
    program.write_json(os.path.join(out, "pdf.json"), summary)
    for f in features[:5]:
        logger.info("  feature %s Å (|u| %.2f Å, frac %s): %.4g %s", np.round(f["cart"], 2), f["length"],
                    np.round(f["frac"], 3), f["value"], punits)
    logger.info("Wrote pdf.npz, delta_pdf.ccp4%s, sections, features.csv/json, pdf.json in %s",
                ", patterson.ccp4" if params.patterson else "", out)
    return summary
