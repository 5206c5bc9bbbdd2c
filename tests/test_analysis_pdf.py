"""diffuse.pdf: 3D-ΔPDF and Patterson by FFT against maps with an analytic transform."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from libtbx.utils import Sorry

from diffuse_cli.analysis import pdf
from diffuse_cli.grid import HKLGrid

CELL = (30.0, 40.0, 50.0, 90.0, 100.0, 90.0)
NDIV = 3
GRID = HKLGrid(NDIV, (10, 12, 14))


def _frac_axes(grid):
    """The documented real-space grid, written out here: x_j = (j − (N−1)/2) ndiv/N."""
    return [(np.arange(n) - (n - 1) // 2) * nd / n for n, nd in zip(grid.shape, grid.ndiv)]


def _cosine_map(pairs):
    """I(h) = Σ 2A cos(2π h·x0): a pair correlation of strength A at ±x0 (e² when I is in e.u./cell)."""
    H, K, L = np.meshgrid(*GRID.axes(), indexing="ij")
    I = np.zeros(GRID.shape)
    for A, x0 in pairs:
        I += 2.0 * A * np.cos(2 * np.pi * (H * x0[0] + K * x0[1] + L * x0[2]))
    return I


def _ball_integral(P, axes, x0, radius_voxels):
    from cctbx import uctbx

    steps = [a[1] - a[0] for a in axes]
    dv = uctbx.unit_cell(CELL).volume() * np.prod(steps)
    d2 = sum((((a - c) / st) ** 2).reshape([-1 if i == j else 1 for j in range(3)])
             for i, (a, c, st) in enumerate(zip(axes, x0, steps)))
    return float(P[d2 <= radius_voxels ** 2].sum() * dv)


@pytest.mark.parametrize("A", [1.5, -2.0])
def test_pair_correlation_peak_at_right_vector_and_sign(A):
    x0 = np.array([0.5, -0.3, 0.25])
    res = pdf.pdf_map(_cosine_map([(A, x0)]), *GRID.axes(), CELL, taper_start=0.5)
    axes = _frac_axes(GRID)
    for got, want in zip((res["x"], res["y"], res["z"]), axes):
        np.testing.assert_allclose(got, want, atol=1e-12)
    feats = pdf.strongest_features(res["P"], res["x"], res["y"], res["z"], CELL, n_features=3)
    top = feats[0]
    steps = np.array([a[1] - a[0] for a in axes])
    assert np.all(np.abs(np.array(top["frac"]) - x0) <= steps), (top, x0)     # within one voxel
    assert top["sign"] == ("positive" if A > 0 else "negative")
    # the peak is also at −x0 with the same sign (P is centrosymmetric)
    i = [int(np.argmin(np.abs(a - c))) for a, c in zip(axes, -x0)]
    assert np.sign(res["P"][tuple(i)]) == np.sign(A)
    # Σ_x P ΔV_real over the whole grid = w(0) I(h=0) = 2A (the scale against a continuous
    # transform is checked on a Gaussian below)
    assert _ball_integral(res["P"], axes, (0, 0, 0), 1e9) == pytest.approx(2 * A, rel=1e-6)


def test_two_correlations_of_opposite_sign():
    pairs = [(1.0, np.array([0.6, 0.0, 0.0])), (-1.0, np.array([0.0, 0.4, 0.3]))]
    res = pdf.pdf_map(_cosine_map(pairs), *GRID.axes(), CELL)
    feats = pdf.strongest_features(res["P"], res["x"], res["y"], res["z"], CELL, n_features=2)
    steps = np.array([a[1] - a[0] for a in _frac_axes(GRID)])
    for A, x0 in pairs:
        match = [f for f in feats if np.all(np.abs(np.array(f["frac"]) - x0) <= steps)]
        assert len(match) == 1 and np.sign(match[0]["value"]) == np.sign(A), (feats, x0)


def test_patterson_of_gaussian_map_is_the_analytic_gaussian():
    """I(q) = exp(−2π² b² q²) ↔ P(u) = (2π b²)^(−3/2) exp(−u²/2b²) (e²/Å³ for I in e.u./cell)."""
    from cctbx import uctbx

    from diffuse_cli.analysis.isotropic import s_map

    b = 5.0
    s = s_map(*GRID.axes(), CELL)
    res = pdf.pdf_map(np.exp(-2 * np.pi ** 2 * b ** 2 * s ** 2), *GRID.axes(), CELL, taper_start=0.5)
    O = np.array(uctbx.unit_cell(CELL).orthogonalization_matrix()).reshape(3, 3)
    X, Y, Z = np.meshgrid(*_frac_axes(GRID), indexing="ij")
    u = np.stack([X, Y, Z], axis=-1) @ O.T
    truth = (2 * np.pi * b ** 2) ** -1.5 * np.exp(-np.sum(u * u, axis=-1) / (2 * b ** 2))
    near = np.linalg.norm(u, axis=-1) < 2 * b
    np.testing.assert_allclose(res["P"][near], truth[near], rtol=0.01, atol=1e-3 * truth.max())


def test_taper_formula():
    s = np.array([0.0, 0.1, 0.15, 0.2, 0.25])
    w = pdf.taper(s, 0.2, 0.5)
    np.testing.assert_allclose(w, [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-12)


# ---------------------------------------------------------------- the program


@pytest.fixture(scope="module")
def merged_npz(tmp_path_factory):
    """A merged map in electron units: smooth isotropic part + a pair correlation A = 0.8 at x0, noise."""
    from diffuse_cli.analysis.isotropic import s_map
    from diffuse_cli.formats.merged import write_merged

    grid = HKLGrid(NDIV, (6, 8, 10))
    s = s_map(*grid.axes(), CELL)
    H, K, L = np.meshgrid(*grid.axes(), indexing="ij")
    rng = np.random.default_rng(5)
    I = 60 * np.exp(-20 * s ** 2) + 3 + 1.6 * np.cos(2 * np.pi * (0.5 * H - 0.3 * K + 0.25 * L))
    sigma = np.full(I.shape, 0.2)
    I = I + sigma * rng.standard_normal(I.shape)
    I[s > 0.19] = np.nan
    path = tmp_path_factory.mktemp("pdf") / "merged.npz"
    write_merged(path, grid, I, sigma, np.isfinite(I).astype(int), CELL, "P 1",
                 units="electron units per unit cell (incoherent subtracted)", laue_group="P -1")
    return path


def _check_outputs(out):
    import gemmi

    rows = list(csv.DictReader(open(out / "features.csv")))
    top = rows[0]
    x = np.array([float(top[c]) for c in ("x_frac", "y_frac", "z_frac")])
    assert np.all(np.abs(x - [0.5, -0.3, 0.25]) < 0.1) and top["sign"] == "positive", top
    assert "value_e^2/A^3" in rows[0]
    m = gemmi.read_ccp4_map(str(out / "delta_pdf.ccp4"))
    m.setup(0.0)
    assert m.grid.unit_cell.a == pytest.approx(NDIV * CELL[0]) and m.grid.unit_cell.beta == pytest.approx(100)
    summary = json.loads((out / "pdf.json").read_text())
    assert summary["units"] == "e^2/A^3"
    for name in ("patterson.ccp4", "delta_pdf_xy0.png", "patterson_0yz.png", "features.json", "pdf.npz"):
        assert (out / name).stat().st_size > 0, name


def test_program_from_anisotropic_and_from_merged(merged_npz, tmp_path):
    from diffuse_cli.command_line.anisotropic import run as run_aniso
    from diffuse_cli.command_line.pdf import run as run_pdf
    from diffuse_cli.formats.analysis_maps import read_pdf

    run_aniso([str(merged_npz), f"output.directory={tmp_path / 'a'}"])
    run_pdf([str(tmp_path / "a" / "anisotropic.npz"), f"output.directory={tmp_path / 'p'}"])
    _check_outputs(tmp_path / "p")
    run_pdf([str(merged_npz), f"output.directory={tmp_path / 'q'}", "patterson=False"])
    a, b = read_pdf(tmp_path / "p" / "pdf.npz"), read_pdf(tmp_path / "q" / "pdf.npz")
    np.testing.assert_allclose(a["delta_pdf"], b["delta_pdf"], rtol=1e-5, atol=1e-6 * np.abs(a["delta_pdf"]).max())


def test_program_bad_inputs(tmp_path, merged_npz):
    from diffuse_cli.command_line.pdf import run

    bad = tmp_path / "pdfout.npz"
    np.savez(bad, schema=np.array("diffuse.pdf/1"), delta_pdf=np.zeros(3))
    with pytest.raises(Sorry) as e:
        run([str(bad), f"output.directory={tmp_path / 'o'}"])
    msg = str(e.value)
    assert "pdfout.npz" in msg and "diffuse.anisotropic/1" in msg and len(msg.splitlines()) == 1
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(Sorry, match="empty.npz"):
        run([str(empty)])
    with pytest.raises(Sorry, match="taper_start"):
        run([str(merged_npz), "taper_start=2"])
