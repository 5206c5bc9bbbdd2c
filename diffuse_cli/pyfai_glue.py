"""dxtbx panels in pyFAI's terms: the one place for the dxtbx → pyFAI conversion.

pyFAI is the independent reference of our radial and azimuthal profiles
(docs/azimuthal_fit.md). :func:`pyfai_geometry` gives the AzimuthalIntegrator
parameters (metres, radians) that put every pixel where dxtbx does;
:func:`pyfai_integrator` builds the integrator, and :func:`without_parallax`
the matching parallax-free dxtbx detector (pyFAI's integrate1d does not model
parallax).
"""

from __future__ import annotations

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)



def pyfai_geometry(panel, beam) -> dict:
    """pyFAI AzimuthalIntegrator parameters equivalent to one dxtbx panel.

    Returns dict(dist, poni1, poni2, rot1, rot2, rot3, pixel1, pixel2,
    wavelength) in pyFAI units (metres, radians). ``dist`` is the
    perpendicular sample–panel distance and (poni2, poni1) the foot of that
    perpendicular in the panel's (fast, slow) mm frame; pixel1 is the slow
    pixel size, pixel2 the fast one. rot1–3 are solved numerically so that
    pyFAI puts every pixel where dxtbx does (for a panel normal to the beam
    they are 0). pyFAI's frame is mapped onto dxtbx's lab frame through a
    reflection (dxtbx fast/slow/normal is left-handed), so |q| and 2θ agree
    but pyFAI's chi is mirrored relative to our χ.

    Use as ``pyFAI.azimuthalIntegrator.AzimuthalIntegrator(**params,
    detector=pyFAI.detectors.Detector(pixel1, pixel2, max_shape=(n_slow, n_fast)))``
    (the ``wavelength`` key is included; see :func:`pyfai_integrator`).
    """
    from scipy.optimize import least_squares

    dist = panel.get_distance()
    fast0, slow0 = panel.get_normal_origin()  # mm
    px_fast, px_slow = panel.get_pixel_size()
    n_fast, n_slow = panel.get_image_size()
    beam_dir = np.array(beam.get_unit_s0(), dtype=np.float64)
    slow = np.array(panel.get_slow_axis(), dtype=np.float64)
    # pyFAI lab basis in dxtbx coordinates: e3 along the beam, e1 ~ slow
    e3 = beam_dir
    e1 = slow - slow.dot(e3) * e3
    e1 /= np.linalg.norm(e1)
    e2 = -np.cross(e3, e1)  # (e1, e2, e3) = (slow, fast, beam) for an untilted panel
    basis = np.stack([e1, e2, e3])

    # sample pixels (pixel-centre coordinates in px)
    fs = np.array([[0.5, 0.5], [n_fast - 0.5, 0.5], [0.5, n_slow - 0.5], [n_fast - 0.5, n_slow - 0.5], [n_fast / 2, n_slow / 2]])
    from scitbx.array_family import flex

    # plain pixel -> mm (no parallax: pyFAI integrate1d does not model it)
    mm = flex.vec2_double(flex.double(fs[:, 0] * px_fast), flex.double(fs[:, 1] * px_slow))
    lab = panel.get_lab_coord(mm).as_numpy_array()  # mm
    target = lab @ basis.T  # (x1, x2, x3) mm

    # pyFAI rotation matrix (Geometry.rotation_matrix, left-handed rotations)
    def rot_matrix(r1, r2, r3):
        c1, c2, c3 = np.cos([r1, r2, r3])
        s1, s2, s3 = np.sin([r1, r2, r3])
        R1 = np.array([[1, 0, 0], [0, c1, s1], [0, -s1, c1]])
        R2 = np.array([[c2, 0, -s2], [0, 1, 0], [s2, 0, c2]])
        R3 = np.array([[c3, -s3, 0], [s3, c3, 0], [0, 0, 1]])
        return R3 @ R2 @ R1

    p1 = fs[:, 1] * px_slow - slow0  # position relative to the PONI, mm
    p2 = fs[:, 0] * px_fast - fast0

    def model(rots):
        # pyFAI (geometry.calc_pos_zyx): t = R · (p1, p2, L)
        R = rot_matrix(*rots)
        vec = np.stack([p1, p2, np.full_like(p1, dist)])
        return (R @ vec).T

    fit = least_squares(lambda r: (model(r) - target).ravel(), x0=np.zeros(3), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    residual = np.abs(model(fit.x) - target).max()
    if residual > 1e-6 * max(1.0, dist):
        raise ValueError(f"could not express the panel geometry in pyFAI terms (residual {residual:.3g} mm)")
    rots = [float(r) if abs(r) > 1e-12 else 0.0 for r in fit.x]
    return {
        "dist": dist * 1e-3,
        "poni1": slow0 * 1e-3,
        "poni2": fast0 * 1e-3,
        "rot1": rots[0],
        "rot2": rots[1],
        "rot3": rots[2],
        "pixel1": px_slow * 1e-3,
        "pixel2": px_fast * 1e-3,
        "wavelength": beam.get_wavelength() * 1e-10,
    }


def without_parallax(detector):
    """A copy of a dxtbx detector whose panels map pixels to mm without parallax.

    pyFAI's integrate1d places pixels without a parallax correction, so
    compare like with like by building :class:`DetectorPixels` from this copy.
    """
    from dxtbx.model import Detector, SimplePxMmStrategy

    copy = Detector.from_dict(detector.to_dict())
    for panel in copy:
        panel.set_px_mm_strategy(SimplePxMmStrategy())
    return copy


def pyfai_integrator(panel, beam):
    """A pyFAI AzimuthalIntegrator for one dxtbx panel (see :func:`pyfai_geometry`)."""
    import pyFAI.azimuthalIntegrator
    import pyFAI.detectors

    p = pyfai_geometry(panel, beam)
    n_fast, n_slow = panel.get_image_size()
    det = pyFAI.detectors.Detector(pixel1=p["pixel1"], pixel2=p["pixel2"], max_shape=(n_slow, n_fast))
    return pyFAI.azimuthalIntegrator.AzimuthalIntegrator(
        dist=p["dist"],
        poni1=p["poni1"],
        poni2=p["poni2"],
        rot1=p["rot1"],
        rot2=p["rot2"],
        rot3=p["rot3"],
        detector=det,
        wavelength=p["wavelength"],
    )
