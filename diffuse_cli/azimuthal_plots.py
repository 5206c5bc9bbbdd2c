"""Pictures of ``diffuse.azimuthal_fit``: profiles with their fits, q-space maps, series summaries.

All PNG, through :func:`diffuse_cli.program.save_figure` (atomic). The maps
are also written as arrays (``<stem>_maps.npz``) next to their pictures.
"""

from __future__ import annotations

import os

import numpy as np

from diffuse_cli import azimuthal as az
from diffuse_cli import program


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_profile(path, prof, fits, title, rings=()):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = prof.n_pixels > 0
    ax.errorbar(prof.x[ok], prof.I[ok], yerr=prof.sigma[ok], fmt=".", ms=3, lw=0.5, color="k", label="data")
    for res in fits:
        if res.success and res.x is not None:
            order = np.argsort(res.x)
            lab = res.model
            if res.significant is False:
                lab += f" anisotropy not significant (z={res.anisotropy_z:.2g})"
            elif np.isfinite(res.S):
                lab += f" S={res.S:.3f}±{res.S_error:.3f}"
            lab += f" R²={res.r_squared:.3f}"
            ax.plot(res.x[order], res.y_model[order], lw=1.5, label=lab)
    if prof.kind == "radial":
        ax.set_xlabel("q = 4π sinθ/λ (Å⁻¹)")
        for q in rings:
            ax.axvline(q, color="0.6", lw=0.8, ls="--")
    else:
        ax.set_xlabel("χ (deg, DIALS lab frame)")
        ax.set_xlim(-180, 180)
    ax.set_ylabel("mean intensity per pixel")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    program.save_figure(path, fig)


def write_maps(outdir, stem, entry, image, params, rings):
    plt = _plt()
    pixels, mask = entry["pixels"], entry["mask"]
    if "maps" not in entry:
        n = params.maps.n_bins
        entry["maps"] = (
            az.qmap_binning(pixels, mask, n=n),
            az.cake_binning(pixels, mask, n_q=n, n_chi=360),
        )
    qmap_b, cake_b = entry["maps"]
    qmap, qmap_n = qmap_b.map2d(image)
    cake, cake_n = cake_b.map2d(image)
    arrays = {
        "qmap": qmap.astype(np.float32),
        "qmap_n_pixels": qmap_n.astype(np.int32),
        "qx_edges": qmap_b.meta["qx_edges"],
        "qy_edges": qmap_b.meta["qy_edges"],
        "cake": cake.astype(np.float32),
        "cake_n_pixels": cake_n.astype(np.int32),
        "q_edges": cake_b.meta["q_edges"],
        "chi_edges": cake_b.meta["chi_edges"],
    }
    if params.maps.fill_centrosymmetric:
        qmap = az.fill_centrosymmetric(qmap, "qmap")
        cake = az.fill_centrosymmetric(cake, "cake")
        arrays["qmap_filled"] = qmap.astype(np.float32)
        arrays["cake_filled"] = cake.astype(np.float32)
    from diffuse_cli.azimuthal_maps import qpar_map

    qpar, qpar_n, qpar_edges = qpar_map(entry, image, params)
    arrays.update(qpar_qperp=qpar, qpar_n_pixels=qpar_n, qpar_edges=qpar_edges,
                  field_direction=np.array(params.maps.field_direction, dtype=np.float64))
    from diffuse_cli.formats.azimuthal_maps import write_azimuthal_maps

    write_azimuthal_maps(os.path.join(outdir, f"{stem}_maps.npz"), **arrays)

    def log_image(a):
        with np.errstate(invalid="ignore", divide="ignore"):
            pos = a[np.isfinite(a) & (a > 0)]
            floor = np.percentile(pos, 1) if pos.size else 1.0
            return np.log10(np.where(np.isfinite(a), np.maximum(a, floor), np.nan)), floor

    fill_note = " (masked pixels filled from χ+180°, display only)" if params.maps.fill_centrosymmetric else ""
    fig, ax = plt.subplots(figsize=(6.5, 6))
    img, _ = log_image(qmap)
    e = qmap_b.meta["qx_edges"]
    lo, hi = np.nanpercentile(img, [1, 99.7]) if np.isfinite(img).any() else (0, 1)
    im = ax.imshow(img, origin="lower", extent=(e[0], e[-1], e[0], e[-1]), cmap="viridis", vmin=lo, vmax=hi)
    t = np.linspace(0, 2 * np.pi, 361)
    for q in rings:
        ax.plot(q * np.cos(t), q * np.sin(t), color="w", lw=0.7, ls="--")
    ax.set_xlabel("q_x (Å⁻¹, 2π/d, DIALS lab x)")
    ax.set_ylabel("q_y (Å⁻¹, 2π/d, DIALS lab y)")
    ax.set_title(f"{stem}: log10 I{fill_note}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="log10 mean intensity")
    program.save_figure(os.path.join(outdir, f"{stem}_qmap.png"), fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    img, _ = log_image(cake)
    qe, ce = cake_b.meta["q_edges"], cake_b.meta["chi_edges"]
    lo, hi = np.nanpercentile(img, [1, 99.7]) if np.isfinite(img).any() else (0, 1)
    im = ax.imshow(img.T, origin="lower", aspect="auto", extent=(qe[0], qe[-1], ce[0], ce[-1]), cmap="viridis", vmin=lo, vmax=hi)
    for q in rings:
        ax.axvline(q, color="w", lw=0.7, ls="--")
    ax.set_xlabel("q = 4π sinθ/λ (Å⁻¹)")
    ax.set_ylabel("χ (deg, DIALS lab frame)")
    ax.set_title(f"{stem}: cake, log10 I{fill_note}", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 mean intensity")
    program.save_figure(os.path.join(outdir, f"{stem}_cake.png"), fig)

    fig, ax = plt.subplots(figsize=(6.5, 6))
    img, _ = log_image(qpar)
    e = qpar_edges
    lo, hi = np.nanpercentile(img, [1, 99.7]) if np.isfinite(img).any() else (0, 1)
    im = ax.imshow(img, origin="lower", extent=(e[0], e[-1], e[0], e[-1]), cmap="viridis", vmin=lo, vmax=hi)
    for q in rings:
        ax.plot(q * np.cos(t), q * np.sin(t), color="w", lw=0.7, ls="--")
    label = ",".join(f"{v:g}" for v in params.maps.field_direction)
    ax.set_xlabel(f"q∥ (Å⁻¹, 2π/d, along the field ({label}), DIALS lab)")
    ax.set_ylabel("q⊥ (Å⁻¹, 2π/d, along field × beam)")
    ax.set_title(f"{stem}: log10 I in (q∥, q⊥)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="log10 mean intensity")
    program.save_figure(os.path.join(outdir, f"{stem}_qpar_qperp.png"), fig)


def plot_summary(outdir, rows, series_name):
    plt = _plt()
    groups = {}
    for r in rows:
        if r["success"]:
            groups.setdefault((r["profile"], r["model"]), []).append(r)
    if not groups:
        return []
    written = []
    for quantity, label in (("centre", "peak position"), ("fwhm", "FWHM"), ("S", "order parameter S"), ("S_total", "S_total")):
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for (profile, model), rs in sorted(groups.items()):
            x = np.array([r[series_name] for r in rs], dtype=float)
            y = np.array([r[quantity] for r in rs], dtype=float)
            e = np.array([r[quantity + "_error"] for r in rs], dtype=float)
            if not np.isfinite(y).any():
                continue
            o = np.argsort(x)
            ax.errorbar(x[o], y[o], yerr=np.where(np.isfinite(e[o]), e[o], 0), fmt="o-", ms=3, label=f"{profile} {model}")
            drawn = True
        if drawn:
            ax.set_xlabel(series_name)
            ax.set_ylabel(label + (" (Å⁻¹ or deg)" if quantity in ("centre", "fwhm") else ""))
            ax.legend(fontsize=7)
            path = os.path.join(outdir, f"summary_{quantity}.png")
            program.save_figure(path, fig)
            written.append(path)
        else:
            plt.close(fig)
    return written
