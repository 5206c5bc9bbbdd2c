"""The simulator's known truth: the diffuse intensity I_true(hkl, d*) and the Bragg table.

Formulas in docs/simulate.md. The independent-atom (absolute-scale) term uses
:mod:`diffuse_cli.simulation.atomic` (xraylib tables); nothing here calls the
diffuse_cli pipeline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli.simulation.crystal import (
    LatticeTable,
    b_matrix,
    grid_hkl_max,
    laue_rotations,
    quadratic_form,
    rotation_about,
    symmetric_random_table,
    symmetrise_quadratic_form,
)


# --------------------------------------------------------------------------- truth model


@dataclass
class DiffuseModelParameters:
    """Parameters of I_true; intensities in photons / µsr / s at scale 1.

    Halo widths are in fractional Miller-index units along h, k, l before the
    tilt and the Laue average; the shell radius/width are in Å⁻¹.
    """

    unit_cell: tuple
    space_group: str
    seed: int
    d_min: float  # Å, extent of the lattice tables (≤ detector limit)
    intensity_scale: float = 1.0  # multiplies every amplitude below
    background: float = 20.0
    halo_amplitude: float = 50.0
    halo_sigma: tuple = (0.12, 0.14, 0.18)
    halo_tilt_deg: float = 25.0
    halo_b_factor: float = 20.0  # Å², envelope exp(-B d*²/4) of halo weights
    halo_cutoff: float = 9.0  # largest δᵀGδ inside the window (shrunk to fit the cell)
    shell_amplitude: float = 150.0
    shell_radius: float = 0.18  # Å⁻¹
    shell_width: float = 0.05  # Å⁻¹
    shell_axes: tuple = (1.0, 0.8, 1.3)  # relative ellipsoid semi-axes (crystal frame)
    shell_tilt_deg: float = 20.0
    water_amplitude: float = 120.0
    water_d_star: float = 1.0 / 3.1  # Å⁻¹
    water_width: float = 0.03  # Å⁻¹, Gaussian sigma in d*
    # independent-atom scattering (absolute-scale mode), off when composition is ""
    composition: str = ""  # atoms per unit cell, "C:4920,N:1560,..."
    wilson_b: float = 0.0  # Å², Bragg fraction exp(-B d*²/2) of Σf² (left to the spots)
    photons_per_electron_unit: float = 0.0  # photons/µsr/s per electron unit per cell
    wavelength: float = 0.0  # Å, for the Compton recoil factor (0: none)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unit_cell"] = list(self.unit_cell)
        d["halo_sigma"] = list(self.halo_sigma)
        d["shell_axes"] = list(self.shell_axes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiffuseModelParameters":
        d = dict(d)
        for key in ("unit_cell", "halo_sigma", "shell_axes"):
            d[key] = tuple(d[key])
        return cls(**d)


class TruthModel:
    """The analytic diffuse truth ``I_true(hkl, d*)`` (photons / µsr / s, scale 1).

    ``I_true = background + Σ_H w(H) g((x−H)ᵀG(x−H)) + shell(x) + water(d*)``:

    * ``g(u) = (exp(−u/2) − exp(−c/2)) / (1 − exp(−c/2))`` for u < c, else 0: a
      Gaussian halo truncated inside the unit cell of the lattice (c chosen so
      the ellipsoid u < c fits in |δ_i| < 0.49), so only the nearest lattice
      point contributes and the sum is evaluated exactly and cheaply.
    * ``G = mean_Q Qᵀ G0 Q`` over the Laue group; w(H) is a Laue-symmetric
      random table (uniform 0.2–1 times exp(−B_h d*²/4)).
    * ``shell = A_s exp(−(ρ − ρ0)² / 2σ_s²)``, ``ρ = sqrt(xᵀ M x)`` (Å⁻¹) with
      M the Laue average of an anisotropic, tilted metric.
    * ``water = A_w exp(−(d* − d*_w)² / 2σ_w²)``, isotropic.
    * ``atomic = c·[(1 − exp(−B d*²/2))·Σf² + R·ΣS]`` when a composition is
      given (absolute-scale mode): the independent-atom total scattering per
      unit cell in electron units (:mod:`diffuse_cli.simulation.atomic`) less
      its Bragg (Wilson) part, which the Bragg spots carry; ``c`` =
      ``intensity_scale·photons_per_electron_unit`` is the simulated absolute
      scale. Tabulated on a fine d* grid and interpolated.

    ``x`` is fractional hkl; everything is deterministic given the parameters
    (including ``seed``), so :meth:`from_json` rebuilds the same truth.
    """

    def __init__(self, p: DiffuseModelParameters):
        self.p = p
        self.B = b_matrix(p.unit_cell)
        self.rotations = laue_rotations(p.space_group)
        s = p.intensity_scale
        # halo shape: tilted anisotropic Gaussian in fractional units, Laue-averaged
        Rt = rotation_about((1.0, 2.0, 3.0), p.halo_tilt_deg)
        G0 = Rt @ np.diag(1.0 / np.asarray(p.halo_sigma, dtype=np.float64) ** 2) @ Rt.T
        self.G = symmetrise_quadratic_form(G0, self.rotations)
        Ginv_diag = np.diag(np.linalg.inv(self.G))
        # largest u such that the ellipsoid u < c stays inside |δ_i| < 0.49
        self.cutoff = float(min(p.halo_cutoff, 0.49**2 / Ginv_diag.max()))
        self._ec = math.exp(-self.cutoff / 2.0)
        # shell metric: crystal-frame Cartesian metric made anisotropic, Laue-averaged
        Rs = rotation_about((2.0, -1.0, 1.0), p.shell_tilt_deg)
        K = Rs @ np.diag(1.0 / np.asarray(p.shell_axes, dtype=np.float64) ** 2) @ Rs.T
        self.M = symmetrise_quadratic_form(self.B.T @ K @ self.B, self.rotations)
        # halo weights on lattice points
        hkl_max = grid_hkl_max(p.unit_cell, p.d_min)
        rng = np.random.default_rng([int(p.seed), 101])
        self.halo_weights = symmetric_random_table(
            rng, lambda r, n: r.uniform(0.2, 1.0, n), self.B, self.rotations, p.d_min, hkl_max
        )
        H = LatticeTable.box_indices(hkl_max).astype(np.float64)
        d2 = np.sum((H @ self.B.T) ** 2, axis=1).reshape(self.halo_weights.values.shape)
        self.halo_weights.values *= s * p.halo_amplitude * np.exp(-p.halo_b_factor * d2 / 4.0)
        self.water_on = True
        self._atomic_table = None
        if p.composition:
            from diffuse_cli.simulation import atomic

            ds = np.linspace(0.0, 1.05 / p.d_min, 1025)
            coh, inc = atomic.cell_scattering(atomic.parse_composition(p.composition), ds, p.wavelength)
            # the Bragg (Wilson) part exp(-B d*²/2) Σf² is carried by the spots
            coh = coh * -np.expm1(-0.5 * p.wilson_b * ds * ds)
            self._atomic_table = (ds, self.photons_per_electron_unit * (coh + inc))

    @property
    def photons_per_electron_unit(self) -> float:
        """The simulated absolute scale c: I_true per electron unit per unit cell."""
        return self.p.intensity_scale * self.p.photons_per_electron_unit

    # -- evaluation
    def halo(self, hkl: np.ndarray) -> np.ndarray:
        H = np.rint(hkl)
        delta = hkl - H
        u = quadratic_form(delta, self.G)
        g = np.clip((np.exp(-0.5 * u) - self._ec) / (1.0 - self._ec), 0.0, None)
        return self.halo_weights.lookup(H) * g

    def shell(self, hkl: np.ndarray) -> np.ndarray:
        p = self.p
        rho = np.sqrt(quadratic_form(hkl, self.M))
        return p.intensity_scale * p.shell_amplitude * np.exp(
            -0.5 * ((rho - p.shell_radius) / p.shell_width) ** 2
        )

    def halo_voxel_kernel(self, ndiv, n_fine: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Mean of one unit-weight halo over a voxel, for each voxel-to-lattice-point offset.

        A voxel of the ``ndiv`` grid (per axis) with integer index i (centre
        i/ndiv) receives from lattice point H the mean of g over the voxel, which
        depends only on j = i − ndiv·H. Returns the offsets j (m, 3) int64 for
        which it is non-zero and those means K(j) (m,), each the mean of g over
        an ``n_fine``³ midpoint sub-grid of the voxel, at offsets
        ``((t + ½)/n_fine − ½)/ndiv``, t = 0 … n_fine−1. Only the lattice point
        nearest each sub-grid point counts, as in :meth:`halo`.
        """
        nd = np.broadcast_to(np.asarray(ndiv, dtype=np.int64), (3,))
        frac = (np.arange(n_fine) + 0.5) / n_fine - 0.5
        xi = np.stack(np.meshgrid(frac / nd[0], frac / nd[1], frac / nd[2], indexing="ij"), -1).reshape(-1, 3)
        # g is 0 beyond |δ_i| < 0.49, so |j_i|/ndiv_i < 0.49 + ½/ndiv_i
        reach = [np.arange(-m, m + 1) for m in np.floor((0.49 + 0.5 / nd) * nd).astype(np.int64)]
        offsets, values = [], []
        for j in np.stack(np.meshgrid(*reach, indexing="ij"), -1).reshape(-1, 3):
            delta = j / nd + xi
            u = quadratic_form(delta, self.G)
            g = np.clip((np.exp(-0.5 * u) - self._ec) / (1.0 - self._ec), 0.0, None)
            g[np.any(np.rint(delta) != 0, axis=1)] = 0.0
            k = float(g.mean())
            if k > 0.0:
                offsets.append(j)
                values.append(k)
        return np.array(offsets, dtype=np.int64).reshape(-1, 3), np.array(values)

    def halo_voxel_mean(self, index: np.ndarray, ndiv, kernel=None) -> np.ndarray:
        """Exact voxel mean of the halo term at integer voxel indices ``index`` (N, 3).

        ``Σ_j w(H_j) K(j)`` over the offsets j of :meth:`halo_voxel_kernel` with
        H_j = (i − j)/ndiv integer: the lattice table convolved with the voxel
        mean of one halo (photons / µsr / s).
        """
        nd = np.broadcast_to(np.asarray(ndiv, dtype=np.int64), (3,))
        offsets, values = self.halo_voxel_kernel(nd) if kernel is None else kernel
        index = np.asarray(index, dtype=np.int64)
        out = np.zeros(index.shape[0])
        for j, k in zip(offsets, values):
            d = index - j
            on = np.all(d % nd == 0, axis=1)
            out[on] += k * self.halo_weights.lookup((d[on] // nd).astype(np.float64))
        return out

    def smooth(self, hkl: np.ndarray, d_star: np.ndarray | None = None) -> np.ndarray:
        """Every term but the halos: floor, shell, water, atomic (photons / µsr / s)."""
        hkl = np.asarray(hkl, dtype=np.float64)
        if d_star is None:
            d_star = self.d_star(hkl)
        return self.p.intensity_scale * self.p.background + self.shell(hkl) + self.isotropic(d_star)

    def diffuse(self, hkl: np.ndarray) -> np.ndarray:
        """Lattice-dependent part plus floor, photons / µsr / s."""
        return self.p.intensity_scale * self.p.background + self.halo(hkl) + self.shell(hkl)

    def water(self, d_star: np.ndarray) -> np.ndarray:
        p = self.p
        if not self.water_on:
            return np.zeros_like(d_star)
        return p.intensity_scale * p.water_amplitude * np.exp(
            -0.5 * ((d_star - p.water_d_star) / p.water_width) ** 2
        )

    def atomic(self, d_star: np.ndarray) -> np.ndarray:
        """Independent-atom scattering less its Bragg part (photons/µsr/s); 0 without a composition."""
        if self._atomic_table is None:
            return np.zeros_like(d_star)
        return np.interp(d_star, *self._atomic_table)

    def isotropic(self, d_star: np.ndarray) -> np.ndarray:
        """The terms that depend on |q| only: water ring + atomic scattering."""
        return self.water(d_star) + self.atomic(d_star)

    def d_star(self, hkl: np.ndarray) -> np.ndarray:
        """|q| = |B h| (Å⁻¹)."""
        return np.sqrt(quadratic_form(hkl, self.B.T @ self.B))

    def __call__(self, hkl: np.ndarray, d_star: np.ndarray | None = None) -> np.ndarray:
        """I_true at fractional hkl (..., 3); d* (Å⁻¹) computed from B if not given."""
        hkl = np.asarray(hkl, dtype=np.float64)
        if d_star is None:
            d_star = self.d_star(hkl)
        return self.diffuse(hkl) + self.isotropic(d_star)

    # -- persistence
    def to_dict(self) -> dict:
        return {
            "parameters": self.p.to_dict(),
            "water_ring": self.water_on,
            "derived": {
                "B": self.B.tolist(),
                "halo_G": self.G.tolist(),
                "halo_cutoff": self.cutoff,
                "shell_M": self.M.tolist(),
                "laue_rotations_on_hkl": self.rotations.tolist(),
            },
            "formula": (
                "I_true = intensity_scale*background + sum_H w(H) g((x-H)^T G (x-H)) "
                "+ intensity_scale*shell_amplitude*exp(-(sqrt(x^T M x)-shell_radius)^2/(2 shell_width^2)) "
                "+ intensity_scale*water_amplitude*exp(-(d*-water_d_star)^2/(2 water_width^2)) "
                "+ intensity_scale*photons_per_electron_unit*((1-exp(-wilson_b d*^2/2)) sum f^2 + sum I_inc) "
                "[composition given; per unit cell; f = xraylib FF_Rayl, I_inc = R S with S = xraylib SF_Compt "
                "(Hubbell et al. 1975) at x = d*/2 and R = (1 + lambda_C wavelength d*^2/2)^-2 "
                "(Compton recoil, 1 when wavelength is 0)]; "
                "g(u) = max(exp(-u/2)-exp(-c/2), 0)/(1-exp(-c/2)); photons per microsteradian "
                "per second at scale 1"
            ),
            "photons_per_electron_unit": self.photons_per_electron_unit if self.p.composition else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TruthModel":
        model = cls(DiffuseModelParameters.from_dict(d["parameters"]))
        model.water_on = bool(d.get("water_ring", True))
        return model

    @classmethod
    def from_json(cls, path) -> "TruthModel":
        """Rebuild the truth from a simulation's truth.json."""
        import json

        with open(path) as fh:
            truth = json.load(fh)
        return cls.from_dict(truth["truth_model"])

    # -- truth map
    def voxel_average_map(self, grid, d_min: float, subsample: int = 3, chunk: int = 200_000):
        """I_true averaged over each voxel of ``grid`` (TruthGrid), NaN beyond d_min.

        ``subsample`` = 1: I_true at the voxel centres. Otherwise the voxel mean:
        the smooth terms (:meth:`smooth`, which vary over ≥ 0.03 Å⁻¹, several
        voxels) as the mean over a ``subsample``³ sub-grid at offsets
        ``(j + ½)/subsample − ½`` voxel widths (j = 0..subsample−1) about the
        centre, and the halos (σ 0.12–0.18 lattice units, a fraction of a
        voxel: a 3³ rule overstates a lattice voxel's halo mean by ~5 %) exactly,
        by :meth:`halo_voxel_mean`. Voxels whose centre has d* > 1/d_min are NaN.
        """
        axes = grid.axes()
        shape = grid.shape
        out = np.full(shape, np.nan)
        ndiv = np.asarray(grid.ndiv, dtype=np.float64)
        frac = (np.arange(subsample) + 0.5) / subsample - 0.5
        offsets = np.stack(np.meshgrid(frac, frac, frac, indexing="ij"), -1).reshape(-1, 3) / ndiv
        h, k, l = axes
        flat_out = out.reshape(-1)
        # walk along h planes to bound memory
        kk, ll = np.meshgrid(k, l, indexing="ij")
        plane = np.stack([np.zeros_like(kk), kk, ll], -1).reshape(-1, 3)
        limit = 1.0 / d_min
        n_plane = plane.shape[0]
        kernel = self.halo_voxel_kernel(ndiv) if subsample > 1 else None
        for i, hv in enumerate(h):
            plane[:, 0] = hv
            inside = self.d_star(plane) <= limit
            if not inside.any():
                continue
            centres = plane[inside]
            if kernel is None:
                values = self(centres)
            else:
                acc = np.zeros(len(centres))
                for off in offsets:
                    acc += self.smooth(centres + off)
                index = np.rint(centres * ndiv).astype(np.int64)
                values = acc / len(offsets) + self.halo_voxel_mean(index, ndiv, kernel)
            flat_out[i * n_plane + np.flatnonzero(inside)] = values
        return out


# --------------------------------------------------------------------------- Bragg model


def bragg_table(p: DiffuseModelParameters, amplitude: float, b_factor: float) -> LatticeTable:
    """Bragg intensities (photons per spot per s at scale 1, full partiality).

    Acentric Wilson statistics: exponential draws of mean 1, shared within each
    Laue orbit, times the mean ``amplitude·ε(h)·envelope(d*)``, zero on
    systematic absences of the space group and on 000. ε(h) is the
    multiplicity of h in the space group (cctbx), so ⟨I/ε⟩ = amplitude·envelope.

    * With a composition (absolute-scale mode): envelope = Σf²(d*)/Σf²(0) ·
      exp(−B d*²/2) with B = ``p.wilson_b`` (Wilson 1942), Σf² from
      :mod:`diffuse_cli.simulation.atomic` (xraylib): the Bragg part that the
      diffuse truth leaves out, so a Wilson plot of the spots has B as its target.
      ``b_factor`` is not used.
    * Without: envelope = exp(−b_factor d*²/2).
    """
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    B = b_matrix(p.unit_cell)
    rotations = laue_rotations(p.space_group)
    hkl_max = grid_hkl_max(p.unit_cell, p.d_min)
    rng = np.random.default_rng([int(p.seed), 202])
    table = symmetric_random_table(rng, lambda r, n: r.exponential(1.0, n), B, rotations, p.d_min, hkl_max)
    H = LatticeTable.box_indices(hkl_max)
    d2 = np.sum((H @ B.T) ** 2, axis=1)
    if p.composition:
        from diffuse_cli.simulation import atomic

        ds = np.linspace(0.0, 1.05 / p.d_min, 1025)
        sigma_f2, _ = atomic.cell_scattering(atomic.parse_composition(p.composition), ds)
        envelope = np.interp(np.sqrt(d2), ds, sigma_f2 / sigma_f2[0]) * np.exp(-p.wilson_b * d2 / 2.0)
    else:
        envelope = np.exp(-b_factor * d2 / 2.0)
    values = table.values.reshape(-1) * amplitude * envelope
    nz = np.flatnonzero(values)
    cs = crystal.symmetry(unit_cell=tuple(p.unit_cell), space_group_symbol=p.space_group)
    ms = miller.set(cs, flex.miller_index([tuple(map(int, h)) for h in H[nz]]), anomalous_flag=True)
    absent = np.array(ms.sys_absent_flags().data(), dtype=bool)
    values[nz] *= np.array(ms.epsilons().data(), dtype=np.float64)
    values[nz[absent]] = 0.0
    values[np.all(H == 0, axis=1)] = 0.0
    table.values = values.reshape(table.values.shape)
    return table
