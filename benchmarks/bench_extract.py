"""Benchmark diffuse.extract + diffuse.correct on 6M-pixel thaumatin stills.

Measures, per still after the first (the first also builds the geometry
cache and the per-detector correction factors): the extract time (read image
through dxtbx, read the still's mask file, trusted range, select used
pixels, write the npz), the correct time (``correct_still``: read the
extract, write the corrected still, summary figures), the time dxtbx alone
takes to read the image, the file sizes against the compressed input CBF,
and the peak memory of the process.

Usage:
  .venv/bin/python benchmarks/bench_extract.py [n_stills=4]

Needs the shared real data (../shared/data or $DIFFUSE_SHARED_DATA). Targets
(issue 12): extract + correct <= 0.12 s per still per core (CPU), extract +
corrected files per still no larger than the bzip2-compressed image (the
shared ``.cbf.bz2``), memory <= 2 GB. benchmarks/bench_xfel.py measures the
same on simulated multi-panel XFEL shots.
"""

from __future__ import annotations

import bz2
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

import diffuse_cli  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]


def data_dir() -> pathlib.Path:
    env = os.environ.get("DIFFUSE_SHARED_DATA")
    d = pathlib.Path(env) if env else REPO.parent / "shared" / "data"
    if not (d / "thaumatin_grid_stills").is_dir():
        sys.exit(f"thaumatin stills not found under {d}")
    return d / "thaumatin_grid_stills"


def main(n_stills: int = 4) -> dict:
    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentListFactory

    from diffuse_cli import corrections
    from diffuse_cli import extraction as ex
    from diffuse_cli import correct_driver
    from diffuse_cli import masking as mk
    from diffuse_cli import program
    from diffuse_cli.formats.factors import factors_filename

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        images, bz2_sizes = [], []
        for src in sorted(data_dir().glob("*.cbf.bz2"))[:n_stills]:
            bz2_sizes.append(os.path.getsize(src))
            out = work / src.name[:-4]
            with bz2.open(src) as fin, open(out, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            images.append(out)
        # a thaumatin-like crystal model: extraction only needs A
        crystal = Crystal((58.4, 0, 0), (0, 58.4, 0), (0, 0, 152.3), space_group_symbol="P41212")
        experiments = []
        for path in images:
            el = ExperimentListFactory.from_filenames([str(path)])
            el[0].crystal = crystal
            experiments.append(el[0])
        # per-still mask files, as diffuse.bragg_mask writes them (not timed)
        geom0 = ex.compute_geometry(experiments[0].detector, experiments[0].beam)
        static = mk.from_dials(experiments[0].imageset.get_mask(0))
        mask_files = []
        for i, _ in enumerate(experiments):
            program.write_pickle(work / f"still_{i}.mask", mk.to_dials(static, geom0))
            f = work / f"still_{i}_mask_bits.npz"  # the copy diffuse.extract reads
            mk.write_mask_bits(f, static)
            mask_files.append(f)
        del geom0

        out_dir = work / "extracted"
        out_dir.mkdir()
        corr_dir = work / "corrected"
        corr_dir.mkdir()
        cache = ex.GeometryCache(out_dir)
        times, cpu_times, read_times, sizes, in_sizes = [], [], [], [], []
        corr_times, corr_cpu, corr_sizes = [], [], []
        t_factors = None
        for i, expt in enumerate(experiments):
            ref = ex.image_refs([expt])[0]
            t0, c0 = time.perf_counter(), time.process_time()
            geometry = cache.get(expt.detector, expt.beam)
            mask = mk.read_mask_any(mask_files[i])
            arrays = ex.extract_still(expt, ref, mask, geometry)
            path = out_dir / f"{ref.name}.npz"
            ex.write_extract(path, ref=ref, **arrays)
            t = time.perf_counter() - t0
            cpu_times.append(time.process_time() - c0)
            if t_factors is None:  # per detector, once (like the geometry cache)
                t1 = time.perf_counter()
                key = arrays["geometry_key"]
                correct_driver.make_factors(
                    corr_dir / factors_filename(key), key, expt.detector, expt.beam,
                    ex.geometry_path(out_dir, key), corrections.CorrectionOptions(),
                )
                t_factors = time.perf_counter() - t1
            task = {
                "source": str(path), "output": str(corr_dir / path.name), "gain": 1.0,
                "background_mode": "none", "background_constant": 0.0,
                "background_constant_sigma": 0.0, "background_file": "", "provenance_key": "bench", "provenance": {}, "experiment_index": i,
                # per-shot normalisation and λ-dependent coefficients, as correct_driver's task builder sets them
                "normalisation": "unit", "normalisation_value": 1.0, "normalisation_source": "benchmark",
                "wavelength": expt.beam.get_wavelength(),
                **corrections.wavelength_coefficients(expt.detector, expt.beam.get_wavelength(),
                                                      corrections.CorrectionOptions()),
            }
            task["at_reference"] = True  # the factors were made for this still's detector and beam
            t1, c1 = time.perf_counter(), time.process_time()
            correct_driver.correct_still(task)
            corr_times.append(time.perf_counter() - t1)
            corr_cpu.append(time.process_time() - c1)
            corr_sizes.append(os.path.getsize(task["output"]))
            # dxtbx alone reading the same image: a copy under another name, so
            # that no dxtbx-side cache of the file just extracted is used
            copy = work / f"copy_{i}.cbf"
            shutil.copyfile(images[i], copy)
            el = ExperimentListFactory.from_filenames([str(copy)])
            t1 = time.perf_counter()
            el[0].imageset.get_raw_data(0)
            read_times.append(time.perf_counter() - t1)
            os.remove(copy)
            times.append(t)
            sizes.append(os.path.getsize(path))
            in_sizes.append(os.path.getsize(images[i]))
            print(f"still {i}: extract {t:.3f} s (cpu {cpu_times[-1]:.3f} s), correct {corr_times[-1]:.3f} s "
                  f"(cpu {corr_cpu[-1]:.3f} s), dxtbx read {read_times[-1]:.3f} s, "
                  f"file {sizes[-1] / 1e6:.2f} MB (cbf {in_sizes[-1] / 1e6:.2f} MB), "
                  f"{arrays['mask'].sum()} used pixels")
        # the reader side: rebuild hkl of every used pixel
        t0 = time.perf_counter()
        e = ex.read_extract(path)
        hkl = ex.used_hkl(e, cache.by_key(e.geometry_key))
        t_hkl = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB on Linux
        after = times[1:] or times
        result = {
            "n_pixels": int(e.mask.size),
            "extract_s_per_still": float(np.median(after)),
            "extract_cpu_s_per_still": float(np.median(cpu_times[1:] or cpu_times)),
            "correct_s_per_still": float(np.median(corr_times[1:] or corr_times)),
            "correct_cpu_s_per_still": float(np.median(corr_cpu[1:] or corr_cpu)),
            "extract_plus_correct_s": float(np.median((np.array(times) + np.array(corr_times))[1:])),
            "extract_plus_correct_cpu_s": float(np.median((np.array(cpu_times) + np.array(corr_cpu))[1:])),
            "corrected_file_mb": float(np.median(corr_sizes) / 1e6),
            "factors_once_s": t_factors,
            "first_still_s": times[0],
            "dxtbx_read_s": float(np.median(read_times[1:] or read_times)),
            "ratio_to_read": float(np.median(after) / np.median(read_times[1:] or read_times)),
            "file_mb": float(np.median(sizes) / 1e6),
            "cbf_mb": float(np.median(in_sizes) / 1e6),
            "cbf_bz2_mb": float(np.median(bz2_sizes) / 1e6),
            "extract_plus_corrected_mb": float(np.median(np.array(sizes) + np.array(corr_sizes)) / 1e6),
            "size_ratio": float(np.median(np.array(sizes) / np.array(in_sizes))),
            "geometry_cache_mb": os.path.getsize(ex.geometry_path(out_dir, e.geometry_key)) / 1e6,
            "read_back_hkl_s": t_hkl,
            "peak_memory_mb": peak,
        }
        print()
        print(f"pixels per still            {result['n_pixels']}")
        print(f"first still (with geometry) {result['first_still_s']:.3f} s")
        print(f"extract per still           {result['extract_s_per_still']:.3f} s wall, "
              f"{result['extract_cpu_s_per_still']:.3f} s cpu (median after the first)")
        print(f"correct per still           {result['correct_s_per_still']:.3f} s wall, "
              f"{result['correct_cpu_s_per_still']:.3f} s cpu (median after the first)")
        print(f"extract + correct           {result['extract_plus_correct_s']:.3f} s wall, "
              f"{result['extract_plus_correct_cpu_s']:.3f} s cpu per still (target <= 0.12 s)")
        print(f"  ratio to the dxtbx read   {result['extract_plus_correct_s'] / result['dxtbx_read_s']:.1f}")
        print(f"correction factors (once)   {result['factors_once_s']:.2f} s")
        print(f"corrected file              {result['corrected_file_mb']:.2f} MB vs cbf {result['cbf_mb']:.2f} MB")
        print(f"machine load average        {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"dxtbx image read            {result['dxtbx_read_s']:.3f} s  -> extract/read = {result['ratio_to_read']:.1f}")
        print(f"extract file                {result['file_mb']:.2f} MB vs cbf {result['cbf_mb']:.2f} MB (ratio {result['size_ratio']:.2f})")
        print(f"extract + corrected         {result['extract_plus_corrected_mb']:.2f} MB vs .cbf.bz2 {result['cbf_bz2_mb']:.2f} MB "
              f"(target: no larger)")
        print(f"geometry cache (once)       {result['geometry_cache_mb']:.1f} MB")
        print(f"read back + hkl of {hkl.shape[0]} px  {t_hkl:.3f} s")
        print(f"peak memory (ru_maxrss)     {peak:.0f} MB")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
