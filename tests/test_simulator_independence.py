"""The simulator shares no code with the pipeline it checks (issue 10, item 2).

Two independent checks:

* static: every ``import`` statement of the simulator's modules — at module
  level and inside functions — parsed with ``ast``, followed through the
  diffuse_cli modules they reach;
* dynamic: ``sys.modules`` after importing the simulator and running a tiny
  simulation of each kind in a fresh interpreter (catches imports made at run
  time, e.g. through importlib).
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "diffuse_cli"

#: Pipeline modules whose errors must not cancel between simulation and reduction.
FORBIDDEN = {
    f"diffuse_cli.{name}"
    for name in (
        "geometry", "corrections", "absolute_scale", "extraction", "masking", "merging", "scaling",
        "symmetry",
        "grid",  # the truth grid layout is written independently (simulation.crystal.TruthGrid)
        "frames",  # image number / array index / φ conversions of the pipeline
    )
}
#: What the simulator's own modules may import from diffuse_cli, besides themselves.
ALLOWED_DIRECT = {"diffuse_cli", "diffuse_cli.program", "diffuse_cli.cbf_writer", "diffuse_cli.dials_compat"}

SIMULATOR_FILES = sorted((PACKAGE / "simulation").glob("*.py")) + [
    PACKAGE / "simulate.py",
    PACKAGE / "cbf_writer.py",
    PACKAGE / "command_line" / "simulate.py",
]


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def module_path(name: str) -> pathlib.Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: pathlib.Path, package: str | None = None) -> set[str]:
    """Every diffuse_cli module an ``import`` anywhere in the file names (relative ones resolved).

    ``from X import y`` counts X and, when X.y is a module, X.y too; string
    arguments of ``importlib.import_module`` / ``__import__`` count as imports.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            for alias in node.names:
                if module_path(f"{module}.{alias.name}") is not None:
                    found.add(f"{module}.{alias.name}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
    return {m for m in found if m == "diffuse_cli" or m.startswith("diffuse_cli.")}


def test_simulator_files_exist():
    names = {p.name for p in (PACKAGE / "simulation").glob("*.py")}
    assert {"forward.py", "truth.py", "atomic.py", "writers.py", "simulator.py"} <= names


@pytest.mark.parametrize("path", SIMULATOR_FILES, ids=lambda p: module_name(p))
def test_direct_imports_are_allowed(path):
    own = {m for m in imported_modules(path) if not m.startswith("diffuse_cli.simulation")}
    own -= {"diffuse_cli.simulate", "diffuse_cli.command_line"}
    assert own <= ALLOWED_DIRECT, f"{path.name} imports {sorted(own - ALLOWED_DIRECT)}"


def test_no_pipeline_module_reachable_through_imports():
    """The closure of imports (in any function) from the simulator avoids the pipeline."""
    todo = [module_name(p) for p in SIMULATOR_FILES]
    seen: dict[str, str] = {}
    while todo:
        name = todo.pop()
        path = module_path(name)
        if path is None:
            continue
        for dep in imported_modules(path):
            if dep not in seen:
                seen[dep] = name
                todo.append(dep)
    reached = FORBIDDEN & set(seen)
    assert not reached, {m: f"imported by {seen[m]}" for m in reached}
    # the walk did follow the package's own modules
    assert {"diffuse_cli.simulation.forward", "diffuse_cli.program"} <= set(seen)


def test_ast_scan_detects_a_function_level_import(tmp_path):
    """The scanner is not vacuous: an import inside a function is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from diffuse_cli import corrections\n    from .. import geometry\n")
    found = imported_modules(probe, package="diffuse_cli.simulation")
    assert {"diffuse_cli.corrections", "diffuse_cli.geometry"} <= found


RUN_SCRIPT = r"""
import json, sys
import diffuse_cli.simulation, diffuse_cli.simulate
from diffuse_cli.command_line import simulate
out = sys.argv[1]
common = ["detector_model.n_fast=48", "detector_model.n_slow=40", "truth.ndiv=1", "truth.subsample=1",
          "absolute_scale.composition=C:100,N:30,O:30,H:150"]
simulate.run(["n_stills=1", f"output.directory={out}/s", f"output.log={out}/s.log"] + common)
simulate.run(["kind=rotation", "rotation.n_images=2", "rotation.drift_deg=0.2", f"output.directory={out}/r",
              f"output.log={out}/r.log"] + common)
simulate.run(["n_stills=1", "detector=multi", "multi.panel_size=24,20", "bragg=False",
              f"output.directory={out}/m", f"output.log={out}/m.log"] + common)
simulate.run(["kind=xfel", "n_stills=1", "xfel.bandwidth=0.001", "xfel.spectrum_samples=2", "detector=multi",
              "multi.layout=cspad", "multi.panel_size=24,20", f"output.directory={out}/x", f"output.log={out}/x.log"]
             + common)
print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.startswith("diffuse_cli"))))
"""


def test_fresh_interpreter_loads_no_pipeline_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES ")][-1]
    loaded = set(json.loads(line[len("MODULES "):]))
    assert "diffuse_cli.simulation.forward" in loaded and "diffuse_cli.simulation.atomic" in loaded
    assert not loaded & FORBIDDEN, sorted(loaded & FORBIDDEN)
    assert (tmp_path / "r" / "image_00002.cbf").exists() and (tmp_path / "m" / "truth.json").exists()
