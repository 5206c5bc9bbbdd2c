"""The simulated instrument as dxtbx models: beam, detectors, goniometer, scan, pixel defects.

The models are what the image files carry and dials.import reads back; the
per-pixel physics computed from them lives in
:mod:`diffuse_cli.simulation.forward`.
"""

from __future__ import annotations

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli.simulation.crystal import rotation_about


# --------------------------------------------------------------------------- models


def make_beam(wavelength: float, polarization_fraction: float):
    """Beam along −z (DIALS lab), polarisation plane normal (0, 1, 0)."""
    from dxtbx.model import BeamFactory

    beam = BeamFactory.simple(wavelength)
    beam.set_polarization_fraction(polarization_fraction)
    beam.set_polarization_normal((0.0, 1.0, 0.0))
    return beam


def sensor_mu(material: str, wavelength: float) -> float:
    """Linear attenuation coefficient (mm⁻¹) as dxtbx's format classes compute it."""
    from cctbx.eltbx import attenuation_coefficient

    return attenuation_coefficient.get_table(material).mu_at_angstrom(wavelength) / 10.0


def make_single_detector(
    distance, n_fast, n_slow, pixel_size, beam_centre_px, material, thickness, wavelength, trusted_range
):
    """A Pilatus-like flat panel normal to the beam, as FormatCBFMini reads it back.

    Fast axis +x, slow −y; with a Si/CdTe sensor dxtbx's reader installs a
    parallax-corrected px→mm strategy, so we do the same.
    """
    from dxtbx.model import DetectorFactory, ParallaxCorrectedPxMmStrategy, SimplePxMmStrategy

    if material:
        mu = sensor_mu(material, wavelength)
        px_mm = ParallaxCorrectedPxMmStrategy(mu, thickness)
    else:
        px_mm = SimplePxMmStrategy()
    det = DetectorFactory.simple(
        "PAD",
        distance,
        (beam_centre_px[0] * pixel_size, beam_centre_px[1] * pixel_size),
        "+x",
        "-y",
        (pixel_size, pixel_size),
        (n_fast, n_slow),
        tuple(trusted_range),
        [],
        px_mm=px_mm,
    )
    if material:
        det[0].set_material(material)
        det[0].set_thickness(thickness)
        det[0].set_mu(mu)
    return det


def make_multi_detector(
    distance, n_fast, n_slow, pixel_size, beam_centre_px, n_panels_fast, n_panels_slow, gap_px,
    tilt_deg, rng, material, thickness, wavelength, trusted_range,
):
    """Panels of (n_fast × n_slow) px on a grid with gaps, each slightly tilted.

    The panel array is centred so that the overall beam centre (px in the
    gap-free layout frame) lands at ``beam_centre_px``. Each panel is rotated
    about its own centre by uniform random angles within ±tilt_deg about the
    lab x and y axes and shifted along z by up to ±0.2 mm.
    """
    from dxtbx.model import Detector

    det = Detector()
    root = det.hierarchy()
    pitch_f = (n_fast + gap_px) * pixel_size
    pitch_s = (n_slow + gap_px) * pixel_size
    bx, by = beam_centre_px[0] * pixel_size, beam_centre_px[1] * pixel_size
    for js in range(n_panels_slow):
        for jf in range(n_panels_fast):
            # panel corner in the flat layout (mm, fast right, slow down)
            x0 = jf * pitch_f - bx
            y0 = -(js * pitch_s - by)
            centre = np.array([x0 + n_fast * pixel_size / 2, y0 - n_slow * pixel_size / 2, -distance])
            ax, ay = rng.uniform(-tilt_deg, tilt_deg, 2)
            dz = rng.uniform(-0.2, 0.2)
            R = rotation_about((1, 0, 0), ax) @ rotation_about((0, 1, 0), ay)
            fast = R @ np.array([1.0, 0.0, 0.0])
            slow = R @ np.array([0.0, -1.0, 0.0])
            centre = centre + np.array([0.0, 0.0, dz])
            _add_sensor_panel(root, f"panel_{js * n_panels_fast + jf}", centre, fast, slow, n_fast, n_slow,
                              pixel_size, trusted_range, material, thickness, wavelength)
    return det


def make_cspad_detector(
    distance, n_fast, n_slow, pixel_size, modules_per_quadrant, gap_px, tilt_deg, rotation_deg, rng,
    material, thickness, wavelength, trusted_range,
):
    """A CSPAD-like detector: four quadrants turned by 90° from each other around the beam.

    Quadrant 0 (upper right, x > 0, y > 0 in the lab) holds ``modules_per_quadrant``
    modules of (n_fast × n_slow) px stacked along y with ``gap_px`` gaps, fast
    axis +x, slow −y; quadrant q is quadrant 0 turned by q·90° about the beam
    (−z), so neighbouring quadrants have their fast axes at right angles, as on
    a CSPAD. The beam passes through a central hole 3·gap_px wide. Each module
    is then turned about its own centre by random angles within ±rotation_deg
    about its normal and ±tilt_deg about the lab x and y axes, and shifted
    along z by up to ±0.2 mm.
    """
    from dxtbx.model import Detector

    det = Detector()
    root = det.hierarchy()
    px = pixel_size
    hole = 1.5 * gap_px * px
    for q in range(4):
        Rq = rotation_about((0, 0, 1), 90.0 * q)
        for m in range(modules_per_quadrant):
            # module centre and axes in quadrant 0 before its own small rotations
            y_top = hole + (modules_per_quadrant - m) * n_slow * px + (modules_per_quadrant - m - 1) * gap_px * px
            centre = np.array([hole + n_fast * px / 2, y_top - n_slow * px / 2, -distance])
            ax, ay = rng.uniform(-tilt_deg, tilt_deg, 2)
            az = rng.uniform(-rotation_deg, rotation_deg)
            dz = rng.uniform(-0.2, 0.2)
            R = Rq @ rotation_about((1, 0, 0), ax) @ rotation_about((0, 1, 0), ay) @ rotation_about((0, 0, 1), az)
            fast = R @ np.array([1.0, 0.0, 0.0])
            slow = R @ np.array([0.0, -1.0, 0.0])
            c = Rq @ centre + np.array([0.0, 0.0, dz])
            _add_sensor_panel(root, f"quadrant_{q}_module_{m}", c, fast, slow, n_fast, n_slow,
                              px, trusted_range, material, thickness, wavelength)
    return det


def _add_sensor_panel(root, name, centre, fast, slow, n_fast, n_slow, pixel_size, trusted_range,
                      material, thickness, wavelength):
    """Add one SENSOR_PAD panel centred at ``centre`` (mm, lab) with unit fast/slow axes."""
    origin = centre - fast * n_fast * pixel_size / 2 - slow * n_slow * pixel_size / 2
    p = root.add_panel()
    p.set_type("SENSOR_PAD")
    p.set_name(name)
    p.set_local_frame(tuple(fast), tuple(slow), tuple(origin))
    p.set_pixel_size((pixel_size, pixel_size))
    p.set_image_size((n_fast, n_slow))
    p.set_trusted_range(tuple(trusted_range))
    if material:
        p.set_material(material)
        p.set_thickness(thickness)
        p.set_mu(sensor_mu(material, wavelength))


def detector_description(detector, beam) -> dict:
    panels = []
    for p in detector:
        panels.append(
            {
                "name": p.get_name(),
                "origin_mm": list(p.get_origin()),
                "fast_axis": list(p.get_fast_axis()),
                "slow_axis": list(p.get_slow_axis()),
                "pixel_size_mm": list(p.get_pixel_size()),
                "image_size": list(p.get_image_size()),
                "trusted_range": list(p.get_trusted_range()),
                "material": p.get_material(),
                "thickness_mm": p.get_thickness(),
                "mu_per_mm": p.get_mu(),
                "px_mm_strategy": type(p.get_px_mm_strategy()).__name__,
            }
        )
    return {
        "panels": panels,
        "beam": {
            "wavelength_A": beam.get_wavelength(),
            "s0": list(beam.get_s0()),
            "polarization_fraction": beam.get_polarization_fraction(),
            "polarization_normal": list(beam.get_polarization_normal()),
        },
    }


# --------------------------------------------------------------------------- pixel defects


def pilatus_module_gaps(shape, module=(195, 487), gap=(17, 7)) -> np.ndarray:
    """True on inter-module gap pixels of a Pilatus-like layout (slow, fast)."""
    s = np.arange(shape[0]) % (module[0] + gap[0]) >= module[0]
    f = np.arange(shape[1]) % (module[1] + gap[1]) >= module[1]
    return s[:, None] | f[None, :]


def beamstop_shadow(lab: np.ndarray, radius_mm: float, arm_width_mm: float) -> np.ndarray:
    """True in the shadow of a disc + arm (towards +x) beamstop.

    Defined on the lab x, y (mm) of each pixel centre (beam along −z), so it
    works for any panel layout.
    """
    x, y = lab[..., 0], lab[..., 1]
    disc = x * x + y * y < radius_mm**2
    arm = (x > 0) & (np.abs(y) < arm_width_mm / 2)
    return disc | arm


# --------------------------------------------------------------------------- rotation


def make_goniometer(axis):
    """Single-axis goniometer about ``axis`` (lab frame; no fixed or setting rotation)."""
    from dxtbx.model import GoniometerFactory

    axis = np.asarray(axis, dtype=np.float64)
    return GoniometerFactory.known_axis(tuple(axis / np.linalg.norm(axis)))


def make_scan(first_image: int, n_images: int, phi_start_deg: float, oscillation_deg: float, exposure_time: float):
    """dxtbx Scan: image numbers first_image … first_image + n − 1, φ from phi_start."""
    from dxtbx.model import ScanFactory

    return ScanFactory.make_scan(
        (int(first_image), int(first_image) + int(n_images) - 1),
        float(exposure_time),
        (float(phi_start_deg), float(oscillation_deg)),
        {i: 0.0 for i in range(int(first_image), int(first_image) + int(n_images))},
        deg=True,
    )
