"""What :func:`diffuse_cli.merging.scale_and_merge` reads: a number of stills and a loader
(:class:`StillSource`), in memory (:class:`ListSource`) or from flat arrays with a still
index per observation (:class:`ArraySource`), and one still's observations reindexed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


class StillSource(Protocol):
    """What the merger needs from the data: a number of stills and a loader."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> dict:  # keys hkl (N,3), I (N,), sigma (N,)
        ...


@dataclass
class ListSource:
    """In-memory stills (tests, small data): list of dicts with hkl, I, sigma."""

    stills: Sequence[dict]

    def __len__(self):
        return len(self.stills)

    def load(self, i):
        return self.stills[i]


class ArraySource:
    """Observations of many stills in flat arrays, with a still index per observation.

    hkl (N, 3), I (N,), sigma (N,), still (N,) int. Stills are numbered by
    their order of first appearance in ``np.unique(still)``.
    """

    def __init__(self, hkl, I, sigma, still):
        still = np.asarray(still)
        self.ids, inverse = np.unique(still, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(self.ids) + 1))
        self._slices = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.hkl, self.I, self.sigma = np.asarray(hkl), np.asarray(I), np.asarray(sigma)

    def __len__(self):
        return len(self.ids)

    def load(self, i):
        sel = self._slices[i]
        return {"hkl": self.hkl[sel], "I": self.I[sel], "sigma": self.sigma[sel]}


def _loaded(source, i, reindex):
    """Still i's (hkl, I, σ, variance per intensity or None), reindexed."""
    obs = source.load(i)
    hkl = obs["hkl"]
    if reindex is not None and reindex[i] is not None:
        hkl = np.asarray(hkl) @ np.asarray(reindex[i]).astype(np.asarray(hkl).dtype)
    return hkl, obs["I"], obs["sigma"], obs.get("variance_per_intensity")
