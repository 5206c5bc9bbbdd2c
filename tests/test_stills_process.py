"""Tests of diffuse.stills_process (issue 3).

Fast tests use tiny synthetic miniCBF images (no indexing). Runs that index
are shared through module-scoped fixtures so each dataset is processed once:

* simulated stills (diffuse.simulate truth.json), slow; the XFEL mode
  (integration.sample) reuses them: 6 of them, 3 integrated, against full
  integration through bragg_mask -> extract -> correct -> merge;
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

LYSOZYME = "C:4904,N:1544,O:4480,S:80,H:13672"  # the simulated cell's composition (as tests/test_end_to_end.py)

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


def test_integration_sample_choice_and_top_up():
    """integration.sample: N evenly spaced stills (first and last included), rotation frames
    always integrated; a failed sample still is replaced from the indexed, not integrated ones."""
    from diffuse_cli.stills import drivers
    from diffuse_cli.stills.records import INDEXED, NOT_A_HIT

    stills = [inputs.Item(path=f"/e/shot_{i:05d}.cbf", tag=f"shot_{i:05d}") for i in range(10)]
    frame = inputs.Item(path="/d/snc_00001.img", tag="snc_00001", route=inputs.ROUTE_ROTATION_AS_STILLS)
    items = stills[:5] + [frame] + stills[5:]
    chosen = drivers.choose_integration_sample(items, 4)
    assert [it.tag for it in chosen] == ["shot_00000", "shot_00003", "shot_00006", "shot_00009"]
    assert frame.integrate and sum(it.integrate for it in items) == 5
    rows = [{"status": INDEXED, "integrated": it.integrate} for it in items]
    assert drivers.sample_top_up(items, rows, 4) == []
    rows[0] = {"status": NOT_A_HIT, "integrated": False}  # a sample still that was no hit
    again = drivers.sample_top_up(items, rows, 4)
    assert len(again) == 1 and again[0].integrate and again[0] not in chosen
    assert len(drivers.choose_integration_sample(stills[:2], 5)) == 2  # fewer stills than N: all


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
         # a known absolute scale and Wilson B (the XFEL-mode tests merge with them)
         f"absolute_scale.composition={LYSOZYME}", "absolute_scale.wilson_b=30",
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

    def records():
        # not the ".<tag>.*.tmp.json" of a done-record being written
        return [p for p in done.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]

    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if done.is_dir() and records():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(records())
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


# ------------------------------------------------------- XFEL mode (issue 12)

XFEL_N, XFEL_SAMPLE = 6, 3


def _chain_after_stills_process(processed: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """bragg_mask -> extract -> correct -> merge (with the composition: absolute scale and a
    Wilson B estimated from combined.refl) on one stills_process output."""
    from diffuse_cli.command_line import bragg_mask, correct, extract, merge

    expt, refl = str(processed / "combined.expt"), str(processed / "combined.refl")
    log = [f"output.log={root / 'chain.log'}"]
    bragg_mask.run([expt, refl, f"output.directory={root / 'masks'}", "nproc=2", *log])
    extract.run([expt, f"masks.summary={root / 'masks' / 'summary.json'}",
                 f"output.directory={root / 'extracted'}", "nproc=2", *log])
    correct.run([expt, str(root / "extracted"), f"output.directory={root / 'corrected'}", "nproc=2", *log])
    merge.run([expt, str(root / "corrected"), f"output.directory={root / 'merged'}", "ndiv=2",
               "space_group=P43212", f"composition={LYSOZYME}", "absolute_scale.fit_d_max=2.5", *log])
    return root


@pytest.fixture(scope="module")
def xfel_vs_full(simulated, tmp_path_factory):
    """The first XFEL_N simulated stills: full integration (the module's run, combined anew for
    those stills) and the XFEL mode (integration.sample=XFEL_SAMPLE), each through the chain.

    The XFEL run starts from the full run's done-records of its sample stills: they resume
    (whether a still is integrated is in its key, integration.sample is not), so only the
    stills it does not integrate are processed here."""
    from diffuse_cli.command_line import stills_process
    from diffuse_cli.stills.drivers import write_combined

    root = tmp_path_factory.mktemp("xfel_mode")
    n = len(simulated["truth"]["images"])
    images, options = simulated["args"][:XFEL_N], simulated["args"][n:]
    options = [a for a in options if not str(a).startswith("output.directory=")]
    # full integration: the module's per-still files of these stills, as one combined pair
    full = root / "full"
    rows = [r for r in _summary(simulated["out"]) if r["image"] in {str(p) for p in images}]
    for r in rows:
        for rel in (r["experiments"], r["reflections"]):
            if rel:
                (full / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(simulated["out"] / rel, full / rel)
    write_combined(rows, str(full), "combined")
    xfel = root / "xfel"
    from diffuse_cli.stills.drivers import choose_integration_sample
    from diffuse_cli.stills.inputs import Item

    sample = {it.path for it in choose_integration_sample([Item(path=str(p)) for p in images], XFEL_SAMPLE)}
    for r in rows:
        if r["image"] in sample:
            for rel in (r["experiments"], r["reflections"], f"stills/{r['tag']}_indexed.refl", f"done/{r['tag']}.json"):
                (xfel / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(simulated["out"] / rel, xfel / rel)
    t0 = time.perf_counter()
    stills_process.run([*map(str, images), *options, f"integration.sample={XFEL_SAMPLE}",
                        f"output.directory={xfel}", f"output.log={root / 'sp.log'}"])
    t_sp = time.perf_counter() - t0
    t0 = time.perf_counter()
    chains = {k: _chain_after_stills_process(d, root / f"chain_{k}") for k, d in (("full", full), ("xfel", xfel))}
    print(f"XFEL mode stills_process {t_sp:.1f} s; both chains {time.perf_counter() - t0:.1f} s")
    return {"full": full, "xfel": xfel, "chains": chains}


@pytest.mark.slow
def test_xfel_mode_integrates_only_the_sample(xfel_vs_full):
    """integration.sample=XFEL_SAMPLE of XFEL_N: evenly spaced stills integrated, the others
    indexed and refined with the same crystal models as with full integration (bit for bit),
    the same profile model and no intensities."""
    from dials.array_family import flex

    xfel = _summary(xfel_vs_full["xfel"])
    assert len(xfel) == XFEL_N and all(r["status"] == "indexed" for r in xfel), [r["reason"] for r in xfel]
    integrated = [r["tag"] for r in xfel if r["integrated"]]
    assert len(integrated) == XFEL_SAMPLE
    assert [r["resumed"] for r in xfel] == [r["integrated"] for r in xfel]  # the sample came from the full run
    assert [r["tag"] for r in xfel].index(integrated[0]) == 0  # evenly spaced: first and last
    assert [r["tag"] for r in xfel].index(integrated[-1]) == XFEL_N - 1
    for r in xfel:
        assert (r["n_integrated"] > 0) == r["integrated"]
        assert r["experiments"].endswith("_integrated.expt" if r["integrated"] else "_indexed.expt")
    a, b = _crystals(xfel_vs_full["full"]), _crystals(xfel_vs_full["xfel"])
    assert set(a) == set(b)
    for tag in a:  # indexing and refinement do not depend on the mode
        np.testing.assert_allclose(b[tag].crystal.get_A(), a[tag].crystal.get_A(), rtol=0, atol=1e-12)
        assert b[tag].crystal.get_domain_size_ang() == pytest.approx(a[tag].crystal.get_domain_size_ang(), rel=1e-12)
        # the profile model DIALS integrates with (and applies sigma_b_cutoff to) is there too
        assert b[tag].profile.sigma_b() == pytest.approx(a[tag].profile.sigma_b(), rel=1e-9)
    refl = flex.reflection_table.from_file(str(xfel_vs_full["xfel"] / "combined.refl"))
    ids = dict(refl.experiment_identifiers())
    n_int = refl.get_flags(refl.flags.integrated_sum)
    per_tag = {t: int((n_int & (refl["id"] == i)).count(True)) for i, t in ids.items()}
    assert {t for t, k in per_tag.items() if k} == set(integrated)
    assert sum(r["n_integrated"] for r in xfel) == n_int.count(True)


@pytest.mark.slow
def test_xfel_mode_masks_map_and_scale_match_full_integration(xfel_vs_full):
    """Bragg masks: identical on the integrated stills; on the others (size from the sample)
    the Bragg pixel sets overlap by >= 0.9 (Jaccard). Merged map CC >= 0.999 with the
    full-integration map. Absolute scale K within 5 % (the absolute-scale accuracy
    tests/test_end_to_end.py asks against the truth): the masks change it little, the Wilson B
    does, estimated here from the sample's XFEL_SAMPLE stills instead of all XFEL_N."""
    from diffuse_cli.formats.masks import read_mask_any

    chains = xfel_vs_full["chains"]
    summaries = {k: {e["name"]: e for e in json.loads((c / "masks" / "summary.json").read_text())["stills"]}
                 for k, c in chains.items()}
    integrated = {r["image"] for r in _summary(xfel_vs_full["xfel"]) if r["integrated"]}
    assert set(summaries["full"]) == set(summaries["xfel"])
    jaccard = {}
    for name, e in summaries["full"].items():
        m_full = read_mask_any(chains["full"] / "masks" / e["mask_bits"])
        m_xfel = read_mask_any(chains["xfel"] / "masks" / summaries["xfel"][name]["mask_bits"])
        if e["image_path"] in integrated:
            assert np.array_equal(m_full, m_xfel), name
            continue
        shape = summaries["xfel"][name]["bragg_shape"][0]
        assert shape["source"].startswith("integration sample"), shape
        masked_full, masked_xfel = ~m_full, ~m_xfel
        jaccard[name] = (masked_full & masked_xfel).sum() / (masked_full | masked_xfel).sum()
    print("mask Jaccard (masked pixels) of the non-integrated stills:", {k: round(v, 4) for k, v in jaccard.items()})
    assert len(jaccard) == XFEL_N - XFEL_SAMPLE and min(jaccard.values()) >= 0.9, jaccard
    m = {k: np.load(c / "merged" / "merged.npz") for k, c in chains.items()}
    ok = (m["full"]["counts"] > 0) & (m["xfel"]["counts"] > 0) & np.isfinite(m["full"]["I"]) & np.isfinite(m["xfel"]["I"])
    cc = np.corrcoef(m["full"]["I"][ok], m["xfel"]["I"][ok])[0, 1]
    sc = {k: json.loads((c / "merged" / "absolute_scale.json").read_text()) for k, c in chains.items()}
    ratio = sc["xfel"]["K"] / sc["full"]["K"]
    print(f"merged map CC {cc:.6f} on {ok.sum()} voxels; K xfel/full {ratio:.4f}; Wilson B "
          f"{sc['xfel']['wilson_b']:.2f} (sample) vs {sc['full']['wilson_b']:.2f} (all)")
    assert ok.sum() > 10_000
    assert cc >= 0.999
    assert abs(ratio - 1) < 0.05


@pytest.mark.slow
def test_xfel_mode_still_reads_its_image_once_and_is_not_integrated(simulated, tmp_path):
    """A still the XFEL mode does not integrate costs DIALS's spot finding and indexing and
    little else (benchmarks/bench_stills_process.py, run per_still): the image's pixels are
    read once (by the spot finder), DIALS's integrator is never called, and its files are
    the refined models and the indexed strong spots (their spot-finder shoeboxes, which
    bragg_mask method=shoebox uses, but no integrated reflection)."""
    import dials.command_line.stills_process as dsp
    from dials.array_family import flex
    from dxtbx.format.Registry import get_format_class_for_file
    from libtbx.phil import parse

    from diffuse_cli.command_line.stills_process import phil_scope
    from diffuse_cli.stills.records import Config

    images = [str(a) for a in simulated["args"] if str(a).endswith((".cbf", ".h5", ".nxs", ".img"))]
    options = [str(a) for a in simulated["args"] if "=" in str(a) and not str(a).startswith(("output.", "nproc"))]
    params = phil_scope.fetch(sources=[parse(a) for a in options + [f"output.directory={tmp_path}"]]).extract()
    item = inputs.discover(images[:1], "auto")[0]
    item.integrate = False
    fmt = get_format_class_for_file(item.path)
    calls = {"get_raw_data": 0, "integrate": 0}
    read, integrate = fmt.get_raw_data, dsp.Processor.integrate

    def counted_read(self, *args, **kwargs):
        calls["get_raw_data"] += 1
        return read(self, *args, **kwargs)

    def counted_integrate(self, *args, **kwargs):
        calls["integrate"] += 1
        return integrate(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(fmt, "get_raw_data", counted_read)
    mp.setattr(dsp.Processor, "integrate", counted_integrate)
    try:
        row, _ = still_route.process_item(item, Config(params=params, directory=str(tmp_path), fingerprint="t"))
    finally:
        mp.undo()
    assert row["status"] == "indexed" and not row["integrated"], row
    assert calls == {"get_raw_data": 1, "integrate": 0}, calls
    assert sorted(p.name for p in (tmp_path / "stills").iterdir()) == [f"{item.tag}_indexed.expt",
                                                                      f"{item.tag}_indexed.refl"]
    refl = flex.reflection_table.from_file(str(tmp_path / row["reflections"]))
    assert len(refl) == row["n_indexed"] > 0
    assert refl.get_flags(refl.flags.indexed).count(True) == len(refl)
    assert refl.get_flags(refl.flags.integrated_sum).count(True) == 0
