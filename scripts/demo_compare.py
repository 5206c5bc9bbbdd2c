"""Compare the demo's merged map with the simulator's truth; print and plot it.

When the simulation had a composition (absolute-scale mode) and the merged
map is in electron units, the truth is put on that scale first
(I_true / c − Σ I_inc) and the ratio of the two is printed: 1 means the
Krogh-Moe absolute scale reproduced the simulated one.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import diffuse_cli  # noqa: F401
from diffuse_cli import program
from diffuse_cli.formats.merged import read_merged
from diffuse_cli.merging import map_agreement
from diffuse_cli.symmetry import reciprocal_metric

truth_path, merged_path, png = sys.argv[1:4]
truth, merged = np.load(truth_path), read_merged(merged_path)
if not np.array_equal(truth["ndiv"], merged["ndiv"]) or truth["I"].shape != merged["I"].shape:
    sys.exit(f"truth grid {truth['I'].shape} differs from merged grid {merged['I'].shape}")
h, k, l = np.meshgrid(merged["h"], merged["k"], merged["l"], indexing="ij")
hkl = np.stack([h, k, l], axis=-1).reshape(-1, 3)
d_star = np.sqrt(np.einsum("ni,ij,nj->n", hkl, reciprocal_metric(merged["unit_cell"]), hkl))
truth_I = truth["I"]
units = str(merged["units"]) if "units" in merged else ""
model = json.load(open(os.path.join(os.path.dirname(truth_path), "truth.json")))["truth_model"]
if model.get("photons_per_electron_unit") and units.startswith("electron units"):
    from diffuse_cli.absolute_scale import parse_composition, theory

    _, inc = theory(parse_composition(model["parameters"]["composition"]), d_star)
    truth_I = (truth["I"].ravel() / model["photons_per_electron_unit"] - inc).reshape(truth["I"].shape)
a = map_agreement(truth_I.ravel(), merged["I"].ravel(), merged["counts"].ravel(), d_star)
if truth_I is not truth["I"]:
    ok = (merged["counts"].ravel() >= 3) & np.isfinite(merged["I"].ravel()) & np.isfinite(truth_I.ravel())
    ratio = np.sum(merged["I"].ravel()[ok] * truth_I.ravel()[ok]) / np.sum(truth_I.ravel()[ok] ** 2)
    print(f"absolute scale: merged / simulated truth = {ratio:.4f} in electron units per unit cell (1 = exact)")
print(
    f"merged vs truth on {a['n_voxels']} voxels with >= 3 observations: "
    f"CC(total) = {a['cc_total']:.4f}, CC(anisotropic) = {a['cc_anisotropic']:.4f}, "
    f"scale = {a['scale']:.4f}"
)
il = int(np.argmin(abs(merged["l"])))
fig, axes = plt.subplots(1, 2, figsize=(11, 5))
for ax, data, title in ((axes[0], truth_I, "truth (hk0)"), (axes[1], merged["I"] / a["scale"], "merged / scale (hk0)")):
    sec = data[:, :, il].T
    vmax = np.nanpercentile(truth_I[:, :, il], 99.5)
    im = ax.imshow(sec, origin="lower", cmap="magma", vmin=0, vmax=vmax,
                   extent=[merged["h"][0], merged["h"][-1], merged["k"][0], merged["k"][-1]])
    ax.set_xlabel("h"); ax.set_ylabel("k"); ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
fig.suptitle(f"CC total {a['cc_total']:.3f}, anisotropic {a['cc_anisotropic']:.3f}")
program.save_figure(png, fig)
