"""Side by side with mdx2 1.0.5 on the same DIALS-processed nuclease sweep.

Not a test. On the five ADSC frames of ``../shared/data/snase_rotation``
(1024×1024 pixels, 1° each), processed once as a sweep by
``diffuse.stills_process processing_mode=sequence geometry.goniometer.axes=1,0,0``
(as tests/test_rotation_real.py does), it times, one core each
(nproc=1, one BLAS/numba thread):

- ours: ``diffuse.bragg_mask``, ``diffuse.extract``, ``diffuse.correct``,
  ``diffuse.merge`` (ndiv=3, the experiment's space group);
- mdx2: ``import_geometry``, ``import_data``, ``find_peaks``, ``mask_peaks``,
  ``integrate`` (subdivide 3 3 3, with the peak mask), ``correct``, ``scale``,
  ``merge``, from its own venv (``/usr/bin/python3 -m venv
  --system-site-packages`` over Debian's DIALS, ``pip install --no-deps
  mdx2==1.0.5`` and its pure-Python dependencies).

Each step runs as its own process (interpreter start-up and imports
included, as a user runs it); wall time and CPU time (user + sys of the
child) are reported. Outputs of the timed steps are removed before each run,
so every run is cold (our geometry and factor caches live in the output
folders). The DIALS processing, the decompressed images and the mdx2 venv are
kept and reused (``--work``, default ``.bench/vs_mdx2`` in the repository,
which git ignores).

mdx2 1.0.5 accepts only Pilatus-like detectors. The workarounds, applied only
when needed (the report lists which): a copy of the ``.expt`` with panel type
``SENSOR_PAD``; one whole-frame module in
``mdx2.dxtbx_machinery.sensor_active_areas`` (monkeypatched by a small
wrapper run in mdx2's venv); ``--noefficiency`` for mdx2.correct when the
panel thickness is 0 (its efficiency 1 − exp(−μt/cos ψ) is then 0).

Map comparison: mdx2's merged table (ASU voxels at h = i/3) looks up our map
(full grid, same voxel centres) at the same fractional hkl; on the voxels
measured in both, the isotropic part is removed from each map separately (its
mean in |q| shells, |q| = 1/d from our unit cell), and the Pearson CC of what
is left is the anisotropic CC. The headline CC takes the voxels out to the
largest |q| whose whole ring lies on the detector (complete shells: beyond,
a shell is seen only in the detector corners and its mean is not an
isotropic part); the CC on all common voxels, per shell, and the total CC
(isotropic part kept) are given too.

``--startup`` also times each step's start-up floor (a process that only
imports the step's module): both tools pay about 1.4 s of DIALS/dxtbx
imports per process.

``--profile`` also runs bragg_mask, extract and correct under cProfile (CPU time)
(separate output folders, not timed) and prints their top functions.

Usage::

  .venv/bin/python benchmarks/bench_vs_mdx2.py                  # table
  .venv/bin/python benchmarks/bench_vs_mdx2.py --json           # one JSON document only
  .venv/bin/python benchmarks/bench_vs_mdx2.py --profile        # + cProfile of our non-merge steps
  .venv/bin/python benchmarks/bench_vs_mdx2.py --only ours      # or: mdx2, compare (no timing)
  .venv/bin/python benchmarks/bench_vs_mdx2.py --no-shoeboxes --no-plots   # like for like (below)

Like for like: ``--no-shoeboxes`` processes the sweep (once, folder
``processed_no_shoeboxes``) with ``output.integrated_shoeboxes=False``: the
predicted Bragg masks read no shoeboxes (same .expt, same masks), and reading
the 346 MB .refl that keeps them is ~1.5 s of diffuse.bragg_mask.
``--no-plots`` runs diffuse.merge with ``output.plots=False``: mdx2 draws no
pictures, and the map comparison reads merged.npz only.

Targets (issue 12): ours (bragg_mask + extract + correct + merge) <= 1/3 of
mdx2's chain, anisotropic map CC >= 0.9.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
OUR_BIN = pathlib.Path(sys.executable).parent
SYSTEM_PYTHON = "/usr/bin/python3"
LIBTBX_BUILD = "/usr/lib/cctbx/python3.11"
MDX2_VERSION = "1.0.5"
# pure-Python dependencies of mdx2 not in Debian's python3-dials (numpy, scipy, pandas, h5py are)
MDX2_DEPS = ["nexusformat", "hdf5plugin", "colored", "simple-parsing", "docstring-parser",
             "typing-extensions", "loguru", "joblib>=1.4", "cloudpickle"]
DATASET = "snase_rotation"
SWEEP_ARGS = ["processing_mode=sequence", "geometry.goniometer.axes=1,0,0",
              "indexing.known_symmetry.space_group=P4",
              "indexing.known_symmetry.unit_cell=48.4,48.4,63.3,90,90,90"]
NDIV = 3
OURS_STEPS = ["bragg_mask", "extract", "correct", "merge"]
MDX2_STEPS = ["import_geometry", "import_data", "find_peaks", "mask_peaks", "integrate",
              "correct", "scale", "merge"]

# Run inside mdx2's venv: one whole-frame module for detectors dxtbx's Pilatus
# table does not know, then the mdx2 command named by argv[1].
MDX2_WRAPPER = '''\
"""mdx2 step runner written by benchmarks/bench_vs_mdx2.py: python run_mdx2.py STEP [ARGS]."""
import importlib
import sys

import mdx2.dxtbx_machinery as machinery

if sys.argv[1] == "--whole-frame-module":
    original = machinery.sensor_active_areas

    def sensor_active_areas(panels):
        """One module covering each whole panel: (fast_start, slow_start, fast_end, slow_end)."""
        return [(0, 0, *panel.get_image_size()) for panel in panels]

    machinery.sensor_active_areas = sensor_active_areas
    del sys.argv[1]

step = sys.argv[1]
if step == "export":  # merged.nxs -> npz, for the map comparison
    import numpy as np
    from mdx2.io import loadobj

    table = loadobj(sys.argv[2], "hkl_table")
    np.savez(sys.argv[3], h=table.h, k=table.k, l=table.l, intensity=table.intensity,
             intensity_error=table.intensity_error, count=table.count, ndiv=np.asarray(table.ndiv))
else:
    importlib.import_module(f"mdx2.command_line.{step}").run(sys.argv[2:])
'''


def child_env() -> dict:
    env = dict(os.environ)
    env["LIBTBX_BUILD"] = LIBTBX_BUILD
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = "1"  # one core
    return env


def timed(cmd, cwd, log: pathlib.Path) -> dict:
    """Run ``cmd``; wall and CPU (user + sys of the child, s). Output goes to ``log``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env=child_env())
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(map(str, cmd[:3]))} ... failed (exit {proc.returncode}), log {log}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def say(args, *msg):
    if not args.json:
        print(*msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs (reused)


def prepare_images(data: pathlib.Path, work: pathlib.Path) -> list[pathlib.Path]:
    files = sorted((data / DATASET).glob("*.bz2"))
    if not files:
        raise SystemExit(f"no images in {data / DATASET} (set --data)")
    dest = work / "images"
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = dest / f.name[:-4]
        if not target.exists():
            part = target.with_suffix(target.suffix + ".part")
            with bz2.open(f, "rb") as fin, open(part, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            part.rename(target)
        out.append(target)
    return out


def prepare_sweep(args, images) -> dict:
    """diffuse.stills_process of the sweep, once (reused while combined.expt/.refl exist)."""
    processed = args.work / ("processed" if args.shoeboxes else "processed_no_shoeboxes")
    expt, refl = processed / "combined.expt", processed / "combined.refl"
    if expt.exists() and refl.exists():
        say(args, f"reusing DIALS processing in {processed}")
        return {"expt": expt, "refl": refl, "reused": True}
    say(args, f"DIALS processing of {len(images)} frames -> {processed} (once)")
    extra = [] if args.shoeboxes else ["output.integrated_shoeboxes=False"]
    t = timed([OUR_BIN / "diffuse.stills_process", *images, *SWEEP_ARGS, *extra, f"output.directory={processed}",
               "nproc=1", f"output.log={args.work / 'stills_process.log'}"], args.work,
              args.work / "stills_process.out")
    return {"expt": expt, "refl": refl, "reused": False, **t}


def mdx2_python(args) -> pathlib.Path:
    """mdx2's venv (created and filled once), its python."""
    venv = args.venv
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import mdx2, sys; sys.stdout.write(mdx2.__version__)"]
    if python.exists():
        got = subprocess.run(check, capture_output=True, text=True, env=child_env())
        if got.returncode == 0 and got.stdout.strip() == MDX2_VERSION:
            return python
    say(args, f"creating mdx2 {MDX2_VERSION} venv in {venv}")
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"mdx2=={MDX2_VERSION}",
                    *MDX2_DEPS], check=True)
    got = subprocess.run(check, capture_output=True, text=True, env=child_env())
    if got.returncode != 0 or got.stdout.strip() != MDX2_VERSION:
        raise SystemExit(f"mdx2 {MDX2_VERSION} does not import in {venv}:\n{got.stderr[-2000:]}")
    return python


def mdx2_inputs(args, expt: pathlib.Path) -> dict:
    """The .expt mdx2 reads (panel type SENSOR_PAD if needed) and the workarounds needed."""
    from dxtbx.format.FormatPilatusHelpers import sensor_active_areas
    from dxtbx.model.experiment_list import ExperimentList

    experiment = ExperimentList.from_file(str(expt), check_format=False)[0]
    panel = experiment.detector[0]
    workarounds = []
    doc = json.loads(expt.read_text())
    if panel.get_type() != "SENSOR_PAD":
        for detector in doc["detector"]:
            for p in detector["panels"]:
                p["type"] = "SENSOR_PAD"
        workarounds.append(f"panel type {panel.get_type()} -> SENSOR_PAD in a copy of the .expt")
    panel.set_type("SENSOR_PAD")  # what mdx2 will see
    try:
        whole_frame = not sensor_active_areas(experiment.detector)
    except AttributeError:  # dxtbx 3.11: an image size not in its Pilatus table (module size of None)
        whole_frame = True
    if whole_frame:
        workarounds.append("one whole-frame module in mdx2.dxtbx_machinery.sensor_active_areas")
    no_efficiency = panel.get_thickness() <= 0
    if no_efficiency:
        workarounds.append("mdx2.correct --noefficiency (panel thickness 0)")
    mdx2_dir = args.work / "mdx2"
    mdx2_dir.mkdir(parents=True, exist_ok=True)
    copy = mdx2_dir / "mdx2.expt"
    copy.write_text(json.dumps(doc, indent=1))
    wrapper = mdx2_dir / "run_mdx2.py"
    wrapper.write_text(MDX2_WRAPPER)
    return {"expt": copy, "wrapper": wrapper, "whole_frame": whole_frame, "no_efficiency": no_efficiency,
            "workarounds": workarounds, "space_group": str(experiment.crystal.get_space_group().info())}


# ---------------------------------------------------------------- the two chains


def run_ours(args, sweep, space_group) -> dict:
    root = args.work / "ours"
    root.mkdir(parents=True, exist_ok=True)
    expt, refl = sweep["expt"], sweep["refl"]
    commands = {
        "bragg_mask": [expt, refl, f"output.directory={root / 'masks'}"],
        "extract": [expt, f"masks.summary={root / 'masks' / 'summary.json'}",
                    f"output.directory={root / 'extracted'}"],
        "correct": [expt, root / "extracted", f"output.directory={root / 'corrected'}"],
        "merge": [expt, root / "corrected", f"ndiv={NDIV}", f"space_group={space_group}",
                  f"output.directory={root / 'merged'}", *([] if args.plots else ["output.plots=False"])],
    }
    outputs = {"bragg_mask": "masks", "extract": "extracted", "correct": "corrected", "merge": "merged"}
    times = {}
    for step in OURS_STEPS:
        shutil.rmtree(root / outputs[step], ignore_errors=True)  # cold: caches live in the outputs
        say(args, f"ours: diffuse.{step}")
        times[step] = timed([OUR_BIN / f"diffuse.{step}", *commands[step], "nproc=1",
                             f"output.log={root / (step + '.log')}"], root, root / f"{step}.out")
    return times


def run_mdx2(args, python, inputs) -> dict:
    d = args.work / "mdx2"
    for name in ("geometry.nxs", "data.nxs", "peaks.nxs", "mask.nxs", "integrated.nxs", "corrected.nxs",
                 "scales.nxs", "merged.nxs", "merged_export.npz"):
        (d / name).unlink(missing_ok=True)
    shutil.rmtree(d / "datastore", ignore_errors=True)
    expt = inputs["expt"].name
    commands = {
        "import_geometry": [expt, "--outfile", "geometry.nxs"],
        "import_data": [expt, "--outfile", "data.nxs", "--datastore", "datastore"],
        "find_peaks": ["geometry.nxs", "data.nxs", "--count_threshold", str(args.count_threshold),
                       "--outfile", "peaks.nxs"],
        "mask_peaks": ["geometry.nxs", "data.nxs", "peaks.nxs", "--outfile", "mask.nxs"],
        "integrate": ["geometry.nxs", "data.nxs", "--mask", "mask.nxs", "--subdivide", *[str(NDIV)] * 3,
                      "--outfile", "integrated.nxs"],
        "correct": ["geometry.nxs", "integrated.nxs", "--outfile", "corrected.nxs",
                    *(["--noefficiency"] if inputs["no_efficiency"] else [])],
        "scale": ["corrected.nxs", "--outfile", "scales.nxs"],
        "merge": ["corrected.nxs", "--scale", "scales.nxs", "--outfile", "merged.nxs"],
    }
    patch = ["--whole-frame-module"] if inputs["whole_frame"] else []
    times = {}
    for step in MDX2_STEPS:
        say(args, f"mdx2: {step}")
        times[step] = timed([python, inputs["wrapper"].name, *patch, step, *commands[step], "--nproc", "1",
                             "--logfile", f"mdx2.{step}.log"], d, d / f"{step}.out")
    timed([python, inputs["wrapper"].name, *patch, "export", "merged.nxs", "merged_export.npz"], d,
          d / "export.out")
    return times


# ---------------------------------------------------------------- map comparison


def shell_residual(values, s, edges):
    """values minus their mean in each |q| shell (the isotropic part)."""
    import numpy as np

    which = np.clip(np.digitize(s, edges) - 1, 0, len(edges) - 2)
    n = np.bincount(which, minlength=len(edges) - 1)
    total = np.bincount(which, weights=values, minlength=len(edges) - 1)
    mean = total / np.maximum(n, 1)
    return values - mean[which]


def complete_shell_q(expt: pathlib.Path) -> float:
    """Largest |q| (Å⁻¹) whose whole ring lies on the detector: the least |q| on the panel's edge pixels.

    Beyond it a |q| shell is seen only in the detector corners, and its mean is
    not the isotropic part (detector-position effects dominate there).
    """
    import numpy as np
    from dxtbx.model.experiment_list import ExperimentList

    experiment = ExperimentList.from_file(str(expt), check_format=False)[0]
    s0 = np.asarray(experiment.beam.get_s0())
    q_min = np.inf
    for panel in experiment.detector:
        nf, ns = panel.get_image_size()
        f, sl = np.arange(nf) + 0.5, np.arange(ns) + 0.5
        edge = [(x, 0.5) for x in f] + [(x, ns - 0.5) for x in f] + [(0.5, y) for y in sl] + [(nf - 0.5, y) for y in sl]
        lab = np.array([panel.get_pixel_lab_coord(p) for p in edge])
        s1 = lab / np.linalg.norm(lab, axis=1, keepdims=True) * np.linalg.norm(s0)
        q_min = min(q_min, float(np.linalg.norm(s1 - s0, axis=1).min()))
    return q_min


def anisotropic_cc(a, b, s, n_shells):
    """Pearson CC of a and b after removing each one's mean in n_shells equal-width |q| shells."""
    import numpy as np

    edges = np.linspace(s.min(), s.max() + 1e-9, n_shells + 1)
    return float(np.corrcoef(shell_residual(a, s, edges), shell_residual(b, s, edges))[0, 1]), edges


def compare_maps(args, q_complete: float) -> dict:
    """Anisotropic (and total) CC of mdx2's map with ours at the same fractional hkl.

    Headline: voxels with |q| <= q_complete (complete shells); also all common voxels and per shell.
    """
    import numpy as np

    from diffuse_cli.formats.merged import read_merged
    from diffuse_cli.symmetry import b_matrix

    ours = read_merged(str(args.work / "ours" / "merged" / "merged.npz"))
    with np.load(args.work / "mdx2" / "merged_export.npz") as z:
        theirs = {k: z[k] for k in z.files}
    ndiv = np.broadcast_to(np.asarray(ours["ndiv"], dtype=float), (3,))
    if not np.allclose(ndiv, theirs["ndiv"]):
        raise SystemExit(f"grids differ: ours ndiv {ndiv}, mdx2 {theirs['ndiv']}")
    hkl = np.stack([theirs["h"], theirs["k"], theirs["l"]], axis=1).astype(np.float64)
    I_theirs = theirs["intensity"].astype(np.float64)
    axes = [np.asarray(ours[a], dtype=np.float64) for a in ("h", "k", "l")]
    index = np.rint((hkl - np.array([a[0] for a in axes])) * ndiv).astype(np.int64)
    inside = np.all((index >= 0) & (index < np.array([len(a) for a in axes])), axis=1)
    I_ours = np.full(len(hkl), np.nan)
    i, j, k = index[inside].T
    I_ours[inside] = np.asarray(ours["I"], dtype=np.float64)[i, j, k]
    # the lookup is exact: ours' voxel centre equals mdx2's fractional hkl
    centre = np.stack([axes[0][i], axes[1][j], axes[2][k]], axis=1)
    if len(centre) and np.abs(centre - hkl[inside]).max() > 1e-4:
        raise SystemExit("our grid's voxel centres do not match mdx2's hkl")
    common = np.isfinite(I_ours) & np.isfinite(I_theirs)
    s = np.linalg.norm(hkl[common] @ b_matrix(ours["unit_cell"]).T, axis=1)  # |q| = 1/d (Å⁻¹)
    a, b = I_ours[common], I_theirs[common]
    inner = s <= q_complete
    cc_inner, _ = anisotropic_cc(a[inner], b[inner], s[inner], args.shells)
    cc_all, edges = anisotropic_cc(a, b, s, args.shells)
    which = np.clip(np.digitize(s, edges) - 1, 0, args.shells - 1)
    ra, rb = shell_residual(a, s, edges), shell_residual(b, s, edges)
    per_shell = []
    for i in range(args.shells):
        m = which == i
        if m.sum() >= 20:
            per_shell.append({"d_max_A": round(float(1 / max(edges[i], 1e-9)), 3),
                              "d_min_A": round(float(1 / edges[i + 1]), 3), "voxels": int(m.sum()),
                              "cc_anisotropic": round(float(np.corrcoef(ra[m], rb[m])[0, 1]), 4)})
    return {
        "mdx2_voxels": int(len(hkl)), "ours_measured_voxels": int(np.isfinite(ours["I"]).sum()),
        "common_voxels": int(common.sum()), "d_min_common_A": round(float(1 / s.max()), 3),
        "d_complete_A": round(float(1 / q_complete), 3), "complete_shell_voxels": int(inner.sum()),
        "n_shells": args.shells,
        "cc_anisotropic": round(cc_inner, 4),
        "cc_anisotropic_all_common": round(cc_all, 4),
        "cc_total": round(float(np.corrcoef(a[inner], b[inner])[0, 1]), 4),
        "per_shell": per_shell,
    }


# ---------------------------------------------------------------- profile


# cProfile on CPU time (process_time), not wall: the machine is shared
PROFILE_RUNNER = ("import cProfile, runpy, sys, time\n"
                  "out, sys.argv = sys.argv[1], sys.argv[2:]\n"
                  "prof = cProfile.Profile(time.process_time)\n"
                  "prof.enable()\n"
                  "try:\n"
                  "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
                  "finally:\n"
                  "    prof.disable()\n"
                  "    prof.dump_stats(out)\n")


def startup_cpu(args, python, module: str) -> dict:
    """Start-up floor of one step: a process that only imports its module."""
    return timed([python, "-c", f"import {module}"], args.work, args.work / "startup.out")


def profile_ours(args, sweep) -> dict:
    """cProfile (CPU time) of bragg_mask, extract and correct (own folders, cold); top functions by own time."""
    import io
    import pstats

    root = args.work / "profile"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    expt, refl = sweep["expt"], sweep["refl"]
    commands = {
        "bragg_mask": [expt, refl, f"output.directory={root / 'masks'}"],
        "extract": [expt, f"masks.summary={root / 'masks' / 'summary.json'}",
                    f"output.directory={root / 'extracted'}"],
        "correct": [expt, root / "extracted", f"output.directory={root / 'corrected'}"],
    }
    report = {}
    for step, cmd in commands.items():
        say(args, f"profile: diffuse.{step}")
        prof = root / f"{step}.prof"
        t = timed([sys.executable, "-c", PROFILE_RUNNER, prof, OUR_BIN / f"diffuse.{step}", *cmd, "nproc=1",
                   f"output.log={root / (step + '.log')}"], root, root / f"{step}.out")
        stats = pstats.Stats(str(prof))
        rows = []
        package = str(REPO / "diffuse_cli") + os.sep
        for (file, line, func), (_, nc, tt, ct, _callers) in stats.stats.items():
            name = file[len(package):] if file.startswith(package) else pathlib.Path(file).name
            rows.append({"function": f"{name}:{line}({func})", "calls": nc, "ours": file.startswith(package),
                         "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)})
        by_own = sorted(rows, key=lambda r: -r["tottime_s"])[:args.top]
        ours_only = sorted((r for r in rows if r["ours"]), key=lambda r: -r["cumtime_s"])[:args.top]
        text = io.StringIO()
        pstats.Stats(str(prof), stream=text).sort_stats("cumulative").print_stats(args.top)
        (root / f"{step}_cumulative.txt").write_text(text.getvalue())
        report[step] = {**t, "top_own_time": by_own, "top_cumulative_ours": ours_only,
                        "profile": str(prof)}
    return report


# ---------------------------------------------------------------- report


def total(times: dict, key: str) -> float:
    return round(sum(t[key] for t in times.values()), 3)


def print_table(result: dict) -> None:
    ours, theirs = result.get("ours"), result.get("mdx2")
    print(f"\nnuclease sweep: {result['n_frames']} frames of 1024x1024, one core (nproc=1)"
          + ("" if result.get("shoeboxes_in_refl", True) else "; .refl without shoeboxes")
          + ("" if result.get("merge_plots", True) else "; merge output.plots=False"))
    if result.get("workarounds"):
        print("mdx2 workarounds: " + "; ".join(result["workarounds"]))
    startup = result.get("startup", {})
    print(f"\n{'step':<26}{'wall (s)':>10}{'CPU (s)':>10}" + (f"{'start-up CPU (s)':>18}" if startup else ""))
    for key, label, times in (("ours", "diffuse", ours), ("mdx2", "mdx2 " + MDX2_VERSION, theirs)):
        if not times:
            continue
        floor = startup.get(key, {})
        for step, t in times.items():
            extra = f"{floor[step]['cpu_s']:>18.2f}" if step in floor else ""
            print(f"{label + ' ' + step:<26}{t['wall_s']:>10.2f}{t['cpu_s']:>10.2f}{extra}")
        extra = f"{total(floor, 'cpu_s'):>18.2f}" if floor else ""
        print(f"{label + ' total':<26}{total(times, 'wall_s'):>10.2f}{total(times, 'cpu_s'):>10.2f}{extra}\n")
    if ours and theirs:
        r = result["ratio"]
        print(f"ours / mdx2: wall {r['wall']:.3f}, CPU {r['cpu']:.3f} (target <= 0.333)")
        print(f"ours without merge / mdx2: CPU {r['cpu_without_merge']:.3f}")
        if startup:
            beyond = [total(t, "cpu_s") - total(startup[k], "cpu_s") for k, t in (("ours", ours), ("mdx2", theirs))]
            print(f"CPU beyond the start-up floors: ours {beyond[0]:.2f} s, mdx2 {beyond[1]:.2f} s "
                  f"(ratio {beyond[0] / beyond[1]:.3f})")
    if "map" in result:
        m = result["map"]
        print(f"map CC, {m['complete_shell_voxels']} common voxels in complete shells (d >= {m['d_complete_A']} Å, "
              f"{m['n_shells']} |q| shells): anisotropic {m['cc_anisotropic']:.4f} (target >= 0.9), "
              f"total {m['cc_total']:.4f}")
        print(f"  all {m['common_voxels']} common voxels (to {m['d_min_common_A']} Å, corners included): "
              f"anisotropic {m['cc_anisotropic_all_common']:.4f}")
        print("  per shell (all common voxels): " + ", ".join(
            f"{r['d_min_A']:.2f} Å {r['cc_anisotropic']:.2f}" for r in m["per_shell"]))
    for step, p in result.get("profile", {}).items():
        print(f"\nprofile diffuse.{step} (CPU s under cProfile: {p['cpu_s']:.2f}), top own CPU time:")
        for row in p["top_own_time"]:
            print(f"  {row['tottime_s']:>8.3f} s own {row['cumtime_s']:>8.3f} s cum {row['calls']:>9}  "
                  f"{row['function']}")
        print("  ours by cumulative CPU time:")
        for row in p["top_cumulative_ours"]:
            print(f"  {row['tottime_s']:>8.3f} s own {row['cumtime_s']:>8.3f} s cum {row['calls']:>9}  "
                  f"{row['function']}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("DIFFUSE_SHARED_DATA", REPO.parent / "shared" / "data")),
                    help="shared data folder (with snase_rotation/)")
    ap.add_argument("--work", type=pathlib.Path, default=REPO / ".bench" / "vs_mdx2",
                    help="working folder: images, DIALS processing and both chains' outputs (reused)")
    ap.add_argument("--venv", type=pathlib.Path, default=REPO / ".bench" / "mdx2-venv",
                    help="mdx2's venv (created once)")
    ap.add_argument("--only", choices=["both", "ours", "mdx2", "compare"], default="both",
                    help="run one chain (the other's last outputs are still compared), or only compare")
    ap.add_argument("--count-threshold", type=float, default=5000.0,
                    help="mdx2.find_peaks count threshold (ADU; these frames: median 666, 99.9th percentile ~5300)")
    ap.add_argument("--shells", type=int, default=30, help="|q| shells for the isotropic part")
    ap.add_argument("--profile", action="store_true", help="also cProfile bragg_mask, extract and correct")
    ap.add_argument("--no-shoeboxes", dest="shoeboxes", action="store_false",
                    help="process the sweep with output.integrated_shoeboxes=False (folder processed_no_shoeboxes): "
                         "bragg_mask's predicted masks do not read shoeboxes, and the .refl keeping them "
                         "(346 MB here) costs bragg_mask ~1.5 s CPU and 1.4 GB to read")
    ap.add_argument("--no-plots", dest="plots", action="store_false",
                    help="diffuse.merge output.plots=False (mdx2 draws no pictures; ours cost ~3 s CPU here)")
    ap.add_argument("--startup", action="store_true",
                    help="also time each step's start-up floor (a process importing its module only)")
    ap.add_argument("--top", type=int, default=15, help="functions per profile")
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    args.venv = args.venv.resolve()

    os.environ["LIBTBX_BUILD"] = LIBTBX_BUILD  # for dxtbx in this process
    import diffuse_cli  # noqa: F401  (DIALS environment)

    images = prepare_images(args.data, args.work)
    sweep = prepare_sweep(args, images)
    inputs = mdx2_inputs(args, sweep["expt"])
    result = {"n_frames": len(images), "ndiv": NDIV, "space_group": inputs["space_group"],
              "shoeboxes_in_refl": args.shoeboxes, "merge_plots": args.plots,
              "mdx2_version": MDX2_VERSION, "workarounds": inputs["workarounds"],
              "dials_processing": {k: v for k, v in sweep.items() if k not in ("expt", "refl")},
              "mdx2_count_threshold": args.count_threshold}
    saved = args.work / "results.json"
    last = json.loads(saved.read_text()) if saved.exists() else {}
    if args.only in ("both", "ours"):
        result["ours"] = run_ours(args, sweep, inputs["space_group"].replace(" ", ""))
    elif "ours" in last:
        result["ours"] = last["ours"]
    if args.only in ("both", "mdx2"):
        result["mdx2"] = run_mdx2(args, mdx2_python(args), inputs)
    elif "mdx2" in last:
        result["mdx2"] = last["mdx2"]
    if result.get("ours") and result.get("mdx2"):
        o, m = result["ours"], result["mdx2"]
        no_merge = {k: v for k, v in o.items() if k != "merge"}
        result["ratio"] = {"wall": round(total(o, "wall_s") / total(m, "wall_s"), 3),
                           "cpu": round(total(o, "cpu_s") / total(m, "cpu_s"), 3),
                           "cpu_without_merge": round(total(no_merge, "cpu_s") / total(m, "cpu_s"), 3)}
    if (args.work / "ours" / "merged" / "merged.npz").exists() and (
            args.work / "mdx2" / "merged_export.npz").exists():
        result["map"] = compare_maps(args, complete_shell_q(sweep["expt"]))
    if args.startup:
        say(args, "start-up floors")
        result["startup"] = {
            "ours": {step: startup_cpu(args, sys.executable, f"diffuse_cli.command_line.{step}")
                     for step in OURS_STEPS},
            "mdx2": {step: startup_cpu(args, mdx2_python(args), f"mdx2.command_line.{step}")
                     for step in MDX2_STEPS}}
    elif "startup" in last:
        result["startup"] = last["startup"]
    if args.profile:
        result["profile"] = profile_ours(args, sweep)
    saved.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
        print(f"\n(all figures: {saved})")
    return result


if __name__ == "__main__":
    main()
