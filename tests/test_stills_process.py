"""Tests of diffuse.stills_process (issue 3).

Fast tests use tiny synthetic miniCBF images (no indexing). Runs that index
are shared through module-scoped fixtures so each dataset is processed once:

* simulated stills (diffuse.simulate truth.json), slow;
* thaumatin Pilatus stills (8, nproc=2), real_data + slow;
* thermolysin CSPAD stills (2), real_data;
* staphylococcal nuclease frames (5; multiprocess, MPI, serial kill+resume), real_data.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import mpirun_env

import diffuse_cli  # noqa: F401
from diffuse_cli.stills import inputs, still_route

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
PROGRAM = str(BIN / "diffuse.stills_process")

# Columns that legitimately differ between two runs of the same stills.
_VOLATILE = {"time_s", "resumed"}


def _run(args, cwd, check=True, timeout=900):
    proc = subprocess.run(
        [PROGRAM, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _summary(directory):
    with open(pathlib.Path(directory) / "stills_process_summary.json") as fh:
        return json.load(fh)["rows"]


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in _VOLATILE} for r in rows]


def _crystals(directory):
    from dxtbx.model.experiment_list import ExperimentList

    el = ExperimentList.from_file(str(pathlib.Path(directory) / "combined.expt"), check_format=False)
    return {e.identifier: e for e in el}


def _write_minicbf(path, data, osc_start=0.0, osc_width=0.0):
    """A 200x200 miniCBF (172 µm, 100 mm) written by dxtbx."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, DetectorFactory, GoniometerFactory, ScanFactory
    from scitbx.array_family import flex

    ny, nx = data.shape
    detector = DetectorFactory.simple(
        "PAD", 100.0, (nx * 0.172 / 2, ny * 0.172 / 2), "+x", "-y", (0.172, 0.172), (nx, ny), (-1, 1e6)
    )
    beam = BeamFactory.simple(1.0)
    gonio = GoniometerFactory.known_axis((1, 0, 0))
    scan = ScanFactory.make_scan((1, 1), 1.0, (osc_start, osc_width), {1: 0.0}, deg=True)
    FormatCBFMini.as_file(detector, beam, gonio, scan, flex.int(data.astype(np.int32)), str(path))


# ------------------------------------------------------------------ fast tests


def test_help_and_show_config(capsys):
    from diffuse_cli.command_line.stills_process import run

    with pytest.raises(SystemExit) as e:
        run(["-c"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "processing_mode" in out and "q_consistency" in out
    # the dials.stills_process scope is included: its parameters are accepted
    assert "known_symmetry" in out and "hit_finder" in out
    with pytest.raises(SystemExit):
        run(["-h"])
    assert "Examples" in capsys.readouterr().out


def test_missing_file_is_one_line_sorry(tmp_path):
    proc = _run(["nowhere.cbf"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "Sorry: File not found: nowhere.cbf"


def test_default_phil_file_parses():
    import libtbx.phil

    from diffuse_cli.command_line.stills_process import phil_scope

    source = libtbx.phil.parse((REPO / "phil" / "stills_process.phil").read_text())
    working, unused = phil_scope.fetch(sources=[source], track_unused_definitions=True)
    assert unused == []
    params = working.extract()
    defaults = phil_scope.extract()
    assert params.output.directory == defaults.output.directory
    assert params.q_consistency.max_mean_delta_q == defaults.q_consistency.max_mean_delta_q
    assert params.output.integrated_shoeboxes is True


def test_stills_partiality_analytic():
    # a reciprocal-lattice point on the Ewald sphere has partiality 1 and rh 0;
    # at rh = rs/sqrt(2) the Lorentzian gives 1/2.
    wavelength = 1.0
    s0 = np.array([0.0, 0.0, -1.0 / wavelength])
    d_star = 0.2
    two_theta = 2 * math.asin(d_star * wavelength / 2)
    s1 = np.array([math.sin(two_theta), 0, -math.cos(two_theta)]) / wavelength
    q = s1 - s0  # |q| = 0.2
    A = np.diag([q[0], 1.0, 1.0])
    A[2, 0] = q[2]  # h = (1, 0, 0) -> q
    D, half_mosaic = 1000.0, 0.1
    rs = 1 / D + 2 * math.radians(half_mosaic) * d_star / 2
    p, rh = still_route.stills_partiality(A, s0, np.array([[1.0, 0, 0]]), D, half_mosaic)
    assert abs(rh[0]) < 1e-12 and abs(p[0] - 1) < 1e-12
    # move the point radially out by rs/sqrt(2)
    q2 = q + (rs / math.sqrt(2)) * s1 / np.linalg.norm(s1)
    A2 = np.diag([q2[0], 1.0, 1.0])
    A2[1, 0], A2[2, 0] = q2[1], q2[2]
    p2, rh2 = still_route.stills_partiality(A2, s0, np.array([[1.0, 0, 0]]), D, half_mosaic)
    assert rh2[0] == pytest.approx(rs / math.sqrt(2), rel=1e-3)
    assert p2[0] == pytest.approx(0.5, rel=3e-3)


def test_rotation_step_detection():
    items = [
        inputs.Item(path=f"/d/snc_{i:05d}.img", osc_start=float(i), header_osc_width=0.0)
        for i in range(1, 6)
    ]
    stills = [
        inputs.Item(path=f"/e/still_{i:05d}.cbf", osc_start=0.0, header_osc_width=0.0)
        for i in range(3)
    ]
    inputs.detect_rotation_steps(items + stills)
    assert [it.osc_width for it in items] == [1.0] * 5
    assert [it.osc_width for it in stills] == [0.0] * 3
    # on the sequence route, consecutive frames of a dataset form one work unit
    for it in items:
        it.route = inputs.ROUTE_SEQUENCE
    units = inputs.group_sequences(stills[:1] + items[:2] + items[3:] + stills[1:])
    assert [len(u) for u in units] == [1, 2, 2, 1, 1]  # the gap at frame 3 splits the sweep


def test_bad_inputs_each_get_a_row(tmp_path):
    """Missing (via file_list), truncated CBF, text file, blank image: rows, exit 1."""
    rng = np.random.default_rng(0)
    blank = tmp_path / "blank_0001.cbf"
    _write_minicbf(blank, rng.poisson(2.0, size=(200, 200)))
    good_bytes = blank.read_bytes()
    truncated = tmp_path / "truncated_0001.cbf"
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    # an imported experiment list of another blank image goes the same way
    blank2 = tmp_path / "other_0002.cbf"
    _write_minicbf(blank2, rng.poisson(2.0, size=(200, 200)))
    from dxtbx.model.experiment_list import ExperimentListFactory

    ExperimentListFactory.from_filenames([str(blank2)]).as_file(str(tmp_path / "imported.expt"))
    file_list = tmp_path / "files.txt"
    file_list.write_text(f"{tmp_path / 'missing_0001.cbf'}\n")
    out = tmp_path / "out"
    proc = _run(
        [blank, truncated, text, tmp_path / "imported.expt", f"input.file_list={file_list}",
         f"output.directory={out}"],
        cwd=tmp_path, check=False,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Sorry: No image was indexed")
    rows = {pathlib.Path(r["image"]).name: r for r in _summary(out)}
    assert set(rows) == {"blank_0001.cbf", "truncated_0001.cbf", "notes.txt", "missing_0001.cbf", "imported.expt"}
    assert rows["imported.expt"]["status"] == "not a hit"
    assert rows["imported.expt"]["route"] == "stills"
    assert rows["missing_0001.cbf"]["status"] == "failed"
    assert rows["missing_0001.cbf"]["reason"] == "file not found"
    assert rows["notes.txt"]["status"] == "failed"
    assert "not a recognised image format" in rows["notes.txt"]["reason"]
    assert rows["truncated_0001.cbf"]["status"] == "failed"
    assert rows["truncated_0001.cbf"]["reason"]  # says which stage and why
    assert rows["blank_0001.cbf"]["status"] == "not a hit"
    assert "hit_finder" in rows["blank_0001.cbf"]["reason"]


# --------------------------------------------------------------- simulated


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    if not (REPO / "diffuse_cli" / "command_line" / "simulate.py").exists():
        pytest.skip("diffuse.simulate not available")
    work = tmp_path_factory.mktemp("sim")
    sim = work / "sim"
    subprocess.run(
        [str(BIN / "diffuse.simulate"), "n_stills=20", "seed=0", "truth.map=False",
         f"output.directory={sim}"],
        cwd=work, check=True, capture_output=True, timeout=900,
    )
    truth = json.loads((sim / "truth.json").read_text())
    images = [sim / name for name in truth["images"]]
    out = work / "out"
    cell = ",".join(str(x) for x in truth["unit_cell"])
    args = [
        *images,
        f"indexing.known_symmetry.space_group={truth['space_group']}",
        f"indexing.known_symmetry.unit_cell={cell}",
        # the simulated diffuse halos and water ring make hundreds of weak
        # spot-finder hits; the Bragg peaks are far above 400 counts
        "spotfinder.threshold.dispersion.global_threshold=400",
        "nproc=2",
        f"output.directory={out}",
    ]
    _run(args, cwd=work)
    return {"truth": truth, "out": out, "args": args, "work": work}


@pytest.mark.slow
def test_simulated_stills_index_with_true_orientations(simulated):
    from cctbx import sgtbx
    from dials.algorithms.indexing.compare_orientation_matrices import (
        difference_rotation_matrix_axis_angle,
    )
    from dxtbx.model import Crystal
    from scitbx import matrix

    truth, out = simulated["truth"], simulated["out"]
    rows = _summary(out)
    assert len(rows) == 20
    n_indexed = sum(r["status"] == "indexed" for r in rows)
    assert n_indexed >= 19, [(r["tag"], r["status"], r["reason"]) for r in rows]
    sg = sgtbx.space_group_info(truth["space_group"]).group()
    crystals = _crystals(out)
    assert len(crystals) == n_indexed
    for row in rows:
        if row["status"] != "indexed":
            continue
        i = truth["images"].index(pathlib.Path(row["image"]).name)
        a_inv = matrix.sqr([x for r in truth["stills"][i]["A"] for x in r]).inverse()
        true_crystal = Crystal(a_inv[0:3], a_inv[3:6], a_inv[6:9], space_group=sg)
        _, _, angle, _ = difference_rotation_matrix_axis_angle(true_crystal, crystals[row["tag"]].crystal)
        assert abs(angle) < 0.1, (row["tag"], angle)


@pytest.mark.slow
def test_simulated_partiality_and_shoeboxes(simulated):
    from dials.array_family import flex

    refl = flex.reflection_table.from_file(str(simulated["out"] / "combined.refl"))
    assert "partiality" in refl and "shoebox" in refl
    p = refl["partiality"].as_numpy_array()
    assert np.all((p > 0) & (p <= 1))
    assert p.min() < 0.9  # a model, not DIALS's placeholder 1.0
    # shoebox pixels are the image's counts inside the bbox
    sb = refl["shoebox"][0]
    x0, x1, y0, y1, _, _ = refl["bbox"][0]
    assert sb.data.all()[1:] == (y1 - y0, x1 - x0)
    for name in ("qc_indexing_rate.png", "qc_unit_cell.png", "qc_rmsd.png", "qc_partiality.png"):
        assert (simulated["out"] / name).stat().st_size > 1000


@pytest.mark.slow
def test_rerun_skips_completed_stills(simulated):
    before = _summary(simulated["out"])
    t0 = time.perf_counter()
    _run(simulated["args"], cwd=simulated["work"])
    assert time.perf_counter() - t0 < 60
    after = _summary(simulated["out"])
    assert all(r["resumed"] for r in after if r["status"] != "failed" or r["n_spots"])
    assert _stable(after) == _stable(before)


@pytest.mark.slow
def test_rerun_redoes_only_what_changed(simulated, tmp_path):
    """The resume rule per still: unchanged -> nothing redone; a parameter every still depends on
    -> every still redone; one input image changed -> that still only."""
    import os

    from diffuse_cli.formats.stills_process import read_stills_process_summary

    n = len(simulated["truth"]["images"])
    images = [tmp_path / pathlib.Path(a).name for a in simulated["args"][:3]]  # copies: one gets touched
    for a, copy in zip(simulated["args"], images):
        shutil.copy(a, copy)
    options = [a for a in simulated["args"][n:] if not str(a).startswith(("nproc=", "output.directory="))]
    out = tmp_path / "out"

    def redone(*extra):
        _run([*images, *options, "nproc=1", "output.plots=False", f"output.directory={out}", *extra], cwd=tmp_path)
        rows = read_stills_process_summary(out / "stills_process_summary.json")
        assert len(rows) == 3 and all(r["status"] == "indexed" for r in rows), rows
        return {r["tag"] for r in rows if not r["resumed"]}

    tags = redone()
    assert len(tags) == 3
    assert redone() == set()
    threshold = "spotfinder.threshold.dispersion.global_threshold=450"
    assert redone(threshold) == tags
    assert redone(threshold) == set()
    st = images[1].stat()
    os.utime(images[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert redone(threshold) == {images[1].stem}


# ------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def thaumatin(processed_real):
    """All 8 thaumatin stills, processed once per session (conftest.REAL_RUNS)."""
    return processed_real("thaumatin")["out"]


@pytest.mark.real_data
@pytest.mark.slow
def test_thaumatin_stills(thaumatin):
    from dials.array_family import flex

    rows = _summary(thaumatin)
    assert len(rows) == 8
    ok = [r for r in rows if r["status"] == "indexed"]
    assert len(ok) >= 6, [(r["tag"], r["reason"]) for r in rows]
    for r in ok:
        assert r["route"] == "stills"
        assert r["space_group"] == "P 41 21 2"
        assert r["a"] == pytest.approx(58.4, abs=1.0) and r["c"] == pytest.approx(152.3, abs=2.5)
        assert r["n_integrated"] > 1000 and r["rmsd_px"] < 2.5
        assert r["delta_q_mean"] < r["delta_q_max"] < 0.02
    crystals = _crystals(thaumatin)
    refl = flex.reflection_table.from_file(str(thaumatin / "combined.refl"))
    # identifiers consistent: one experiment per indexed still, named by its tag
    assert set(crystals) == {r["tag"] for r in ok}
    ids = dict(refl.experiment_identifiers())
    assert set(ids.values()) == set(crystals)
    assert sorted(set(refl["id"])) == list(range(len(crystals)))
    assert sum(r["n_integrated"] for r in ok) == len(refl)


@pytest.fixture(scope="module")
def thermolysin(processed_real):
    """The two CSPAD shots, processed once per session (conftest.REAL_RUNS)."""
    return processed_real("thermolysin")["out"]


@pytest.mark.real_data
def test_thermolysin_cspad_stills(thermolysin):
    rows = _summary(thermolysin)
    assert [r["status"] for r in rows] == ["indexed", "indexed"], [r["reason"] for r in rows]
    crystals = _crystals(thermolysin)
    for r in rows:
        assert r["a"] == pytest.approx(93, abs=1.5) and r["c"] == pytest.approx(130.4, abs=2.5)
        assert len(crystals[r["tag"]].detector) == 64
    from dials.array_family import flex

    refl = flex.reflection_table.from_file(str(thermolysin / "combined.refl"))
    assert len(set(refl["panel"])) > 16  # spots on many panels, not panel 0 only


SNASE_ARGS = [
    "indexing.known_symmetry.space_group=P4",
    "indexing.known_symmetry.unit_cell=48.4,48.4,63.3,90,90,90",
]


@pytest.fixture(scope="module")
def snase(processed_real, tmp_path_factory):
    """The five nuclease frames, default route, processed once per session (conftest.REAL_RUNS)."""
    run = processed_real("snase_stills")
    return {"images": run["images"], "work": tmp_path_factory.mktemp("snase"), "out": run["out"]}


def _spindle_axis(image):
    import dxtbx

    return np.array(dxtbx.load(str(image)).get_goniometer().get_rotation_axis())


@pytest.mark.real_data
def test_snase_frames_route_and_1deg_steps(snase):
    from cctbx import sgtbx
    from scitbx import matrix

    rows = _summary(snase["out"])
    assert [r["route"] for r in rows] == ["rotation_as_stills"] * 5
    assert [r["osc_width_deg"] for r in rows] == [1.0] * 5
    assert all(r["status"] == "indexed" for r in rows), [r["reason"] for r in rows]
    crystals = _crystals(snase["out"])
    axis = matrix.col(_spindle_axis(snase["images"][0]))
    # P4 on a tetragonal lattice: (h,k,l) -> (k,h,-l) is an indexing ambiguity,
    # a proper rotation of the lattice (422) that is not in P4: compare
    # modulo all 422 operators.
    ops = [sgtbx.change_of_basis_op(op.as_xyz()) for op in sgtbx.space_group_info("P422").group().all_ops()]

    def residual(U1, c2, step):
        best = None
        for op in ops:
            U2 = matrix.sqr(c2.change_basis(op).get_U())
            R = U2 * U1.transpose()
            r = R * axis.axis_and_angle_as_r3_rotation_matrix(step, deg=True).transpose()
            angle = math.degrees(math.acos(max(-1.0, min(1.0, (r.trace() - 1) / 2))))
            best = angle if best is None else min(best, angle)
        return best

    tags = [r["tag"] for r in rows]
    signs = []
    for t1, t2 in zip(tags, tags[1:]):
        U1 = matrix.sqr(crystals[t1].crystal.get_U())
        c2 = crystals[t2].crystal
        res = {step: residual(U1, c2, step) for step in (-1.0, 1.0, 0.0, -2.0, 2.0)}
        best_step = min(res, key=res.get)
        # consecutive frames differ by a 1° rotation about the spindle...
        assert abs(best_step) == 1.0 and res[best_step] < 0.25, (t1, t2, res)
        # ...and clearly not by 0° or 2°
        assert min(res[0.0], res[2.0], res[-2.0]) > 0.75, (t1, t2, res)
        signs.append(best_step)
    assert len(set(signs)) == 1  # always the same sense of rotation


@pytest.mark.real_data
@pytest.mark.mpi
def test_mpi_matches_multiprocess(snase):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    pytest.importorskip("mpi4py")
    out = snase["work"] / "out_mpi"
    cmd = [
        "mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2",
        PROGRAM, *map(str, snase["images"]), *SNASE_ARGS, "mp.method=mpi",
        f"output.directory={out}",
    ]
    proc = subprocess.run(cmd, cwd=snase["work"], capture_output=True, text=True, timeout=900,
                          env=mpirun_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _stable(_summary(out)) == _stable(_summary(snase["out"]))
    a, b = _crystals(out), _crystals(snase["out"])
    for tag in a:
        assert np.allclose(a[tag].crystal.get_A(), b[tag].crystal.get_A(), atol=0, rtol=1e-12)


@pytest.mark.real_data
def test_kill_and_resume_serial_matches_uninterrupted(snase):
    out = snase["work"] / "out_killed"
    args = [PROGRAM, *map(str, snase["images"]), *SNASE_ARGS, "nproc=1", f"output.directory={out}"]
    proc = subprocess.Popen(args, cwd=snase["work"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "done"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if done.is_dir() and any(p.suffix == ".json" for p in done.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len([p for p in done.iterdir() if p.suffix == ".json"])
    assert 1 <= n_done < 5
    assert not (out / "stills_process_summary.json").exists()
    rerun = _run(args[1:], cwd=snase["work"])
    rows = _summary(out)
    # killed in the first pass (fewer than 5 done-records): those frames resume
    # there; the second pass, with the shared detector, then processes all 5
    log = rerun.stdout if "Shared detector for" in rerun.stdout else rerun.stderr
    first_pass = log.split("Shared detector for")[0]
    assert first_pass.count("[done earlier]") == n_done, log[-3000:]
    assert sum(r["resumed"] for r in rows) == 0
    # serial (resumed) run == uninterrupted multiprocess run
    assert _stable(rows) == _stable(_summary(snase["out"]))
