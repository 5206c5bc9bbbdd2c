"""The hkl-grid accumulator of diffuse.merge: Σw, Σw·I and counts per voxel, and the merged map.

Observations (fractional hkl, intensity I, σ) are accumulated still by still
into dense **P1** arrays over the whole grid (:class:`diffuse_cli.grid.HKLGrid`)
for two half-datasets: Σw, Σw·I and the count, with w = 1/σ². Memory is
bounded by the grid, never by the number of observations. Folding the P1 sums
onto the asymmetric unit with the grid's ASU map gives the Laue-group merge.
Merged voxel value: I = Σw·I / Σw, σ = 1/sqrt(Σw).

The per-observation hot loop (hkl → voxel → three sums) is a numba kernel
when numba is importable, with a numpy ``unique``/``bincount`` fallback that
gives the same sums to rounding. MPI: the arrays are summed with ``Allreduce``.

The cached merge (merging._scale_and_merge_cached) keeps nothing over the whole
grid: its sums and map per compact ASU voxel are in :mod:`diffuse_cli.merge_compact`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffuse_cli.grid import HKLGrid

try:  # optional accelerator (Debian: python3-numba)
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on the installation
    numba = None
    HAVE_NUMBA = False


# ---------------------------------------------------------------- kernels


def _kernel_py(hkl, I, sig, factor, weight, ndiv, offset, shape, acc):
    """One pass: hkl → voxel, skip invalid, add (w, w·I, 1, w²σ²) to acc[voxel] (numba-compiled).

    I and σ are multiplied by ``factor`` (1/scale). ``weight``: empty for
    inverse-variance weights w = 1/σ² (σ > 0 required), else the per-observation
    weight (w > 0 required; σ = 0 allowed, e.g. a pixel with zero counts).
    acc: (n_voxels, 4) float64, interleaved so one voxel is one cache line.
    """
    n0, n1, n2 = shape[0], shape[1], shape[2]
    nf = factor.shape[0]
    has_w = weight.shape[0] > 0
    nin = 0
    for i in range(hkl.shape[0]):
        f = factor[0] if nf == 1 else factor[i]
        s = sig[i] * f
        v = I[i] * f
        if not np.isfinite(v) or not np.isfinite(s):
            continue
        if has_w:
            w = np.float64(weight[i])
            if not (w > 0.0) or not np.isfinite(w) or s < 0.0:
                continue
        else:
            if not (s > 0.0):
                continue
            w = 1.0 / (np.float64(s) * np.float64(s))
        u0 = np.int64(np.rint(hkl[i, 0] * ndiv[0])) + offset[0]
        u1 = np.int64(np.rint(hkl[i, 1] * ndiv[1])) + offset[1]
        u2 = np.int64(np.rint(hkl[i, 2] * ndiv[2])) + offset[2]
        if u0 < 0 or u0 >= n0 or u1 < 0 or u1 >= n1 or u2 < 0 or u2 >= n2:
            continue
        k = (u0 * n1 + u1) * n2 + u2
        acc[k, 0] += w
        acc[k, 1] += w * np.float64(v)
        acc[k, 2] += 1.0
        acc[k, 3] += w * w * np.float64(s) * np.float64(s)
        nin += 1
    return nin


_kernel_nb = numba.njit(nogil=True, cache=True)(_kernel_py) if HAVE_NUMBA else None


def voxel_flat(grid: HKLGrid, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat voxel index (N,) int64 of each hkl (rounded in hkl's own dtype), and in-grid flag."""
    hkl = np.asarray(hkl)
    dt = hkl.dtype if hkl.dtype in (np.float32, np.float64) else np.float64
    ndiv = np.asarray(grid.ndiv, dtype=dt)
    u = np.rint(hkl.astype(dt, copy=False) * ndiv).astype(np.int64)
    u += np.asarray(grid.hkl_max, dtype=np.int64) * np.asarray(grid.ndiv)
    shape = np.asarray(grid.shape)
    inside = np.all((u >= 0) & (u < shape), axis=-1)
    flat = (u[:, 0] * shape[1] + u[:, 1]) * shape[2] + u[:, 2]
    flat[~inside] = -1
    return flat, inside


def _kernel_numpy(grid, hkl, I, sig, factor, weight, acc):
    """numpy fallback of :func:`_kernel_py`: compress the chunk's voxels with np.unique, then bincount.

    Avoids grid-sized temporaries per chunk (a bincount with minlength =
    n_voxels costs O(grid) per call).
    """
    flat, inside = voxel_flat(grid, hkl)
    f = factor if factor.shape[0] > 1 else factor[0]
    s = sig * f
    v = I * f
    ok = inside & np.isfinite(v) & np.isfinite(s)
    if weight.shape[0] > 0:
        w = weight.astype(np.float64)
        ok &= (w > 0) & np.isfinite(w) & (s >= 0)
    else:
        ok &= s > 0
        with np.errstate(divide="ignore"):
            w = 1.0 / (s.astype(np.float64) ** 2)
    flat = flat[ok]
    s = s[ok].astype(np.float64)
    w = w[ok]
    uniq, inv = np.unique(flat, return_inverse=True)
    acc[uniq, 0] += np.bincount(inv, w, minlength=len(uniq))
    acc[uniq, 1] += np.bincount(inv, w * v[ok].astype(np.float64), minlength=len(uniq))
    acc[uniq, 2] += np.bincount(inv, minlength=len(uniq))
    acc[uniq, 3] += np.bincount(inv, w * w * s * s, minlength=len(uniq))
    return int(ok.sum())


# ---------------------------------------------------------------- accumulator


class Accumulator:
    """Dense P1 sums over the grid for ``n_halves`` half-datasets.

    ``acc`` (n_halves, n_voxels, 4) float64 holds Σw, Σw·I, the count (exact
    in float64 up to 2⁵³) and Σw²σ² interleaved per voxel: 32 bytes ×
    n_halves per voxel. ``sw``, ``swi``, ``cnt``, ``sw2s2`` are views
    (n_halves, n_voxels). The merged value is Σw·I/Σw with σ = √(Σw²σ²)/Σw,
    which is 1/√Σw for inverse-variance weights w = 1/σ².
    """

    def __init__(self, grid: HKLGrid, n_halves: int = 2, use_numba: bool | None = None):
        self.grid = grid
        n = grid.n_voxels
        self.acc = np.zeros((n_halves, n, 4))
        self.use_numba = HAVE_NUMBA if use_numba is None else (use_numba and HAVE_NUMBA)
        self.n_added = 0
        self._ndiv = np.asarray(grid.ndiv, dtype=np.float64)
        self._offset = np.asarray(grid.hkl_max, dtype=np.int64) * np.asarray(grid.ndiv)
        self._shape = np.asarray(grid.shape, dtype=np.int64)

    # views of the interleaved columns of acc
    sw = property(lambda self: self.acc[..., 0], doc="Σw (n_halves, n_voxels)")
    swi = property(lambda self: self.acc[..., 1], doc="Σw·I (n_halves, n_voxels)")
    cnt = property(lambda self: self.acc[..., 2], doc="count (n_halves, n_voxels)")
    sw2s2 = property(lambda self: self.acc[..., 3], doc="Σw²σ² (n_halves, n_voxels)")

    def add(self, hkl, intensity, sigma, factor=1.0, half: int = 0,
            chunk: int = 4_000_000, weight=None) -> int:
        """Accumulate observations (hkl (N,3) fractional; I, σ (N,)).

        factor: scalar or (N,) multiplier applied to I and σ (1/scale).
        weight: None for inverse-variance weights 1/(σ·factor)², or (N,)
        weights of the scaled observations (see :func:`model_variance`).
        Observations off the grid, with non-finite values, or with σ ≤ 0
        (weight None) / weight ≤ 0 are skipped. Returns the number accumulated.
        """
        hkl = np.ascontiguousarray(hkl)
        if hkl.dtype not in (np.float32, np.float64):
            hkl = hkl.astype(np.float64)
        I = np.ascontiguousarray(intensity)
        s = np.ascontiguousarray(sigma)
        if I.dtype not in (np.float32, np.float64):
            I = I.astype(np.float64)
        if s.dtype != I.dtype:
            s = s.astype(I.dtype)
        f = np.ascontiguousarray(np.atleast_1d(np.asarray(factor, dtype=np.float64)))
        wt = (np.empty(0) if weight is None
              else np.ascontiguousarray(np.asarray(weight, dtype=np.float64)))
        n = len(I)
        total = 0
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            fc = f if f.shape[0] == 1 else f[a:b]
            wc = wt if wt.shape[0] == 0 else wt[a:b]
            if self.use_numba:
                nd = self._ndiv.astype(hkl.dtype)
                total += _kernel_nb(hkl[a:b], I[a:b], s[a:b], fc, wc, nd, self._offset,
                                    self._shape, self.acc[half])
            else:
                total += _kernel_numpy(self.grid, hkl[a:b], I[a:b], s[a:b], fc, wc,
                                       self.acc[half])
        self.n_added += total
        return total

    def reduce(self, comm) -> None:
        """Sum the arrays over all MPI ranks (in place)."""
        if comm is None or comm.Get_size() == 1:
            return
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, self.acc, op=MPI.SUM)
        self.n_added = comm.allreduce(self.n_added, op=MPI.SUM)

    def merge(self, lut: np.ndarray, factor: float = 1.0, hand: np.ndarray | None = None) -> "MergedMap":
        """Fold the P1 sums onto the ASU (lut from grid_asu_map) and merge.

        factor multiplies the merged I and σ (overall scale normalisation).
        hand: from ``grid_asu_map(..., return_hand=True)``; then the Friedel
        means (h's side and −h's side of each orbit, merged separately in the
        point group without inversion) are kept for statistics too.
        """
        n = self.grid.n_voxels
        # only voxels that received observations contribute
        total_cnt = self.cnt.sum(axis=0)
        touched = np.flatnonzero((total_cnt > 0) & (lut >= 0))
        dest = lut[touched]
        cnt = np.rint(np.bincount(dest, total_cnt[touched], minlength=n)).astype(np.int64)
        del total_cnt
        sw = np.zeros(n)
        swi = np.zeros(n)
        sw2s2 = np.zeros(n)
        half_I = []
        for h in range(self.sw.shape[0]):
            a = np.bincount(dest, self.sw[h][touched], minlength=n)
            b = np.bincount(dest, self.swi[h][touched], minlength=n)
            half_I.append(_mean(a, b, None, factor)[0].astype(np.float32))  # statistics only
            sw += a
            swi += b
            sw2s2 += np.bincount(dest, self.sw2s2[h][touched], minlength=n)
            del a, b
        friedel_I = []
        if hand is not None:
            hand_t = hand[touched]
            sw_t = self.sw.sum(axis=0)[touched]
            swi_t = self.swi.sum(axis=0)[touched]
            for side in (1, -1):
                sel = hand_t == side
                a = np.bincount(dest[sel], sw_t[sel], minlength=n)
                b = np.bincount(dest[sel], swi_t[sel], minlength=n)
                friedel_I.append(_mean(a, b, None, factor)[0].astype(np.float32))
            del hand_t, sw_t, swi_t
        del dest, touched
        I, sig = _mean(sw, swi, sw2s2, factor)
        return MergedMap(self.grid, lut, I, sig, cnt, half_I, friedel_I)


def _mean(sw, swi, sw2s2, factor):
    """Weighted mean Σw·I/Σw and its σ = √(Σw²σ²)/Σw (σ NaN when sw2s2 is None)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        I = np.where(sw > 0, swi / sw, np.nan) * factor
        if sw2s2 is None:
            return I, None
        sig = np.where(sw > 0, np.sqrt(sw2s2) / sw, np.nan) * factor
    return I, sig


@dataclass
class MergedMap:
    """Merged values on ASU voxels (arrays over the flat grid; NaN elsewhere).

    ``I``, ``sigma``, ``counts`` are defined at ASU-representative voxels;
    :meth:`expand` fills every grid voxel from its representative.
    ``half_I``: list of the half-dataset means (same layout as ``I``, float32).
    ``friedel_I``: [h's side, −h's side] means, or [] (see Accumulator.merge).
    """

    grid: HKLGrid
    lut: np.ndarray
    I: np.ndarray
    sigma: np.ndarray
    counts: np.ndarray
    half_I: list = field(default_factory=list)
    friedel_I: list = field(default_factory=list)

    def asu_voxels(self) -> np.ndarray:
        """Flat indices of ASU-representative voxels inside the resolution range."""
        return np.flatnonzero(self.lut == np.arange(self.lut.size))

    def compact(self) -> dict:
        """voxels (:meth:`asu_voxels`) and I, sigma, counts, half_I, friedel_I at them."""
        vox = self.asu_voxels()
        return {"voxels": vox, "I": self.I[vox], "sigma": self.sigma[vox], "counts": self.counts[vox],
                "half_I": [h[vox] for h in self.half_I], "friedel_I": [h[vox] for h in self.friedel_I]}

    def expand_slab(self, values, i0: int, i1: int, fill=np.nan, dtype=None) -> np.ndarray:
        """Values (over the flat grid, or at :meth:`asu_voxels`) on the grid slab h-index [i0, i1)."""
        values = self.I if values is None else np.asarray(values)
        if values.size != self.lut.size:  # compact (at the ASU voxels)
            flat = np.full(self.lut.size, fill, dtype=np.result_type(values, type(fill)))
            flat[self.asu_voxels()] = values
            values = flat
        s = self.grid.shape
        lut = self.lut[i0 * s[1] * s[2]:i1 * s[1] * s[2]]
        dt = np.result_type(values, type(fill)) if dtype is None else dtype
        out = np.full(lut.size, fill, dtype=dt)
        ok = lut >= 0
        out[ok] = values.ravel()[lut[ok]]
        return out.reshape(i1 - i0, s[1], s[2])

    def expand(self, values: np.ndarray | None = None, fill=np.nan) -> np.ndarray:
        """Values at representatives copied to every grid voxel, shape grid.shape."""
        values = self.I if values is None else values
        out = np.full(self.lut.size, fill, dtype=np.result_type(values, type(fill)))
        ok = self.lut >= 0
        out[ok] = values[self.lut[ok]]
        return out.reshape(self.grid.shape)

    def gather(self, flat: np.ndarray) -> np.ndarray:
        """Merged I at the ASU representative of each flat grid index (NaN if none)."""
        rep = self.lut[flat]
        out = np.full(len(flat), np.nan)
        ok = rep >= 0
        out[ok] = self.I[rep[ok]]
        return out
