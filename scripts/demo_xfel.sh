#!/usr/bin/env bash
# Simulated XFEL shots on a CSPAD-like multi-panel detector through the whole chain:
# diffuse.simulate kind=xfel (0.2 % rms wavelength jitter, 30 % rms pulse-flux jitter, exposure
# time 0 in the headers) -> stills_process -> bragg_mask -> extract -> correct -> merge (absolute
# scale with the Wilson B estimated from the integrated Bragg spots), then the merged map, per-shot
# scales, Wilson B and absolute scale against the simulator's truth. Not run by `make demo`.
# A few minutes on 2 cores. Output in ${DEMO_DIR:-demo_output/xfel}.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="$repo/.venv/bin"
out="$(cd "$repo" && mkdir -p "${DEMO_DIR:-demo_output/xfel}" && cd "${DEMO_DIR:-demo_output/xfel}" && pwd)"
nproc="${DEMO_NPROC:-$(nproc)}"
shots="${DEMO_SHOTS:-30}"
export LIBTBX_BUILD="${LIBTBX_BUILD:-/usr/lib/cctbx/python3.11}"
cd "$out"
comp="C:4904,N:1544,O:4480,S:80,H:13672"  # lysozyme-like unit cell with its water
sym=(indexing.known_symmetry.space_group=P43212 indexing.known_symmetry.unit_cell=79.1,79.1,37.9,90,90,90)

step() { printf '\n==== %s\n' "$*"; }

step "1/6 diffuse.simulate: $shots XFEL shots, CSPAD-like detector (4 quadrants x 2 tilted modules)"
"$bin/diffuse.simulate" kind=xfel n_stills="$shots" seed=21 xfel.wavelength_jitter=0.002 xfel.flux_jitter=0.3 \
  scale_min=0.5 scale_max=1.5 detector=multi multi.layout=cspad multi.panel_size=320,160 \
  multi.modules_per_quadrant=2 multi.gap_px=8 multi.tilt_deg=0.3 multi.rotation_deg=0.5 \
  detector_model.distance=85 detector_model.pixel_size=0.11 sensor.material=none \
  bragg_model.profile_sigma_px=0.7 absolute_scale.composition="$comp" absolute_scale.wilson_b=30 \
  truth.ndiv=2 nproc="$nproc" output.directory=sim output.log=diffuse.simulate.log
dials.show sim/image_00000.cbf sim/image_00001.cbf > dials.show.out
grep -E "wavelength:" dials.show.out | head -2 || true
printf 'panels in the two shots: %s\n' "$(grep -c "Panel:" dials.show.out)"

step "2/6 diffuse.stills_process (each shot with its own wavelength)"
"$bin/diffuse.stills_process" sim/ "${sym[@]}" nproc="$nproc" output.directory=processed

step "3/6 diffuse.bragg_mask"
"$bin/diffuse.bragg_mask" processed/combined.expt processed/combined.refl nproc="$nproc" output.directory=masks

step "4/6 diffuse.extract + diffuse.correct (normalised per shot: no exposure time)"
"$bin/diffuse.extract" processed/combined.expt masks.summary=masks/summary.json nproc="$nproc" \
  output.directory=extracted
"$bin/diffuse.correct" processed/combined.expt extracted nproc="$nproc" output.directory=corrected

step "5/6 diffuse.merge: electron units, Wilson B estimated (not given)"
"$bin/diffuse.merge" processed/combined.expt corrected ndiv=2 space_group=P43212 composition="$comp" \
  absolute_scale.fit_d_max=2.5 output.directory=merged

step "6/6 against the simulator's truth"
"$bin/python" - <<'PY'
import json, pathlib
import numpy as np
import diffuse_cli  # noqa: F401
from diffuse_cli.merging import map_agreement
from diffuse_cli.simulation import atomic
from diffuse_cli.simulation.crystal import b_matrix

truth = json.load(open("sim/truth.json"))
m = np.load("merged/merged.npz")
h, k, l = np.meshgrid(m["h"], m["k"], m["l"], indexing="ij")
ds = np.linalg.norm(np.stack([h, k, l], -1).reshape(-1, 3) @ b_matrix(m["unit_cell"]).T, axis=1)
c = truth["truth_model"]["photons_per_electron_unit"]
_, inc = atomic.cell_scattering(atomic.parse_composition("C:4904,N:1544,O:4480,S:80,H:13672"), ds,
                                truth["truth_model"]["parameters"]["wavelength"])
ref = np.load("sim/truth.npz")["I"].ravel() / c - inc
a = map_agreement(ref, m["I"].ravel(), m["counts"].ravel(), ds, min_counts=3)
print(f"map vs truth ({a['n_voxels']} voxels with >= 3 observations): CC total {a['cc_total']:.4f}, "
      f"anisotropic {a['cc_anisotropic']:.4f}; merged / truth absolute scale {a['scale']:.4f}")
true_scale = {pathlib.Path(p).stem: s["scale"] for p, s in zip(truth["images"], truth["stills"])}
fit = json.load(open("merged/scales.json"))["stills"]
r = np.array([f["scale"][0] / true_scale[f["file"].split(".")[0].rsplit("_", 1)[0]] for f in fit])
r /= np.median(r)
print(f"per-shot scales ({len(r)} shots): max |fitted/true - 1| = {np.max(np.abs(r - 1)):.4f} "
      "(up to one overall factor)")
sc = json.load(open("merged/absolute_scale.json"))
print(f"Wilson B: estimated {sc['wilson_b']:.2f} +- {sc['wilson']['sigma_B']:.2f} A^2, simulated 30")
wl = [s["wavelength_A"] for s in truth["stills"]]
print(f"shot wavelengths: mean {np.mean(wl):.5f} A, rms {np.std(wl) / np.mean(wl) * 100:.3f} %")
PY
printf '\nOutputs in %s (merged/wilson_plot.png, merged/absolute_scale.png, merged slices)\n' "$out"
