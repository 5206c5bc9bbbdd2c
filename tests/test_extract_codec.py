"""The fast extract write path, each against an independent implementation:
zlib-ng's Huffman-only streams read back by zlib itself, the one-pass delta
symbols against numpy, and the one-pass used-pixel selection and trusted_mask
(one trusted-range rule, extraction.in_trusted_range) against dxtbx's
Panel.get_trusted_range_mask."""

import zlib

import numpy as np
import pytest

from diffuse_cli import extraction
from diffuse_cli.formats import extract as E


@pytest.mark.parametrize("kind", ["empty", "constant", "uniform", "geometric", "runs"])
def test_zlib_reads_the_fast_stream_back(kind):
    rng = np.random.default_rng(12)
    data = {
        "empty": np.zeros(0, np.uint8),
        "constant": np.full(70000, 200, np.uint8),
        "uniform": rng.integers(0, 256, 300000).astype(np.uint8),
        "geometric": np.minimum(rng.geometric(0.02, 400000), 255).astype(np.uint8),
        "runs": np.repeat(rng.integers(0, 256, 3000).astype(np.uint8), rng.integers(1, 200, 3000)),
    }[kind]
    stream = E._fast_deflate(data)
    assert stream.dtype == np.uint8
    assert zlib.decompress(stream.tobytes()) == data.tobytes()


def test_delta_symbols_equal_numpy():
    rng = np.random.default_rng(5)
    counts = np.concatenate([rng.poisson(30, 100000), rng.integers(0, 2 ** 31 - 1, 50), [0, 2 ** 31 - 1, 0]]).astype(np.int32)
    kernel = E._delta_kernel()
    if kernel is None:
        pytest.skip("numba is not installed: the numpy path is the only one")
    stream = np.empty(counts.size, np.uint8)
    escaped = np.empty(counts.size, np.int64)
    n = kernel(counts, stream, escaped)
    z = E._delta_zigzag(counts)
    expected = np.minimum(z, 255).astype(np.uint8)
    assert np.array_equal(stream, expected)
    assert np.array_equal(escaped[:n], z[expected == 255].astype(np.int64))


@pytest.mark.parametrize("scale", [30, 3000])
def test_pack_counts_round_trip_through_the_fast_path(scale):
    rng = np.random.default_rng(6)
    counts = rng.poisson(np.linspace(5, scale, 200000)).astype(np.int32)
    packed = E.pack_counts(counts)
    assert len(counts) >= E.FAST_DEFLATE_MIN
    back = E.unpack_counts(packed)
    assert back.dtype == np.int32 and np.array_equal(back, counts)


def _panel(shape, lo, hi):
    from dxtbx.model import Panel

    p = Panel()
    p.set_image_size((shape[1], shape[0]))
    p.set_trusted_range((lo, hi))
    return p


def _dxtbx_trusted(panel, a):
    """dxtbx's own trusted-range mask of one panel's values (Panel.get_trusted_range_mask)."""
    from scitbx.array_family import flex

    data = flex.double(a.astype(np.float64).ravel()) if a.dtype.kind == "f" else flex.int(a.astype(np.int32).ravel())
    data.reshape(flex.grid(*a.shape))
    return np.asarray(panel.get_trusted_range_mask(data), dtype=bool).ravel()


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_used_counts_and_trusted_mask_equal_dxtbx(dtype):
    """The compiled one-pass selection (used_counts) and the numpy trusted_mask, which share
    extraction.in_trusted_range, against dxtbx's Panel.get_trusted_range_mask."""
    rng = np.random.default_rng(7)
    panels = [rng.integers(-3, 70000, size=(37, 41)).astype(dtype), rng.integers(-3, 70000, size=(20, 50)).astype(dtype)]
    panels[0][0, :5] = [-1, 0, 65535, 65534, 70000]  # at the trusted bounds
    panels[1][0, :3] = [0, 1, 1000]
    if dtype == np.float64:
        panels[1][3, 3] = np.nan
        panels[0][1, :2] = [-0.5, 65534.5]
    detector = [_panel(panels[0].shape, -1.0, 65535.0), _panel(panels[1].shape, 0.0, 1000.0)]
    mask = rng.random(sum(a.size for a in panels)) > 0.2
    flat = np.concatenate([a.ravel() for a in panels])
    trusted = np.concatenate([_dxtbx_trusted(p, a) for p, a in zip(detector, panels)])
    assert 0 < trusted.sum() < trusted.size - 7  # the bounds and NaN are outside
    expected = trusted & mask

    used, counts, sample = extraction.used_counts(detector, panels, mask, 72)
    assert np.array_equal(used, expected)
    assert counts.dtype == flat.dtype and np.array_equal(counts, flat[expected])
    assert np.array_equal(sample, flat[::72][expected[::72]])

    class _Offsets:
        panel_offsets = np.cumsum([0] + [a.size for a in panels])

    assert np.array_equal(extraction.trusted_mask(detector, flat, _Offsets()), trusted)


def test_used_counts_sample_follows_the_pixel_index_across_panels():
    """The sampled pixels are every 72nd of the whole image, also when a panel does not start
    on a multiple of 72 (the kernel counts down across panel boundaries)."""
    rng = np.random.default_rng(8)
    shapes = [(7, 11), (13, 5), (3, 29)]
    panels = [rng.integers(0, 100, size=s).astype(np.int32) for s in shapes]
    detector = [_panel(s, -1.0, 1e6) for s in shapes]
    mask = rng.random(sum(a.size for a in panels)) > 0.1
    flat = np.concatenate([a.ravel() for a in panels])
    for stride in (8, 72):
        _, _, sample = extraction.used_counts(detector, panels, mask, stride)
        pixels = np.arange(0, flat.size, stride)
        assert np.array_equal(sample, flat[pixels[mask[pixels]]])
