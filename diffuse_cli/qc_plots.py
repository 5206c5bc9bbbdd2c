"""QC pictures of a ``diffuse.stills_process`` run (PNG).

* ``qc_indexing_rate.png``: status of every image in input order and the
  running indexing rate (%);
* ``qc_unit_cell.png``: histograms of a, b, c (Å) and α, β, γ (°) of indexed stills;
* ``qc_rmsd.png``: positional RMSD (px) and mean |Δq| = |q_obs − A·h| (Å⁻¹) per still;
* ``qc_partiality.png``: partiality of all integrated reflections (sum of the
  per-still histograms on :data:`diffuse_cli.stills.records.PARTIALITY_BINS`).
"""

from __future__ import annotations

import os

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffuse_cli import program  # noqa: E402
from diffuse_cli.stills.records import (  # noqa: E402
    FAILED,
    FAILED_VALIDATION,
    INDEXED,
    NOT_A_HIT,
    PARTIALITY_BINS,
)

_STATUS_ORDER = [INDEXED, FAILED_VALIDATION, NOT_A_HIT, FAILED]
_STATUS_COLOUR = {INDEXED: "tab:green", FAILED_VALIDATION: "tab:orange", NOT_A_HIT: "tab:gray", FAILED: "tab:red"}


def plot_indexing_rate(rows, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    counts = [sum(r["status"] == s for r in rows) for s in _STATUS_ORDER]
    ax1.bar(range(len(_STATUS_ORDER)), counts, color=[_STATUS_COLOUR[s] for s in _STATUS_ORDER])
    ax1.set_xticks(range(len(_STATUS_ORDER)), _STATUS_ORDER, rotation=15)
    ax1.set_ylabel("images")
    ax1.set_title(f"{counts[0]} of {len(rows)} indexed ({100.0 * counts[0] / max(1, len(rows)):.0f} %)")
    indexed = np.array([r["status"] == INDEXED for r in rows], dtype=float)
    n = np.arange(1, len(rows) + 1)
    ax2.plot(n, 100 * np.cumsum(indexed) / n, "-", color="k", label="running rate")
    ax2.scatter(n, 100 * indexed, c=[_STATUS_COLOUR[r["status"]] for r in rows], s=12, zorder=3)
    ax2.set_ylim(-5, 105)
    ax2.set_xlabel("image number (input order)")
    ax2.set_ylabel("indexing rate (%)")
    ax2.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    program.save_figure(path, fig)


def plot_unit_cells(rows, path):
    ok = [r for r in rows if r["status"] == INDEXED]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
    for ax, name, unit in zip(axes.ravel(), ["a", "b", "c", "alpha", "beta", "gamma"], ["Å"] * 3 + ["°"] * 3):
        values = np.array([r[name] for r in ok], dtype=float)
        if values.size and np.ptp(values) < 1e-6:
            # fixed by the lattice symmetry: one bar (a histogram would be empty)
            ax.bar([values.mean()], [values.size], width=0.2, color="tab:blue")
            ax.set_xlim(values.mean() - 2, values.mean() + 2)
            ax.set_title(f"{name} = {values.mean():.2f} {unit} (all stills)", fontsize=9)
        elif values.size:
            ax.hist(values, bins=min(30, max(5, values.size // 2)), color="tab:blue")
            ax.set_title(f"{name} = {values.mean():.2f} ± {values.std():.2f} {unit}", fontsize=9)
        ax.set_xlabel(f"{name} ({unit})")
    axes[0, 0].set_ylabel("stills")
    axes[1, 0].set_ylabel("stills")
    fig.suptitle(f"Unit cells of {len(ok)} indexed stills")
    fig.tight_layout()
    program.save_figure(path, fig)


def plot_rmsd(rows, path):
    ok = [r for r in rows if r["status"] in (INDEXED, FAILED_VALIDATION)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    rmsd = np.array([r["rmsd_px"] for r in ok], dtype=float)
    if rmsd.size:
        ax1.hist(rmsd, bins=min(30, max(5, rmsd.size // 2)), color="tab:blue")
        ax1.set_title(f"median RMSD {np.median(rmsd):.2f} px")
    ax1.set_xlabel("RMSD observed - predicted centroid (px)")
    ax1.set_ylabel("stills")
    dq = np.array([r["delta_q_mean"] for r in ok], dtype=float)
    dqmax = np.array([r["delta_q_max"] for r in ok], dtype=float)
    x = np.arange(len(ok))
    ax2.plot(x, dq, "o", color="tab:blue", label="mean |Δq|")
    ax2.plot(x, dqmax, "v", color="tab:red", label="max |Δq|")
    ax2.set_xticks(x, [r["tag"] for r in ok], rotation=60, fontsize=6)
    ax2.set_ylabel("|q_obs − A·h| (Å⁻¹)")
    ax2.set_title("q-consistency per still")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    program.save_figure(path, fig)


def plot_partiality(hists, path):
    total = np.zeros(len(PARTIALITY_BINS) - 1)
    for h in hists:
        if h is not None:
            total += np.asarray(h)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    centres = 0.5 * (PARTIALITY_BINS[1:] + PARTIALITY_BINS[:-1])
    ax.bar(centres, total, width=np.diff(PARTIALITY_BINS), color="tab:purple")
    ax.set_xlabel("partiality")
    ax.set_ylabel("integrated reflections")
    ax.set_title(f"{int(total.sum())} reflections")
    fig.tight_layout()
    program.save_figure(path, fig)


def make_all(rows, hists, directory) -> list[str]:
    paths = [os.path.join(directory, f"qc_{n}.png") for n in ("indexing_rate", "unit_cell", "rmsd", "partiality")]
    plot_indexing_rate(rows, paths[0])
    plot_unit_cells(rows, paths[1])
    plot_rmsd(rows, paths[2])
    plot_partiality(hists, paths[3])
    return paths
