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
switch themselves off when stdout is not a terminal, and atomic file writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import sys
import tempfile
from typing import Any, Callable, Iterable, Iterator

import diffuse_cli  # noqa: F401  (sets LIBTBX_BUILD and the DIALS shims)

import libtbx.phil
from libtbx.utils import Sorry

import dials.util.log
from dials.util.options import ArgumentParser as _DialsArgumentParser

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


class ArgumentParser(_DialsArgumentParser):
    """DIALS ArgumentParser that reports a missing input file in one line.

    DIALS turns a missing positional file into a multi-line Sorry that embeds
    a traceback; users of a pipeline want ``Sorry: File not found: x.expt``.
    With no arguments at all, help is printed and ``SystemExit(0)`` raised.
    """

    def parse_args(self, args=None, show_diff_phil=False, **kwargs):
        if args is None:
            args = sys.argv[1:]
        args = list(args)
        if not args:
            self.print_help()
            raise SystemExit(0)
        for arg in args:
            if arg.startswith("-") or "=" in arg:
                continue
            if not os.path.exists(arg):
                raise Sorry(f"File not found: {arg}")
        return super().parse_args(args, show_diff_phil=show_diff_phil, **kwargs)


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


def log_diff_phil(parser) -> None:
    """Log the parameters that differ from the defaults, as DIALS programs do."""
    diff = parser.diff_phil.as_str()
    if diff:
        logger.info("The following parameters have been modified:\n\n%s", diff)


def entry_point(program: str) -> Callable:
    """Decorator for a program's ``run(args=None)``.

    * ``Sorry`` (user mistakes): when called as a console script, one line on
      stderr and exit code 1; when called from Python, the exception propagates.
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
                message = str(e).strip().splitlines()[0] if str(e).strip() else "error"
                sys.stderr.write(f"Sorry: {message}\n")
                sys.exit(1)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                text = f"Please report this error to {ISSUE_TRACKER} :"
                e.args = (f"{text} {e.args[0]}",) if len(e.args) == 1 else (text, *e.args)
                raise

        return wrapper

    return decorate


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


def parallel_map(func: Callable, items, nproc: int, desc: str, **progress_kwargs) -> list:
    """``[func(x) for x in items]`` in order, over ``nproc`` forked processes.

    Fork: workers inherit module-level state set up by the caller (geometry,
    factors, tables) without pickling it. A progress bar either way.
    """
    items = list(items)
    nproc = min(int(nproc), len(items))
    if nproc > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(nproc) as pool:
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


# ---------------------------------------------------------------- atomic output


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it into place on success.

    An interrupted write leaves at most a ``.tmp`` file, never a truncated
    ``path`` that a rerun would trust.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    # keep the real suffix last: some writers (np.savez, dxtbx) key on it
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
    os.close(fd)
    # mkstemp makes 0600 files; give outputs the usual umask-based permissions
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# zlib level 1: ~5x faster than numpy's default level 6 for ~10 % larger files
FAST_ZIP_LEVEL = 1


def write_npz(path, compressed: bool = True, compresslevel: int | None = None, **arrays) -> None:
    """Write ``arrays`` to an ``.npz`` atomically (readable by ``np.load``).

    compressed: deflate each array; compresslevel: zlib level (default: numpy's
    ``savez_compressed``, level 6; ``FAST_ZIP_LEVEL`` for per-still files).
    """
    import zipfile

    import numpy as np

    if not compressed:
        method, level = zipfile.ZIP_STORED, None
    else:
        method, level = zipfile.ZIP_DEFLATED, compresslevel
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", method, compresslevel=level) as zf:
            for name, arr in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)


def npz_fingerprint(path) -> str:
    """Identity of an ``.npz``'s content from its zip directory (member names,
    sizes and CRC-32s): cheap, and unchanged when the file is copied or moved."""
    import zlib
    import zipfile

    with zipfile.ZipFile(path) as zf:
        listing = sorted((i.filename, i.file_size, i.CRC) for i in zf.infolist())
    return f"{zlib.crc32(repr(listing).encode()):08x}"


def write_pickle(path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)


def write_json(path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def write_experiments(path, experiments) -> None:
    with atomic_path(path) as tmp:
        experiments.as_file(tmp)


def write_reflections(path, reflections) -> None:
    with atomic_path(path) as tmp:
        reflections.as_file(tmp)


def save_figure(path, fig) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
