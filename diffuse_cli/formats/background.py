"""Background-rate map: ``background.npz`` (schema ``diffuse.background/1``).

Written by diffuse.correct (``background.mode=map``) from the background
images, read by diffuse.correct and diffuse.merge. Fields:

* ``schema``; ``rate`` (Npix,) float64 mean background rate (ADU/s per pixel,
  pixel order) and ``rate_variance`` ((ADU/s)²);
* ``n_images``, ``exposure_times`` (s), ``gain`` (ADU/photon);
* provenance: ``images`` (absolute paths), ``provenance_key`` and
  ``provenance`` (JSON: the images' fingerprints, gain, exposure-time
  fallback; :mod:`diffuse_cli.provenance`).
"""

from __future__ import annotations

import os

import numpy as np

from diffuse_cli.formats.common import read_npz

BACKGROUND_SCHEMA = "diffuse.background/1"
BACKGROUND_FILENAME = "background.npz"


def write_background(path, *, rate, rate_variance, exposure_times, gain: float, images, **provenance) -> None:
    """Write the background map atomically (the only writer)."""
    from diffuse_cli import program

    program.write_npz(
        path,
        schema=np.array(BACKGROUND_SCHEMA),
        rate=np.asarray(rate, dtype=np.float64),
        rate_variance=np.asarray(rate_variance, dtype=np.float64),
        n_images=np.int64(len(exposure_times)),
        exposure_times=np.asarray(exposure_times, dtype=np.float64),
        gain=np.float64(gain),
        images=np.array([os.path.abspath(p) for p in images], dtype=str),
        **provenance,
    )


def read_background(path, fields=None) -> dict:
    """The arrays of a background map (all, or ``fields``), schema checked."""
    return read_npz(path, BACKGROUND_SCHEMA, fields=fields,
                    required=("rate", "rate_variance") if fields is None else ())
