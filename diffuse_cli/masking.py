"""Pixel masks for diffuse scattering: static, dynamic (hot/dead) and Bragg.

Polarity: every mask here is **True = pixel usable for diffuse**, the DIALS
convention; a Bragg mask is False on Bragg pixels, so masks combine with ``&``.
Internally masks are flat numpy bool arrays in pixel order (panel-major, then
slow, then fast); :func:`to_dials` / :func:`from_dials` convert to and from the
DIALS file form (a tuple of ``flex.bool``, one per panel).

Predicted Bragg mask (the default method). For a pixel with scattering vector
q (Å⁻¹) on an image whose setting matrix is M (q = M·hkl), take the nearest
lattice point h0 = rint(M⁻¹q), G = M·h0 and Δq = q − G. Split Δq along the
Ewald-sphere normal at the pixel, n̂ = ŝ1: the normal part Δq_n = Δq·n̂ is the
lattice point's distance from the sphere (its excitation error), the
tangential part |Δq_t| the distance on the detector from the spot centre, in
reciprocal units. A pixel is Bragg when h0 is an allowed reflection (not
systematically absent, h0 ≠ 0) and, for ``shape=cylinder`` (default),
``|Δq_n| <= excitation`` and ``|Δq_t| <= radius``; for ``shape=ellipsoid``,
``(Δq_n/excitation)² + (|Δq_t|/radius)² <= 1``. This is an ellipsoid (or
cylinder) around every allowed lattice point in fractional-hkl space,
expressed in the Ewald frame; it masks weak Bragg peaks that were never
observed as well as observed ones.

The two sizes are estimated per still from its integrated reflections
(:func:`estimate_bragg_shape`) or set by the user:

* excitation = excitation_factor × 99th percentile of |Δq_n| at the observed
  centroids of reflections with I/σ(I) >= min_i_over_sigma;
* radius = sqrt((n_sigma_b · σ_b)² + (99th percentile of |Δq_t|)²) where
  σ_b = sigma_b(rad)/λ is the profile model's spot width in Å⁻¹ (the beam
  divergence of DIALS's gaussian_rs model) and |Δq_t| the centroid residual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry
from scitbx.array_family import flex

from diffuse_cli import provenance
from diffuse_cli.extraction import DetectorGeometry, raw_counts, s1_at, trusted_mask

logger = logging.getLogger("diffuse.masking")

# pixels processed per chunk in the Bragg mask (bounds memory to ~0.5 GB)
_CHUNK = 1 << 20


# mask files: one reader and writer, in diffuse_cli.formats.masks (re-exported here)
from diffuse_cli.formats.masks import (  # noqa: E402,F401
    MASK_BITS_SCHEMA,
    from_dials,
    read_mask,
    read_mask_any,
    to_dials,
    write_mask_bits,
)


# ---------------------------------------------------------------- static / dynamic


def static_mask(imageset, masking_params, geometry: DetectorGeometry, image_index: int = 0) -> np.ndarray:
    """Static mask (True = usable), flat.

    Combines ``dials.util.masking.generate_mask`` (border, untrusted panels /
    circles / rectangles / polygons / pixels, d_min, d_max, resolution ranges,
    ice rings) with the image's own mask (``imageset.get_mask``: the format's
    static mask, e.g. panel gaps, and the trusted range of one image). Pixels
    above the upper trusted value are not put in the static mask (overloads
    move from still to still; they are removed per still).
    """
    import copy

    from dials.util.masking import generate_mask

    # an .extract()ed .multiple scope holds one all-None "untrusted" entry,
    # which generate_mask reads as "mask the whole of panel 0": drop it
    masking_params = copy.deepcopy(masking_params)
    masking_params.untrusted = [
        u for u in masking_params.untrusted
        if any(v is not None for v in (u.panel, u.circle, u.rectangle, u.polygon, u.pixel))
    ]
    user = from_dials(generate_mask(imageset, masking_params))
    image = from_dials(imageset.get_mask(image_index))
    counts = raw_counts(imageset, image_index)
    over = np.zeros(counts.shape, dtype=bool)
    off = geometry.panel_offsets
    for i, panel in enumerate(imageset.get_detector()):
        over[off[i] : off[i + 1]] = counts[off[i] : off[i + 1]] >= panel.get_trusted_range()[1]
    return user & (image | over)


def dynamic_mask(
    images,
    geometry: DetectorGeometry,
    valid: np.ndarray,
    hot_n_sigma: float = 10.0,
    hot_min_excess: float = 5.0,
    dead_min_expected: float = 20.0,
    filter_size: int = 5,
    hot_fraction: float = 1.0,
    min_hot_images: int = 1,
) -> tuple[np.ndarray, dict]:
    """Hot and dead pixels from a set of images (True = usable), flat.

    images: flat count arrays (one per still), as a sequence or a callable
    returning a fresh iterable (read twice: once for the reference, once to
    count); valid: the static mask. Per pixel over the N images: mean m,
    maximum hi. The local reference b is the median of m over a
    ``filter_size`` square (per panel, invalid pixels replaced by the panel
    median).

    * hot: above b + hot_min_excess + hot_n_sigma·sqrt(b), i.e. above the
      Poisson range of the neighbourhood, in at least ``hot_fraction``·N and
      ``min_hot_images`` of the images (a Bragg peak moves from still to still
      and lasts a few frames of a sweep; a hot pixel stays);
    * dead: hi == 0 (never counted) while N·b >= dead_min_expected counts were
      expected (Poisson probability e^-N·b).
    """
    from scipy.ndimage import median_filter

    def each_image():
        return images() if callable(images) else iter(images)

    total = lo = hi = None
    n = 0
    for counts in each_image():
        c = counts.astype(np.float32)
        if total is None:
            total = np.zeros(c.shape, dtype=np.float64)
            lo, hi = c.copy(), c.copy()
        total += c
        np.minimum(lo, c, out=lo)
        np.maximum(hi, c, out=hi)
        n += 1
    if n == 0:
        raise Sorry("No images for the dynamic mask")
    mean = (total / n).astype(np.float32)
    ref = np.empty_like(mean)
    off = geometry.panel_offsets
    for i, shape in enumerate(geometry.panel_shapes):
        sl = slice(off[i], off[i + 1])
        m = mean[sl].copy()
        ok = valid[sl]
        m[~ok] = np.median(m[ok]) if ok.any() else 0.0
        ref[sl] = median_filter(m.reshape(tuple(shape)), size=filter_size, mode="nearest").ravel()
    threshold = ref + hot_min_excess + hot_n_sigma * np.sqrt(np.maximum(ref, 0))
    if hot_fraction >= 1.0:
        hot = valid & (lo > threshold)
    else:
        above = np.zeros(mean.shape, dtype=np.int32)
        for counts in each_image():
            above += counts > threshold
        need = max(int(np.ceil(hot_fraction * n)), int(min_hot_images))
        hot = valid & (above >= need)
    dead = valid & (hi == 0) & (n * ref >= dead_min_expected)
    stats = {"n_images": n, "hot": int(hot.sum()), "dead": int(dead.sum())}
    return ~(hot | dead), stats


# ---------------------------------------------------------------- Bragg


@dataclass
class BraggShape:
    """Size of the masked region around each lattice point, in Å⁻¹.

    excitation: half-width along the Ewald normal at d* = 0; the half-width at
    a lattice point G is ``excitation + excitation_slope·|G|`` (the mosaic
    model: 1/domain size + half mosaicity·d*). radius: tangential radius.
    """

    excitation: float
    radius: float
    shape: str = "cylinder"
    source: str = "user"
    n_reflections: int = 0
    excitation_slope: float = 0.0

    def as_dict(self, px_scale: float | None = None) -> dict:
        d = {
            "excitation_inv_angstrom": self.excitation,
            "excitation_slope": self.excitation_slope,
            "radius_inv_angstrom": self.radius,
            "shape": self.shape,
            "source": self.source,
            "n_reflections": self.n_reflections,
        }
        if px_scale:
            d["excitation_px_equivalent"] = self.excitation / px_scale
            d["radius_px_equivalent"] = self.radius / px_scale
        return d


def pixel_scale(detector, beam) -> float:
    """Å⁻¹ per pixel at normal incidence: pixel size / (distance · λ), median over panels."""
    values = [
        min(p.get_pixel_size()) / (p.get_distance() * beam.get_wavelength()) for p in detector
    ]
    return float(np.median(values))


def ewald_residuals(experiment, reflections, M: np.ndarray | None = None):
    """Normal and tangential parts (Å⁻¹) of Δq = q(xyzobs) − M·hkl per reflection.

    q is evaluated at the observed centroid ``xyzobs.px.value`` through the
    same geometry code path as the pixels. M defaults to the crystal's A for
    stills and to the setting matrix of the centroid's frame for rotation data.
    """
    x, y, z = reflections["xyzobs.px.value"].parts()
    s1 = s1_at(
        experiment.detector,
        experiment.beam,
        reflections["panel"].as_numpy_array(),
        x.as_numpy_array(),
        y.as_numpy_array(),
    )
    q = s1 - np.array(experiment.beam.get_s0(), dtype=np.float64)
    hkl = np.array(reflections["miller_index"], dtype=np.float64).reshape(-1, 3)
    if M is not None:
        dq = q - hkl @ np.asarray(M, dtype=np.float64).reshape(3, 3).T
    else:
        dq = q - _lattice_points(experiment, hkl, z.as_numpy_array(), at_z=True)
    n = s1 / np.linalg.norm(s1, axis=1, keepdims=True)
    dn = np.einsum("ij,ij->i", dq, n)
    dt = np.sqrt(np.maximum(np.einsum("ij,ij->i", dq, dq) - dn**2, 0.0))
    return dn, dt


def excitation_error(G: np.ndarray, s0) -> np.ndarray:
    """Distance (Å⁻¹) of reciprocal-lattice points G (N, 3) from the Ewald sphere.

    ε = |G + s0| − |s0| (DIALS's ``epsilon``): positive outside the sphere.
    """
    s0 = np.asarray(s0, dtype=np.float64)
    Gs = G + s0
    return np.sqrt(np.einsum("ij,ij->i", Gs, Gs)) - np.linalg.norm(s0)


def estimate_bragg_shape(experiment, reflections, params) -> BraggShape:
    """Excitation and radius (Å⁻¹) for one still, from its integrated reflections.

    params: the ``predicted`` scope (excitation, radius, radius_px,
    excitation_factor, n_sigma_b, min_i_over_sigma, min_reflections, shape).
    User values win; estimated values need at least min_reflections
    reflections with I/σ(I) >= min_i_over_sigma.
    """
    scale = pixel_scale(experiment.detector, experiment.beam)
    excitation = params.excitation
    radius = params.radius
    if radius is None and params.radius_px is not None:
        radius = params.radius_px * scale
    n_refl = 0
    excitation_slope = 0.0
    if excitation is None or radius is None:
        if reflections is None or len(reflections) == 0:
            raise Sorry(
                "No reflections to estimate the Bragg mask size: give integrated "
                "reflections or set predicted.excitation and predicted.radius"
            )
        if excitation is None:
            # every integrated reflection was predicted in diffraction by DIALS;
            # with a mosaic crystal model (domain size D, half mosaicity η) the
            # allowed |ε| grows as 1/D + η·d*: scale that envelope to the data
            eps, d_star = _reflection_excitation(experiment, reflections)
            eps = np.abs(eps)
            envelope = _mosaic_envelope(experiment)
            if envelope is None:
                excitation = params.excitation_factor * float(np.percentile(eps, 100 * params.excitation_quantile))
            else:
                e0, slope = envelope
                ratio = eps / (e0 + slope * d_star)
                k = params.excitation_factor * float(np.percentile(ratio, 100 * params.excitation_quantile))
                excitation, excitation_slope = k * e0, k * slope
        if radius is None:
            refl = reflections
            if "intensity.sum.value" in refl:
                I = refl["intensity.sum.value"].as_numpy_array()
                V = refl["intensity.sum.variance"].as_numpy_array()
                keep = (V > 0) & (I >= params.min_i_over_sigma * np.sqrt(np.maximum(V, 0)))
                refl = refl.select(flex.bool(keep))
            n_refl = len(refl)
            if n_refl < params.min_reflections:
                raise Sorry(
                    f"Only {n_refl} reflections with I/sigma >= {params.min_i_over_sigma} "
                    "to estimate the Bragg mask radius; set predicted.radius or predicted.radius_px"
                )
            _, dt = ewald_residuals(experiment, refl)
            sigma_b = _profile_sigma_b(experiment)
            if sigma_b is None:
                raise Sorry(
                    "The profile model gives no sigma_b: set predicted.radius or predicted.radius_px"
                )
            radius = float(np.hypot(params.n_sigma_b * sigma_b, np.percentile(dt, params.residual_percentile)))
            if params.min_radius_px is not None:
                radius = max(radius, params.min_radius_px * scale)
        n_refl = n_refl or len(reflections)
    return BraggShape(
        float(excitation), float(radius), params.shape,
        "estimated" if n_refl else "user", n_refl, float(excitation_slope),
    )


def _mosaic_envelope(experiment):
    """(1/D, η) in (Å⁻¹, rad) from a mosaic crystal model, or None."""
    crystal = experiment.crystal
    try:
        D = crystal.get_domain_size_ang()
        eta = np.radians(crystal.get_half_mosaicity_deg())
    except AttributeError:
        return None
    if not D or D <= 0:
        return None
    return 1.0 / D, float(eta)


def _reflection_excitation(experiment, reflections) -> tuple[np.ndarray, np.ndarray]:
    """ε and d* = |G| (Å⁻¹) of each reflection's lattice point G = M·hkl."""
    hkl = np.array(reflections["miller_index"], dtype=np.float64).reshape(-1, 3)
    s0 = np.array(experiment.beam.get_s0(), dtype=np.float64)
    z = reflections["xyzobs.px.value"].parts()[2].as_numpy_array()
    G = _lattice_points(experiment, hkl, z)
    return excitation_error(G, s0), np.linalg.norm(G, axis=1)


def _lattice_points(experiment, hkl: np.ndarray, z: np.ndarray, at_z: bool = False) -> np.ndarray:
    """Lattice points G = M·hkl (Å⁻¹, (N, 3)) as the pixels of their image see them.

    Stills: M = A. Rotation data: M at the centre of the frame that holds
    each reflection's (absolute) z, the same M as that frame's pixels get;
    with ``at_z``, M at z itself (the rotation angle of the centroid).
    """
    from diffuse_cli.extraction import is_rotation
    from diffuse_cli.frames import FrameRef

    if not is_rotation(experiment):
        A = np.array(experiment.crystal.get_A(), dtype=np.float64).reshape(3, 3)
        return hkl @ A.T
    frames = FrameRef.from_experiment(experiment)
    first, end = frames.array_range
    if at_z:
        M = frames.setting_matrix(experiment.crystal, experiment.goniometer, np.clip(z, first, end))
    else:
        a = np.clip(frames.array_index_of_z(z), first, end - 1)
        M = frames.setting_matrix(experiment.crystal, experiment.goniometer, a + 0.5)
    return np.einsum("nij,nj->ni", M, hkl)


def _profile_sigma_m(experiment) -> float | None:
    """Mosaicity σ_m in radians from a gaussian_rs profile, else None."""
    profile = experiment.profile
    if profile is None or not hasattr(profile, "sigma_m"):
        return None
    return float(profile.sigma_m(deg=False))


def rotation_bragg_mask(
    geometry: DetectorGeometry,
    experiment,
    array_index: int,
    shape: BraggShape,
    n_sigma_m: float,
    select: np.ndarray | None = None,
) -> np.ndarray:
    """True on Bragg pixels (flat) of one rotation frame, from the rotation geometry.

    A lattice point h is recorded on frame a when it crosses the Ewald sphere
    at an angle φ_h in [φ_start − n·σ_m/|ζ|, φ_end + n·σ_m/|ζ|] (σ_m: the
    profile model's mosaicity; ζ = ê1·m2, ê1 = ŝ1×ŝ0/|ŝ1×ŝ0|, DIALS's
    factor, taken at each pixel: DIALS's own foreground φ extent; near the
    rotation axis a reflection takes many frames to cross), capped at the
    scan's length, on the pixels within ``shape.radius`` (Å⁻¹, tangential)
    of its crossing point. The range is swept in steps Δφ small
    enough that a lattice point moves at most radius/2 per step
    (Δφ = radius / max|q|); at each step a point counts as crossing when
    |ε| ≤ |G|·Δφ/2, so each crossing falls in one step. The stills
    excitation estimate (shape.excitation) is not used.
    """
    from diffuse_cli.frames import FrameRef

    frames = FrameRef.from_experiment(experiment)
    sigma_m = _profile_sigma_m(experiment)
    if sigma_m is None:
        raise Sorry("Rotation frames need a gaussian_rs profile model (sigma_m) for the Bragg mask")
    width = np.deg2rad(abs(frames.width_deg))
    s0 = np.asarray(geometry.s0, dtype=np.float32)
    # per-pixel φ half-extent beyond the frame (in frames): n·σ_m/|ζ|
    e1 = np.cross(geometry.s1, s0)
    m2 = np.asarray(experiment.goniometer.get_rotation_axis(), dtype=np.float32)
    zeta = np.abs(e1 @ m2) / np.maximum(np.sqrt(np.einsum("ij,ij->i", e1, e1)), 1e-12)
    pad_px = np.minimum(n_sigma_m * sigma_m / width / np.maximum(zeta, 1e-6), frames.n_frames)
    usable = np.ones(geometry.n_pixels, dtype=bool) if select is None else select
    pad = float(pad_px[usable].max()) if usable.any() else 0.0
    z0, z1 = array_index - pad, array_index + 1.0 + pad
    q2 = sum((geometry.s1[:, i] - s0[i]) ** 2 for i in range(3))
    q_max = float(np.sqrt(max(float(q2.max()), 1e-12)))
    step = shape.radius / q_max / width  # frames per step
    n_steps = max(1, int(np.ceil((z1 - z0) / step)))
    dz = (z1 - z0) / n_steps
    crossing = BraggShape(0.0, shape.radius, shape.shape, shape.source, shape.n_reflections,
                          0.5 * dz * width * 1.05)
    sg = experiment.crystal.get_space_group()
    out = np.zeros(geometry.n_pixels, dtype=bool)
    for z in z0 + (np.arange(n_steps) + 0.5) * dz:
        # frames from this step's φ to frame a, less the step's own half-width
        beyond = max(array_index - z, z - (array_index + 1.0), 0.0) - 0.5 * dz
        sel = usable & (pad_px >= beyond) if beyond > 0 else usable
        if not sel.any():
            continue
        M = frames.setting_matrix(experiment.crystal, experiment.goniometer, z)
        out |= predicted_bragg_mask(geometry, M, sg, crossing, select=sel)
    return out


def _profile_sigma_b(experiment) -> float | None:
    """Spot width σ_b in Å⁻¹ (tangential) from a gaussian_rs profile, else None."""
    profile = experiment.profile
    if profile is None or not hasattr(profile, "sigma_b"):
        return None
    sigma_b = profile.sigma_b(deg=False)
    return float(sigma_b) / experiment.beam.get_wavelength()


def predicted_bragg_mask(
    geometry: DetectorGeometry,
    M: np.ndarray,
    space_group,
    shape: BraggShape,
    select: np.ndarray | None = None,
) -> np.ndarray:
    """True on Bragg pixels (flat, Npix) for one image; see the module docstring.

    M: (3, 3) setting matrix of the image (q = M·hkl). space_group: cctbx
    ``sgtbx.space_group`` used for systematic absences. select: optional flat
    bool; only those pixels are tested (others come back False).

    Column-wise float32 arithmetic (errors ~1e-7 Å⁻¹, far below any mask
    size); absences are looked up once per distinct lattice point.
    """
    M = np.asarray(M, dtype=np.float64).reshape(3, 3)
    M_inv = np.linalg.inv(M)
    s0 = np.asarray(geometry.s0, dtype=np.float64)
    s0_len = float(np.linalg.norm(s0))
    wavelength = np.float32(geometry.wavelength)
    r2 = np.float32(shape.radius**2)
    f32 = np.float32
    out = np.zeros(geometry.n_pixels, dtype=bool)
    for start in range(0, geometry.n_pixels, _CHUNK):
        stop = min(start + _CHUNK, geometry.n_pixels)
        s1 = geometry.s1[start:stop]
        idx = None
        if select is not None:
            idx = np.flatnonzero(select[start:stop])
            s1 = s1[idx]
        q = [s1[:, i] - f32(s0[i]) for i in range(3)]
        h = [np.rint(q[0] * f32(M_inv[j, 0]) + q[1] * f32(M_inv[j, 1]) + q[2] * f32(M_inv[j, 2])) for j in range(3)]
        G = [h[0] * f32(M[i, 0]) + h[1] * f32(M[i, 1]) + h[2] * f32(M[i, 2]) for i in range(3)]
        dq = [q[i] - G[i] for i in range(3)]
        # tangential distance: remove the part along the sphere normal ŝ1 = λ s1
        dn = (dq[0] * s1[:, 0] + dq[1] * s1[:, 1] + dq[2] * s1[:, 2]) * wavelength
        dt2 = dq[0] ** 2 + dq[1] ** 2 + dq[2] ** 2 - dn**2
        # excitation error of the lattice point itself (same for all its pixels)
        eps = np.sqrt((G[0] + f32(s0[0])) ** 2 + (G[1] + f32(s0[1])) ** 2 + (G[2] + f32(s0[2])) ** 2) - f32(s0_len)
        g_len = np.sqrt(G[0] ** 2 + G[1] ** 2 + G[2] ** 2)
        e2 = (f32(shape.excitation) + f32(shape.excitation_slope) * g_len) ** 2
        if shape.shape == "cylinder":
            hit = (eps * eps <= e2) & (dt2 <= r2)
        else:
            hit = eps * eps / e2 + dt2 / r2 <= 1.0
        hit &= (h[0] != 0) | (h[1] != 0) | (h[2] != 0)  # 000 is the direct beam
        cand = np.flatnonzero(hit)
        if cand.size:
            hkl = np.stack([h[j][cand] for j in range(3)], axis=1).astype(np.int64)
            uniq, inverse = np.unique(_hkl_key(hkl), return_inverse=True)
            first = np.zeros(uniq.size, dtype=np.int64)
            first[inverse] = np.arange(inverse.size)
            absent = space_group.is_sys_absent(_miller(hkl[first])).as_numpy_array()
            hit[cand[absent[inverse]]] = False
        if idx is None:
            out[start:stop] = hit
        else:
            out[start + idx] = hit
    return out


def _hkl_key(hkl: np.ndarray) -> np.ndarray:
    """One int64 per (h, k, l) with |h|, |k|, |l| < 2^20."""
    h = hkl + (1 << 20)
    return (h[:, 0] << 42) | (h[:, 1] << 21) | h[:, 2]


def _miller(h: np.ndarray):
    """(N, 3) integer-valued array -> flex.miller_index."""
    from cctbx.array_family import flex as cflex

    return cflex.miller_index(np.ascontiguousarray(h, dtype=np.int32).reshape(-1, 3))


def strong_pixel_mask(
    counts: np.ndarray,
    valid: np.ndarray,
    geometry: DetectorGeometry,
    n_sigma_b: float = 6.0,
    n_sigma_s: float = 3.0,
    global_threshold: float = 0.0,
    min_local: int = 2,
    gain: float | None = None,
    min_spot_size: int = 3,
    dilation_px: int = 3,
) -> np.ndarray:
    """True on pixels of observed spots (flat, Npix), indexed or not.

    DIALS's spot-finding dispersion threshold (``DispersionThreshold``, 7×7
    window, the ``n_sigma_b``/``n_sigma_s`` tests of ``dials.find_spots``)
    per panel; connected groups smaller than ``min_spot_size`` pixels are
    dropped (isolated noise), the rest grown by ``dilation_px`` pixels (disc).
    This catches spots of lattices the indexer missed, which the predicted
    mask cannot know about. ``gain``: detector gain (counts per photon).
    """
    from scipy import ndimage

    from dials.algorithms.image import threshold

    out = np.zeros(geometry.n_pixels, dtype=bool)
    off = geometry.panel_offsets
    r = int(dilation_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = xx**2 + yy**2 <= r * r + 0.5
    for i, shape in enumerate(geometry.panel_shapes):
        sl = slice(off[i], off[i + 1])
        shape = tuple(int(v) for v in shape)
        image = flex.double(np.ascontiguousarray(counts[sl].reshape(shape), dtype=np.float64))
        mask = flex.bool(np.ascontiguousarray(valid[sl].reshape(shape)))
        algorithm = threshold.DispersionThreshold(image.all(), (3, 3), n_sigma_b, n_sigma_s, global_threshold, min_local)
        result = flex.bool(flex.grid(image.all()))
        if gain:
            algorithm(image, mask, flex.double(image.accessor(), gain), result)
        else:
            algorithm(image, mask, result)
        strong = result.as_numpy_array()
        if min_spot_size > 1 and strong.any():
            labels, n = ndimage.label(strong, structure=np.ones((3, 3)))
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_spot_size
            keep[0] = False
            strong = keep[labels]
        if r > 0 and strong.any():
            strong = ndimage.binary_dilation(strong, structure=disc)
        out[sl] = strong.ravel()
    return out & valid


def shoebox_bragg_mask(reflections, geometry: DetectorGeometry, frame: int | None = None, codes=("foreground", "strong")) -> np.ndarray:
    """True on pixels inside shoebox Foreground/Strong masks (flat, Npix).

    reflections: rows of one image's experiment with a ``shoebox`` column.
    frame: for rotation data, the image's absolute dxtbx array index (the
    units of bbox z, see :mod:`diffuse_cli.frames`); only the z-slice of each
    shoebox at that frame is projected (a reflection spans its bbox z-range).
    Stills: every shoebox's single slice.
    """
    from dials.algorithms.shoebox import MaskCode

    if "shoebox" not in reflections:
        raise Sorry("method=shoebox needs reflections with shoeboxes")
    want = 0
    for c in codes:
        want |= {"foreground": MaskCode.Foreground, "strong": MaskCode.Strong}[c]
    out = np.zeros(geometry.n_pixels, dtype=bool)
    bbox = np.array(reflections["bbox"], dtype=np.int64).reshape(-1, 6)
    panel = reflections["panel"].as_numpy_array().astype(np.int64)
    if frame is not None:
        keep = (bbox[:, 4] <= frame) & (frame < bbox[:, 5])
    else:
        keep = np.ones(len(bbox), dtype=bool)
    sel = np.flatnonzero(keep)
    if sel.size == 0:
        return out
    # shoebox masks are separate C++ objects: gather them once (one call per
    # reflection), then everything else is array code
    shoeboxes = reflections["shoebox"]
    masks = [shoeboxes[int(i)].mask.as_numpy_array() for i in sel]
    x0, x1, y0, y1, z0, z1 = bbox[sel].T
    nz, ny, nx = z1 - z0, y1 - y0, x1 - x0
    zi = np.zeros(sel.size, dtype=np.int64) if frame is None else frame - z0
    flat_masks = np.concatenate([
        m.reshape(nz_, ny_ * nx_)[z_] for m, nz_, ny_, nx_, z_ in zip(masks, nz, ny, nx, zi)
    ])
    sizes = ny * nx
    owner = np.repeat(np.arange(sel.size), sizes)
    local = np.arange(flat_masks.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    yy = y0[owner] + local // nx[owner]
    xx = x0[owner] + local % nx[owner]
    pan = panel[sel][owner]
    n_slow = geometry.panel_shapes[pan, 0]
    n_fast = geometry.panel_shapes[pan, 1]
    ok = ((flat_masks & want) != 0) & (yy >= 0) & (yy < n_slow) & (xx >= 0) & (xx < n_fast)
    flat_index = geometry.panel_offsets[pan[ok]] + yy[ok] * n_fast[ok] + xx[ok]
    out[flat_index] = True
    return out


# ---------------------------------------------------------------- program driver

# State shared with forked worker processes (set before the pool starts).
_STATE: dict = {}


def _image_groups(experiments):
    """Images (not lattices) to mask: name -> list of StillRef (one per lattice)."""
    from diffuse_cli.extraction import image_refs

    groups: dict[str, list] = {}
    for ref in image_refs(experiments):
        key = (ref.image_path, ref.file_index, ref.frame)
        groups.setdefault(key, []).append(ref)
    out = []
    for refs in groups.values():
        name = refs[0].name
        if len(refs) > 1:  # several lattices: drop the lattice suffix
            name = name.rsplit("_", 1)[0]
        out.append((name, refs))
    return out


def reflections_by_experiment(reflections, experiments, reflection_file: str = "reflections") -> dict:
    """``{experiment index: its reflections}``, matched by experiment identifier.

    The table's ``experiment_identifiers()`` (id -> identifier) are matched to
    ``experiment.identifier``, never the table ``id`` to the list position: a
    ``.refl`` of four stills with the ``.expt`` of one of them selects that
    still's rows. Reflections of experiments not in the list are left out
    (logged). Only when neither side carries identifiers are ids taken as list
    positions, and then the ids must be exactly ``0 .. len(experiments) - 1``.
    Mismatches are a ``Sorry`` naming ``reflection_file``.
    """
    from dials.array_family import flex as dflex

    ids = reflections["id"].as_numpy_array() if "id" in reflections else np.zeros(len(reflections), int)
    table_ids = dict(reflections.experiment_identifiers())
    expt_ids = [e.identifier for e in experiments]
    by_identifier: dict = {}
    for k, ident in table_ids.items():
        by_identifier.setdefault(ident, []).append(int(k))
    if not table_ids and not any(expt_ids):
        present = sorted(int(i) for i in np.unique(ids) if i >= 0)
        if present != list(range(len(experiments))):
            raise Sorry(
                f"{reflection_file}: no experiment identifiers, and its reflection ids "
                f"{present[:5]}{'...' if len(present) > 5 else ''} do not number the "
                f"{len(experiments)} experiment(s) one to one; give the .expt and .refl of the same run"
            )
        logger.warning("%s: no experiment identifiers: reflection id i taken as experiment i", reflection_file)
        ids_of = {i: [i] for i in range(len(experiments))}
    elif not table_ids or not all(expt_ids):
        raise Sorry(
            f"{reflection_file}: experiment identifiers on only one side (reflections "
            f"{'with' if table_ids else 'without'}, experiments {'with' if all(expt_ids) else 'without'}); "
            "give the .expt and .refl of the same run"
        )
    else:
        ids_of = {i: by_identifier.get(ident, []) for i, ident in enumerate(expt_ids)}
        if not any(ids_of.values()):
            raise Sorry(
                f"{reflection_file}: its experiment identifiers match none of the "
                f"{len(experiments)} experiment(s) (e.g. {expt_ids[0]!r}); give the .refl of the same run as the .expt"
            )
    out = {}
    for i, table_id_list in ids_of.items():
        out[i] = reflections.select(dflex.bool(np.isin(ids, table_id_list)))
    missing = [expt_ids[i] or str(i) for i, t in out.items() if len(t) == 0]
    if missing:
        logger.warning("%s: no reflections for %d experiment(s): %s", reflection_file, len(missing), ", ".join(missing[:5]))
    n_unused = len(reflections) - sum(len(t) for t in out.values())
    if n_unused:
        logger.info("%s: %d reflections of experiments not in the experiment list left out", reflection_file, n_unused)
    return out


def bragg_mask_for_image(refs, experiments, reflections, geometry, params, valid):
    """True on Bragg pixels of one image, over all its lattices; and per-lattice shapes.

    reflections: None, or ``{experiment index: reflection table}`` from
    :func:`reflections_by_experiment`.
    """
    from diffuse_cli.geometry import setting_matrix

    bragg = np.zeros(geometry.n_pixels, dtype=bool)
    shapes = []
    for ref in refs:
        expt = experiments[ref.experiment_index]
        # reflections: {experiment index: its rows}, matched by identifier
        refl = None if reflections is None else reflections.get(ref.experiment_index)
        if params.method == "predicted":
            # a sweep's frames share one estimate (from all its reflections)
            cache = _STATE.setdefault("shapes", {})
            shape = cache.get(ref.experiment_index)
            if shape is None:
                shape = cache[ref.experiment_index] = estimate_bragg_shape(expt, refl, params.predicted)
            sg = expt.crystal.get_space_group()
            if ref.frame is not None:
                bragg |= rotation_bragg_mask(geometry, expt, ref.frame, shape,
                                             params.predicted.n_sigma_m, select=valid)
            else:
                M = setting_matrix(expt.crystal, expt.goniometer, expt.scan, ref.frame)
                bragg |= predicted_bragg_mask(geometry, M, sg, shape, select=valid)
            shapes.append(shape.as_dict(pixel_scale(expt.detector, expt.beam)))
        else:
            bragg |= shoebox_bragg_mask(refl, geometry, ref.frame, tuple(params.shoebox.codes))
    return bragg, shapes


def _mask_provenance(refs, key) -> dict:
    """What one image's total mask depends on (see :mod:`diffuse_cli.provenance`)."""
    st = _STATE
    return {
        "schema": MASK_BITS_SCHEMA,
        "image": provenance.image_fingerprint(refs[0].image_path, refs[0].file_index),
        "frame": refs[0].frame,
        "static_mask": st["static_fingerprint"][key],
        "lattices": [
            {"experiment": st["experiment_fingerprint"][r.experiment_index],
             "reflections": st["reflection_fingerprint"].get(r.experiment_index)}
            for r in refs
        ],
        "params": st["params_fingerprint"],
    }


def _mask_one(job):
    """Worker: total mask of one image -> summary entry (writes the mask file)."""
    import os

    from diffuse_cli import program

    name, refs = job
    st = _STATE
    params, geometry_by_key = st["params"], st["geometry"]
    experiments = st["experiments"]
    expt = experiments[refs[0].experiment_index]
    from diffuse_cli.extraction import geometry_key

    key = geometry_key(expt.detector, expt.beam)
    geometry = geometry_by_key[key].for_beam(expt.beam)  # one geometry per detector; s1 = ŝ1/λ of this shot
    static = st["static"][key]
    path = os.path.join(params.output.directory, f"{name}.mask")
    entry = {
        "name": name,
        "image_path": refs[0].image_path,
        "image_index": refs[0].file_index,
        "frame": refs[0].frame,
        "imageset_index": refs[0].image_index,
        "experiments": [r.experiment_index for r in refs],
        "mask": os.path.basename(path),
        "mask_bits": f"{name}_mask_bits.npz",
        "geometry_key": key,
    }
    bits_path = os.path.join(params.output.directory, entry["mask_bits"])
    parts = _mask_provenance(refs, key)
    pkey = provenance.key_of(parts)
    entry["provenance_key"] = pkey
    # the packed copy is written last: it holds the key, so it commits the still
    if provenance.is_current(bits_path, pkey, params.output.overwrite, also=[path]):
        total = read_mask_any(bits_path)
        entry["skipped"] = True
        bragg = None
    else:
        counts = raw_counts(expt.imageset, refs[0].image_index)
        valid = static & trusted_mask(expt.detector, counts, geometry)
        bragg, shapes = bragg_mask_for_image(refs, experiments, st["reflections"], geometry, params, valid)
        sp = params.strong_pixels
        if sp.enable:
            strong = strong_pixel_mask(
                counts, valid, geometry, n_sigma_b=sp.n_sigma_b, n_sigma_s=sp.n_sigma_s,
                global_threshold=sp.global_threshold, min_local=sp.min_local, gain=sp.gain,
                min_spot_size=sp.min_spot_size, dilation_px=sp.dilation_px,
            )
            entry["strong_only_fraction"] = float((strong & ~bragg).sum() / max(valid.sum(), 1))
            bragg |= strong
        total = valid & ~bragg
        program.write_pickle(path, to_dials(total, geometry))
        write_mask_bits(bits_path, total, **provenance.npz_fields(pkey, parts))
        entry["bragg_shape"] = shapes
        entry["bragg_fraction"] = float((bragg & valid).sum() / max(valid.sum(), 1))
    entry["static_fraction_masked"] = float(1 - static.mean())
    entry["total_fraction_masked"] = float(1 - total.mean())
    return entry


def run_bragg_mask(experiments, reflections, params, reflection_file: str = "reflections") -> list[dict]:
    """Static mask, dynamic mask and per-image total masks; returns summary entries.

    reflections: one table (or None), matched to ``experiments`` by
    identifier (:func:`reflections_by_experiment`). Resume: a still is redone
    when its provenance key (image, static mask content, experiment models,
    reflections, parameters) differs from the one in its ``_mask_bits.npz``.
    """
    import os

    from diffuse_cli import program
    from diffuse_cli.extraction import GeometryCache, geometry_key

    nproc = program.resolve_nproc(params.nproc)
    os.makedirs(params.output.directory, exist_ok=True)
    provenance.remove_temporaries(params.output.directory)
    if reflections is not None:
        reflections = reflections_by_experiment(reflections, experiments, reflection_file)
    cache = GeometryCache(None)
    groups = _image_groups(experiments)
    group_keys = [
        geometry_key(experiments[refs[0].experiment_index].detector, experiments[refs[0].experiment_index].beam)
        for _, refs in groups
    ]
    # one static mask per detector + beam
    static_by_key, geometry_by_key, static_files = {}, {}, {}
    for (name, refs), key in zip(groups, group_keys):
        expt = experiments[refs[0].experiment_index]
        if key in static_by_key:
            continue
        logger.info("Computing pixel geometry for detector/beam %s", key)
        geometry = cache.get(expt.detector, expt.beam)
        geometry_by_key[key] = geometry
        with program.image_errors(expt.imageset, refs[0].image_index):
            static = static_mask(expt.imageset, params, geometry, refs[0].image_index)
        logger.info("Static mask: %.2f %% of %d pixels masked", 100 * (1 - static.mean()), static.size)
        same = [g for g, k in zip(groups, group_keys) if k == key]
        if params.dynamic.enable and len(same) < params.dynamic.min_images:
            # with one or two images a Bragg peak looks like a hot pixel
            logger.warning(
                "Dynamic (hot/dead pixel) mask skipped: %d image(s), dynamic.min_images=%d",
                len(same), params.dynamic.min_images,
            )
        elif params.dynamic.enable:
            pick = np.unique(np.linspace(0, len(same) - 1, min(params.dynamic.n_images, len(same))).round().astype(int))
            def images():
                return (
                    raw_counts(experiments[same[i][1][0].experiment_index].imageset, same[i][1][0].image_index)
                    for i in pick
                )
            dyn, stats = dynamic_mask(
                images, geometry, static,
                hot_n_sigma=params.dynamic.hot_n_sigma,
                hot_min_excess=params.dynamic.hot_min_excess,
                dead_min_expected=params.dynamic.dead_min_expected,
                filter_size=params.dynamic.filter_size,
                hot_fraction=params.dynamic.hot_fraction,
                min_hot_images=params.dynamic.min_images,
            )
            logger.info("Dynamic mask from %d images: %d hot, %d dead pixels", stats["n_images"], stats["hot"], stats["dead"])
            static &= dyn
        static_by_key[key] = static
        # output names are relative to output.directory, like the per-still masks
        fname = os.path.join(params.output.directory, params.output.static_mask)
        if static_files:
            stem, ext = os.path.splitext(fname)
            fname = f"{stem}_{key}{ext}"
        program.write_pickle(fname, to_dials(static, geometry))
        static_files[key] = os.path.relpath(fname, params.output.directory)
        logger.info("Wrote static mask %s", fname)

    os.makedirs(params.output.directory, exist_ok=True)
    _STATE.update(
        params=params, geometry=geometry_by_key, static=static_by_key,
        experiments=experiments, reflections=reflections,
        static_fingerprint={k: provenance.array_fingerprint(v) for k, v in static_by_key.items()},
        experiment_fingerprint=[provenance.experiment_fingerprint(e) for e in experiments],
        reflection_fingerprint={} if reflections is None else {
            i: _reflection_fingerprint(t) for i, t in reflections.items()
        },
        params_fingerprint=provenance.phil_values(params, ("method", "predicted", "shoebox", "strong_pixels")),
    )
    try:
        entries = program.parallel_map(_mask_one, groups, nproc, desc="bragg_mask")
    finally:
        _STATE.clear()
    _stale_masks(params.output.directory, [e["mask_bits"] for e in entries], params.output.stale)

    # a rerun keeps the figures of the masks it skipped
    from diffuse_cli.formats import summaries

    previous = summaries.previous_stills(params.output.summary, summaries.BRAGG_MASK_SUMMARY_SCHEMA)
    if previous:
        for e in entries:
            old = previous.get(e["name"])
            if e.get("skipped") and old is not None and old.get("provenance_key") == e["provenance_key"]:
                for k in ("bragg_shape", "bragg_fraction", "strong_only_fraction"):
                    if k in old:
                        e[k] = old[k]
    logger.info("%-32s %10s %10s", "still", "Bragg %", "masked %")
    for e in entries:
        bf = e.get("bragg_fraction")
        bf = "n/a" if bf is None else f"{100 * bf:.2f}"
        logger.info("%-32s %10s %10.2f%s", e["name"], bf, 100 * e["total_fraction_masked"], " (kept)" if e.get("skipped") else "")
    summaries.write_summary(params.output.summary, summaries.BRAGG_MASK_SUMMARY_SCHEMA, entries,
                            method=params.method, static_masks=static_files)
    logger.info("Wrote %s", params.output.summary)
    if params.output.png.still is not None:
        write_png(entries, experiments, geometry_by_key, static_by_key, params)
    return entries


def _reflection_fingerprint(table) -> str:
    """Fingerprint of the reflection columns a Bragg mask uses (one experiment's rows)."""
    cols = []
    for name in ("miller_index", "panel", "xyzobs.px.value", "bbox", "intensity.sum.value", "intensity.sum.variance", "flags"):
        if name in table:
            col = table[name]
            cols.append(np.array(col.as_numpy_array() if hasattr(col, "as_numpy_array") else list(col)))
    if "shoebox" in table and len(table):
        # shoebox masks: the foreground/strong codes change with integration
        cols.append(np.concatenate([sb.mask.as_numpy_array().ravel() for sb in table["shoebox"]]))
    return provenance.array_fingerprint(*cols) if cols else "empty"


def _stale_masks(directory: str, current_bits: list[str], action: str) -> list[str]:
    """Masks (``<name>_mask_bits.npz`` + ``<name>.mask``) of images no longer among the inputs."""
    import glob
    import os

    ours = [
        p for p in glob.glob(os.path.join(glob.escape(directory), "*_mask_bits.npz"))
        if provenance.stored_key(p) is not None  # written by this rule, not a user's file
    ]
    keep = [os.path.join(directory, b) for b in current_bits]
    stale_bits = [p for p in ours if os.path.abspath(p) not in {os.path.abspath(k) for k in keep}]
    pickles = [p[: -len("_mask_bits.npz")] + ".mask" for p in stale_bits]
    return provenance.stale_outputs(stale_bits + [p for p in pickles if os.path.isfile(p)], [], action)


def write_png(entries, experiments, geometry_by_key, static_by_key, params) -> str:
    """Draw the image with static-masked pixels (blue) and Bragg pixels (red)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffuse_cli import program

    i = params.output.png.still
    if not 0 <= i < len(entries):
        raise Sorry(f"output.png.still={i} out of range (0..{len(entries) - 1})")
    e = entries[i]
    expt = experiments[e["experiments"][0]]
    geometry = geometry_by_key[e["geometry_key"]]
    counts = raw_counts(expt.imageset, e.get("imageset_index", 0)).astype(np.float64)
    total = read_mask(os.path.join(params.output.directory, e["mask"]))
    static = static_by_key[e["geometry_key"]]
    valid = static & trusted_mask(expt.detector, counts, geometry)
    bragg = valid & ~total
    panels = list(zip(geometry.split(counts), geometry.split(valid), geometry.split(bragg)))
    # tile panels in a grid (single panel: just the panel)
    ncol = int(np.ceil(np.sqrt(len(panels))))
    h = max(p[0].shape[0] for p in panels)
    w = max(p[0].shape[1] for p in panels)
    nrow = int(np.ceil(len(panels) / ncol))
    img = np.full((nrow * h, ncol * w), np.nan)
    rgba = np.zeros((nrow * h, ncol * w, 4))
    for k, (c, v, b) in enumerate(panels):
        r0, c0 = (k // ncol) * h, (k % ncol) * w
        img[r0 : r0 + c.shape[0], c0 : c0 + c.shape[1]] = np.where(v, c, np.nan)
        ov = rgba[r0 : r0 + c.shape[0], c0 : c0 + c.shape[1]]
        ov[~v] = (0.2, 0.3, 1.0, 0.6)
        ov[b] = (1.0, 0.0, 0.0, 0.45)
    vmax = np.nanpercentile(img, 99.5) if np.isfinite(img).any() else 1
    region = params.output.png.region
    ncols = 2 if region else 1
    fig, axes = plt.subplots(1, ncols, figsize=(8 * ncols, 8), squeeze=False)
    for ax, reg in zip(axes[0], [None, region]):
        ax.imshow(img, cmap="Greys", vmin=0, vmax=vmax, interpolation="nearest")
        ax.imshow(rgba, interpolation="nearest")
        if reg:
            x0, x1, y0, y1 = reg
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)
            axes[0][0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime"))
        ax.set_xlabel("fast (px)")
        ax.set_ylabel("slow (px)")
    axes[0][0].set_title(
        f"{e['name']}: Bragg (red) {100 * e.get('bragg_fraction', float('nan')):.1f} %, "
        f"static (blue); total masked {100 * e['total_fraction_masked']:.1f} %"
    )
    fname = os.path.join(params.output.directory, params.output.png.filename)
    if "%d" in fname:
        fname = fname % i
    program.save_figure(fname, fig)
    logger.info("Wrote %s", fname)
    return fname
