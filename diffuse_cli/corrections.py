"""Per-pixel intensity corrections, as numpy arrays (formulas in docs/corrections.md).

Forward model of the counts recorded in a pixel (photon units; ADU = gain × photons)::

    expected_counts = scale · t_exp · (Ω / 1e-6) · P · η · T_air · T_kapton · I

with ``I`` in photons per microsteradian per second (per unit scale), ``Ω``
the pixel solid angle (sr), ``P`` the polarization factor, ``η`` the sensor
absorption efficiency and ``T`` transmissions. Every correction is stored as a
**multiplier** of counts: ``1e-6/Ω``, ``1/P``, ``1/η``, ``1/T_air``,
``1/T_kapton``; their product is ``total`` and::

    I = (counts − background) · total / (gain · N)
    σ = sqrt(gain · max(counts, 0) + var(background)) · total / (gain · N)

with ``N`` the still's normalisation: ``t_exp`` (s) when it has an exposure
time, else (XFEL shots) its incident photons / 1e12 or 1. ``total`` is the
shot's own: direction-only factors cached per detector times the
λ-dependent ones evaluated from per-pixel path lengths (:func:`shot_total`).

No rotation Lorentz factor is ever applied (pixel-level diffuse intensities).

The factors of one pixel (Ω, P, η, transmissions, constants) are in
:mod:`diffuse_cli.correction_factors`, the per-detector multipliers and the
per-shot attenuation coefficients in :mod:`diffuse_cli.detector_corrections`;
their names are importable from here too.

Functions taking a panel return arrays of shape ``(n_slow, n_fast)`` for inputs
``lab_mm`` / ``s1`` of shape ``(n_slow, n_fast, 3)`` (from
:class:`diffuse_cli.geometry.PanelGeometry`); they also accept any ``(..., 3)``.
Lengths are mm, wave vectors Å⁻¹, attenuation coefficients mm⁻¹.
"""

# STATUS: api-ready

from __future__ import annotations

import logging

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)

from diffuse_cli.correction_factors import (  # noqa: F401  (re-exported)
    AIR_MASS_FRACTIONS,
    AIR_MOLAR_MASS,
    GAS_CONSTANT,
    HC_EV_ANGSTROM,
    KaptonParams,
    MICROSTERADIAN,
    ROOM_TEMPERATURE_K,
    STANDARD_PRESSURE_KPA,
    _norm,
    air_density,
    air_mass_attenuation,
    air_mu,
    air_transmission,
    cos_incidence,
    energy_ev,
    kapton_mu,
    kapton_transmission,
    mass_attenuation,
    panel_normal,
    pixel_area_mm2,
    polarization,
    sensor_efficiency,
    sensor_mu,
    solid_angle,
)

from diffuse_cli.detector_corrections import (  # noqa: F401  (re-exported: their old home)
    FORMULAS_VERSION,
    MULTIPLIER_NAMES,
    WAVELENGTH_COEFFICIENTS,
    CorrectionOptions,
    _efficiency_applies,
    detector_multipliers,
    geometry_from_s1,
    pack_coefficients,
    panel_factors,
    path_lengths,
    same_coefficients,
    wavelength_coefficients,
)

logger = logging.getLogger("diffuse.corrections")


# ------------------------------------------------------------------ per shot: λ-dependent factors
#
# Ω and P depend on pixel directions only (P on the beam direction and its
# polarization, not on λ); η, T_air and T_kapton are all exp(±μ(λ)·path) with
# a direction-only path per pixel. So a detector's factors file holds Ω, P and
# the paths once, and each shot needs only its attenuation coefficients:
#
#   total(λ) = (1e-6/Ω)·(1/P) · exp(μ_air(λ)·L) · exp(μ_k(λ)·ℓ_k) / (1 − exp(−μ_s(λ)·τ))
#
# exact (no interpolation), evaluated for the used pixels of each shot
# (the coefficients: detector_corrections.wavelength_coefficients).


def shot_total(direction_total, paths: dict, coefficients: dict, pixels: np.ndarray, panel_offsets) -> np.ndarray:
    """``total`` (float64) of one shot for the given pixels (sorted flat indices).

    direction_total: (Npix,) (1e-6/Ω)·(1/P); paths: :func:`path_lengths`
    arrays (Npix,); coefficients: :func:`wavelength_coefficients` of the shot.
    """
    total = np.asarray(direction_total)[pixels].astype(np.float64)
    exponent = None
    for path_name, mu_name in (("air_path_mm", "air_mu_per_mm"), ("kapton_path_mm", "kapton_mu_per_mm")):
        mu = float(coefficients[mu_name])
        if mu > 0 and path_name in paths:
            term = mu * paths[path_name][pixels].astype(np.float64)
            exponent = term if exponent is None else exponent + term
    if exponent is not None:
        total *= np.exp(exponent)
    mu_s = np.asarray(coefficients["sensor_mu_per_mm"], dtype=np.float64).ravel()
    if "sensor_path_mm" in paths and np.any(mu_s > 0):
        tau = paths["sensor_path_mm"]
        if np.all(mu_s == mu_s[0]):
            total /= -np.expm1(-mu_s[0] * tau[pixels].astype(np.float64))
        else:  # pixels are sorted: one slice per panel
            bounds = np.searchsorted(pixels, np.asarray(panel_offsets))
            for i, mu in enumerate(mu_s):
                if mu > 0 and bounds[i + 1] > bounds[i]:
                    sl = slice(bounds[i], bounds[i + 1])
                    total[sl] /= -np.expm1(-mu * tau[pixels[sl]].astype(np.float64))
    return total


def unpack_coefficients(a) -> dict:
    """Inverse of :func:`pack_coefficients`."""
    a = np.asarray(a, dtype=np.float64)
    return {"air_mu_per_mm": float(a[0]), "kapton_mu_per_mm": float(a[1]), "sensor_mu_per_mm": a[2:]}


# ------------------------------------------------------------------ normalisation
#
# A still is normalised by N: its exposure time t (s) when it has one, so I
# is per second; an XFEL shot has none and is normalised per shot: by its
# incident photons (from the beam model's flux in the header, or a table of
# photons or pulse energies) in units of 1e12, else by 1 (I per shot; the
# per-shot scale is left to diffuse.merge). I = (C − B)·total/(gain·N).

PHOTON_UNIT = 1.0e12
#: Joule per eV (exact, SI 2019).
JOULE_PER_EV = 1.602176634e-19
NORMALISATIONS = ("exposure_time", "incident_photons", "unit")


def photons_from_pulse_energy(pulse_energy_mj: float, wavelength: float) -> float:
    """Incident photons of a pulse: E / (h c / λ), E in mJ, λ in Å."""
    return float(pulse_energy_mj) * 1e-3 / (energy_ev(wavelength) * JOULE_PER_EV)


# ------------------------------------------------------------------ counts -> intensity


def _corrected_intensity_py(counts, multiplier, k, gain, background, background_variance, intensity, sigma):
    """corrected_intensity's arithmetic per pixel, in one pass (the same IEEE operations in
    the same order; background and its variance of length 1 or one per pixel)."""
    nb, nv = background.shape[0], background_variance.shape[0]
    for i in range(counts.shape[0]):
        c = np.float64(counts[i])
        scale = multiplier[i] * k
        intensity[i] = (c - background[i if nb > 1 else 0]) * scale
        var = gain * (c if c > 0.0 else 0.0) + background_variance[i if nv > 1 else 0]
        sigma[i] = np.sqrt(var) * scale


_FUSED_KERNEL: list = []


def _fused_intensity(counts, multiplier, k: float, gain: float, background, background_variance):
    """(I, σ) by the compiled one-pass kernel (numba, loaded at the first call), or None
    (no numba, or arrays it does not take: then numpy does it)."""
    if not _FUSED_KERNEL:
        try:
            import numba

            _FUSED_KERNEL.append(numba.njit(nogil=True, cache=True)(_corrected_intensity_py))
        except ImportError:  # pragma: no cover - depends on the installation
            _FUSED_KERNEL.append(None)
    kernel = _FUSED_KERNEL[0]
    if kernel is None or not isinstance(counts, np.ndarray) or counts.ndim != 1 or counts.dtype.kind not in "iuf":
        return None
    multiplier = np.ascontiguousarray(multiplier, dtype=np.float64)
    background = np.ascontiguousarray(np.atleast_1d(np.asarray(background, dtype=np.float64)))
    variance = np.ascontiguousarray(np.atleast_1d(np.asarray(background_variance, dtype=np.float64)))
    n = counts.shape[0]
    if multiplier.shape != (n,) or background.ndim != 1 or variance.ndim != 1 \
            or background.shape[0] not in (1, n) or variance.shape[0] not in (1, n) or n == 0:
        return None
    if counts.dtype not in (np.int32, np.int64, np.float64):
        counts = counts.astype(np.float64)  # one compiled signature per counts type
    intensity, sigma = np.empty(n), np.empty(n)
    kernel(np.ascontiguousarray(counts), multiplier, float(k), float(gain), background, variance, intensity, sigma)
    return intensity, sigma


def corrected_intensity(
    counts,
    multiplier,
    exposure_time: float,
    gain: float = 1.0,
    background=0.0,
    background_variance=0.0,
):
    """Corrected intensity (photons/µsr/s) and its Poisson σ.

    ``counts`` in ADU (= gain × photons), ``multiplier`` the per-pixel total,
    ``background`` in ADU for this exposure with variance ``background_variance``
    (ADU²). var(counts) = gain·max(counts, 0), i.e. var(photons) = photons.
    """
    k = 1.0 / (float(exposure_time) * float(gain))
    fused = _fused_intensity(counts, multiplier, k, float(gain), background, background_variance)
    if fused is not None:
        return fused
    counts = np.asarray(counts, dtype=np.float64)
    scale = np.asarray(multiplier, dtype=np.float64) * k
    # in place: the same operations as (counts − B)·scale and sqrt(gain·max(counts, 0) + V)·scale
    # with half the fresh detector-sized arrays (page faults cost more than the arithmetic)
    intensity = np.subtract(counts, background)
    intensity *= scale
    sigma = np.maximum(counts, 0.0)
    sigma *= gain
    sigma += background_variance
    np.sqrt(sigma, out=sigma)
    sigma *= scale
    return intensity, sigma


def expected_counts(intensity, multiplier, exposure_time: float, gain: float = 1.0, scale: float = 1.0):
    """Forward model, the exact inverse of :func:`corrected_intensity` (ADU).

    ``gain · scale · t_exp · I / total`` = gain·scale·t·(Ω/1e-6)·P·η·T·I.
    """
    return gain * scale * float(exposure_time) * np.asarray(intensity, dtype=np.float64) / np.asarray(multiplier, dtype=np.float64)


def background_rate(images, exposure_times, gain: float = 1.0):
    """Background map from background images: mean rate (ADU/s) and its variance.

    ``images``: iterable of 1-D count arrays (pixel order), one per image.
    rate = mean_i(C_i / t_i); var(rate) = Σ_i gain·max(C_i,0)/t_i² / N².
    The background for an exposure t is rate·t with variance var(rate)·t².
    """
    total = None
    var = None
    n = 0
    for counts, t in zip(images, exposure_times):
        c = np.asarray(counts, dtype=np.float64)
        if total is None:
            total = np.zeros_like(c)
            var = np.zeros_like(c)
        elif c.shape != total.shape:
            raise ValueError("background images differ in size")
        total += c / t
        var += gain * np.maximum(c, 0.0) / (t * t)
        n += 1
    if n == 0:
        raise ValueError("no background images")
    return total / n, var / (n * n)


# ------------------------------------------------------------------ files (diffuse.correct)

#: files kept by every memo of per-detector arrays (_cached): a 6M-pixel
#: detector's arrays take ~220 MB
CACHE_ENTRIES = 4


def used_pixels(mask_bits: np.ndarray, n_pixels: int) -> np.ndarray:
    """Indices (pixel order) of the used pixels from packed mask bits."""
    return np.flatnonzero(np.unpackbits(np.asarray(mask_bits, dtype=np.uint8), count=int(n_pixels)))


#: number of set bits of each byte value
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int64)


def count_used(mask_bits: np.ndarray, n_pixels: int) -> int:
    """Number of used pixels from packed mask bits (the padding bits past n_pixels are 0)."""
    bits = np.asarray(mask_bits, dtype=np.uint8)
    if bits.size != (int(n_pixels) + 7) // 8:
        raise ValueError(f"{bits.size} mask bytes for {n_pixels} pixels")
    return int(np.bincount(bits, minlength=256) @ _POPCOUNT)


def still_background(still: dict, pixels: np.ndarray, background: dict | None):
    """Background (ADU) and its variance for the used pixels of a corrected still."""
    mode = str(still["background_mode"])
    if mode == "none":
        return 0.0, 0.0
    if mode == "constant":
        return float(still["background_constant"]), float(still["background_constant_variance"])
    if mode == "map":
        if background is None:
            raise ValueError("background map needed but not given")
        t = float(still["exposure_time"])
        return background["rate"][pixels] * t, background["rate_variance"][pixels] * t * t
    raise ValueError(f"unknown background mode {mode!r}")


#: the factors file's fields behind the arrays _detector_arrays makes on first use
_LAZY_FIELDS = {
    "q_unit": ("s1_unit", "beam_direction"),
    "d_unit": ("s1_unit", "beam_direction"),
}


class _DetectorArrays(dict):
    """:func:`_detector_arrays`: ``q_unit`` and ``d_unit`` are read and computed at their first
    use, each alone (diffuse.correct needs neither, diffuse.merge only q_unit). The rest is
    read at once, so that the memo's size does not depend on which shots came first."""

    def __init__(self, factors_path, eager: dict):
        super().__init__(eager)
        self.factors_path = factors_path

    def __missing__(self, key):
        from diffuse_cli.formats.factors import read_factors

        if key not in _LAZY_FIELDS:
            raise KeyError(key)
        f = read_factors(self.factors_path, fields=_LAZY_FIELDS[key])
        s1, beam = f["s1_unit"], np.asarray(f["beam_direction"], dtype=np.float64)
        out = np.empty(s1.shape if key == "q_unit" else len(s1), dtype=np.float32)
        if key == "q_unit" and s1.dtype == np.float32 and np.array_equal(beam.astype(np.float32), beam):
            # ŝ0 exact in float32 (e.g. (0, 0, −1)): the float32 difference is the float64 one
            # rounded once (two float32 numbers differ exactly in float64 unless one is
            # < 2^-28 of the other, and then no rounding tie is within reach)
            np.subtract(s1, beam.astype(np.float32), out=out)
            self[key] = out
            return out
        step = 1 << 18  # in blocks: no detector-sized float64 temporaries
        for i in range(0, len(s1), step):
            q = s1[i:i + step].astype(np.float64) - beam
            out[i:i + step] = q if key == "q_unit" else np.sqrt(np.einsum("ij,ij->i", q, q))
        self[key] = out
        return out


def _detector_arrays(factors_path) -> dict:
    """Per-detector arrays load_observations gathers from, computed once per
    detector, not per still (float32 unless said):

    ``total`` (float64) at the file's reference wavelength and its
    coefficients ``reference``; ``q_unit`` = ŝ1 − ŝ0 and ``d_unit`` = |ŝ1 − ŝ0|
    (a shot's q = q_unit/λ, |q| = d_unit/λ); ``direction`` = (1e-6/Ω)·(1/P)
    and the ``paths`` for shots at other wavelengths (:func:`shot_total`).
    q_unit and d_unit are made at their first use (:class:`_DetectorArrays`)."""
    from diffuse_cli.formats.factors import read_factors

    paths = ("air_path_mm", "sensor_path_mm", "kapton_path_mm")
    f = read_factors(factors_path, fields=("panel_shapes", "beam_direction", "wavelength", "s0", "total",
                                           "solid_angle", "polarization", *paths, *WAVELENGTH_COEFFICIENTS))
    shapes = f["panel_shapes"].astype(np.int64)
    return _DetectorArrays(factors_path, {
        "total": f["total"],
        "direction": f["solid_angle"] * f["polarization"],
        "paths": {n: f[n] for n in paths if n in f},
        "reference": {n: f[n] for n in WAVELENGTH_COEFFICIENTS},
        "panel_offsets": np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])]),
        "panel_shapes": shapes,
        "beam_direction": np.asarray(f["beam_direction"], dtype=np.float64),
        "wavelength": float(f["wavelength"]),
        "s0": np.asarray(f["s0"], dtype=np.float64),
    })


_DEFAULT_CACHE: dict = {}


def _cached(cache: dict, path: str, load, max_entries: int = CACHE_ENTRIES):
    """``load()`` memoised on (path, mtime, size); a rewritten file is reread.

    Every cache is a bounded LRU: the ``max_entries`` most recently used
    files are kept (per-detector arrays, so one entry per detector in use).
    """
    import os

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key in cache:
        cache[key] = cache.pop(key)  # most recently used last
        return cache[key]
    while len(cache) >= max_entries:
        cache.pop(next(iter(cache)))
    cache[key] = value = load()
    return value


def _referenced_extract(corrected_file, still: dict) -> dict:
    """The arrays of the extracted file a corrected still refers to (its
    fingerprint must match the one recorded by diffuse.correct)."""
    from diffuse_cli.formats import corrected, extract

    path = corrected.extract_path(corrected_file, still)
    return extract.read_extract_arrays(path, fields=("mask_bits", "A", "s0", *extract.COUNT_ARRAYS))


def load_observations(corrected_file, cache: dict | None = None, with_pixels: bool = False,
                      with_hkl: bool = True) -> dict:
    """Observations of one corrected still, for diffuse.merge.

    Reads ``corrected_file`` (schema diffuse.correct/3), the extracted file it
    refers to (the counts, mask and A), and the ``factors_<key>.npz`` (and
    ``background.npz`` if used) beside it.
    Returns a dict:

    * ``hkl`` (N, 3) float64: fractional Miller indices ``A⁻¹ (s1 − s0)``;
    * ``I`` (N,) float64: photons per microsteradian per unit of the still's
      normalisation (``normalisation``: per second, per 1e12 incident
      photons, or per shot; docs/corrections.md);
    * ``sigma`` (N,) float64: Poisson σ of ``I``;
    * ``variance_per_intensity`` (N,) float64: v1 with var(I) = v1·E[I] + (background part);
    * ``d_star`` (N,) float64: |q| = 1/d (Å⁻¹);
    * ``still_id`` (str): the still's name (file stem);
    * ``experiment_index`` (int);
    * ``normalisation`` (str): exposure_time, incident_photons or unit;
    * ``pixel`` (N,) int64 pixel indices, if ``with_pixels``; then also
      ``panel``, ``fast``, ``slow`` (N,) int64, ``panel_shapes`` (P, 2)
      (n_slow, n_fast) and ``s1_xy`` (N, 2) float32, the lab x, y of ŝ1.

    With ``with_hkl=False`` (diffuse.merge computes voxel indices itself, once
    per still) ``hkl`` and ``d_star`` are left out; instead ``pixel``, ``q_unit`` (the
    per-detector (n_pixels, 3) float32 ŝ1 − ŝ0, not gathered) and
    ``hkl_matrix`` ((λA)⁻¹, 3×3 float64: hkl = hkl_matrix · q_unit[pixel]).

    The multipliers are the still's own: at its wavelength, from the
    per-detector direction-only factors and path lengths (:func:`shot_total`).

    ``cache`` (a dict kept by the caller) avoids rereading the per-detector
    factors for every still; without one a small module-level cache is used.
    Entries are keyed by path, mtime and size, so rewritten files are reread.
    """
    import os

    from diffuse_cli.geometry import hkl_from_q

    from diffuse_cli.formats.background import read_background
    from diffuse_cli.formats.corrected import read_corrected
    from diffuse_cli.formats.extract import unpack_counts

    cache = _DEFAULT_CACHE if cache is None else cache
    still = read_corrected(corrected_file)
    directory = os.path.dirname(os.path.abspath(corrected_file))
    still.update(_referenced_extract(corrected_file, still))
    fpath = os.path.join(directory, str(still["factors_file"]))
    factors = _cached(cache, fpath, lambda: _detector_arrays(fpath))
    background = None
    if str(still["background_mode"]) == "map":
        bpath = os.path.join(directory, str(still["background_file"]))
        background = _cached(cache, bpath, lambda: read_background(bpath))

    pixels = used_pixels(still["mask_bits"], still["n_pixels"])
    counts = unpack_counts(still)
    if len(pixels) != len(counts):
        from libtbx.utils import Sorry

        raise Sorry(f"{corrected_file}: {len(counts)} counts for {len(pixels)} used pixels; rerun diffuse.extract")
    if "attenuation_mu_per_mm" not in still:  # the factors file's reference wavelength
        total = factors["total"][pixels]
    else:
        coefficients = unpack_coefficients(still["attenuation_mu_per_mm"])
        total = shot_total(factors["direction"], factors["paths"], coefficients, pixels, factors["panel_offsets"])
    bg, bg_var = still_background(still, pixels, background)
    norm = float(still["normalisation_value"])
    s0 = still["s0"] if "s0" in still else factors["s0"]  # the still's beam (/1 extracts: the reference)
    wavelength = float(1.0 / np.linalg.norm(s0))
    intensity, sigma = corrected_intensity(
        counts, total, norm, gain=float(still["gain"]), background=bg, background_variance=bg_var
    )
    # q = (ŝ1 − ŝ0)/λ, so A⁻¹q = (λA)⁻¹(ŝ1 − ŝ0)
    A_scaled = np.asarray(still["A"], dtype=np.float64).reshape(3, 3) * wavelength
    out = {
        "I": intensity,
        "sigma": sigma,
        # Poisson variance added per unit of corrected intensity (multiplier/N;
        # gain cancels): lets diffuse.merge weight by EXPECTED, not observed, counts
        "variance_per_intensity": total / norm,
        "still_id": str(still["still_id"]),
        "experiment_index": int(still["experiment_index"]),
        "normalisation": str(still["normalisation"]),
    }
    if with_hkl:
        out["hkl"] = hkl_from_q(factors["q_unit"][pixels], A_scaled)
        out["d_star"] = factors["d_unit"][pixels].astype(np.float64) / wavelength
    else:
        out["pixel"], out["q_unit"], out["hkl_matrix"] = pixels, factors["q_unit"], np.linalg.inv(A_scaled)
    if with_pixels:
        out["pixel"] = pixels
        # pixel position and direction, for diffuse.merge's detector and absorption terms
        off = factors["panel_offsets"]
        panel = np.searchsorted(off, pixels, side="right") - 1
        local = pixels - off[panel]
        n_fast = factors["panel_shapes"][panel, 1]
        out["panel"], out["fast"], out["slow"] = panel, local % n_fast, local // n_fast
        out["panel_shapes"] = factors["panel_shapes"]
        # lab x, y of the scattered-beam direction ŝ1 = (ŝ1 − ŝ0) + ŝ0
        out["s1_xy"] = (factors["q_unit"][pixels, :2] + factors["beam_direction"][:2]).astype(np.float32)
    return out
