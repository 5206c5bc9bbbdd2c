"""Radial and azimuthal profiles of diffraction images, with peak fits.

diffuse.azimuthal_fit bins the pixels of every image in the experiments
(any DIALS-readable format, single or multi-panel) into:

- a radial profile I(|q|), the full circle and optionally azimuthal sectors;
- azimuthal profiles I(χ) in a band of |q| around each requested q= (or d=,
  d_star=) value, or around reflections hkl= (|q| from the crystal model);

fits them (pseudo-Voigt + linear background on radial profiles in
fit.radial_range; pseudo-Voigt and Maier–Saupe on azimuthal profiles, with the
order parameter S = <P2(cos θ)>), and writes per-image profile CSVs, SasView
1D files, fit plots, q-space maps, one tidy CSV of all fits and summary plots
of peak position, width and S against a series variable (field, time,
temperature...) read from image headers, file names or a CSV file.

Units: q= and every q_inv_angstrom column are 4π sinθ/λ = 2π/d (Å⁻¹), as in
SAXS and pyFAI's q_A^-1. d_star= is DIALS' |q| = 1/d (Å⁻¹); d= is in Å.
χ = atan2(s1_y, s1_x) in the DIALS laboratory frame (degrees; pyFAI's chi is
its mirror image). A mask is a DIALS mask file (pickled tuple of flex.bool,
True = usable) or, with a .poni, EDF/HDF5/.npy (nonzero = masked, as pyFAI).
SAXS/WAXS images (EDF, HDF5, fabio) need no dials.import: give a pyFAI .poni.
Pixels outside the detector's trusted range are never used.

Pixels are corrected by default (corrections.apply=True: solid angle,
polarization, sensor efficiency, air, exposure time; photons/µsr/s), so the
polarization modulation is not read as order. S is reported only where the
anisotropy is significant (|S_data|/σ ≥ fit.significance); otherwise S = 0
with "anisotropy not significant". A blank band is a failed fit.

A merged map from diffuse.merge (merged.npz) gives I(|q|) of the 3D data.

Examples::

  # full radial profile of every image
  diffuse.azimuthal_fit imported.expt

  # azimuthal profile of the ring at q = 1.8 Å⁻¹ (2π/d), with a mask
  diffuse.azimuthal_fit imported.expt mask.pickle q=1.8 output.directory=az

  # the same ring given as d = 3.49 Å, narrower band, Maier–Saupe only
  diffuse.azimuthal_fit imported.expt d=3.49 q_tolerance=0.01 \\
      fit.azimuthal_models=maier_saupe

  # azimuthal profile through the 1 1 0 reflection, radial sectors
  diffuse.azimuthal_fit indexed.expt hkl=1,1,0 \\
      radial.sector=0,30 radial.sector=90,30

  # a field series: value from the file name, fit the water ring radially
  diffuse.azimuthal_fit series.expt q=1.8 'series.filename_pattern=_(\\d+)mT' \\
      series.name=field_mT fit.radial_range=1.5,2.4

  # temperature from a CSV (columns image,temperature), time from headers
  diffuse.azimuthal_fit series.expt q=1.8 series.csv=temps.csv series.name=temperature
  diffuse.azimuthal_fit series.expt q=1.8 series.header_key=timestamp series.name=time_s

  # radial profile of a merged 3D map
  diffuse.azimuthal_fit merged.npz

  # SAXS/WAXS: EDF images, pyFAI geometry, EDF mask (nonzero = masked), field from the headers
  diffuse.azimuthal_fit img_*.edf calib.poni mask.edf q=0.05 series.header_key=Field series.name=field_mT
"""

from __future__ import annotations

import sys

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import program
from diffuse_cli.saxs_inputs import INPUT_PHIL, route_args

phil_scope = program.parse_phil(
    """
input {
  mask = None
    .type = path
    .help = "DIALS mask (pickled tuple of flex.bool, True = usable) applied to "
            "every image. A .pickle or .mask file given as a plain argument lands here. "
            "With a .poni also EDF/HDF5/.npy (see input.saxs.mask_nonzero_is_masked)."
  merged = None
    .type = path
    .help = "diffuse.merge merged.npz: write the radial profile of the 3D map. "
            "A .npz file given as a plain argument lands here."
@INPUT_PHIL@}
q = None
  .type = floats(value_min=0)
  .help = "|q| values (Å⁻¹, q_inv_angstrom = 4π sinθ/λ = 2π/d) for azimuthal profiles."
d_star = None
  .type = floats(value_min=0)
  .help = "The same, given as d* = 1/d (Å⁻¹, DIALS convention)."
d = None
  .type = floats(value_min=0)
  .help = "The same, given as d spacings (Å)."
hkl = None
  .type = ints(size=3)
  .multiple = True
  .help = "Reflections for azimuthal profiles; |q| from the crystal model, else from input.cif."
q_tolerance = 0.02
  .type = float(value_min=0)
  .help = "Half width of the |q| band of an azimuthal profile (Å⁻¹, q_inv_angstrom)."
radial {
  n_bins = 500
    .type = int(value_min=2)
  q_min = None
    .type = float
    .help = "Å⁻¹ (q_inv_angstrom). Default: the smallest |q| of a usable pixel."
  q_max = None
    .type = float
    .help = "Å⁻¹ (q_inv_angstrom). Default: the largest |q| of a usable pixel."
  sector = None
    .type = floats(size=2)
    .multiple = True
    .help = "Azimuthal sector centre,width (degrees; χ in the DIALS lab frame, "
            "full width). Repeat for more sectors; each wraps across ±180°."
}
azimuthal {
  n_bins = 180
    .type = int(value_min=8)
    .help = "χ bins over the full circle."
}
corrections {
  apply = True
    .type = bool
    .help = "Multiply each pixel by diffuse.correct's multipliers (solid angle per"
            "microsteradian, polarization, sensor efficiency, air; docs/corrections.md)"
            "and divide by the exposure time: profiles in photons/µsr/s instead of"
            "raw counts per pixel. Poisson errors follow the counts. False leaves the"
            "polarization modulation in I(χ), which biases S. The choice is in the"
            "corrections column of fits.csv and in the log."
}
error_model = *poisson spread
  .type = choice
  .help = "poisson: sigma(mean) = sqrt(sum)/n (raw counts); spread: std/sqrt(n) "
          "of the pixels in a bin (for data that are not counts)."
fit {
  azimuthal_models = *pseudo_voigt *maier_saupe
    .type = choice(multi=True)
    .help = "Models fitted to every azimuthal profile."
  pair = True
    .type = bool
    .help = "Pseudo-Voigt in χ has a partner peak 180° away (apolar order)."
  centre = None
    .type = float
    .help = "Fix the Maier-Saupe director χ0 (degrees) instead of fitting it."
  radial_range = None
    .type = floats(size=2)
    .help = "Fit a pseudo-Voigt + linear background to every radial profile "
            "in this q range (Å⁻¹, q_inv_angstrom)."
  smooth = 5
    .type = int(value_min=0)
    .help = "Moving-average window (bins) for starting values only; fits and "
            "R² always use the unsmoothed profile."
  significance = 4.0
    .type = float(value_min=0)
    .help = "Anisotropy is significant when z = |S_data|/sigma(S_data) >= this"
            "(S_data: model-free <P2> of I(chi) about the fitted director; sigma"
            "propagated from the bin errors, times sqrt(max(1, chi2_nu)) about a"
            "Fourier series with harmonics 0-8; docs/azimuthal_fit.md)."
            "Otherwise S = 0, S_error = nan, significant=false."
}
series {
  name = series
    .type = str
    .help = "Name of the series variable (CSV column and plot label)."
  header_key = None
    .type = str
    .help = "Take the value from the image header line with this key (text "
            "headers: CBF, SMV...; EDF header keys; HDF5 datasets or attributes). Special keys: timestamp (ISO date in the "
            "header, seconds after the first image), exposure_time, wavelength, distance."
  filename_pattern = None
    .type = str
    .help = "Regular expression with one group, matched against the file name; "
            "the group is the value (e.g. '_(\\\\d+)mT')."
  csv = None
    .type = path
    .help = "CSV with columns image,<value>: image is the file name (with or "
            "without directory and extension)."
}
maps {
  enable = True
    .type = bool
    .help = "Write q-space pictures (detector projected to (q_x, q_y), and the "
            "(|q|, χ) cake) as PNG, with the arrays as .npz."
  n_bins = 500
    .type = int(value_min=16)
    .help = "Pixels per side of the (q_x, q_y) map; |q| bins of the cake."
  rings = None
    .type = floats(value_min=0)
    .help = "Draw rings at these |q| (Å⁻¹, q_inv_angstrom). Default: the q= values."
  fill_centrosymmetric = False
    .type = bool
    .help = "Display only: fill masked pixels from their centrosymmetric partner "
            "(same |q|, χ + 180°). The .npz keeps the unfilled arrays too."
  field_direction = 1,0,0
    .type = floats(size=3)
    .help = "Field direction (DIALS lab frame) of the (q∥, q⊥) map: q∥ = q·b, "
            "q⊥ along b × beam (docs/azimuthal_fit.md)."
}
output {
  directory = azimuthal_fit
    .type = path
  sasview = True
    .type = bool
    .help = "Also write radial profiles as 3-column text (q, I, sigma) for SasView."
  plots = True
    .type = bool
    .help = "Per-image profile/fit plots and summary plots."
}
""".replace("@INPUT_PHIL@", INPUT_PHIL),
    program="azimuthal_fit",
)

_MASK_EXT = (".pickle", ".pkl", ".mask")


def _split_args(args):
    """Turn plain .npz / mask arguments into input.merged= / input.mask=."""
    args = program.plain_args_to_phil(args, [
        (lambda a: a.lower().endswith(".npz"), "input.merged"),
        (lambda a: a.lower().endswith(_MASK_EXT), "input.mask"),
    ])
    return route_args(args)  # .poni, .cif, EDF/HDF5 images and masks (saxs_inputs)


@program.entry_point("azimuthal_fit")
def run(args=None, phil=phil_scope):
    from dials.util.options import flatten_experiments

    from diffuse_cli import azimuthal_driver

    usage = "diffuse.azimuthal_fit imported.expt [mask.pickle] [merged.npz] [q=1.8] [options]"
    parser = program.ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=__doc__,
    )
    arg_list = _split_args(list(args) if args is not None else sys.argv[1:])
    params, options = parser.parse_args(arg_list)
    program.configure_logging("azimuthal_fit", params, options)
    program.log_diff_phil(parser)

    experiments = flatten_experiments(params.input.experiments)
    azimuthal_driver.run_azimuthal_fit(experiments, params)
