"""Benchmark diffuse.stills_process against plain dials.stills_process.

Not a test. Runs, on the same images with the same DIALS parameters:

1. plain ``dials.stills_process`` (through its Python ``run()``, with the
   mono_sim shim that ``import diffuse_cli`` installs), mp.nproc=1;
2. ``diffuse.stills_process`` nproc=1;
3. ``diffuse.stills_process`` nproc=2;
4. ``diffuse.stills_process`` nproc=1 in the XFEL mode, ``integration.sample=1``
   (one still integrated, the others indexed and refined only);
5. the same with ``indexing.basis_vector_combinations.max_refine=1`` (DIALS's
   stills indexer refines only its first candidate instead of 5; with the
   crystal misorientation against run 2 per still);

and prints wall time and CPU time (user+sys of the child) per still, the
ratio diffuse/dials (target <= 1.10) and the parallel efficiency at nproc=2,
``t(nproc=1) / (2 t(nproc=2))`` (target >= 0.85). For the XFEL mode it also
prints the per-still time of the stills that were not integrated (summary
column ``time_s``: the cost per still of a long run, where the sample is a
vanishing fraction) against the integrated stills' (target: dials / mode
>= 1.8). On a shared machine, wall times depend on the load; CPU times do not
(much).

Usage::

  .venv/bin/python benchmarks/bench_stills_process.py [n_stills=8] [data=../shared/data]
      [runs=dials,diffuse1,diffuse2,xfel,xfel_fast]
"""

from __future__ import annotations

import bz2
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent

COMMON = [
    "indexing.known_symmetry.space_group=P41212",
    "indexing.known_symmetry.unit_cell=58.4,58.4,152.3",
    # what diffuse.stills_process keeps by default (output.integrated_shoeboxes)
    "integration.debug.output=True",
    "integration.debug.separate_files=False",
    "integration.debug.delete_shoeboxes=False",
]

DIALS_RUNNER = "import diffuse_cli, sys; from dials.command_line.stills_process import run; run(sys.argv[1:])"


def timed(cmd, cwd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, cpu


def misorientations(full_dir, other_dir) -> dict:
    """{identifier: rotation (deg) between the two runs' crystal models} (combined.expt)."""
    import diffuse_cli  # noqa: F401  (DIALS environment)
    from dials.algorithms.indexing.compare_orientation_matrices import difference_rotation_matrix_axis_angle
    from dxtbx.model.experiment_list import ExperimentList

    a = {e.identifier: e for e in ExperimentList.from_file(str(full_dir / "combined.expt"), check_format=False)}
    b = {e.identifier: e for e in ExperimentList.from_file(str(other_dir / "combined.expt"), check_format=False)}
    return {k: round(difference_rotation_matrix_axis_angle(a[k].crystal, b[k].crystal)[2], 4)
            for k in sorted(set(a) & set(b))}


def main(argv):
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    n = int(opts.get("n_stills", 8))
    data = pathlib.Path(opts.get("data", REPO.parent / "shared" / "data"))
    src = sorted((data / "thaumatin_grid_stills").glob("*.cbf.bz2"))[:n]
    if len(src) < n:
        sys.exit(f"need {n} thaumatin stills in {data}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_sp_"))
    images = []
    for f in src:
        out = work / f.name[:-4]
        with bz2.open(f) as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        images.append(str(out))
    print(f"{n} thaumatin stills in {work}; load average {os.getloadavg()}")

    runs = opts.get("runs", "dials,diffuse1,diffuse2,xfel,xfel_fast").split(",")
    results = {}
    D, F1, F2, X = ("dials.stills_process nproc=1", "diffuse.stills_process nproc=1",
                    "diffuse.stills_process nproc=2", "diffuse XFEL mode nproc=1")
    XF = "diffuse XFEL mode + max_refine=1"
    if "dials" in runs:
        d = work / "dials"
        d.mkdir()
        results[D] = timed(
            [sys.executable, "-c", DIALS_RUNNER, *images, *COMMON, "mp.nproc=1",
             f"output.output_dir={d}", "output.composite_output=True"], cwd=d)
    for nproc in (1, 2):
        if f"diffuse{nproc}" in runs:
            o = work / f"diffuse_{nproc}"
            results[F1 if nproc == 1 else F2] = timed(
                [str(BIN / "diffuse.stills_process"), *images, *COMMON, f"nproc={nproc}",
                 f"output.directory={o}", "overwrite=True"], cwd=work)
    if "xfel" in runs:
        o = work / "xfel"
        results[X] = timed(
            [str(BIN / "diffuse.stills_process"), *images, *COMMON, "nproc=1", "integration.sample=1",
             f"output.directory={o}", "overwrite=True"], cwd=work)
    if "xfel_fast" in runs:  # and DIALS's stills indexer refining only its first candidate
        o = work / "xfel_fast"
        results[XF] = timed(
            [str(BIN / "diffuse.stills_process"), *images, *COMMON, "nproc=1", "integration.sample=1",
             "indexing.basis_vector_combinations.max_refine=1", f"output.directory={o}", "overwrite=True"],
            cwd=work)

    print(f"{'run':34s} {'wall s/still':>12s} {'cpu s/still':>12s}")
    for name, (wall, cpu) in results.items():
        print(f"{name:34s} {wall / n:12.2f} {cpu / n:12.2f}")
    if D in results and F1 in results:
        w_d, c_d = results[D]
        w_1, c_1 = results[F1]
        print(f"diffuse/dials wall ratio (nproc=1): {w_1 / w_d:.3f}   (target <= 1.10)")
        print(f"diffuse/dials cpu ratio  (nproc=1): {c_1 / c_d:.3f}")
    if F1 in results and F2 in results:
        w_1, c_1 = results[F1]
        w_2, c_2 = results[F2]
        print(f"parallel efficiency at nproc=2 (wall): {w_1 / (2 * w_2):.3f}   (target >= 0.85)")
        # with 2 free cores, wall efficiency -> cpu(nproc=1)/cpu(nproc=2) minus load imbalance
        print(f"cpu(nproc=1)/cpu(nproc=2): {c_1 / c_2:.3f}   (parallel overhead in CPU time)")
    for name, sub in ((X, "xfel"), (XF, "xfel_fast")):
        if name not in results:
            continue
        import json

        rows = json.loads((work / sub / "stills_process_summary.json").read_text())["rows"]
        t_idx = [r["time_s"] for r in rows if r["status"] == "indexed" and not r["integrated"]]
        t_int = [r["time_s"] for r in rows if r["integrated"]]
        per = sum(t_idx) / max(len(t_idx), 1)
        print(f"XFEL mode: {len(t_int)} still integrated ({sum(t_int) / max(len(t_int), 1):.2f} s), "
              f"{len(t_idx)} indexed and refined only: {per:.2f} s per still (summary time_s)")
        if D in results:
            w_d, c_d = results[D]
            w_x, c_x = results[name]
            print(f"dials / {name} per still, whole runs (1 of {n} integrated): wall {w_d / w_x:.2f}x, "
                  f"cpu {c_d / c_x:.2f}x   (target >= 1.8)")
        if F1 in results:  # the models against full integration's
            print(f"  misorientation against {F1} (deg): {misorientations(work / 'diffuse_1', work / sub)}")
    print(f"cpu count {os.cpu_count()}; wall numbers are only meaningful on an idle machine")
    print(f"load average after: {os.getloadavg()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
