"""Radial profiles of real stills against pyFAI (independent integrator)."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse_cli import azimuthal as az
from diffuse_cli import azimuthal_pixels as azp
from diffuse_cli import pyfai_glue

pytestmark = pytest.mark.real_data

pyFAI = pytest.importorskip("pyFAI")


def _experiment(path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_filenames([str(path)])[0]


@pytest.fixture(scope="module")
def thaumatin(real_images):
    path = real_images("thaumatin_grid_stills", 1)[0]
    expt = _experiment(path)
    # pyFAI does not model parallax: compare with the parallax-free geometry
    det = pyfai_glue.without_parallax(expt.detector)
    pixels = azp.DetectorPixels.from_models(det, expt.beam)
    raw = expt.imageset.get_raw_data(0)
    return expt, det, pixels, raw


def test_pyfai_conversion_of_untilted_panel(thaumatin):
    expt, det, pixels, raw = thaumatin
    p = pyfai_glue.pyfai_geometry(det[0], expt.beam)
    assert p["rot1"] == p["rot2"] == p["rot3"] == 0.0
    assert p["dist"] == pytest.approx(det[0].get_distance() * 1e-3)
    fast0, slow0 = det[0].get_normal_origin()
    assert (p["poni1"], p["poni2"]) == pytest.approx((slow0 * 1e-3, fast0 * 1e-3))
    ai = pyfai_glue.pyfai_integrator(det[0], expt.beam)
    q_pyfai = ai.qArray().ravel() / 10.0  # nm⁻¹ -> Å⁻¹, both 4π sinθ/λ
    rel = np.abs(q_pyfai / pixels.q - 1)
    assert np.median(rel) < 1e-7 and np.percentile(rel, 99.9) < 2e-6
    # pyFAI's cython q array is single precision near the beam: absolute check
    assert np.max(np.abs(q_pyfai - pixels.q)) < 2e-6
    # pyFAI's chi is our χ mirrored (dxtbx's fast/slow/normal frame is left-handed)
    chi_pyfai = np.degrees(ai.chiArray().ravel())
    sel = slice(0, None, 9973)
    np.testing.assert_allclose(az.wrap_degrees(chi_pyfai[sel] + pixels.chi[sel]), 0.0, atol=1e-4)


def test_radial_profile_matches_pyfai_integrate1d(thaumatin):
    expt, det, pixels, raw = thaumatin
    image = azp.ImageData(raw, pixels)
    binning = az.radial_binning(pixels, n_bins=500)
    prof = binning.profile(image)
    data = azp.flatten_panels(raw).reshape(pixels.panel_shapes[0])
    lo, hi = det[0].get_trusted_range()
    pyfai_mask = ~((data > lo) & (data < hi))  # pyFAI: nonzero = masked
    ai = pyfai_glue.pyfai_integrator(det[0], expt.beam)
    res = ai.integrate1d(
        data.astype(np.float32),
        500,
        unit="q_A^-1",
        radial_range=(binning.edges[0], binning.edges[-1]),
        method=("no", "histogram", "cython"),
        mask=pyfai_mask,
        correctSolidAngle=False,
        polarization_factor=None,
    )
    np.testing.assert_allclose(res.radial, prof.x, rtol=1e-6)
    ok = (prof.n_pixels > 20) & (res.intensity > 0)
    assert ok.sum() > 450
    rel = np.abs(prof.I[ok] / res.intensity[ok] - 1)
    assert np.median(rel) < 0.005, np.median(rel)
    # masked pixels (Pilatus module gaps) are not in any bin
    assert prof.n_pixels.sum() == int((~pyfai_mask).sum())


@pytest.fixture(scope="module")
def cspad(real_images):
    path = real_images("thermolysin_cspad_stills", 1)[0]
    expt = _experiment(path)
    det = pyfai_glue.without_parallax(expt.detector)
    return expt, det, azp.DetectorPixels.from_models(det, expt.beam), expt.imageset.get_raw_data(0)


def test_multipanel_profile_is_continuous_across_panel_gaps(cspad):
    expt, det, pixels, raw = cspad
    assert len(det) == 64
    image = azp.ImageData(raw, pixels)
    binning = az.radial_binning(pixels, n_bins=200)
    prof = binning.profile(image)
    # every bin holds pixels here; an empty bin would be NaN, never 0
    assert np.all(np.isfinite(prof.I) == (prof.n_pixels > 0))
    ok = prof.n_pixels > 0
    assert ok.sum() > 190
    # the panel gaps show up as dips in the pixel counts (fewer pixels than on
    # both sides, not the rise and fall at the ends of the q range) ...
    n = prof.n_pixels.astype(float)
    k = 8
    left = np.array([n[max(0, i - k) : i].max() if i > 0 else 0 for i in range(n.size)])
    right = np.array([n[i + 1 : i + 1 + k].max() if i < n.size - 1 else 0 for i in range(n.size)])
    dips = ok & (n < 0.9 * np.minimum(left, right))
    assert dips.sum() >= 5, np.flatnonzero(dips)
    # ... but not in the intensity. Signed median of I / (median of neighbours):
    # counting the masked gap pixels as zeros would pull it 10-30 % below 1.
    # (Bragg spots make single bins jump up, hence medians.)
    I = prof.I
    neigh = np.array([np.nanmedian(np.r_[I[max(0, i - 4) : i], I[i + 1 : i + 5]]) for i in range(I.size)])
    ratio = I / neigh
    assert abs(np.median(ratio[dips]) - 1) < 0.02, np.median(ratio[dips])
    assert np.median(np.abs(ratio[ok] - 1)) < 0.03

    # independent check: pyFAI panel by panel (each panel its own geometry, tilts
    # solved by pyfai_geometry), combined as Σ signal / Σ normalisation
    lo, hi = binning.edges[0], binning.edges[-1]
    signal = np.zeros(binning.n_bins)
    norm = np.zeros(binning.n_bins)
    offset = 0
    for i, panel in enumerate(det):
        ai = pyfai_glue.pyfai_integrator(panel, expt.beam)
        d = raw[i].as_numpy_array().astype(np.float32)
        q_pyfai = ai.qArray().ravel() / 10.0
        assert np.max(np.abs(q_pyfai / pixels.q[offset : offset + d.size] - 1)) < 1e-6
        offset += d.size
        tlo, thi = panel.get_trusted_range()
        r = ai.integrate1d(
            d,
            binning.n_bins,
            unit="q_A^-1",
            radial_range=(lo, hi),
            method=("no", "histogram", "cython"),
            mask=~((d > tlo) & (d < thi)),
            correctSolidAngle=False,
            polarization_factor=None,
        )
        signal += r.sum_signal.ravel()
        norm += r.sum_normalization.ravel()
    both = ok & (norm > 0)
    rel = np.abs(prof.I[both] / (signal[both] / norm[both]) - 1)
    assert np.median(rel) < 0.005, np.median(rel)
