"""The report's sections of the last steps (:mod:`diffuse_cli.report.sections`): azimuthal_fit
(fits.csv, the profiles with their fitted curves, its pictures) and the analysis programs
(their JSON, CSV heads and pictures). d* = 1/d in Å⁻¹ (no 2π), as everywhere in the suite.
"""

from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np

from diffuse_cli.report.blocks import (INTENSITY_UNITS, TITLES, Section, _float, _fmt, _json, _not_run, _pictures,
                                       image, line, note, plot, pre, table)
from diffuse_cli.report.gather import Run, phil_value


def _fit_curve(row: dict, x: np.ndarray, pair: bool):
    from diffuse_cli import profile_shapes as ps

    g = lambda k: _float(row.get(k))  # noqa: E731
    model = row.get("model")
    if model == "maier_saupe":
        return ps.maier_saupe(x, g("height"), g("centre"), g("m"), g("b0"))
    if model == "pseudo_voigt" and row.get("profile", "").startswith("azimuthal"):
        return ps.pseudo_voigt_azimuthal(x, g("height"), g("centre"), g("fwhm"), g("eta"), g("b0"), pair=pair)
    if model == "pseudo_voigt":
        return ps.pseudo_voigt_linear(x, g("height"), g("centre"), g("fwhm"), g("eta"), g("b0"), g("b1"))
    return None


def _errors(sigma) -> dict:
    return {"type": "data", "array": np.asarray(sigma, dtype=float).tolist(), "visible": True}


def _read_csv(path: str) -> list:
    """Rows of a CSV file; [] when the step did not write it (e.g. azimuthal_fit without fits)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def azimuthal_section(run: Run, max_kb: float) -> Section:
    folder = run.folder("azimuthal_fit")
    if folder is None:
        return _not_run("azimuthal_fit")
    log = run.logs.get("azimuthal_fit")
    pair = str(phil_value(log.modified, "fit.pair") if log else "True") != "False"
    fits = _read_csv(os.path.join(folder, "fits.csv"))
    cols = ["image", "profile", "model", "success", "r_squared", "centre", "fwhm", "S", "S_error", "S_data",
            "S_data_error", "significant", "corrections"]
    blocks = [table(cols, [[r.get(c) if c in ("image", "profile", "model", "success", "significant", "corrections")
                            else _float(r.get(c)) for c in cols] for r in fits[:200]],
                    "Fits (fits.csv; centre, FWHM in Å⁻¹ = 2π/d for radial, degrees for azimuthal)")
              if fits else note("No fits were asked for (q=, d=, d_star=, hkl= or fit.radial_range=): "
                                "profiles only.")]
    shown: set = set()
    for path in sorted(glob.glob(os.path.join(folder, "profiles", "*.csv")))[:20]:
        stem = os.path.splitext(os.path.basename(path))[0]
        rows = _read_csv(path)
        if not rows:
            continue
        image_stem, _, profile = stem.partition("_radial") if "_radial" in stem else stem.partition("_azimuthal")
        profile = ("radial" + profile) if "_radial" in stem else ("azimuthal" + profile)
        y = np.array([_float(r.get("I")) for r in rows])
        s = np.array([_float(r.get("sigma")) for r in rows])
        mine = [f for f in fits if f.get("profile") == profile and os.path.splitext(f.get("image", ""))[0] == image_stem
                and str(f.get("success")).lower() == "true"]
        if "chi_deg" in rows[0]:
            x = np.array([_float(r["chi_deg"]) for r in rows])
            traces = [line(x, y, "I(χ)", mode="markers", error_y=_errors(s))]
            xf = np.linspace(-180, 180, 361)
            xlab, xplot = "χ, azimuth on the detector (degrees)", xf
        else:
            q = np.array([_float(r["q_inv_angstrom"]) for r in rows])
            x = q / (2 * np.pi)  # d* = 1/d
            traces = [line(x, y, "I(d*)", mode="markers", error_y=_errors(s))]
            xf = np.linspace(np.nanmin(q), np.nanmax(q), 400)
            xlab, xplot = "d* = 1/d (Å⁻¹)", xf / (2 * np.pi)
        for f in mine:
            curve = _fit_curve(f, xf, pair)
            if curve is not None:
                label = f"{f.get('model')} fit (S = {_fmt(_float(f.get('S')))})"
                traces.append(line(xplot, curve, label, mode="lines"))
        corr = (mine[0].get("corrections") if mine else None) or ""
        units = ("map units, as merged.npz" if corr == "merged"
                 else INTENSITY_UNITS if corr not in ("", "none") else "counts per pixel")
        blocks.append(plot(f"{image_stem}: {profile}", traces, xlab, f"I ({units})"))
    for sub in ("plots", "maps"):
        for p in sorted(glob.glob(os.path.join(folder, sub, "*.png")))[:12]:
            shown.add(os.path.abspath(p))
            blocks.append(image(p, f"{sub}/{os.path.basename(p)}", max_kb))
    blocks += _pictures(folder, shown, max_kb)
    return Section("azimuthal_fit", TITLES["azimuthal_fit"], "run", [folder], blocks)


def analysis_section(run: Run, max_kb: float) -> Section:
    folders = run.folders.get("analysis") or []
    if not folders:
        return _not_run("analysis", "no output of diffuse.anisotropic, diffuse.pdf or diffuse.model found")
    blocks = []
    shown: set = set()
    for folder in folders:
        blocks.append({"kind": "heading", "text": folder})
        for path in sorted(glob.glob(os.path.join(folder, "*.json")))[:20]:
            try:
                text = json.dumps(_json(path), indent=2, default=str)
            except (OSError, ValueError) as e:
                text = f"(not readable as JSON: {e})"
            if len(text) > 6000:
                text = text[:6000] + f"\n... ({len(text) - 6000} more characters in {path})"
            blocks.append(pre(text, os.path.basename(path), collapsed=len(text) > 1500))
        for path in sorted(glob.glob(os.path.join(folder, "*.csv")))[:10]:
            with open(path, errors="replace") as fh:
                head = "".join(fh.readline() for _ in range(30))
            blocks.append(pre(head, f"{os.path.basename(path)} (first lines)", collapsed=True))
        others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*"))
                        if os.path.isfile(p) and not p.endswith((".png", ".json", ".csv")))
        if others:
            blocks.append(note("Other files: " + ", ".join(others[:40])))
        blocks += _pictures(folder, shown, max_kb, title="Pictures")
    return Section("analysis", TITLES["analysis"], "run", folders, blocks)
