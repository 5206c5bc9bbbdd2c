"""diffuse.azimuthal_fit on SAXS/WAXS inputs: EDF and HDF5 images with a pyFAI .poni (issue 16).

The patterns are simulated here, from the .poni numbers with plain numpy
(pixel centres, 2θ, χ = atan2(y, x) in the DIALS lab frame, polarization and
solid angle written from their formulas), sharing no code with the pipeline.
Geometry truth where pyFAI is the reference: pyFAI's own qArray, chiArray,
polarization and integrate1d.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from diffuse_cli.command_line import azimuthal_fit

LAMBDA = 1.0  # Å
DIST = 0.15  # m
PIXEL = 172e-6  # m
SHAPE = (256, 256)  # (slow, fast)
PONI1, PONI2 = 128.3 * PIXEL, 120.7 * PIXEL
Q0 = 0.8  # ring, Å⁻¹ (2π/d)
FRACTION = 0.99  # horizontal polarization fraction (the program's default)
T_EXP = 0.5  # s


def write_poni(path, rot=(0.0, 0.0, 0.0), poni=(PONI1, PONI2)):
    path.write_text(
        "# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis\n"
        "poni_version: 2\nDetector: Detector\n"
        f'Detector_config: {{"pixel1": {PIXEL}, "pixel2": {PIXEL}, "max_shape": [{SHAPE[0]}, {SHAPE[1]}]}}\n'
        f"Distance: {DIST}\nPoni1: {poni[0]}\nPoni2: {poni[1]}\n"
        f"Rot1: {rot[0]}\nRot2: {rot[1]}\nRot3: {rot[2]}\nWavelength: {LAMBDA * 1e-10}\n"
    )
    return path


def pixel_geometry():
    """q (2π/d, Å⁻¹), χ (deg, DIALS lab), polarization P, relative solid angle of
    every pixel of the untilted .poni detector (fast → +x, slow → −y, beam −z)."""
    i, j = np.meshgrid(np.arange(SHAPE[0]) + 0.5, np.arange(SHAPE[1]) + 0.5, indexing="ij")
    x = j * PIXEL - PONI2
    y = -(i * PIXEL - PONI1)
    r = np.sqrt(x * x + y * y + DIST * DIST)
    two_theta = np.arccos(DIST / r)
    q = 4 * np.pi / LAMBDA * np.sin(two_theta / 2)
    chi = np.degrees(np.arctan2(y, x))
    P = FRACTION * (1 - (x / r) ** 2) + (1 - FRACTION) * (1 - (y / r) ** 2)
    omega = (DIST / r) ** 3
    return q, chi, P, omega


def maier_saupe_S(m):
    """<P2(cos θ)> of f ∝ exp(m cos²θ), by quadrature."""
    t = np.linspace(0, np.pi, 200001)
    f = np.exp(m * np.cos(t) ** 2) * np.sin(t)
    p2 = 1.5 * np.cos(t) ** 2 - 0.5
    return float(np.trapz(f * p2, t) / np.trapz(f, t))


def pattern(m, chi0, rng, scale=1.0):
    """Counts: a ring at Q0, angular distribution exp(m (cos²(χ − χ0) − 1)) on a
    flat background, recorded with polarization and solid angle, Poisson noise."""
    q, chi, P, omega = pixel_geometry()
    ring = np.exp(-((q - Q0) ** 2) / (2 * 0.06**2))
    angular = np.exp(m * (np.cos(np.radians(chi - chi0)) ** 2 - 1)) if m else 1.0
    intensity = 40.0 + 3000.0 * ring * angular
    return rng.poisson(intensity * P * omega * T_EXP * scale).astype(np.int32)


def write_edf(path, data, header):
    import fabio.edfimage

    fabio.edfimage.EdfImage(data=data, header=header).write(str(path))


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run(args, tmp_path, name="az"):
    out = tmp_path / name
    azimuthal_fit.run([*map(str, args), "maps.n_bins=96", f"output.directory={out}", f"output.log={tmp_path / (name + '.log')}"])
    return out


@pytest.fixture(scope="module")
def edf_series(tmp_path_factory):
    """Three EDF files at 10, 20, 30 mT (header Field), Maier–Saupe m = 1, 3, 6,
    names dxtbx would join into one sequence; an EDF mask (nonzero = masked)."""
    d = tmp_path_factory.mktemp("edf_series")
    rng = np.random.default_rng(16)
    truth = {}
    for k, (field, m, chi0) in enumerate([(10, 1.0, 20.0), (20, 3.0, 20.0), (30, 6.0, 20.0)]):
        path = d / f"ring_{field:03d}mT_{k + 1:04d}.edf"
        write_edf(path, pattern(m, chi0, rng), {"Field": f"{field}", "ExposureTime": f"{T_EXP}"})
        truth[path.name] = (field, m, chi0)
    mask = np.zeros(SHAPE, dtype=np.int8)
    mask[118:140, 110:132] = 1  # beam stop
    mask[:, 200:203] = 1  # a dead column
    write_edf(d / "mask.edf", mask, {})
    write_poni(d / "calib.poni")
    return d, truth, mask


def test_edf_series_recovers_S_and_writes_table_and_plots(edf_series, tmp_path):
    d, truth, mask = edf_series
    cif = tmp_path / "cubic.cif"
    a = np.sqrt(2) * 2 * np.pi / Q0  # d(110) = 2π/Q0
    cif.write_text(f"data_test\n_cell_length_a {a:.6f}\n_cell_length_b {a:.6f}\n_cell_length_c {a:.6f}\n"
                   "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n")
    images = sorted(d.glob("ring_*.edf"))
    out = run([*images, d / "calib.poni", d / "mask.edf", f"q={Q0}", "fit.azimuthal_models=maier_saupe",
               "fit.radial_range=0.55,1.05", "maps.enable=False", "series.header_key=Field", "series.name=field_mT", cif, "hkl=1,1,0"], tmp_path)
    rows = [r for r in read_rows(out / "fits.csv") if r["profile"] == f"azimuthal_q{Q0:.4f}"]
    assert len(rows) == 3
    for r in rows:
        field, m, _ = truth[r["image"]]
        assert float(r["field_mT"]) == field
        assert r["success"] == "true" and r["significant"] == "true"
        assert abs(float(r["S"]) - maier_saupe_S(m)) < 0.01, (r["image"], r["S"], maier_saupe_S(m))
        assert abs(pf_wrap(float(r["centre"]) - 20.0)) < 1.0
        assert r["corrections"].startswith("solid_angle+polarization")
    # hkl=1,1,0 from the CIF: the same band as q=Q0
    hkl = [r for r in read_rows(out / "fits.csv") if r["profile"] == "azimuthal_hkl1_1_0"]
    assert len(hkl) == 3 and all(float(r["q_inv_angstrom"]) == pytest.approx(Q0, rel=1e-6) for r in hkl)
    # the table and the plots against the series variable, file by file
    table = read_rows(out / "series_summary.csv")
    ms = [r for r in table if r["profile"] == f"azimuthal_q{Q0:.4f}"]
    assert [float(r["field_mT"]) for r in ms] == [10.0, 20.0, 30.0]
    assert all(float(r["S_error"]) > 0 and float(r["centre_error"]) > 0 for r in ms)
    assert [r["image"] for r in ms] == [p.name for p in images]
    # radial peak position and width against the field, with errors
    radial = [r for r in table if r["profile"] == "radial"]
    assert len(radial) == 3
    for r in radial:
        assert float(r["centre"]) == pytest.approx(Q0, abs=0.01) and float(r["centre_error"]) > 0
        assert float(r["fwhm_error"]) > 0
    for q in ("S", "centre", "fwhm"):
        assert (out / f"summary_{q}.png").stat().st_size > 1000
    # the mask: masked pixels (nonzero in the EDF) never reach a profile
    prof = read_rows(out / "profiles" / f"{images[0].stem}_radial.csv")
    assert sum(int(r["n_pixels"]) for r in prof) == SHAPE[0] * SHAPE[1] - int(mask.astype(bool).sum())


def pf_wrap(angle):
    """Difference of apolar directors (mod 180°), degrees in [−90, 90)."""
    return (angle + 90.0) % 180.0 - 90.0


def test_qpar_qperp_map_puts_the_director_on_the_field_axis(edf_series, tmp_path):
    """Field along the director (χ0 = 20°): the ring's intensity sits on q⊥ = 0."""
    d, _, _ = edf_series
    c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    image = sorted(d.glob("ring_030*.edf"))[0]
    out = run([image, d / "calib.poni", "corrections.apply=False", f"maps.field_direction={c},{s},0",
               "output.plots=False"], tmp_path)
    from diffuse_cli.formats.azimuthal_maps import read_azimuthal_maps

    for name in ("qmap.png", "cake.png", "maps.npz", "qpar_qperp.png"):
        assert (out / "maps" / f"{image.stem}_{name}").exists()
    z = read_azimuthal_maps(out / "maps" / f"{image.stem}_maps.npz")
    m, e = z["qpar_qperp"], z["qpar_edges"]
    centres = 0.5 * (e[1:] + e[:-1])
    qpar, qperp = np.meshgrid(centres, centres)  # rows q⊥, columns q∥
    band = np.isfinite(m) & (np.abs(np.hypot(qpar, qperp) - Q0) < 0.03)
    along = band & (np.abs(qperp) < 0.1) & (qpar > 0)
    across = band & (np.abs(qpar) < 0.1) & (qperp > 0)
    assert along.sum() > 3 and across.sum() > 3
    # m = 6: exp(−6) contrast between the director and 90° from it
    assert np.mean(m[along]) > 20 * np.mean(m[across])


def test_hdf5_stack_isotropic_and_field_per_frame(tmp_path):
    import h5py

    rng = np.random.default_rng(5)
    path = tmp_path / "sample_0001.h5"
    with h5py.File(path, "w") as h5:
        entry = h5.create_group("entry_0000")
        entry.create_dataset("measurement/data", data=np.stack([pattern(0, 0, rng), pattern(0, 0, rng)]))
        entry.create_dataset("instrument/magnet/field_mT", data=np.array([5.0, 15.0]))
        entry.create_dataset("instrument/detector/count_time", data=T_EXP)
    write_poni(tmp_path / "calib.poni")
    out = run([path, tmp_path / "calib.poni", f"q={Q0}", "series.header_key=field_mT", "series.name=field_mT",
               "maps.enable=False", "output.plots=False"], tmp_path)
    rows = [r for r in read_rows(out / "fits.csv") if r["model"] == "maier_saupe"]
    assert [float(r["field_mT"]) for r in rows] == [5.0, 15.0]
    assert [r["image_index"] for r in rows] == ["0", "1"]
    for r in rows:
        assert r["success"] == "true" and r["significant"] == "false"
        assert float(r["S"]) == 0.0 and abs(float(r["S_data"])) < 0.01
    # corrected by the exposure time found in the file: photons/µsr/s
    assert (out / "profiles" / "sample_0001_00000_radial.csv").exists()


def test_dials_geometry_to_poni_and_back_same_q(tmp_path):
    """A tilted dxtbx panel → .poni → dxtbx: |q| per pixel within 1e-6; and the
    .poni read back agrees with pyFAI's own qArray / chiArray."""
    from dxtbx.model import BeamFactory, DetectorFactory

    from diffuse_cli import azimuthal as az
    from diffuse_cli import azimuthal_pixels as azp
    from diffuse_cli import saxs_inputs

    t = np.radians(20.0)
    fast = (np.cos(t), 0.0, np.sin(t))
    det = DetectorFactory.make_detector("PAD", fast, (0.0, -1.0, 0.0), (-15.0, 20.0, -120.0), (0.172, 0.172),
                                        (SHAPE[1], SHAPE[0]), (-1, 1e6))
    beam = BeamFactory.make_polarized_beam(sample_to_source=(0, 0, 1), wavelength=LAMBDA, polarization=(0, 1, 0),
                                           polarization_fraction=FRACTION)
    poni = tmp_path / "roundtrip.poni"
    saxs_inputs.write_poni(str(poni), det, beam)
    ai = saxs_inputs.load_poni(str(poni))
    det2, beam2 = saxs_inputs.models_from_integrator(ai, SHAPE)
    p1 = azp.DetectorPixels.from_models(det, beam)
    p2 = azp.DetectorPixels.from_models(det2, beam2)
    assert np.max(np.abs(p2.q / p1.q - 1)) < 1e-6
    assert np.max(np.abs(az.wrap_degrees(p2.chi - p1.chi))) < 1e-4
    # pyFAI's own arrays (q in nm⁻¹, chi in radians, mirrored)
    # (float64 pixel indices: pyFAI's own qArray works from float32 positions)
    i, j = np.meshgrid(np.arange(SHAPE[0], dtype=np.float64), np.arange(SHAPE[1], dtype=np.float64), indexing="ij")
    q_pyfai = ai.qFunction(i, j).reshape(-1) / 10.0
    chi_pyfai = np.degrees(ai.chi(i, j)).reshape(-1)
    assert np.max(np.abs(p2.q / q_pyfai - 1)) < 1e-6
    assert np.max(np.abs(az.wrap_degrees(p2.chi + chi_pyfai))) < 1e-4


def test_polarization_matches_pyfai(tmp_path):
    """The corrections' polarization of a .poni geometry is pyFAI's with factor 2f − 1."""
    from diffuse_cli import corrections, saxs_inputs

    ai = saxs_inputs.load_poni(str(write_poni(tmp_path / "tilt.poni", rot=(0.03, -0.02, 0.1))))
    det, beam = saxs_inputs.models_from_integrator(ai, SHAPE, FRACTION)
    ours = 1.0 / corrections.detector_multipliers(det, beam)["polarization"]
    theirs = ai.polarization(SHAPE, factor=2 * FRACTION - 1).reshape(-1)
    assert np.max(np.abs(ours / theirs - 1)) < 1e-6


def test_radial_profile_agrees_with_pyfai_integrate1d(edf_series, tmp_path):
    """Tilted .poni, raw counts, mask: our 200-bin I(q) against pyFAI's
    integrate1d (pixel centres, no splitting) on the same EDF file."""
    import fabio

    d, _, mask = edf_series
    poni = write_poni(tmp_path / "tilt.poni", rot=(0.03, -0.02, 0.1))
    image = sorted(d.glob("ring_010*.edf"))[0]
    out = run([image, poni, d / "mask.edf", "corrections.apply=False", "radial.n_bins=200", "radial.q_min=0.2",
               "radial.q_max=1.1", "maps.enable=False", "output.plots=False"], tmp_path)
    ours = read_rows(out / "profiles" / f"{image.stem}_radial.csv")
    q = np.array([float(r["q_inv_angstrom"]) for r in ours])
    I = np.array([float(r["I"]) for r in ours])
    from diffuse_cli import saxs_inputs

    ai = saxs_inputs.load_poni(str(poni))
    res = ai.integrate1d(fabio.open(str(image)).data.astype(np.float64), 200, unit="q_A^-1", radial_range=(0.2, 1.1),
                         correctSolidAngle=False, polarization_factor=None, mask=mask,
                         method=("no", "histogram", "python"))  # pyFAI's numpy histogram path
    assert np.allclose(res.radial, q, rtol=1e-6)  # pyFAI bins in float32
    n = np.array([int(r["n_pixels"]) for r in ours])
    ok = np.isfinite(I) & (res.intensity > 0)
    assert ok.sum() > 190
    rel = np.abs(I[ok] / res.intensity[ok] - 1)
    # pyFAI places pixels by float32 |q|: a pixel within ~1e-7 of a bin edge
    # can land in the neighbouring bin, which moves that bin's mean by up to a
    # few 0.1 %. Bins whose pixel count (from pyFAI's own q array) equals ours
    # agree to float precision.
    q32 = ai.array_from_unit(SHAPE, "center", "q_A^-1")[~mask.astype(bool)]
    n_pyfai = np.histogram(q32, bins=200, range=(0.2, 1.1))[0]
    same = n_pyfai[ok] == n[ok]
    same[[0, -1]] = False  # the range ends: pyFAI clips radial_range in float32 too
    print("radial profile vs pyFAI integrate1d: max rel", np.max(rel[same]), "median", np.median(rel),
          "bins with another pixel count", int((~same).sum()), "their max rel", np.max(rel[~same], initial=0))
    assert np.max(rel) < 0.005  # every bin within 0.5 % (the target)
    assert np.max(rel[same]) < 1e-5  # bins holding the same pixels: the same numbers
    assert np.median(rel) < 1e-6


def test_plain_arguments_and_mistakes(edf_series, tmp_path):
    from libtbx.utils import Sorry

    from diffuse_cli import saxs_inputs

    d, _, _ = edf_series
    args = saxs_inputs.route_args([str(d / "ring_010mT_0001.edf"), str(d / "calib.poni"), str(d / "mask.edf"), "q=0.8"])
    assert args == [f"input.image={d / 'ring_010mT_0001.edf'}", f"input.poni={d / 'calib.poni'}",
                    f"input.mask={d / 'mask.edf'}", "q=0.8"]
    with pytest.raises(Sorry, match="poni"):
        run([d / "ring_010mT_0001.edf"], tmp_path)
    with pytest.raises(Sorry, match="^File not found: nothere.poni$"):
        azimuthal_fit.run([str(d / "ring_010mT_0001.edf"), "nothere.poni"])
    np.save(tmp_path / "small.npy", np.ones((10, 10), dtype=bool))
    with pytest.raises(Sorry, match="mask shape"):
        run([d / "ring_010mT_0001.edf", d / "calib.poni", tmp_path / "small.npy"], tmp_path)
    with pytest.raises(Sorry, match="header key 'Temp'"):
        run([d / "ring_010mT_0001.edf", d / "calib.poni", "series.header_key=Temp"], tmp_path)


def test_cbf_series_dxtbx_would_join_is_read_file_by_file(tmp_path):
    """ring_010mT_0001.cbf, ring_020mT_0002.cbf with a .poni: two images, each
    under its own name and field (fabio, no dxtbx sequence)."""
    import fabio.cbfimage

    rng = np.random.default_rng(7)
    names = ["ring_010mT_0001.cbf", "ring_020mT_0002.cbf"]
    for name in names:
        fabio.cbfimage.CbfImage(data=pattern(2.0, 0.0, rng)).write(str(tmp_path / name))
    write_poni(tmp_path / "calib.poni")
    out = run([*(tmp_path / n for n in names), tmp_path / "calib.poni", f"q={Q0}", r"series.filename_pattern=_(\d+)mT",
               "series.name=field_mT", "fit.azimuthal_models=maier_saupe", "corrections.apply=False",
               "maps.enable=False", "output.plots=False"], tmp_path)
    rows = read_rows(out / "fits.csv")
    assert [(r["image"], float(r["field_mT"])) for r in rows] == [(names[0], 10.0), (names[1], 20.0)]
    assert all(r["success"] == "true" for r in rows)
