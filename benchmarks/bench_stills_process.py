"""Benchmark diffuse.stills_process against plain dials.stills_process.

Not a test. Runs, on the same images with the same DIALS parameters:

1. plain ``dials.stills_process`` (through its Python ``run()``, with the
   mono_sim shim that ``import diffuse_cli`` installs), mp.nproc=1;
2. ``diffuse.stills_process`` nproc=1;
3. ``diffuse.stills_process`` nproc=2;

and prints wall time and CPU time (user+sys of the child) per still, the
ratio diffuse/dials (target <= 1.10) and the parallel efficiency at nproc=2,
``t(nproc=1) / (2 t(nproc=2))`` (target >= 0.85). On a shared machine, wall
times depend on the load; CPU times do not (much).

Usage::

  .venv/bin/python benchmarks/bench_stills_process.py [n_stills=8] [data=../shared/data]
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

    results = {}
    d = work / "dials"
    d.mkdir()
    results["dials.stills_process nproc=1"] = timed(
        [sys.executable, "-c", DIALS_RUNNER, *images, *COMMON, "mp.nproc=1",
         f"output.output_dir={d}", "output.composite_output=True"], cwd=d)
    for nproc in (1, 2):
        o = work / f"diffuse_{nproc}"
        results[f"diffuse.stills_process nproc={nproc}"] = timed(
            [str(BIN / "diffuse.stills_process"), *images, *COMMON, f"nproc={nproc}",
             f"output.directory={o}", "overwrite=True"], cwd=work)

    print(f"{'run':34s} {'wall s/still':>12s} {'cpu s/still':>12s}")
    for name, (wall, cpu) in results.items():
        print(f"{name:34s} {wall / n:12.2f} {cpu / n:12.2f}")
    w_d, c_d = results["dials.stills_process nproc=1"]
    w_1, c_1 = results["diffuse.stills_process nproc=1"]
    w_2, _ = results["diffuse.stills_process nproc=2"]
    print(f"diffuse/dials wall ratio (nproc=1): {w_1 / w_d:.3f}   (target <= 1.10)")
    print(f"diffuse/dials cpu ratio  (nproc=1): {c_1 / c_d:.3f}")
    _, c_2 = results["diffuse.stills_process nproc=2"]
    print(f"parallel efficiency at nproc=2 (wall): {w_1 / (2 * w_2):.3f}   (target >= 0.85)")
    # with 2 free cores, wall efficiency -> cpu(nproc=1)/cpu(nproc=2) minus load imbalance
    print(f"cpu(nproc=1)/cpu(nproc=2): {c_1 / c_2:.3f}   (parallel overhead in CPU time)")
    print(f"cpu count {os.cpu_count()}; wall numbers are only meaningful on an idle machine")
    print(f"load average after: {os.getloadavg()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
