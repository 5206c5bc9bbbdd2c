"""The house rules that a newcomer relies on: no import cycles, one place per file format."""

from __future__ import annotations

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "diffuse_cli"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports, at module level or inside functions."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # ``from pkg import submodule`` depends on the submodule only
                names = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in names if t in modules]
                if len(targets) < len(names):
                    targets.append(base)
            for t in targets:
                # the top-level package only sets up the DIALS environment
                if t in modules and t != name and t != "diffuse_cli":
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, found


# ---------------------------------------------------------------- one place per file format

SCHEMA = re.compile(r"^diffuse\.[a-z_.]+/\d+$")
#: artefacts whose schema, reader and writer are outside diffuse_cli/formats, with where they
#: live (each defined in that one module only). The simulator's truth files stay in the
#: simulation package ON PURPOSE: the simulator shares no code with the pipeline it checks
#: (tests/test_simulator_independence.py), so it cannot write through the pipeline's formats.
NOT_IN_FORMATS = {
    "diffuse.simulate/1": "diffuse_cli/simulation/writers.py",  # truth.json
    "diffuse.simulate.truth/1": "diffuse_cli/simulation/writers.py",  # truth.npz
}
#: modules outside formats that may open or write .npz files themselves
NPZ_IO_ALLOWED = {
    "diffuse_cli/atomic_io.py",  # write_npz / open_npz, the atomic primitives the formats use
    "diffuse_cli/provenance.py",  # stored_key: a tolerant probe of a stored provenance key
    "diffuse_cli/simulation/writers.py",  # truth.npz: the simulator shares no code with the pipeline
    "diffuse_cli/merge_prepared.py",  # temporary .npy spill of prepared stills: scratch, not a file format
}
#: the artefacts of the chain and their schemas (docs/file_formats.md)
FORMATS = {
    "masks": {"diffuse.mask_bits/1"},
    "extract": {"diffuse.extract/3", "diffuse.extract/2", "diffuse.extract/1"},
    "geometry": {"diffuse.geometry/2", "diffuse.geometry/1"},
    "factors": {"diffuse.factors/2"},
    "corrected": {"diffuse.correct/3", "diffuse.observations/1"},
    "background": {"diffuse.background/1"},
    "merged": {"diffuse.merge/1"},
    "summaries": {"diffuse.bragg_mask/1", "diffuse.extract_summary/1", "diffuse.correct_summary/1",
                  "diffuse.merge_summary/1"},
    "stills_process": {"diffuse.stills_process_summary/1", "diffuse.stills_process_done/1"},
    "azimuthal_maps": {"diffuse.azimuthal_maps/1"},
    "analysis_maps": {"diffuse.anisotropic/1", "diffuse.pdf/1"},
    "model_map": {"diffuse.model/1"},
}


def _rel(path) -> str:
    return path.relative_to(REPO).as_posix()


def _trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield _rel(path), ast.parse(path.read_text())


def test_each_schema_constant_is_defined_once_in_formats():
    """Every schema string (``diffuse.<artefact>/<version>``) occurs once in the package:
    in the formats module of its artefact (docstrings, being longer strings, do not count)."""
    where: dict[str, list[str]] = {}
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SCHEMA.match(node.value):
                where.setdefault(node.value, []).append(rel)
    for schema, places in where.items():
        expected = NOT_IN_FORMATS.get(schema)
        if expected is None:
            module = next((m for m, schemas in FORMATS.items() if schema in schemas), None)
            assert module is not None, f"{schema} ({places}) is no artefact of the formats package"
            expected = f"diffuse_cli/formats/{module}.py"
        assert places == [expected], (schema, places)
    missing = set().union(*FORMATS.values()) - set(where)
    assert not missing, missing


def test_each_reader_and_writer_is_defined_once_in_formats():
    """Every function and class of diffuse_cli/formats (readers, writers, the counts
    packing, file names) is defined nowhere else, and once."""
    defined: dict[str, list[str]] = {}
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(rel)
    ours = set()
    for path in sorted((PACKAGE / "formats").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                ours.add(node.name)
    for name in ("read_extract", "write_extract", "read_geometry", "write_geometry", "read_factors",
                 "write_factors", "read_corrected", "write_corrected", "read_background", "write_background",
                 "read_merged", "write_merged", "read_summary", "write_summary", "read_mask_any",
                 "write_mask_bits", "pack_counts", "unpack_counts", "check_schema"):
        assert name in ours, name
    for name in sorted(ours):
        places = defined[name]
        assert len(places) == 1 and places[0].startswith("diffuse_cli/formats/"), (name, defined[name])


def test_programs_read_and_write_npz_through_formats():
    """No module outside the formats package opens or writes an .npz itself
    (np.load, np.savez*, program.open_npz / write_npz), but the listed ones."""
    calls = {"load", "savez", "savez_compressed", "open_npz", "write_npz"}
    found = []
    for rel, tree in _trees():
        if rel.startswith("diffuse_cli/formats/") or rel in NPZ_IO_ALLOWED:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls:
                base = node.func.value
                if isinstance(base, ast.Name) and base.id in {"np", "numpy", "program"}:
                    found.append(f"{rel}:{node.lineno} {base.id}.{node.func.attr}")
    assert not found, found


def test_mask_files_have_one_reader_and_writer():
    """read_mask/read_mask_any/write_mask_bits and the schema string live in formats.masks only."""
    defined = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in {"read_mask", "read_mask_any", "read_mask_panels", "write_mask_bits"}:
                defined.setdefault(node.name, []).append(path.relative_to(REPO).as_posix())
            if isinstance(node, ast.Constant) and node.value == "diffuse.mask_bits/1":
                defined.setdefault("schema", []).append(path.relative_to(REPO).as_posix())
    for key, where in defined.items():
        assert where == ["diffuse_cli/formats/masks.py"], (key, where)
    assert set(defined) == {"read_mask", "read_mask_any", "read_mask_panels", "write_mask_bits", "schema"}


def _package_names_used(path: pathlib.Path):
    """(line, module, name) of every ``from diffuse_cli... import name`` and every
    ``alias.name`` on a diffuse_cli module imported under an alias, in one file."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffuse_cli"):
            for a in node.names:
                yield node.lineno, node.module, a.name
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("diffuse_cli") and a.asname:
                    aliases[a.asname] = a.name
    import importlib

    modules = {}
    for alias, target in aliases.items():
        try:  # only aliases of modules (a class's attributes are not this test's business)
            modules[alias] = importlib.import_module(target).__name__
        except ImportError:
            continue
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            yield node.lineno, modules[node.value.id], node.attr


def test_benchmarks_and_scripts_use_names_that_exist():
    """Benchmarks and scripts are not run by the tests; after code moves, every
    diffuse_cli name they import or use on an imported module must still exist."""
    import importlib

    missing = []
    for path in sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]):
        for line, module, name in _package_names_used(path):
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                missing.append(f"{path.name}:{line} {module} ({e})")
                continue
            if not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")  # a submodule not yet imported
                except ImportError:
                    missing.append(f"{path.name}:{line} {module}.{name}")
    assert not missing, missing
