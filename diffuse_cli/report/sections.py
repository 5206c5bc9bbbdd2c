"""The report's sections: each step's files turned into tables, plotly figures and pictures.

A section is a list of blocks (dicts with ``kind``): ``table`` (headers,
rows), ``plot`` (a plotly figure as a plain dict: ``data``, ``layout``),
``image`` (a PNG as a data URI), ``pre`` (text), ``note`` (one line). Every
figure's axes carry titles with units. Reciprocal-space axes are d* = 1/d in
Å⁻¹ (no 2π), as everywhere in the suite (docs/conventions.md). The blocks are
made in :mod:`diffuse_cli.report.blocks`; the azimuthal_fit and analysis sections are
in :mod:`diffuse_cli.report.analysis_sections`.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os

import numpy as np

from diffuse_cli.report.analysis_sections import _read_csv, analysis_section, azimuthal_section
from diffuse_cli.report.blocks import (INTENSITY_UNITS, TITLES, Section, _float, _fmt, _json, _not_run, _pictures,
                                       _stats, image, line, note, plot, pre, table)
from diffuse_cli.report.gather import ANALYSIS_PROGRAMS, Run

logger = logging.getLogger("diffuse.report")

PROGRAM_ORDER = ("simulate", "stills_process", "bragg_mask", "extract", "correct", "merge", "azimuthal_fit",
                 *ANALYSIS_PROGRAMS, "export")


# ------------------------------------------------------------------ sections


def inputs_section(run: Run) -> Section:
    blocks = []
    rows = []
    # the report's own log is not an input
    programs = sorted((p for p in run.logs if p != "report"),
                      key=lambda p: PROGRAM_ORDER.index(p) if p in PROGRAM_ORDER else 99)
    for prog in programs:
        log = run.logs[prog]
        rows.append([f"diffuse.{prog}", log.banner, log.path, log.output_directory() or "(default)"])
    if rows:
        blocks.append(table(["program", "version", "run log", "output.directory"], rows, "Run logs found"))
    else:
        blocks.append(note("No run logs (diffuse.<program>.log) found next to the step folders."))
    cards, logs_text = [], []
    for prog in programs:
        log = run.logs[prog]
        cards.append({"title": f"diffuse.{prog}", "text": log.modified or "(all parameters at their defaults)"})
        lines = log.text.splitlines()
        more = f"\n... ({len(lines) - 300} more lines in {log.path})" if len(lines) > 300 else ""
        text = "\n".join(lines[:300]) + more
        logs_text.append(pre(text, f"diffuse.{prog}: run log ({log.path})", collapsed=True))
    if cards:
        blocks.append({"kind": "heading", "text": "Parameters changed from the defaults (from each run log)"})
        blocks.append({"kind": "cards", "items": cards})
        blocks += logs_text
    folders = [[step, ", ".join(run.folders.get(step, [])) or "not run"] for step in
               ("simulate", "stills_process", "bragg_mask", "extract", "correct", "merge", "azimuthal_fit", "analysis")]
    blocks.insert(0, table(["step", "folder"], folders, "Step folders"))
    return Section("inputs", TITLES["inputs"], "run", list(run.inputs), blocks)


def simulate_section(run: Run, max_kb: float) -> Section:
    folder = run.folder("simulate")
    if folder is None:
        return _not_run("simulate")
    truth = _json(os.path.join(folder, "truth.json"))
    model = truth.get("truth_model") or {}
    rows = [[k, truth.get(k)] for k in ("kind", "n_stills", "seed", "space_group", "unit_cell", "d_min_A",
                                          "exposure_time_s", "detector_kind", "noise") if k in truth]
    if "photons_per_electron_unit" in model:
        rows.append(["photons_per_electron_unit", model["photons_per_electron_unit"]])
    blocks = [table(["truth.json", "value"], rows, "Simulated data (known truth)")]
    if truth.get("parameters_phil"):
        blocks.append(pre(truth["parameters_phil"], "diffuse.simulate: all parameters (truth.json)", collapsed=True))
    return Section("simulate", TITLES["simulate"], "run", [folder], blocks)


def _stills_rows(folder: str) -> list:
    path = os.path.join(folder, "stills_process_summary.json")
    if os.path.isfile(path):
        return list(_json(path).get("rows", []))
    with open(os.path.join(folder, "stills_process_summary.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def _partiality_from_refl(path: str, max_mb: float = 500):
    """The ``partiality`` column of a reflection file (None if absent or too large)."""
    if not os.path.isfile(path) or os.path.getsize(path) > max_mb * 1e6:
        return None
    from dials.array_family import flex  # noqa: F401  (DIALS's reflection table)

    refl = flex.reflection_table.from_file(path)
    if "partiality" not in refl:
        return None
    return np.asarray(refl["partiality"].as_numpy_array(), dtype=float)


def stills_process_section(run: Run, max_kb: float, read_reflections: bool) -> Section:
    folder = run.folder("stills_process")
    if folder is None:
        return _not_run("stills_process")
    rows = _stills_rows(folder)
    n = len(rows)
    status = [str(r.get("status", "")) for r in rows]
    hits = sum(s != "not a hit" and not str(r.get("reason", "")).startswith(("file not found", "not a recognised"))
               for s, r in zip(status, rows))
    indexed = [r for r in rows if r.get("status") == "indexed"]
    n_idx = len(indexed)
    counts = {s: status.count(s) for s in dict.fromkeys(status)}
    pct = lambda a, b: 100.0 * a / b if b else float("nan")  # noqa: E731
    blocks = [table(["images", "hits", "indexed", "hit rate (%)", "indexing rate of images (%)",
                     "indexing rate of hits (%)", "statuses"],
                    [[n, hits, n_idx, pct(hits, n), pct(n_idx, n), pct(n_idx, hits),
                      ", ".join(f"{k}: {v}" for k, v in counts.items())]], "Hit and indexing rate")]
    idx = list(range(n))
    tags = [str(r.get("tag", i)) for i, r in enumerate(rows)]
    blocks.append(plot("Spots, indexed and integrated reflections per image", [
        line(idx, [_float(r.get("n_spots")) for r in rows], "strong spots", text=tags),
        line(idx, [_float(r.get("n_indexed")) for r in rows], "indexed", text=tags),
        line(idx, [_float(r.get("n_integrated")) for r in rows], "integrated", text=tags),
    ], "image (row of stills_process_summary)", "reflections (count)"))
    blocks.append(plot("Positional RMSD and q-consistency per image", [
        line(idx, [_float(r.get("rmsd_px")) for r in rows], "RMSD (px)", text=tags),
        line(idx, [_float(r.get("delta_q_mean")) for r in rows], "mean Δq (Å⁻¹)", yaxis="y2", text=tags),
    ], "image (row of stills_process_summary)", "RMSD (pixels)", "mean Δq = |q_obs − A·h| (Å⁻¹)"))
    if indexed:
        cell = {k: np.array([_float(r.get(k)) for r in indexed]) for k in ("a", "b", "c", "alpha", "beta", "gamma")}
        blocks.append(table(["parameter", "mean", "std", "min", "max", "unit"], [
            [k, np.nanmean(v), np.nanstd(v), np.nanmin(v), np.nanmax(v), "Å" if k in "abc" else "°"]
            for k, v in cell.items()], f"Unit-cell spread over {n_idx} indexed images"))
        ii = [i for i, r in enumerate(rows) if r.get("status") == "indexed"]
        blocks.append(plot("Unit cell per indexed image", [
            line(ii, cell[k], k, text=[tags[i] for i in ii]) for k in ("a", "b", "c")
        ], "image (row of stills_process_summary)", "cell edge (Å)"))
    part = None
    combined = os.path.join(folder, "combined.refl")
    if read_reflections and n_idx:
        part = _partiality_from_refl(combined)
    if part is not None and part.size:
        finite = part[np.isfinite(part)]
        blocks.append(plot(f"Partiality of the {finite.size} integrated reflections (combined.refl)", [
            {"type": "histogram", "x": finite.tolist(), "nbinsx": 40, "name": "partiality"}],
            "partiality (fraction of the full intensity, 0–1)", "reflections (count)", bargap=0.05))
    mean_p = [_float(r.get("mean_partiality")) for r in rows]
    if any(math.isfinite(v) for v in mean_p):
        model = next((r.get("partiality_model") for r in indexed if r.get("partiality_model")), "")
        blocks.append(plot(f"Mean partiality per image ({model})", [line(idx, mean_p, "mean partiality", text=tags)],
                           "image (row of stills_process_summary)", "mean partiality (fraction, 0–1)"))
    failed = [[r.get("tag"), r.get("status"), r.get("reason")] for r in rows if r.get("status") != "indexed"]
    if failed:
        blocks.append(table(["image", "status", "reason"], failed[:100], "Images not indexed"))
    # the qc_*.png pictures show the same as the plots above: not embedded
    return Section("stills_process", TITLES["stills_process"], "run", [folder], blocks)


def bragg_mask_section(run: Run, max_kb: float) -> Section:
    folder = run.folder("bragg_mask")
    if folder is None:
        return _not_run("bragg_mask")
    summary = _json(os.path.join(folder, "summary.json"))
    stills = [s for s in summary.get("stills", []) if isinstance(s, dict)]
    ok = [s for s in stills if s.get("status") != "failed"]
    names = [s.get("name", "") for s in ok]
    idx = list(range(len(ok)))
    frac = lambda key: [100 * _float(s.get(key)) for s in ok]  # noqa: E731
    blocks = [table(["method", "static masks", "stills", "failed", "Bragg masked (%, median)",
                     "total masked (%, median)"],
                    [[summary.get("method"), ", ".join(map(str, (summary.get("static_masks") or {}).values())),
                      len(stills), summary.get("n_failed", 0), _stats(frac("bragg_fraction"))[1],
                      _stats(frac("total_fraction_masked"))[1]]], "Masks")]
    traces = [line(idx, frac("total_fraction_masked"), "total masked", text=names),
              line(idx, frac("static_fraction_masked"), "static (trusted range, gaps, hot/dead, ...)", text=names),
              line(idx, frac("bragg_fraction"), "Bragg", text=names)]
    if any("strong_only_fraction" in s for s in ok):
        traces.append(line(idx, frac("strong_only_fraction"), "strong spots only (not predicted)", text=names))
    blocks.append(plot("Fraction of pixels masked per still", traces, "still (row of summary.json)",
                       "pixels masked (% of the detector)"))
    shape = [(s.get("name"), b) for s in ok for b in (s.get("bragg_shape") or []) if isinstance(b, dict)]
    if shape:
        blocks.append(plot("Bragg mask size per still", [
            line(list(range(len(shape))), [_float(b.get("radius_px_equivalent")) for _, b in shape],
                 "tangential radius", text=[n for n, _ in shape]),
            line(list(range(len(shape))), [_float(b.get("excitation_px_equivalent")) for _, b in shape],
                 "excitation half-width", text=[n for n, _ in shape]),
        ], "still (row of summary.json)", "size (pixels equivalent)"))
    shown: set = set()
    overlays = sorted(glob.glob(os.path.join(folder, "*.png")))
    if overlays:
        blocks.append({"kind": "heading", "text": "Mask overlay (static-masked pixels blue, Bragg red)"})
        for p in overlays:
            shown.add(os.path.abspath(p))
            blocks.append(image(p, os.path.basename(p), max_kb))
    else:
        blocks.append(note("No overlay picture (run diffuse.bragg_mask with output.png.still=0)."))
    return Section("bragg_mask", TITLES["bragg_mask"], "run", [folder], blocks)


_MULTIPLIERS = (("solid_angle", "solid angle 1e-6/Ω"), ("polarization", "polarization 1/P"),
                ("efficiency", "sensor efficiency 1/η"), ("air", "air 1/T_air"), ("kapton", "kapton 1/T_kapton"),
                ("total", "product"))


def _factor_rows(path: str) -> tuple:
    """(rows, applied names, provenance JSON text) of one factors_<key>.npz."""
    from diffuse_cli.formats.factors import read_factors

    z = read_factors(path, fields=["applied", "provenance", *(key for key, _ in _MULTIPLIERS)])
    applied = [str(a) for a in np.atleast_1d(z["applied"])] if "applied" in z else []
    rows = []
    for key, label in _MULTIPLIERS:
        if key not in z:
            continue
        on = key == "total" or key in applied
        lo, med, hi = _stats(z[key]) if on else (float("nan"),) * 3
        rows.append([key, label, "yes" if on else "no", lo, med, hi])
    prov = str(z["provenance"]) if "provenance" in z else ""
    return rows, applied, prov


def extract_correct_section(run: Run, max_kb: float) -> Section:
    ext, cor = run.folder("extract"), run.folder("correct")
    if ext is None and cor is None:
        return _not_run("extract_correct")
    blocks = []
    if ext is not None:
        s = _json(os.path.join(ext, "summary.json"))
        ok = [e for e in s.get("stills", []) if isinstance(e, dict) and e.get("status") != "failed"]
        blocks.append(table(["stills", "failed", "Bragg masks applied", "pixels used (%, median)"],
                            [[len(s.get("stills", [])), s.get("n_failed", 0), s.get("bragg_masks"),
                              _stats([100 * _float(e.get("fraction_used")) for e in ok])[1]]], "diffuse.extract"))
        blocks.append(plot("Pixels used per still (diffuse.extract)", [
            line(list(range(len(ok))), [100 * _float(e.get("fraction_used")) for e in ok], "pixels used",
                 text=[e.get("name") for e in ok])], "still (row of summary.json)", "pixels used (% of the detector)"))
    else:
        blocks.append(note("diffuse.extract: not run"))
    if cor is not None:
        s = _json(os.path.join(cor, "summary.json"))
        ok = [e for e in s.get("stills", []) if isinstance(e, dict) and e.get("status") != "failed"]
        for path in sorted(glob.glob(os.path.join(cor, "factors_*.npz"))):
            rows, applied, prov = _factor_rows(path)
            blocks.append(table(["multiplier", "what", "applied", "min", "median", "max"], rows,
                                f"Corrections applied ({os.path.basename(path)}: "
                                "per-pixel multipliers over the detector)"))
            if prov:
                blocks.append(pre(json.dumps(json.loads(prov), indent=2), "correction parameters (provenance)",
                                  collapsed=True))
        names = [e.get("still") for e in ok]
        idx = list(range(len(ok)))
        blocks.append(table(["stills", "failed", "normalisation", "normalisation value (min / median / max)"],
                            [[len(s.get("stills", [])), s.get("n_failed", 0),
                              ", ".join(sorted({str(e.get("normalisation_source", e.get("normalisation")))
                                                for e in ok})),
                              " / ".join(_fmt(v) for v in _stats([_float(e.get("normalisation_value")) for e in ok]))]],
                            "diffuse.correct"))
        blocks.append(plot("Corrected intensity per still (diffuse.correct)", [
            line(idx, [_float(e.get("median_I")) for e in ok], "median I", text=names),
            line(idx, [_float(e.get("mean_I")) for e in ok], "mean I", text=names),
        ], "still (row of summary.json)", f"corrected intensity ({INTENSITY_UNITS})"))
    else:
        blocks.append(note("diffuse.correct: not run"))
    folders = [f for f in (ext, cor) if f]
    return Section("extract_correct", TITLES["extract_correct"], "run", folders, blocks)


def _slice_figure(path: str, max_side: int = 160):
    """A plotly heatmap of the central hk0 section of a merged map (None when too few points)."""
    from diffuse_cli.formats.merged import read_merged

    m = read_merged(path, fields=["I", "counts", "h", "k", "l", "units"])
    l0 = int(np.argmin(np.abs(m["l"])))
    sl = np.array(m["I"][:, :, l0], dtype=float)
    sl[np.asarray(m["counts"][:, :, l0]) <= 0] = np.nan
    if np.isfinite(sl).sum() < 10:
        return None
    step = max(1, int(math.ceil(max(sl.shape) / max_side)))
    sl = sl[::step, ::step]
    h, k = np.asarray(m["h"])[::step], np.asarray(m["k"])[::step]
    units = str(m["units"]) if "units" in m else INTENSITY_UNITS
    z = np.where(np.isfinite(sl), np.round(sl, 4), np.nan)
    trace = {"type": "heatmap", "x": h.tolist(), "y": k.tolist(), "z": z.T.tolist(), "colorscale": "Viridis",
             "colorbar": {"title": {"text": units}}, "zmin": float(np.nanpercentile(sl, 1)),
             "zmax": float(np.nanpercentile(sl, 99))}
    return plot(f"Central section hk0 of merged.npz (every {step}th grid point; grey/blank = unmeasured)" if step > 1
                else "Central section hk0 of merged.npz (blank = unmeasured)", [trace], "h (reciprocal lattice units)",
                "k (reciprocal lattice units)", height=520, yaxis={"title": {"text": "k (reciprocal lattice units)"},
                                                                   "scaleanchor": "x"})


def merge_section(run: Run, max_kb: float) -> Section:
    folder = run.folder("merge")
    if folder is None:
        return _not_run("merge")
    blocks = []
    shown: set = set()
    merged = os.path.join(folder, "merged.npz")
    if os.path.isfile(merged):
        from diffuse_cli.formats.merged import read_merged

        z = read_merged(merged, fields=["units", "space_group", "laue_group", "unit_cell", "ndiv", "n_stills",
                                        "n_observations", "d_min", "absolute_scale_K", "h", "k", "l"])
        shape = [len(z[a]) for a in ("h", "k", "l") if a in z]
        get = z.get
        rows = [["units", get("units")], ["space group", get("space_group")], ["Laue group", get("laue_group")],
                ["unit cell (Å, °)", " ".join(f"{v:.3f}" for v in get("unit_cell"))],
                ["grid shape (h, k, l)", " × ".join(str(n) for n in shape) if len(shape) == 3 else None],
                ["ndiv", get("ndiv")], ["stills merged", get("n_stills")], ["observations", get("n_observations")],
                ["d_min (Å)", get("d_min")], ["absolute scale K", get("absolute_scale_K")]]
        rows = [[k, v if not isinstance(v, np.ndarray) else (v.item() if v.ndim == 0 else " ".join(map(str, v)))]
                for k, v in rows if v is not None]
        blocks.append(table(["merged.npz", "value"], rows, "Merged map"))
    scales_path = os.path.join(folder, "scales.json")
    if os.path.isfile(scales_path):
        sc = _json(scales_path)
        stills = [s for s in sc.get("stills", []) if isinstance(s, dict)]
        names = [s.get("file") for s in stills]
        idx = list(range(len(stills)))
        n_terms = max((len(np.atleast_1d(s.get("scale", []))) for s in stills), default=0)
        traces = [line(idx, [_float(np.atleast_1d(s.get("scale"))[t]) if len(np.atleast_1d(s.get("scale"))) > t
                             else float("nan") for s in stills], "scale g" if n_terms == 1 else f"scale term {t}",
                       text=names) for t in range(n_terms)]
        blocks.append(plot("Per-still scale", traces, "still (row of scales.json)",
                           "scale g (dimensionless multiplier)"))
        blocks.append(plot("Per-still fit to the reference", [
            line(idx, [_float(s.get("cc_with_reference")) for s in stills], "CC with reference", text=names),
            line(idx, [100 * _float(s.get("outlier_fraction")) for s in stills], "outliers (%)", yaxis="y2",
                 text=names),
        ], "still (row of scales.json)", "CC with the reference (dimensionless)",
            "outliers rejected (% of observations)"))
        hist = sc.get("history") or []
        if hist:
            blocks.append(plot(f"Scaling convergence (converged: {sc.get('converged')})",
                               [line(list(range(1, len(hist) + 1)), hist, "max relative scale change")],
                               "scaling pass (number)", "max relative scale change (dimensionless)",
                               yaxis={"title": {"text": "max relative scale change (dimensionless)"}, "type": "log"}))
        known = ("file", "scale", "half", "cc_with_reference", "outlier_fraction", "crystal_change_of_basis",
                 "reindexed_by", "fit_ok")
        other = sorted({k for s in stills for k, v in s.items() if k not in known and isinstance(v, list)})
        for key in other[:4]:  # absorption / offset nodes of the full scaling model
            values = [[s.get("file"), " ".join(_fmt(_float(x)) for x in np.ravel(s.get(key, [])))[:200]]
                      for s in stills[:40]]
            blocks.append(table(["still", key], values, f"scaling term {key}"))
        for p in sorted(glob.glob(os.path.join(folder, "scaling_*.png"))):
            shown.add(os.path.abspath(p))
            blocks.append(image(p, os.path.basename(p), max_kb))
    stats_path = os.path.join(folder, "statistics.json")
    if os.path.isfile(stats_path):
        st = _json(stats_path)
        shells = [s for s in st.get("shells", []) if isinstance(s, dict)]
        dmid = [0.5 * (1 / _float(s["d_max"]) if _float(s.get("d_max")) > 0 else 0.0) + 0.5 / _float(s["d_min"])
                for s in shells]
        dlab = [f"{_fmt(_float(s.get('d_max')))}–{_fmt(_float(s.get('d_min')))} Å" for s in shells]
        get = lambda key, f=1.0: [f * _float(s.get(key)) for s in shells]  # noqa: E731
        blocks.append(plot("CC½, anisotropic CC½ and Friedel CC per shell", [
            line(dmid, get("cc_half"), "CC½", text=dlab),
            line(dmid, get("cc_half_aniso"), "CC½ anisotropic", text=dlab),
            line(dmid, get("cc_friedel"), "CC Friedel", text=dlab)],
            "d* = 1/d at the shell centre (Å⁻¹)", "correlation coefficient (dimensionless)"))
        blocks.append(plot("Completeness and multiplicity per shell", [
            line(dmid, get("completeness", 100), "completeness", text=dlab),
            line(dmid, get("multiplicity"), "multiplicity", yaxis="y2", text=dlab)],
            "d* = 1/d at the shell centre (Å⁻¹)", "completeness (% of ASU voxels)",
            "multiplicity (observations per voxel)"))
        units = INTENSITY_UNITS
        if os.path.isfile(merged):
            from diffuse_cli.formats.merged import read_merged

            units = str(read_merged(merged, fields=["units"]).get("units", units))
        blocks.append(plot("Mean intensity and I/σ per shell", [
            line(dmid, get("mean_I"), "mean I", text=dlab),
            line(dmid, get("mean_I_over_sigma"), "mean I/σ", yaxis="y2", text=dlab)],
            "d* = 1/d at the shell centre (Å⁻¹)", f"mean I ({units.split(' (')[0]})", "mean I/σ (dimensionless)"))
        keys = ["d_max", "d_min", "n_measured", "completeness", "multiplicity", "mean_I", "mean_I_over_sigma",
                "cc_half", "cc_half_aniso", "cc_friedel"]
        overall = st.get("overall") or {}
        rows = [[s.get(k) for k in keys] for s in shells]
        if overall:
            rows.append(["overall"] + [overall.get(k) for k in keys[1:]])
        blocks.append(table(keys, rows, "Per-shell statistics (d in Å; statistics.json)"))
        shown.add(os.path.abspath(os.path.join(folder, "statistics.png")))
    abs_path = os.path.join(folder, "absolute_scale.json")
    if os.path.isfile(abs_path):
        a = _json(abs_path)
        rows = [["K (multiplier to electron units per unit cell)", a.get("K")],
                ["fit range d (Å)", " – ".join(_fmt(_float(v)) for v in a.get("fit_range_d", []))],
                ["fit range d* (Å⁻¹)", " – ".join(_fmt(_float(v)) for v in a.get("fit_range_d_star", []))],
                ["rms relative residual", a.get("rms_relative_residual")],
                ["Wilson B (Å²)", (a.get("wilson") or {}).get("B", a.get("wilson_b"))],
                ["B from", (a.get("wilson") or {}).get("source")],
                ["Bragg peaks", (a.get("bragg_peaks") or {}).get("why")],
                ["composition per unit cell",
                 ", ".join(f"{k}:{v:g}" for k, v in (a.get("composition_per_unit_cell") or {}).items())],
                ["method", a.get("method")]]
        blocks.append(table(["absolute scale", "value"], rows, "Absolute-scale fit (absolute_scale.json)"))
        for name in ("absolute_scale.png", "wilson_plot.png"):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                shown.add(os.path.abspath(p))
                blocks.append(image(p, name, max_kb))
    else:
        blocks.append(note("Absolute scale: not fitted (diffuse.merge without composition=)."))
    if os.path.isfile(merged):
        fig = _slice_figure(merged)
        if fig is not None:
            blocks.append(fig)
    slices = sorted(glob.glob(os.path.join(folder, "slice_*.png")))
    if slices:
        blocks.append({"kind": "heading", "text": "Slices (central sections; grey = unmeasured)"})
        for p in slices:
            shown.add(os.path.abspath(p))
            blocks.append(image(p, os.path.basename(p), max_kb))
    blocks += _pictures(folder, shown, max_kb)
    return Section("merge", TITLES["merge"], "run", [folder], blocks)


def overview_section(run: Run) -> Section:
    """The figures a beamline scientist looks at first, one table."""
    rows = []
    sp = run.folder("stills_process")
    if sp:
        r = _stills_rows(sp)
        n_idx = sum(x.get("status") == "indexed" for x in r)
        rows.append(["stills_process", "images indexed", f"{n_idx} of {len(r)}"])
        rmsd = _stats([_float(x.get("rmsd_px")) for x in r if x.get("status") == "indexed"])[1]
        rows.append(["stills_process", "RMSD (pixels, median)", _fmt(rmsd)])
    bm = run.folder("bragg_mask")
    if bm:
        st = [x for x in _json(os.path.join(bm, "summary.json")).get("stills", []) if isinstance(x, dict)]
        rows.append(["bragg_mask", "pixels masked (%, median)",
                     _fmt(_stats([100 * _float(x.get("total_fraction_masked")) for x in st])[1])])
    mg = run.folder("merge")
    if mg and os.path.isfile(os.path.join(mg, "statistics.json")):
        o = _json(os.path.join(mg, "statistics.json")).get("overall") or {}
        for key, label in (("cc_half", "CC½ (overall)"), ("cc_half_aniso", "CC½ anisotropic (overall)"),
                           ("cc_friedel", "CC Friedel (overall)"), ("completeness", "completeness (fraction, overall)"),
                           ("multiplicity", "multiplicity (overall)"), ("d_min", "d_min (Å)")):
            if key in o:
                rows.append(["merge", label, _fmt(_float(o[key]))])
    if mg and os.path.isfile(os.path.join(mg, "absolute_scale.json")):
        k = _json(os.path.join(mg, "absolute_scale.json")).get("K")
        rows.append(["merge", "absolute scale K", _fmt(_float(k))])
    az = run.folder("azimuthal_fit")
    if az:
        for f in _read_csv(os.path.join(az, "fits.csv"))[:6]:
            if f.get("profile", "").startswith("azimuthal") and str(f.get("success")).lower() == "true":
                rows.append(["azimuthal_fit", f"S {f.get('model')} ({f.get('image')}, {f.get('profile')})",
                             f"{_fmt(_float(f.get('S')))} ± {_fmt(_float(f.get('S_error')))}"])
    for step in ("stills_process", "bragg_mask", "extract", "correct", "merge", "azimuthal_fit", "analysis"):
        if not run.folders.get(step):
            rows.append([step, "", "not run"])
    return Section("overview", "Overview", "run", list(run.inputs), [table(["step", "figure", "value"], rows)])


def build_sections(run: Run, embed_images: bool = True, max_image_kb: float = 2000,
                   read_reflections: bool = True) -> list:
    """All sections of the report, in run order (steps not run as "not run" sections)."""
    kb = max_image_kb if embed_images else -1.0
    return [
        overview_section(run),
        inputs_section(run),
        simulate_section(run, kb),
        stills_process_section(run, kb, read_reflections),
        bragg_mask_section(run, kb),
        extract_correct_section(run, kb),
        merge_section(run, kb),
        azimuthal_section(run, kb),
        analysis_section(run, kb),
    ]
