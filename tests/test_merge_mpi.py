"""diffuse.merge under MPI (mpirun -n 2, loopback) gives the serial map."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import mpirun_env

TESTS = pathlib.Path(__file__).resolve().parent

SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import diffuse_cli
from diffuse_cli.grid import HKLGrid
from diffuse_cli.merging import ListSource, scale_and_merge
from diffuse_cli.ambiguity import determine_reindexing
from diffuse_cli.ambiguity_cosets import ambiguity_operators
from diffuse_cli.symmetry import LaueSymmetry
from test_merge_common import make_stills, symmetric_truth

def run(comm):
    uc = (20.0, 20.0, 30.0, 90, 90, 90)
    grid = HKLGrid.for_resolution(2, uc, 2.5)
    laue = LaueSymmetry("P4")
    truth = symmetric_truth(grid, laue, uc, seed=1)
    k = np.random.default_rng(4).uniform(0.5, 2.0, 15)
    flip = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])
    stills = make_stills(truth, grid, uc, 15, seed=6, scales=k, flip={{2: flip, 7: flip, 11: flip}})
    src = ListSource(stills)
    amb = determine_reindexing(src, ambiguity_operators(uc, laue), uc, d_min=2.5, comm=comm)
    res = scale_and_merge(src, grid, laue, uc, d_min=2.5, reindex=amb["reindex"], comm=comm)
    m = res.merged
    rms = np.array([f.rms_normalised_residual for f in res.fits])
    return dict(I=m.I, sigma=m.sigma, counts=m.counts, h0=m.half_I[0], params=res.params, rms=rms,
                assignment=amb["assignment"], iterations=res.iterations)

if __name__ == "__main__":
    out = sys.argv[1]
    if out == "serial":
        np.savez(sys.argv[2], **run(None))
    else:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        r = run(comm)
        if comm.Get_rank() == 0:
            np.savez(out, size=comm.Get_size(), **r)
"""


@pytest.mark.mpi
def test_mpi_two_ranks_equals_serial(tmp_path):
    pytest.importorskip("mpi4py")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found")
    script = tmp_path / "mpi_merge.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    subprocess.run([sys.executable, str(script), "serial", str(tmp_path / "serial.npz")],
                   check=True, timeout=600)
    subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
                    str(script), str(tmp_path / "mpi.npz")], check=True, timeout=600,
                   env=mpirun_env())
    s = np.load(tmp_path / "serial.npz")
    m = np.load(tmp_path / "mpi.npz")
    assert int(m["size"]) == 2
    np.testing.assert_array_equal(s["assignment"], m["assignment"])
    assert sorted(np.flatnonzero(s["assignment"]).tolist()) == [2, 7, 11]
    assert int(s["iterations"]) == int(m["iterations"])
    np.testing.assert_array_equal(s["counts"], m["counts"])
    np.testing.assert_allclose(s["params"], m["params"], rtol=1e-10)
    # per-still fit statistics gathered from both ranks are the serial ones
    np.testing.assert_allclose(s["rms"], m["rms"], rtol=1e-8)
    for key, rtol in (("I", 1e-10), ("sigma", 1e-10), ("h0", 1e-6)):  # half maps are float32
        fin = np.isfinite(s[key])
        assert np.array_equal(fin, np.isfinite(m[key]))
        np.testing.assert_allclose(s[key][fin], m[key][fin], rtol=rtol)


@pytest.mark.mpi
def test_program_under_mpirun_equals_serial(tmp_path, monkeypatch):
    """diffuse.merge mp.method=mpi on 2 ranks: the files (the stills' checks and fingerprints
    shared out by rank, the sections drawn by rank 1) are the serial run's, every picture is
    there, and an unreadable still is left out with the same summary row."""
    import json

    pytest.importorskip("mpi4py")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found")
    from test_merge_program import _write_inputs

    monkeypatch.chdir(tmp_path)
    _write_inputs(tmp_path)
    (tmp_path / "corrected" / "still_0005.npz").write_bytes(b"PK\x03\x04 truncated")
    args = ["combined.expt", "corrected", "ndiv=2", "d_min=2.2", "space_group=P4",
            "composition=C:100,N:30,O:30,H:150"]
    program = [sys.executable, "-c", "import sys; from diffuse_cli.command_line.merge import run; run(sys.argv[1:])"]
    subprocess.run([*program, *args, "output.directory=serial"], check=True, timeout=600)
    subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", *program, *args,
                    "mp.method=mpi", "output.directory=mpi"], check=True, timeout=600, env=mpirun_env())
    serial, mpi = tmp_path / "serial", tmp_path / "mpi"
    pictures = {"slice_hk0.png", "slice_h0l.png", "slice_0kl.png", "I_vs_q.png", "statistics.png",
                "absolute_scale.png"}
    assert pictures <= {p.name for p in mpi.glob("*.png")}
    s, m = np.load(serial / "merged.npz"), np.load(mpi / "merged.npz")
    for name in ("counts", "files", "skipped"):
        np.testing.assert_array_equal(s[name], m[name])
    assert "still_0005.npz" in str(s["skipped"])
    for name in ("I", "sigma", "scales"):
        np.testing.assert_allclose(s[name], m[name], rtol=1e-10)
    assert str(s["provenance_key"]) == str(m["provenance_key"])
    rows = lambda d: json.loads((d / "summary.json").read_text())["stills"]  # noqa: E731
    assert rows(serial) == rows(mpi)
    a, b = json.loads((serial / "absolute_scale.json").read_text()), json.loads((mpi / "absolute_scale.json").read_text())
    assert a["K"] == pytest.approx(b["K"], rel=1e-10)
