"""Extract the usable pixels of every still for diffuse scattering.

For each image: raw counts read through dxtbx, the total mask from
diffuse.bragg_mask (static & trusted & not Bragg), combined with the image's
trusted range, and the setting matrix A (q = A·hkl; for rotation data the
frame's goniometer rotation and scan-varying A). Per-pixel s1 is computed
once per detector + beam and cached in <directory>/geometry_<key>.npz; each
still's file <directory>/<still>.npz (schema diffuse.extract/1, see
docs/file_formats.md) keeps only what cannot be recomputed: mask bits, used
counts, A, exposure time. diffuse_cli.extraction.used_q / used_hkl /
used_d_star rebuild q, hkl and d* of the used pixels.

Stills already extracted are skipped unless output.overwrite=True.

Examples::

  diffuse.extract combined.expt masks.summary=bragg_masks/summary.json

  diffuse.extract combined.expt masks.summary=bragg_masks/summary.json nproc=4

  diffuse.extract combined.expt masks.static=static.mask output.directory=extracted_nobragg
"""

from __future__ import annotations

import logging

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli import program

logger = logging.getLogger("diffuse.extract")

phil_scope = program.parse_phil(
    """
masks {
  summary = None
    .type = path
    .help = "summary.json written by diffuse.bragg_mask (per-still total masks)."
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
    .help = "Re-extract stills whose output files are already complete."
}
""",
    program="extract",
)


@program.entry_point("extract")
def run(args=None, phil=phil_scope):
    from dials.util.options import flatten_experiments

    from diffuse_cli import extraction

    parser = program.ArgumentParser(
        usage="diffuse.extract [options] combined.expt masks.summary=bragg_masks/summary.json",
        phil=phil,
        read_experiments=True,
        check_format=True,
        epilog=__doc__,
    )
    params, options = parser.parse_args(args)
    program.configure_logging("extract", params, options)
    program.log_diff_phil(parser)
    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0:
        raise Sorry("No experiments given")
    if params.masks.summary is None:
        if params.masks.static is None:
            raise Sorry("Give masks.summary=bragg_masks/summary.json or masks.static=<mask file>")
        logger.warning("No Bragg masks given: Bragg peaks will be extracted with the diffuse signal")
    extraction.run_extract(experiments, params)
