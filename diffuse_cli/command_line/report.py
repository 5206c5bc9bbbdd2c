"""One self-contained HTML report of a whole diffuse run.

Give it the run's folder (the working directory of the run: the step
folders are found inside it by what they hold), or any of the step folders
(the others are found from the provenance the steps record: run logs,
corrected stills' extract files, the Bragg-mask summary's images). It writes
one HTML file with every step's inputs and parameters, stills_process hit
and indexing rate, RMSD, unit-cell spread and partiality, the masks, the
corrections and their ranges, merge's scales, CC½ / anisotropic CC½ /
Friedel CC, completeness and multiplicity per shell, the absolute-scale fit
and slices, the azimuthal profiles and fits, and the analysis programs'
outputs. plotly.js and the pictures are embedded: the file opens without
network access. A step not run is shown as "not run". See docs/report.md.

Examples::

  diffuse.report demo_output/

  diffuse.report processed/ bragg_masks/ merged/ azimuthal_fit/ output.html=run1.html

  diffuse.report . embed_images=False output.html=small_report.html
"""

from __future__ import annotations

import logging
import os
import sys
import time

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli import program

logger = logging.getLogger("diffuse.report")

phil_scope = program.parse_phil(
    """
input {
  folder = None
    .type = path
    .multiple = True
    .help = "A run folder or step folders (plain arguments). Files given stand"
            "for the folder they are in."
}
embed_images = True
  .type = bool
  .help = "Embed the PNG pictures the steps wrote (masks overlay, slices, fits)."
max_image_kb = 2000
  .type = float(value_min=0)
  .help = "Pictures larger than this (kB) are named, not embedded."
read_reflections = True
  .type = bool
  .help = "Read the partiality column of stills_process's combined.refl for a"
          "histogram (otherwise only the per-image mean is plotted)."
output {
  html = diffuse.report.html
    .type = path
    .help = "The report file."
}
""",
    program="report",
)


def _split_args(args):
    """Plain arguments (folders or files in them) become input.folder=... ;
    the level after ``-a``/``-e`` (``-c -a 2``) stays a flag's value."""
    args = list(args)
    levels = {i + 1 for i, a in enumerate(args) if a in ("-a", "-e")}
    return [a if i in levels else program.plain_args_to_phil([a], [(lambda _: True, "input.folder")])[0]
            for i, a in enumerate(args)]


@program.entry_point("report")
def run(args=None, phil=phil_scope):
    from diffuse_cli.report import find_run, write_report

    parser = program.ArgumentParser(
        usage="diffuse.report run_folder/ [step folders] [options]",
        phil=phil,
        epilog=__doc__,
    )
    raw = list(args) if args is not None else sys.argv[1:]
    params, options = parser.parse_args(_split_args(raw))
    program.check_output_path(params.output.html, "output.html", directory=False)
    program.configure_logging("report", params, options)
    program.log_diff_phil(parser)
    folders = params.input.folder or ["."]
    for f in folders:
        if not os.path.exists(f):
            raise Sorry(f"File not found: {f}")
    start = time.perf_counter()
    run_info = find_run(folders)
    if not any(run_info.folders.values()):
        raise Sorry(f"{', '.join(folders)}: no diffuse step outputs found (summary.json, "
                    "stills_process_summary.json, merged.npz, fits.csv, truth.json)")
    result = write_report(run_info, params.output.html, embed_images=params.embed_images,
                          max_image_kb=params.max_image_kb, read_reflections=params.read_reflections)
    sections = result["sections"]
    for s in sections:
        logger.info("%-16s %-8s %s", s.key, s.status, ", ".join(s.folders))
    n_plots = sum(b["kind"] == "plot" for s in sections for b in s.blocks)
    n_images = sum(b["kind"] == "image" for s in sections for b in s.blocks)
    logger.info("Wrote %s (%.1f MB, %d plots, %d pictures) in %.1f s", params.output.html,
                result["bytes"] / 1e6, n_plots, n_images, time.perf_counter() - start)
    return result if args is not None else None
