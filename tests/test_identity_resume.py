"""One resume rule (bragg_mask, extract, correct) and consistency by identity (bragg_mask, merge).

Data: small diffuse.simulate runs (4 stills, 260×240 pixels). The experiments
are built from the simulator's truth (its images and true A per still, with
identifiers = image stems as diffuse.stills_process writes them), and the
reflections are the lattice points within 0.002 Å⁻¹ of the Ewald sphere, put
on the detector by dxtbx's ray intersection: no DIALS processing needed, and
the truth shares no code with the pipeline.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli.command_line import bragg_mask, correct, extract, merge, simulate

CELL = (79.1, 79.1, 37.9, 90, 90, 90)
SIM = ["n_stills=4", "detector_model.n_fast=260", "detector_model.n_slow=240",
       "detector_model.distance=100", "truth.map=False"]
# radius given (the truth experiments carry no profile model); excitation estimated
BRAGG = ["predicted.radius_px=3"]
CYCLIC = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])  # h' = h @ M: (h, k, l) -> (k, l, h)


# ---------------------------------------------------------------- data


def _simulate(root: pathlib.Path, seed: int, cell=CELL, prefix="image_") -> pathlib.Path:
    out = root / f"sim{seed}_{prefix}"
    simulate.run([*SIM, f"seed={seed}", "unit_cell=" + ",".join(str(x) for x in cell), f"output.prefix={prefix}",
                  f"output.directory={out}", f"output.log={root / f'sim{seed}.log'}"])
    return out


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """Crystal A; B: another crystal, cell 1 % longer (compatible); C: cell 6 % longer.

    A and B share image names (so identifiers, as two runs of diffuse.stills_process
    on like-named files would); C has its own.
    """
    root = tmp_path_factory.mktemp("identity_sims")
    return {
        "A": _simulate(root, 3),
        "B": _simulate(root, 5, tuple(x * 1.01 for x in CELL[:3]) + CELL[3:]),
        "B2": _simulate(root, 5, tuple(x * 1.01 for x in CELL[:3]) + CELL[3:], "crystalB_"),
        "C": _simulate(root, 8, tuple(x * 1.06 for x in CELL[:3]) + CELL[3:], "crystalC_"),
    }


def truth_experiments(sim_dir: pathlib.Path, basis=None, space_group=None):
    """ExperimentList of a simulation's images with their true A (identifier = image stem).

    basis: report the lattice in another basis (h' = h @ basis).
    """
    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    truth = json.loads((sim_dir / "truth.json").read_text())
    el = ExperimentList()
    for name, st in zip(truth["images"], truth["stills"]):
        e = ExperimentListFactory.from_filenames([str(sim_dir / name)])[0]
        A = np.array(st["A"], dtype=np.float64)
        if basis is not None:
            A = A @ np.linalg.inv(np.asarray(basis, dtype=np.float64)).T
        R = np.linalg.inv(A)
        e.crystal = Crystal(R[0], R[1], R[2], space_group_symbol=space_group or truth["space_group"])
        e.identifier = name.split(".")[0]
        el.append(e)
    return el


def predicted_reflections(experiments, eps_max=0.002):
    """Lattice points within eps_max (Å⁻¹) of the Ewald sphere that hit the detector."""
    from dials.array_family import flex

    out = None
    for i, e in enumerate(experiments):
        A = np.array(e.crystal.get_A()).reshape(3, 3)
        s0 = np.array(e.beam.get_s0())
        r = np.arange(-40, 41)
        hkl = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
        G = hkl @ A.T
        eps = np.linalg.norm(G + s0, axis=1) - np.linalg.norm(s0)
        sel = (np.abs(eps) < eps_max) & np.any(hkl != 0, axis=1)
        panel = e.detector[0]
        nf, ns = panel.get_image_size()
        rows = []
        for h, g in zip(hkl[sel], G[sel]):
            s1 = g + s0
            if np.dot(s1, panel.get_normal()) <= 0:
                continue
            x, y = panel.get_ray_intersection_px(tuple(s1))
            if 0 <= x < nf and 0 <= y < ns:
                rows.append((tuple(int(v) for v in h), x, y))
        t = flex.reflection_table()
        t["miller_index"] = flex.miller_index([r[0] for r in rows])
        t["panel"] = flex.size_t(len(rows), 0)
        t["xyzobs.px.value"] = flex.vec3_double([(r[1], r[2], 0.5) for r in rows])
        t["intensity.sum.value"] = flex.double(len(rows), 1000.0)
        t["intensity.sum.variance"] = flex.double(len(rows), 1000.0)
        t["id"] = flex.int(len(rows), i)
        t.experiment_identifiers()[i] = e.identifier
        if out is None:
            out = t
        else:
            out.extend(t)
    return out


def _project(tmp_path: pathlib.Path, sim: pathlib.Path, name="A", basis=None, space_group=None):
    """Copy a simulation into tmp_path (tests touch its images); write its .expt and .refl."""
    sim_copy = tmp_path / f"sim_{name}"
    shutil.copytree(sim, sim_copy)
    el = truth_experiments(sim_copy, basis, space_group)
    expt, refl = tmp_path / f"{name}.expt", tmp_path / f"{name}.refl"
    el.as_file(str(expt))
    predicted_reflections(el).as_file(str(refl))
    return expt, refl


def run_bragg_mask(tmp, expt, refl, out="masks", *extra):
    bragg_mask.run([str(expt), str(refl), *BRAGG, f"output.directory={tmp / out}",
                    f"output.log={tmp / 'bragg_mask.log'}", *extra])
    summary = json.loads((tmp / out / "summary.json").read_text())
    return {e["name"]: e for e in summary["stills"]}


def run_extract(tmp, expt, masks="masks", out="extracted", *extra):
    entries = extract.run([str(expt), f"masks.summary={tmp / masks / 'summary.json'}",
                           f"output.directory={tmp / out}", f"output.log={tmp / 'extract.log'}", *extra])
    return {e["name"]: e for e in json.loads((tmp / out / "summary.json").read_text())["stills"]}


def run_correct(tmp, expt, ext="extracted", out="corrected", *extra):
    rows = correct.run([str(expt), str(tmp / ext), f"output.directory={tmp / out}",
                        f"output.log={tmp / 'correct.log'}", *extra])
    return {r["still"]: r["status"] for r in rows}


def run_merge(tmp, *args):
    return merge.run([*map(str, args), "ndiv=1", "scaling.max_iterations=2",
                      f"output.directory={tmp / 'merged'}", f"output.log={tmp / 'merge.log'}"])


def _redone(entries) -> set:
    return {n for n, e in entries.items() if not e.get("skipped")}


def _rotate_crystal(expt_path: pathlib.Path, index: int, angle_deg=0.2):
    """Rewrite the .expt with one still's crystal turned slightly (a refined model)."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from scitbx import matrix

    el = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    c = el[index].crystal
    R = matrix.col((0, 0, 1)).axis_and_angle_as_r3_rotation_matrix(angle_deg, deg=True)
    c.set_U(R * matrix.sqr(c.get_U()))
    el.as_file(str(expt_path))


def _bits(path) -> np.ndarray:
    from diffuse_cli.masking import read_mask_any

    return read_mask_any(path)


# ---------------------------------------------------------------- bragg_mask: identity


def test_bragg_mask_matches_reflections_by_identifier(sims, tmp_path):
    """A 1-still .expt with the 4-still .refl masks that still as the 4-still run does."""
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    expt, refl = _project(tmp_path, sims["A"])
    full = run_bragg_mask(tmp_path, expt, refl, "masks_all", "dynamic.enable=False")
    el = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    one = ExperimentList([el[2]])
    one.as_file(str(tmp_path / "one.expt"))
    single = run_bragg_mask(tmp_path, tmp_path / "one.expt", refl, "masks_one", "dynamic.enable=False")
    (name,) = single
    assert name == "image_00002_00000"
    # same reflections, same shape estimate, same Bragg pixels as in the 4-still run
    assert single[name]["bragg_shape"][0]["n_reflections"] == full[name]["bragg_shape"][0]["n_reflections"]
    assert single[name]["bragg_shape"][0]["excitation_inv_angstrom"] == pytest.approx(
        full[name]["bragg_shape"][0]["excitation_inv_angstrom"])
    assert single[name]["bragg_fraction"] == pytest.approx(full[name]["bragg_fraction"], abs=1e-12)
    np.testing.assert_array_equal(_bits(tmp_path / "masks_one" / f"{name}_mask_bits.npz"),
                                  _bits(tmp_path / "masks_all" / f"{name}_mask_bits.npz"))
    # a sane fraction: the excitation is that of this still's reflections (≤ 0.002 Å⁻¹)
    assert single[name]["bragg_shape"][0]["excitation_inv_angstrom"] <= 0.002
    assert single[name]["bragg_fraction"] < 0.3


def test_bragg_mask_foreign_reflections_are_a_sorry(sims, tmp_path):
    from dials.array_family import flex

    expt, refl = _project(tmp_path, sims["A"])
    table = flex.reflection_table.from_file(str(refl))
    ids = dict(table.experiment_identifiers())
    for k in ids:
        del table.experiment_identifiers()[k]
    foreign = tmp_path / "foreign.refl"
    for k, v in ids.items():
        table.experiment_identifiers()[k] = f"other_{v}"
    table.as_file(str(foreign))
    with pytest.raises(Sorry, match=r"foreign\.refl: its experiment identifiers match none"):
        bragg_mask.run([str(expt), str(foreign), *BRAGG, f"output.directory={tmp_path / 'm'}",
                        f"output.log={tmp_path / 'm.log'}"])
    for k in ids:
        del table.experiment_identifiers()[k]
    bare = tmp_path / "bare.refl"
    table.as_file(str(bare))
    with pytest.raises(Sorry, match=r"bare\.refl: experiment identifiers on only one side"):
        bragg_mask.run([str(expt), str(bare), *BRAGG, f"output.directory={tmp_path / 'm'}",
                        f"output.log={tmp_path / 'm.log'}"])


# ---------------------------------------------------------------- bragg_mask: resume


def test_bragg_mask_resume_rule(sims, tmp_path):
    from dials.array_family import flex

    expt, refl = _project(tmp_path, sims["A"])
    names = set(run_bragg_mask(tmp_path, expt, refl))
    assert len(names) == 4
    bits = {n: tmp_path / "masks" / f"{n}_mask_bits.npz" for n in names}
    mtimes = {n: p.stat().st_mtime_ns for n, p in bits.items()}
    # no change: nothing redone, nothing rewritten
    assert _redone(run_bragg_mask(tmp_path, expt, refl)) == set()
    assert {n: p.stat().st_mtime_ns for n, p in bits.items()} == mtimes
    # a parameter that changes every mask: every still redone, masks grow
    before = {n: _bits(p) for n, p in bits.items()}
    assert _redone(run_bragg_mask(tmp_path, expt, refl, "masks", "predicted.radius_px=4")) == names
    for n, p in bits.items():
        after = _bits(p)
        assert after.sum() < before[n].sum() and not np.any(after & ~before[n])
    # one input changed (still 1 loses half its reflections): only still 1 redone
    table = flex.reflection_table.from_file(str(refl))
    ids = table["id"].as_numpy_array()
    drop = np.flatnonzero(ids == 1)[::2]
    keep = np.ones(len(table), dtype=bool)
    keep[drop] = False
    table.select(flex.bool(keep)).as_file(str(refl))
    assert _redone(run_bragg_mask(tmp_path, expt, refl, "masks", "predicted.radius_px=4")) == {"image_00001_00000"}
    # one experiment model changed: only that still redone
    _rotate_crystal(expt, 3)
    assert _redone(run_bragg_mask(tmp_path, expt, refl, "masks", "predicted.radius_px=4")) == {"image_00003_00000"}


def test_bragg_mask_removes_stale_outputs_and_temporaries(sims, tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt, refl = _project(tmp_path, sims["A"])
    run_bragg_mask(tmp_path, expt, refl)
    tmp_file = tmp_path / "masks" / ".image_00000_00000_mask_bits.abc123.tmp.npz"
    tmp_file.write_bytes(b"half a file")
    el = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    del el[3]
    el.as_file(str(tmp_path / "three.expt"))
    entries = run_bragg_mask(tmp_path, tmp_path / "three.expt", refl)
    assert set(entries) == {f"image_0000{i}_00000" for i in range(3)}
    assert not tmp_file.exists()
    assert not (tmp_path / "masks" / "image_00003_00000_mask_bits.npz").exists()
    assert not (tmp_path / "masks" / "image_00003_00000.mask").exists()
    assert (tmp_path / "masks" / "image_00002_00000.mask").exists()


# ---------------------------------------------------------------- extract: resume


def test_extract_resume_rule(sims, tmp_path):
    expt, refl = _project(tmp_path, sims["A"])
    run_bragg_mask(tmp_path, expt, refl)
    names = set(run_extract(tmp_path, expt))
    assert len(names) == 4
    assert _redone(run_extract(tmp_path, expt)) == set()
    assert "Nothing to do" in (tmp_path / "extract.log").read_text()
    # the case: Bragg masks remade with another radius -> every still re-extracted
    run_bragg_mask(tmp_path, expt, refl, "masks", "predicted.radius_px=5")
    assert _redone(run_extract(tmp_path, expt)) == names
    from diffuse_cli.extraction import read_extract

    for n in names:
        used = read_extract(tmp_path / "extracted" / f"{n}.npz").mask
        total = _bits(tmp_path / "masks" / f"{n}_mask_bits.npz")
        assert not np.any(used & ~total)  # never a pixel the new mask excludes
    # one image rewritten (new mtime): only that still redone
    image = tmp_path / "sim_A" / "image_00001.cbf"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _redone(run_extract(tmp_path, expt)) == {"image_00001_00000"}
    # one experiment model changed: only that still redone
    _rotate_crystal(expt, 2)
    assert _redone(run_extract(tmp_path, expt)) == {"image_00002_00000"}
    assert _redone(run_extract(tmp_path, expt)) == set()


def test_extract_removes_stale_outputs_and_temporaries(sims, tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt, refl = _project(tmp_path, sims["A"])
    run_bragg_mask(tmp_path, expt, refl)
    run_extract(tmp_path, expt)
    tmp_file = tmp_path / "extracted" / ".image_00000_00000.x1y2z3.tmp.npz"
    tmp_file.write_bytes(b"killed mid-write")
    el = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    del el[0]
    el.as_file(str(tmp_path / "three.expt"))
    assert _redone(run_extract(tmp_path, tmp_path / "three.expt")) == set()
    assert not tmp_file.exists()
    assert not (tmp_path / "extracted" / "image_00000_00000.npz").exists()
    assert (tmp_path / "extracted" / "image_00001_00000.npz").exists()
    # output.stale=keep reports instead
    run_extract(tmp_path, expt)
    assert _redone(run_extract(tmp_path, tmp_path / "three.expt", "masks", "extracted", "output.stale=keep")) == set()
    assert (tmp_path / "extracted" / "image_00000_00000.npz").exists()


# ---------------------------------------------------------------- correct: resume


def test_correct_resume_rule(sims, tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt, refl = _project(tmp_path, sims["A"])
    run_bragg_mask(tmp_path, expt, refl)
    names = set(run_extract(tmp_path, expt))
    first = run_correct(tmp_path, expt)
    assert set(first.values()) == {"corrected"} and set(first) == names
    out = {n: tmp_path / "corrected" / f"{n}.npz" for n in names}
    mtimes = {n: p.stat().st_mtime_ns for n, p in out.items()}
    # no change (the .expt rewritten with the same models): nothing redone, nothing rewritten
    ExperimentListFactory.from_json_file(str(expt), check_format=False).as_file(str(expt))
    assert set(run_correct(tmp_path, expt).values()) == {"up to date"}
    assert {n: p.stat().st_mtime_ns for n, p in out.items()} == mtimes
    # a parameter of every still: every still redone
    assert set(run_correct(tmp_path, expt, "extracted", "corrected", "gain=2").values()) == {"corrected"}
    # a parameter of one still (its row of the normalisation table): only that still
    table = tmp_path / "photons.csv"
    rows = {n: 1e12 * (i + 1) for i, n in enumerate(sorted(names))}
    table.write_text("image,photons\n" + "".join(f"{n.rsplit('_', 1)[0]}.cbf,{v}\n" for n, v in rows.items()))
    norm = ["gain=2", "normalisation.mode=incident_photons", f"normalisation.table={table}"]
    assert set(run_correct(tmp_path, expt, "extracted", "corrected", *norm).values()) == {"corrected"}
    rows["image_00002_00000"] *= 2
    table.write_text("image,photons\n" + "".join(f"{n.rsplit('_', 1)[0]}.cbf,{v}\n" for n, v in rows.items()))
    status = run_correct(tmp_path, expt, "extracted", "corrected", *norm)
    assert {n for n, s in status.items() if s == "corrected"} == {"image_00002_00000"}
    with np.load(out["image_00002_00000"]) as z:
        assert float(z["normalisation_value"]) == pytest.approx(6.0)  # 6e12 photons / 1e12
    # one input (one still re-extracted after its image changed): only that still
    image = tmp_path / "sim_A" / "image_00001.cbf"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _redone(run_extract(tmp_path, expt)) == {"image_00001_00000"}
    status = run_correct(tmp_path, expt, "extracted", "corrected", *norm)
    assert {n for n, s in status.items() if s == "corrected"} == {"image_00001_00000"}
    # one experiment model changed: only that still
    _rotate_crystal(expt, 3)
    status = run_correct(tmp_path, expt, "extracted", "corrected", *norm)
    assert {n for n, s in status.items() if s == "corrected"} == {"image_00003_00000"}
    assert set(run_correct(tmp_path, expt, "extracted", "corrected", *norm).values()) == {"up to date"}


def test_correct_removes_stale_outputs_and_temporaries(sims, tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt, refl = _project(tmp_path, sims["A"])
    run_bragg_mask(tmp_path, expt, refl)
    run_extract(tmp_path, expt)
    run_correct(tmp_path, expt)
    tmp_file = tmp_path / "corrected" / ".image_00000_00000.q9w8e7.tmp.npz"
    tmp_file.write_bytes(b"killed mid-write")
    el = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    del el[0]
    el.as_file(str(tmp_path / "three.expt"))
    # extract drops still 0's file; correct matches the others to experiments by
    # identifier, drops still 0's corrected file and rewrites the others, whose
    # recorded experiment index moved (a stale index is never kept)
    run_extract(tmp_path, tmp_path / "three.expt")
    status = run_correct(tmp_path, tmp_path / "three.expt")
    assert status == {f"image_0000{i}_00000": "corrected" for i in (1, 2, 3)}
    assert not tmp_file.exists()
    assert not (tmp_path / "corrected" / "image_00000_00000.npz").exists()
    with np.load(tmp_path / "corrected" / "image_00003_00000.npz") as z:
        assert int(z["experiment_index"]) == 2
    assert set(run_correct(tmp_path, tmp_path / "three.expt").values()) == {"up to date"}
    # output.stale=keep only reports
    run_extract(tmp_path, expt)
    run_correct(tmp_path, expt)
    run_extract(tmp_path, tmp_path / "three.expt", "masks", "extracted", "output.stale=keep")
    run_correct(tmp_path, tmp_path / "three.expt", "extracted", "corrected", "output.stale=keep")
    assert (tmp_path / "corrected" / "image_00000_00000.npz").exists()


# ---------------------------------------------------------------- merge: identity and cells


@pytest.fixture(scope="module")
def corrected(sims, tmp_path_factory):
    """Crystals A, B (compatible cell), B in a permuted basis, C (6 % longer cell), each corrected."""
    root = tmp_path_factory.mktemp("identity_chains")
    out = {}
    for name, sim, basis, sg in (("A", sims["A"], None, None), ("B", sims["B"], None, None),
                                 ("B2", sims["B2"], None, None), ("Bp", sims["B2"], CYCLIC, "P1"),
                                 ("C", sims["C"], None, None)):
        d = root / name
        d.mkdir()
        expt, refl = _project(d, sim, name, basis, sg)
        run_bragg_mask(d, expt, refl)
        run_extract(d, expt)
        run_correct(d, expt)
        out[name] = (expt, d / "corrected")
    return out


def test_merge_one_crystal(corrected, tmp_path):
    expt, corr = corrected["A"]
    run_merge(tmp_path, expt, corr, "space_group=P43212")
    z = np.load(tmp_path / "merged" / "merged.npz")
    assert int(z["n_stills"]) == 4 and int(z["n_observations"]) > 0


def test_merge_refuses_stills_not_in_the_experiments(corrected, tmp_path):
    (expt_a, corr_a), (expt_b, corr_b) = corrected["A"], corrected["B"]
    # two corrected folders, one .expt: B's stills share A's identifiers, not its images
    with pytest.raises(Sorry, match=r"B/corrected/image_00000_00000\.npz: still of experiment 'image_00000'.*not in the experiment list"):
        run_merge(tmp_path, expt_a, corr_a, corr_b)
    # the wrong .expt
    with pytest.raises(Sorry, match=r"A/corrected/image_00000_00000\.npz: .*not in the experiment list"):
        run_merge(tmp_path, expt_b, corr_a)


def test_merge_refuses_stale_stills(corrected, tmp_path):
    """A still extracted with another crystal model than the experiment's now is refused."""
    expt_a, corr_a = corrected["A"]
    refined = tmp_path / "refined.expt"
    shutil.copy(expt_a, refined)
    _rotate_crystal(refined, 2)
    with pytest.raises(Sorry, match=r"image_00002_00000\.npz: extracted with another crystal model"):
        run_merge(tmp_path, refined, corr_a)


def test_merge_two_crystals_needs_asking(corrected, tmp_path):
    (expt_a, corr_a), (expt_b, corr_b) = corrected["A"], corrected["B2"]
    with pytest.raises(Sorry, match=r"still of another crystal .*merging\.allow_multiple_crystals=True"):
        run_merge(tmp_path, expt_a, expt_b, corr_a, corr_b)


def test_merge_incompatible_cells_refused(corrected, tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    (expt_a, corr_a), (expt_c, corr_c) = corrected["A"], corrected["C"]
    # asked for, but the cells differ by 6 % (> 2 %)
    with pytest.raises(Sorry, match=r"C\.expt: crystal cell .* incompatible with the reference"):
        run_merge(tmp_path, expt_a, expt_c, corr_a, corr_c, "merging.allow_multiple_crystals=True")
    # both crystals in one experiment list: the per-still cell check (reference: the
    # median cell, between the two; each still is ~3 % from it)
    el = ExperimentListFactory.from_json_file(str(expt_a), check_format=False)
    el.extend(ExperimentListFactory.from_json_file(str(expt_c), check_format=False))
    el.as_file(str(tmp_path / "AC.expt"))
    with pytest.raises(Sorry, match=r"corrected/(image|crystalC)_0000\d_00000\.npz: cell .* incompatible .*\d\.\d % on lengths"):
        run_merge(tmp_path, tmp_path / "AC.expt", corr_a, corr_c)


def test_merge_two_crystals_onto_one_reference(corrected, sims, tmp_path):
    """B indexed in a permuted basis (P1) merges with A once asked; its stills are reindexed."""
    from diffuse_cli.symmetry import LaueSymmetry

    (expt_a, corr_a), (expt_b, corr_b) = corrected["A"], corrected["Bp"]
    run_merge(tmp_path, expt_a, expt_b, corr_a, corr_b, "merging.allow_multiple_crystals=True",
              "space_group=P43212")
    z = np.load(tmp_path / "merged" / "merged.npz")
    assert int(z["n_stills"]) == 8
    np.testing.assert_allclose(z["unit_cell"][:3], [79.1 * 1.005, 79.1 * 1.005, 37.9 * 1.005], rtol=0.002)
    rows = json.loads((tmp_path / "merged" / "scales.json").read_text())["stills"]
    ops = [r["crystal_change_of_basis"] for r in rows]
    assert sum(op is not None for op in ops) == 4  # B's stills
    # the operator undoes the permutation up to the Laue group (truth: CYCLIC was applied)
    from diffuse_cli.merging import change_of_basis_onto, cell_of
    from diffuse_cli.symmetry import b_matrix

    A_p = np.asarray(truth_experiments(sims["B2"], CYCLIC, "P1")[0].crystal.get_A()).reshape(3, 3)
    M = change_of_basis_onto(b_matrix(cell_of(A_p)), CELL, 0.02, 2.0)
    undo = np.rint(CYCLIC @ M).astype(int)  # true h -> reported (CYCLIC) -> reindexed (M)
    from diffuse_cli.ambiguity_cosets import _op_string

    assert {op for op in ops if op} == {_op_string(M)}
    laue = LaueSymmetry("P43212")
    assert any(np.array_equal(undo, r) for r in laue.rotations) or any(
        np.array_equal(undo, -r) for r in laue.rotations)


def test_correct_recomputes_a_missing_factors_file(corrected, tmp_path):
    """The per-detector factors are a cache: deleted, they are recomputed (same key), and the
    corrected stills that refer to them stay up to date."""
    expt_a, corr_a = corrected["A"]
    work = tmp_path / "A"
    shutil.copytree(corr_a.parent, work)
    (factors,) = (work / "corrected").glob("factors_*.npz")
    factors.unlink()
    assert set(run_correct(work, work / expt_a.name).values()) == {"up to date"}
    assert factors.exists()


def test_merge_resume_rule(corrected, tmp_path):
    """merge: the same corrected stills (by content), experiments and parameters -> nothing to
    do, no output rewritten; one relevant parameter or one corrected still changed -> redone."""
    expt_a, corr_a = corrected["A"]
    work = tmp_path / "A"
    shutil.copytree(corr_a.parent, work)  # the chain's files, with their relative references
    expt, corr = work / expt_a.name, work / "corrected"
    out = tmp_path / "merged"
    names = ("merged.npz", "merged.ccp4", "statistics.json", "scales.json", "summary.json", "slice_hk0.png")

    def mtimes():
        return {n: (out / n).stat().st_mtime_ns for n in names}

    def merge_again(*extra):
        log = tmp_path / "merge.log"
        log.unlink(missing_ok=True)
        run_merge(tmp_path, expt, corr, "space_group=P43212", *extra)
        return "Nothing to do" in log.read_text()

    assert not merge_again()
    first = mtimes()
    assert merge_again() and mtimes() == first
    # a parameter that does not change the map (a warning limit): still nothing to do
    assert merge_again("warn_smear_voxels=0.7") and mtimes() == first
    # touched, same content: the identity of a corrected still is its content
    still = corr / "image_00002_00000.npz"
    st = still.stat()
    os.utime(still, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert merge_again() and mtimes() == first
    # one relevant parameter: redone, every output rewritten
    assert not merge_again("d_min=3")
    second = mtimes()
    assert all(second[n] != first[n] for n in names)
    with np.load(out / "merged.npz") as z:
        assert float(z["d_min"]) == 3.0
    assert merge_again("d_min=3") and mtimes() == second
    # one input: one corrected still rewritten with another normalisation -> redone
    with np.load(still) as z:
        arrays = dict(z)
    arrays["normalisation_value"] = np.float64(2 * float(arrays["normalisation_value"]))
    np.savez(still, **arrays)
    assert not merge_again("d_min=3")
    assert all(mtimes()[n] != second[n] for n in names)
    with np.load(out / "merged.npz") as z:
        assert int(z["n_stills"]) == 4
    assert merge_again("d_min=3")


# ---------------------------------------------------------------- the batch rule


def _truncate(path: pathlib.Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_batch_rule_bad_stills_are_recorded_and_skipped(sims, tmp_path, caplog):
    """extract, correct, merge: a bad still is a failed row with its reason, the batch
    goes on and ends with a warning; with every still bad, one Sorry."""
    expt, refl = _project(tmp_path, sims["A"])
    run_bragg_mask(tmp_path, expt, refl)
    names = {f"image_0000{i}_00000" for i in range(4)}
    # extract: a truncated image
    image = tmp_path / "sim_A" / "image_00001.cbf"
    good = image.read_bytes()
    _truncate(image)
    entries = run_extract(tmp_path, expt)
    assert entries["image_00001_00000"]["status"] == "failed"
    assert "image_00001.cbf" in entries["image_00001_00000"]["reason"]
    assert {n for n, e in entries.items() if e["status"] == "extracted"} == names - {"image_00001_00000"}
    assert not (tmp_path / "extracted" / "image_00001_00000.npz").exists()
    summary = json.loads((tmp_path / "extracted" / "summary.json").read_text())
    assert summary["n_failed"] == 1
    assert "Skipped 1 of 4 stills" in (tmp_path / "extract.log").read_text()
    image.write_bytes(good)  # mended: only that still is done on the rerun
    assert _redone(run_extract(tmp_path, expt)) == {"image_00001_00000"}
    # correct: a truncated extract
    shutil.copytree(tmp_path / "extracted", tmp_path / "extracted_bad")
    _truncate(tmp_path / "extracted_bad" / "image_00002_00000.npz")
    status = run_correct(tmp_path, expt, "extracted_bad", "corrected")
    assert status == {**{n: "corrected" for n in names}, "image_00002_00000": "failed"}
    rows = json.loads((tmp_path / "corrected" / "summary.json").read_text())
    assert rows["schema"] == "diffuse.correct_summary/1" and rows["n_failed"] == 1
    (row,) = [r for r in rows["stills"] if r["status"] == "failed"]
    assert "image_00002_00000.npz" in row["reason"] and "truncated" in row["reason"]
    assert "Skipped 1 of 4 stills" in (tmp_path / "correct.log").read_text()
    # every still bad: one Sorry naming the summary
    bad = tmp_path / "extracted_allbad"
    shutil.copytree(tmp_path / "extracted", bad)
    for n in names:
        _truncate(bad / f"{n}.npz")
    with pytest.raises(Sorry, match=r"every still failed \(4\).*summary\.json"):
        run_correct(tmp_path, expt, "extracted_allbad", "corrected_allbad")
    # merge: a truncated corrected still
    run_correct(tmp_path, expt)
    _truncate(tmp_path / "corrected" / "image_00003_00000.npz")
    run_merge(tmp_path, expt, tmp_path / "corrected")
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert merged["schema"] == "diffuse.merge_summary/1" and merged["n_merged"] == 3 and merged["n_failed"] == 1
    (row,) = [r for r in merged["stills"] if r["status"] == "failed"]
    assert row["name"] == "image_00003_00000.npz" and "image_00003_00000.npz" in row["reason"]
    with np.load(tmp_path / "merged" / "merged.npz") as z:
        assert int(z["n_stills"]) == 3 and "image_00003_00000.npz" in str(z["skipped"][0])
    assert "Skipped 1 of 4 stills" in (tmp_path / "merge.log").read_text()
