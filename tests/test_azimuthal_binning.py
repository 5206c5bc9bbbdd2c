"""Radial / azimuthal binning on synthetic detectors (dxtbx models, no files)."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli import azimuthal as az
from diffuse_cli import azimuthal_pixels as azp
from diffuse_cli import pyfai_glue
from diffuse_cli import profile_fitting as pf
from diffuse_cli import order_parameter as op
from diffuse_cli import profile_shapes as ps


def make_models(n=300, pixel=0.5, distance=120.0, wavelength=1.0, beam_centre=None, trusted=(-1, 1e6)):
    from dxtbx.model import BeamFactory, DetectorFactory

    beam = BeamFactory.simple(wavelength)
    if beam_centre is None:
        beam_centre = (n * pixel / 2, n * pixel / 2)
    det = DetectorFactory.simple(
        "PAD", distance, beam_centre, "+x", "-y", (pixel, pixel), (n, n), trusted, []
    )
    return det, beam


@pytest.fixture(scope="module")
def models():
    det, beam = make_models()
    return det, beam, azp.DetectorPixels.from_models(det, beam)


def test_units_and_chi_convention(models):
    det, beam, px = models
    # q_inv_angstrom = 2π d*, with d* from the lab geometry of one pixel, by hand
    panel = det[0]
    s, f = 17, 250
    lab = np.array(panel.get_pixel_lab_coord((f + 0.5, s + 0.5)))
    s1 = lab / np.linalg.norm(lab) / beam.get_wavelength()
    d_star = np.linalg.norm(s1 - np.array(beam.get_s0()))
    i = s * panel.get_image_size()[0] + f
    assert px.q[i] == pytest.approx(2 * np.pi * d_star, rel=1e-12)
    # χ = atan2(y, x): this pixel is at lab +x, +y (fast = +x, slow = -y, row 17 is the top)
    assert px.chi[i] == pytest.approx(np.degrees(np.arctan2(lab[1], lab[0])), abs=1e-9)
    assert lab[0] > 0 and lab[1] > 0 and 0 < px.chi[i] < 90
    # the four quadrants are all present: χ spans the full circle (no folding)
    assert px.chi.min() < -170 and px.chi.max() > 170
    assert az.q_from_d_star(0.5) == pytest.approx(np.pi)
    assert az.d_star_from_q(np.pi) == pytest.approx(0.5)


def test_radial_profile_of_isotropic_function(models):
    det, beam, px = models

    def f(q):
        return 100.0 + 50.0 * np.exp(-((q - 1.2) ** 2) / (2 * 0.15**2))

    image = azp.ImageData.from_array(f(px.q), px)
    b = az.radial_binning(px, n_bins=100)
    prof = b.profile(image)
    ok = prof.n_pixels > 50
    # the mean of f over a narrow bin is f at the centre to second order
    np.testing.assert_allclose(prof.I[ok], f(prof.x[ok]), rtol=2e-3)
    assert prof.n_pixels.sum() == px.n_pixels


def test_masked_and_untrusted_pixels_are_left_out_not_zero(models):
    det, beam, px = models
    values = np.full(px.n_pixels, 10.0)
    # a mask ring: everything between q = 1.0 and 1.1 is masked
    mask = ~((px.q > 1.0) & (px.q < 1.1))
    values[~mask] = 0.0  # masked pixels would drag bins down if counted
    values[::97] = -5.0  # below the trusted range (-1, 1e6): per-image bad pixels
    image = azp.ImageData.from_array(values, px)
    b = az.radial_binning(px, mask=mask, n_bins=200)
    prof = b.profile(image)
    inside = (prof.edges[:-1] > 1.0) & (prof.edges[1:] < 1.1)
    assert inside.sum() >= 3
    assert np.all(prof.n_pixels[inside] == 0) and np.all(np.isnan(prof.I[inside]))
    used = prof.n_pixels > 0
    np.testing.assert_allclose(prof.I[used], 10.0, rtol=0, atol=1e-12)
    # pixel counts exclude both the mask and the untrusted pixels
    good = mask & (values > -1)
    assert prof.n_pixels.sum() == good.sum()


def test_binning_reused_across_images_matches_fresh(models):
    det, beam, px = models
    rng = np.random.default_rng(0)
    b = az.radial_binning(px, n_bins=50)
    for k in range(3):
        values = rng.poisson(20, px.n_pixels).astype(np.int32)
        values[rng.integers(0, px.n_pixels, 100 * (k + 1))] = -2  # different bad pixels each time
        image = azp.ImageData.from_array(values, px)
        p1 = b.profile(image)
        p2 = az.radial_binning(px, n_bins=50).profile(image)
        np.testing.assert_array_equal(p1.n_pixels, p2.n_pixels)
        np.testing.assert_allclose(p1.I, p2.I)
        # direct (slow) reference for one bin
        j = 20
        sel = (b.bin_of_pixels() == j) & (values > -1)
        assert p1.I[j] == pytest.approx(values[sel].mean())
        assert p1.sigma[j] == pytest.approx(np.sqrt(values[sel].sum()) / sel.sum())


def test_spread_error_model(models):
    det, beam, px = models
    rng = np.random.default_rng(2)
    values = rng.normal(50, 3, px.n_pixels)
    image = azp.ImageData.from_array(values, px)
    b = az.radial_binning(px, n_bins=20)
    I, sigma, n = b.integrate(image, "spread")
    j = 10
    sel = b.bin_of_pixels() == j
    assert sigma[j] == pytest.approx(values[sel].std(ddof=1) / np.sqrt(sel.sum()), rel=1e-9)


def test_sectors_wrap_across_180(models):
    det, beam, px = models
    b = az.radial_binning(px, n_bins=10, sectors=[(180.0, 40.0)])
    used = b.bin_of_pixels() < b.n_bins
    assert b.pixels is not None  # a 40° sector is stored compressed
    assert np.all(np.abs(az.wrap_degrees(px.chi[used] - 180.0)) <= 20.0)
    assert (px.chi[used] > 170).any() and (px.chi[used] < -170).any()
    # two sectors are a union
    b2 = az.radial_binning(px, n_bins=10, sectors=[(0.0, 20.0), (90.0, 20.0)])
    used2 = b2.bin_of_pixels() < b2.n_bins
    assert used2.sum() == (az.in_sector(px.chi, 0, 20) | az.in_sector(px.chi, 90, 20)).sum()


@pytest.mark.parametrize("chi0", [-135.0, -20.0, 65.0, 170.0])
def test_anisotropic_ring_peak_at_simulated_angle(models, chi0):
    """A ring at q0 whose intensity follows exp(m cos²(χ − χ0)): the azimuthal
    profile's fitted centre is χ0 (mod 180, DIALS frame), S matches m."""
    det, beam, px = models
    q0, m = 1.3, 3.0
    ring = np.exp(-((px.q - q0) ** 2) / (2 * 0.3**2))  # broad: nearly flat within the band
    values = 5.0 + 200.0 * ring * np.exp(m * (np.cos(np.radians(px.chi - chi0)) ** 2 - 1))
    image = azp.ImageData.from_array(values, px)
    b = az.azimuthal_binning(px, q0, 0.02, n_bins=90)
    prof = b.profile(image, "spread")
    assert np.all(prof.n_pixels > 0)
    res = pf.fit_maier_saupe(prof.x, prof.I, prof.sigma)
    assert res.success, res.message
    assert abs(ps.wrap_degrees(2 * (res.params["centre"] - chi0)) / 2) < 0.5
    # the ring is not a delta in q, but every pixel has the same angular factor
    assert res.params["m"] == pytest.approx(m, rel=0.02)
    assert res.S == pytest.approx(op.maier_saupe_S(m), abs=5e-3)


def test_cake_and_qmap_and_centrosymmetric_fill(models):
    det, beam, px = models
    values = 1.0 + px.q
    mask = px.chi < 60  # mask a wedge 60..180
    image = azp.ImageData.from_array(values, px)
    cake = az.cake_binning(px, mask=mask, n_q=50, n_chi=36)
    m, n = cake.map2d(image)
    assert m.shape == (50, 36)
    chi_c = 0.5 * (cake.meta["chi_edges"][1:] + cake.meta["chi_edges"][:-1])
    assert np.all(np.isnan(m[:, chi_c > 65]))
    filled = az.fill_centrosymmetric(m, "cake")
    # the wedge 65..175 is filled from -115..-5, which is measured
    rows = np.isfinite(m[:, (chi_c > -115) & (chi_c < -5)]).all(axis=1)
    assert np.isfinite(filled[rows][:, (chi_c > 65) & (chi_c < 175)]).all()
    qm = az.qmap_binning(px, mask=mask, n=64)
    mq, _ = qm.map2d(image)
    fq = az.fill_centrosymmetric(mq, "qmap")
    assert np.isfinite(fq).sum() > np.isfinite(mq).sum()
    # fill copies the partner at (-qx, -qy): same |q|, so about the same value
    new = np.isfinite(fq) & ~np.isfinite(mq)
    np.testing.assert_allclose(fq[new], mq[::-1, ::-1][new])


def test_profile_csv_columns_and_sasview(tmp_path, models):
    det, beam, px = models
    image = azp.ImageData.from_array(np.full(px.n_pixels, 3.0), px)
    prof = az.radial_binning(px, n_bins=30).profile(image)
    prof.write_csv(tmp_path / "p.csv")
    import csv

    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["q_inv_angstrom", "d_star", "d", "I", "sigma", "n_pixels"]
    r = rows[5]
    assert float(r["q_inv_angstrom"]) == pytest.approx(2 * np.pi * float(r["d_star"]), rel=1e-7)
    assert float(r["d"]) == pytest.approx(1 / float(r["d_star"]), rel=1e-7)
    prof.write_sasview(tmp_path / "p.dat")
    data = np.loadtxt(tmp_path / "p.dat")
    assert data.shape[1] == 3
    np.testing.assert_allclose(data[:, 0], prof.x[prof.n_pixels > 0], rtol=1e-7)
    ap = az.azimuthal_binning(px, 1.0, 0.1, n_bins=12).profile(image)
    ap.write_csv(tmp_path / "a.csv")
    assert open(tmp_path / "a.csv").readline().strip() == "chi_deg,I,sigma,n_pixels"


def test_merged_map_radial_profile():
    # cubic cell: |q| = 2π |hkl| / a
    a = 20.0
    h = np.arange(-10, 11) / 2.0
    H, K, L = np.meshgrid(h, h, h, indexing="ij")
    q = 2 * np.pi * np.sqrt(H**2 + K**2 + L**2) / a
    I = 3.0 + 2.0 * q
    counts = np.ones_like(I, dtype=np.int64)
    counts[0] = 0
    I[0] = np.nan  # unobserved voxels must not count
    merged = dict(I=I, sigma=np.full_like(I, 0.5), counts=counts, h=h, k=h, l=h, unit_cell=(a, a, a, 90, 90, 90))
    prof = az.merged_radial_profile(merged, n_bins=40)
    ok = prof.n_pixels > 0
    # mean of a linear function over a shell is the function of the voxels' mean q
    qs = q[counts > 0]
    idx = np.clip(np.floor((qs - prof.edges[0]) / (prof.edges[1] - prof.edges[0])).astype(int), 0, 39)
    expected = np.array([np.mean(3 + 2 * qs[idx == j]) for j in np.flatnonzero(ok)])
    np.testing.assert_allclose(prof.I[ok], expected, rtol=1e-12)
    assert prof.n_pixels.sum() == (counts > 0).sum()
    np.testing.assert_allclose(prof.sigma[ok], 0.5 / np.sqrt(prof.n_pixels[ok]))


def test_compressed_sector_binning_with_bad_pixels(models):
    det, beam, px = models
    rng = np.random.default_rng(4)
    b = az.radial_binning(px, n_bins=40, sectors=[(-170.0, 30.0)])
    assert b.pixels is not None
    for k in range(2):
        values = rng.poisson(30, px.n_pixels).astype(np.int32)
        values[rng.integers(0, px.n_pixels, 5000)] = -3  # untrusted, some inside the sector
        image = azp.ImageData.from_array(values, px)
        I, sigma, n = b.integrate(image)
        sector = az.in_sector(px.chi, -170.0, 30.0) & (values > -1)
        edges = b.edges
        for j in (5, 20, 33):
            sel = sector & (px.q >= edges[j]) & (px.q < edges[j + 1])
            assert n[j] == sel.sum()
            assert I[j] == pytest.approx(values[sel].mean(), rel=1e-12)


def test_non_finite_and_overloaded_pixels_are_left_out(models):
    det, beam, px = models
    values = np.full(px.n_pixels, 4.0)
    values[::50] = np.nan
    values[7::50] = np.inf
    values[9::50] = 2e6  # above the trusted range (-1, 1e6): overloaded
    image = azp.ImageData.from_array(values, px)
    for binning in (az.radial_binning(px, n_bins=30), az.radial_binning(px, n_bins=30, sectors=[(45.0, 20.0)])):
        I, sigma, n = binning.integrate(image)
        ok = n > 0
        np.testing.assert_allclose(I[ok], 4.0, rtol=1e-12)
        assert np.all(np.isfinite(sigma[ok]))
    full = az.radial_binning(px, n_bins=30)
    assert full.integrate(image)[2].sum() == np.isfinite(values).sum() - values[9::50].size


@pytest.mark.parametrize("tilt", [(10.0, 0.0, 0.0), (0.0, -15.0, 5.0), (7.0, 12.0, -30.0)])
def test_pyfai_conversion_of_tilted_panel(tilt):
    """rot1-3 solved from the panel axes: pyFAI's |q| equals ours pixel by pixel."""
    pytest.importorskip("pyFAI")
    from dxtbx.model import BeamFactory, Detector
    from scitbx import matrix

    beam = BeamFactory.simple(1.2)
    det = Detector()
    panel = det.add_panel()
    R = matrix.sqr((1, 0, 0, 0, 1, 0, 0, 0, 1))
    for axis, angle in zip(((1, 0, 0), (0, 1, 0), (0, 0, 1)), tilt):
        R = matrix.col(axis).axis_and_angle_as_r3_rotation_matrix(angle, deg=True) * R
    fast = R * matrix.col((1, 0, 0))
    slow = R * matrix.col((0, -1, 0))
    centre = matrix.col((3.0, -2.0, -150.0))
    origin = centre - 30.0 * fast - 25.0 * slow  # 60 x 50 mm panel
    panel.set_frame(fast.elems, slow.elems, origin.elems)
    panel.set_pixel_size((0.25, 0.25))
    panel.set_image_size((240, 200))
    panel.set_trusted_range((-1, 1e6))
    params = pyfai_glue.pyfai_geometry(panel, beam)
    assert any(abs(params[k]) > 1e-3 for k in ("rot1", "rot2", "rot3"))
    ai = pyfai_glue.pyfai_integrator(panel, beam)
    px = azp.DetectorPixels.from_models(det, beam)
    q_pyfai = ai.qArray().ravel() / 10.0
    # relative agreement fails only near the beam (q -> 0): absolute 1e-6 Å⁻¹
    np.testing.assert_allclose(q_pyfai, px.q, rtol=1e-6, atol=1e-6)
