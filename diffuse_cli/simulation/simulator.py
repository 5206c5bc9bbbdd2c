"""The simulator: models, geometry and forward factors computed once, then images of stills or a sweep.

Stills: each still has a random orientation U_i (uniform on SO(3)) and scale.
Rotation: one crystal on a single-axis goniometer; frame j covers
φ ∈ [φ_start + jΔ, φ_start + (j+1)Δ) and records the mean of the diffuse
truth over ``rotation.sub_steps`` sub-steps, with Bragg spots by their rocking
fraction inside the frame. The crystal may drift (scan-varying A).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli.simulation import bragg, forward, instrument
from diffuse_cli.simulation.crystal import LatticeTable, TruthGrid, make_crystal, random_rotations
from diffuse_cli.simulation.truth import DiffuseModelParameters, TruthModel, bragg_table

logger = logging.getLogger("diffuse.simulate")

MICROSTERADIAN = 1e-6
BAD_PIXEL_VALUE = -1  # Pilatus convention: -1 = no data (gaps, dead, beamstop)


@dataclass
class StillTruth:
    index: int
    U: np.ndarray
    A: np.ndarray
    scale: float
    n_spots: int = 0
    # XFEL shots (kind=xfel): the header wavelength (the spectrum's mean, Å), the
    # spectrum (wavelengths Å, weights summing to 1) and the relative pulse flux
    wavelength: float | None = None
    spectrum: tuple | None = None
    flux: float | None = None
    incident_photons: float | None = None  # header flux (xfel.photons_per_pulse × flux), or None

    def to_dict(self) -> dict:
        out = {
            "index": self.index,
            "U": self.U.tolist(),
            "A": self.A.tolist(),
            "scale": self.scale,
            "n_bragg_spots": self.n_spots,
        }
        if self.wavelength is not None:
            out.update(
                wavelength_A=self.wavelength,
                spectrum={
                    "wavelength_A": [float(v) for v in self.spectrum[0]],
                    "weight": [float(v) for v in self.spectrum[1]],
                },
                flux=self.flux,
                incident_photons=self.incident_photons,
            )
        return out


@dataclass
class FrameTruth:
    """One frame of a sweep; U and A are the crystal's (no goniometer rotation) at the frame centre."""

    index: int  # 0-based position in the sweep
    image_number: int
    phi_start: float  # degrees
    phi_end: float
    U: np.ndarray
    A: np.ndarray
    scale: float
    n_spots: int = 0

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "image_number": self.image_number,
            "phi_range_deg": [self.phi_start, self.phi_end],
            "U": self.U.tolist(),
            "A": self.A.tolist(),
            "scale": self.scale,
            "n_bragg_spots": self.n_spots,
        }


def model_parameters(params, d_min: float) -> DiffuseModelParameters:
    return DiffuseModelParameters(
        unit_cell=tuple(params.unit_cell),
        space_group=str(params.space_group),
        seed=int(params.seed),
        d_min=d_min,
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
        wavelength=params.beam.wavelength,
    )


@dataclass(repr=False)
class Simulator:
    """Everything computed once for a simulation: models, geometry, factors, tables."""

    params: object  # phil extract
    detector: object = None
    beam: object = None
    goniometer: object = None
    geometry: list = field(default_factory=list)
    factors: list = field(default_factory=list)
    static_mask: list = field(default_factory=list)  # True = usable
    hot: list = field(default_factory=list)
    truth: TruthModel = None
    bragg: LatticeTable = None
    d_min: float = 0.0
    sensor_mu_per_mm: float = 0.0  # xraylib μ used for η (0: no sensor model)
    air_mu_per_mm: float = 0.0

    @classmethod
    def from_params(cls, params) -> "Simulator":
        self = cls(params)
        seed = int(params.seed)
        wl = params.beam.wavelength
        trusted = (BAD_PIXEL_VALUE, params.detector_model.overload)
        dm = params.detector_model
        material = params.sensor.material if params.sensor.material != "none" else None
        if params.detector == "single":
            centre = dm.beam_centre_px or (dm.n_fast / 2.0, dm.n_slow / 2.0)
            self.detector = instrument.make_single_detector(
                dm.distance, dm.n_fast, dm.n_slow, dm.pixel_size, centre,
                material, params.sensor.thickness, wl, trusted,
            )
        elif params.multi.layout == "cspad":
            mp = params.multi
            self.detector = instrument.make_cspad_detector(
                dm.distance, mp.panel_size[0], mp.panel_size[1], dm.pixel_size, mp.modules_per_quadrant,
                mp.gap_px, mp.tilt_deg, mp.rotation_deg, np.random.default_rng([seed, 303]),
                material, params.sensor.thickness, wl, trusted,
            )
        else:
            mp = params.multi
            nf, ns = mp.panel_size
            total_f = mp.n_panels_fast * nf + (mp.n_panels_fast - 1) * mp.gap_px
            total_s = mp.n_panels_slow * ns + (mp.n_panels_slow - 1) * mp.gap_px
            centre = dm.beam_centre_px or (total_f / 2.0, total_s / 2.0)
            self.detector = instrument.make_multi_detector(
                dm.distance, nf, ns, dm.pixel_size, centre, mp.n_panels_fast, mp.n_panels_slow,
                mp.gap_px, mp.tilt_deg, np.random.default_rng([seed, 303]),
                material, params.sensor.thickness, wl, trusted,
            )
        self.beam = instrument.make_beam(wl, params.beam.polarization_fraction)
        if params.kind == "rotation":
            self.goniometer = instrument.make_goniometer(params.rotation.axis)
        self.d_min = self.detector.get_max_resolution(self.beam.get_s0())
        self.geometry = [forward.pixel_geometry(panel, self.beam) for panel in self.detector]
        sensor = None
        if material and params.sensor.thickness > 0:
            self.sensor_mu_per_mm = forward.sensor_attenuation(material, wl)
            sensor = (self.sensor_mu_per_mm, params.sensor.thickness)
        self.factors, self.air_mu_per_mm = forward.forward_factors(
            self.detector, self.beam, self.geometry, sensor, params.air.pressure_kpa, params.air.temperature_k
        )
        # static pixel defects (same on every image)
        rng = np.random.default_rng([seed, 404])
        for g in self.geometry:
            shape = g.shape
            bad = np.zeros(shape, dtype=bool)
            if params.masking.panel_gaps and params.detector == "single":
                bad |= instrument.pilatus_module_gaps(shape)
            if params.masking.beamstop:
                bad |= instrument.beamstop_shadow(g.lab, params.masking.beamstop_radius, params.masking.beamstop_arm_width)
            dead = rng.random(shape) < params.masking.dead_fraction
            hot = (rng.random(shape) < params.masking.hot_fraction) & ~bad & ~dead
            self.static_mask.append(~(bad | dead | hot))
            self.hot.append(hot)
        mp = model_parameters(params, self.d_min)
        self.truth = TruthModel(mp)
        self.truth.water_on = bool(params.water_ring)
        if params.bragg:
            self.bragg = bragg_table(mp, params.bragg_model.intensity, params.bragg_model.b_factor)
            H = LatticeTable.box_indices(self.bragg.hkl_max)
            nz = self.bragg.values.ravel() > 0
            self._bragg_H = H[nz].astype(np.float64)
            self._bragg_I = self.bragg.values.ravel()[nz]
            self._bragg_d_star = self.truth.d_star(self._bragg_H)
        # per-pixel static parts: exposure · Ω/µsr · P η T, and the |q|-only terms of I_true
        self._static_factor = [self.exposure * f.diffuse for f in self.factors]
        self._isotropic = [self.truth.isotropic(g.d_star) for g in self.geometry]
        self._sweep_spots = None
        return self

    # -- stills
    @property
    def exposure(self) -> float:
        """The time factor of the counts: exposure_time (s), or 1 for an XFEL pulse (I_true per pulse)."""
        return 1.0 if self.params.kind == "xfel" else self.params.exposure_time

    def still_truth(self, i: int) -> StillTruth:
        rng = np.random.default_rng([int(self.params.seed), 505, i])
        U = random_rotations(rng, 1)[0]
        scale = float(rng.uniform(self.params.scale_min, self.params.scale_max))
        if self.params.kind != "xfel":
            return StillTruth(i, U, U @ self.truth.B, scale)
        x = self.params.xfel
        # own stream, so the orientation and overlap scale match kind=stills with the same seed
        rng = np.random.default_rng([int(self.params.seed), 808, i])
        wavelength = self.params.beam.wavelength * (1.0 + x.wavelength_jitter * rng.standard_normal())
        wavelength = float(f"{wavelength:.6g}")  # exactly what a miniCBF header carries ("%g" Å)
        flux = gamma_unit_mean(rng, x.flux_jitter)
        spectrum = spectrum_samples(wavelength, x.bandwidth, x.spectrum_samples)
        photons = float(f"{x.photons_per_pulse * flux:.6g}") if x.photons_per_pulse else None  # as "%g" headers
        return StillTruth(i, U, U @ self.truth.B, scale * flux, wavelength=wavelength, spectrum=spectrum, flux=flux,
                          incident_photons=photons)

    def _shot_factors(self, wavelength: float) -> list[np.ndarray]:
        """exposure · Ω/µsr · P η T per panel at ``wavelength`` (η and T_air follow μ(λ))."""
        if wavelength == self.beam.get_wavelength():
            return self._static_factor
        p = self.params
        sensor = None
        if self.sensor_mu_per_mm:
            sensor = (forward.sensor_attenuation(p.sensor.material, wavelength), p.sensor.thickness)
        beam = instrument.make_beam(wavelength, p.beam.polarization_fraction)
        factors, _ = forward.forward_factors(
            self.detector, beam, self.geometry, sensor, p.air.pressure_kpa, p.air.temperature_k
        )
        return [self.exposure * f.diffuse for f in factors]

    def expected_diffuse(self, st: StillTruth) -> list[np.ndarray]:
        """Expected diffuse counts per panel of a still (no Bragg, no defects).

        An XFEL shot sums its spectrum: Σ_k w_k F(λ_k) I_true(q(λ_k)), with
        q(λ) = q(λ0)·λ0/λ (the pixel directions do not depend on λ).
        """
        A_inv_T = np.linalg.inv(st.A).T
        if st.spectrum is None:
            return [
                st.scale * F * (self.truth.diffuse(g.q @ A_inv_T) + W)
                for g, F, W in zip(self.geometry, self._static_factor, self._isotropic)
            ]
        lam0 = self.beam.get_wavelength()
        out = [np.zeros(g.shape) for g in self.geometry]
        for lam, w in zip(*st.spectrum):
            for acc, g, F in zip(out, self.geometry, self._shot_factors(lam)):
                f = lam0 / lam
                acc += w * F * (self.truth.diffuse((g.q * f) @ A_inv_T) + self.truth.isotropic(g.d_star * f))
        return [st.scale * acc for acc in out]

    def bragg_spots(self, st: StillTruth):
        """Spots of a still: panel, x_px, y_px, expected photons, miller indices (or None).

        An XFEL shot: the spots of each spectral sample (its own beam, weight w_k).
        """
        p = self.params
        crystal = make_crystal(self.truth.p.unit_cell, self.truth.p.space_group, st.U)
        samples = [(self.beam, 1.0)] if st.spectrum is None else [
            (instrument.make_beam(lam, p.beam.polarization_fraction), w) for lam, w in zip(*st.spectrum)
        ]
        parts = []
        for beam, w in samples:
            spots = bragg.still_spots(
                beam, self.detector, crystal, self.detector.get_max_resolution(beam.get_s0()),
                self._bragg_H, self._bragg_I, self._bragg_d_star,
                p.bragg_model.excitation_sigma, p.bragg_model.mosaicity_deg,
            )
            if spots is not None:
                parts.append(spots[:3] + (w * spots[3], spots[4]))
        if not parts:
            return None
        panel, x, y, photons, mi = (np.concatenate(c) for c in zip(*parts))
        counts = st.scale * self.exposure * photons * self._spot_factor(panel, x, y)
        return panel, x, y, counts, mi

    def _spot_factor(self, panel, x, y) -> np.ndarray:
        """P η T at each spot's pixel."""
        out = np.ones(len(panel))
        for pid in np.unique(panel):
            m = panel == pid
            shape = self.geometry[pid].shape
            iy = np.clip(y[m].astype(np.int64), 0, shape[0] - 1)
            ix = np.clip(x[m].astype(np.int64), 0, shape[1] - 1)
            out[m] = self.factors[pid].bragg[iy, ix]
        return out

    def image(self, st: StillTruth) -> list[np.ndarray]:
        expected = self.expected_diffuse(st)
        if self.bragg is not None:
            spots = self.bragg_spots(st)
            if spots is not None:
                panel, x, y, counts, _ = spots
                st.n_spots = len(counts)
                expected = self._add_spots(expected, panel, x, y, counts)
        return self._detect(expected, st.index)

    # -- rotation
    @property
    def rotation_axis(self) -> np.ndarray:
        axis = np.asarray(self.params.rotation.axis, dtype=np.float64)
        return axis / np.linalg.norm(axis)

    def _sweep_orientation(self):
        """U0 (crystal orientation at φ_start), the drift axis and the drift per degree of φ."""
        r = self.params.rotation
        rng = np.random.default_rng([int(self.params.seed), 707])
        U0 = random_rotations(rng, 1)[0]
        drift_axis = rng.normal(size=3)
        total = r.n_images * r.oscillation
        return U0, drift_axis / np.linalg.norm(drift_axis), r.drift_deg / total if total else 0.0

    def U_at(self, phi_deg) -> np.ndarray:
        """Crystal orientation(s) U(φ) = R(d, rate·(φ − φ_start)) U0, shape (N, 3, 3)."""
        U0, axis, rate = self._sweep_orientation()
        angles = rate * (np.atleast_1d(np.asarray(phi_deg, dtype=np.float64)) - self.params.rotation.phi_start)
        return bragg.rotation_matrices(axis, angles) @ U0

    def A_at(self, phi_deg) -> np.ndarray:
        return self.U_at(phi_deg) @ self.truth.B

    def frame_truth(self, j: int) -> FrameTruth:
        r, p = self.params.rotation, self.params
        lo = r.phi_start + j * r.oscillation
        hi = lo + r.oscillation
        U = self.U_at(0.5 * (lo + hi))[0]
        # a smooth decay of the incident flux over the sweep, scale_max to scale_min
        scale = p.scale_max - (p.scale_max - p.scale_min) * (j + 0.5) / r.n_images
        return FrameTruth(j, r.first_image + j, lo, hi, U, U @ self.truth.B, float(scale))

    def scan_point_A(self) -> np.ndarray:
        """A at the n + 1 frame boundaries (DIALS scan points of a scan-varying crystal)."""
        r = self.params.rotation
        return self.A_at(r.phi_start + r.oscillation * np.arange(r.n_images + 1))

    def expected_diffuse_frame(self, ft: FrameTruth) -> list[np.ndarray]:
        """Mean over sub-steps of the diffuse counts: hkl = (R(φ_k) A(φ_k))⁻¹ q."""
        n_sub = self.params.rotation.sub_steps
        phis = ft.phi_start + (np.arange(n_sub) + 0.5) * (ft.phi_end - ft.phi_start) / n_sub
        M = bragg.rotation_matrices(self.rotation_axis, phis) @ self.A_at(phis)
        out = []
        for g, F, W in zip(self.geometry, self._static_factor, self._isotropic):
            acc = np.zeros(g.shape)
            for Mk in M:
                acc += self.truth.diffuse(g.q @ np.linalg.inv(Mk).T)
            out.append(ft.scale * F * (acc / n_sub + W))
        return out

    def sweep_spots(self) -> dict:
        """Every spot of the sweep with its crossing φ and rocking width (computed once)."""
        if self._sweep_spots is None:
            r, bm = self.params.rotation, self.params.bragg_model
            spots = bragg.rotation_spots(
                self.beam, self.detector, self._bragg_H, self._bragg_I, self._bragg_d_star, self.A_at,
                self.rotation_axis, (r.phi_start, r.phi_start + r.n_images * r.oscillation),
                bm.excitation_sigma, bm.mosaicity_deg,
            )
            spots["factor"] = self._spot_factor(spots["panel"], spots["x"], spots["y"])
            self._sweep_spots = spots
        return self._sweep_spots

    def frame_image(self, ft: FrameTruth) -> list[np.ndarray]:
        expected = self.expected_diffuse_frame(ft)
        if self.bragg is not None:
            s = self.sweep_spots()
            frac = bragg.frame_fractions(s["phi"], s["sigma_phi"], ft.phi_start, ft.phi_end)
            on = frac > 1e-6
            counts = ft.scale * self.params.exposure_time * s["photons"][on] * frac[on] * s["factor"][on]
            ft.n_spots = int(np.count_nonzero(counts >= 1.0))
            expected = self._add_spots(expected, s["panel"][on], s["x"][on], s["y"][on], counts)
        return self._detect(expected, ft.index)

    # -- detection
    def _add_spots(self, expected, panel, x, y, counts):
        added = bragg.render_spots(
            [g.shape for g in self.geometry], panel, x, y, counts, self.params.bragg_model.profile_sigma_px
        )
        return [e + a for e, a in zip(expected, added)]

    def _detect(self, expected, index: int) -> list[np.ndarray]:
        """Integer counts per panel (int32): Poisson or rounded, saturation, defects marked."""
        p = self.params
        rng = np.random.default_rng([int(p.seed), 606, index])
        overload = p.detector_model.overload
        out = []
        for e, good, hot in zip(expected, self.static_mask, self.hot):
            c = rng.poisson(e).astype(np.float64) if p.noise else np.rint(e)
            c = np.minimum(c, overload)  # saturation
            c[~good] = BAD_PIXEL_VALUE
            c[hot] = overload
            out.append(c.astype(np.int32))
        return out

    def truth_map(self, ndiv, subsample: int = 3):
        grid = TruthGrid.for_resolution(ndiv, self.truth.p.unit_cell, self.d_min)
        return grid, self.truth.voxel_average_map(grid, self.d_min, subsample=subsample)


def gamma_unit_mean(rng: np.random.Generator, rms: float) -> float:
    """A pulse's relative flux: gamma-distributed, mean 1, relative rms ``rms`` (1 when rms = 0)."""
    if rms <= 0:
        return 1.0
    shape = 1.0 / rms**2
    return float(rng.gamma(shape, 1.0 / shape))


def spectrum_samples(wavelength: float, bandwidth: float, n: int) -> tuple:
    """(wavelengths Å, weights) of a Gaussian spectrum of relative rms ``bandwidth`` about ``wavelength``.

    n equally spaced samples over ±2 rms with Gaussian weights normalised to 1,
    symmetric, so their weighted mean is ``wavelength``. bandwidth 0 or n = 1:
    the single wavelength.
    """
    if bandwidth <= 0 or n <= 1:
        return (np.array([wavelength]), np.array([1.0]))
    z = np.linspace(-2.0, 2.0, n)
    w = np.exp(-0.5 * z * z)
    return (wavelength * (1.0 + bandwidth * z), w / w.sum())


def check_sweep(params) -> None:
    """Physical sense of the rotation parameters (raises ValueError naming the parameter)."""
    r = params.rotation
    if not math.isfinite(r.oscillation) or r.oscillation <= 0:
        raise ValueError("rotation.oscillation must be > 0 degrees")
    if np.linalg.norm(np.asarray(r.axis, dtype=np.float64)) == 0:
        raise ValueError("rotation.axis must not be the zero vector")
