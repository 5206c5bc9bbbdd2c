"""Simulated still images with a known diffuse-scattering truth.

Science behind ``diffuse.simulate`` (docs/simulate.md gives the formulas):

* **Truth model** (:class:`TruthModel`): ``I_true(hkl, d*) = diffuse(hkl) +
  water(d*)`` in photons per microsteradian per second at scale 1, where
  ``diffuse`` = isotropic floor + anisotropic Gaussian halos on the lattice
  points + a smooth ellipsoidal shell; every term has the Laue symmetry of the
  space group by construction (invariant quadratic forms, tables symmetrised on
  integer lattice points).
* **Bragg spots**: DIALS's ``StillsDeltaPsiReflectionPredictor`` places the
  spots (what DIALS would predict); partiality is a Gaussian in the excitation
  error ``ε = |A h + s0| − 1/λ`` (Å⁻¹); profiles are 2D Gaussians integrated
  over each pixel.
* **Forward physics**: expected counts per pixel
  ``scale_i · t · (Ω / 1e-6 sr) · P · η · T · I_true + Bragg``, with Ω, P, η, T
  from :mod:`diffuse_cli.corrections` (the same functions diffuse.correct
  inverts).

All per-pixel work is numpy on whole panels; geometry and forward factors are
computed once for all stills.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)

logger = logging.getLogger("diffuse.simulate")

MICROSTERADIAN = 1e-6
BAD_PIXEL_VALUE = -1  # Pilatus convention: -1 = no data (gaps, dead, beamstop)


# --------------------------------------------------------------------------- symmetry


def laue_rotations(space_group: str) -> np.ndarray:
    """Matrices Q acting on Miller indices as columns, h' = Q h; shape (n, 3, 3).

    Q = Rᵀ for each rotation part R of the Laue group (x' = R x on fractional
    coordinates maps h to the row vector h R). For arrays of row vectors H
    (N, 3) the images are ``H @ Q.T``.

    Taken from cctbx's derived Laue group (includes the inversion); duplicates
    from lattice centring are removed. Integer-valued float64 matrices.
    """
    from cctbx import sgtbx

    group = sgtbx.space_group_info(space_group).group().build_derived_laue_group()
    mats = set()
    for op in group.all_ops():
        r = op.r()
        assert r.den() == 1
        mats.add(tuple(r.num()))
    # a symmetry op maps x -> R x; Miller indices transform as h' = h R,
    # i.e. h' = Rᵀ h in column form
    return np.array([np.array(m, dtype=np.float64).reshape(3, 3).T for m in sorted(mats)])


def symmetrise_quadratic_form(G0: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Group average ``mean_Q Qᵀ G0 Q`` of a form acting on fractional hkl.

    ``rotations`` are the matrices Q of :func:`laue_rotations` (h' = Q h). The
    form δᵀGδ is invariant when Qᵀ G Q = G for every Q, which the group
    average satisfies exactly (Q ranges over a group).
    """
    G = np.einsum("nji,jk,nkl->il", rotations, G0, rotations) / len(rotations)
    return 0.5 * (G + G.T)


def rotation_about(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """n rotation matrices uniform on SO(3) (normalised Gaussian quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def b_matrix(unit_cell) -> np.ndarray:
    """DIALS B matrix (Å⁻¹): q_crystal = B h, B = fractionalisation matrixᵀ."""
    from cctbx import uctbx

    uc = uctbx.unit_cell(tuple(unit_cell))
    return np.array(uc.fractionalization_matrix(), dtype=np.float64).reshape(3, 3).T


def quadratic_form(x: np.ndarray, G: np.ndarray) -> np.ndarray:
    """xᵀ G x for x of shape (..., 3) (symmetric G), via one matmul."""
    return np.sum((x @ G) * x, axis=-1)


# --------------------------------------------------------------------------- lattice tables


class LatticeTable:
    """Values on integer Miller indices in a box, looked up vectorised.

    Holds a dense array over ``|h| <= hkl_max`` (per axis); indices outside the
    box read as 0.
    """

    def __init__(self, values: np.ndarray, hkl_max):
        self.values = values
        self.hkl_max = np.asarray(hkl_max, dtype=np.int64)
        self.shape = np.asarray(values.shape, dtype=np.int64)

    @staticmethod
    def box_indices(hkl_max) -> np.ndarray:
        """All integer (h, k, l) of the box, shape (N, 3), C order of the table."""
        axes = [np.arange(-m, m + 1) for m in hkl_max]
        H = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        return H.reshape(-1, 3)

    def flat(self, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat table index of integer-valued H (..., 3) and an inside-box flag."""
        inside = np.ones(H.shape[:-1], dtype=bool)
        flat = np.zeros(H.shape[:-1], dtype=np.int64)
        for axis in range(3):
            i = H[..., axis].astype(np.int64) + self.hkl_max[axis]
            inside &= (i >= 0) & (i < self.shape[axis])
            flat = flat * self.shape[axis] + i
        return np.where(inside, flat, 0), inside

    def lookup(self, H: np.ndarray) -> np.ndarray:
        flat, inside = self.flat(H)
        return np.where(inside, self.values.ravel()[flat], 0.0)


def symmetric_random_table(
    rng: np.random.Generator,
    draw,
    B: np.ndarray,
    rotations: np.ndarray,
    d_min: float,
    hkl_max,
) -> LatticeTable:
    """A random table over integer H, exactly invariant under the Laue group.

    ``draw(rng, n)`` gives n raw values; each H takes the raw value of a
    canonical member of its orbit (the largest flat index among {QH}), so the
    orbit shares one value and the value distribution is that of ``draw``.
    Entries with d* > 1/d_min are 0 (the sphere is itself invariant, so the
    box needs no closure beyond it).
    """
    H = LatticeTable.box_indices(hkl_max).astype(np.float64)
    table = LatticeTable(np.zeros([2 * m + 1 for m in hkl_max]), hkl_max)
    d_star = np.linalg.norm(H @ B.T, axis=1)
    in_sphere = d_star <= 1.0 / d_min
    Hs = H[in_sphere]
    canon = np.full(len(Hs), -1, dtype=np.int64)
    for Q in rotations:
        flat, inside = table.flat(np.rint(Hs @ Q.T).astype(np.int64))
        assert inside.all(), "Laue image of an in-sphere index left the box"
        canon = np.maximum(canon, flat)
    raw = draw(rng, table.values.size)
    values = np.zeros(table.values.size)
    values[np.flatnonzero(in_sphere)] = raw[canon]
    table.values = values.reshape(table.values.shape)
    return table


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
    * ``atomic = c·[(1 − exp(−B d*²/2))·Σf² + ΣI_inc]`` when a composition is
      given (absolute-scale mode): the independent-atom total scattering per
      unit cell in electron units (``diffuse_cli.absolute_scale.theory``) less
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
        from diffuse_cli.grid import HKLGrid

        hkl_max = HKLGrid.for_resolution(1, p.unit_cell, p.d_min).hkl_max
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
            from diffuse_cli import absolute_scale

            ds = np.linspace(0.0, 1.05 / p.d_min, 4097)
            coh, inc = absolute_scale.theory(absolute_scale.parse_composition(p.composition), ds, wilson_b=p.wilson_b)
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
                "[composition given; f: cctbx wk1995, I_inc = Z - f^2/Z, per unit cell]; "
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
        """I_true averaged over each voxel of ``grid`` (HKLGrid), NaN beyond d_min.

        The voxel mean is the mean over a ``subsample``³ sub-grid at offsets
        ``(j + ½)/subsample − ½`` voxel widths (j = 0..subsample−1) about the
        centre. Voxels whose centre has d* > 1/d_min are NaN.
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
        for i, hv in enumerate(h):
            plane[:, 0] = hv
            inside = self.d_star(plane) <= limit
            if not inside.any():
                continue
            centres = plane[inside]
            acc = np.zeros(len(centres))
            for off in offsets:
                x = centres + off
                acc += self(x)
            flat_out[i * n_plane + np.flatnonzero(inside)] = acc / len(offsets)
        return out


# --------------------------------------------------------------------------- Bragg model


def bragg_table(p: DiffuseModelParameters, amplitude: float, b_factor: float) -> LatticeTable:
    """Bragg intensities (photons per spot per s at scale 1, full partiality).

    Wilson-like exponential draws, times exp(−B d*²/2), shared within each Laue
    orbit, zero on systematic absences of the space group and on 000.
    """
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    from diffuse_cli.grid import HKLGrid

    B = b_matrix(p.unit_cell)
    rotations = laue_rotations(p.space_group)
    hkl_max = HKLGrid.for_resolution(1, p.unit_cell, p.d_min).hkl_max
    rng = np.random.default_rng([int(p.seed), 202])
    table = symmetric_random_table(rng, lambda r, n: r.exponential(1.0, n), B, rotations, p.d_min, hkl_max)
    H = LatticeTable.box_indices(hkl_max)
    d2 = np.sum((H @ B.T) ** 2, axis=1)
    values = table.values.reshape(-1) * amplitude * np.exp(-b_factor * d2 / 2.0)
    nz = np.flatnonzero(values)
    cs = crystal.symmetry(unit_cell=tuple(p.unit_cell), space_group_symbol=p.space_group)
    ms = miller.set(cs, flex.miller_index([tuple(map(int, h)) for h in H[nz]]), anomalous_flag=True)
    absent = np.array(ms.sys_absent_flags().data(), dtype=bool)
    values[nz[absent]] = 0.0
    values[np.all(H == 0, axis=1)] = 0.0
    table.values = values.reshape(table.values.shape)
    return table


def render_spots(
    panel_shapes, panel, x_px, y_px, counts, sigma_px: float, half_width: int = 3
) -> list[np.ndarray]:
    """Add 2D Gaussian spots integrated over pixels; returns one image per panel.

    x_px/y_px are dxtbx pixel coordinates (fast, slow) of the spot centres;
    ``counts`` the total expected photons of each spot.
    """
    from scipy.special import ndtr

    images = [np.zeros(s) for s in panel_shapes]
    if len(counts) == 0:
        return images
    d = np.arange(-half_width, half_width + 1)
    ix = np.floor(x_px).astype(np.int64)[:, None] + d[None, :]  # (N, w)
    iy = np.floor(y_px).astype(np.int64)[:, None] + d[None, :]
    fx = ndtr((ix + 1 - x_px[:, None]) / sigma_px) - ndtr((ix - x_px[:, None]) / sigma_px)
    fy = ndtr((iy + 1 - y_px[:, None]) / sigma_px) - ndtr((iy - y_px[:, None]) / sigma_px)
    weight = counts[:, None, None] * fy[:, :, None] * fx[:, None, :]  # (N, wy, wx)
    for p_id, shape in enumerate(panel_shapes):
        sel = panel == p_id
        if not sel.any():
            continue
        ys = np.broadcast_to(iy[sel][:, :, None], weight[sel].shape)
        xs = np.broadcast_to(ix[sel][:, None, :], weight[sel].shape)
        ok = (ys >= 0) & (ys < shape[0]) & (xs >= 0) & (xs < shape[1])
        flat = ys[ok] * shape[1] + xs[ok]
        images[p_id] += np.bincount(flat, weights=weight[sel][ok], minlength=shape[0] * shape[1]).reshape(shape)
    return images


# --------------------------------------------------------------------------- models


def make_beam(wavelength: float, polarization_fraction: float):
    """Beam along −z (DIALS lab), polarisation plane normal (0, 1, 0)."""
    from dxtbx.model import BeamFactory

    beam = BeamFactory.simple(wavelength)
    beam.set_polarization_fraction(polarization_fraction)
    beam.set_polarization_normal((0.0, 1.0, 0.0))
    return beam


def sensor_mu(material: str, wavelength: float) -> float:
    """Linear attenuation coefficient (mm⁻¹) as dxtbx's format classes compute it."""
    from cctbx.eltbx import attenuation_coefficient

    return attenuation_coefficient.get_table(material).mu_at_angstrom(wavelength) / 10.0


def make_single_detector(
    distance, n_fast, n_slow, pixel_size, beam_centre_px, material, thickness, wavelength, trusted_range
):
    """A Pilatus-like flat panel normal to the beam, as FormatCBFMini reads it back.

    Fast axis +x, slow −y; with a Si/CdTe sensor dxtbx's reader installs a
    parallax-corrected px→mm strategy, so we do the same.
    """
    from dxtbx.model import DetectorFactory, ParallaxCorrectedPxMmStrategy, SimplePxMmStrategy

    if material:
        mu = sensor_mu(material, wavelength)
        px_mm = ParallaxCorrectedPxMmStrategy(mu, thickness)
    else:
        px_mm = SimplePxMmStrategy()
    det = DetectorFactory.simple(
        "PAD",
        distance,
        (beam_centre_px[0] * pixel_size, beam_centre_px[1] * pixel_size),
        "+x",
        "-y",
        (pixel_size, pixel_size),
        (n_fast, n_slow),
        tuple(trusted_range),
        [],
        px_mm=px_mm,
    )
    if material:
        det[0].set_material(material)
        det[0].set_thickness(thickness)
        det[0].set_mu(mu)
    return det


def make_multi_detector(
    distance, n_fast, n_slow, pixel_size, beam_centre_px, n_panels_fast, n_panels_slow, gap_px,
    tilt_deg, rng, material, thickness, wavelength, trusted_range,
):
    """Panels of (n_fast × n_slow) px on a grid with gaps, each slightly tilted.

    The panel array is centred so that the overall beam centre (px in the
    gap-free layout frame) lands at ``beam_centre_px``. Each panel is rotated
    about its own centre by uniform random angles within ±tilt_deg about the
    lab x and y axes and shifted along z by up to ±0.2 mm.
    """
    from dxtbx.model import Detector

    det = Detector()
    root = det.hierarchy()
    pitch_f = (n_fast + gap_px) * pixel_size
    pitch_s = (n_slow + gap_px) * pixel_size
    bx, by = beam_centre_px[0] * pixel_size, beam_centre_px[1] * pixel_size
    for js in range(n_panels_slow):
        for jf in range(n_panels_fast):
            # panel corner in the flat layout (mm, fast right, slow down)
            x0 = jf * pitch_f - bx
            y0 = -(js * pitch_s - by)
            centre = np.array([x0 + n_fast * pixel_size / 2, y0 - n_slow * pixel_size / 2, -distance])
            ax, ay = rng.uniform(-tilt_deg, tilt_deg, 2)
            dz = rng.uniform(-0.2, 0.2)
            R = rotation_about((1, 0, 0), ax) @ rotation_about((0, 1, 0), ay)
            fast = R @ np.array([1.0, 0.0, 0.0])
            slow = R @ np.array([0.0, -1.0, 0.0])
            centre = centre + np.array([0.0, 0.0, dz])
            origin = centre - fast * n_fast * pixel_size / 2 - slow * n_slow * pixel_size / 2
            p = root.add_panel()
            p.set_type("SENSOR_PAD")
            p.set_name(f"panel_{js * n_panels_fast + jf}")
            p.set_local_frame(tuple(fast), tuple(slow), tuple(origin))
            p.set_pixel_size((pixel_size, pixel_size))
            p.set_image_size((n_fast, n_slow))
            p.set_trusted_range(tuple(trusted_range))
            if material:
                p.set_material(material)
                p.set_thickness(thickness)
                p.set_mu(sensor_mu(material, wavelength))
    return det


def make_crystal(unit_cell, space_group: str, U: np.ndarray):
    """dxtbx Crystal with the given cell, space group and orientation U."""
    from cctbx import sgtbx, uctbx
    from dxtbx.model import Crystal

    uc = uctbx.unit_cell(tuple(unit_cell))
    O = np.array(uc.orthogonalization_matrix()).reshape(3, 3)
    crystal = Crystal(
        tuple(O[:, 0]), tuple(O[:, 1]), tuple(O[:, 2]),
        space_group=sgtbx.space_group_info(space_group).group(),
    )
    crystal.set_U(tuple(np.asarray(U, dtype=np.float64).ravel()))
    return crystal


def detector_description(detector, beam) -> dict:
    panels = []
    for p in detector:
        panels.append(
            {
                "name": p.get_name(),
                "origin_mm": list(p.get_origin()),
                "fast_axis": list(p.get_fast_axis()),
                "slow_axis": list(p.get_slow_axis()),
                "pixel_size_mm": list(p.get_pixel_size()),
                "image_size": list(p.get_image_size()),
                "trusted_range": list(p.get_trusted_range()),
                "material": p.get_material(),
                "thickness_mm": p.get_thickness(),
                "mu_per_mm": p.get_mu(),
                "px_mm_strategy": type(p.get_px_mm_strategy()).__name__,
            }
        )
    return {
        "panels": panels,
        "beam": {
            "wavelength_A": beam.get_wavelength(),
            "s0": list(beam.get_s0()),
            "polarization_fraction": beam.get_polarization_fraction(),
            "polarization_normal": list(beam.get_polarization_normal()),
        },
    }


# --------------------------------------------------------------------------- masks


def pilatus_module_gaps(shape, module=(195, 487), gap=(17, 7)) -> np.ndarray:
    """True on inter-module gap pixels of a Pilatus-like layout (slow, fast)."""
    s = np.arange(shape[0]) % (module[0] + gap[0]) >= module[0]
    f = np.arange(shape[1]) % (module[1] + gap[1]) >= module[1]
    return s[:, None] | f[None, :]


def beamstop_shadow(lab: np.ndarray, radius_mm: float, arm_width_mm: float) -> np.ndarray:
    """True in the shadow of a disc + arm (towards +x) beamstop.

    Defined on the lab x, y (mm) of each pixel centre (beam along −z), so it
    works for any panel layout.
    """
    x, y = lab[..., 0], lab[..., 1]
    disc = x * x + y * y < radius_mm**2
    arm = (x > 0) & (np.abs(y) < arm_width_mm / 2)
    return disc | arm


# --------------------------------------------------------------------------- forward factors


def forward_factors(detector, beam, geometry, air_pressure_kpa: float, air_temperature_k: float):
    """Per panel: dict with Ω (sr), P, η, T from diffuse_cli.corrections."""
    from diffuse_cli import corrections

    wavelength = beam.get_wavelength()
    out = []
    for panel, g in zip(detector, geometry):
        out.append(
            {
                "solid_angle": np.asarray(corrections.solid_angle(panel, g.lab), dtype=np.float64),
                "polarization": np.asarray(corrections.polarization(g.s1, beam), dtype=np.float64),
                "sensor_efficiency": (
                    np.asarray(corrections.sensor_efficiency(panel, g.s1, wavelength), dtype=np.float64)
                    if panel.get_thickness() > 0 and panel.get_material()
                    else np.ones(g.shape)  # no sensor model: every photon counts
                ),
                "air_transmission": np.asarray(
                    corrections.air_transmission(
                        g.lab, wavelength, pressure_kpa=air_pressure_kpa, temperature_k=air_temperature_k
                    ),
                    dtype=np.float64,
                ),
            }
        )
    return out


# --------------------------------------------------------------------------- simulator


@dataclass
class StillTruth:
    index: int
    U: np.ndarray
    A: np.ndarray
    scale: float
    n_spots: int = 0

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "U": self.U.tolist(),
            "A": self.A.tolist(),
            "scale": self.scale,
            "n_bragg_spots": self.n_spots,
        }


@dataclass(repr=False)
class Simulator:
    """Everything computed once for a simulation: models, geometry, factors, tables."""

    params: object  # phil extract
    detector: object = None
    beam: object = None
    geometry: list = field(default_factory=list)
    factors: list = field(default_factory=list)
    static_mask: list = field(default_factory=list)  # True = usable
    hot: list = field(default_factory=list)
    truth: TruthModel = None
    bragg: LatticeTable = None
    d_min: float = 0.0

    @classmethod
    def from_params(cls, params) -> "Simulator":
        from diffuse_cli.geometry import detector_geometry

        self = cls(params)
        seed = int(params.seed)
        wl = params.beam.wavelength
        trusted = (BAD_PIXEL_VALUE, params.detector_model.overload)
        dm = params.detector_model
        material = params.sensor.material if params.sensor.material != "none" else None
        if params.detector == "single":
            centre = dm.beam_centre_px or (dm.n_fast / 2.0, dm.n_slow / 2.0)
            self.detector = make_single_detector(
                dm.distance, dm.n_fast, dm.n_slow, dm.pixel_size, centre,
                material, params.sensor.thickness, wl, trusted,
            )
        else:
            mp = params.multi
            nf, ns = mp.panel_size
            total_f = mp.n_panels_fast * nf + (mp.n_panels_fast - 1) * mp.gap_px
            total_s = mp.n_panels_slow * ns + (mp.n_panels_slow - 1) * mp.gap_px
            centre = dm.beam_centre_px or (total_f / 2.0, total_s / 2.0)
            self.detector = make_multi_detector(
                dm.distance, nf, ns, dm.pixel_size, centre, mp.n_panels_fast, mp.n_panels_slow,
                mp.gap_px, mp.tilt_deg, np.random.default_rng([seed, 303]),
                material, params.sensor.thickness, wl, trusted,
            )
        self.beam = make_beam(wl, params.beam.polarization_fraction)
        s0 = self.beam.get_s0()
        self.d_min = self.detector.get_max_resolution(s0)
        self.geometry = detector_geometry(self.detector, self.beam)
        self.factors = forward_factors(
            self.detector, self.beam, self.geometry, params.air.pressure_kpa, params.air.temperature_k
        )
        # static pixel defects (same on every still)
        rng = np.random.default_rng([seed, 404])
        for panel, g in zip(self.detector, self.geometry):
            shape = g.shape
            bad = np.zeros(shape, dtype=bool)
            if params.masking.panel_gaps and params.detector == "single":
                bad |= pilatus_module_gaps(shape)
            if params.masking.beamstop:
                bad |= beamstop_shadow(g.lab, params.masking.beamstop_radius, params.masking.beamstop_arm_width)
            dead = rng.random(shape) < params.masking.dead_fraction
            hot = (rng.random(shape) < params.masking.hot_fraction) & ~bad & ~dead
            self.static_mask.append(~(bad | dead | hot))
            self.hot.append(hot)
        mp = DiffuseModelParameters(
            unit_cell=tuple(params.unit_cell),
            space_group=str(params.space_group),
            seed=seed,
            d_min=self.d_min,
            intensity_scale=params.model.intensity_scale,
            # the atomic scattering replaces the flat floor in absolute-scale mode
            background=0.0 if params.absolute_scale.composition else params.model.background,
            halo_amplitude=params.model.halo.amplitude,
            halo_sigma=tuple(params.model.halo.sigma),
            halo_tilt_deg=params.model.halo.tilt_deg,
            halo_b_factor=params.model.halo.b_factor,
            shell_amplitude=params.model.shell.amplitude,
            shell_radius=params.model.shell.radius,
            shell_width=params.model.shell.width,
            shell_axes=tuple(params.model.shell.axes),
            shell_tilt_deg=params.model.shell.tilt_deg,
            water_amplitude=params.model.water.amplitude,
            water_d_star=1.0 / params.model.water.d,
            water_width=params.model.water.width,
            composition=params.absolute_scale.composition or "",
            wilson_b=params.absolute_scale.wilson_b,
            photons_per_electron_unit=params.absolute_scale.photons_per_electron_unit,
        )
        self.truth = TruthModel(mp)
        self.truth.water_on = bool(params.water_ring)
        if params.bragg:
            self.bragg = bragg_table(mp, params.bragg_model.intensity, params.bragg_model.b_factor)
            H = LatticeTable.box_indices(self.bragg.hkl_max)
            nz = self.bragg.values.ravel() > 0
            self._bragg_H = H[nz].astype(np.float64)
            self._bragg_I = self.bragg.values.ravel()[nz]
            self._bragg_d_star = self.truth.d_star(self._bragg_H)
        # per-pixel static parts: exposure * Ω/µsr * P η T, water + atomic (|q| only)
        t = params.exposure_time
        self._static_factor = [
            t * f["solid_angle"] / MICROSTERADIAN * f["polarization"] * f["sensor_efficiency"] * f["air_transmission"]
            for f in self.factors
        ]
        self._isotropic = [self.truth.isotropic(g.d_star) for g in self.geometry]
        return self

    # -- per still
    def still_truth(self, i: int) -> StillTruth:
        rng = np.random.default_rng([int(self.params.seed), 505, i])
        U = random_rotations(rng, 1)[0]
        scale = float(rng.uniform(self.params.scale_min, self.params.scale_max))
        A = U @ self.truth.B
        return StillTruth(i, U, A, scale)

    def expected_diffuse(self, st: StillTruth) -> list[np.ndarray]:
        """Expected diffuse counts per panel (no Bragg, no defects)."""
        A_inv_T = np.linalg.inv(st.A).T
        out = []
        for g, F, W in zip(self.geometry, self._static_factor, self._isotropic):
            hkl = g.q @ A_inv_T
            out.append(st.scale * F * (self.truth.diffuse(hkl) + W))
        return out

    def bragg_spots(self, st: StillTruth):
        """Spots of this still: panel, x_px, y_px, expected photons, miller indices."""
        p = self.params
        s0 = np.array(self.beam.get_s0())
        r = self._bragg_H @ st.A.T
        eps = np.linalg.norm(r + s0, axis=1) - np.linalg.norm(s0)
        # domain-size term + mosaic-spread term (Nave), both as widths in ε
        sigma = p.bragg_model.excitation_sigma + self._bragg_d_star * math.tan(
            math.radians(p.bragg_model.mosaicity_deg) / 2.0
        )
        sel = np.abs(eps) < 4.0 * sigma
        if not sel.any():
            return None
        from cctbx.array_family import flex
        from dials.algorithms.spot_prediction import StillsDeltaPsiReflectionPredictor

        crystal = make_crystal(self.truth.p.unit_cell, self.truth.p.space_group, st.U)
        predictor = StillsDeltaPsiReflectionPredictor(
            self.beam, self.detector, crystal.get_A(), crystal.get_unit_cell(),
            crystal.get_space_group().type(), self.d_min,
        )
        H = self._bragg_H[sel]
        refl = predictor(flex.miller_index([tuple(int(v) for v in h) for h in H]))
        if len(refl) == 0:
            return None
        mi = np.array(refl["miller_index"], dtype=np.float64).reshape(-1, 3)
        xyz = refl["xyzcal.px"].as_numpy_array()
        panel = refl["panel"].as_numpy_array().astype(np.int64)
        # map predictions back to the candidate list to get ε and I(H)
        lut = {tuple(h): j for j, h in enumerate(H.astype(np.int64).tolist())}
        j = np.array([lut[tuple(h)] for h in mi.astype(np.int64).tolist()])
        I_full = self._bragg_I[sel][j]
        partiality = np.exp(-0.5 * (eps[sel][j] / sigma[sel][j]) ** 2)
        counts = st.scale * p.exposure_time * I_full * partiality
        # polarisation, sensor efficiency and air at the spot's pixel
        for pid in np.unique(panel):
            m = panel == pid
            shape = self.geometry[pid].shape
            iy = np.clip(xyz[m, 1].astype(np.int64), 0, shape[0] - 1)
            ix = np.clip(xyz[m, 0].astype(np.int64), 0, shape[1] - 1)
            f = self.factors[pid]
            counts[m] *= (f["polarization"] * f["sensor_efficiency"] * f["air_transmission"])[iy, ix]
        return panel, xyz[:, 0], xyz[:, 1], counts, mi

    def image(self, st: StillTruth) -> list[np.ndarray]:
        """Integer counts per panel (int32), with defects marked as DIALS expects."""
        p = self.params
        expected = self.expected_diffuse(st)
        if self.bragg is not None:
            spots = self.bragg_spots(st)
            if spots is not None:
                panel, x, y, counts, _ = spots
                st.n_spots = len(counts)
                added = render_spots(
                    [g.shape for g in self.geometry], panel, x, y, counts, p.bragg_model.profile_sigma_px
                )
                expected = [e + a for e, a in zip(expected, added)]
        rng = np.random.default_rng([int(p.seed), 606, st.index])
        overload = p.detector_model.overload
        out = []
        for e, good, hot in zip(expected, self.static_mask, self.hot):
            if p.noise:
                c = rng.poisson(e).astype(np.float64)
            else:
                c = np.rint(e)
            c = np.minimum(c, overload)  # saturation
            c[~good] = BAD_PIXEL_VALUE
            c[hot] = overload
            out.append(c.astype(np.int32))
        return out

    def truth_map(self, ndiv, subsample: int = 3):
        from diffuse_cli.grid import HKLGrid

        grid = HKLGrid.for_resolution(ndiv, self.truth.p.unit_cell, self.d_min)
        return grid, self.truth.voxel_average_map(grid, self.d_min, subsample=subsample)


# --------------------------------------------------------------------------- driver


def image_path(directory, prefix: str, index: int) -> str:
    import os

    return os.path.join(directory, f"{prefix}{index:05d}.cbf")


_WORKER_SIMULATOR = None


def _simulate_still(i: int) -> StillTruth:
    """Simulate and write still i with the module's current simulator."""
    from diffuse_cli import cbf_writer

    sim = _WORKER_SIMULATOR
    params = sim.params
    st = sim.still_truth(i)
    data = sim.image(st)
    path = image_path(params.output.directory, params.output.prefix, i)
    cbf_writer.write_image(path, sim.detector, sim.beam, params.exposure_time, data)
    return st


def run_simulation(params, phil_text: str = "") -> dict:
    """Write the images, truth.json and truth.npz; return a summary dict."""
    import os
    import time

    from diffuse_cli import program

    out_dir = params.output.directory
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    sim = Simulator.from_params(params)
    logger.info(
        "Detector: %d panel(s), d_min %.3f Å at the corners; %s set up in %.2f s",
        len(sim.detector), sim.d_min, "geometry, forward factors and lattice tables",
        time.perf_counter() - t0,
    )
    if params.detector == "single" and abs(params.beam.polarization_fraction - 0.999) > 1e-9:
        logger.warning(
            "A miniCBF cannot carry the polarization fraction: dxtbx reads 0.999, "
            "the images were simulated with %g (recorded in truth.json)",
            params.beam.polarization_fraction,
        )
    nproc = min(program.resolve_nproc(getattr(params, "nproc", 1)), params.n_stills)
    indices = range(params.n_stills)
    global _WORKER_SIMULATOR
    _WORKER_SIMULATOR = sim
    try:
        # workers inherit the simulator (geometry, factors, tables) through fork;
        # every still has its own random stream, so results do not depend on nproc
        stills = program.parallel_map(_simulate_still, indices, nproc, desc="stills", unit="still")
    finally:
        _WORKER_SIMULATOR = None
    paths = [os.path.basename(image_path(out_dir, params.output.prefix, st.index)) for st in stills]
    t_images = time.perf_counter() - t0
    logger.info("%d stills in %.2f s (nproc %d)", len(stills), t_images, nproc)

    truth = {
        "schema": "diffuse.simulate/1",
        "seed": int(params.seed),
        "n_stills": len(stills),
        "images": paths,
        "detector_kind": params.detector,
        "exposure_time_s": params.exposure_time,
        "unit_cell": list(params.unit_cell),
        "space_group": str(params.space_group),
        "d_min_A": sim.d_min,
        "intensity_model": (
            "expected_counts = scale_i * exposure_time * (Omega/1e-6 sr) * P * eta * T_air "
            "* I_true(hkl, d*) + Bragg; I_true in photons per microsteradian per second at "
            "scale 1; Omega, P, eta, T_air from diffuse_cli.corrections (solid_angle, "
            "polarization, sensor_efficiency, air_transmission) for the simulated detector and "
            "beam; noise-free images are rounded to integers; pixels -1 = gap/dead/beamstop, "
            "= overload: hot or saturated"
        ),
        "sensor": {
            "material": None if params.sensor.material == "none" else params.sensor.material,
            "thickness_mm": params.sensor.thickness,
            "carried_by_image_format": params.detector == "single",
        },
        "air": {"pressure_kpa": params.air.pressure_kpa, "temperature_k": params.air.temperature_k},
        "beam_polarization_fraction_carried_by_format": params.detector == "multi",
        "detector_and_beam": detector_description(sim.detector, sim.beam),
        "truth_model": sim.truth.to_dict(),
        "bragg": {
            "enabled": bool(params.bragg),
            "intensity": params.bragg_model.intensity,
            "b_factor": params.bragg_model.b_factor,
            "excitation_sigma_inv_A": params.bragg_model.excitation_sigma,
            "mosaicity_deg": params.bragg_model.mosaicity_deg,
            "partiality": "exp(-eps^2/(2 s^2)), s = excitation_sigma + d* tan(mosaicity/2)",
            "profile_sigma_px": params.bragg_model.profile_sigma_px,
            "predictor": "dials StillsDeltaPsiReflectionPredictor",
        },
        "noise": bool(params.noise),
        "stills": [st.to_dict() for st in stills],
        "parameters_phil": phil_text,
    }
    program.write_json(os.path.join(out_dir, "truth.json"), truth)
    if params.truth.map:
        t1 = time.perf_counter()
        grid, I = sim.truth_map(params.truth.ndiv, params.truth.subsample)
        h, k, l = grid.axes()
        program.write_npz(
            os.path.join(out_dir, "truth.npz"),
            schema=np.array("diffuse.simulate.truth/1"),
            I=I,
            h=h,
            k=k,
            l=l,
            ndiv=np.array(grid.ndiv),
            hkl_max=np.array(grid.hkl_max),
            unit_cell=np.array(params.unit_cell, dtype=np.float64),
            space_group=np.array(str(params.space_group)),
            d_min=np.array(sim.d_min),
            subsample=np.array(params.truth.subsample),
            pixel_mask=np.stack(sim.static_mask) if len({m.shape for m in sim.static_mask}) == 1 else np.array([]),
        )
        logger.info("Truth map %s (ndiv %s) in %.2f s", grid.shape, grid.ndiv, time.perf_counter() - t1)
    return {"n_stills": len(stills), "directory": out_dir, "images": paths, "simulator": sim}
