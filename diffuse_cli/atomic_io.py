"""Atomic output and guarded input of the ``diffuse.*`` programs.

Every file a program writes goes through :func:`atomic_path` (a temporary
file beside the target, renamed into place on success), so an interrupted run
never leaves a truncated file that a rerun would trust. Reading an ``.npz``
or an image turns a damaged file into one ``Sorry`` naming it. All names are
importable from :mod:`diffuse_cli.program` too.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from typing import Any, Iterator

import diffuse_cli  # noqa: F401  (sets LIBTBX_BUILD and the DIALS shims)

from libtbx.utils import Sorry


def _as_one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(e).__name__


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


def open_npz(path):
    """``np.load`` of an ``.npz`` (no pickles). A missing, empty, truncated or
    foreign file is a Sorry naming it, not a zipfile traceback."""
    import zipfile

    import numpy as np

    if not os.path.exists(path):
        raise Sorry(f"File not found: {path}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise Sorry(f"{path}: empty file, not an .npz; rerun the program that wrote it")
    try:
        data = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        reason = _as_one_line(e) if zipfile.is_zipfile(path) or isinstance(e, zipfile.BadZipFile) else "not a zip archive"
        raise Sorry(f"{path}: not a readable .npz file ({reason}); is it truncated? "
                    "Rerun the program that wrote it") from None
    if not hasattr(data, "files"):
        raise Sorry(f"{path}: a single .npy array, not an .npz file")
    return data


@contextlib.contextmanager
def image_errors(imageset, index: int) -> Iterator[None]:
    """Reading image ``index`` of ``imageset`` inside: dxtbx's errors for an
    unreadable (truncated, corrupt) file become a Sorry naming the file."""
    try:
        yield
    except (RuntimeError, OSError, ValueError) as e:
        try:
            where = imageset.get_path(index)
        except (RuntimeError, IndexError):
            where = f"image {index}"
        raise Sorry(f"{where}: cannot read the pixels ({_as_one_line(e)}); is the file truncated?") from None


def read_raw_data(imageset, index: int):
    """``imageset.get_raw_data(index)``, an unreadable image a Sorry naming the file."""
    with image_errors(imageset, index):
        return imageset.get_raw_data(index)


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
