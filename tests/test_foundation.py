"""Foundation: environment set-up, DIALS compatibility layer, program conventions."""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from diffuse_cli import dials_compat

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _scripts() -> dict:
    """Console scripts registered in pyproject.toml: name -> "module:function"."""
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["scripts"]


def _programs() -> list[str]:
    """Every program registered as a console script (test_every_registered_program_exists
    fails if one has no module, so none is left out of the tests below)."""
    return [name.split(".", 1)[1] for name in sorted(_scripts())]


def test_every_registered_program_exists():
    for name, target in sorted(_scripts().items()):
        module, function = target.split(":")
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        assert callable(getattr(importlib.import_module(module), function, None)), f"{name}: no {target}"


PROGRAMS = _programs()


def _run_program(program: str, *args, cwd=None) -> subprocess.CompletedProcess:
    code = (
        "import sys; from diffuse_cli.command_line.{0} import run; run()".format(program)
    )
    return subprocess.run(
        [PYTHON, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_libtbx_build_is_set_before_libtbx_import(tmp_path):
    """Importing diffuse_cli in a venv makes libtbx (and so dxtbx) importable."""
    env = {k: v for k, v in os.environ.items() if k != "LIBTBX_BUILD"}
    result = subprocess.run(
        [PYTHON, "-c", "import diffuse_cli, dxtbx, os; print(os.environ.get('LIBTBX_BUILD'))"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    if sys.prefix != sys.base_prefix and os.path.isdir("/usr/lib/cctbx/python3.11"):
        assert result.stdout.strip() == "/usr/lib/cctbx/python3.11"


def test_console_scripts_installed():
    """Every registered program has an executable console script next to python."""
    bindir = pathlib.Path(PYTHON).parent
    for program in PROGRAMS:
        assert (bindir / f"diffuse.{program}").exists(), program


def test_mono_simulation_shim_makes_max_like_importable():
    code = (
        "import diffuse_cli\n"
        "from xfel.mono_simulation.max_like import minimizer\n"
        "from xfel.mono_simulation.util import green_curve_area\n"
        "import xfel.mono_simulation as m\n"
        "print(getattr(m, '__diffuse_shim__', False))\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(not dials_compat.has_mono_sim_extension())


def test_without_shim_the_mono_simulation_import_fails():
    """The failure the shim repairs is real on this DIALS (skipped on complete builds)."""
    if dials_compat.has_mono_sim_extension():
        pytest.skip("this cctbx has xfel_mono_sim_ext: the shim is a no-op here")
    code = (
        "import diffuse_cli.dials_compat as c; c.uninstall_mono_simulation_shim()\n"
        "import xfel.mono_simulation.max_like\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "xfel_mono_sim_ext" in result.stderr


def test_shim_is_noop_when_extension_present(monkeypatch):
    monkeypatch.setattr(dials_compat, "has_mono_sim_extension", lambda: True)
    assert dials_compat.install_mono_simulation_shim() is False


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_help(program):
    result = _run_program(program, "-h")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout, f"diffuse.{program} -h shows no examples"


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_show_config(program):
    result = _run_program(program, "-c")
    assert result.returncode == 0, result.stderr
    assert "nproc" in result.stdout and "output" in result.stdout


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_missing_input_is_one_line_sorry(program, tmp_path):
    result = _run_program(program, "no_such_file.expt", cwd=tmp_path)
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()
    assert err == ["Sorry: File not found: no_such_file.expt"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_default_phil_file_parses(program):
    """phil/<program>.phil is a valid parameter file for the program."""
    phil_file = REPO / "phil" / f"{program}.phil"
    assert phil_file.exists(), f"missing {phil_file}"
    module = importlib.import_module(f"diffuse_cli.command_line.{program}")
    import libtbx.phil

    user = libtbx.phil.parse(phil_file.read_text(), process_includes=True)
    _, unused = module.phil_scope.fetch(sources=[user], track_unused_definitions=True)
    assert not unused, f"unknown parameters in {phil_file.name}: {[u.path for u in unused]}"
    if program != "stills_process":  # that one includes all of DIALS's scope
        listed = {d.path for d in user.all_definitions()}
        missing = sorted({d.path for d in module.phil_scope.all_definitions()} - listed)
        assert not missing, f"{phil_file.name} lacks {missing}"
        # and it holds the program's defaults, not other values
        diff = module.phil_scope.fetch_diff(sources=[user]).as_str()
        assert diff == "", f"{phil_file.name} differs from the defaults:\n{diff}"


@pytest.mark.real_data
@pytest.mark.slow
def test_thaumatin_stills_index_through_compat_layer(real_images, tmp_path):
    """DIALS stills_process with the layer indexes >= 2 of the first 3 thaumatin stills."""
    images = real_images("thaumatin_grid_stills", 3)
    code = (
        "import sys, diffuse_cli\n"
        "from dials.command_line.stills_process import run\n"
        "run(sys.argv[1:])\n"
    )
    args = [str(p) for p in images] + [
        "indexing.known_symmetry.space_group=P41212",
        "indexing.known_symmetry.unit_cell=58,58,150,90,90,90",
        f"output.output_dir={tmp_path}",
        "mp.nproc=2",
    ]
    result = subprocess.run(
        [PYTHON, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    indexed = sorted(tmp_path.glob("*_indexed.refl"))
    integrated = sorted(tmp_path.glob("*_integrated.expt"))
    assert len(indexed) >= 2, result.stdout[-3000:]
    assert len(integrated) >= 2


@pytest.mark.real_data
@pytest.mark.slow
def test_thaumatin_still_does_not_index_without_compat_layer(real_images, tmp_path):
    """Without the layer, Debian's DIALS reports no indexing solution for the same still."""
    if dials_compat.has_mono_sim_extension():
        pytest.skip("this cctbx has xfel_mono_sim_ext: nothing to repair")
    image = real_images("thaumatin_grid_stills", 1)[0]
    code = (
        "import sys, diffuse_cli.dials_compat as c\n"
        "c.uninstall_mono_simulation_shim()\n"
        "from dials.command_line.stills_process import run\n"
        "run(sys.argv[1:])\n"
    )
    args = [
        str(image),
        "indexing.known_symmetry.space_group=P41212",
        "indexing.known_symmetry.unit_cell=58,58,150,90,90,90",
        f"output.output_dir={tmp_path}",
    ]
    result = subprocess.run(
        [PYTHON, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert not list(tmp_path.glob("*_indexed.refl"))
    assert "No suitable indexing solution" in result.stdout + result.stderr
