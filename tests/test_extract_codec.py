"""The fast extract write path, each against an independent implementation:
zlib-ng's Huffman-only streams read back by zlib itself, the one-pass delta symbols
against numpy, and the one-pass used-pixel selection against numpy."""

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


class _Panel:
    def __init__(self, lo, hi):
        self.range = (lo, hi)

    def get_trusted_range(self):
        return self.range


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_used_counts_equal_numpy(dtype):
    rng = np.random.default_rng(7)
    panels = [rng.integers(-3, 70000, size=(37, 41)).astype(dtype), rng.integers(-3, 70000, size=(20, 50)).astype(dtype)]
    panels[0][0, :5] = [-1, 0, 65535, 65534, 70000]  # at the trusted bounds
    if dtype == np.float64:
        panels[1][3, 3] = np.nan
    detector = [_Panel(-1.0, 65535.0), _Panel(0.0, 1000.0)]
    mask = rng.random(sum(a.size for a in panels)) > 0.2
    used, counts, sample = extraction.used_counts(detector, panels, mask, 72)
    flat = np.concatenate([a.ravel() for a in panels])
    edges = np.cumsum([0] + [a.size for a in panels])
    expected = np.zeros(flat.size, dtype=bool)
    for (lo, hi), a, b in zip([p.range for p in detector], edges[:-1], edges[1:]):
        expected[a:b] = (flat[a:b] > lo) & (flat[a:b] < hi)
    expected &= mask
    assert np.array_equal(used, expected)
    assert counts.dtype == flat.dtype and np.array_equal(counts, flat[expected])
    assert np.array_equal(sample, flat[::72][expected[::72]])
