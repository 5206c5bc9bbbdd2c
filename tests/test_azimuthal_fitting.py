"""Profile fits and order parameters against analytic truth (no images)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate

from diffuse_cli import profile_fitting as pf
from diffuse_cli import order_parameter as op
from diffuse_cli import profile_shapes as ps


def p2_average_quad(f):
    """<P2(cos θ)> for an ODF f(θ) by adaptive quadrature (independent of our code)."""
    num = integrate.quad(lambda t: f(t) * 0.5 * (3 * np.cos(t) ** 2 - 1) * np.sin(t), 0, np.pi, limit=200)[0]
    den = integrate.quad(lambda t: f(t) * np.sin(t), 0, np.pi, limit=200)[0]
    return num / den


@pytest.mark.parametrize("m", [-8.0, -1.0, -0.3, -1e-6, 0.0, 1e-6, 0.2, 0.7, 3.0, 10.0, 60.0])
def test_maier_saupe_closed_form_matches_quadrature(m):
    expected = p2_average_quad(lambda t: np.exp(m * (np.cos(t) ** 2 - 1)))
    assert op.maier_saupe_S(m) == pytest.approx(expected, abs=1e-9)


def test_maier_saupe_closed_form_is_the_dawson_formula():
    # the formula of the issue, evaluated directly, away from the series branch
    from scipy.special import dawsn

    for m in (0.6, 2.0, 5.0, 25.0):
        r = np.sqrt(m)
        assert op.maier_saupe_S(m) == pytest.approx(3 / (4 * r * dawsn(r)) - 3 / (4 * m) - 0.5, abs=1e-12)


def test_pseudo_voigt_S_matches_quadrature():
    for fwhm, eta in [(10.0, 0.0), (30.0, 0.5), (60.0, 1.0)]:
        w = np.radians(fwhm)
        expected = p2_average_quad(lambda t: ps.pseudo_voigt_shape(t, w, eta))
        assert op.pseudo_voigt_S(fwhm, eta) == pytest.approx(expected, abs=1e-6)
    # a narrow peak is perfect order, an enormous width is isotropic
    assert op.pseudo_voigt_S(0.5, 0.0) == pytest.approx(1.0, abs=1e-4)
    assert op.pseudo_voigt_S(1e5, 0.0) == pytest.approx(0.0, abs=1e-4)


def _pv_radial_truth():
    return dict(height=50.0, centre=1.85, fwhm=0.12, eta=0.4, b0=20.0, b1=-8.0)


def test_pseudo_voigt_radial_recovered_within_uncertainty():
    truth = _pv_radial_truth()
    x = np.linspace(1.2, 2.5, 260)
    rng = np.random.default_rng(1)
    y0 = ps.pseudo_voigt_linear(x, *truth.values())
    sigma = np.full_like(x, 1.0)
    res = pf.fit_pseudo_voigt(x, y0 + rng.normal(0, 1.0, x.size), sigma)
    assert res.success, res.message
    for name, value in truth.items():
        assert abs(res.params[name] - value) < 4 * res.errors[name], (name, res.params[name], res.errors[name])
    assert 0.8 < res.chi2_reduced < 1.25
    assert res.r_squared > 0.95


def test_pseudo_voigt_uncertainties_are_calibrated():
    """About 68% of repeated fits land within 1σ of the truth (σ from the covariance)."""
    truth = _pv_radial_truth()
    x = np.linspace(1.2, 2.5, 200)
    y0 = ps.pseudo_voigt_linear(x, *truth.values())
    rng = np.random.default_rng(7)
    inside = {k: 0 for k in ("centre", "fwhm", "height")}
    n = 60
    for _ in range(n):
        res = pf.fit_pseudo_voigt(x, y0 + rng.normal(0, 2.0, x.size), np.full_like(x, 2.0))
        assert res.success
        for k in inside:
            inside[k] += abs(res.params[k] - truth[k]) < res.errors[k]
    for k, count in inside.items():
        assert 0.5 < count / n < 0.86, (k, count / n)


@pytest.mark.parametrize("centre", [-170.0, -20.0, 35.0, 89.0])
def test_maier_saupe_fit_recovers_m_and_S(centre):
    m_true = 4.0
    chi = np.arange(-179.0, 180.0, 2.0)
    rng = np.random.default_rng(3)
    y0 = ps.maier_saupe(chi, 100.0, centre, m_true, 10.0)
    noise = 0.05
    res = pf.fit_maier_saupe(chi, y0 + rng.normal(0, noise, chi.size), np.full_like(chi, noise))
    assert res.success, res.message
    assert abs(res.params["m"] - m_true) < 4 * res.errors["m"]
    # centre is reported modulo 180 in [-90, 90)
    assert abs(ps.wrap_degrees(2 * (res.params["centre"] - centre)) / 2) < 4 * res.errors["centre"]
    assert abs(res.S - op.maier_saupe_S(m_true)) < 1e-3
    assert res.S_error < 1e-3
    # no background-free population other than the peak: S_total = S * oriented fraction
    frac = 1 - 2 * 10.0 / (2 * 10.0 + 100 * 2 * np.exp(-m_true) * integrate.quad(lambda u: np.exp(m_true * u * u), 0, 1)[0] * 1)
    assert res.S_total == pytest.approx(res.S * frac, abs=4 * res.S_total_error + 1e-3)
    assert abs(res.S - op.maier_saupe_S(m_true)) < 4 * res.S_error
    assert res.r_squared > 0.999


def test_pseudo_voigt_azimuthal_pair_fit():
    truth = dict(height=40.0, centre=-60.0, fwhm=25.0, eta=0.3, b0=5.0)
    chi = np.arange(-179.5, 180.0, 1.0)
    rng = np.random.default_rng(11)
    y0 = ps.pseudo_voigt_azimuthal(chi, *truth.values(), pair=True)
    res = pf.fit_pseudo_voigt_azimuthal(chi, y0 + rng.normal(0, 0.5, chi.size), np.full_like(chi, 0.5))
    assert res.success, res.message
    for name, value in truth.items():
        assert abs(res.params[name] - value) < 4 * res.errors[name], name
    assert res.S == pytest.approx(op.pseudo_voigt_S(25.0, 0.3), abs=4 * res.S_error + 1e-9)


@pytest.mark.parametrize("start", [-150.0, -45.0, 0.0, 30.0, 120.0])
def test_isotropic_profile_has_S_zero_wherever_centred(start):
    chi = np.arange(-179.0, 180.0, 2.0)
    rng = np.random.default_rng(int(start) + 500)
    y = 100.0 + rng.normal(0, 1.0, chi.size)
    # the director is put at `start`; the free-centre fit too
    free = pf.fit_maier_saupe(chi, y, np.full_like(chi, 1.0))
    # a 1% noise bump is all a free fit can find: |S_total| stays at the 1e-3 level
    assert abs(free.S_total) < 0.005, (free.S_total, free.params)
    res = pf.fit_maier_saupe(chi, y, np.full_like(chi, 1.0), centre=start)
    assert res.success, res.message
    # with no anisotropy in the data the fitted peak is insignificant, said
    # so, and S is reported as 0 without an error
    assert "not significant" in res.message, res.message
    assert res.significant is False and res.S == 0.0 and np.isnan(res.S_error)
    # S_total (whole fitted profile, background isotropic) is 0 within its error
    assert abs(res.S_total) < 0.005, (res.S_total, res.S_total_error)
    # noise-free isotropic data: exactly 0, whatever the centre
    exact = pf.fit_maier_saupe(chi, np.full_like(chi, 100.0), np.full_like(chi, 1.0), centre=start)
    assert exact.success and exact.S_total == pytest.approx(0.0, abs=1e-9)
    # model-free S is exactly 0 for a flat profile, for any centre
    assert op.order_parameter_with_error(chi, np.full_like(chi, 7.0), None, start)[0] == pytest.approx(0.0, abs=1e-12)
    assert abs(op.order_parameter_with_error(chi, y, None, start)[0]) < 0.01


@pytest.mark.parametrize("centre", [-150.0, -45.0, 30.0, 120.0])
def test_weak_anisotropy_S_is_small_wherever_the_director_is(centre):
    """Nearly isotropic (m = 0.3) but well measured: S = 2m/15 + O(m²) whatever χ0 is."""
    chi = np.arange(-179.0, 180.0, 2.0)
    y0 = ps.maier_saupe(chi, 100.0, centre, 0.3, 50.0)
    rng = np.random.default_rng(5)
    res = pf.fit_maier_saupe(chi, y0 + rng.normal(0, 0.02, chi.size), np.full_like(chi, 0.02))
    assert res.success
    assert res.S == pytest.approx(op.maier_saupe_S(0.3), abs=max(4 * res.S_error, 1e-3))
    assert op.maier_saupe_S(0.3) == pytest.approx(0.04, abs=2e-3)


@pytest.mark.parametrize("centre", [-120.0, 0.0, 47.0, 90.0, 179.0])
def test_model_free_S_does_not_depend_on_peak_position(centre):
    m = 5.0
    chi = np.arange(-180.0, 180.0, 0.25) + 0.125
    y = np.exp(m * (np.cos(np.radians(chi - centre)) ** 2 - 1))
    assert op.order_parameter_with_error(chi, y, None, centre)[0] == pytest.approx(op.maier_saupe_S(m), abs=1e-3)


def test_blank_profile_is_a_failure_not_a_success():
    """Zero intensity has no order parameter (0/0): both models fail with "no signal"."""
    chi = np.arange(-179.0, 180.0, 2.0)
    for fit in (pf.fit_maier_saupe, pf.fit_pseudo_voigt_azimuthal):
        res = fit(chi, np.zeros_like(chi), np.full_like(chi, 0.01))
        assert not res.success and "no signal" in res.message
        assert np.isnan(res.S) and np.isnan(res.S_error)


def test_failed_fit_is_reported_not_raised():
    res = pf.fit_pseudo_voigt(np.arange(4.0), np.ones(4))
    assert not res.success and "valid points" in res.message
    res = pf.fit_maier_saupe(np.arange(10.0), np.full(10, np.nan))
    assert not res.success
    row = res.row()
    assert row["success"] is False and np.isnan(row["S"])
