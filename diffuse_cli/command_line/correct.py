"""Apply per-pixel intensity corrections to extracted diffuse pixels.

diffuse.correct reads the per-still pixel files written by diffuse.extract
(``extracted/<still>.npz``, schema diffuse.extract/3, with their
``geometry_<key>.npz``) and the experiments they came from, and writes:

- ``corrected/factors_<key>.npz``: once per detector (and beam direction;
  not per wavelength): the direction-only multipliers (solid angle per
  microsteradian, polarization), the path lengths of the wavelength-dependent
  ones (air, sensor efficiency, optional Kapton) and every multiplier with
  their product ``total`` at a reference wavelength, with the pixel
  directions ŝ1 needed to rebuild q;
- ``corrected/<still>.npz`` (schema diffuse.correct/3, a few kB): the
  per-still scalars (normalisation, wavelength and its attenuation
  coefficients, gain, background) and a reference to the extracted file
  whose raw counts they apply to (relative path plus content fingerprint).
  ``I = (counts − background)·total/(gain·N)`` and its Poisson σ are rebuilt
  from the two (``diffuse_cli.corrections.load_observations``), so keep
  ``extracted/`` next to ``corrected/``;
- ``corrected/background.npz`` when a background map is made from
  background images; ``corrected/summary.json`` (one row per still).

N is the exposure time when the still has one (I in photons per
microsteradian per second); an XFEL shot is normalised per shot, never per
second: by its incident photons / 1e12 (normalisation.table or the header's
flux), else by 1 with the per-shot scale left to diffuse.merge. Each still
records which. No rotation Lorentz factor is applied. Formulas:
docs/corrections.md; files: docs/correct.md.

A rerun redoes a still exactly when its inputs (the extract's content, its
experiment, its detector's factors, the background map) or the parameters
that change it differ from those its output records (the provenance key,
diffuse_cli.provenance); with no change it does nothing. Corrected stills
whose extract is no longer among the inputs are removed (output.stale=keep
only reports them); ``overwrite=True`` redoes all. A still whose extract
cannot be read is recorded in summary.json and skipped.

Examples::

  diffuse.correct processed/combined.expt extracted/

  diffuse.correct combined.expt extracted/ nproc=4 output.directory=corrected

  diffuse.correct combined.expt extracted/ gain=2.1 sensor.efficiency=on \\
      sensor.material=Si sensor.thickness_mm=0.45

  diffuse.correct combined.expt extracted/ background.mode=map \\
      background.images=dark_0001.cbf background.images=dark_0002.cbf

  diffuse.correct combined.expt extracted/ kapton.apply=True air.apply=False

  diffuse.correct combined.expt extracted/ normalisation.table=pulse_energies.csv
"""

from __future__ import annotations

import logging
import os

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import dials_compat

dials_compat.defer_imports()  # before DIALS is imported: sklearn and pandas only when used

from diffuse_cli import correct_driver, program

logger = logging.getLogger("diffuse.correct")

phil_scope = program.parse_phil(
    """
input {
  extracted = None
    .type = path
    .multiple = True
    .help = "diffuse.extract output: a directory (every <still>.npz in it) or "
            "per-still .npz files. Directories and .npz files given as plain "
            "arguments land here."
}
solid_angle {
  exact = False
    .type = bool
    .help = "Integrate the solid angle over each pixel rectangle instead of "
            "A·cosψ/r² (relative difference ~(a/2r)², 1e-6 for 172 µm at 100 mm)."
    .expert_level = 1
}
polarization {
  apply = True
    .type = bool
    .help = "Divide by the polarization factor P (beam polarization normal and "
            "fraction from the experiments, DIALS convention)."
}
sensor {
  efficiency = *auto on off
    .type = choice
    .help = "Divide by the sensor absorption efficiency 1 − exp(−μt/cosψ). auto: "
            "when the panel has a thickness and mu or material (logged per "
            "detector); on: required (error otherwise); off: never."
  material = None
    .type = str
    .help = "Sensor material (e.g. Si, CdTe) overriding the panel's, for μ."
  thickness_mm = None
    .type = float(value_min=0)
    .help = "Sensor thickness (mm) overriding the panel's."
}
air {
  apply = True
    .type = bool
    .help = "Divide by the air transmission along sample-to-pixel paths."
  pressure_kpa = 101.325
    .type = float(value_min=0)
  temperature_k = 293.15
    .type = float(value_min=0)
}
kapton {
  apply = False
    .type = bool
    .help = "Divide by the transmission through Kapton tape (XFEL tape drives); "
            "DIALS fuller_kapton model, 6-13 keV."
  height_above_kapton_mm = 0.02
    .type = float
  thickness_mm = 0.05
    .type = float
  half_width_mm = 1.5875
    .type = float
  rotation_angle_deg = 1.15
    .type = float
}
gain = 1.0
  .type = float(value_min=0)
  .help = "Detector gain, ADU per photon. var(counts) = gain·counts."
normalisation {
  mode = *auto exposure_time incident_photons unit
    .type = choice
    .help = "What each still's counts are divided by (docs/corrections.md). "
            "auto: its exposure time when it has one (I per second); an XFEL "
            "shot has none and is normalised per shot, never per second: by "
            "its incident photons (normalisation.table, else the beam "
            "model's flux from the header) in units of 1e12, else by 1 "
            "(the per-shot scale is left to diffuse.merge). The other "
            "choices force one rule for every still."
  table = None
    .type = path
    .help = "CSV of per-shot incident photons or pulse energies: a header "
            "'image,photons' or 'image,pulse_energy_mj', then one row per "
            "shot; image is the image file name (without directory) or "
            "name:index for multi-image files."
}
background {
  mode = *none constant map
    .type = choice
    .help = "none; constant: subtract background.constant ADU from every pixel; "
            "map: subtract the mean rate of background.images times the "
            "still's exposure time."
  constant = 0.0
    .type = float
    .help = "ADU per pixel per image, for mode=constant."
  constant_sigma = 0.0
    .type = float(value_min=0)
    .help = "Uncertainty (ADU) of background.constant."
  images = None
    .type = path
    .multiple = True
    .help = "Background (no-sample) images for mode=map."
  exposure_time = None
    .type = float(value_min=0)
    .help = "Exposure time (s) of the background images, if their headers lack it."
}
overwrite = False
  .type = bool
  .help = "Redo stills whose outputs are up to date."
output {
  directory = corrected
    .type = path
  stale = *remove keep
    .type = choice
    .help = "Corrected stills in the output directory whose extract is no "
            "longer among the inputs: remove them, or keep them (reported)."
}
""",
    program="correct",
)


def _split_args(args):
    """Turn plain directory / .npz arguments into input.extracted=... ."""
    return program.plain_args_to_phil(args, [(lambda a: os.path.isdir(a) or a.endswith(".npz"), "input.extracted")])


@program.entry_point("correct")
def run(args=None, phil=phil_scope):
    from dials.util.options import flatten_experiments

    usage = "diffuse.correct combined.expt extracted/ [options]"
    parser = program.ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=True,
        check_format=False,
        epilog=__doc__,
        require_crystals=True,
    )
    raw = list(args) if args is not None else None
    import sys

    arg_list = _split_args(raw if raw is not None else sys.argv[1:])
    params, options = parser.parse_args(arg_list)
    program.configure_logging("correct", params, options)
    program.log_diff_phil(parser)

    experiments = flatten_experiments(params.input.experiments)
    # the summary rows for Python callers; None for the console script,
    # whose return value becomes the exit status
    return correct_driver.run_correct(params, experiments, return_rows=args is not None)
