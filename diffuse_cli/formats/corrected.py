"""Per-still corrections: ``corrected/<still>.npz`` (schema ``diffuse.correct/3``),
and plain observations (schema ``diffuse.observations/1``).

A corrected still is written by diffuse.correct and read by diffuse.merge
(``corrections.load_observations``). It holds no pixels: the counts, mask
and A stay in the extract file it refers to. Fields:

* ``schema``, ``still_id``, ``n_pixels``, ``n_used``, ``geometry_key``,
  ``factors_file`` (``factors_<key>.npz`` beside it);
* the reference to its extract: ``extract_file`` (relative to the corrected
  file), ``extract_file_absolute`` and ``extract_fingerprint``
  (``program.npz_fingerprint`` of the extract's content);
* per-still scalars: ``exposure_time`` (s), ``normalisation`` (exposure_time,
  incident_photons or unit) and ``normalisation_value`` N, ``gain``,
  ``attenuation_mu_per_mm`` (only when its wavelength is not the factors
  file's reference), ``background_mode``, ``background_constant`` and its
  variance (ADU, ADU²), ``background_file``;
* identity: ``experiment_index``, ``image_path``, ``image_index``, ``frame``;
* provenance: ``provenance_key`` and ``provenance`` (JSON: the extract's
  fingerprint, the experiment models, the factors and background files'
  keys, the correction parameters; :mod:`diffuse_cli.provenance`).

Plain observations (``diffuse.observations/1``, for tests and other
programs' data) hold ``hkl`` (N, 3), ``I`` (N,), ``sigma`` (N,) directly.
"""

from __future__ import annotations

import os

import numpy as np

from libtbx.utils import Sorry

from diffuse_cli.formats.common import CORRUPT, read_npz

CORRECT_SCHEMA = "diffuse.correct/3"
OBSERVATIONS_SCHEMA = "diffuse.observations/1"
#: schemas diffuse.merge takes as per-still input
STILL_SCHEMAS = (CORRECT_SCHEMA, OBSERVATIONS_SCHEMA)
REQUIRED = ("still_id", "n_pixels", "extract_file", "extract_file_absolute", "extract_fingerprint", "factors_file",
            "normalisation", "normalisation_value", "gain", "background_mode", "experiment_index")


def write_corrected(path, **fields) -> None:
    """Write one corrected still atomically (the only writer); ``fields`` as in the module doc."""
    from diffuse_cli import program

    program.write_npz(path, schema=np.array(CORRECT_SCHEMA), **fields)


def read_corrected(path, fields=None) -> dict:
    """The arrays of a corrected still (all, or ``fields``), schema and fields checked."""
    return read_npz(path, CORRECT_SCHEMA, fields=fields,
                    required=REQUIRED if fields is None else [f for f in REQUIRED if f in fields])


def schema_of(path) -> str:
    """The schema of any ``.npz`` ("" when it has none); Sorry if unreadable."""
    from diffuse_cli import program

    with program.open_npz(path) as z:
        return str(z["schema"]) if "schema" in z.files else ""


def is_corrected_file(path) -> bool:
    """True for a corrected still (any ``diffuse.correct/`` schema), False for anything
    else, unreadable files included (a probe of directory contents, never a Sorry)."""
    from diffuse_cli.formats.common import CORRUPT

    try:
        with np.load(path, allow_pickle=False) as z:
            return "schema" in z.files and str(z["schema"]).startswith("diffuse.correct/")
    except CORRUPT:
        return False


def probe(path) -> str:
    """What an ``.npz`` in a corrected directory is: ``still`` (a per-still input of
    diffuse.merge), ``other`` (another file), or ``unreadable``; never a Sorry."""
    from diffuse_cli.formats.common import CORRUPT

    try:
        with np.load(path, allow_pickle=False) as z:
            schema = str(z["schema"]) if "schema" in z.files else ""
    except CORRUPT:
        return "unreadable"
    return "still" if schema in STILL_SCHEMAS else "other"


def read_observations(path) -> dict:
    """The arrays (``hkl``, ``I``, ``sigma``, ...) of a plain-observations file, checked."""
    z = read_npz(path, OBSERVATIONS_SCHEMA, required=("hkl", "I", "sigma"))
    z.pop("schema")
    return z


def extract_path(path, still: dict, check: bool = True) -> str:
    """The extract file a corrected still refers to.

    Looked up relative to the corrected file first (a moved project tree
    still works), then at its absolute path. check: its content fingerprint
    must be the one recorded (else a Sorry: rerun diffuse.correct).
    """
    from diffuse_cli import program

    directory = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(directory, str(still["extract_file"])), str(still["extract_file_absolute"])]
    found = next((p for p in candidates if os.path.exists(p)), None)
    if found is None:
        raise Sorry(f"{path}: its extracted pixels {candidates[0]} are missing (diffuse.correct "
                    "keeps the counts in diffuse.extract's files; keep extracted/ beside corrected/)")
    if not check:
        return found
    try:
        fingerprint = program.npz_fingerprint(found)
    except CORRUPT as e:
        raise Sorry(f"{found}: not a readable .npz file ({type(e).__name__}); rerun diffuse.extract") from None
    if fingerprint != str(still["extract_fingerprint"]):
        raise Sorry(f"{path}: {found} changed since diffuse.correct ran; run diffuse.correct again")
    return found
