"""Pictures of diffuse.model: central sections of data, model and difference; CC per shell."""

from __future__ import annotations

import numpy as np

from diffuse_cli import program
from diffuse_cli.symmetry import b_matrix

_PLANES = {"hk0": (0, 1, 2), "h0l": (0, 2, 1), "0kl": (1, 2, 0)}


def _section(values, axes, plane):
    i0, i1, i2 = _PLANES[plane]
    centre = int(np.argmin(np.abs(axes[i2])))
    sec = np.take(values, centre, axis=i2)
    return sec, (i0, i1)


def _edges(a):
    step = a[1] - a[0] if len(a) > 1 else 1.0
    return np.concatenate([a - step / 2, [a[-1] + step / 2]])


def plot_sections(path, plane: str, axes, unit_cell, maps: list, titles: list, suptitle: str = "") -> None:
    """One PNG: the central ``plane`` section of each map side by side (Cartesian Å⁻¹, true aspect).

    The data and model panels share one colour range (the data's 1–99 %);
    the difference panel uses the same range about 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B = b_matrix(unit_cell)
    secs = [_section(m, axes, plane) for m in maps]
    i0, i1 = secs[0][1]
    e0 = B[:, i0] / np.linalg.norm(B[:, i0])
    u1 = B[:, i1] - (B[:, i1] @ e0) * e0
    e1 = u1 / np.linalg.norm(u1)
    H0, H1 = np.meshgrid(_edges(axes[i0]), _edges(axes[i1]), indexing="ij")
    q = H0[..., None] * B[:, i0] + H1[..., None] * B[:, i1]
    X, Y = q @ e0, q @ e1
    finite = secs[0][0][np.isfinite(secs[0][0])]
    lo, hi = np.percentile(finite, (1.0, 99.0)) if finite.size else (-1.0, 1.0)
    half = max(abs(lo), abs(hi), 1e-30)
    fig, axs = plt.subplots(1, len(maps), figsize=(4.6 * len(maps), 4.4), squeeze=False)
    names = "hkl"
    for ax, (sec, _), title, n in zip(axs[0], secs, titles, range(len(maps))):
        ax.set_facecolor("0.75")
        vmin, vmax = (-half, half)
        mesh = ax.pcolormesh(X, Y, np.ma.masked_invalid(sec), shading="flat", vmin=vmin, vmax=vmax, cmap="RdBu_r")
        fig.colorbar(mesh, ax=ax, shrink=0.8)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"along {names[i0]}* (Å⁻¹)")
        if n == 0:
            ax.set_ylabel(f"⊥ {names[i0]}* in the {plane} plane (Å⁻¹)")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    program.save_figure(path, fig)


def plot_shell_cc(path, shells: list, title: str = "") -> None:
    """CC total (I vs model) and CC anisotropic (ΔI vs ΔM) against the shell centre d* (Å⁻¹)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_star = np.array([0.5 * (1.0 / r["d_min"] + (1.0 / r["d_max"] if np.isfinite(r["d_max"]) else 0.0))
                       for r in shells])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(d_star, [r["cc_total"] for r in shells], "k.-", label="CC total: I vs model")
    ax.plot(d_star, [r["cc_aniso"] for r in shells], "b.-", label="CC anisotropic: ΔI vs ΔM")
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlabel("|q| = d* = 1/d (Å⁻¹), shell centre")
    ax.set_ylabel("correlation coefficient")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "Model fit per resolution shell", fontsize=10)
    program.save_figure(path, fig)
