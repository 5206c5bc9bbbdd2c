"""diffuse.report: one self-contained HTML page for a whole run.

:func:`gather.find_run` finds the output folder of each step (from the
folders given, their subfolders, and the provenance the steps record: the
run logs' ``output.directory``, corrected stills' ``extract_file_absolute``,
the Bragg-mask summary's ``image_path``), :mod:`sections` turns each step's
files into tables, plotly figures and embedded PNGs, and :mod:`render`
writes them into one HTML file with plotly.js embedded (no network access
needed to view it). A step whose folder is not found is shown as "not run".
"""

from __future__ import annotations

from diffuse_cli.report.gather import STEPS, find_run  # noqa: F401
from diffuse_cli.report.render import render_html  # noqa: F401
from diffuse_cli.report.sections import build_sections  # noqa: F401


def write_report(run, html_path, embed_images: bool = True, max_image_kb: float = 2000,
                 read_reflections: bool = True) -> dict:
    """Write the report of ``run`` (a :class:`gather.Run`, or folders to find it in) to ``html_path`` atomically.

    Returns ``{"run": Run, "sections": [Section], "bytes": size of the HTML}``.
    """
    import os

    from diffuse_cli import program

    if not hasattr(run, "folders"):
        run = find_run(run)
    sections = build_sections(run, embed_images=embed_images, max_image_kb=max_image_kb,
                              read_reflections=read_reflections)
    html = render_html(sections, run)
    program.write_text(html_path, html)
    return {"run": run, "sections": sections, "bytes": os.path.getsize(html_path)}
