"""Make pixel masks for diffuse scattering: static, hot/dead and per-still Bragg.

Writes a static mask (DIALS tools masking: trusted range, panel gaps, border,
untrusted regions such as a beamstop, resolution limits and ranges, ice
rings, plus hot and dead pixels found across the stills) and, per still, a
total mask = static & trusted range of that image & not Bragg. All masks are
DIALS mask files (pickled tuple of flex.bool, one per panel, True = usable
for diffuse), so dials.image_viewer and dials.apply_mask accept them.

Bragg pixels are found either from the still's crystal model
(method=predicted, default: every pixel near an allowed lattice point, with
the region size estimated from the still's integrated reflections, which also
masks weak peaks never observed; rotation frames: a Gaussian peak model in
fractional-hkl space fitted to the sweep's spots) or from the reflection shoeboxes
(method=shoebox: Foreground/Strong pixels; run stills_process with
integration.debug.output=True integration.debug.separate_files=False to keep
them). See docs/bragg_mask.md.

Examples::

  diffuse.bragg_mask combined.expt combined.refl

  diffuse.bragg_mask combined.expt combined.refl \\
    untrusted.circle=1230,1290,40 d_min=1.6 ice_rings.filter=True

  diffuse.bragg_mask combined.expt combined.refl predicted.radius_px=4 \\
    predicted.excitation_factor=2 output.png.still=0

  diffuse.bragg_mask combined.expt combined.refl method=shoebox nproc=2
"""

from __future__ import annotations

import logging
import os

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli import dials_compat

dials_compat.defer_imports()  # before DIALS is imported: sklearn and pandas only when used

from libtbx.utils import Sorry

from diffuse_cli import program

logger = logging.getLogger("diffuse.bragg_mask")

phil_scope = program.parse_phil(
    """
include scope dials.util.masking.phil_scope

method = *predicted shoebox
  .type = choice
  .help = "predicted: mask around every allowed lattice point from the crystal"
          "model (catches unobserved weak peaks). shoebox: mask the Foreground"
          "and Strong pixels of the reflection shoeboxes."

predicted {
  shape = *cylinder ellipsoid
    .type = choice
    .help = "Region around each lattice point in the Ewald frame: cylinder"
            "(|dq_normal| <= excitation and |dq_tangential| <= radius) or"
            "ellipsoid ((dq_n/excitation)^2 + (dq_t/radius)^2 <= 1)."
  excitation = None
    .type = float(value_min=0)
    .help = "Half-width along the Ewald-sphere normal, inverse Angstrom."
            "Default: excitation_factor times excitation_quantile of the"
            "integrated reflections' distance from the sphere."
  excitation_factor = 1.0
    .type = float(value_min=0)
  excitation_quantile = 1.0
    .type = float(value_min=0, value_max=1)
    .help = "Quantile of the integrated reflections' |excitation error| that"
            "excitation_factor multiplies (1.0: the largest)."
  radius = None
    .type = float(value_min=0)
    .help = "Tangential radius, inverse Angstrom. Default: estimated."
  radius_px = None
    .type = float(value_min=0)
    .help = "Tangential radius in pixels (converted with pixel size /"
            "(distance * wavelength)); used when radius is not set."
  n_sigma_b = 2.5
    .type = float(value_min=0)
    .help = "Spot radius in units of the profile model's sigma_b, added in"
            "quadrature to a percentile of the centroid residuals."
  peak_model = fitted mosaic *spots
    .type = choice
    .help = "Rotation frames. spots (default): each lattice point's own"
            "predicted spot on the frame (its crossing, rocking fraction and"
            "integrated intensity) and each strong spot the frame shows, masked"
            "where the spot exceeds spots.background_fraction of the local"
            "background. fitted: a Gaussian peak in fractional-hkl offset"
            "space fitted to the sweep's strong spots (mdx2's model), masked"
            "within fit.n_sigma of every allowed lattice point. mosaic: a lattice"
            "point is masked while it crosses the Ewald sphere within the frame"
            "widened by n_sigma_m times the profile's sigma_m, within radius."
  spots {
    background_fraction = 0.1
      .type = float(value_min=0)
      .help = "peak_model=spots: a pixel is Bragg where the predicted or"
              "observed spot exceeds this fraction of the local background."
    n_sigma_i = 3.0
      .type = float(value_min=0)
      .help = "peak_model=spots: a reflection's counts are taken as"
              "(max(I, 0) + n_sigma_i sigma(I)) / partiality."
    unknown_quantile = 0.9
      .type = float(value_min=0, value_max=1)
      .help = "peak_model=spots: a lattice point DIALS did not integrate takes"
              "this quantile of the reflections' counts in its resolution shell."
  }
  fit {
    n_sigma = None
      .type = float(value_min=0)
      .help = "Mask radius of the fitted peak in its sigmas. Default: where the"
              "median observed spot falls to background_fraction of the local"
              "background, sqrt(2 ln(peak/background / background_fraction))."
    background_fraction = 0.1
      .type = float(value_min=0)
      .help = "Peak excess, as a fraction of the local diffuse background, at"
              "the edge of the mask of the median observed spot."
    n_images = 10
      .type = int(value_min=1)
      .help = "Frames (evenly spaced) of each sweep whose spots are fitted."
    background_size = 9
      .type = int(value_min=3)
      .help = "Side (pixels) of the median filter giving the local background."
    outlier_sigma = 3.0
      .type = float(value_min=0)
      .help = "Spot pixels beyond this many sigmas of a first fit are dropped"
              "before the second (final) fit."
    min_spots = 20
      .type = int(value_min=1)
  }
  n_sigma_m = 3.0
    .type = float(value_min=0)
    .help = "Rotation frames, peak_model=mosaic: a lattice point is masked on a"
            "frame when it crosses the Ewald sphere within the frame's rotation"
            "range widened by n_sigma_m times the profile model's mosaicity"
            "sigma_m on each side."
  residual_percentile = 95
    .type = float(value_min=0, value_max=100)
    .help = "Percentile of the tangential centroid residuals (observed minus"
            "predicted) added in quadrature to the spot radius."
  min_radius_px = 3.5
    .type = float(value_min=0)
    .help = "Lower limit on the estimated radius, in pixels."
  min_i_over_sigma = 3.0
    .type = float
    .help = "Reflections used to estimate the size."
  min_reflections = 20
    .type = int(value_min=1)
}

shoebox {
  codes = *foreground *strong
    .type = choice(multi=True)
    .help = "Shoebox mask codes that make a pixel Bragg."
}

strong_pixels {
  enable = True
    .type = bool
    .help = "Also mask the spots found in each image by DIALS's dispersion"
            "threshold (indexed or not: catches lattices the indexer missed)."
  n_sigma_b = 6
    .type = float(value_min=0)
  n_sigma_s = 3
    .type = float(value_min=0)
  global_threshold = 0
    .type = float(value_min=0)
  min_local = 2
    .type = int(value_min=0)
  gain = None
    .type = float(value_min=0)
    .help = "Detector gain (counts per photon), as spotfinder.threshold.dispersion.gain."
  min_spot_size = 3
    .type = int(value_min=1)
    .help = "Connected strong groups smaller than this (pixels) are noise."
  dilation_px = 3
    .type = int(value_min=0)
    .help = "Grow each strong spot by this many pixels."
}

dynamic {
  enable = True
    .type = bool
    .help = "Find hot and dead pixels across the stills."
  n_images = 20
    .type = int(value_min=1)
    .help = "How many stills (evenly spaced) to use."
  min_images = 3
    .type = int(value_min=2)
    .help = "Skip the dynamic mask with fewer stills than this (a Bragg peak"
            "on every image used would look like a hot pixel)."
  hot_n_sigma = 10
    .type = float(value_min=0)
  hot_min_excess = 5
    .type = float(value_min=0)
    .help = "Counts above the local median a hot pixel must exceed (in at least"
            "hot_fraction of the images)."
  hot_fraction = 0.75
    .type = float(value_min=0, value_max=1)
    .help = "A pixel is hot when it is above its neighbourhood's Poisson range"
            "in at least this fraction of the images used (and in at least"
            "min_images of them): a Bragg peak moves from still to still and"
            "lasts a few frames of a sweep, a hot pixel stays."
  dead_min_expected = 20
    .type = float(value_min=0)
    .help = "A pixel that never counts is dead when this many counts were expected."
  filter_size = 5
    .type = int(value_min=3)
}

output {
  directory = bragg_masks
    .type = path
    .help = "Per-still total masks <still>.mask and summary.json go here."
  static_mask = static.mask
    .type = path
    .help = "Static mask file name, in the output directory."
  summary = None
    .type = path
    .help = "Default: <directory>/summary.json"
  overwrite = False
    .type = bool
    .help = "Recompute every mask, even those whose inputs and parameters are unchanged."
  stale = *remove keep
    .type = choice
    .help = "Masks in the output directory of images no longer among the inputs:"
            "remove them, or keep them (reported)."
  png {
    still = None
      .type = int
      .help = "Index (in the summary) of a still to draw the mask over."
    filename = bragg_mask_%d.png
      .type = str
    region = None
      .type = ints(size=4)
      .help = "Zoom inset x0,x1,y0,y1 (pixels, first panel drawn)."
  }
}
""",
    program="bragg_mask",
)


@program.entry_point("bragg_mask")
def run(args=None, phil=phil_scope):
    import sys

    from dials.array_family import flex
    from dials.util.options import reflections_and_experiments_from_files
    from dials.util.phil import FilenameDataWrapper

    from diffuse_cli import masking
    from diffuse_cli.formats.reflections import read_without_columns

    # .refl files given by name are read here without their shoeboxes, which a predicted mask
    # never reads (most of a .refl that keeps them: diffuse_cli.formats.reflections); a file
    # that does not read so goes to DIALS's parser, whose reason the user sees
    args = sys.argv[1:] if args is None else [str(a) for a in args]
    own = {}
    if not {"-h", "--help", "-c", "--show-config"} & set(args):
        for a in args:
            if a.endswith(".refl") and "=" not in a and os.path.isfile(a) and a not in own:
                table = read_without_columns(a, ("shoebox",))
                if table is not None:
                    own[a] = table
    if own and len(own) < len(args):
        args = [a for a in args if a not in own]
    else:
        own = {}
    parser = program.ArgumentParser(
        usage="diffuse.bragg_mask [options] combined.expt combined.refl",
        phil=phil,
        read_experiments=True,
        read_reflections=True,
        check_format=True,
        epilog=__doc__,
        require_crystals=True,
    )
    params, options = parser.parse_args(args)
    program.configure_logging("bragg_mask", params, options)
    program.log_diff_phil(parser)
    for name, table in own.items():
        if params.method == "shoebox":  # the shoeboxes are what it reads
            table = flex.reflection_table.from_file(name)
        params.input.reflections.append(FilenameDataWrapper(filename=name, data=table))
    reflections, experiments = reflections_and_experiments_from_files(
        params.input.reflections, params.input.experiments
    )
    if len(experiments) == 0:
        raise Sorry("No experiments given")
    if len(reflections) > 1:
        raise Sorry("Give one reflection file (combined.refl)")
    refl = reflections[0] if reflections else None
    if refl is None and params.method == "shoebox":
        raise Sorry("method=shoebox needs a reflection file with shoeboxes")
    if params.output.summary is None:
        params.output.summary = os.path.join(params.output.directory, "summary.json")
    refl_file = params.input.reflections[0].filename if reflections else "reflections"
    masking.run_bragg_mask(experiments, refl, params, reflection_file=refl_file)
