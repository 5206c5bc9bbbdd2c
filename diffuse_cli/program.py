"""Conventions shared by every ``diffuse.*`` program.

A program module under :mod:`diffuse_cli.command_line` looks like a DIALS one::

    phil_scope = program.parse_phil('''
        ... program parameters ...
        output { directory = . .type = path }
    ''', program="simulate")

    @program.entry_point("simulate")
    def run(args=None, phil=phil_scope):
        parser = program.ArgumentParser(phil=phil, usage=..., epilog=__doc__)
        params, options = parser.parse_args(args)
        program.configure_logging("simulate", params, options)
        ...

This module gives: DIALS-style PHIL parsing (``key=value``, ``*.phil``,
``-c``, ``-h``, ``-a``/``-e``), one-line ``Sorry`` errors for user mistakes
(including a missing input file), console + file logging for the ``diffuse``
logger, the version banner, ``nproc`` resolution, tqdm progress bars that
switch themselves off when stdout is not a terminal, and (from :mod:`diffuse_cli.atomic_io`)
atomic file writes.
"""

from __future__ import annotations

import copyreg
import functools
import logging
import os
import re
import sys
import time
from typing import Callable, Iterable, Iterator

import diffuse_cli  # noqa: F401  (sets LIBTBX_BUILD and the DIALS shims)

import libtbx.phil
from libtbx.utils import Sorry

import dials.util.log
from dials.util.options import ArgumentParser as _DialsArgumentParser

from diffuse_cli.atomic_io import (  # noqa: F401  (re-exported: programs use program.write_json etc.)
    FAST_ZIP_LEVEL,
    _as_one_line,
    atomic_path,
    image_errors,
    npz_fingerprint,
    open_npz,
    read_raw_data,
    save_figure,
    write_experiments,
    write_json,
    write_npz,
    write_pickle,
    write_reflections,
    write_text,
)

ISSUE_TRACKER = "https://github.com/diffuse-cli/diffuse/issues"

logger = logging.getLogger("diffuse")

# Parameters every program has; included into each program's scope.
COMMON_PHIL = """
nproc = 1
  .type = int(value_min=0)
  .help = "Number of local processes. 0 or Auto means the number of CPU cores."
output {
  log = None
    .type = path
    .help = "Log file. Default: diffuse.<program>.log in the working directory."
}
"""


def parse_phil(text: str, program: str | None = None, common: bool = True):
    """Parse a program's PHIL, appending the parameters every program has."""
    body = text + (COMMON_PHIL if common else "")
    return libtbx.phil.parse(body, process_includes=True)


def _make_sorry(message):
    return Sorry(message)


# libtbx gives Sorry __module__ "builtins" (for a short "Sorry:" in tracebacks),
# so plain pickle cannot find the class: a Sorry raised in a worker process
# would reach the parent as "Can't pickle <class 'Sorry'>".
copyreg.pickle(Sorry, lambda e: (_make_sorry, (str(e),)))

#: why dxtbx cannot use an image whose name has no digits, and what to do
TEMPLATE_HINT = ("no digits in the file name, so DIALS cannot make a file-name template: "
                 "rename it (e.g. image_00001.cbf) or import it with dials.import and give the .expt")

_PHIL_EXTENSIONS = (".phil", ".param", ".params", ".eff", ".def")


def _where(text: str) -> tuple[str, str]:
    """(message without libtbx's location suffix, "file, line n" or "")."""
    m = re.search(r'\s*\((?:at )?file "([^"]+)", line (\d+)\)\s*$|\s*at file "([^"]+)", line (\d+)\s*$', text)
    if m:
        f, n = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        return text[: m.start()], f"{f}, line {n}"
    return re.sub(r"\s*\(command line argument, line \d+\)\s*$", "", text), ""


def phil_error_message(path: str, error: BaseException) -> str:
    """One line ``<parameter>: <what is wrong>`` from a libtbx PHIL error."""
    text = str(error).strip()
    first, _, rest = text.partition("\n")
    first, where = _where(first)
    m = re.match(r'Error interpreting \S+="(.*)" as an? (numeric|integer) expression', first)
    b = re.match(r'One True or False value expected, \S+="(.*)" found', first)
    n = re.match(r"(Not enough|Too many) values for \S+: (.*)", first)
    if m:
        what = f'"{m.group(1)}" is not {"a number" if m.group(2) == "numeric" else "an integer"}'
    elif b:
        what = f'"{b.group(1)}" is not True or False'
    elif n:
        what = f"{n.group(1).lower()} values: {n.group(2)}"
    elif re.match(r"Not a possible choice for", first):
        value = first.split(":", 1)[1].strip() if ":" in first else ""
        choices = [c.strip().lstrip("*") for c in rest.splitlines()[1:] if c.strip()]
        what = f'"{value}" is not one of: {", ".join(choices)}'
    else:
        m = re.match(r"\S+ element is (less|greater) than the (minimum|maximum) allowed value: (\S+) [<>] (\S+)", first)
        if m:
            what = f"{m.group(3)} is {m.group(1)} than the {m.group(2)} allowed value {m.group(4)}"
        else:
            what = first
    return f"{path}: {what}" + (f" ({where})" if where else "")


def _unknown_parameter_message(arg: str, error: BaseException, system_phil) -> str:
    name = arg.split("=", 1)[0].strip()
    text = str(error).strip().splitlines()[0]
    if text.startswith("Unknown command line parameter definition"):
        import difflib

        paths = [d.path for d in system_phil.all_definitions()]
        leaves = {p.rsplit(".", 1)[-1]: p for p in paths}
        close = difflib.get_close_matches(name, paths, n=1) or [
            leaves[c] for c in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(leaves), n=1)]
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{name}: unknown parameter{hint}; -c lists the parameters"
    if text.startswith("Ambiguous parameter definition"):
        return f"{name}: ambiguous parameter name, give its full path (-c lists the parameters)"
    return f"{arg}: {text}"


class ArgumentParser(_DialsArgumentParser):
    """DIALS ArgumentParser whose user mistakes end in one line per culprit.

    * a missing input file: ``Sorry: File not found: x.expt``;
    * a PHIL file that does not parse or names unknown parameters, a
      ``key=value`` with an unknown name, a wrong type or a value out of range:
      ``Sorry: <file or parameter>: <what is wrong>``;
    * a file DIALS could not read: ``Sorry: <file>: <DIALS's reason>``, one line
      per such file, instead of DIALS's "Unable to handle" block with tracebacks;
    * ``require_crystals=True``: experiments without a crystal model (not
      indexed) are a Sorry naming the ``.expt``;
    * any scope with both ``d_min`` and ``d_max`` (or ``fit_d_min``/``fit_d_max``)
      set needs d_min < d_max.

    With no arguments at all, help is printed and ``SystemExit(0)`` raised.
    """

    def __init__(self, *args, require_crystals: bool = False, **kwargs):
        self._require_crystals = require_crystals
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, show_diff_phil=False, return_unhandled=False, **kwargs):
        if args is None:
            args = sys.argv[1:]
        args = list(args)
        if not args:
            self.print_help()
            raise SystemExit(0)
        if not ({"-h", "--help", "-c", "--show-config"} & set(args)):
            for arg in args:
                if arg.startswith("-") or "=" in arg:
                    continue
                if not os.path.exists(arg):
                    raise Sorry(f"File not found: {arg}")
            self._check_phil_arguments(args)
        try:
            params, options, unhandled = super().parse_args(
                args, show_diff_phil=show_diff_phil, return_unhandled=True, **kwargs)
        except ValueError as e:  # dxtbx, reading images given by name
            if "filename template" not in str(e):
                raise
            names = [a for a in args if not a.startswith("-") and "=" not in a and os.path.isfile(a)]
            culprit = next((a for a in names if not re.search(r"\d", os.path.basename(a))), "image files")
            raise Sorry(f"{culprit}: {TEMPLATE_HINT}") from None
        if unhandled and not return_unhandled:
            raise Sorry(self._unhandled_message(unhandled))
        self._check_experiments(params)
        check_resolution_limits(params)
        if return_unhandled:
            return params, options, unhandled
        return params, options

    def _check_phil_arguments(self, args) -> None:
        """Interpret the PHIL arguments as DIALS will, failing in one line."""
        from dials.util.phil import parse

        interpreter = self.system_phil.command_line_argument_interpreter()
        sources = []
        for arg in args:
            if arg.startswith("-"):
                continue
            if arg.endswith(_PHIL_EXTENSIONS) and os.path.isfile(arg):
                if os.path.getsize(arg) == 0:
                    continue
                try:
                    sources.append(parse(file_name=arg))
                except (RuntimeError, Sorry, ValueError, UnicodeDecodeError) as e:
                    raise Sorry(f"{arg}: not a valid PHIL file: {_where(_as_one_line(e))[0]}") from None
            elif "=" in arg and not os.path.exists(arg) and "://" not in arg:
                try:
                    sources.append(interpreter.process_arg(arg=arg))
                except (RuntimeError, Sorry) as e:
                    raise Sorry(_unknown_parameter_message(arg, e, self.system_phil)) from None
        try:
            working, unused = self.system_phil.fetch(sources=sources, track_unused_definitions=True)
        except (RuntimeError, Sorry) as e:  # e.g. a value that is not one of a choice
            m = re.search(r"for (\S+?):", str(e))
            raise Sorry(phil_error_message(m.group(1) if m else "parameters", e)) from None
        if unused:
            item = unused[0]
            where = _where(getattr(item.object, "where_str", "") or "")[1]
            file, _, line = where.rpartition(", ")
            prefix = f"{file}: " if file else ""
            raise Sorry(f"{prefix}{item.path}: unknown parameter{f' ({line})' if line else ''}; "
                        "-c lists the parameters")
        if not sources:
            return
        try:
            working.extract()
        except (RuntimeError, Sorry, ValueError):
            # find the culprit (not among the file-reading types: the parser
            # below reads those and reports their files)
            for d in working.all_definitions():
                if str(d.object.type).startswith(("experiment_list", "reflection_table")):
                    continue
                try:
                    d.object.extract()
                except (RuntimeError, Sorry, ValueError) as e:
                    raise Sorry(phil_error_message(d.path, e)) from None

    def _unhandled_message(self, unhandled) -> str:
        """One line per argument DIALS could not use, with its reason."""
        errors = getattr(self._phil_parser, "handling_errors", {})
        lines = []
        for arg in unhandled:
            errs = errors.get(arg, [])
            # the reader that matches the extension has the telling reason
            kind = "refl" if arg.endswith(".refl") else "experiment" if arg.endswith((".expt", ".json")) else ""
            matching = [e for e in errs if kind and kind in str(e.type).lower()]
            hard = [e for e in errs if not e.validation]
            if kind and errs and not matching:
                ext = os.path.splitext(arg)[1]
                lines.append(f"{arg}: this program does not read {ext} files (see -h for its inputs)")
            elif matching or hard:
                e = (matching or hard)[0]
                how = "not a valid" if e.validation else "cannot be read as"
                lines.append(f"{arg}: {how} {e.type} file: {_as_one_line(e.exception)}")
            elif errs:
                kinds = "/".join(dict.fromkeys(e.type for e in errs))
                lines.append(f"{arg}: not a valid {kinds} file ({_as_one_line(errs[0].exception)})")
            elif os.path.isdir(arg):
                lines.append(f"{arg}: this program does not take a directory here")
            else:
                lines.append(f"{arg}: not an input this program reads (nor a parameter)")
        return "\n".join(lines)

    def _check_experiments(self, params) -> None:
        if not self._require_crystals:
            return
        for wrapper in getattr(getattr(params, "input", None), "experiments", None) or []:
            missing = [i for i, e in enumerate(wrapper.data) if e.crystal is None]
            if missing:
                raise Sorry(
                    f"{wrapper.filename}: {len(missing)} of {len(wrapper.data)} experiments have no crystal "
                    "model (not indexed); give the indexed .expt from diffuse.stills_process"
                )


def _scopes(extract, prefix=""):
    """(path prefix, scope) of a PHIL extract and its sub-scopes."""
    yield prefix, extract
    for key, value in vars(extract).items():
        if key.startswith("_"):
            continue
        if isinstance(value, libtbx.phil.scope_extract):
            yield from _scopes(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, libtbx.phil.scope_extract):
                    yield from _scopes(v, f"{prefix}{key}.")


def check_resolution_limits(params, prefix: str = "") -> None:
    """Sorry when a scope sets both ``<x>d_min`` and ``<x>d_max`` with d_min >= d_max."""
    for path, scope in _scopes(params, prefix):
        for key, lo in vars(scope).items():
            if not key.endswith("d_min") or isinstance(lo, bool) or not isinstance(lo, (int, float)):
                continue
            other = key[: -len("min")] + "max"
            hi = getattr(scope, other, None)
            if isinstance(hi, (int, float)) and not isinstance(hi, bool) and lo > 0 and hi > 0 and lo >= hi:
                raise Sorry(
                    f"{path}{key}={lo:g}, {path}{other}={hi:g}: d_min must be smaller than d_max "
                    "(d_min is the high-resolution limit, in Å)"
                )


def plain_args_to_phil(args: Iterable[str], rules) -> list[str]:
    """Turn plain arguments (not ``-x``, not ``name=value``) into ``name=arg``.

    rules: ``[(match(arg) -> bool, "phil.name"), ...]``, the first match wins;
    unmatched arguments pass through to the DIALS parser. A matched path
    that does not exist is ``Sorry: File not found``.
    """
    out = []
    for arg in args:
        name = None
        if not arg.startswith("-") and "=" not in arg:
            name = next((n for match, n in rules if match(arg)), None)
        if name is None:
            out.append(arg)
            continue
        if not os.path.exists(arg):
            raise Sorry(f"File not found: {arg}")
        out.append(f"{name}={arg}")
    return out


def configure_logging(program: str, params=None, options=None) -> logging.Logger:
    """Console + file logging for DIALS and ``diffuse`` loggers, and the banner.

    ``dials.util.log.config`` wires only the ``dials``/``dxtbx`` loggers; we add
    the same handlers to ``diffuse`` so our messages reach the console and log.
    """
    verbosity = getattr(options, "verbose", 0) if options is not None else 0
    logfile = None
    if params is not None and getattr(params, "output", None) is not None:
        logfile = getattr(params.output, "log", None)
    if not logfile:
        logfile = f"diffuse.{program}.log"
    # before any work starts: an output place that cannot be used is a Sorry
    output = getattr(params, "output", None) if params is not None else None
    check_output_path(getattr(output, "directory", None), "output.directory")
    check_output_path(logfile, "output.log", directory=False)
    os.makedirs(os.path.dirname(os.path.abspath(logfile)), exist_ok=True)
    # Reset our handlers, so run() called twice from Python does not double log.
    for name in ("dials", "dxtbx", "py.warnings", "diffuse"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
            handler.close()
    dials.util.log.config(verbosity=verbosity, logfile=logfile)
    dials_logger = logging.getLogger("dials")
    for handler in dials_logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(dials_logger.level)
    logger.propagate = False
    logger.info(banner(program))
    return logger


def banner(program: str) -> str:
    from diffuse_cli import __version__
    from diffuse_cli.dials_compat import dials_version

    return f"diffuse.{program} (diffuse {__version__}, {dials_version()})"


_FILE_DATA_TYPES = ("experiment_list", "reflection_table")


def _without_file_data(scope):
    """A copy of a PHIL scope without the experiment/reflection file definitions.

    Comparing those with the defaults extracts them, i.e. reads each file again
    (twice, for a 350 MB shoebox table); they are named on the command line anyway.
    """
    objects = []
    for o in scope.objects:
        if o.is_scope:
            objects.append(_without_file_data(o))
        elif getattr(o.type, "phil_type", None) not in _FILE_DATA_TYPES:
            objects.append(o)
    return scope.customized_copy(objects=objects)


def log_diff_phil(parser) -> None:
    """Log the parameters that differ from the defaults, as DIALS programs do (input files excepted)."""
    diff = _without_file_data(parser.system_phil).fetch_diff(source=_without_file_data(parser.phil)).as_str()
    if diff:
        logger.info("The following parameters have been modified:\n\n%s", diff)


def entry_point(program: str) -> Callable:
    """Decorator for a program's ``run(args=None)``.

    * ``Sorry`` (user mistakes): when called as a console script, the message
      on stderr (whole: ours are one line per culprit) and exit code 1; when
      called from Python, the exception propagates.
    * Ctrl-C (``KeyboardInterrupt``): one line and exit code 130 (as a script).
    * Under MPI with several ranks, the failing rank stops them all.
    * Anything else is a bug: the traceback is kept and the issue tracker named.
    """

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(args=None, *a, **kw):
            as_script = args is None
            try:
                return func(args, *a, **kw)
            except Sorry as e:
                if not as_script:
                    raise
                message = "\n".join(ln.rstrip() for ln in str(e).strip().splitlines()) or "error"
                _stop_script(f"Sorry: {message}", 1)
            except KeyboardInterrupt:
                if not as_script:
                    raise
                _stop_script(f"diffuse.{program}: interrupted (Ctrl-C)", 130)
            except SystemExit:
                raise
            except Exception as e:
                text = f"Please report this error to {ISSUE_TRACKER} :"
                e.args = (f"{text} {e.args[0]}",) if len(e.args) == 1 else (text, *e.args)
                raise

        return wrapper

    return decorate


def _mpi_world():
    """MPI.COMM_WORLD when mpi4py's MPI is loaded with more than one rank, else None."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi.COMM_WORLD if mpi.COMM_WORLD.Get_size() > 1 else None


def _launcher_rank() -> int:
    """This process's rank as mpirun (Open MPI, MPICH, PMIx) tells it; 0 if none."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _stop_script(message: str, status: int) -> None:
    """Write ``message`` on stderr and exit with ``status``.

    Under MPI the other ranks may wait for this one forever, so the failing
    rank aborts them all. Rank 0 speaks first: the others wait a moment, so
    a mistake every rank finds (a bad parameter) is reported once.
    """
    comm = _mpi_world()
    if comm is not None and comm.Get_rank() != 0:
        time.sleep(1.0)
    elif comm is None and _launcher_rank() > 0:
        # under mpirun before MPI started: every rank ran the same code on the
        # same arguments and stops the same way; rank 0 tells the user
        sys.exit(status)
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    if comm is not None:
        comm.Abort(status)
    sys.exit(status)


def check_output_path(path, name: str, directory: bool = True) -> None:
    """Sorry unless ``path`` is (or can be created as) a writable directory,
    or for ``directory=False`` a file in one. Nothing is created."""
    if not path:
        return
    full = os.path.abspath(path)
    if os.path.exists(full):
        if directory and not os.path.isdir(full):
            raise Sorry(f"{name}={path}: exists and is not a directory; choose another {name}")
        if not directory and os.path.isdir(full):
            raise Sorry(f"{name}={path}: is a directory; give a file name")
        if not os.access(full if directory else os.path.dirname(full), os.W_OK):
            raise Sorry(f"{name}={path}: no permission to write there")
        return
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise Sorry(f"{name}={path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Sorry(f"{name}={path}: cannot be created, no permission to write in {parent}")


def resolve_nproc(nproc: int | None) -> int:
    """0/None/Auto means all available cores."""
    if not nproc:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return max(1, os.cpu_count() or 1)
    return int(nproc)


def progress(iterable: Iterable | None = None, **kwargs) -> Iterator:
    """tqdm that switches itself off when stdout is not a terminal."""
    from tqdm import tqdm

    kwargs.setdefault("disable", None if sys.stdout.isatty() else True)
    kwargs.setdefault("file", sys.stdout)
    return tqdm(iterable, **kwargs)


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it stops the pool),
    not every worker's to print a traceback for."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def rank_map(func: Callable, items, comm=None) -> list:
    """``[func(x) for x in items]``; under MPI (``comm``) each rank computes every size-th
    item and every rank gets the whole list, in order (per-file checks that every rank needs)."""
    items = list(items)
    if comm is None or comm.Get_size() == 1:
        return [func(x) for x in items]
    rank, size = comm.Get_rank(), comm.Get_size()
    results: dict = {}
    for part in comm.allgather({i: func(items[i]) for i in range(rank, len(items), size)}):
        results.update(part)
    return [results[i] for i in range(len(items))]


def parallel_map(func: Callable, items, nproc: int, desc: str, **progress_kwargs) -> list:
    """``[func(x) for x in items]`` in order, over ``nproc`` forked processes.

    Fork: workers inherit module-level state set up by the caller (geometry,
    factors, tables) without pickling it. A progress bar either way.
    """
    items = list(items)
    nproc = min(int(nproc), len(items))
    if nproc > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(nproc, initializer=ignore_sigint) as pool:
            return list(progress(pool.imap(func, items), total=len(items), desc=desc, **progress_kwargs))
    return [func(x) for x in progress(items, desc=desc, **progress_kwargs)]


def unique_paths(paths) -> list:
    """Paths in their first order, without repeats of the same file (by absolute path)."""
    seen, unique = set(), []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique
