"""Every command the README and the docs show runs, or at least parses, as written.

* The README's chain block is run line by line in a shell, exactly as a user
  would type it (the programs on PATH from the venv), once per module.
* Every ``diffuse.*`` command line in README.md, docs/*.md (code blocks and
  inline code) and the ``Examples::`` of each program's ``-h`` is checked
  dry: each ``name=value`` must be a parameter of that program that its PHIL
  accepts (name, type, range, choice), by the same command-line interpreter
  DIALS's parser uses; flag-only lines (``-c -a 2``) are run.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import _code_blocks, _join_continuations, readme_chain

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
PROGRAMS = ("simulate", "stills_process", "bragg_mask", "extract", "correct", "merge", "azimuthal_fit",
            "anisotropic", "pdf", "model", "export", "report")


# ----------------------------------------------------------- finding commands


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) of every diffuse.* command shown to users."""
    found = []

    def add(where, line):
        line = line.strip()
        m = re.search(r"(?:^|\s)(diffuse\.(\w+)(?:\s.*)?)$", line)
        # not table rows, lists or data-flow diagrams ("diffuse.extract -> ...")
        if m and m.group(2) in PROGRAMS and not line.startswith(("|", "*")) and " -> " not in line:
            found.append((where, m.group(1)))

    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for block in _code_blocks(text):
            for line in _join_continuations(block):
                add(path.name, line)
        in_block = False
        for line in text.splitlines():
            if line.lstrip().startswith("```"):
                in_block = not in_block
            elif not in_block:
                for m in re.finditer(r"`(diffuse\.\w+ [^`]+)`", line):
                    add(path.name + " (inline)", m.group(1))
    for name in PROGRAMS:
        doc = importlib.import_module(f"diffuse_cli.command_line.{name}").__doc__ or ""
        if "Examples::" in doc:
            examples = doc.split("Examples::", 1)[1].splitlines()
            for line in _join_continuations(examples):
                if line.strip() and not line.strip().startswith("#"):
                    add(f"diffuse.{name} -h", line)
    return found


def _tokens(command: str) -> tuple[str, list[str]]:
    """(program, arguments) with [optional] placeholders and comments left out."""
    words = shlex.split(command, comments=True)
    program = words[0].split(".", 1)[1]
    return program, [w for w in words[1:] if not (w.startswith("[") or w.endswith("]") or w == "...")]


def test_commands_are_found():
    """The finder sees the README chain and examples of all seven programs."""
    assert [c.split()[0] for c in readme_chain()] == [f"diffuse.{p}" for p in PROGRAMS]
    programs = {_tokens(c)[0] for _, c in documented_commands()}
    assert programs == set(PROGRAMS)
    assert len(documented_commands()) >= 30


# ------------------------------------------------------------- dry parsing


def _phil_problems(program: str, args: list[str]) -> list[str]:
    """Why the name=value arguments would not be accepted (empty: accepted)."""
    from libtbx.utils import Sorry

    scope = importlib.import_module(f"diffuse_cli.command_line.{program}").phil_scope
    interpreter = scope.command_line_argument_interpreter(home_scope="")
    sources, problems = [], []
    for arg in args:
        if arg.startswith("-"):
            if arg not in ("-c", "-e", "-a", "-h", "-v") and not re.fullmatch(r"-[ae]\d", arg):
                problems.append(f"{arg}: unknown flag")
            continue
        if "=" not in arg:
            continue  # a file, directory or glob: checked by the chain run
        try:
            sources.append(interpreter.process(arg=arg))
        except (Sorry, RuntimeError) as e:  # unknown or ambiguous name, unparsable value
            problems.append(f"{arg}: {e}")
    if problems:
        return problems
    try:
        working, unused = scope.fetch(sources=sources, track_unused_definitions=True)
        problems += [f"{u.path}: not a parameter" for u in unused]
        working.extract()
    except (Sorry, RuntimeError) as e:  # libtbx: not a choice, wrong type, out of range
        problems.append(str(e))
    return problems


def test_documented_parameters_parse():
    bad = []
    for where, command in documented_commands():
        program, args = _tokens(command)
        bad += [f"{where}: {command}: {p}" for p in _phil_problems(program, args)]
    assert not bad, "\n".join(bad)


def test_dry_parse_catches_mistakes():
    """The dry check fails on what the programs would refuse."""
    assert _phil_problems("extract", ["nproc=abc"])
    assert _phil_problems("extract", ["no_such_parameter=1"])
    assert _phil_problems("merge", ["ndiv=0"])
    assert _phil_problems("stills_process", ["processing_mode=bad"])
    assert not _phil_problems("merge", ["ndiv=3", "output.directory=merged"])


def test_show_config_flags_as_documented(capsys):
    """Every flag-only line the docs show (``-c -a 2``: docs/stills_process.md,
    ``-c -a2``: docs/correct.md, ...) works for every program."""
    documented = set()
    for _, command in documented_commands():
        args = _tokens(command)[1]
        if args and all(a.startswith("-") or a.isdigit() for a in args):
            documented.add(tuple(args))
    assert {("-c",), ("-c", "-a", "2"), ("-c", "-a1")} <= documented
    for flags in sorted(documented | {("-c", "-a2"), ("-c", "-e", "1")}):
        for program in PROGRAMS:
            run = importlib.import_module(f"diffuse_cli.command_line.{program}").run
            with pytest.raises(SystemExit) as e:
                run(list(flags))
            assert e.value.code in (0, None), (program, flags)
            out = capsys.readouterr().out
            assert "output" in out, (program, flags)
            if flags[1:] in (("-a", "2"), ("-a2",)):
                assert ".help" in out, (program, flags)


def test_help_shows_the_examples(capsys):
    for program in PROGRAMS:
        run = importlib.import_module(f"diffuse_cli.command_line.{program}").run
        with pytest.raises(SystemExit):
            run(["-h"])
        assert f"diffuse.{program}" in capsys.readouterr().out


# ------------------------------------------------------ the README chain run


@pytest.fixture(scope="module")
def chain(readme_chain_run):
    """The README chain, line by line in bash, in an empty directory (conftest: once per session)."""
    return readme_chain_run


@pytest.mark.slow
def test_readme_chain_runs_as_written(chain):
    work, runs = chain
    assert len(runs) == len(readme_chain())
    for line, proc in runs:
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr, line


@pytest.mark.slow
def test_readme_chain_outputs(chain):
    """Each step's output is there and agrees with the step before."""
    from dxtbx.model.experiment_list import ExperimentList

    work, runs = chain
    assert all(p.returncode == 0 for _, p in runs)
    rows = json.loads((work / "processed" / "stills_process_summary.json").read_text())["rows"]
    truth = json.loads((work / "sim" / "truth.json").read_text())
    assert len(rows) == len(truth["images"])
    experiments = ExperimentList.from_file(str(work / "processed" / "combined.expt"), check_format=False)
    assert len(experiments) == sum(r["status"] == "indexed" for r in rows) >= 1
    # the positional masks/ directory was read as masks.summary=masks/summary.json
    assert (work / "masks" / "summary.json").is_file()
    assert json.loads((work / "extracted" / "summary.json").read_text())["bragg_masks"] is True
    stills = sorted(p for p in (work / "extracted").glob("*.npz") if not p.name.startswith("geometry_"))
    assert len(stills) == len(experiments)
    corrected = sorted(p for p in (work / "corrected").glob("*.npz") if not p.name.startswith("factors_"))
    assert len(corrected) == len(experiments)
    merged = np.load(work / "merged" / "merged.npz")
    assert np.isfinite(merged["I"]).sum() > 1000
    assert list((work / "profiles" / "profiles").glob("*radial.csv"))
