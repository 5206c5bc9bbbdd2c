"""diffuse.report: one HTML page for a run, checked in a real (headless) Chromium.

The README chain's run (3 simulated stills through every program, run once
per session by conftest.readme_chain_run, ending with diffuse.report): its
report, and one written again here, is loaded in
Debian's ``chromium`` (installed by the Makefile's setup): no console errors
(Chromium logs every console message and uncaught exception as a
``CONSOLE`` line with ``--enable-logging=stderr``), every section in the
DOM after the scripts ran, every plotly figure drawn (its SVG layers, axis
titles with a unit), and a screenshot that is not blank.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli.command_line import report

pytestmark = pytest.mark.slow  # the chain it reports on takes about a minute on 2 quiet cores

SECTIONS = ("overview", "inputs", "simulate", "stills_process", "bragg_mask", "extract_correct", "merge",
            "azimuthal_fit", "analysis")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def run_dir(readme_chain_run):
    """The README chain's run (conftest, once per session): 3 simulated stills through every
    program, step folders and logs in one folder, ending with ``diffuse.report``."""
    work, runs = readme_chain_run
    failed = [(line, p.stderr[-2000:]) for line, p in runs if p.returncode != 0]
    assert not failed, failed
    return work


@pytest.fixture(scope="module")
def report_html(run_dir):
    html = run_dir / "report.html"
    result = report.run([str(run_dir), f"output.html={html}", f"output.log={run_dir / 'report.log'}"])
    return html, result


def _chromium(html: pathlib.Path, profile: pathlib.Path, *args) -> subprocess.CompletedProcess:
    """Headless Chromium on a local file, its own profile (others may run Chromium at the same time)."""
    return subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *args, html.as_uri()],
        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def rendered(report_html, tmp_path_factory):
    """(DOM after the scripts ran, Chromium's stderr, seconds) of the report."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (make setup installs Debian's chromium)")
    html, _ = report_html
    start = time.perf_counter()
    proc = _chromium(html, tmp_path_factory.mktemp("chromium_profile"), "--virtual-time-budget=30000", "--dump-dom")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr, seconds


def test_report_written_self_contained(report_html):
    html, result = report_html
    text = html.read_text()
    assert result["bytes"] == html.stat().st_size
    # nothing to fetch: every src/href outside the scripts is a data URI or an anchor
    outside_scripts = re.sub(r"<script\b.*?</script>", "", text, flags=re.S)
    external = re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)([^"']*)""", outside_scripts)
    assert external == []
    # plotly.js is embedded once
    assert text.count("* plotly.js v") == 1
    assert not list(html.parent.glob(".report.*.tmp*"))  # atomic write left no temporary


def test_report_in_chromium_loads_without_console_errors(rendered):
    dom, stderr, seconds = rendered
    console = [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]
    assert console == [], "\n".join(console)
    print(f"chromium: loaded, ran the scripts and dumped the DOM in {seconds:.1f} s")
    assert "<main>" in dom and "</html>" in dom.lower()


def test_report_in_chromium_has_every_section(rendered, run_dir):
    dom, _, _ = rendered
    status = dict(re.findall(r'<section id="(\w+)" data-status="([^"]+)"', dom))
    assert set(status) == set(SECTIONS)
    assert {k for k, v in status.items() if v == "not run"} == set()  # the chain runs every program
    # the hit/indexing table counts the images the simulator wrote
    truth = json.loads((run_dir / "sim" / "truth.json").read_text())
    section = dom.split('<section id="stills_process"', 1)[1].split("</section>", 1)[0]
    cells = re.findall(r"<td>([^<]*)</td>", section)
    assert cells[0] == str(len(truth["images"]))


def test_report_in_chromium_draws_every_plot_with_units(rendered, report_html):
    dom, _, _ = rendered
    html, _ = report_html
    n_plots = html.read_text().count('<div class="plot" id="plot-')
    assert n_plots >= 15
    # plotly adds js-plotly-plot to a div it drew, and at least two SVG layers
    assert len(re.findall(r'class="plot js-plotly-plot"', dom)) == n_plots
    assert dom.count('class="main-svg"') >= 2 * n_plots
    # data drawn: scatter traces with points or lines, the histogram's bars, the slice's heatmap
    assert len(re.findall(r'class="trace scatter', dom)) >= 20
    assert 'class="trace bars"' in dom or 'class="bars"' in dom
    assert "heatmaplayer" in dom
    # every axis has a title with a unit in parentheses
    for axis in ("xtitle", "ytitle"):
        titles = re.findall(rf'<text class="{axis}"[^>]*>(.*?)</text>', dom)
        assert len(titles) == n_plots, axis
        missing = [t for t in titles if "(" not in t]
        assert not missing, missing


def test_report_screenshot_is_not_blank(report_html, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (make setup installs Debian's chromium)")
    from PIL import Image

    html, _ = report_html
    shot = html.parent / "report_screenshot.png"
    proc = _chromium(html, tmp_path_factory.mktemp("chromium_profile_shot"), "--window-size=1200,3000",
                     "--virtual-time-budget=30000", f"--screenshot={shot}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    grey = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert grey.shape == (3000, 1200)
    assert grey.std() > 20  # a blank (white) page has std 0
    assert (grey < 200).mean() > 0.02  # text, tables and plot lines cover part of it
    keep = os.environ.get("DIFFUSE_REPORT_SCREENSHOT")  # a path to keep it beyond pytest's temporary folders
    if keep:
        shutil.copy(shot, keep)
    print(f"screenshot: {keep or shot}")


def test_steps_not_run_are_shown_as_not_run(run_dir, tmp_path):
    """A folder with only stills_process outputs and an analysis folder, no run logs.

    (The Bragg-mask summary would lead back to the whole run: it names the
    images, whose folder's parent holds the run logs.)"""
    part = tmp_path / "partial"
    part.mkdir()
    shutil.copytree(run_dir / "processed", part / "processed", symlinks=True)
    analysis = part / "analysis" / "anisotropic"
    analysis.mkdir(parents=True)
    (analysis / "iso.json").write_text(json.dumps({"n_shells": 3, "q": [0.1, 0.2, 0.3]}))
    shutil.copy(next((run_dir / "merged").glob("slice_*.png")), analysis / "slice_hk0.png")
    html = tmp_path / "partial.html"
    result = report.run([str(part), f"output.html={html}", f"output.log={tmp_path / 'report.log'}"])
    status = {s.key: s.status for s in result["sections"]}
    assert status == {"overview": "run", "inputs": "run", "simulate": "not run", "stills_process": "run",
                      "bragg_mask": "not run",
                      "extract_correct": "not run", "merge": "not run", "azimuthal_fit": "not run",
                      "analysis": "run"}
    text = html.read_text()
    for key in ("simulate", "bragg_mask", "extract_correct", "merge", "azimuthal_fit"):
        body = text.split(f'<section id="{key}" data-status="not run">', 1)[1].split("</section>", 1)[0]
        assert "not run" in body and "Error" not in body and "Traceback" not in body
    analysis_part = text.split('<section id="analysis"', 1)[1].split("</section>", 1)[0]
    assert "iso.json" in analysis_part and "slice_hk0.png" in analysis_part
    assert "data:image/png;base64," in analysis_part


def test_step_folder_alone_finds_the_run_by_provenance(run_dir, tmp_path):
    """Given only corrected/, the report finds extract (its stills' extract files), the run logs
    (in the parent folder) and from them the other step folders."""
    html = tmp_path / "from_corrected.html"
    result = report.run([str(run_dir / "corrected"), f"output.html={html}", f"output.log={tmp_path / 'r.log'}"])
    folders = result["run"].folders
    for step, name in (("extract", "extracted"), ("correct", "corrected"), ("stills_process", "processed"),
                       ("merge", "merged"), ("azimuthal_fit", "profiles"), ("bragg_mask", "masks")):
        assert folders.get(step) == [str(run_dir / name)], (step, folders)


def test_folder_without_outputs_is_a_sorry(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Sorry, match="no diffuse step outputs found"):
        report.run([str(tmp_path / "empty"), f"output.html={tmp_path / 'x.html'}",
                    f"output.log={tmp_path / 'r.log'}"])
    assert not (tmp_path / "x.html").exists()
