"""Each still in its own log file and with its own random seed.

DIALS logs and prints a lot per still, and its indexing draws random numbers:
both are tied to the still (its tag), not to the process that happens to run
it, so serial, multiprocess and MPI runs give identical per-still results.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os

import numpy as np


@contextlib.contextmanager
def still_log(path: str | None):
    """Send DIALS logging and stdout of one still to its own log file."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.DEBUG)
    names = ("dials", "dxtbx")
    saved = {}
    for name in names:
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    fh = handler.stream
    try:
        with contextlib.redirect_stdout(fh):
            yield
    finally:
        for name in names:
            lg = logging.getLogger(name)
            lg.removeHandler(handler)
            handlers, level, propagate = saved[name]
            for h in handlers:
                lg.addHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate
        handler.close()


def seed_random_generators(tag: str) -> None:
    """Seed Python, numpy and scitbx RNGs from the image tag.

    DIALS indexing draws random numbers; seeding per still makes a still's
    result independent of which process ran it and what it ran before, so
    serial, multiprocess and MPI runs agree.
    """
    import random

    from scitbx.array_family import flex

    seed = int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)
    random.seed(seed)
    np.random.seed(seed)
    flex.set_random_seed(seed)
