"""What every ``.npz`` artefact reader shares: open it, check its schema and fields.

A problem with a file (missing, empty, truncated, another program's, an
unknown schema, a missing field) is one line ``Sorry: <file>: <what is
wrong>``, never a traceback.
"""

from __future__ import annotations

import zipfile
import zlib

from libtbx.utils import Sorry

#: what reading a corrupt member raises (bad CRC, cut deflate stream, short read)
CORRUPT = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def check_schema(data, expected, path) -> str:
    """The file's schema; Sorry unless it is ``expected`` (a name or a tuple of names)."""
    accepted = (expected,) if isinstance(expected, str) else tuple(expected)
    if "schema" not in data.files:
        raise Sorry(f"{path}: no schema (expected {' or '.join(accepted)}); not a file of diffuse?")
    found = str(data["schema"])
    if found not in accepted:
        raise Sorry(f"{path}: schema {found!r}, expected {' or '.join(map(repr, accepted))}")
    return found


def require(data, names, path, schema: str) -> None:
    """Sorry naming the file and the fields it lacks."""
    missing = [n for n in names if n not in data.files]
    if missing:
        raise Sorry(f"{path}: {schema} file without {', '.join(missing)}; rerun the program that wrote it")


def read_npz(path, expected, fields=None, required=()) -> dict:
    """Arrays of an ``.npz`` (all, or only ``fields`` present) after checking its schema.

    required: fields that must be present (else a Sorry naming them).
    """
    from diffuse_cli import program

    with program.open_npz(path) as data:  # missing, empty, truncated: Sorry naming it
        schema = check_schema(data, expected, path)
        require(data, required, path, schema)
        names = data.files if fields is None else [n for n in fields if n in data.files]
        out = {}
        for name in names:
            try:
                out[name] = data[name]
            except CORRUPT as e:  # a corrupt member (bad CRC, cut deflate stream)
                raise Sorry(f"{path}: field {name} is unreadable ({type(e).__name__}); is the file truncated? "
                            "Rerun the program that wrote it") from None
        return out
