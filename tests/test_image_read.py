"""diffuse_cli.image_read: multi-panel CBF pixels identical to dxtbx's, read fast.

Truth is dxtbx's ``imageset.get_raw_data`` (FormatCBFMultiTileHierarchy) and
cbflib's own decoder (pycbf ``get_integerarray_as_string``); the numba
CBF_PACKED decoder shares no code with either.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli import atomic_io, dials_compat, extraction, image_read
from diffuse_cli.command_line import simulate as simulate_cli

needs_numba = pytest.mark.skipif(not image_read.HAVE_NUMBA, reason="numba not installed")


def run_simulate(directory: pathlib.Path, *args: str) -> list[pathlib.Path]:
    directory.mkdir(parents=True, exist_ok=True)
    simulate_cli.run([f"output.directory={directory}", f"output.log={directory / 'simulate.log'}", *args])
    return sorted(directory.glob("image_*.cbf"))


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict:
    """Simulated multi-panel full CBF stills: CSPAD-like (8 tilted modules), a 2 x 2 grid
    with an exposure time."""
    root = tmp_path_factory.mktemp("image_read")
    cspad = run_simulate(root / "cspad", "kind=xfel", "n_stills=2", "seed=5", "truth.map=False", "detector=multi",
                         "multi.layout=cspad", "multi.panel_size=96,48", "multi.gap_px=6",
                         "multi.modules_per_quadrant=2", "detector_model.pixel_size=0.11",
                         "detector_model.distance=60", "sensor.material=none")
    grid = run_simulate(root / "grid", "n_stills=1", "seed=6", "truth.map=False", "detector=multi",
                        "exposure_time=0.25")
    return {"cspad": cspad, "grid": grid}


def imageset_of(path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_filenames([str(path)])[0].imageset


def dxtbx_panels(imageset, index=0) -> tuple:
    data = imageset.get_raw_data(index)
    return tuple(d.as_numpy_array() for d in (data if isinstance(data, tuple) else (data,)))


def assert_identical(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def warnings_logged():
    """Messages of the diffuse.image_read logger (the diffuse loggers do not propagate once a program ran)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    image_read.logger.addHandler(handler)
    yield messages
    image_read.logger.removeHandler(handler)


@pytest.fixture
def fast_path_only(monkeypatch):
    """Fail if dxtbx's reader or cbflib's decoder is asked for the pixels; count numba decodes."""
    calls = []

    def refuse(*args, **kwargs):
        raise AssertionError("dxtbx read the image: the fast path was not taken")

    monkeypatch.setattr(atomic_io, "read_raw_data", refuse)
    decode = image_read._unpack_nb

    def counted(*args):
        calls.append(args[2])
        return decode(*args)

    monkeypatch.setattr(image_read, "_unpack_nb", counted)
    monkeypatch.setattr(image_read, "_last", [None, None])
    return calls


def fresh_dxtbx_read(path) -> tuple:
    return dxtbx_panels(imageset_of(path))


# ---------------------------------------------------------------- simulated multi-panel CBF


@needs_numba
@pytest.mark.parametrize("layout", ["cspad", "grid"])
def test_simulated_multipanel_cbf_identical_to_dxtbx(simulated, fast_path_only, layout):
    for path in simulated[layout]:
        theirs = fresh_dxtbx_read(path)
        ours = image_read.raw_panels(imageset_of(path), 0)
        assert_identical(ours, theirs)
        assert all(not a.flags.writeable for a in ours)
    n_panels = len(fresh_dxtbx_read(simulated[layout][0]))
    assert len(fast_path_only) == n_panels * len(simulated[layout])  # every array by the numba decoder


def test_without_numba_cbflib_decodes_the_same(simulated, monkeypatch):
    monkeypatch.setattr(image_read, "_last", [None, None])
    monkeypatch.setattr(image_read, "HAVE_NUMBA", False)
    path = simulated["cspad"][0]
    assert_identical(image_read.read_multitile_cbf(str(path)), fresh_dxtbx_read(path))


def test_raw_counts_is_dxtbx_flat_and_writable(simulated, monkeypatch):
    monkeypatch.setattr(image_read, "_last", [None, None])
    path = simulated["cspad"][1]
    imageset = imageset_of(path)
    want = np.concatenate([a.ravel() for a in fresh_dxtbx_read(path)])
    counts = extraction.raw_counts(imageset, 0)
    np.testing.assert_array_equal(counts, want)
    assert counts.dtype == want.dtype
    counts[:] = -7  # the caller's copy: the cached image is untouched
    np.testing.assert_array_equal(extraction.raw_counts(imageset, 0), want)


def test_exposure_time_of_multipanel_stills_as_dxtbx_gives_it(simulated, monkeypatch):
    grid = imageset_of(simulated["grid"][0])
    assert image_read.still_integration_time(grid, 0) == pytest.approx(0.25, abs=1e-7)
    fast = dials_compat.exposure_time(grid, 0)
    with pytest.raises(ValueError):  # XFEL shots: integration_time 0
        dials_compat.exposure_time(imageset_of(simulated["cspad"][0]), 0)
    monkeypatch.setattr(image_read, "still_integration_time", lambda imageset, index: None)
    assert fast == dials_compat.exposure_time(grid, 0)  # dxtbx's format instance
    with pytest.raises(ValueError):
        dials_compat.exposure_time(imageset_of(simulated["cspad"][0]), 0)


def test_unrecognised_layout_is_read_by_dxtbx_with_the_reason_logged(simulated, tmp_path, monkeypatch,
                                                                    warnings_logged):
    """array_structure rows in another order than array_data: dxtbx pairs them by
    position, so this reader does not guess; dxtbx reads the file."""
    src = simulated["grid"][0]
    buf = src.read_bytes()
    head = buf[:buf.index(b"_array_data.array_id")]
    rows = [b" ARRAY_PANEL_%d 'signed 32-bit integer' packed little_endian" % i for i in (0, 1)]
    assert all(head.count(r) == 1 for r in rows)
    swapped = head.replace(rows[0], b"@@").replace(rows[1], rows[0]).replace(b"@@", rows[1])
    path = tmp_path / "swapped.cbf"
    path.write_bytes(swapped + buf[len(head):])
    monkeypatch.setattr(image_read, "_logged", set())
    monkeypatch.setattr(image_read, "_last", [None, None])
    imageset = imageset_of(path)
    read_by_dxtbx = []
    real_read = atomic_io.read_raw_data
    monkeypatch.setattr(atomic_io, "read_raw_data", lambda *a: read_by_dxtbx.append(1) or real_read(*a))
    ours = image_read.raw_panels(imageset, 0)
    assert read_by_dxtbx == [1]
    assert len(warnings_logged) == 1
    assert "swapped.cbf: read by dxtbx" in warnings_logged[0] and "different orders" in warnings_logged[0]
    assert_identical(ours, fresh_dxtbx_read(path))


def test_other_formats_are_read_by_dxtbx(tmp_path, monkeypatch):
    """A single-panel miniCBF: not FormatCBFMultiTileHierarchy, dxtbx as before."""
    paths = run_simulate(tmp_path / "single", "n_stills=1", "seed=2", "truth.map=False", "bragg=False",
                         "detector_model.n_fast=64", "detector_model.n_slow=48")
    imageset = imageset_of(paths[0])
    assert image_read._multitile_path(imageset, 0) is None
    assert_identical(image_read.raw_panels(imageset, 0), dxtbx_panels(imageset))


def test_truncated_file_is_a_sorry_naming_it(simulated, tmp_path, monkeypatch):
    from libtbx.utils import Sorry

    buf = simulated["grid"][0].read_bytes()
    path = tmp_path / "short.cbf"
    path.write_bytes(buf)
    imageset = imageset_of(path)
    path.write_bytes(buf[:len(buf) // 2])  # truncated after dxtbx recognised it
    monkeypatch.setattr(image_read, "_last", [None, None])
    with pytest.raises(Sorry, match="short.cbf: cannot read the pixels"):
        image_read.raw_panels(imageset, 0)


# ---------------------------------------------------------------- the CBF_PACKED decoder against cbflib

COMPRESSIONS = {
    "packed": 0x60, "packed_v2": 0x90, "flat": 0x60 | 0x200, "uncorrelated": 0x60 | 0x100,
    "v2_flat": 0x90 | 0x200, "v2_uncorrelated": 0x90 | 0x100,
}


def awkward_counts(shape, rng) -> np.ndarray:
    """Counts that reach every offset width: zeros, a ramp, Poisson noise, and
    jumps to the int32 extremes."""
    a = (rng.poisson(20, shape) + 3 * np.arange(shape[-1])[None, None, :]).astype(np.int64)
    a[..., :3] = 0
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, 16, replace=False)
    flat[idx[:4]] = 2**31 - 1
    flat[idx[4:8]] = -2**31
    flat[idx[8:12]] = rng.integers(-2**31, 2**31 - 1, 4)
    flat[idx[12:]] = rng.integers(-70000, 70000, 4)
    return a.astype(np.int32)


def write_packed(path, counts: np.ndarray, compression: int) -> None:
    import pycbf

    cbf = pycbf.cbf_handle_struct()
    cbf.new_datablock(b"test")
    cbf.new_category(b"array_data")
    cbf.new_column(b"data")
    slow, mid, fast = counts.shape
    cbf.set_integerarray_wdims_fs(compression, 1, counts.astype("<i4").tobytes(), 4, 1, counts.size,
                                  b"little_endian", fast, mid, slow, 0)
    cbf.write_widefile(str(path).encode(), pycbf.CBF, pycbf.MIME_HEADERS | pycbf.MSG_DIGEST, 0)


@needs_numba
@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
@pytest.mark.parametrize("shape", [(3, 17, 23), (1, 40, 31), (2, 1, 50), (1, 25, 2), (5, 4, 3), (1, 130, 257)])
def test_packed_decoder_equals_cbflib(tmp_path, compression, shape):
    import pycbf

    rng = np.random.default_rng(sum(shape) + len(compression))
    counts = awkward_counts(shape, rng)
    path = tmp_path / "packed.cbf"
    write_packed(path, counts, COMPRESSIONS[compression])
    cbf = pycbf.cbf_handle_struct()
    cbf.read_widefile(str(path).encode(), pycbf.MSG_DIGEST)
    cbf.find_category(b"array_data")
    cbf.find_column(b"data")
    cbf.select_row(0)
    p = cbf.get_integerarrayparameters_wdims_fs()
    assert p[0] == COMPRESSIONS[compression]
    theirs = np.frombuffer(cbf.get_integerarray_as_string(), dtype="=i4")
    np.testing.assert_array_equal(theirs, counts.ravel())  # cbflib round trip
    ours = image_read._decode_packed(image_read._binary_sections(path.read_bytes()), p, str(path))
    assert ours is not None, "the decoder refused a packed section"
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


@needs_numba
def test_corrupt_digest_goes_to_cbflib(tmp_path, warnings_logged, monkeypatch):
    rng = np.random.default_rng(1)
    path = tmp_path / "packed.cbf"
    write_packed(path, awkward_counts((1, 20, 30), rng), COMPRESSIONS["packed"])
    sections = image_read._binary_sections(path.read_bytes())
    fields, data = sections[1]
    sections[1] = ({**fields, "content-md5": "AAAAAAAAAAAAAAAAAAAAAA=="}, data)
    p = [0x60, 1, 4, 1, 0, 600, 0, 0, b"little_endian", 30, 20, 1, 0]
    monkeypatch.setattr(image_read, "_logged", set())
    assert image_read._decode_packed(sections, p, str(path)) is None
    assert any("MD5 mismatch" in m for m in warnings_logged)
    sections[1] = (fields, data)
    assert image_read._decode_packed(sections, p, str(path)) is not None


# ---------------------------------------------------------------- real images


@pytest.mark.real_data
@needs_numba
def test_cspad_shots_identical_to_dxtbx(real_images, fast_path_only):
    paths = real_images("thermolysin_cspad_stills")
    assert len(paths) == 2
    for path in paths:
        imageset = imageset_of(path)
        theirs = fresh_dxtbx_read(path)
        assert len(theirs) == 64
        assert_identical(image_read.raw_panels(imageset, 0), theirs)
        assert image_read.still_integration_time(imageset, 0) == 0.0
    assert len(fast_path_only) == 2 * 4  # four quadrant arrays per file, all by the numba decoder


@pytest.mark.real_data
def test_thaumatin_pilatus_still_identical_to_dxtbx(real_images):
    path = real_images("thaumatin_grid_stills", 1)[0]
    imageset = imageset_of(path)
    ours = image_read.raw_panels(imageset, 0)
    assert len(ours) == 1 and ours[0].shape == (2527, 2463)
    assert_identical(ours, fresh_dxtbx_read(path))
    np.testing.assert_array_equal(extraction.raw_counts(imageset, 0), ours[0].ravel())
