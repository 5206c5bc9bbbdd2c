"""Find a run's step folders and run logs.

A step's folder is recognised by what it holds, not by its name:

* simulate: ``truth.json``; stills_process: ``stills_process_summary.json``;
* bragg_mask / extract / correct / merge: ``summary.json`` with that stage's
  schema (merge also by ``merged.npz``); azimuthal_fit: ``fits.csv``;
* analysis (diffuse.anisotropic, pdf, model): a folder of that name or under
  ``analysis/``, a ``diffuse.<program>.log`` or a JSON/NPZ schema of theirs.

Searched: the folders given, their subfolders (two levels), and the places
the steps' provenance names: each run log's ``output.directory`` (relative to
the log's folder, the run's working directory), the extract files a corrected
still names (``extract_file_absolute``), the images the Bragg-mask summary
names (``image_path``) and the ``combined.expt`` the logs name.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

#: the steps in run order, as the report shows them
STEPS = ("simulate", "stills_process", "bragg_mask", "extract", "correct", "merge", "azimuthal_fit", "analysis")
#: programs that write analysis outputs (issue 14)
ANALYSIS_PROGRAMS = ("anisotropic", "pdf", "model")
#: summary.json schema prefix -> step
_SUMMARY_SCHEMAS = {
    "diffuse.bragg_mask/": "bragg_mask",
    "diffuse.extract_summary/": "extract",
    "diffuse.correct_summary/": "correct",
    "diffuse.merge_summary/": "merge",
}
_BANNER = re.compile(r"^diffuse\.(\w+) \(diffuse ")


@dataclasses.dataclass
class RunLog:
    """One program's run log: its path, banner and the parameters changed from the defaults."""

    program: str
    path: str
    banner: str
    modified: str  # the PHIL diff the program logged ("" when all defaults)
    text: str  # the whole log, for the report's "log" block

    def output_directory(self) -> str | None:
        """``output.directory`` from the logged diff, else the program's default; absolute
        (relative to the log's folder, the working directory of the run)."""
        value = phil_value(self.modified, "output.directory") or _default_output_directory(self.program)
        if not value:
            return None
        return value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(self.path)), value)


def _default_output_directory(program: str) -> str | None:
    """The default ``output.directory`` of diffuse.<program> (a diff does not show a default)."""
    import importlib

    try:
        module = importlib.import_module(f"diffuse_cli.command_line.{program}")
    except ImportError:  # a log of a program this version does not have
        return None
    params = module.phil_scope.extract()
    return getattr(getattr(params, "output", None), "directory", None)


@dataclasses.dataclass
class Run:
    """The folders of one run: step -> list of folders (analysis may have several), and the logs."""

    inputs: list
    folders: dict
    logs: dict  # program -> RunLog

    def folder(self, step: str) -> str | None:
        found = self.folders.get(step) or []
        return found[0] if found else None


def phil_value(text: str, path: str) -> str | None:
    """The (first) value of definition ``path`` in a PHIL text, or None."""
    if not text.strip():
        return None
    import libtbx.phil

    try:
        parsed = libtbx.phil.parse(text)
    except RuntimeError:  # a diff we cannot parse: treat as no value
        return None
    for d in parsed.all_definitions():
        if d.path == path and d.object.words:
            return " ".join(w.value for w in d.object.words)
    return None


def read_log(path: str) -> RunLog | None:
    """A diffuse program's run log (banner in its first lines), else None."""
    try:
        with open(path, errors="replace") as fh:
            text = fh.read()
    except (OSError, IsADirectoryError):
        return None
    head = text.splitlines()[:5]
    program = banner = None
    for line in head:
        m = _BANNER.match(line)
        if m:
            program, banner = m.group(1), line.strip()
            break
    if program is None:
        return None
    modified = ""
    marker = "The following parameters have been modified:"
    if marker in text:
        after = text.split(marker, 1)[1].lstrip("\n")
        # the diff is one block without blank lines; it ends at the first blank line
        modified = after.split("\n\n", 1)[0].rstrip()
    return RunLog(program=program, path=os.path.abspath(path), banner=banner, modified=modified, text=text)


def identify(folder: str) -> str | None:
    """Which step wrote ``folder`` (see the module docstring), or None."""
    join = lambda name: os.path.join(folder, name)  # noqa: E731
    if os.path.isfile(join("stills_process_summary.json")) or os.path.isfile(join("stills_process_summary.csv")):
        return "stills_process"
    if os.path.isfile(join("summary.json")):
        try:
            with open(join("summary.json")) as fh:
                schema = str(json.load(fh).get("schema", ""))
        except (OSError, ValueError, AttributeError):
            schema = ""
        for prefix, step in _SUMMARY_SCHEMAS.items():
            if schema.startswith(prefix):
                return step
        if any(schema.startswith(f"diffuse.{p}") for p in ANALYSIS_PROGRAMS):
            return "analysis"
    if os.path.isfile(join("merged.npz")):
        return "merge"
    if os.path.isfile(join("truth.json")):
        return "simulate"
    if os.path.isdir(join("profiles")) and (os.path.isfile(join("fits.csv"))
                                            or glob.glob(join(os.path.join("profiles", "*_radial.csv")))):
        return "azimuthal_fit"  # profiles, with fits if any were asked for
    name = os.path.basename(os.path.normpath(folder))
    parent = os.path.basename(os.path.dirname(os.path.normpath(folder)))
    if name in ("analysis", *ANALYSIS_PROGRAMS) or parent == "analysis":
        if _has_outputs(folder):
            return "analysis"
    if any(os.path.isfile(join(f"diffuse.{p}.log")) for p in ANALYSIS_PROGRAMS) and _has_outputs(folder):
        return "analysis"
    return None


def _has_outputs(folder: str) -> bool:
    return any(glob.glob(os.path.join(folder, f"*.{ext}")) for ext in ("png", "json", "csv", "npz"))


def _subfolders(folder: str, depth: int = 2) -> list:
    out = []
    if depth <= 0:
        return out
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not name.startswith("."):
            out.append(path)
            out.extend(_subfolders(path, depth - 1))
    return out


def _provenance_folders(step: str, folder: str) -> list:
    """Folders this step's outputs name as their inputs."""
    out = []
    if step == "correct":
        from diffuse_cli.formats.corrected import is_corrected_file, read_corrected

        for path in sorted(glob.glob(os.path.join(folder, "*.npz")))[:50]:
            if os.path.basename(path).startswith("factors_") or not is_corrected_file(path):
                continue
            z = read_corrected(path, fields=["extract_file_absolute"])
            if "extract_file_absolute" in z:
                out.append(os.path.dirname(str(z["extract_file_absolute"])))
                break
    elif step == "bragg_mask":
        try:
            with open(os.path.join(folder, "summary.json")) as fh:
                stills = json.load(fh).get("stills", [])
            image = next((s["image_path"] for s in stills if isinstance(s, dict) and s.get("image_path")), None)
            if image:
                out.append(os.path.dirname(image))
        except (OSError, ValueError, AttributeError):
            pass
    return out


def find_run(inputs) -> Run:
    """Step folders and logs of the run under ``inputs`` (folders or files in them)."""
    inputs = [os.path.abspath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))) for p in inputs]
    folders: dict = {}
    seen: set = set()
    pending = []
    for folder in inputs:
        pending += [folder, *_subfolders(folder)]

    def visit(candidates):
        for folder in candidates:
            folder = os.path.abspath(folder)
            if folder in seen or not os.path.isdir(folder):
                continue
            seen.add(folder)
            step = identify(folder)
            if step is None:
                continue
            folders.setdefault(step, []).append(folder)
            visit(_provenance_folders(step, folder))
            if step == "analysis":
                visit(_subfolders(folder, 1))

    visit(pending)
    # run logs: in the folders given, the step folders and their parents (the working directory)
    found = [f for fs in folders.values() for f in fs]
    log_dirs = list(dict.fromkeys(inputs + found + [os.path.dirname(f) for f in found]))
    logs: dict = {}
    for d in log_dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.log"))):
            log = read_log(path)
            if log is None:
                continue
            old = logs.get(log.program)
            if old is None or os.path.getmtime(path) > os.path.getmtime(old.path):
                logs[log.program] = log
    # the logs' output.directory and the experiments they read lead to more folders
    more = []
    for log in logs.values():
        d = log.output_directory()
        if d:
            more.append(d)
        expt = phil_value(log.modified, "input.experiments")
        if expt:
            base = os.path.dirname(os.path.abspath(log.path))
            more.append(os.path.dirname(expt if os.path.isabs(expt) else os.path.join(base, expt)))
    visit(more)
    for step in folders:
        folders[step] = list(dict.fromkeys(folders[step]))
    return Run(inputs=inputs, folders=folders, logs=logs)
