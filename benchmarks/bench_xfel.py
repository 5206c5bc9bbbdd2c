"""Benchmark the XFEL chain at scale: bragg_mask, extract, correct, merge on many shots.

A few distinct multi-panel shots (CSPAD-like, 8 tilted modules) come from
diffuse.simulate kind=xfel; every shot of the run is one of them (a symlink of
its own name, so every step reads and writes every shot) with its own
wavelength (0.2 % rms jitter) and orientation (0.3° rms rotation of the
simulated one) in the ``.expt``. Each program runs as a user runs it
(console script, nproc=1) on 10² and on 10⁴ shots; per step it reports:

* seconds per still per core: the CPU time of the program divided by the
  shots, and the marginal cost (difference of the two runs over the
  difference of the shots: start-up and per-detector caches cancel), with
  the per-pixel rate (ns per pixel) and its 6M-pixel scaling;
* disk bytes per still (extract, correct, masks) against the bzip2-compressed image;
* cache bytes on disk (geometry_*.npz, factors_*.npz) and in memory
  (extraction.GeometryCache, corrections' per-detector memo after reading
  every corrected shot): they must be the same for both runs;
* peak RSS of each program (os.wait4);
* speed-up at 2 workers: diffuse.merge under ``mpirun -n 2`` (mp.method=mpi),
  and extract + correct with nproc=2 (forked workers; they have no MPI mode).

Then extract + correct on a 6M-pixel multi-panel still (2 × 2 panels of
1240², simulated; replicated with jitter like the small ones) timed per
still through the programs' per-still code (CPU time, after the first
still, which builds the per-detector caches): the figure issue 12 targets
(<= 0.12 s per 6M-pixel still per core).

``--ambiguity N`` also runs benchmarks/bench_ambiguity.py's ``run(N)`` (if
that module exists).

Usage:
  .venv/bin/python benchmarks/bench_xfel.py            # 10^2 and 10^4 shots, 6M: 20 shots (~25 min)
  .venv/bin/python benchmarks/bench_xfel.py --quick    # 8 and 32 shots, 6M: 3 shots (< 3 min on a quiet machine)
  options: --shots 100,10000  --big-shots 20  --no-mpi  --no-6m  --ambiguity N  --keep DIR  --json FILE
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
JITTER = 2e-3  # rms relative wavelength jitter
ROTATION_DEG = 0.3  # rms orientation change between replicated shots
SPACE_GROUP = "P43212"
SIX_M = 6_224_001  # pixels of a Pilatus 6M


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")
    return e


def run_step(argv, cwd, log) -> dict:
    """Run a program; its wall and CPU seconds (with its children) and peak RSS (MB).

    The peak RSS is GNU time's (%M): a child forked from this process starts
    with this process's high-water mark in its rusage, a small ``time`` does not.
    """
    argv = [str(a) for a in argv]
    rss_file = pathlib.Path(f"{log}.rss")
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time:
        argv = [gnu_time, "-f", "%M", "-o", str(rss_file), *argv]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(argv, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env())
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{argv[0]} failed (exit {p.returncode}); see {log}")
    peak_kb = int(rss_file.read_text().split()[-1]) if gnu_time else usage.ru_maxrss
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": peak_kb / 1024}


# ---------------------------------------------------------------- shots


def simulate(directory: pathlib.Path, n: int, seed: int, big: bool) -> pathlib.Path:
    """n distinct simulated XFEL shots (small CSPAD-like detector, or 6M pixels);
    kept from an earlier run in the same --keep directory."""
    if (directory / "truth.json").exists() and len(list(directory.glob("image_*.cbf"))) == n:
        return directory
    if big:
        det = ["multi.layout=grid", "multi.n_panels_fast=2", "multi.n_panels_slow=2",
               "multi.panel_size=1240,1240", "multi.gap_px=10", "detector_model.distance=200"]
    else:
        det = ["multi.layout=cspad", "multi.panel_size=160,80", "multi.modules_per_quadrant=2",
               "multi.gap_px=8", "multi.tilt_deg=0.3", "multi.rotation_deg=0.5",
               "detector_model.distance=85", "detector_model.pixel_size=0.11"]
    run_step([BIN / "diffuse.simulate", "kind=xfel", f"n_stills={n}", f"seed={seed}", "detector=multi", *det,
              f"xfel.wavelength_jitter={JITTER}", "truth.map=False", f"output.directory={directory}",
              f"output.log={directory}.log"], directory.parent, f"{directory}.out")
    return directory


def make_shots(sim: pathlib.Path, root: pathlib.Path, n: int, seed: int = 1):
    """root/combined.expt with n shots, each a symlink to one simulated image,
    with its own wavelength and a slightly rotated crystal."""
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model import BeamFactory, Crystal, Experiment, ExperimentList
    from dxtbx.model.experiment_list import ExperimentListFactory
    from scitbx import matrix

    truth = json.loads((sim / "truth.json").read_text())
    images = sorted(sim.glob("image_*.cbf"))
    base = [ExperimentListFactory.from_filenames([str(p)])[0] for p in images]
    A_by_image = [np.array(s["A"], dtype=np.float64) for s in truth["stills"]]
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    el = ExperimentList()
    for i in range(n):
        d = i % len(images)
        link = root / "images" / f"shot_{i:05d}.cbf"
        if not link.exists():
            link.symlink_to(images[d].resolve())
        beam = BeamFactory.from_dict(base[d].beam.to_dict())  # a copy
        beam.set_wavelength(base[d].beam.get_wavelength() * (1 + JITTER * rng.standard_normal()))
        axis = rng.normal(size=3)
        R = matrix.col(axis / np.linalg.norm(axis)).axis_and_angle_as_r3_rotation_matrix(
            ROTATION_DEG * rng.standard_normal(), deg=True)
        A = np.array(R.elems).reshape(3, 3) @ A_by_image[d]
        real = np.linalg.inv(A)  # rows: a, b, c (Å)
        crystal = Crystal(tuple(real[0]), tuple(real[1]), tuple(real[2]), space_group_symbol=SPACE_GROUP)
        iset = ImageSetFactory.make_imageset([str(link)], base[d].imageset.get_format_class(), check_format=False)
        el.append(Experiment(beam=beam, detector=base[0].detector, crystal=crystal, imageset=iset,
                             identifier=f"shot-{i:05d}"))
    el.as_file(str(root / "combined.expt"))
    return el, images


def bzip2_bytes(images) -> float:
    return float(np.mean([len(bz2.compress(p.read_bytes(), 9)) for p in images]))


# ---------------------------------------------------------------- one run of the chain


def chain(root: pathlib.Path, n_pixels: int, mpi: bool, nproc2: bool) -> dict:
    """The four programs on root/combined.expt; step figures, disk and cache bytes."""
    expt = root / "combined.expt"
    steps = {
        "bragg_mask": [BIN / "diffuse.bragg_mask", expt, "predicted.excitation=0.002", "predicted.radius_px=2",
                       "nproc=1", "output.directory=masks"],
        "extract": [BIN / "diffuse.extract", expt, "masks.summary=masks/summary.json", "nproc=1",
                    "output.directory=extracted"],
        "correct": [BIN / "diffuse.correct", expt, "extracted", "nproc=1", "output.directory=corrected"],
        "merge": [BIN / "diffuse.merge", expt, "corrected", "ndiv=2", f"space_group={SPACE_GROUP}",
                  "output.directory=merged"],
    }
    out = {"n_pixels": n_pixels}
    for d in ("masks", "extracted", "corrected", "merged", "extracted_2", "corrected_2", "merged_mpi"):
        shutil.rmtree(root / d, ignore_errors=True)  # a rerun in a --keep directory redoes everything
    for name, argv in steps.items():
        out[name] = run_step(argv, root, root / f"{name}.out")
    n = len(list((root / "corrected").glob("shot_*.npz")))
    out["n_shots"] = n
    # disk per still
    def per_still(pattern):
        files = list(root.glob(pattern))
        return sum(f.stat().st_size for f in files) / max(1, n)
    out["disk_bytes_per_still"] = {
        "extract": per_still("extracted/shot_*.npz"),
        "correct": per_still("corrected/shot_*.npz"),
        "bragg_mask": per_still("masks/shot_*"),
    }
    out["cache_disk_bytes"] = {p.name: p.stat().st_size for p in
                               [*root.glob("extracted/geometry_*.npz"), *root.glob("corrected/factors_*.npz")]}
    out["cache_memory_bytes"] = memory_caches(root)
    if nproc2:  # extract + correct again with 2 forked workers (they have no MPI mode)
        for name in ("extract", "correct"):
            argv = [a if a != "nproc=1" else "nproc=2" for a in steps[name]] + ["overwrite=True"]
            argv = [a if not str(a).startswith("output.directory=") else f"{a}_2" for a in argv]
            if name == "correct":
                argv[2] = "extracted_2"
            out[f"{name}_nproc2"] = run_step(argv, root, root / f"{name}_2.out")
    if mpi and shutil.which("mpirun"):
        argv = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", BIN / "python",
                BIN / "diffuse.merge", *steps["merge"][1:], "mp.method=mpi", "output.directory=merged_mpi"]
        out["merge_mpi2"] = run_step(argv, root, root / "merge_mpi.out")
    return out


def memory_caches(root: pathlib.Path) -> dict:
    """Bytes held by the in-memory caches after every shot went through them
    (in a child process: this one must not import mpi4py or hold them)."""
    code = f"""
import json, pathlib, numpy as np
import diffuse_cli
from dxtbx.model.experiment_list import ExperimentListFactory
from diffuse_cli import corrections as C, extraction as ex
root = pathlib.Path({str(root)!r})
el = ExperimentListFactory.from_json_file(str(root / "combined.expt"), check_format=False)
cache = ex.GeometryCache(str(root / "extracted"))
for e in el:
    cache.get(e.detector, e.beam)
def nbytes(x):
    if isinstance(x, np.ndarray):
        return x.nbytes
    if isinstance(x, dict):
        return sum(nbytes(v) for v in x.values())
    return 0
geometry = sum(g.s1_unit.nbytes for g in cache._by_key.values())
memo = {{}}
for f in sorted((root / "corrected").glob("shot_*.npz")):
    C.load_observations(str(f), cache=memo)
print(json.dumps({{"geometry_cache_entries": len(cache._by_key), "geometry_cache": geometry,
                  "factors_memo_entries": len(memo), "factors_memo": sum(nbytes(v) for v in memo.values())}}))
"""
    r = subprocess.run([BIN / "python", "-c", code], capture_output=True, text=True, env=env(), check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- 6M-pixel stills


def six_m(work: pathlib.Path, n_shots: int) -> dict:
    """The 6M-pixel figures, measured in a child process (its own peak RSS)."""
    r = run_step([BIN / "python", __file__, "--six-m-child", str(work), str(n_shots)], work, work / "six_m.out")
    figures = json.loads((work / "six_m.json").read_text())
    figures["timing_process_peak_rss_mb"] = r["peak_rss_mb"]
    return figures


def six_m_child(work: pathlib.Path, n_shots: int) -> None:
    """extract + correct per 6M-pixel still through the programs' per-still code
    (CPU s; the first still, which builds the per-detector caches, apart), then
    the two programs themselves on the same shots (their peak RSS)."""
    import diffuse_cli  # noqa: F401
    from diffuse_cli import correct_driver, corrections, extraction as ex, masking as mk, program
    from diffuse_cli.formats import factors as factors_format

    sim = simulate(work / "sim6", 2, seed=22, big=True)
    root = work / "six_m"
    el, images = make_shots(sim, root, n_shots, seed=2)
    n_pixels = sum(p.get_image_size()[0] * p.get_image_size()[1] for p in el[0].detector)
    ext, cor = root / "extracted", root / "corrected"
    ext.mkdir(exist_ok=True)
    cor.mkdir(exist_ok=True)
    cache = ex.GeometryCache(str(ext))
    static = mk.from_dials(el[0].imageset.get_mask(0))
    mask_file = root / "static_mask_bits.npz"  # the packed mask diffuse.extract reads per still
    mk.write_mask_bits(mask_file, static)
    program.write_pickle(root / "static.mask", mk.to_dials(static, cache.get(el[0].detector, el[0].beam)))
    options = corrections.CorrectionOptions()
    refs = ex.image_refs(el)
    bz2_of = [len(bz2.compress(p.read_bytes(), 9)) for p in images]  # shot i is image i % len(images)
    t_read, t_ex, t_co, sizes = [], [], [], []
    for i, (expt, ref) in enumerate(zip(el, refs)):
        # the image read alone (image_read.raw_panels, what extract_still reads: the panels, not
        # joined; its own read below then comes from the reader's cache of the last image)
        c0 = time.process_time()
        ex.image_read.raw_panels(expt.imageset, ref.image_index)
        t_read.append(time.process_time() - c0)
        c0 = time.process_time()
        geometry = cache.get(expt.detector, expt.beam)
        mask = mk.read_mask_any(mask_file)
        arrays = ex.extract_still(expt, ref, mask, geometry)
        path = ext / f"{ref.name}.npz"
        ex.write_extract(path, ref=ref, experiment_identifier=expt.identifier, **arrays)
        t_ex.append(time.process_time() - c0)
        key = arrays["geometry_key"]
        if i == 0:  # per detector, once
            correct_driver.make_factors(str(factors_format.factors_path(cor, key)), key, expt.detector, expt.beam,
                                        ex.geometry_path(str(ext), key), options)
            reference = factors_format.read_factors(factors_format.factors_path(cor, key),
                                                    fields=corrections.WAVELENGTH_COEFFICIENTS)
        c0 = time.process_time()
        coefficients = corrections.wavelength_coefficients(expt.detector, expt.beam.get_wavelength(), options)
        task = {"source": str(path), "output": str(cor / path.name), "gain": 1.0, "background_mode": "none",
                "background_constant": 0.0, "background_constant_sigma": 0.0, "background_file": "",
                "provenance_key": "bench", "provenance": {}, "experiment_index": i, "normalisation": "unit",
                "normalisation_value": 1.0, "normalisation_source": "benchmark",
                "wavelength": expt.beam.get_wavelength(),
                "at_reference": corrections.same_coefficients(coefficients, reference), **coefficients}
        row = correct_driver.correct_still(task)
        if row["status"] != "corrected":
            sys.exit(f"correct failed: {row}")
        t_co.append(time.process_time() - c0)
        sizes.append((path.stat().st_size + (cor / path.name).stat().st_size) / bz2_of[i % len(images)])
    t_read, t_ex, t_co = np.array(t_read[1:]), np.array(t_ex[1:]), np.array(t_co[1:])
    ours = t_ex + t_co  # extract without the dxtbx read, + correct
    both = t_read + ours
    # the programs as a user runs them (nproc=1): wall, CPU, peak RSS per worker
    expt = root / "combined.expt"
    for d in ("extracted_program", "corrected_program"):
        shutil.rmtree(root / d, ignore_errors=True)  # a rerun in a --keep directory redoes everything
    programs = {
        "extract": run_step([BIN / "diffuse.extract", expt, f"masks.static={root / 'static.mask'}", "nproc=1",
                             "output.directory=extracted_program"], root, root / "extract.out"),
        "correct": run_step([BIN / "diffuse.correct", expt, "extracted_program", "nproc=1",
                             "output.directory=corrected_program"], root, root / "correct.out"),
    }
    figures = {
        "n_pixels": int(n_pixels),
        "n_shots": n_shots,
        "extract_cpu_s_per_still": float(np.median(t_read + t_ex)),
        "dxtbx_read_cpu_s": float(np.median(t_read)),
        "extract_without_read_cpu_s": float(np.median(t_ex)),
        "correct_cpu_s_per_still": float(np.median(t_co)),
        "extract_plus_correct_cpu_s_per_still": float(np.median(both)),
        "extract_plus_correct_cpu_s_min": float(both.min()),
        "without_read_cpu_s_per_still": float(np.median(ours)),
        "without_read_cpu_s_min": float(ours.min()),
        "per_6M_still_s": float(np.median(both)) * SIX_M / n_pixels,
        "per_6M_still_without_read_s": float(np.median(ours)) * SIX_M / n_pixels,
        "disk_over_bzip2_image": float(np.median(sizes[1:])),  # (extract + corrected file) / bzip2 of its image
        "bzip2_image_bytes": float(np.median(bz2_of)),
        "programs": programs,
    }
    (work / "six_m.json").write_text(json.dumps(figures, indent=1))


# ---------------------------------------------------------------- report


def summarise(runs: dict, bz2_bytes: float) -> dict:
    small, large = runs[min(runs)], runs[max(runs)]
    n0, n1 = small["n_shots"], large["n_shots"]
    px = large["n_pixels"]
    out = {"n_pixels": px, "shots": [n0, n1], "bzip2_image_bytes": bz2_bytes, "steps": {}}
    for step in ("bragg_mask", "extract", "correct", "merge"):
        per = large[step]["cpu_s"] / n1
        marginal = (large[step]["cpu_s"] - small[step]["cpu_s"]) / (n1 - n0)
        out["steps"][step] = {
            "cpu_s_per_still": per,
            "marginal_cpu_s_per_still": marginal,
            "ns_per_pixel": marginal / px * 1e9,
            "scaled_to_6M_s": marginal * SIX_M / px,
            "wall_s": large[step]["wall_s"],
            "peak_rss_mb": max(small[step]["peak_rss_mb"], large[step]["peak_rss_mb"]),
        }
    out["disk_bytes_per_still"] = large["disk_bytes_per_still"]
    out["cache_disk_bytes"] = {n0: small["cache_disk_bytes"], n1: large["cache_disk_bytes"]}
    out["cache_memory_bytes"] = {n0: small["cache_memory_bytes"], n1: large["cache_memory_bytes"]}
    out["caches_equal"] = (sorted(small["cache_disk_bytes"].values()) == sorted(large["cache_disk_bytes"].values())
                           and small["cache_memory_bytes"] == large["cache_memory_bytes"])
    speed = {}
    if "merge_mpi2" in large:
        speed["merge_mpirun_n2"] = large["merge"]["wall_s"] / large["merge_mpi2"]["wall_s"]
    if "extract_nproc2" in large:
        speed["extract_correct_nproc2"] = ((large["extract"]["wall_s"] + large["correct"]["wall_s"])
                                           / (large["extract_nproc2"]["wall_s"] + large["correct_nproc2"]["wall_s"]))
    out["speed_up_2"] = speed
    return out


def print_report(s: dict, big: dict | None, ambiguity: dict | None) -> None:
    n0, n1 = s["shots"]
    print(f"\nXFEL chain, {s['n_pixels']} pixels per shot (8 panels), {n0} and {n1} shots, nproc=1; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'step':11s} {'cpu s/still':>12s} {'marginal':>10s} {'ns/pixel':>9s} {'6M-equiv s':>11s} "
          f"{'wall s':>8s} {'peak RSS MB':>12s}")
    for step, r in s["steps"].items():
        print(f"{step:11s} {r['cpu_s_per_still']:12.4f} {r['marginal_cpu_s_per_still']:10.4f} {r['ns_per_pixel']:9.1f} "
              f"{r['scaled_to_6M_s']:11.3f} {r['wall_s']:8.1f} {r['peak_rss_mb']:12.0f}")
    d = s["disk_bytes_per_still"]
    print(f"disk per still: extract {d['extract'] / 1e3:.1f} kB + correct {d['correct'] / 1e3:.1f} kB "
          f"(bragg masks {d['bragg_mask'] / 1e3:.1f} kB) vs bzip2 image {s['bzip2_image_bytes'] / 1e3:.1f} kB")
    for n in (n0, n1):
        print(f"caches at {n:6d} shots: disk {s['cache_disk_bytes'][n]}, memory {s['cache_memory_bytes'][n]}")
    print(f"caches the same for {n0} and {n1} shots: {s['caches_equal']}")
    for k, v in s["speed_up_2"].items():
        print(f"speed-up at 2 workers, {k}: {v:.2f}x")
    if big:
        print(f"\n6M-pixel still ({big['n_pixels']} px, {big['n_shots']} shots), CPU s per still (median after the first):")
        print(f"  extract {big['extract_cpu_s_per_still']:.3f} s = image read {big['dxtbx_read_cpu_s']:.3f} s "
              f"+ the rest {big['extract_without_read_cpu_s']:.3f} s; correct {big['correct_cpu_s_per_still']:.3f} s")
        print(f"  extract + correct {big['extract_plus_correct_cpu_s_per_still']:.3f} s (min "
              f"{big['extract_plus_correct_cpu_s_min']:.3f} s); without the read {big['without_read_cpu_s_per_still']:.3f} s "
              f"(min {big['without_read_cpu_s_min']:.3f} s); per 6224001 px: {big['per_6M_still_s']:.3f} s, without the read "
              f"{big['per_6M_still_without_read_s']:.3f} s (target <= 0.12 s)")
        print(f"  disk per still (extract + corrected file) / bzip2 of its image: {big['disk_over_bzip2_image']:.3f} "
              f"(median; bzip2 images {big['bzip2_image_bytes'] / 1e6:.2f} MB, target <= 1)")
        for name, r in big["programs"].items():
            print(f"  diffuse.{name} on the {big['n_shots']} shots: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s cpu, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
    if ambiguity:
        print(f"\nambiguity: {ambiguity}")


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--six-m-child"]:
        return six_m_child(pathlib.Path(argv[1]), int(argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 and 32 shots, 3 shots of 6M pixels (< 3 min)")
    ap.add_argument("--shots", default=None, help="two shot counts, e.g. 100,10000")
    ap.add_argument("--distinct", type=int, default=4, help="distinct simulated shots")
    ap.add_argument("--big-shots", type=int, default=None, help="6M-pixel shots timed")
    ap.add_argument("--no-mpi", action="store_true")
    ap.add_argument("--no-6m", action="store_true")
    ap.add_argument("--ambiguity", type=int, default=None, metavar="N", help="bench_ambiguity.run(N)")
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args(argv)
    shots = [int(x) for x in (args.shots or ("8,32" if args.quick else "100,10000")).split(",")]
    big_shots = args.big_shots or (3 if args.quick else 20)
    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="bench_xfel_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        sim = simulate(work / "sim", args.distinct, seed=21, big=False)
        runs = {}
        for n in shots:
            root = work / f"shots_{n}"
            el, images = make_shots(sim, root, n)
            n_pixels = sum(p.get_image_size()[0] * p.get_image_size()[1] for p in el[0].detector)
            last = n == max(shots)
            runs[n] = chain(root, n_pixels, mpi=last and not args.no_mpi, nproc2=last)
            print(f"{n} shots done ({time.perf_counter() - t0:.0f} s)", flush=True)
        summary = summarise(runs, bzip2_bytes(images))
        big = None if args.no_6m else six_m(work, big_shots)
        ambiguity = None
        if args.ambiguity:
            sys.path.insert(0, str(pathlib.Path(__file__).parent))
            try:
                import bench_ambiguity
            except ModuleNotFoundError:
                print("benchmarks/bench_ambiguity.py not found: ambiguity not benchmarked")
            else:
                ambiguity = bench_ambiguity.run(args.ambiguity)
        print_report(summary, big, ambiguity)
        result = {"summary": summary, "six_m": big, "ambiguity": ambiguity, "runs": runs,
                  "seconds": time.perf_counter() - t0}
        print(f"\nbenchmark took {result['seconds']:.0f} s")
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        return result
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
