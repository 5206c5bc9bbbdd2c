"""The simulator's attenuation tables against the pipeline's, per pixel (test helper).

The simulator takes μ from xraylib, the pipeline from cctbx's NIST tables
(the panel μ dxtbx reads, air from its mass attenuation). They differ by
about 1 % for air and 0.1 % for Si (test_simulate.py::test_attenuation_tables_agree
holds them within 2 %). At 200 mm of air and a 450 µm Si sensor that moves a
corrected intensity by about 1e-3, which per-pixel truth tests at that level
must take into account rather than absorb in their tolerance.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli import corrections


def table_ratio(truth: dict, panel, s1: np.ndarray, lab_mm: np.ndarray, wavelength: float) -> np.ndarray:
    """(η T_air) with the simulator's μ over (η T_air) with the pipeline's, per pixel.

    The pipeline's corrected intensity of a simulated pixel is I_true times
    this ratio (counts carry the simulator's factors, the pipeline divides by
    its own). ``truth``: the simulator's truth.json; ``s1``, ``lab_mm``: (..., 3).
    """
    air = truth["air"]
    mu_air = corrections.air_mu(wavelength, air["pressure_kpa"], air["temperature_k"])
    ratio = np.exp(-(air["mu_per_mm_xraylib"] - mu_air) * np.linalg.norm(lab_mm, axis=-1))
    sensor = truth["sensor"]
    if sensor["material"]:
        thickness = sensor["thickness_mm"]
        ratio *= (corrections.sensor_efficiency(panel, s1, wavelength, mu=sensor["mu_per_mm_xraylib"],
                                                thickness_mm=thickness)
                  / corrections.sensor_efficiency(panel, s1, wavelength,
                                                  mu=corrections.sensor_mu(panel, wavelength),
                                                  thickness_mm=thickness))
    return ratio
