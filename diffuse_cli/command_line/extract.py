"""Extract the usable pixels of every still for diffuse scattering.

For each image: raw counts read through dxtbx, the total mask from
diffuse.bragg_mask (static & trusted & not Bragg), combined with the image's
trusted range, and the setting matrix A (q = A·hkl; for rotation data the
frame's goniometer rotation and scan-varying A). Pixel directions ŝ1 are
computed once per detector and beam direction (not per wavelength) and
cached in <directory>/geometry_<key>.npz; each still's file
<directory>/<still>.npz (schema diffuse.extract/3, see docs/file_formats.md)
keeps only what cannot be recomputed: mask bits, used counts, A, its beam s0
(s1 = ŝ1/λ), exposure time (0 for XFEL shots, normalised per shot by
diffuse.correct). diffuse_cli.extraction.used_q / used_hkl /
used_d_star rebuild q, hkl and d* of the used pixels.

A rerun redoes exactly the stills whose inputs changed (image file, mask
file content, experiment models; see docs/file_formats.md, provenance), and
removes the extracts of stills no longer among the inputs
(output.stale=keep only reports them); output.overwrite=True redoes all.

Examples::

  diffuse.extract combined.expt masks.summary=bragg_masks/summary.json

  diffuse.extract combined.expt bragg_masks/ output.directory=extracted

  diffuse.extract combined.expt masks.summary=bragg_masks/summary.json nproc=4

  diffuse.extract combined.expt masks.static=static.mask output.directory=extracted_nobragg
"""

from __future__ import annotations

import logging
import os
import sys

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli import dials_compat

dials_compat.defer_imports()  # before DIALS is imported: sklearn and pandas only when used

from libtbx.utils import Sorry

from diffuse_cli import program

logger = logging.getLogger("diffuse.extract")

phil_scope = program.parse_phil(
    """
masks {
  summary = None
    .type = path
    .help = "summary.json written by diffuse.bragg_mask (per-still total masks), or"
            "its directory (also given as a plain argument: bragg_masks/)."
  static = None
    .type = path
    .help = "A DIALS mask file applied to every still (with summary: in addition;"
            "alone: no Bragg masking)."
}
output {
  directory = extracted
    .type = path
    .help = "Per-still <still>.npz, geometry_<key>.npz and summary.json go here."
  overwrite = False
    .type = bool
    .help = "Re-extract every still, even those whose inputs are unchanged."
  stale = *remove keep
    .type = choice
    .help = "Extract files in the output directory of stills no longer among"
            "the inputs: remove them, or keep them (reported)."
}
""",
    program="extract",
)


@program.entry_point("extract")
def run(args=None, phil=phil_scope):
    from dials.util.options import flatten_experiments

    from diffuse_cli import extract_driver

    parser = program.ArgumentParser(
        usage="diffuse.extract [options] combined.expt masks.summary=bragg_masks/summary.json",
        phil=phil,
        read_experiments=True,
        check_format=True,
        epilog=__doc__,
        require_crystals=True,
    )
    # a diffuse.bragg_mask output directory given plainly: its summary.json
    args = program.plain_args_to_phil(list(args) if args is not None else sys.argv[1:],
                                      [(os.path.isdir, "masks.summary")])
    params, options = parser.parse_args(args)
    if params.masks.summary is not None and os.path.isdir(params.masks.summary):
        summary = os.path.join(params.masks.summary, "summary.json")
        if not os.path.isfile(summary):
            raise Sorry(f"{params.masks.summary}: no summary.json of diffuse.bragg_mask in this directory; "
                        "give masks.summary=<file> or masks.static=<mask file>")
        params.masks.summary = summary
    program.configure_logging("extract", params, options)
    program.log_diff_phil(parser)
    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0:
        raise Sorry("No experiments given")
    if params.masks.summary is None:
        if params.masks.static is None:
            raise Sorry("Give masks.summary=bragg_masks/summary.json or masks.static=<mask file>")
        logger.warning("No Bragg masks given: Bragg peaks will be extracted with the diffuse signal")
    extract_driver.run_extract(experiments, params)
