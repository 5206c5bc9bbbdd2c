"""formats.factors.read_factors reads stored members straight from the file: the same arrays
as np.load (the independent reader), a damaged member a one-line Sorry as np.load's path gives."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from libtbx.utils import Sorry

from diffuse_cli import program
from diffuse_cli.formats import factors as ff

N = 5000


def _fields():
    rng = np.random.default_rng(1)
    return dict(
        schema=np.array(ff.FACTORS_SCHEMA), geometry_key=np.array("abc123"),
        panel_shapes=np.array([[50, 100]], dtype=np.int32),
        s1_unit=rng.normal(size=(N, 3)).astype(np.float32), beam_direction=np.array([0.0, 0.0, -1.0]),
        s0=np.array([0.0, 0.0, -1 / 0.98]), wavelength=np.float64(0.98), total=rng.uniform(1, 2, N),
        applied=np.array(["solid_angle", "polarization"]), solid_angle=rng.uniform(size=N).astype(np.float32),
        empty=np.zeros((0, 3), dtype=np.float32), big_endian=np.arange(7, dtype=">i4"))


@pytest.mark.parametrize("compressed", [False, True])
def test_read_factors_equals_np_load(tmp_path, compressed):
    path = str(tmp_path / "factors_abc123.npz")
    program.write_npz(path, compressed=compressed, **_fields())
    got = ff.read_factors(path)
    with np.load(path) as want:
        assert sorted(got) == sorted(want.files)
        for name in want.files:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
            assert got[name].tobytes() == want[name].tobytes(), name
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:  # stored: read directly; deflated: by np.load
        assert (ff._read_stored(zf, raw, "total.npy") is None) == compressed
    sub = ff.read_factors(path, fields=("total", "s1_unit", "absent"))
    assert sorted(sub) == ["s1_unit", "total"]
    np.testing.assert_array_equal(sub["total"], got["total"])


def _member_data_offset(path, member):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        n_name, n_extra = np.frombuffer(fh.read(4), dtype="<u2")
    return info.header_offset + 30 + int(n_name) + int(n_extra), info.file_size


def test_damaged_member_is_a_sorry_naming_the_field(tmp_path):
    path = str(tmp_path / "factors_abc123.npz")
    program.write_npz(path, compressed=False, **_fields())
    start, size = _member_data_offset(path, "total.npy")
    raw = bytearray(open(path, "rb").read())
    raw[start + size - 3] ^= 0xFF  # one byte of the array data: only the CRC tells
    open(path, "wb").write(bytes(raw))
    with pytest.raises(Sorry, match=r"field total is unreadable \(BadZipFile\)"):
        ff.read_factors(path, fields=("total",))
    assert ff.read_factors(path, fields=("solid_angle",))["solid_angle"].shape == (N,)  # the others read
    with np.load(path) as z, pytest.raises(zipfile.BadZipFile):  # the independent reader agrees
        z["total"]


def test_truncated_file_is_a_sorry(tmp_path):
    path = str(tmp_path / "factors_abc123.npz")
    program.write_npz(path, compressed=False, **_fields())
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(Sorry, match="factors_abc123.npz"):
        ff.read_factors(path)
