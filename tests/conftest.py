"""Shared fixtures: the real-data folder and decompressed real images."""

from __future__ import annotations

import bz2
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

# One OpenMP thread per test process (set before any library starts its OpenMP runtime):
# with DIALS loaded, pyFAI's multi-threaded integrate1d, which several tests take as the
# reference, gives different profiles from run to run (up to 1.4 % in a bin; identical with
# one thread or without DIALS). The suite runs one process per core anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import diffuse_cli  # noqa: E402,F401  (DIALS environment before any libtbx import)

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
    """``$DIFFUSE_SHARED_DATA`` or ``../shared/data`` relative to the repository."""
    env = os.environ.get("DIFFUSE_SHARED_DATA")
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir() and (c / "README.md").exists():
            return c
    return None


#: session fixtures whose tests must all run on one pytest-xdist worker (DIALS once per dataset)
SESSION_GROUPS = ("processed_real", "readme_chain_run")


def _module_fixtures(item) -> set:
    """Names of the module/class-scoped fixtures an item uses (directly or not)."""
    defs = item._fixtureinfo.name2fixturedefs
    return {name for name, d in defs.items() if d and d[-1].scope in ("module", "class", "package")}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``), keep each
    module's tests on one worker, so module fixtures run once, and every test of
    the session-wide DIALS runs (``processed_real``, ``readme_chain_run``) on one
    worker, so DIALS processes each dataset once per test run. A module whose
    module fixture is used both by such tests and by others goes whole to that
    group (else the module fixture would run on both workers)."""
    by_module: dict = {}
    for item in items:
        by_module.setdefault(item.module.__name__, []).append(item)
    for module, module_items in by_module.items():
        group_of = {}
        for item in module_items:
            shared = [g for g in SESSION_GROUPS if g in item.fixturenames]
            group_of[item] = shared[0] if shared else module
        for g in SESSION_GROUPS:
            inside = set().union(*(_module_fixtures(i) for i in module_items if group_of[i] == g))
            outside = set().union(*(_module_fixtures(i) for i in module_items if group_of[i] == module))
            if inside & outside:
                for i in module_items:
                    if group_of[i] == module:
                        group_of[i] = g
        for item in module_items:
            item.add_marker(pytest.mark.xdist_group(group_of[item]))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip(
            "real data not found: set DIFFUSE_SHARED_DATA or place the shared data "
            f"folder at {REPO.parent / 'shared' / 'data'}"
        )
    return d


def decompress(src: pathlib.Path, dest_dir: pathlib.Path) -> pathlib.Path:
    """Decompress a ``.bz2`` image into ``dest_dir`` (once) and return its path."""
    out = dest_dir / src.name[:-4] if src.name.endswith(".bz2") else dest_dir / src.name
    if not out.exists():
        tmp = out.with_suffix(out.suffix + ".part")
        with bz2.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def real_images(shared_data, tmp_path_factory):
    """Function (subfolder, count) -> list of decompressed image paths."""
    cache = tmp_path_factory.mktemp("real_images")

    def get(subfolder: str, count: int | None = None) -> list[pathlib.Path]:
        files = sorted((shared_data / subfolder).glob("*.bz2"))[:count]
        if not files:
            pytest.skip(f"no images in {shared_data / subfolder}")
        dest = cache / subfolder
        dest.mkdir(exist_ok=True)
        return [decompress(f, dest) for f in files]

    return get


#: real datasets processed once per test session by diffuse.stills_process:
#: name -> (subfolder, number of images, parameters)
REAL_RUNS = {
    "thaumatin": ("thaumatin_grid_stills", 8, [
        "indexing.known_symmetry.space_group=P41212",
        "indexing.known_symmetry.unit_cell=58.4,58.4,152.3,90,90,90",
    ]),
    "thermolysin": ("thermolysin_cspad_stills", 2, [
        "indexing.known_symmetry.space_group=P6122",
        "indexing.known_symmetry.unit_cell=93,93,130.4,90,90,120",
        "spotfinder.threshold.dispersion.gain=25",
        "spotfinder.threshold.dispersion.global_threshold=100",
        "spotfinder.filter.min_spot_size=2",
        "indexing.refinement_protocol.d_min_start=2",
    ]),
    # the nuclease frames through the default route (rotation_as_stills, shared detector)
    "snase_stills": ("snase_rotation", 5, [
        "indexing.known_symmetry.space_group=P4",
        "indexing.known_symmetry.unit_cell=48.4,48.4,63.3,90,90,90",
    ]),
}


@pytest.fixture(scope="session")
def processed_real(real_images, tmp_path_factory):
    """Function (name in REAL_RUNS) -> dict(out, images, args): DIALS runs once per dataset.

    ``out`` is diffuse.stills_process's output directory (combined.expt/.refl,
    stills/<tag>_integrated.expt/.refl with shoeboxes); ``args`` the exact
    command line, for tests that rerun it. Tests must not write into ``out``.
    """
    done: dict = {}

    def get(name: str) -> dict:
        if name not in done:
            from diffuse_cli.command_line import stills_process

            subfolder, count, params = REAL_RUNS[name]
            images = real_images(subfolder, count)
            root = tmp_path_factory.mktemp(f"processed_{name}")
            args = [*map(str, images), *params, "nproc=2", f"output.directory={root / 'out'}",
                    f"output.log={root / 'stills_process.log'}"]
            stills_process.run(args)
            done[name] = {"out": root / "out", "images": images, "args": args}
        return done[name]

    return get


def lattice_contrast(path, min_off_lattice: int = 10_000) -> tuple[float, int]:
    """Mean I at integer-hkl voxels of a merged map / mean I of the other measured voxels,
    and the number of lattice voxels (the origin left out)."""
    import numpy as np

    m = np.load(path)
    ndiv = np.asarray(m["ndiv"]).ravel()
    on = [np.isclose(ax * n, np.round(ax * n)) & np.isclose(ax, np.round(ax))
          for ax, n in zip((m["h"], m["k"], m["l"]), ndiv)]
    lattice = on[0][:, None, None] & on[1][None, :, None] & on[2][None, None, :]
    measured = (m["counts"] > 0) & np.isfinite(m["I"])
    origin = np.zeros_like(lattice)
    origin[np.argmin(abs(m["h"])), np.argmin(abs(m["k"])), np.argmin(abs(m["l"]))] = True
    at = measured & lattice & ~origin
    off = measured & ~lattice
    assert off.sum() > min_off_lattice
    if not at.any():
        return float("nan"), 0
    return float(np.mean(m["I"][at]) / np.mean(m["I"][off])), int(at.sum())


def mpirun_env() -> dict:
    """Environment for a child ``mpirun``: Python's copy of the environment.

    Once any test has imported ``mpi4py.MPI`` in the pytest process, Open MPI
    has put its singleton variables into the C-level environment (not into
    ``os.environ``); a child mpirun that inherits them exits 1 without a word.
    """
    return dict(os.environ)


# ------------------------------------------------------------ the README chain


def _join_continuations(lines):
    out, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            out.append(current + line)
            current = ""
    if current:
        out.append(current)
    return out


def _code_blocks(text: str):
    """Lines of each fenced code block of a markdown text."""
    return [m.group(1).splitlines() for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S)]


def readme_chain() -> list[str]:
    """The shell lines of the README block that runs diffuse.simulate."""
    blocks = [b for b in _code_blocks((REPO / "README.md").read_text()) if any("diffuse.simulate" in ln for ln in b)]
    assert len(blocks) == 1, "expected one README code block with the chain"
    return [ln.strip() for ln in _join_continuations(blocks[0]) if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="session")
def readme_chain_run(tmp_path_factory):
    """(work, [(line, CompletedProcess)]): the README chain run line by line in bash, as a user
    types it, in an empty directory, once per session (tests/test_documented_commands.py checks
    it; tests/test_report.py renders the report it ends with). Stops at the first failing line."""
    work = tmp_path_factory.mktemp("readme_chain")
    bin_dir = pathlib.Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    runs = []
    for line in readme_chain():
        proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        runs.append((line, proc))
        if proc.returncode != 0:
            break
    return work, runs
