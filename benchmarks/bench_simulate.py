"""Time diffuse.simulate: 20 stills of 1024×1024 on one core (target < 30 s).

Usage::

    .venv/bin/python benchmarks/bench_simulate.py [n_stills] [extra phil args...]

Prints wall-clock and CPU time (the machine may be shared, so CPU time is the
fairer figure) for: set-up (models, geometry, forward factors, lattice tables),
the stills (I_true per pixel, Bragg prediction/rendering, noise, CBF writing),
and the truth map, separately.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import diffuse_cli  # noqa: E402,F401
from diffuse_cli import cbf_writer, simulate  # noqa: E402
from diffuse_cli.command_line.simulate import phil_scope  # noqa: E402
from diffuse_cli.simulation.crystal import check_symmetry  # noqa: E402


def main(argv):
    n = int(argv[0]) if argv else 20
    import libtbx.phil

    with tempfile.TemporaryDirectory() as tmp:
        user = libtbx.phil.parse("\n".join([f"n_stills={n}", f"output.directory={tmp}"] + argv[1:]))
        params = phil_scope.fetch(user).extract()
        check_symmetry(params)

        w0, c0 = time.perf_counter(), time.process_time()
        sim = simulate.Simulator.from_params(params)
        w1, c1 = time.perf_counter(), time.process_time()
        for i in range(params.n_stills):
            st = sim.still_truth(i)
            data = sim.image(st)
            cbf_writer.write_image(
                simulate.image_path(tmp, params.output.prefix, i), sim.detector, sim.beam, params.exposure_time, data
            )
        w2, c2 = time.perf_counter(), time.process_time()
        sim.truth_map(params.truth.ndiv, params.truth.subsample)
        w3, c3 = time.perf_counter(), time.process_time()

    npix = sum(g.shape[0] * g.shape[1] for g in sim.geometry)
    print(f"diffuse.simulate benchmark: {n} stills, {len(sim.detector)} panel(s), {npix} pixels per still")
    print(f"  set-up        wall {w1 - w0:6.2f} s   cpu {c1 - c0:6.2f} s")
    print(f"  stills        wall {w2 - w1:6.2f} s   cpu {c2 - c1:6.2f} s   ({(c2 - c1) / n:.3f} s cpu per still)")
    print(f"  set-up+stills wall {w2 - w0:6.2f} s   cpu {c2 - c0:6.2f} s   (target < 30 s)")
    print(f"  truth map     wall {w3 - w2:6.2f} s   cpu {c3 - c2:6.2f} s   (ndiv {params.truth.ndiv})")
    print(f"  total         wall {w3 - w0:6.2f} s   cpu {c3 - c0:6.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
