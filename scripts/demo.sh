#!/usr/bin/env bash
# The whole diffuse chain on simulated data. Called by `make demo`; rerunning it
# resumes (each program skips work whose outputs are complete).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="$repo/.venv/bin"
out="$(cd "$repo" && mkdir -p "${DEMO_DIR:-demo_output}" && cd "${DEMO_DIR:-demo_output}" && pwd)"
nproc="${DEMO_NPROC:-$(nproc)}"
cd "$out"

step() { printf '\n==== %s\n' "$*"; }

# lysozyme-like unit cell contents: 8 molecules plus ~3000 waters
composition="C:4904,N:1544,O:4480,S:80,H:13672"

step "1/7 diffuse.simulate: 20 stills from a known diffuse truth (P43212 lysozyme-like cell, known absolute scale)"
if [ ! -f sim/truth.npz ]; then
  "$bin/diffuse.simulate" n_stills=20 seed=1 nproc="$nproc" output.directory=sim truth.ndiv=3 \
    absolute_scale.composition="$composition" absolute_scale.wilson_b=30 \
    model.halo.amplitude=40 model.shell.amplitude=50 model.water.amplitude=30 \
    output.log=diffuse.simulate.log
fi

step "2/7 diffuse.stills_process: index and integrate every still with DIALS"
"$bin/diffuse.stills_process" sim/ output.directory=processed nproc="$nproc" \
  indexing.known_symmetry.space_group=P43212 \
  indexing.known_symmetry.unit_cell=79.1,79.1,37.9,90,90,90

step "3/7 diffuse.bragg_mask: static + per-still Bragg masks"
"$bin/diffuse.bragg_mask" processed/combined.expt processed/combined.refl \
  output.directory=bragg_masks output.png.still=0 nproc="$nproc"

step "4/7 diffuse.extract: usable pixels, q and hkl"
"$bin/diffuse.extract" processed/combined.expt masks.summary=bragg_masks/summary.json \
  output.directory=extracted nproc="$nproc"

step "5/7 diffuse.correct: solid angle, polarization, sensor, air, exposure"
"$bin/diffuse.correct" processed/combined.expt extracted/ output.directory=corrected nproc="$nproc"

step "6/7 diffuse.merge: 3D map, scaling, CC1/2, absolute scale (Krogh-Moe, Bragg peaks masked)"
"$bin/diffuse.merge" processed/combined.expt corrected/ ndiv=3 space_group=P43212 \
  composition="$composition" absolute_scale.wilson_b=30 absolute_scale.fit_d_max=2.5 \
  output.directory=merged

step "7/7 diffuse.azimuthal_fit: radial profile and water-ring azimuthal profile of one still (Bragg-masked)"
first="$(ls processed/stills/*_integrated.expt | head -n 1)"
tag="$(basename "$first" _integrated.expt)"
"$bin/diffuse.azimuthal_fit" "$first" "bragg_masks/${tag}_00000.mask" q=2.03 output.directory=azimuthal_fit

"$bin/python" "$repo/scripts/demo_compare.py" sim/truth.npz merged/merged.npz merged/demo_vs_truth.png

# ---- analysis: diffuse.anisotropic (issue 14)
step "analysis: diffuse.anisotropic: I_iso(|q|), anisotropic map I - I_iso with sigma, punch-and-fill"
"$bin/diffuse.anisotropic" merged/merged.npz anisotropic.fill.punch_radius=0.2 output.directory=analysis

# ---- analysis: diffuse.pdf (issue 14)
step "analysis: diffuse.pdf: 3D-DeltaPDF of the filled anisotropic map, Patterson of the total map"
"$bin/diffuse.pdf" analysis/anisotropic.npz output.directory=analysis

# ---- analysis: diffuse.model (issue 14)
step "analysis: diffuse.model: LLM fit (sigma, gamma) to the anisotropic map, |F|^2 from the integrated Bragg intensities"
"$bin/diffuse.model" merged/merged.npz processed/combined.refl fit.d_min=4 fit.d_max=20 fit.n_scan=3 \
  fit.tolerance=0.02 output.directory=analysis

# ---- exports: diffuse.export (issue 15)
"$bin/diffuse.export" merged/merged.npz format=hdf5+mtz output.directory=exports

# ---- report: diffuse.report (issue 15)
step "report: diffuse.report: one self-contained HTML page of the whole run"
"$bin/diffuse.report" . output.html=report.html

cat <<MSG

Done. Results are in $out:
  simulated images + truth   $out/sim/            (truth.json, truth.npz)
  DIALS processing           $out/processed/      (combined.expt/.refl, stills_process_summary.csv, qc_*.png)
  masks                      $out/bragg_masks/    (static.mask, per-still masks, overlay PNG)
  extracted / corrected      $out/extracted/  $out/corrected/
  merged map                 $out/merged/         (merged.npz, merged.ccp4, slices PNG, statistics,
                                                   absolute_scale.png: electron units per unit cell)
  merged vs truth            $out/merged/demo_vs_truth.png
  profiles and fits          $out/azimuthal_fit/
Pictures:
$(cd "$out" && find . -name '*.png' | sort | sed 's/^/  /')
Report (one HTML page, open in a browser): $out/report.html
MSG
