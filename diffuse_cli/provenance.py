"""One resume rule for the stages (bragg_mask, extract, correct per still; merge per map).

A per-still output records a **provenance key**: a hash of the fingerprints
of everything the still's result depends on (its image, its mask file's
content, its experiment models, its reflections, the parameters that change
it, and the output schema). A rerun redoes a still exactly when the key it
would write differs from the one stored in its output (or the output is
missing or unreadable); with the same inputs it does nothing. The key is
stored in the output file itself (``.npz`` fields ``provenance_key`` and
``provenance``, the parts as JSON for a reader), so the rule is checkable
from the files alone.

Fingerprints:

* an image file: absolute path, size and modification time (ns), plus the
  index within the file (reading 6 M pixels per still just to decide to skip
  would cost as much as the work);
* an ``.npz`` (a mask, an extract): :func:`diffuse_cli.program.npz_fingerprint`
  (member names, sizes and CRC-32s from the zip directory: content, not
  mtime); any other file: sha256 of its bytes;
* an experiment: its identifier and the dictionaries of its detector, beam,
  crystal, scan and goniometer (dxtbx ``to_dict``).

Two housekeeping rules go with it (:func:`remove_temporaries`,
:func:`stale_outputs`): temporary files left by a killed run
(:func:`diffuse_cli.program.atomic_path` names them ``.<stem>.<random>.tmp<ext>``)
are removed at the start of the next run, and outputs of stills that are no
longer among the inputs are removed (or reported).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import zipfile

import numpy as np

logger = logging.getLogger("diffuse.provenance")

#: version of the key layout; bump to invalidate every stored key
KEY_VERSION = 1


def digest(obj) -> str:
    """Short sha256 (16 hex digits) of a JSON-serialisable object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_fingerprint(path: str, index: int = 0) -> dict:
    """Identity of one image in a file: absolute path, size, mtime (ns), index."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "index": int(index)}


def file_fingerprint(path: str) -> str:
    """Content identity of a file: the zip directory of an ``.npz``, else sha256 of the bytes."""
    from diffuse_cli import program

    if str(path).endswith(".npz"):
        return program.npz_fingerprint(path)
    return _bytes_digest(path)


def content_fingerprint(path: str) -> str:
    """:func:`file_fingerprint`, or for an ``.npz`` that is no zip archive (truncated, damaged)
    the digest of its bytes: an input the batch rule will record as unreadable has an identity too."""
    import zipfile

    try:
        return file_fingerprint(path)
    except zipfile.BadZipFile:
        return _bytes_digest(path)


def _bytes_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def experiment_fingerprint(experiment) -> str:
    """Identifier and models (detector, beam, crystal, scan, goniometer) of one experiment.

    Numbers are rounded to 10 significant digits: a crystal read back from an
    ``.expt`` differs from the one written in the last bits (dxtbx rebuilds
    the real-space vectors from U and B), which is no change of the model.
    """
    return models_fingerprint(experiment, ("detector", "beam", "crystal", "scan", "goniometer"), identifier=True)


def models_fingerprint(experiment, names, identifier: bool = False) -> str:
    """Some models of one experiment (e.g. detector and beam for per-detector outputs),
    rounded as in :func:`experiment_fingerprint`; identifier: include it."""
    parts = {"identifier": experiment.identifier} if identifier else {}
    for name in names:
        model = getattr(experiment, name)
        parts[name] = None if model is None else _rounded(model.to_dict())
    return digest(parts)


def _rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.10g}") + 0.0  # + 0.0: no "-0.0"
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def array_fingerprint(*arrays) -> str:
    """sha256 of the bytes (and shapes, dtypes) of numpy arrays."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def phil_values(params, names) -> dict:
    """``{name: value}`` of dotted parameter names (scopes become their repr)."""
    out = {}
    for name in names:
        obj = params
        for part in name.split("."):
            obj = getattr(obj, part)
        out[name] = _plain(obj)
    return out


def _plain(obj):
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    import libtbx.phil

    if isinstance(obj, libtbx.phil.scope_extract):
        return {k: _plain(v) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}
    text = str(obj)
    if " object at 0x" in text:
        raise TypeError(f"no stable fingerprint for {type(obj).__name__}")
    return text


def key_of(parts: dict) -> str:
    """The provenance key of a still from its parts (schema, inputs, parameters)."""
    return digest({"version": KEY_VERSION, **parts})


def npz_fields(key: str, parts: dict) -> dict:
    """The fields an ``.npz`` output stores so that :func:`is_current` can check it
    (and the program version that wrote it, for a reader)."""
    from diffuse_cli import __version__

    return {"provenance_key": np.array(key), "provenance": np.array(json.dumps(parts, sort_keys=True, default=str)),
            "program_version": np.array(str(__version__))}


def stored_key(path: str) -> str | None:
    """The provenance key stored in an ``.npz`` output, or None (missing, unreadable, older file)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["provenance_key"]) if "provenance_key" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def is_current(path: str, key: str, overwrite: bool = False, also=()) -> bool:
    """The resume rule: True when ``path`` holds ``key`` (and the files in ``also`` exist)."""
    if overwrite:
        return False
    return stored_key(path) == key and all(os.path.isfile(p) for p in also)


def remove_temporaries(directory: str) -> list[str]:
    """Remove temporary files a killed run left in ``directory`` (``.*.tmp*``); returns them."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), ".*.tmp*")):
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        logger.info("Removed %d temporary file(s) of an interrupted run in %s", len(removed), directory)
    return removed


def stale_outputs(paths, keep, action: str = "remove") -> list[str]:
    """Outputs (``paths``) of stills no longer among the inputs (not in ``keep``).

    action: ``remove`` deletes them, ``keep`` leaves them; either way each is
    logged. Returns the stale paths.
    """
    keep = {os.path.abspath(p) for p in keep}
    stale = sorted(p for p in paths if os.path.abspath(p) not in keep)
    for p in stale:
        if action == "remove":
            os.remove(p)
            logger.info("Removed %s: its still is no longer among the inputs", p)
        else:
            logger.warning("%s: its still is no longer among the inputs (kept: output.stale=keep)", p)
    return stale
