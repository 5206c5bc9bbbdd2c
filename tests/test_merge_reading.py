"""What diffuse.merge reads per still and per detector, made cheaper without changing a bit:
the one-pass corrected intensity, and the per-detector q arrays made at their first use."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli import corrections as C


def _numpy_formula(counts, multiplier, t, gain=1.0, background=0.0, background_variance=0.0):
    """docs/corrections.md: I = (C − B)·total/(gain·t), σ = sqrt(gain·max(C, 0) + V)·total/(gain·t)."""
    counts = np.asarray(counts, dtype=np.float64)
    scale = np.asarray(multiplier, dtype=np.float64) * (1.0 / (float(t) * float(gain)))
    return (counts - background) * scale, np.sqrt(gain * np.maximum(counts, 0.0) + background_variance) * scale


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.float32, np.float64])
def test_corrected_intensity_bit_identical_to_the_formula(dtype):
    rng = np.random.default_rng(1)
    n = 20_001
    counts = rng.poisson(3, n) - (0 if dtype == np.uint8 else 1)
    counts = counts.astype(dtype)
    total = rng.random(n) + 0.5
    for background, variance in ((0.0, 0.0), (1.5, 0.3), (rng.random(n), 0.1 * rng.random(n))):
        for gain in (1.0, 2.3):
            got = C.corrected_intensity(counts, total, 0.019, gain=gain, background=background,
                                        background_variance=variance)
            want = _numpy_formula(counts, total, 0.019, gain, background, variance)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    # shapes the one-pass kernel does not take go through numpy, with the same result
    got = C.corrected_intensity(counts[:6].reshape(2, 3), total[:6].reshape(2, 3), 0.5)
    np.testing.assert_array_equal(got[0], _numpy_formula(counts[:6].reshape(2, 3), total[:6].reshape(2, 3), 0.5)[0])


@pytest.mark.parametrize("beam", [(0.0, 0.0, -1.0), (0.01, -0.002, -0.99994998749)])
def test_detector_arrays_made_at_first_use_equal_the_factors(tmp_path, beam):
    from diffuse_cli import program
    from diffuse_cli.formats.factors import FACTORS_SCHEMA

    rng = np.random.default_rng(2)
    n = 300_000  # more than one block of the q computation
    s1 = rng.normal(size=(n, 3))
    s1 = (s1 / np.linalg.norm(s1, axis=1)[:, None]).astype(np.float32)
    beam = np.asarray(beam)  # exact in float32 (the float32 difference), or not (float64 blocks)
    fields = dict(schema=np.array(FACTORS_SCHEMA), geometry_key=np.array("k"),
                  panel_shapes=np.array([[500, 600]], dtype=np.int32), s1_unit=s1, beam_direction=beam,
                  s0=beam / 1.2, wavelength=np.float64(1.2), total=rng.random(n) + 1.0,
                  solid_angle=rng.random(n).astype(np.float32), polarization=rng.random(n).astype(np.float32),
                  air_path_mm=rng.random(n).astype(np.float32), sensor_path_mm=rng.random(n).astype(np.float32),
                  air_mu_per_mm=np.float64(3e-4), sensor_mu_per_mm=np.array([3.8]), kapton_mu_per_mm=np.float64(0.0))
    path = tmp_path / "factors_k.npz"
    program.write_npz(path, **fields)
    a = C._detector_arrays(str(path))
    assert "q_unit" not in dict.keys(a) and "d_unit" not in dict.keys(a)  # not made yet
    np.testing.assert_array_equal(a["total"], fields["total"])
    q = s1.astype(np.float64) - beam
    np.testing.assert_array_equal(a["q_unit"], q.astype(np.float32))
    assert "d_unit" not in dict.keys(a)  # each alone (diffuse.merge needs q_unit only)
    np.testing.assert_array_equal(a["d_unit"], np.sqrt((q * q).sum(axis=1)).astype(np.float32))
    np.testing.assert_array_equal(a["direction"], fields["solid_angle"] * fields["polarization"])
    assert sorted(a["paths"]) == ["air_path_mm", "sensor_path_mm"]
    np.testing.assert_array_equal(a["paths"]["sensor_path_mm"], fields["sensor_path_mm"])
    assert a["reference"]["air_mu_per_mm"] == 3e-4
    with pytest.raises(KeyError):
        a["no_such_array"]
