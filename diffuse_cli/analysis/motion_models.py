"""Model diffuse intensities on the map's hkl grid: liquid-like motions (LLM) and rigid-body translations (RBT).

|q| = s = 1/d (Å⁻¹, no 2π). σ (Å) is the rms displacement along any one
direction, so the intensity Debye–Waller factor is exp(−x) with
x = 4π²σ²s² (= exp(−B s²/2) with B = 8π²σ²). docs/model.md has the formulas.

* LLM (Caspar et al. 1988, Clarage et al. 1992; Lunus ``llmlt``): displacements
  correlated as σ² exp(−r/γ), so

      I_LLM(q) = e^{−x} Σ_{n≥1} xⁿ/n! · (1/V) Σ_H |F_H|² Γ̂_n(q − H),
      Γ̂_n(q) = ∫ e^{−n r/γ} e^{−2πi q·r} d³r = 8π(γ/n)³ / (1 + 4π²(γ/n)²|q|²)²,

  the Bragg |F_H|² (integer H inside the grid) convolved with the Fourier
  transform of the n-th power of the correlation function. Computed here in
  real space: the FFT of the lattice array of |F_H|² times C_n(r) = e^{−n r/γ}
  on the conjugate grid, then the inverse FFT (:class:`LLMConvolver`).
* RBT: every molecule (asymmetric-unit copy) translates rigidly and
  independently: I_RBT(q) = (1 − e^{−x}) Σ_k |F_k(q)|², F_k the molecular
  transform of copy k at fractional hkl (:func:`molecular_transform_sq`).

Intensities are in electron units per unit cell (e²) when |F|² is.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from libtbx.utils import Sorry

logger = logging.getLogger("diffuse.model")


def displacement_exponent(s, sigma: float) -> np.ndarray:
    """x = 4π²σ²s² (dimensionless); s = 1/d in Å⁻¹, σ in Å."""
    return 4.0 * math.pi ** 2 * sigma ** 2 * np.asarray(s) ** 2


def grid_d_min(axes, unit_cell) -> float:
    """Smallest d (Å) on the grid: the box corner farthest from the origin."""
    from cctbx import uctbx

    uc = uctbx.unit_cell(tuple(float(v) for v in unit_cell))
    corners = [(sh * axes[0][-1], sk * axes[1][-1], sl * axes[2][-1])
               for sh in (-1, 1) for sk in (-1, 1) for sl in (-1, 1)]
    return float(min(uc.d(tuple(int(round(c)) for c in hkl)) for hkl in corners))


def _read_xray_structure(path, unit_cell, space_group):
    """cctbx xray.structure of a PDB/mmCIF model; the map's cell and group when the file has none."""
    import iotbx.pdb
    from cctbx import crystal

    try:
        pdb_inp = iotbx.pdb.input(file_name=str(path))
    except (RuntimeError, ValueError, AssertionError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Sorry(f"{path}: not a PDB or mmCIF model ({why})") from None
    if pdb_inp.atoms().size() == 0:
        raise Sorry(f"{path}: no atoms in the model")
    cs = pdb_inp.crystal_symmetry()
    if cs is None or cs.unit_cell() is None or cs.space_group_info() is None:
        cs = crystal.symmetry(unit_cell=tuple(unit_cell), space_group_symbol=str(space_group))
        logger.info("%s has no crystal symmetry: using the map's cell and %s", path, space_group)
    xrs = pdb_inp.xray_structure_simple(crystal_symmetry=cs)
    model_cell = np.array(xrs.unit_cell().parameters())
    if np.any(np.abs(model_cell - np.asarray(unit_cell, dtype=float)) > 0.02 * np.maximum(model_cell, 1.0)):
        raise Sorry(f"{path}: unit cell {tuple(np.round(model_cell, 2))} differs from the map's "
                    f"{tuple(np.round(np.asarray(unit_cell, float), 2))} by more than 2 %")
    return xrs


def _box_selection(indices: np.ndarray, axes):
    """Rows of integer hkl (N, 3) inside the grid box and their voxel indices."""
    idx = []
    inside = np.ones(len(indices), dtype=bool)
    for i, ax in enumerate(axes):
        ndiv = int(round(1.0 / (ax[1] - ax[0]))) if len(ax) > 1 else 1
        j = np.rint((indices[:, i] - ax[0]) * ndiv).astype(np.int64)
        inside &= (j >= 0) & (j < len(ax))
        idx.append(j)
    return inside, np.stack(idx, axis=1)


def lattice_array(hkl: np.ndarray, intensity: np.ndarray, axes) -> np.ndarray:
    """Dense [h,k,l] array with |F_H|² at the voxels of integer H (others 0), float64."""
    out = np.zeros(tuple(len(a) for a in axes), dtype=np.float64)
    inside, idx = _box_selection(np.asarray(hkl, dtype=np.float64), axes)
    out[idx[inside, 0], idx[inside, 1], idx[inside, 2]] = np.asarray(intensity, dtype=np.float64)[inside]
    return out


def lattice_from_model(path, axes, unit_cell, space_group, b_iso=None) -> np.ndarray:
    """|F_H|² (e²) of the model at every integer H of the grid.

    cctbx structure factors (direct summation, FFT for large models × grids) to the grid corner's d,
    expanded to P1 with Friedel mates.
    """
    from cctbx import miller

    xrs = _read_xray_structure(path, unit_cell, space_group)
    if b_iso is not None:
        xrs.convert_to_isotropic()
        xrs.set_b_iso(value=float(b_iso))
    d_min = grid_d_min(axes, unit_cell) * 0.999
    ms = miller.build_set(crystal_symmetry=xrs.crystal_symmetry(), anomalous_flag=False, d_min=d_min)
    # direct summation is exact; the FFT (cctbx defaults, ~0.5 % on F²) when it would take long
    algorithm = "direct" if xrs.scatterers().size() * ms.size() < 5e7 else "fft"
    f_calc = ms.structure_factors_from_scatterers(xray_structure=xrs, algorithm=algorithm).f_calc()
    i_p1 = f_calc.as_intensity_array().expand_to_p1().generate_bijvoet_mates()
    hkl = np.array(i_p1.indices(), dtype=np.float64).reshape(-1, 3)
    return lattice_array(hkl, i_p1.data().as_numpy_array(), axes)


def lattice_from_reflections(path, axes, unit_cell, space_group) -> np.ndarray:
    """Bragg intensities of a DIALS .refl (integrated_sum) merged onto integer H of the grid.

    intensity.sum.value divided by the partiality (where the column exists;
    partialities < 0.1 left out), averaged over symmetry equivalents in the
    map's space group and expanded to P1 with Friedel mates. No per-still
    scale: the fit (a correlation coefficient) is blind to one overall scale.
    """
    from cctbx import crystal, miller
    from dials.array_family import flex

    try:
        refl = flex.reflection_table.from_file(str(path))
    except (RuntimeError, OSError, ValueError) as e:
        raise Sorry(f"{path}: not a DIALS reflection file ({type(e).__name__})") from None
    if "intensity.sum.value" not in refl or "miller_index" not in refl:
        raise Sorry(f"{path}: no intensity.sum.value / miller_index columns; give stills_process's integrated .refl")
    refl = refl.select(refl.get_flags(refl.flags.integrated_sum))
    I = refl["intensity.sum.value"].as_numpy_array()
    keep = np.isfinite(I)
    if "partiality" in refl:
        p = refl["partiality"].as_numpy_array()
        keep &= p >= 0.1
        I = I / np.where(p > 0, p, 1.0)
    hkl = np.array(refl["miller_index"], dtype=np.int64).reshape(-1, 3)
    keep &= np.any(hkl != 0, axis=1)
    if not keep.any():
        raise Sorry(f"{path}: no integrated reflections to use")
    cs = crystal.symmetry(unit_cell=tuple(unit_cell), space_group_symbol=str(space_group))
    ms = miller.set(cs, flex.miller_index([tuple(int(v) for v in r) for r in hkl[keep]]), anomalous_flag=False)
    arr = miller.array(ms, data=flex.double(I[keep])).map_to_asu()
    merged = arr.merge_equivalents(use_internal_variance=False).array()
    p1 = merged.expand_to_p1().generate_bijvoet_mates()
    logger.info("%s: %d integrated reflections merged into %d unique (%d in P1)",
                path, int(keep.sum()), merged.size(), p1.size())
    return lattice_array(np.array(p1.indices(), dtype=np.float64).reshape(-1, 3), p1.data().as_numpy_array(), axes)


def molecular_transform_sq(path, axes, unit_cell, space_group, b_iso=None) -> np.ndarray:
    """Σ_k |F_k(q)|² (e²) on the grid: the transform of each asymmetric-unit copy k, added incoherently.

    F_k at fractional hkl h = H_s/ndiv is the structure factor of a P1
    supercell (ndiv_h·a, ndiv_k·b, ndiv_l·c) holding copy k alone, at the
    supercell's integer index H_s (cctbx structure factors: direct summation, FFT for
    large models × grids).
    """
    from cctbx import crystal, miller, xray
    from scitbx.array_family import flex

    xrs = _read_xray_structure(path, unit_cell, space_group)
    if b_iso is not None:
        xrs.convert_to_isotropic()
        xrs.set_b_iso(value=float(b_iso))
    ndiv = [int(round(1.0 / (a[1] - a[0]))) if len(a) > 1 else 1 for a in axes]
    p = xrs.unit_cell().parameters()
    super_cell = (p[0] * ndiv[0], p[1] * ndiv[1], p[2] * ndiv[2]) + tuple(p[3:])
    cs = crystal.symmetry(unit_cell=super_cell, space_group_symbol="P1")
    d_min = grid_d_min(axes, unit_cell) * 0.999
    ms = miller.build_set(crystal_symmetry=cs, anomalous_flag=False, d_min=d_min)
    total = np.zeros(tuple(len(a) for a in axes), dtype=np.float64)
    frac = np.array(xrs.sites_frac()).reshape(-1, 3)
    for op in xrs.space_group().all_ops():
        R = np.array(op.r().as_double()).reshape(3, 3)
        t = np.array(op.t().as_double())
        copy = xray.structure(crystal_symmetry=cs, scatterers=xrs.scatterers().deep_copy())
        copy.set_sites_frac(flex.vec3_double(((frac @ R.T + t) / np.array(ndiv, dtype=float)).tolist()))
        algorithm = "direct" if copy.scatterers().size() * ms.size() < 5e7 else "fft"
        f = ms.structure_factors_from_scatterers(xray_structure=copy, algorithm=algorithm).f_calc()
        f = f.as_intensity_array().generate_bijvoet_mates()
        hs = np.array(f.indices(), dtype=np.float64).reshape(-1, 3) / np.array(ndiv, dtype=float)
        total += lattice_array(hs, f.data().as_numpy_array(), axes)
    return total


class LLMConvolver:
    """(1/V) Σ_H |F_H|² Γ̂_n(q − H) on the grid for n = 1..n_max, by FFT with a real-space kernel.

    lattice: dense [h,k,l] array of |F_H|² (``lattice_array``); ndiv: voxels
    per lattice unit; padding: zeros added along each axis, as a fraction of
    its length, against wrap-around of the kernel tails.

    The DFT over the reciprocal grid (step 1/ndiv in h) has the conjugate
    fractional coordinates x_i = m_i ndiv_i / P_i (m_i = −P_i/2 … P_i/2 − 1,
    P_i the padded length): the box of ndiv_h × ndiv_k × ndiv_l cells. With
    the voxel volume V*/Π ndiv, (1/V) Σ_H L_H Γ̂_n(q − H) =
    Π ndiv · IFFT[FFT(L) · C_n(x)], C_n = e^{−n|r|/γ}, r = |x| in Å (cell
    metric) to the nearest periodic image of the origin (farther images left out:
    e^{−r/γ} is negligible at half the box, ndiv·a/2, for γ ≪ ndiv·a).
    """

    def __init__(self, lattice: np.ndarray, ndiv, unit_cell, padding: float = 0.5):
        import scipy.fft
        from cctbx import uctbx

        self.shape = lattice.shape
        self.ndiv = np.asarray(ndiv, dtype=np.float64)
        self.padded = tuple(scipy.fft.next_fast_len(int(n + math.ceil(padding * n)), real=True) for n in self.shape)
        work = np.zeros(self.padded, dtype=np.float32)
        work[tuple(slice(0, n) for n in self.shape)] = lattice
        self._ft = scipy.fft.rfftn(work, workers=-1)
        del work
        G = np.array(uctbx.unit_cell(tuple(float(v) for v in unit_cell)).metrical_matrix(), dtype=np.float64)
        # metrical_matrix: (a², b², c², a·b, a·c, b·c)
        self._G = np.array([[G[0], G[3], G[4]], [G[3], G[1], G[5]], [G[4], G[5], G[2]]])
        freqs = [scipy.fft.fftfreq(p) * nd for p, nd in zip(self.padded[:2], self.ndiv[:2])]
        freqs.append(scipy.fft.rfftfreq(self.padded[2]) * self.ndiv[2])
        self._x = freqs
        self._r = self._minimum_image_distance()
        self._cache = {}

    def _distance(self, shift=(0, 0, 0)) -> np.ndarray:
        """|r| (Å) on the rfft half-grid, shifted by whole boxes (float32)."""
        x0 = (self._x[0] + shift[0] * self.ndiv[0])[:, None, None]
        x1 = (self._x[1] + shift[1] * self.ndiv[1])[None, :, None]
        x2 = (self._x[2] + shift[2] * self.ndiv[2])[None, None, :]
        G = self._G
        r2 = G[0, 0] * x0 * x0 + G[1, 1] * x1 * x1 + 2 * G[0, 1] * x0 * x1
        r2 = r2 + (G[2, 2] * x2 + 2 * (G[0, 2] * x0 + G[1, 2] * x1)) * x2
        return np.sqrt(np.maximum(r2, 0.0)).astype(np.float32)

    def _minimum_image_distance(self) -> np.ndarray:
        """|r| to the nearest image of the origin in the periodic box (the fftfreq wrap is it for
        orthogonal cells; oblique cells also try the 26 neighbouring boxes)."""
        r = self._distance()
        if np.allclose([self._G[0, 1], self._G[0, 2], self._G[1, 2]], 0.0, atol=1e-9):
            return r
        for shift in ((i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)):
            if shift != (0, 0, 0):
                np.minimum(r, self._distance(shift), out=r)
        return r

    def terms(self, gamma: float, n_max: int) -> list:
        """[J_1 … J_n_max] (float32 maps of the grid's shape) for correlation length γ (Å).

        Terms of the last γ are kept and extended when more are asked for.
        """
        import scipy.fft

        if self._cache.get("gamma") != float(gamma):
            base = np.exp(-self._r / np.float32(gamma))
            self._cache = {"gamma": float(gamma), "base": base, "power": base.copy(), "terms": []}
        c = self._cache
        crop = tuple(slice(0, n) for n in self.shape)
        scale = np.float32(np.prod(self.ndiv))
        while len(c["terms"]) < n_max:
            conv = scipy.fft.irfftn(self._ft * c["power"], s=self.padded, workers=-1)[crop]
            c["terms"].append((conv * scale).astype(np.float32))
            c["power"] *= c["base"]
        return c["terms"][:n_max]


def series_length(x_max: float, tolerance: float = 1e-4, n_min: int = 1, n_cap: int = 60) -> int:
    """Terms of the LLM series so that the Poisson tail e^{−x} Σ_{n>N} xⁿ/n! < tolerance at x_max."""
    from scipy.stats import poisson

    n = n_min
    while n < n_cap and poisson.sf(n, x_max) > tolerance:
        n += 1
    return n


def llm_intensity(terms: list, s: np.ndarray, sigma: float) -> np.ndarray:
    """I_LLM = e^{−x} Σ_n xⁿ/n! J_n (float64) from the convolved terms J_n; x = 4π²σ²s²."""
    x = displacement_exponent(s, sigma)
    total = np.zeros(s.shape, dtype=np.float64)
    coef = np.exp(-x)
    for n, J in enumerate(terms, start=1):
        coef = coef * x / n
        total += coef * J
    return total


def rbt_intensity(f2_mol: np.ndarray, s: np.ndarray, sigma: float) -> np.ndarray:
    """I_RBT = (1 − e^{−x}) Σ_k |F_k|² (float64); x = 4π²σ²s²."""
    return -np.expm1(-displacement_exponent(s, sigma)) * f2_mol
