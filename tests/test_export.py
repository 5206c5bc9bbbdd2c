"""diffuse.export: every format read back by an independent reader and compared with the source map.

The source is a small synthetic merged.npz (written by write_merged on an
HKLGrid with a monoclinic cell and NaN voxels). Readers share no code with
the writers: h5py for HDF5/NeXus, iotbx.mtz (cctbx) for the gemmi-written
MTZ, and a .lat reader, a VTK parser and a CSV parse written here from the
formats' descriptions (Lunus's lreadlt()/lreadvtk(), the VTK legacy format).
"""

from __future__ import annotations

import csv
import json
import re
import struct

import numpy as np
import pytest

from diffuse_cli.grid import HKLGrid

CELL = (31.0, 42.0, 53.0, 90.0, 104.5, 90.0)
NDIV = (2, 3, 2)
HKL_MAX = (2, 2, 3)
MASK_TAG = -32768.0


def _source():
    """I, sigma, counts on the grid: symmetric under 2/m (b unique), NaN where unmeasured."""
    grid = HKLGrid(NDIV, HKL_MAX)
    h, k, l = np.meshgrid(*grid.axes(), indexing="ij")
    I = 100.0 + h**2 + 2.0 * k**2 + 3.0 * l**2 + h * l  # invariant under (-h,k,-l) and (-h,-k,-l)
    unmeasured = (h * l > 0.9) | np.isclose(np.abs(k), 1 / 3)  # symmetric too
    I[unmeasured] = np.nan
    sigma = np.sqrt(np.nan_to_num(I, nan=0.0)) / 10.0
    sigma[unmeasured] = np.nan
    counts = np.where(unmeasured, 0, 1 + (np.abs(h) * 2 + np.abs(k) * 3).astype(np.int64))
    return grid, I.astype(np.float32), sigma.astype(np.float32), counts


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from diffuse_cli.formats.merged import write_merged

    grid, I, sigma, counts = _source()
    path = tmp_path_factory.mktemp("export_src") / "merged.npz"
    write_merged(path, grid, I, sigma, counts, CELL, "P21", laue_group="P 1 2/m 1",
                 units="electron units per unit cell")
    return {"path": path, "grid": grid, "I": I, "sigma": sigma, "counts": counts}


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """Every format with default parameters, through the program."""
    from diffuse_cli.command_line.export import run

    out = tmp_path_factory.mktemp("exports")
    run([str(source["path"]), "format=hdf5+nexus+lat", "format=vtk", "format=mtz+csv",
         f"output.directory={out}", f"output.log={out / 'export.log'}"])
    return out


def _expected(source, fill):
    return np.where(np.isfinite(source["I"]), source["I"], fill)


# ------------------------------------------------------------------ HDF5 (Yell)


def test_hdf5_yell_layout(source, exported):
    import h5py

    grid = source["grid"]
    with h5py.File(exported / "merged.h5", "r") as fh:
        assert fh.attrs["filetype"] == "Yell 1.0"
        assert fh["format"][()].decode() == "Yell 1.0"
        data = fh["data"][()]
        assert data.dtype == np.float64 and data.shape == grid.shape
        np.testing.assert_array_equal(data, source["I"].astype(np.float64))  # NaN == NaN here
        np.testing.assert_allclose(fh["lower_limits"][()], [-m for m in HKL_MAX])
        np.testing.assert_allclose(fh["step_sizes"][()], [1 / n for n in NDIV])
        np.testing.assert_allclose(fh["unit_cell"][()], CELL)
        assert fh["is_direct"][()] == 0
        assert fh.attrs["space_group"] == "P21"
        # Yell's grid: point i along each axis sits at lower_limit + i * step
        h = fh["lower_limits"][0] + fh["step_sizes"][0] * np.arange(data.shape[0])
        np.testing.assert_allclose(h, grid.axes()[0], atol=1e-12)


def test_hdf5_fft_grid_and_weights(source, tmp_path):
    import h5py

    from diffuse_cli.command_line.export import run

    run([str(source["path"]), "format=hdf5", "hdf5.fft_grid=True", "hdf5.weights=True",
         f"output.directory={tmp_path}", f"output.log={tmp_path / 'log'}"])
    with h5py.File(tmp_path / "merged.h5", "r") as fh, h5py.File(tmp_path / "merged_weights.h5", "r") as fw:
        data, lower, step = fh["data"][()], fh["lower_limits"][()], fh["step_sizes"][()]
        shape = data.shape
        # Yell's FFT rule: even sizes, origin at pixel n/2 (0-based)
        assert all(n % 2 == 0 for n in shape)
        np.testing.assert_allclose(lower + np.array(shape) // 2 * step, 0.0, atol=1e-12)
        cut = tuple(slice(0, n) for n in shape)
        ok = np.isfinite(source["I"][cut])
        np.testing.assert_array_equal(data[ok], source["I"][cut][ok])
        assert np.all(data[~ok] == 0.0)  # weights=True: unmeasured data filled with 0
        w = fw["data"][()]
        np.testing.assert_allclose(w[ok], 1.0 / source["sigma"][cut][ok].astype(np.float64), rtol=1e-12)
        assert np.all(w[~ok] == 0.0)


# ------------------------------------------------------------------ NeXus


def test_nexus_nxdata(source, exported):
    import h5py

    with h5py.File(exported / "merged.nxs", "r") as fh:
        assert fh.attrs["NX_class"] == "NXroot"
        entry = fh[fh.attrs["default"]]
        assert entry.attrs["NX_class"] == "NXentry"
        data = entry[entry.attrs["default"]]
        assert data.attrs["NX_class"] == "NXdata"
        signal = data[data.attrs["signal"]]
        axes = [a.decode() if isinstance(a, bytes) else a for a in data.attrs["axes"]]
        assert axes == ["h", "k", "l"]
        for i, (name, axis) in enumerate(zip(axes, source["grid"].axes())):
            assert data.attrs[f"{name}_indices"] == i
            np.testing.assert_allclose(data[name][()], axis)
            assert data[name].attrs["units"] == "rlu"
        np.testing.assert_array_equal(signal[()], source["I"])
        np.testing.assert_array_equal(data[data.attrs["signal"] + "_errors"][()], source["sigma"])
        np.testing.assert_array_equal(data["counts"][()], source["counts"])
        assert signal.attrs["units"] == "electron units per unit cell"
        sample = entry["sample"]
        assert sample.attrs["NX_class"] == "NXsample"
        np.testing.assert_allclose(sample["unit_cell"][()], [CELL])
        np.testing.assert_allclose(sample["unit_cell_abc"][()], CELL[:3])
        assert sample["space_group"][()].decode() == "P21"


# ------------------------------------------------------------------ Lunus .lat


def read_lat(path):
    """A Lunus LAT3D lattice: uint32 x/y/z voxels, float32 (min, max) bounds per axis,
    then float32 values with x fastest (lreadlt())."""
    raw = path.read_bytes()
    nx, ny, nz = struct.unpack("<3I", raw[:12])
    bounds = np.array(struct.unpack("<6f", raw[12:36]), dtype=np.float64).reshape(3, 2)
    values = np.frombuffer(raw[36:], dtype="<f4")
    assert values.size == nx * ny * nz
    lattice = values.reshape(nz, ny, nx).transpose(2, 1, 0)  # [i, j, k]
    n = np.array([nx, ny, nz])
    scale = (bounds[:, 1] - bounds[:, 0]) / (n - 1)
    origin = (-bounds[:, 0] / scale + 0.5).astype(int)
    return lattice, scale, origin


def test_lat_round_trip(source, exported):
    lattice, scale, origin = read_lat(exported / "merged.lat")
    shape = source["grid"].shape
    assert all(n % 2 == 0 for n in lattice.shape)  # Lunus's even lattices
    assert lattice.shape == tuple(n + 1 for n in shape)
    # the origin voxel is hkl 0 0 0; one voxel is 1/(a ndiv) Å⁻¹ (Lunus's 1/cell.a per sample)
    np.testing.assert_array_equal(origin, [m * n for m, n in zip(HKL_MAX, NDIV)])
    np.testing.assert_allclose(scale, [1 / (a * n) for a, n in zip(CELL[:3], NDIV)], rtol=1e-6)
    inner = lattice[: shape[0], : shape[1], : shape[2]]
    np.testing.assert_array_equal(inner, _expected(source, MASK_TAG))
    assert np.all(lattice[shape[0]:] == MASK_TAG) and np.all(lattice[:, :, shape[2]:] == MASK_TAG)
    # older lreadlt() takes the scale as (max - min)/n: the origin must not move
    raw = (exported / "merged.lat").read_bytes()
    bounds = np.array(struct.unpack("<6f", raw[12:36])).reshape(3, 2)
    old_scale = (bounds[:, 1] - bounds[:, 0]) / np.array(lattice.shape)
    np.testing.assert_array_equal((-bounds[:, 0] / old_scale + 0.5).astype(int), origin)


# ------------------------------------------------------------------ VTK


def read_vtk(path):
    """Legacy VTK STRUCTURED_POINTS with one scalar field: (header dict, values [x, y, z], title)."""
    raw = path.read_bytes()
    lines, pos = [], 0
    while not (lines and lines[-1].startswith("LOOKUP_TABLE")):
        end = raw.index(b"\n", pos)
        lines.append(raw[pos:end].decode("ascii"))
        pos = end + 1
    assert lines[0].startswith("# vtk DataFile Version")
    head = {ln.split()[0]: ln.split()[1:] for ln in lines[2:]}
    nx, ny, nz = map(int, head["DIMENSIONS"])
    kind = head["SCALARS"][1]
    if lines[2] == "BINARY":
        values = np.frombuffer(raw[pos: pos + 4 * nx * ny * nz], dtype=">i4" if kind == "int" else ">f4")
    else:
        values = np.array(raw[pos:].split(), dtype=np.float64)
    assert values.size == nx * ny * nz == int(head["POINT_DATA"][0])
    return head, values.reshape(nz, ny, nx).transpose(2, 1, 0), lines[1]


def _tag(title, name):
    """Lunus's lgettag(): the value after 'name=' up to ';' or the end."""
    return re.search(name + r"=([^;\n]*)", title).group(1)


def test_vtk_ascii_round_trip(source, exported):
    head, values, title = read_vtk(exported / "merged.vtk")
    assert [int(v) for v in head["DIMENSIONS"]] == list(source["grid"].shape)
    np.testing.assert_allclose([float(v) for v in head["ORIGIN"]], [-m for m in HKL_MAX])
    np.testing.assert_allclose([float(v) for v in head["SPACING"]], [1 / n for n in NDIV])
    np.testing.assert_allclose(values, _expected(source, MASK_TAG), rtol=1e-6)
    np.testing.assert_allclose([float(v) for v in _tag(title, "unit_cell").split(",")], CELL)
    assert _tag(title, "space_group") == "P21" and _tag(title, "lattice_type") == "P1"


def test_vtk_binary_nan_lunus_coordinates(source, tmp_path):
    from diffuse_cli.command_line.export import run

    run([str(source["path"]), "format=vtk", "vtk.encoding=binary", "vtk.unmeasured=nan",
         "vtk.coordinates=lunus", f"output.directory={tmp_path}", f"output.log={tmp_path / 'log'}"])
    head, values, _ = read_vtk(tmp_path / "merged.vtk")
    np.testing.assert_array_equal(values, source["I"])  # NaN where unmeasured
    lengths = np.array(CELL[:3])
    np.testing.assert_allclose([float(v) for v in head["SPACING"]], 1 / (lengths * NDIV), rtol=1e-8)
    np.testing.assert_allclose([float(v) for v in head["ORIGIN"]], -np.array(HKL_MAX) / lengths, rtol=1e-8)
    run([str(source["path"]), "format=vtk", "vtk.encoding=binary", "vtk.field=counts",
         f"output.directory={tmp_path}", f"output.log={tmp_path / 'log'}"])
    head, counts, _ = read_vtk(tmp_path / "merged.vtk")
    assert head["SCALARS"][:2] == ["counts", "int"]
    np.testing.assert_array_equal(counts, source["counts"])


# ------------------------------------------------------------------ MTZ


def _integer_voxels(source):
    """{(h, k, l): (I, sigma, counts)} of the measured voxels at integer hkl other than 0 0 0."""
    axes = source["grid"].axes()
    out = {}
    for idx in zip(*np.nonzero(np.isfinite(source["I"]))):
        hkl = [axes[a][i] for a, i in enumerate(idx)]
        if np.allclose(hkl, np.rint(hkl)):
            out[tuple(int(round(x)) for x in hkl)] = (source["I"][idx], source["sigma"][idx], source["counts"][idx])
    assert (0, 0, 0) in out  # measured in the source, so leaving it out is tested
    del out[(0, 0, 0)]
    return out


def _read_mtz(path):
    import iotbx.mtz

    mtz = iotbx.mtz.object(file_name=str(path))
    arrays = {a.info().labels[0]: a for a in mtz.as_miller_arrays()}
    return mtz, arrays


def test_mtz_unique_round_trip(source, exported):
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    mtz, arrays = _read_mtz(exported / "merged.mtz")
    assert mtz.space_group_info().type().number() == 4  # P 1 21 1
    i_obs = arrays["I"]
    assert i_obs.is_xray_intensity_array()
    np.testing.assert_allclose(i_obs.unit_cell().parameters(), CELL, rtol=1e-5)
    truth = _integer_voxels(source)
    got = list(i_obs.indices())
    for hkl, value, sigma in zip(got, i_obs.data(), i_obs.sigmas()):
        assert value == pytest.approx(float(truth[hkl][0]), rel=1e-6)
        assert sigma == pytest.approx(float(truth[hkl][1]), rel=1e-6)
    counts = dict(zip(arrays["N"].indices(), arrays["N"].data()))
    assert all(counts[hkl] == truth[hkl][2] for hkl in got)
    # the file holds one reflection per symmetry class of the measured integer hkl
    cs = crystal.symmetry(unit_cell=CELL, space_group_symbol="P 1 21 1")
    written = miller.set(cs, i_obs.indices(), anomalous_flag=False)
    assert written.unique_under_symmetry().size() == written.size()
    every = miller.set(cs, flex.miller_index(list(truth)), anomalous_flag=False)
    assert written.size() == every.unique_under_symmetry().size()


def test_mtz_p1_every_integer_voxel(source, tmp_path):
    from diffuse_cli.command_line.export import run

    run([str(source["path"]), "format=mtz", "mtz.unique=False",
         f"output.directory={tmp_path}", f"output.log={tmp_path / 'log'}"])
    mtz, arrays = _read_mtz(tmp_path / "merged.mtz")
    assert mtz.space_group_info().type().number() == 1
    truth = _integer_voxels(source)
    assert sorted(arrays["I"].indices()) == sorted(truth)


# ------------------------------------------------------------------ CSV


def test_csv_non_empty_voxels(source, exported):
    with open(exported / "merged.csv") as fh:
        comments = [ln for ln in fh if ln.startswith("#")]
    with open(exported / "merged.csv") as fh:
        rows = list(csv.DictReader(ln for ln in fh if not ln.startswith("#")))
    assert "unit_cell=31,42,53,90,104.5,90" in comments[1] and "space_group=P21" in comments[1]
    measured = np.isfinite(source["I"])
    assert len(rows) == measured.sum()
    axes = source["grid"].axes()
    lookup = {tuple(np.round([axes[0][i], axes[1][j], axes[2][k]], 6)): (i, j, k)
              for i, j, k in zip(*np.nonzero(measured))}
    for row in rows:
        idx = lookup[tuple(np.round([float(row[c]) for c in "hkl"], 6))]
        assert np.float32(row["I"]) == source["I"][idx]  # 9 digits: exact float32
        assert np.float32(row["sigma"]) == source["sigma"][idx]
        assert int(row["counts"]) == source["counts"][idx]


# ------------------------------------------------------------------ program


def test_program_writes_named_files_and_summary(exported):
    summary = json.loads((exported / "export.json").read_text())["exports"]
    assert [e["format"] for e in summary] == ["hdf5", "nexus", "lat", "vtk", "mtz", "csv"]
    for e in summary:
        assert e["file"].endswith("merged" + {"hdf5": ".h5", "nexus": ".nxs"}.get(e["format"], "." + e["format"]))
        assert e["bytes"] > 0
    assert not list(exported.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_other_map_on_the_grid_without_counts(source, tmp_path):
    """Any map with the grid contract (e.g. an anisotropic part) exports; counts optional."""
    import h5py

    from diffuse_cli import program
    from diffuse_cli.command_line.export import run

    grid = source["grid"]
    h, k, l = grid.axes()
    path = tmp_path / "anisotropic.npz"
    program.write_npz(path, schema=np.array("diffuse.anisotropic/1"), I=source["I"], sigma=source["sigma"],
                      h=h, k=k, l=l, unit_cell=np.array(CELL))
    run([str(path), "format=nexus+csv", f"output.directory={tmp_path}", f"output.log={tmp_path / 'log'}"])
    with h5py.File(tmp_path / "anisotropic.nxs", "r") as fh:
        assert "counts" not in fh["entry/data"]
        np.testing.assert_array_equal(fh["entry/data/intensity"][()], source["I"])
        assert fh["entry/sample/space_group"][()].decode() == "P1"  # not in the file: P1
    header = [ln for ln in (tmp_path / "anisotropic.csv").read_text().splitlines() if not ln.startswith("#")][0]
    assert header == "h,k,l,I,sigma"


# ------------------------------------------------------------------ bad inputs


def _sorry(args, tmp_path):
    from libtbx.utils import Sorry

    from diffuse_cli.command_line.export import run

    with pytest.raises(Sorry) as e:
        run([*args, f"output.directory={tmp_path}", f"output.log={tmp_path / 'log'}"])
    message = str(e.value)
    assert "\n" not in message.strip()
    return message


def test_unknown_format_names_the_parameter(source, tmp_path):
    message = _sorry([str(source["path"]), "format=hdf5+xyz"], tmp_path)
    assert message.startswith("format") and "xyz" in message


def test_no_format_names_the_parameter(source, tmp_path):
    assert _sorry([str(source["path"])], tmp_path).startswith("format")


def test_wrong_npz_names_the_file(source, tmp_path):
    from diffuse_cli import program

    no_schema = tmp_path / "plain.npz"
    program.write_npz(no_schema, I=np.zeros((2, 2, 2)))
    assert str(no_schema) in _sorry([str(no_schema), "format=csv"], tmp_path)
    no_sigma = tmp_path / "no_sigma.npz"
    program.write_npz(no_sigma, schema=np.array("other/1"), I=np.zeros((2, 2, 2)))
    message = _sorry([str(no_sigma), "format=csv"], tmp_path)
    assert str(no_sigma) in message and "sigma" in message
    bad_axes = tmp_path / "bad_axes.npz"
    program.write_npz(bad_axes, schema=np.array("other/1"), I=np.zeros((2, 2, 2)), sigma=np.zeros((2, 2, 2)),
                      h=np.arange(3.0), k=np.arange(2.0), l=np.arange(2.0), unit_cell=np.array(CELL))
    message = _sorry([str(bad_axes), "format=csv"], tmp_path)
    assert str(bad_axes) in message and "shape" in message
