"""The frame reference against dxtbx's Scan and DIALS's own spot predictions.

Truth is DIALS: ``Scan.get_angle_from_array_index`` for angles, and the
reflections DIALS predicts for a sweep (``xyzcal.px``, ``miller_index``),
which the setting matrix at each prediction's z must map back to its Miller
index. Sweeps start at image 1, 0 and 101: an off-by-``image_range[0] − 1``
anywhere moves every prediction by that many frames.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from diffuse_cli.frames import FrameRef

REPO = pathlib.Path(__file__).resolve().parents[1]


def _sweep(first_image: int, n: int = 20, width: float = 0.5, phi0: float = 10.0, scan_varying=False):
    from dxtbx.model import BeamFactory, Crystal, DetectorFactory, GoniometerFactory, ScanFactory
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    beam = BeamFactory.simple(1.0)  # λ = 1 Å along −z
    detector = DetectorFactory.simple(
        "PAD", 120.0, (102.4, 102.4), "+x", "-y", (0.2, 0.2), (1024, 1024), trusted_range=(-1, 1e6)
    )
    gonio = GoniometerFactory.known_axis((1.0, 0.2, 0.1))
    gonio.set_fixed_rotation((0.98, 0.0, -0.2, 0.0, 1.0, 0.0, 0.2, 0.0, 0.98))
    scan = ScanFactory.make_scan(
        (first_image, first_image + n - 1), [0.1] * n, (phi0, width), list(range(n)), deg=True
    )
    rng = np.random.default_rng(first_image + 7)
    from scitbx import matrix

    U = matrix.sqr(matrix.col(rng.normal(size=3)).normalize().axis_and_angle_as_r3_rotation_matrix(1.1))
    crystal = Crystal((40.0, 0, 0), (0, 50.0, 0), (0, 0, 60.0), space_group_symbol="P1")
    crystal.set_U(U)
    if scan_varying:
        # orientation drifting by 0.05 deg per frame about another axis
        drift = matrix.col((0.3, 1.0, -0.2)).normalize()
        A0 = matrix.sqr(crystal.get_A())
        As = [drift.axis_and_angle_as_r3_rotation_matrix(0.05 * k, deg=True) * A0 for k in range(n + 1)]
        crystal.set_A_at_scan_points(As)
    expt = Experiment(beam=beam, detector=detector, goniometer=gonio, scan=scan, crystal=crystal)
    return ExperimentList([expt])


@pytest.mark.parametrize("first_image", [1, 0, 101])
def test_angles_match_dxtbx_scan(first_image):
    scan = _sweep(first_image)[0].scan
    frames = FrameRef.from_scan(scan)
    assert frames.array_range == tuple(scan.get_array_range())
    assert frames.image_range == tuple(scan.get_image_range())
    for z in (scan.get_array_range()[0] + 0.5, scan.get_array_range()[0] + 7.25, scan.get_array_range()[1] - 0.01):
        assert frames.phi_deg(z) == pytest.approx(scan.get_angle_from_array_index(z, deg=True), abs=1e-12)
        phi = scan.get_angle_from_array_index(z, deg=True)
        assert frames.z_of_phi(phi) == pytest.approx(scan.get_array_index_from_angle(phi, deg=True), abs=1e-9)
    # image number n is array index n - 1
    assert list(frames.array_indices())[0] == first_image - 1


@pytest.mark.parametrize("first_image,scan_varying", [(1, False), (0, False), (101, False), (101, True)])
def test_setting_matrix_maps_dials_predictions_to_their_miller_index(first_image, scan_varying):
    from dials.algorithms.spot_prediction import ScanStaticReflectionPredictor, ScanVaryingReflectionPredictor
    from dials.array_family import flex  # noqa: F401

    experiments = _sweep(first_image, scan_varying=scan_varying)
    expt = experiments[0]
    if scan_varying:
        predictor = ScanVaryingReflectionPredictor(expt, dmin=2.0)
        A = [expt.crystal.get_A_at_scan_point(k) for k in range(expt.crystal.num_scan_points)]
        refl = predictor.for_ub(flex.mat3_double(A))
    else:
        refl = ScanStaticReflectionPredictor(expt, dmin=2.0).for_ub(expt.crystal.get_A())
    assert len(refl) > 500
    x, y, z = (c.as_numpy_array() for c in refl["xyzcal.px"].parts())
    panel = expt.detector[0]
    lab = np.array([panel.get_pixel_lab_coord((float(a), float(b))) for a, b in zip(x, y)])
    s1 = lab / (np.linalg.norm(lab, axis=1, keepdims=True) * expt.beam.get_wavelength())
    q = s1 - np.asarray(expt.beam.get_s0())
    hkl = np.array(refl["miller_index"], dtype=float).reshape(-1, 3)
    frames = FrameRef.from_experiment(expt)
    # predicted z is absolute: every prediction lies inside the scan's array range
    assert frames.in_scan(frames.array_index_of_z(z)).all()
    M = frames.setting_matrix(expt.crystal, expt.goniometer, z)
    h = np.einsum("nij,nj->ni", np.linalg.inv(M), q)
    # static: exact; scan-varying: DIALS's predictor solves for the diffracting
    # angle with A interpolated over the frame, 0.05°/frame drift here
    tol = 1e-3 if scan_varying else 1e-8
    assert np.abs(h - hkl).max() < tol

    # the per-frame matrix used for pixels (frame centre) within a frame's rotation
    from diffuse_cli.geometry import setting_matrix

    a = frames.array_index_of_z(z)
    near_centre = np.abs(z - (a + 0.5)) < 0.05
    for f in np.unique(a[near_centre])[:5]:
        sel = near_centre & (a == f)
        Mf = setting_matrix(expt.crystal, expt.goniometer, expt.scan, int(f))
        hf = q[sel] @ np.linalg.inv(Mf).T
        assert np.abs(hf - hkl[sel]).max() < 0.05


def test_frame_outside_scan_is_refused():
    from diffuse_cli.geometry import setting_matrix

    expt = _sweep(101)[0]
    with pytest.raises(ValueError):
        setting_matrix(expt.crystal, expt.goniometer, expt.scan, 0)


def test_no_frame_arithmetic_outside_the_frame_reference():
    """Calls of dxtbx's frame conversions and scan-point lookups live in frames.py only."""
    banned = {"get_angle_from_array_index", "get_array_range", "get_array_index_from_angle",
              "get_A_at_scan_point", "get_angle_from_image_index", "get_image_index_from_angle"}
    offenders = []
    for path in (REPO / "diffuse_cli").rglob("*.py"):
        if path.name == "frames.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in banned:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.attr}")
    assert not offenders, offenders
