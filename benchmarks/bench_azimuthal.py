"""Benchmark: 500-bin radial profile of a Pilatus 6M still, diffuse vs pyFAI.

Times, per image after the first (geometry and bins set up once):

* diffuse: ``ImageData`` (trusted-range check, float64 copy) +
  ``Binning.profile`` (np.bincount over precomputed bin indices);
* pyFAI 0.21 ``integrate1d`` with several methods, same mask, no solid-angle
  or polarization correction, same q range and bins (q_A^-1), on the same
  parallax-free geometry (:func:`diffuse_cli.pyfai_glue.pyfai_integrator`).

Image reading (dxtbx) is timed separately: it is the same for both.

Usage::

  .venv/bin/python benchmarks/bench_azimuthal.py [--images 4] [--repeats 3]

Needs the shared thaumatin stills (../shared/data or $DIFFUSE_SHARED_DATA);
they are decompressed into a temporary directory, never into the repository.
"""

from __future__ import annotations

import argparse
import bz2
import os
import pathlib
import shutil
import sys
import tempfile
import time

# One core for both sides; with DIALS loaded, pyFAI's multi-threaded
# integrate1d also varies from run to run (as in tests/conftest.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import diffuse_cli  # noqa: F401,E402
from diffuse_cli import azimuthal as az  # noqa: E402
from diffuse_cli import azimuthal_pixels as azp  # noqa: E402
from diffuse_cli import pyfai_glue  # noqa: E402

N_BINS = 500
# no pixel splitting, as diffuse does; ("bbox", "csr", "cython") was left out:
# on this 6M-pixel geometry it grew past 20 GB and was killed
PYFAI_METHODS = [
    ("no", "histogram", "cython"),
    ("no", "csr", "cython"),
    ("no", "lut", "cython"),
    ("no", "histogram", "python"),
]


def data_dir() -> pathlib.Path:
    env = os.environ.get("DIFFUSE_SHARED_DATA")
    base = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    d = base / "thaumatin_grid_stills"
    if not d.is_dir():
        sys.exit(f"thaumatin stills not found in {d}")
    return d


def decompress(files, dest):
    out = []
    for f in files:
        target = pathlib.Path(dest) / f.name[:-4]
        with bz2.open(f, "rb") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        out.append(target)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per image")
    ap.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit (shared machines)")
    args = ap.parse_args()
    import resource

    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    from dxtbx.model.experiment_list import ExperimentListFactory

    tmp = tempfile.mkdtemp(prefix="bench_az_")
    try:
        files = decompress(sorted(data_dir().glob("*.cbf.bz2"))[: args.images], tmp)
        expts = ExperimentListFactory.from_filenames([str(f) for f in files])
        iset = expts[0].imageset
        n_images = len(files)

        t = time.perf_counter()
        raws = [iset.get_raw_data(i) for i in range(n_images)]
        t_read = (time.perf_counter() - t) / n_images
        det = pyfai_glue.without_parallax(expts[0].detector)
        beam = expts[0].beam
        n_pix = sum(p.get_image_size()[0] * p.get_image_size()[1] for p in det)

        t = time.perf_counter()
        pixels = azp.DetectorPixels.from_models(det, beam)
        t_geom = time.perf_counter() - t
        t = time.perf_counter()
        binning = az.radial_binning(pixels, n_bins=N_BINS)
        t_bins = time.perf_counter() - t
        lo, hi = binning.edges[0], binning.edges[-1]

        ours = []
        profiles = []
        for i, raw in enumerate(raws):
            for _ in range(args.repeats if i else 1):
                t = time.perf_counter()
                image = azp.ImageData(raw, pixels)
                prof = binning.profile(image)
                ours.append((i, time.perf_counter() - t))
            profiles.append(prof)
        first_ours = ours[0][1]
        ours_after = np.median([dt for i, dt in ours if i > 0])
        ours_min = np.min([dt for i, dt in ours if i > 0])

        import pyFAI

        ai_args = dict(unit="q_A^-1", radial_range=(lo, hi), correctSolidAngle=False, polarization_factor=None)
        shape = pixels.panel_shapes[0]
        datas = [azp.flatten_panels(r).reshape(shape).astype(np.float32) for r in raws]
        tlo, thi = det[0].get_trusted_range()
        masks = [~((d > tlo) & (d < thi)) for d in datas]
        results = []
        for method in PYFAI_METHODS:
            ai = pyfai_glue.pyfai_integrator(det[0], beam)  # fresh integrator: first call pays its setup
            times = []
            for i, (d, m) in enumerate(zip(datas, masks)):
                for _ in range(args.repeats if i else 1):
                    t = time.perf_counter()
                    res = ai.integrate1d(d, N_BINS, method=method, mask=m, **ai_args)
                    times.append((i, time.perf_counter() - t))
            ok = (profiles[-1].n_pixels > 20) & (res.intensity > 0)
            rel = np.median(np.abs(profiles[-1].I[ok] / res.intensity[ok] - 1))
            after = [dt for i, dt in times if i > 0]
            results.append((method, times[0][1], np.median(after), rel, np.min(after)))

        print(f"pyFAI {pyFAI.version}, numpy {np.__version__}, {n_images} images of {n_pix / 1e6:.2f} Mpixel, "
              f"{N_BINS} q bins, {args.repeats} repeats per image after the first")
        print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, cpus={len(os.sched_getaffinity(0))}, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"dxtbx read per image: {1e3 * t_read:.0f} ms (same for both; not in the times below)")
        print(f"diffuse one-off: geometry {t_geom:.2f} s, bins {1e3 * t_bins:.0f} ms")
        print("per image after the first: median and best of the repeats (the machine may be shared)")
        print(f"{'method':<34} {'first image':>12} {'median after':>13} {'best after':>11} {'median |dI/I| vs diffuse':>25}")
        print(f"{'diffuse bincount':<34} {1e3 * first_ours:>10.0f}ms {1e3 * ours_after:>11.1f}ms {1e3 * ours_min:>9.1f}ms {'-':>25}")
        for method, first, after, rel, best in results:
            print(f"{'pyFAI ' + '/'.join(method):<34} {1e3 * first:>10.0f}ms {1e3 * after:>11.1f}ms {1e3 * best:>9.1f}ms {rel:>25.2e}")
        fastest = min(results, key=lambda r: r[2])
        print(f"fastest pyFAI: {'/'.join(fastest[0])} median {1e3 * fastest[2]:.1f} ms, best {1e3 * fastest[4]:.1f} ms; "
              f"diffuse median {1e3 * ours_after:.1f} ms, best {1e3 * ours_min:.1f} ms "
              f"(median ratio {fastest[2] / ours_after:.2f}x, best ratio {fastest[4] / ours_min:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
