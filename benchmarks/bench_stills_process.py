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

6. ``per_still``: one child process that takes each still through both
   routes back to back (order alternating from still to still, after one
   uncounted warm-up still) and measures each route's CPU time
   (``time.process_time``) per still and per stage: plain DIALS (import,
   ``Processor.process_experiments``, ``finalize``; same seed and per-still
   log file as ours) against the XFEL mode's ``process_item`` on a still it
   does not integrate. This is the per-still cost of a long run (program
   start, the integrated sample and the run's summary, combined files and
   pictures excluded) and the one figure the issue's 1.8x is about;

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
      [runs=dials,diffuse1,diffuse2,xfel,xfel_fast,per_still]
"""

from __future__ import annotations

import bz2
import copy
import json
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


STAGES = ("find_spots", "index", "refine", "integrate")


def per_still_child(out_json, images):
    """Both routes on each still in this process: CPU seconds per still and stage (JSON)."""
    import logging

    import diffuse_cli  # noqa: F401  (DIALS environment, mono_sim shim)
    import dials.command_line.stills_process as dsp
    from dials.command_line.dials_import import ManualGeometryUpdater
    from libtbx.phil import parse

    from diffuse_cli.command_line.stills_process import phil_scope
    from diffuse_cli.stills.inputs import Item
    from diffuse_cli.stills.isolation import seed_random_generators, still_log
    from diffuse_cli.stills.records import Config
    from diffuse_cli.stills.still_route import process_item
    from dials.algorithms.indexing.compare_orientation_matrices import difference_rotation_matrix_axis_angle

    logging.getLogger("diffuse").handlers.clear()
    work = pathlib.Path(out_json).parent
    stage_cpu: dict = {}

    def wrap(name):
        func = getattr(dsp.Processor, name)

        def timed_stage(self, *args, **kwargs):
            c0 = time.process_time()
            try:
                return func(self, *args, **kwargs)
            finally:
                stage_cpu[name] = stage_cpu.get(name, 0.0) + time.process_time() - c0

        setattr(dsp.Processor, name, timed_stage)

    for name in STAGES:
        wrap(name)

    d_dir = work / "per_still_dials"
    d_dir.mkdir(exist_ok=True)
    dials_params = dsp.phil_scope.fetch(sources=[parse(a) for a in COMMON + [
        "mp.nproc=1", f"output.output_dir={d_dir}", "output.composite_output=True"]]).extract()
    x_dir = work / "per_still_xfel"
    ours = phil_scope.fetch(sources=[parse(a) for a in COMMON + [f"output.directory={x_dir}"]]).extract()
    config = Config(params=ours, directory=str(x_dir), fingerprint="bench", overwrite=True)

    def dials_still(path, tag):  # as dials.stills_process's do_work, one still per Processor
        params = copy.deepcopy(dials_params)
        seed_random_generators(tag)
        with still_log(str(d_dir / f"{tag}.log")):
            processor = dsp.Processor(params, composite_tag=tag, rank=0)
            experiments = dsp.do_import(path, load_models=True)
            ManualGeometryUpdater(params)(experiments[0].imageset)
            experiments[0].beam = experiments[0].imageset.get_beam()
            experiments[0].detector = experiments[0].imageset.get_detector()
            processor.process_experiments(tag, experiments)
            crystals = [e.crystal for e in processor.all_integrated_experiments]
            processor.finalize()
        return crystals

    def xfel_still(path, tag):
        row, _ = process_item(Item(path=path, tag=tag, integrate=False), config)
        if row["status"] != "indexed":
            return []
        from dxtbx.model.experiment_list import ExperimentList

        return [e.crystal for e in ExperimentList.from_file(str(x_dir / row["experiments"]), check_format=False)]

    def measure(func, path, tag):
        stage_cpu.clear()
        c0 = time.process_time()
        crystals = func(path, tag)
        total = time.process_time() - c0
        stages = {k: round(v, 3) for k, v in stage_cpu.items()}
        stages["other"] = round(total - sum(stage_cpu.values()), 3)
        return dict(cpu=round(total, 3), stages=stages), crystals

    routes = {"dials": dials_still, "xfel": xfel_still}
    first = pathlib.Path(images[0])
    for func in routes.values():  # warm-up: lazy imports and first-use caches, not counted
        func(str(first), "warmup_" + first.name.split(".")[0])
    rows = []
    for i, path in enumerate(images):
        tag = pathlib.Path(path).name.split(".")[0]
        order = ("dials", "xfel") if i % 2 == 0 else ("xfel", "dials")
        row, crystals = {"tag": tag}, {}
        for route in order:
            row[route], crystals[route] = measure(routes[route], path, tag)
        a, b = crystals["dials"], crystals["xfel"]
        row["n_lattices"] = (len(a), len(b))
        if len(a) == len(b) > 0:  # the two routes' crystal models (same seed: same indexing)
            row["max_dA"] = max(max(abs(x - y) for x, y in zip(ca.get_A(), cb.get_A())) for ca, cb in zip(a, b))
            row["misorientation_deg"] = max(
                difference_rotation_matrix_axis_angle(ca, cb)[2] for ca, cb in zip(a, b))
        rows.append(row)
        print(json.dumps(row), flush=True)
    pathlib.Path(out_json).write_text(json.dumps(rows))


def report_per_still(rows):
    print("per still, CPU s (same process, both routes back to back):")
    print(f"{'still':16s} {'dials':>7s} {'spots':>6s} {'index':>6s} {'integ':>6s} {'other':>6s} | "
          f"{'XFEL':>7s} {'spots':>6s} {'index':>6s} {'other':>6s} | {'ratio':>5s}  max|dA|, misorientation (deg)")
    for r in rows:
        d, x = r["dials"], r["xfel"]
        ds, xs = d["stages"], x["stages"]
        print(f"{r['tag']:16s} {d['cpu']:7.2f} {ds.get('find_spots', 0):6.2f} {ds.get('index', 0):6.2f} "
              f"{ds.get('integrate', 0):6.2f} {ds['other']:6.2f} | {x['cpu']:7.2f} {xs.get('find_spots', 0):6.2f} "
              f"{xs.get('index', 0):6.2f} {xs['other']:6.2f} | {d['cpu'] / x['cpu']:5.2f}  "
              f"{r.get('max_dA')}, {r.get('misorientation_deg')}")
    n = len(rows)
    d_sum = sum(r["dials"]["cpu"] for r in rows)
    x_sum = sum(r["xfel"]["cpu"] for r in rows)
    idx = sum(r["xfel"]["stages"].get("index", 0) for r in rows)
    own = sum(r["xfel"]["stages"]["other"] for r in rows)
    print(f"mean CPU per still: dials {d_sum / n:.2f} s, XFEL mode {x_sum / n:.2f} s: "
          f"dials / XFEL = {d_sum / x_sum:.2f}x   (target >= 1.8)")
    print(f"XFEL mode per still: indexing {100 * idx / x_sum:.0f} %, outside DIALS's stages "
          f"(import, profile model, checks, files, done-record, log) {100 * own / x_sum:.1f} %")


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

    runs = opts.get("runs", "dials,diffuse1,diffuse2,xfel,xfel_fast,per_still").split(",")
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
    if "per_still" in runs:
        out = work / "per_still.json"
        subprocess.run([sys.executable, __file__, "_per_still_child", str(out), *images], check=True)
        report_per_still(json.loads(out.read_text()))
    print(f"cpu count {os.cpu_count()}; wall numbers are only meaningful on an idle machine")
    print(f"load average after: {os.getloadavg()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_per_still_child"]:
        per_still_child(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1:])
