"""diffuse.stills_process on a multi-image NeXus/NXmx HDF5 file of stills.

Three simulated stills (diffuse.simulate, miniCBF) are copied into one NXmx
file written here with h5py, in two encodings that dxtbx (FormatNXmx) reads as
stills:

* ``no_goniometer``: the NXsample has no ``depends_on``, so dxtbx makes no
  goniometer and no scan (an ImageSet, one experiment per image);
* ``fixed_omega``: the sample depends on an omega axis whose three values are
  all 0, so dxtbx makes a zero-width scan (one ImageSequence shared by one
  experiment per image).

The file must read back as the CBFs (pixels, geometry, wavelength), and
diffuse.stills_process must give one row per frame, tagged ``<stem>_0000i``,
with the simulated orientations.
"""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
from test_stills_process import _crystals, _run, _summary

import diffuse_cli  # noqa: F401  (DIALS environment before any libtbx import)

#: imgCIF (dxtbx) laboratory frame -> McStas (NeXus) frame, and back
MCSTAS = np.diag([-1.0, 1.0, -1.0])

ENCODINGS = ("no_goniometer", "fixed_omega")


def write_nxmx_stills(path, cbf_paths, encoding="no_goniometer"):
    """Write single-panel CBF stills (same detector and beam) as one NXmx file.

    Minimal NXmx for dxtbx's FormatNXmx: ``/entry/definition = "NXmx"``; an
    NXinstrument with an NXbeam (``incident_wavelength``) and an NXdetector
    (frames ``data``, sensor material and thickness, underload and saturation
    values, one NXdetector_module with ``data_origin``/``data_size`` and
    ``fast_pixel_direction``/``slow_pixel_direction`` -> ``module_offset`` ->
    ``det_z`` depends_on chain); an NXsample; an NXdata linking the frames.
    Vectors are in the McStas frame.
    """
    import h5py

    import dxtbx

    images = [dxtbx.load(str(p)) for p in cbf_paths]
    detector, beam = images[0].get_detector(), images[0].get_beam()
    assert len(detector) == 1
    panel = detector[0]
    data = np.stack([im.get_raw_data().as_numpy_array() for im in images]).astype(np.int32)
    n_fast, n_slow = panel.get_image_size()
    px_fast, px_slow = panel.get_pixel_size()
    origin = MCSTAS @ np.array(panel.get_origin())
    underload, overload = panel.get_trusted_range()
    detector_path = "/entry/instrument/detector"

    def axis(group, name, value, kind, vector, depends_on, units, **attrs):
        ds = group.create_dataset(name, data=value)
        ds.attrs.update(
            {"transformation_type": kind, "vector": vector, "units": units, "depends_on": depends_on, **attrs}
        )
        return ds

    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = "NXmx"

        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        nxbeam = instrument.create_group("beam")
        nxbeam.attrs["NX_class"] = "NXbeam"
        nxbeam["incident_wavelength"] = beam.get_wavelength()
        nxbeam["incident_wavelength"].attrs["units"] = "angstrom"

        nxdetector = instrument.create_group("detector")
        nxdetector.attrs["NX_class"] = "NXdetector"
        nxdetector.create_dataset("data", data=data, chunks=(1, n_slow, n_fast), compression="gzip")
        nxdetector["sensor_material"] = panel.get_material()
        nxdetector["sensor_thickness"] = panel.get_thickness()
        nxdetector["sensor_thickness"].attrs["units"] = "mm"
        # dxtbx: trusted_range = (underload_value - 1, saturation_value)
        nxdetector["underload_value"] = int(round(underload)) + 1
        nxdetector["saturation_value"] = int(round(overload))
        transformations = nxdetector.create_group("transformations")
        transformations.attrs["NX_class"] = "NXtransformations"
        axis(transformations, "det_z", origin[2], "translation", [0.0, 0.0, 1.0], ".", "mm")
        nxdetector["depends_on"] = f"{detector_path}/transformations/det_z"

        module = nxdetector.create_group("module")
        module.attrs["NX_class"] = "NXdetector_module"
        module["data_origin"] = np.array([0, 0], dtype=np.int64)
        module["data_size"] = np.array([n_slow, n_fast], dtype=np.int64)  # slow, fast
        axis(module, "module_offset", 0.0, "translation", [1.0, 0.0, 0.0],
             f"{detector_path}/transformations/det_z", "mm",
             offset=[origin[0], origin[1], 0.0], offset_units="mm")
        for name, size, direction in (
            ("fast_pixel_direction", px_fast, panel.get_fast_axis()),
            ("slow_pixel_direction", px_slow, panel.get_slow_axis()),
        ):
            axis(module, name, size, "translation", MCSTAS @ np.array(direction),
                 f"{detector_path}/module/module_offset", "mm",
                 offset=[0.0, 0.0, 0.0], offset_units="mm")

        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        if encoding == "fixed_omega":
            gonio = sample.create_group("transformations")
            gonio.attrs["NX_class"] = "NXtransformations"
            # one value per frame, none advancing: a zero-width scan
            axis(gonio, "omega", np.zeros(len(images)), "rotation", [-1.0, 0.0, 0.0], ".", "deg")
            sample["depends_on"] = "/entry/sample/transformations/omega"
        else:
            assert encoding == "no_goniometer", encoding

        nxdata = entry.create_group("data")
        nxdata.attrs["NX_class"] = "NXdata"
        nxdata.attrs["signal"] = "data"
        nxdata["data"] = h5py.SoftLink(f"{detector_path}/data")


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Three simulated stills (seed 7) and their truth."""
    from diffuse_cli.command_line import simulate

    d = tmp_path_factory.mktemp("sim_nexus") / "sim"
    d.mkdir()
    simulate.run(
        ["n_stills=3", "seed=7", "truth.map=False", f"output.directory={d}", "nproc=1",
         f"output.log={d / 'diffuse.simulate.log'}"]
    )
    truth = json.loads((d / "truth.json").read_text())
    return {"dir": d, "truth": truth, "images": [d / name for name in truth["images"]]}


@pytest.fixture(scope="module", params=ENCODINGS)
def nexus(request, sim, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"nexus_{request.param}")
    path = work / f"{request.param}.nxs"
    write_nxmx_stills(path, sim["images"], request.param)
    return {"path": path, "work": work, "encoding": request.param}


# -------------------------------------------------------------------- tests


# dxtbx divides the (zero) omega steps by their (zero) median to check them
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_nxmx_file_reads_as_the_cbf_stills(sim, nexus):
    import dxtbx
    from dxtbx.format.Registry import get_format_class_for_file
    from dxtbx.model.experiment_list import ExperimentListFactory

    path = str(nexus["path"])
    assert get_format_class_for_file(path).__name__ == "FormatNXmx"
    experiments = ExperimentListFactory.from_filenames([path])
    assert len(experiments) == 3
    for i, (expt, cbf) in enumerate(zip(experiments, sim["images"])):
        reference = dxtbx.load(str(cbf))
        imageset = expt.imageset
        if nexus["encoding"] == "no_goniometer":
            assert expt.goniometer is None and expt.scan is None
            assert len(imageset) == 1
            k = 0
        else:
            # one ImageSequence for all three stills; this experiment's scan
            # is the one zero-width image it refers to
            assert expt.goniometer is not None
            assert len(imageset) == 3 and len(expt.scan) == 1
            assert expt.scan.get_oscillation()[1] == 0.0
            assert imageset.get_scan().get_oscillation()[1] == 0.0
            k = expt.scan.get_array_range()[0] - imageset.get_scan().get_array_range()[0]
        assert imageset.get_path(k) == path and imageset.indices()[k] == i
        np.testing.assert_array_equal(
            imageset.get_raw_data(k)[0].as_numpy_array(), reference.get_raw_data().as_numpy_array()
        )
        assert expt.beam.get_wavelength() == reference.get_beam().get_wavelength()
        assert len(expt.detector) == 1
        got, want = expt.detector[0], reference.get_detector()[0]
        np.testing.assert_allclose(got.get_origin(), want.get_origin(), atol=1e-6)
        np.testing.assert_allclose(got.get_fast_axis(), want.get_fast_axis(), atol=1e-6)
        np.testing.assert_allclose(got.get_slow_axis(), want.get_slow_axis(), atol=1e-6)
        np.testing.assert_allclose(got.get_pixel_size(), want.get_pixel_size(), atol=1e-9)
        assert got.get_image_size() == want.get_image_size()
        assert got.get_trusted_range() == want.get_trusted_range()
        assert got.get_material() == want.get_material()
        assert got.get_thickness() == pytest.approx(want.get_thickness(), abs=1e-9)


def _orientation_error_deg(truth, i, crystal):
    """Angle (degrees) between still ``i``'s true setting and ``crystal``."""
    from cctbx import sgtbx
    from dials.algorithms.indexing.compare_orientation_matrices import (
        difference_rotation_matrix_axis_angle,
    )
    from dxtbx.model import Crystal
    from scitbx import matrix

    sg = sgtbx.space_group_info(truth["space_group"]).group()
    a_inv = matrix.sqr([x for r in truth["stills"][i]["A"] for x in r]).inverse()
    true_crystal = Crystal(a_inv[0:3], a_inv[3:6], a_inv[6:9], space_group=sg)
    _, _, angle, _ = difference_rotation_matrix_axis_angle(true_crystal, crystal)
    return abs(angle)


def test_stills_process_nxmx_one_row_per_frame(sim, nexus):
    truth = sim["truth"]
    out = nexus["work"] / "out"
    cell = ",".join(str(x) for x in truth["unit_cell"])
    _run(
        [
            nexus["path"],
            f"indexing.known_symmetry.space_group={truth['space_group']}",
            f"indexing.known_symmetry.unit_cell={cell}",
            "spotfinder.threshold.dispersion.global_threshold=400",
            "nproc=1",
            f"output.directory={out}",
        ],
        cwd=nexus["work"],
    )
    stem = nexus["path"].stem
    tags = [f"{stem}_{i:05d}" for i in range(3)]

    rows = _summary(out)
    assert [r["tag"] for r in rows] == tags
    assert [r["frame"] for r in rows] == [0, 1, 2]
    assert all(pathlib.Path(r["image"]).name == nexus["path"].name for r in rows)
    assert [r["status"] for r in rows] == ["indexed"] * 3, [(r["tag"], r["reason"]) for r in rows]
    assert [r["route"] for r in rows] == ["stills"] * 3
    assert [float(r["osc_width_deg"]) for r in rows] == [0.0] * 3
    with open(out / "stills_process_summary.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["tag"] for r in csv_rows] == tags
    assert [r["status"] for r in csv_rows] == ["indexed"] * 3
    assert [r["route"] for r in csv_rows] == ["stills"] * 3

    from dxtbx.model.experiment_list import ExperimentList

    combined = ExperimentList.from_file(str(out / "combined.expt"), check_format=False)
    assert len(combined) == 3
    crystals = _crystals(out)
    assert sorted(crystals) == tags  # one experiment per frame
    for row in rows:
        angle = _orientation_error_deg(truth, row["frame"], crystals[row["tag"]].crystal)
        assert angle < 0.1, (row["tag"], angle)


def test_stills_process_imported_expt_one_row_per_still(sim, tmp_path):
    """dials.import of three stills: three experiments sharing one ImageSet,
    experiment k = image k. Each still is processed once, as its own image."""
    from dials.command_line.dials_import import run as dials_import

    truth = sim["truth"]
    work = tmp_path
    dials_import([*map(str, sim["images"]), f"output.experiments={work / 'imported.expt'}"])
    out = work / "out"
    cell = ",".join(str(x) for x in truth["unit_cell"])
    _run(
        [
            work / "imported.expt",
            f"indexing.known_symmetry.space_group={truth['space_group']}",
            f"indexing.known_symmetry.unit_cell={cell}",
            "spotfinder.threshold.dispersion.global_threshold=400",
            "nproc=1",
            f"output.directory={out}",
        ],
        cwd=work,
    )
    rows = _summary(out)
    assert [r["tag"] for r in rows] == [f"imported_{i:05d}" for i in range(3)]
    assert [r["status"] for r in rows] == ["indexed"] * 3, [(r["tag"], r["reason"]) for r in rows]
    crystals = _crystals(out)
    for row in rows:
        angle = _orientation_error_deg(truth, row["frame"], crystals[row["tag"]].crystal)
        assert angle < 0.1, (row["tag"], angle)
