"""Pictures of the full scaling model's refined terms (one PNG per term)."""

from __future__ import annotations

import numpy as np

from diffuse_cli.scaling_terms import ScalingTerms


def plot_terms(terms: ScalingTerms, directory: str, labels=None) -> list[str]:
    """PNG per refined term in ``directory``; returns the file names written.

    scaling_scale.png (g per still), scaling_absorption.png (the surfaces of
    up to 6 stills and the rms over stills), scaling_detector.png (d per
    panel), scaling_offset.png (c per still against |s|).
    """
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffuse_cli.atomic_io import save_figure

    written = []
    n = len(terms.g)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(n), terms.g.mean(axis=1), "o-", ms=3)
    ax.set_xlabel("still (input order)")
    ax.set_ylabel("scale g (mean over d* nodes)")
    ax.set_title("per-still scale")
    fig.tight_layout()
    path = os.path.join(directory, "scaling_scale.png")
    save_figure(path, fig)
    written.append(os.path.basename(path))
    if terms.n_a:
        k = terms.absorption.n_nodes
        u0, u1, v0, v1 = terms.uv_range
        show = list(np.linspace(0, n - 1, min(n, 6)).astype(int))
        fig, axes = plt.subplots(1, len(show) + 1, figsize=(2.6 * (len(show) + 1), 2.8), squeeze=False)
        ext = (u0, u1, v0, v1)
        for ax, i in zip(axes[0], show):
            im = ax.imshow(terms.alpha[i].reshape(k, k), origin="lower", extent=ext, cmap="viridis")
            ax.set_title((labels[i] if labels else f"still {i}")[:18], fontsize=7)
            ax.set_xlabel("ŝ1 x (lab)")
            ax.set_ylabel("ŝ1 y (lab)")
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax = axes[0][-1]
        im = ax.imshow(np.sqrt(np.mean((terms.alpha - 1) ** 2, axis=0)).reshape(k, k), origin="lower",
                       extent=ext, cmap="magma")
        ax.set_title("rms(a − 1) over stills", fontsize=7)
        ax.set_xlabel("ŝ1 x (lab)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle("absorption a_i (node values, mean 1 per still)", fontsize=9)
        fig.tight_layout()
        path = os.path.join(directory, "scaling_absorption.png")
        save_figure(path, fig)
        written.append(os.path.basename(path))
    if terms.n_d:
        k = terms.detector.n_nodes
        P = len(terms.det)
        cols = int(np.ceil(np.sqrt(P)))
        rows = int(np.ceil(P / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 1, 2.2 * rows + 0.5), squeeze=False)
        lo, hi = float(terms.det.min()), float(terms.det.max())
        for p in range(rows * cols):
            ax = axes[p // cols][p % cols]
            if p >= P:
                ax.axis("off")
                continue
            ns, nf = terms.panel_shapes[p]
            im = ax.imshow(terms.det[p].reshape(k, k), origin="lower", extent=(0, nf, 0, ns),
                           vmin=lo, vmax=hi, cmap="viridis", aspect="auto")
            if P > 1:
                ax.set_title(f"panel {p}", fontsize=7)
            ax.set_xlabel("fast (px)", fontsize=7)
            ax.set_ylabel("slow (px)", fontsize=7)
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03)
        fig.suptitle("detector response d (node values)", fontsize=9)
        path = os.path.join(directory, "scaling_detector.png")
        save_figure(path, fig)
        written.append(os.path.basename(path))
    if terms.n_c:
        s = np.linspace(0, terms.s_max, 200)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i in range(n):
            ax.plot(s, terms.offset_at(terms.kappa[i], s), lw=0.8, alpha=0.7)
        ax.set_xlabel("|s| = d* (Å⁻¹)")
        ax.set_ylabel("offset c_i (merged units)")
        ax.set_title("additive offset per still (mean over stills 0)")
        fig.tight_layout()
        path = os.path.join(directory, "scaling_offset.png")
        save_figure(path, fig)
        written.append(os.path.basename(path))
    return written
