"""diffuse.bragg_mask: static, dynamic and Bragg masks, and the program."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from libtbx.utils import Sorry

from diffuse_cli import extraction as ex
from diffuse_cli import masking as mk
from diffuse_cli.command_line import bragg_mask as bragg_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def thaumatin(processed_real):
    """The first thaumatin still, processed once per session by diffuse.stills_process
    (DIALS, shoeboxes kept)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    run = processed_real("thaumatin")
    image = run["images"][0]
    expt = sorted((run["out"] / "stills").glob("*_integrated.expt"))[0]
    refl = expt.with_name(expt.name.replace("_integrated.expt", "_integrated.refl"))
    experiments = ExperimentListFactory.from_json_file(str(expt), check_format=True)
    reflections = flex.reflection_table.from_file(str(refl))
    return {"expt": expt, "refl": refl, "experiments": experiments, "reflections": reflections, "image": image}


@pytest.fixture(scope="module")
def predicted_run(thaumatin, tmp_path_factory):
    """diffuse.bragg_mask at defaults (method=predicted) on the processed still."""
    out = tmp_path_factory.mktemp("bm_pred")
    args = [
        str(thaumatin["expt"]), str(thaumatin["refl"]),
        f"output.directory={out / 'bragg_masks'}",
        f"output.static_mask={out / 'static.mask'}",
        f"output.log={out / 'bm.log'}",
        "output.png.still=0",
        f"output.png.filename={out / 'overlay.png'}",
        "output.png.region=1000,1300,1000,1300",
        "untrusted.circle=1262,1307,30",  # the beamstop shadow
    ]
    bragg_cli.run(args)
    summary = json.loads((out / "bragg_masks" / "summary.json").read_text())
    return {"out": out, "summary": summary, "args": args}


def _centroid_flat(refl, n_fast):
    x, y, _ = refl["xyzobs.px.value"].parts()
    return np.floor(y.as_numpy_array()).astype(int) * n_fast + np.floor(x.as_numpy_array()).astype(int)


# ---------------------------------------------------------------- synthetic


def _synthetic_still():
    """A 200x200 px detector, 1 Å beam and a P1 20 Å cubic crystal."""
    from dxtbx.model import BeamFactory, Crystal, DetectorFactory

    det = DetectorFactory.simple(
        sensor="PAD", distance=100.0, beam_centre=(17.2, 17.2), fast_direction="+x",
        slow_direction="-y", pixel_size=(0.172, 0.172), image_size=(200, 200), trusted_range=(-1, 1e6),
    )
    beam = BeamFactory.simple(1.0)
    c = 20.0
    # rotate the cell so that lattice points do not sit on detector symmetry lines
    from scitbx import matrix

    R = matrix.col((1, 2, 3)).normalize().axis_and_angle_as_r3_rotation_matrix(0.4)
    crystal = Crystal(R * matrix.col((c, 0, 0)), R * matrix.col((0, c, 0)), R * matrix.col((0, 0, c)), space_group_symbol="P1")
    return det, beam, crystal


def test_bragg_polarity_on_known_pixels():
    """The pixel where DIALS's ray intersection puts an in-diffraction lattice
    point is Bragg (False in the total mask); a pixel with hkl half-way between
    lattice points is usable (True)."""
    from cctbx import sgtbx

    det, beam, crystal = _synthetic_still()
    geom = ex.compute_geometry(det, beam)
    A = np.array(crystal.get_A()).reshape(3, 3)
    shape = mk.BraggShape(excitation=0.002, radius=0.003)
    bragg = mk.predicted_bragg_mask(geom, A, sgtbx.space_group_info("P1").group(), shape)
    total = np.ones(geom.n_pixels, dtype=bool) & ~bragg
    # lattice points near the sphere, intersected with the panel by dxtbx
    hkl = np.rint(geom.q() @ np.linalg.inv(A).T)
    uniq = np.unique(hkl, axis=0)
    G = uniq @ A.T
    eps = mk.excitation_error(G, beam.get_s0())
    near = uniq[(np.abs(eps) < 0.001) & np.any(uniq != 0, axis=1)]
    assert len(near) >= 2
    n_fast = 200
    checked = 0
    for h in near:
        s1 = A @ h + np.array(beam.get_s0())
        s1 = s1 / np.linalg.norm(s1) / beam.get_wavelength()
        try:
            x, y = det[0].get_ray_intersection_px(tuple(s1))
        except RuntimeError:
            continue
        if 0 <= x < 200 and 0 <= y < 200:
            assert not total[int(y) * n_fast + int(x)], h
            checked += 1
    assert checked >= 2
    # a pixel whose hkl is far from every lattice point
    frac = np.abs(geom.q() @ np.linalg.inv(A).T - hkl).min(axis=1)
    far = np.flatnonzero(frac > 0.3)
    assert far.size > 0 and total[far].all()


def test_systematic_absences_respected():
    """In P4(1)2(1)2, 00l with l != 4n is absent: never masked; 004 is masked."""
    from cctbx import sgtbx
    from dxtbx.model import BeamFactory, Crystal, DetectorFactory
    from scitbx import matrix

    # c along the lab x axis (perpendicular to the beam): the 00l spots lie
    # on a line along the detector's fast axis
    beam = BeamFactory.simple(1.0)
    det = DetectorFactory.simple(
        sensor="PAD", distance=100.0, beam_centre=(5.0, 30.0), fast_direction="+x",
        slow_direction="-y", pixel_size=(0.1, 0.1), image_size=(600, 600), trusted_range=(-1, 1e6),
    )
    geom = ex.compute_geometry(det, beam)
    sg = sgtbx.space_group_info("P41212").group()
    crystal = Crystal(matrix.col((0, 50, 0)), matrix.col((0, 0, 50)), matrix.col((150, 0, 0)), space_group=sg)
    A = np.array(crystal.get_A()).reshape(3, 3)
    hkl = geom.q() @ np.linalg.inv(A).T
    h0 = np.rint(hkl)
    # big region so that the 00l points near the sphere are hit
    shape = mk.BraggShape(excitation=0.01, radius=0.002)
    bragg = mk.predicted_bragg_mask(geom, A, sg, shape)
    on_00l = (h0[:, 0] == 0) & (h0[:, 1] == 0) & (h0[:, 2] != 0)
    masked_l = set(h0[bragg & on_00l, 2].astype(int).tolist())
    assert masked_l, "no 00l reflection in the test geometry"
    assert all(l % 4 == 0 for l in masked_l), masked_l
    # the same geometry in P1 masks the absent ones too
    bragg_p1 = mk.predicted_bragg_mask(geom, A, sgtbx.space_group_info("P1").group(), shape)
    assert any(l % 4 for l in set(h0[bragg_p1 & on_00l, 2].astype(int).tolist()))


def _gaussian_spots(cov, center, peaks, background=100.0, step=0.25, reach=4.5):
    """Observations of spots with a known Gaussian profile: per spot, pixels on a grid
    in Δh (step sigmas apart, out to ``reach`` sigmas) with excess A·exp(−d²/2)."""
    L = np.linalg.cholesky(cov)
    u = np.arange(-reach, reach + 1e-9, step)
    grid = np.stack(np.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.einsum("ij,ij->i", grid, grid) <= reach**2]
    profile = np.exp(-0.5 * np.einsum("ij,ij->i", grid, grid))
    dh = grid @ L.T + center
    obs = []
    for i, A in enumerate(peaks):
        obs.append({"dh": dh, "excess": A * background * profile, "background": np.full(len(dh), background),
                    "spot": np.tile(np.array([[0, i]], dtype=np.int64), (len(dh), 1))})
    return obs


def test_fitted_peak_model_recovers_a_known_gaussian():
    """Truth: the covariance and centre the spots were drawn with, and the mask radius
    sqrt(2 ln(R/f)) for the median peak/background R."""
    cov = np.array([[0.004, 0.001, 0.0], [0.001, 0.003, -0.0005], [0.0, -0.0005, 0.002]])
    center = np.array([0.01, -0.02, 0.005])
    peaks = [2.0, 5.0, 8.0, 30.0, 100.0]  # peak excess / background; median 8
    model = mk.fit_peak_model(_gaussian_spots(cov, center, peaks), background_fraction=0.1, min_spots=3)
    assert model.n_spots == 5
    assert np.allclose(model.center, center, atol=1e-4)
    # the grid sums approximate the Gaussian's integrals to ~1 %
    assert np.allclose(model.covariance, cov, atol=0.02 * np.abs(cov).max()), model.covariance
    assert model.peak_to_background == pytest.approx(8.0)
    assert model.n_sigma == pytest.approx(np.sqrt(2 * np.log(80.0)))
    assert mk.fit_peak_model(_gaussian_spots(cov, center, peaks), n_sigma=2.0, min_spots=3).n_sigma == 2.0
    with pytest.raises(Sorry, match="predicted.fit.min_spots"):
        mk.fit_peak_model(_gaussian_spots(cov, center, peaks), min_spots=6)
    # each integrated reflection its own radius, from I_i with k = peak excess / photon:
    # I_i = A_i·b / k gives back R_i = A_i
    k, b = 0.02, 100.0
    refl = {"key": np.arange(5), "intensity": np.array(peaks) * b / k, "background": np.full(5, b)}
    model = mk.fit_peak_model(_gaussian_spots(cov, center, peaks), background_fraction=0.1, min_spots=3,
                              reflections=refl)
    assert model.peak_per_photon == pytest.approx(k)
    assert np.allclose(model.n_sigma_at(np.arange(5)), np.sqrt(2 * np.log(np.array(peaks) / 0.1)))
    assert model.n_sigma_at(np.array([99]))[0] == pytest.approx(np.sqrt(2 * np.log(80.0)))


def test_fitted_bragg_mask_is_the_ellipsoid_about_each_lattice_point():
    """Against a direct float64 evaluation of d² = (Δh − c)ᵀ Σ⁻¹ (Δh − c) per pixel."""
    from cctbx import sgtbx

    det, beam, crystal = _synthetic_still()
    geom = ex.compute_geometry(det, beam)
    A = np.array(crystal.get_A()).reshape(3, 3)
    cov = np.diag([0.01, 0.02, 0.015])
    model = mk.PeakModel(center=np.array([0.02, 0.0, -0.01]), covariance=cov, n_sigma=2.5)
    bragg = mk.fitted_bragg_mask(geom, A, sgtbx.space_group_info("P1").group(), model)
    h = np.linalg.solve(A, geom.q().T).T
    H = np.rint(h)
    d = h - H - model.center
    d2 = np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d)
    expected = (d2 <= 2.5**2) & np.any(H != 0, axis=1)
    clear = np.abs(d2 - 2.5**2) > 1e-3  # float32 arithmetic at the edge
    assert 0.01 < expected.mean() < 0.9
    assert np.array_equal(bragg[clear], expected[clear])
    # a lattice point with its own radius 0 is not masked; the others are unchanged
    keys = mk._hkl_key(H.astype(np.int64))
    own = np.unique(keys[expected], return_counts=True)
    one = own[0][np.argmax(own[1])]
    model.hkl_keys, model.n_sigma_of = np.array([one]), np.array([0.0])
    bragg = mk.fitted_bragg_mask(geom, A, sgtbx.space_group_info("P1").group(), model)
    assert not bragg[keys == one].any()
    assert np.array_equal(bragg[clear & (keys != one)], expected[clear & (keys != one)])


def test_dynamic_mask_hot_and_dead():
    """Injected hot and dead pixels in Poisson images are found, nothing else."""
    rng = np.random.default_rng(1)
    shape = (100, 120)
    geom = ex.DetectorGeometry("k", np.array([shape], dtype=np.int32), np.zeros((shape[0] * shape[1], 3), np.float32), np.zeros(3), 1.0)
    n = geom.n_pixels
    hot, dead = [1234, 5000], [777, 9001]
    images = []
    for i in range(6):
        img = rng.poisson(8.0, n)
        img[hot] += 200
        img[dead] = 0
        img[rng.integers(0, n, 20)] += 500  # "Bragg peaks" moving between images
        images.append(img)
    valid = np.ones(n, dtype=bool)
    dyn, stats = mk.dynamic_mask(iter(images), geom, valid)
    assert set(np.flatnonzero(~dyn).tolist()) == set(hot + dead)
    assert stats == {"n_images": 6, "hot": 2, "dead": 2}


# ---------------------------------------------------------------- real data


@pytest.mark.real_data
def test_predicted_mask_on_thaumatin(thaumatin, predicted_run):
    """>= 99 % of integrated reflections' centroid pixels are masked, < 10 % of
    usable pixels are Bragg; the beamstop circle is in the static mask."""
    out, summary = predicted_run["out"], predicted_run["summary"]
    (entry,) = summary["stills"]
    total = mk.read_mask(out / "bragg_masks" / entry["mask"])
    static = mk.read_mask(out / "static.mask")
    assert total.size == static.size == 2463 * 2527
    assert not (total & ~static).any()  # total = static & ...
    refl = thaumatin["reflections"]
    flat = _centroid_flat(refl, 2463)
    usable = static[flat]
    assert usable.mean() > 0.8
    masked = ~total[flat[usable]]
    assert masked.mean() >= 0.99, masked.mean()
    bragg_fraction = (static & ~total).sum() / static.sum()
    assert bragg_fraction == pytest.approx(entry["bragg_fraction"], abs=0.01)  # overloads aside
    assert bragg_fraction < 0.10
    # beamstop circle (fast, slow, radius) masked, and the border of it not
    yy, xx = np.divmod(np.arange(static.size), 2463)
    inside = (xx + 0.5 - 1262) ** 2 + (yy + 0.5 - 1307) ** 2 < 25**2
    assert not static[inside].any()
    assert os.path.getsize(out / "overlay.png") > 10000


@pytest.mark.real_data
def test_static_mask_with_dials_apply_mask(thaumatin, predicted_run, tmp_path):
    """dials.apply_mask accepts the static mask and the total mask."""
    out = predicted_run["out"]
    (entry,) = predicted_run["summary"]["stills"]
    for mask in (out / "static.mask", out / "bragg_masks" / entry["mask"]):
        result = subprocess.run(
            ["dials.apply_mask", str(thaumatin["expt"]), f"input.mask={mask}", f"output.experiments={tmp_path / 'masked.expt'}"],
            cwd=tmp_path, capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "masked.expt").exists()
    # the mask file is what DIALS expects: a tuple of flex.bool, one per panel
    with open(out / "static.mask", "rb") as fh:
        m = pickle.load(fh)
    assert isinstance(m, tuple) and len(m) == 1 and m[0].all() == (2527, 2463)


@pytest.mark.real_data
def test_shoebox_mask_on_thaumatin(thaumatin, tmp_path):
    """method=shoebox masks exactly the Foreground/Strong shoebox pixels."""
    from dials.algorithms.shoebox import MaskCode

    refl = thaumatin["reflections"]
    expt = thaumatin["experiments"][0]
    geom = ex.compute_geometry(expt.detector, expt.beam)
    bragg = mk.shoebox_bragg_mask(refl, geom)
    # independent: loop over a sample of shoeboxes with DIALS's own accessors
    rng = np.random.default_rng(0)
    for i in rng.choice(len(refl), 50, replace=False):
        sb = refl["shoebox"][int(i)]
        x0, x1, y0, y1, _, _ = sb.bbox
        m = sb.mask.as_numpy_array()[0]
        fg = (m & (MaskCode.Foreground | MaskCode.Strong)) != 0
        ys, xs = np.nonzero(fg)
        ys, xs = ys + y0, xs + x0
        ok = (xs >= 0) & (xs < 2463) & (ys >= 0) & (ys < 2527)
        assert bragg[ys[ok] * 2463 + xs[ok]].all()
    assert 0.005 < bragg.mean() < 0.2
    flat = _centroid_flat(refl, 2463)
    assert bragg[flat].mean() > 0.99


def test_shoebox_mask_skips_rows_without_shoebox_data():
    """Rows DIALS never integrated carry an empty shoebox: method=shoebox projects the
    others (their Foreground pixels, set here by hand) and refuses a table with none."""
    from dials.algorithms.shoebox import MaskCode
    from dials.array_family import flex as dflex
    from dials.model.data import Shoebox

    geom = ex.DetectorGeometry("k", np.array([(20, 30)], dtype=np.int32), np.zeros((600, 3), np.float32), np.zeros(3), 1.0)
    table = dflex.reflection_table()
    table["panel"] = dflex.size_t(3, 0)
    table["bbox"] = dflex.int6([(2, 5, 3, 6, 0, 1), (10, 14, 8, 12, 0, 1), (20, 25, 1, 4, 0, 1)])
    table["shoebox"] = dflex.shoebox(3)
    for i in (0, 2):  # row 1 keeps an empty (unallocated) shoebox
        sb = Shoebox(0, table["bbox"][i])
        sb.allocate()
        m = sb.mask.as_numpy_array()
        m[...] = MaskCode.Valid
        m[0, 0, 0] |= MaskCode.Foreground
        mask = dflex.int(m.astype(np.int32).ravel().tolist())
        mask.reshape(dflex.grid(m.shape))
        sb.mask = mask
        table["shoebox"][i] = sb
    bragg = mk.shoebox_bragg_mask(table, geom)
    assert sorted(np.flatnonzero(bragg)) == sorted([3 * 30 + 2, 1 * 30 + 20])  # (y0, x0) of rows 0 and 2
    with pytest.raises(Sorry, match="no shoebox data"):
        mk.shoebox_bragg_mask(table.select(dflex.bool([False, True, False])), geom)


# ---------------------------------------------------------------- program conventions


def test_phil_file_parses():
    from libtbx.phil import parse

    text = (REPO / "phil" / "bragg_mask.phil").read_text()
    params = bragg_cli.phil_scope.fetch(parse(text)).extract()
    assert params.method == "predicted"
    assert params.output.directory == "bragg_masks"


def test_missing_file(tmp_path):
    with pytest.raises(Sorry, match="File not found: .*nope.expt"):
        bragg_cli.run([str(tmp_path / "nope.expt")])


def test_missing_file_console_script(tmp_path):
    exe = REPO / ".venv" / "bin" / "diffuse.bragg_mask"
    if not exe.exists():
        pytest.skip("console script not installed")
    result = subprocess.run([str(exe), "nope.expt"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "Sorry: File not found: nope.expt"


@pytest.mark.real_data
def test_extract_uses_bragg_masks(thaumatin, predicted_run, tmp_path):
    """diffuse.extract with masks.summary uses exactly total mask & trusted
    range: integrated reflections' centroid pixels are not extracted."""
    from diffuse_cli.command_line import extract as extract_cli

    out = predicted_run["out"]
    extract_cli.run([
        str(thaumatin["expt"]),
        f"masks.summary={out / 'bragg_masks' / 'summary.json'}",
        f"output.directory={tmp_path / 'extracted'}",
        f"output.log={tmp_path / 'ex.log'}",
    ])
    (entry,) = predicted_run["summary"]["stills"]
    e = ex.read_extract(tmp_path / "extracted" / f"{entry['name']}.npz")
    total = mk.read_mask(out / "bragg_masks" / entry["mask"])
    raw = thaumatin["experiments"][0].imageset.get_raw_data(0)[0].as_numpy_array().ravel()
    hi = thaumatin["experiments"][0].detector[0].get_trusted_range()[1]
    np.testing.assert_array_equal(e.mask, total & (raw > -1) & (raw < hi))
    flat = _centroid_flat(thaumatin["reflections"], 2463)
    assert e.mask[flat].mean() <= 0.01


@pytest.mark.parametrize("size", [9, 4])
def test_local_background_at_strong_pixels_equals_the_whole_frame_median_filter(size):
    """The median at a few pixels is scipy's whole-frame median_filter there, per panel, invalid pixels filled."""
    import types

    from scipy.ndimage import median_filter

    from diffuse_cli.mask_rotation import local_background

    rng = np.random.default_rng(5)
    shapes = [(37, 50), (20, 31)]
    offsets = np.array([0, 37 * 50, 37 * 50 + 20 * 31])
    geometry = types.SimpleNamespace(panel_shapes=shapes, panel_offsets=offsets)
    counts = rng.poisson(20, offsets[-1]).astype(np.int32)
    valid = rng.random(offsets[-1]) > 0.05
    at = rng.choice(offsets[-1], 400, replace=False)
    expected = np.empty(offsets[-1], dtype=np.float32)
    for i, shape in enumerate(shapes):
        c = counts[offsets[i]:offsets[i + 1]].astype(np.float32)
        ok = valid[offsets[i]:offsets[i + 1]]
        c[~ok] = np.median(c[ok])
        expected[offsets[i]:offsets[i + 1]] = median_filter(c.reshape(shape), size=size, mode="nearest").ravel()
    np.testing.assert_array_equal(local_background(counts, valid, geometry, size, at=at), expected[at])


def test_lattice_crossings_put_each_point_on_the_ewald_sphere():
    """Every root δ of mask_spots.lattice_crossings, applied with scipy's rotation, puts R(δ)Mh on
    the Ewald sphere, and the roots are exactly the sign changes of |R(δ)Mh + s0| − |s0| on a fine grid."""
    from scipy.spatial.transform import Rotation

    from diffuse_cli.mask_spots import lattice_crossings

    rng = np.random.default_rng(3)
    M = Rotation.from_rotvec([0.3, -0.5, 0.2]).as_matrix() @ np.diag([1 / 40.0, 1 / 50.0, 1 / 70.0])
    axis = np.array([0.0, 1.0, 0.2]) / np.hypot(1.0, 0.2)
    s0 = np.array([0.0, 0.0, -1.0])  # λ = 1 Å
    hkl = rng.integers(-30, 31, size=(400, 3)).astype(np.float64)
    rows, delta = lattice_crossings(M, axis, s0, hkl)
    r = np.stack([Rotation.from_rotvec(d * axis).apply(M @ hkl[i]) for i, d in zip(rows, delta)])
    assert np.abs(np.linalg.norm(r + s0, axis=1) - 1.0).max() < 1e-9
    grid = np.linspace(-np.pi, np.pi, 20001)
    n_changes = 0
    for h in hkl:
        rr = Rotation.from_rotvec(grid[:, None] * axis).apply(M @ h)
        eps = np.linalg.norm(rr + s0, axis=1) - 1.0
        n_changes += int(np.count_nonzero(np.sign(eps[1:]) != np.sign(eps[:-1])))
    assert len(rows) == n_changes > 100


def test_spot_mask_grows_a_strong_spot_to_where_it_falls_to_f_of_the_background():
    """A Gaussian spot of σ = 1.2 px and peak P over a flat background b, no predicted spots:
    the masked disc has radius σ·√(2 ln(P/(f·b))) (docs/bragg_mask.md, peak_model=spots)."""
    from dxtbx.model import BeamFactory, Crystal, DetectorFactory, GoniometerFactory, ScanFactory
    from dxtbx.model.experiment_list import Experiment

    from diffuse_cli.mask_spots import SpotModel, spot_bragg_mask

    detector = DetectorFactory.simple("PAD", 200.0, (51.6, 51.6), "+x", "-y", (0.172, 0.172), (600, 600),
                                      trusted_range=(-1, 1e6))
    beam = BeamFactory.simple(1.0)
    crystal = Crystal((30.0, 0, 0), (0, 30.0, 0), (0, 0, 30.0), space_group_symbol="P1")
    expt = Experiment(beam=beam, detector=detector, goniometer=GoniometerFactory.known_axis((1, 0, 0)),
                      scan=ScanFactory.make_scan((1, 3), 0.0, (0.0, 0.5), {1: 0.0, 2: 0.0, 3: 0.0}), crystal=crystal)
    geometry = ex.compute_geometry(detector, beam)
    b, P, sigma_px, f = 100.0, 5000.0, 1.2, 0.1
    yy, xx = np.mgrid[0:600, 0:600]
    centre = (450, 420)  # (slow, fast), away from the beam
    counts = b + P * np.exp(-((xx - centre[1]) ** 2 + (yy - centre[0]) ** 2) / (2 * sigma_px**2))
    counts = counts.ravel()
    valid = np.ones(counts.size, dtype=bool)
    strong = counts > b + 0.5 * P  # the spot's core
    pixel_rad = 0.172 / 200.0 * np.cos(np.arctan(np.hypot(420 - 300, 450 - 300) * 0.172 / 200.0))
    model = SpotModel(keys=np.zeros(0, dtype=np.int64), intensity=np.zeros(0), shell_d_star=np.array([0.0]),
                      shell_intensity=np.array([0.0]), sigma=sigma_px * pixel_rad, sigma_m=np.radians(0.1),
                      background_fraction=f)
    mask, counted = spot_bragg_mask(geometry, expt, 0, model, counts, valid, strong=strong)
    assert counted["n_strong"] == 1 and counted["n_predicted"] == 0
    radius = sigma_px * np.sqrt(2 * np.log(P / (f * b)))
    d = np.hypot(xx - centre[1], yy - centre[0]).ravel()
    assert mask[d <= radius - 0.3].all() and not mask[d >= radius + 0.3].any()


def _two_panel_geometry():
    from diffuse_cli.formats.geometry import DetectorGeometry

    shapes = np.array([[37, 50], [20, 31]], dtype=np.int32)
    n = int((shapes[:, 0] * shapes[:, 1]).sum())
    return DetectorGeometry(key="k", panel_shapes=shapes, s1_unit=np.zeros((n, 3), np.float32),
                            s0=np.array([0.0, 0.0, -1.0]), wavelength=1.0)


def test_mask_file_is_flex_pickle_byte_for_byte(tmp_path):
    """formats.masks.write_dials_mask writes the bytes of pickling to_dials() with flex's own pickler."""
    from diffuse_cli.formats import masks
    from diffuse_cli.formats.masks import read_mask, to_dials

    geometry = _two_panel_geometry()
    flat = np.random.default_rng(2).random(geometry.n_pixels) < 0.8
    masks.write_dials_mask(tmp_path / "m.mask", flat, geometry)
    assert masks._FAST_MASK_PICKLE == [True]  # the numpy path, not the fallback
    expected = pickle.dumps(to_dials(flat, geometry), protocol=pickle.HIGHEST_PROTOCOL)
    assert (tmp_path / "m.mask").read_bytes() == expected
    np.testing.assert_array_equal(read_mask(tmp_path / "m.mask"), flat)


@pytest.mark.parametrize("one_large_panel", [False, True])
def test_strong_peaks_are_scipy_maximum_positions_ties_included(one_large_panel):
    """mask_spots._strong_peaks picks, per 8-connected group, the pixel scipy's maximum_position picks,
    also when the group's maximum is reached at several pixels (int32 counts, and float64)."""
    from scipy import ndimage

    from diffuse_cli.formats.geometry import DetectorGeometry
    from diffuse_cli.mask_spots import _strong_peaks

    geometry = _two_panel_geometry()
    if one_large_panel:
        geometry = DetectorGeometry(key="k", panel_shapes=np.array([[300, 350]], dtype=np.int32),
                                    s1_unit=np.zeros((105000, 3), np.float32), s0=geometry.s0, wavelength=1.0)
    rng = np.random.default_rng(4)
    counts = rng.poisson(3, geometry.n_pixels).astype(np.int32)  # many ties
    strong = rng.random(geometry.n_pixels) < 0.3
    if one_large_panel:
        np.testing.assert_array_equal(_strong_peaks(strong, counts.astype(np.float64), geometry),
                                      _strong_peaks(strong, counts, geometry))
    expected = []
    for i, shape in enumerate(geometry.panel_shapes):
        sl = slice(geometry.panel_offsets[i], geometry.panel_offsets[i + 1])
        labels, n = ndimage.label(strong[sl].reshape(shape), structure=np.ones((3, 3)))
        at = ndimage.maximum_position(counts[sl].reshape(shape).astype(np.float64), labels, np.arange(1, n + 1))
        expected.append(geometry.panel_offsets[i] + np.ravel_multi_index(np.array(at).T, tuple(shape)))
    expected = np.concatenate(expected)
    got = _strong_peaks(strong, counts, geometry)
    np.testing.assert_array_equal(got, expected)
    values = counts[got]
    assert len(got) > 20 and np.any([np.sum(counts[strong] == v) > 1 for v in values])


def test_spot_background_skips_only_spots_that_cannot_be_masked():
    """With peak and fraction, _spot_background returns the full two-square background, or inf only
    where peak <= fraction·b (such a spot is not masked either way)."""
    from diffuse_cli.mask_spots import _spot_background

    geometry = _two_panel_geometry()
    rng = np.random.default_rng(6)
    counts = rng.poisson(30, geometry.n_pixels).astype(np.int32)
    valid = rng.random(geometry.n_pixels) > 0.05
    at = rng.choice(geometry.n_pixels, 300, replace=False)
    peak = rng.uniform(0, 6, len(at))  # about fraction·b = 0.1·30
    full = _spot_background(counts, valid, geometry, 3, at)
    quick = _spot_background(counts, valid, geometry, 3, at, peak=peak, fraction=0.1)
    kept = np.isfinite(quick)
    np.testing.assert_array_equal(quick[kept], full[kept])
    assert np.all(peak[~kept] <= 0.1 * full[~kept])
    assert 0 < kept.sum() < len(at)


def test_miller_index_from_numpy_columns():
    from cctbx.array_family import flex as cflex

    from diffuse_cli.mask_bragg import _miller

    hkl = np.random.default_rng(7).integers(-60, 61, (500, 3))
    assert list(_miller(hkl)) == list(cflex.miller_index([tuple(int(v) for v in h) for h in hkl]))


def test_frame_counts_reads_each_frame_once(monkeypatch):
    """bragg_mask keeps the frames the dynamic mask and the spot model read for the per-image
    masks (read-only); the last use hands the frame over."""
    from diffuse_cli import mask_driver

    reads = []

    class Images:
        def indices(self):
            return [10, 11]

        def get_path(self, i):
            return "/data/sweep.h5"

    def raw_counts(imageset, i):
        reads.append(i)
        return np.full(4, i, dtype=np.int32)

    monkeypatch.setattr(mask_driver, "raw_counts", raw_counts)
    mask_driver._FRAMES.clear()
    images = Images()
    a = mask_driver._frame_counts(images, 0)
    assert not a.flags.writeable
    mask_driver._frame_counts(images, 1)
    assert mask_driver._frame_counts(images, 0) is a and reads == [0, 1]
    assert mask_driver._frame_counts(images, 0, keep=False) is a
    mask_driver._frame_counts(images, 0, keep=False)
    assert reads == [0, 1, 0]
    mask_driver._FRAMES.clear()


def _dynamic_mask_by_median_filter(images, geometry, valid, hot_n_sigma=10.0, hot_min_excess=5.0,
                                   dead_min_expected=20.0, filter_size=5, hot_fraction=1.0, min_hot_images=1):
    """The dynamic mask as documented, its reference b by scipy's whole-frame median_filter."""
    from scipy.ndimage import median_filter

    stack = np.array(images)
    c = stack.astype(np.float32)
    lo, hi, n = c.min(axis=0), c.max(axis=0), len(images)
    mean = (c.astype(np.float64).sum(axis=0) / n).astype(np.float32)
    ref = np.empty_like(mean)
    off = geometry.panel_offsets
    for i, shape in enumerate(geometry.panel_shapes):
        m = mean[off[i]:off[i + 1]].copy()
        ok = valid[off[i]:off[i + 1]]
        m[~ok] = np.median(m[ok])
        ref[off[i]:off[i + 1]] = median_filter(m.reshape(tuple(shape)), size=filter_size, mode="nearest").ravel()
    threshold = ref + hot_min_excess + hot_n_sigma * np.sqrt(np.maximum(ref, 0))
    if hot_fraction >= 1.0:
        hot = valid & (lo > threshold)
    else:
        need = max(int(np.ceil(hot_fraction * n)), int(min_hot_images))
        hot = valid & ((stack > threshold).sum(axis=0) >= need)
    dead = valid & (hi == 0) & (n * ref >= dead_min_expected)
    return ~(hot | dead)


@pytest.mark.parametrize("hot_fraction, filter_size", [(1.0, 5), (0.75, 5), (0.5, 4)])
def test_dynamic_mask_equals_the_whole_frame_median_filter(hot_fraction, filter_size):
    """mask_pixels.dynamic_mask takes the reference median only where the window's minimum and
    maximum leave the hot/dead tests open: the mask is the one of the whole-frame median_filter."""
    geometry = _two_panel_geometry()
    n = geometry.n_pixels
    rng = np.random.default_rng(8)
    level = np.where(np.arange(n) < 37 * 50, 6.0, 0.8)  # a bright and a dim panel (dead pixels count)
    images = []
    hot = rng.choice(n, 40, replace=False)
    for i in range(5):
        img = rng.poisson(level).astype(np.int32)
        img[hot[8:24]] += 100  # hot in every image
        img[hot[24:]] += rng.integers(0, 60, hot.size - 24)  # in some images only, at all levels
        img[rng.integers(0, n, 30)] += 400  # moving "Bragg peaks"
        img[hot[:8]] = 0  # dead
        images.append(img)
    valid = rng.random(n) > 0.03
    dyn, stats = mk.dynamic_mask(lambda: iter(images), geometry, valid, filter_size=filter_size,
                                 hot_fraction=hot_fraction, min_hot_images=2)
    expected = _dynamic_mask_by_median_filter(images, geometry, valid, filter_size=filter_size,
                                              hot_fraction=hot_fraction, min_hot_images=2)
    np.testing.assert_array_equal(dyn, expected)
    assert stats["hot"] > 5 and stats["dead"] > 3


@pytest.mark.parametrize("size", [27, 8])
def test_window_minimum_is_scipy_minimum_filter_at_the_spots(size):
    """mask_spots._window_minimum at a few pixels equals scipy's minimum_filter (odd size ≥ size) there."""
    from scipy.ndimage import minimum_filter

    from diffuse_cli.mask_rotation import filled_panels
    from diffuse_cli.mask_spots import _window_minimum

    geometry = _two_panel_geometry()
    rng = np.random.default_rng(9)
    counts = rng.poisson(30, geometry.n_pixels).astype(np.int32)
    valid = rng.random(geometry.n_pixels) > 0.05
    filled = filled_panels(counts, valid, geometry)
    at = rng.choice(geometry.n_pixels, 500, replace=False)
    expected = np.concatenate([minimum_filter(f, size=size | 1, mode="nearest").ravel() for f in filled])[at]
    np.testing.assert_array_equal(_window_minimum(filled, geometry, size, at), expected)


def test_box_lattice_points_keep_every_crossing_near_the_frame():
    """The lattice points the compiled pre-selection keeps give, through the sphere test and
    lattice_crossings, exactly the near crossings (rows and δ bit for bit) of the whole box,
    for random cells, settings and rotation axes, one along the beam."""
    from scipy.spatial.transform import Rotation

    from diffuse_cli import mask_spots
    from diffuse_cli.mask_spots import NEAR_RAD, _box_lattice_points, lattice_crossings

    def near_crossings(grid, M, axis, s0, q_max):
        r = grid @ M.T
        grid = grid[(np.einsum("ij,ij->i", r, r) <= q_max**2) & np.any(grid != 0, axis=1)]
        rows, delta = lattice_crossings(M, axis, s0, grid.astype(np.float64))
        near = np.abs(delta) < NEAR_RAD
        return grid[rows[near]], delta[near]

    rng = np.random.default_rng(10)
    n_near = 0
    for trial in range(6):
        cell = rng.uniform(20.0, 60.0, 3)
        M = Rotation.from_rotvec(rng.normal(size=3)).as_matrix() @ np.diag(1.0 / cell)
        axis = np.array([0.0, 0.0, 1.0]) if trial == 0 else rng.normal(size=3)
        axis = axis / np.linalg.norm(axis)
        s0 = np.array([0.0, 0.0, -1.0 / rng.uniform(0.7, 1.5)])
        q_max = rng.uniform(0.3, 0.7)
        n = np.ceil(q_max * np.linalg.norm(np.linalg.inv(M), axis=1)).astype(int)
        box = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in n], indexing="ij"), -1).reshape(-1, 3)
        picked = _box_lattice_points(n, M, axis, s0, q_max, NEAR_RAD)
        assert mask_spots._NEAR_KERNEL[0] is not None  # numba: the compiled pre-selection ran
        assert len(picked) < len(box) / 2
        h_all, d_all = near_crossings(box, M, axis, s0, q_max)
        h_new, d_new = near_crossings(picked, M, axis, s0, q_max)
        np.testing.assert_array_equal(h_new, h_all)
        np.testing.assert_array_equal(d_new, d_all)
        n_near += len(d_all)
    assert n_near > 1000


def test_read_reflection_table_without_shoeboxes(tmp_path):
    """formats.reflections reads a .refl without its shoebox column: every other column, the
    identifiers and the row count as DIALS reads them from the whole file."""
    from dials.array_family import flex as dflex
    from dials.model.data import Shoebox

    from diffuse_cli.formats.reflections import read_reflection_table, read_without_columns

    rng = np.random.default_rng(11)
    n = 40
    table = dflex.reflection_table()
    table["id"] = dflex.int(n, 0)
    table["miller_index"] = dflex.miller_index([tuple(int(v) for v in h) for h in rng.integers(-9, 10, (n, 3))])
    table["xyzobs.px.value"] = dflex.vec3_double(rng.random((n, 3)).tolist())
    table["intensity.sum.value"] = dflex.double(rng.random(n))
    table["shoebox"] = dflex.shoebox(n)
    for i in range(n):
        sb = Shoebox(0, (0, 5, 0, 4, 0, 3))
        sb.allocate()
        table["shoebox"][i] = sb
    table.experiment_identifiers()[0] = "sweep-one"
    path = tmp_path / "t.refl"
    table.as_msgpack_file(str(path))
    got = read_reflection_table(path, skip_columns=("shoebox",))
    assert "shoebox" not in got and len(got) == n
    assert dict(got.experiment_identifiers()) == {0: "sweep-one"}
    del table["shoebox"]
    assert got.as_msgpack() == table.as_msgpack()
    assert "shoebox" in read_reflection_table(path)  # nothing to skip: the whole file
    # not a whole msgpack table: left to DIALS's reader (and its reason)
    (tmp_path / "x.refl").write_text("not a table")
    data = path.read_bytes()
    (tmp_path / "trunc.refl").write_bytes(data[: len(data) // 2])
    (tmp_path / "short.refl").write_bytes(data[:-1])
    for name in ("x.refl", "trunc.refl", "short.refl"):
        assert read_without_columns(tmp_path / name, ("shoebox",)) is None


@pytest.mark.parametrize("kind", ["fractions", "negative", "bright"])
def test_local_background_ranks_any_values_as_the_median_filter(kind):
    """local_background at pixels equals scipy's median_filter also for counts its histogram
    does not rank (fractions, negative values, medians above its bins)."""
    import types

    from scipy.ndimage import median_filter

    from diffuse_cli.mask_rotation import _RANK_BINS, local_background

    rng = np.random.default_rng(12)
    shape = (60, 70)
    geometry = types.SimpleNamespace(panel_shapes=[shape], panel_offsets=np.array([0, shape[0] * shape[1]]))
    counts = rng.poisson(20, shape[0] * shape[1]).astype(np.float32)
    if kind == "fractions":
        counts[rng.random(counts.size) < 0.02] += 0.5
    elif kind == "negative":
        counts[rng.random(counts.size) < 0.02] = -2
    else:
        counts += _RANK_BINS - 20  # every median above the histogram
    valid = np.ones(counts.size, dtype=bool)
    at = rng.choice(counts.size, 300, replace=False)
    expected = median_filter(counts.reshape(shape), size=9, mode="nearest").ravel()[at]
    np.testing.assert_array_equal(local_background(counts, valid, geometry, 9, at=at), expected)


def test_spot_mask_is_the_same_with_and_without_the_compiled_kernels(monkeypatch):
    """spot_bragg_mask with its numba kernels (lattice pre-selection, window ranks, spot growth)
    gives the mask and counts of its numpy path, predicted and strong spots, edges included."""
    from dxtbx.model import BeamFactory, Crystal, DetectorFactory, GoniometerFactory, ScanFactory
    from dxtbx.model.experiment_list import Experiment

    from diffuse_cli import mask_rotation, mask_spots
    from diffuse_cli.mask_spots import SpotModel, spot_bragg_mask

    detector = DetectorFactory.simple("PAD", 150.0, (40.0, 45.0), "+x", "-y", (0.172, 0.172), (500, 520),
                                      trusted_range=(-1, 1e6))
    beam = BeamFactory.simple(1.0)
    crystal = Crystal((31.0, 2.0, 0), (0, 37.0, 1.0), (3.0, 0, 43.0), space_group_symbol="P1")
    expt = Experiment(beam=beam, detector=detector, goniometer=GoniometerFactory.known_axis((1, 0, 0)),
                      scan=ScanFactory.make_scan((1, 3), 0.0, (0.0, 0.5), {1: 0.0, 2: 0.0, 3: 0.0}), crystal=crystal)
    geometry = ex.compute_geometry(detector, beam)
    rng = np.random.default_rng(13)
    counts = rng.poisson(50, geometry.n_pixels).astype(np.int32)
    yy, xx = np.divmod(np.arange(geometry.n_pixels), 500)
    for cy, cx in [(0, 0), (3, 250), (519, 499), (260, 2), (100, 400), (300, 300)]:  # strong spots, some at edges
        counts += (3000 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 3.0)).astype(np.int32)
    valid = rng.random(geometry.n_pixels) > 0.01
    strong = counts > 400
    model = SpotModel(keys=np.zeros(0, dtype=np.int64), intensity=np.zeros(0), shell_d_star=np.array([0.0]),
                      shell_intensity=np.array([3e4]), sigma=np.radians(0.08), sigma_m=np.radians(0.3),
                      background_fraction=0.1)
    compiled = spot_bragg_mask(geometry, expt, 1, model, counts, valid, strong=strong)
    assert all(k[0] is not None for k in (mask_spots._NEAR_KERNEL, mask_spots._GROW_KERNEL, mask_rotation._RANK_KERNEL))
    for name, module in (("_NEAR_KERNEL", mask_spots), ("_GROW_KERNEL", mask_spots), ("_RANK_KERNEL", mask_rotation)):
        monkeypatch.setattr(module, name, [None])
    plain = spot_bragg_mask(geometry, expt, 1, model, counts, valid, strong=strong)
    np.testing.assert_array_equal(compiled[0], plain[0])
    assert compiled[1] == plain[1]
    assert compiled[1]["n_predicted"] > 50 and compiled[1]["n_strong"] == 6
