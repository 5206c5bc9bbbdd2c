"""Absolute scale (electron units per unit cell) by the Krogh-Moe / Norman method.

At high resolution the total (Bragg + diffuse) scattering per unit cell tends
to the independent-atom value

    T(s) = Σ_j f_j(s)² + R(s)·Σ_j S_j(s)          (electron units, per unit cell)

with s = d* = 2 sin θ / λ = |q| (Å⁻¹). The scale K that puts the merged shell
averages ⟨I⟩(s) on this scale is the Krogh-Moe ratio over a fit range
[s₁, s₂] (default: the outer 40 % of the data in d*)::

    K = ∫ s² T(s) ds / ∫ s² ⟨I⟩(s) ds

When the map's Bragg peaks were masked, the Bragg (Wilson) part of the
coherent scattering, Σf² exp(−B s²/2), is missing from ⟨I⟩; given the B
(``wilson_b``) the theory is then (1 − exp(−B s²/2))·Σf² + R·ΣS. B can be
estimated from the integrated Bragg intensities
(:func:`diffuse_cli.absolute_scale_wilson.estimate_wilson_b`).

Output intensities are then ``K·I − R·ΣS(s)`` (incoherent subtracted),
σ → K·σ, in electron units per unit cell.

* Coherent form factors f_j(s): cctbx ``eltbx.xray_scattering.wk1995``
  (Waasmaier & Kirfel 1995, Acta Cryst. A51, 416), f(0) ≈ Z.
* Incoherent (Compton) scattering: the incoherent scattering functions
  S(x, Z) of Hubbell, Veigele, Briggs, Brown, Cromer & Howerton (1975),
  J. Phys. Chem. Ref. Data 4, 471 (doi:10.1063/1.555523), through
  ``xraylib.SF_Compt`` (Schoonjans et al. 2011), at x = sin θ/λ = d*/2 Å⁻¹.
  S → 0 at s = 0 and → Z at high s; it includes electron exchange, which the
  independent-electron bound Z − f²/Z leaves out (that bound is 1.2–1.5× too
  high for C, N, O at d* = 0.4–1 Å⁻¹).
* R(s) = (E′/E)² = (1 + λ_C·λ·s²/2)⁻², the Klein–Nishina recoil factor to
  first order in E/mc² for photon-counting detectors (λ_C = h/mc =
  0.0242631 Å); 1 when the wavelength is not given. Anomalous terms are
  neglected.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)


def parse_composition(text: str) -> dict[str, float]:
    """'C:1200,N:300,O:400,S:10,H:1900' -> {'C': 1200.0, ...} (atoms per unit given)."""
    out: dict[str, float] = {}
    if not text or not text.strip():
        raise ValueError("empty composition")
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"([A-Z][a-z]?)[:=]([0-9.eE+-]+)", item)
        if not m:
            raise ValueError(f"composition item {item!r} is not Element:count")
        el, n = m.group(1), float(m.group(2))
        if n < 0:
            raise ValueError(f"negative count for {el}")
        out[el] = out.get(el, 0.0) + n
    for el in out:
        _gaussian(el)  # raises for unknown elements
    return out


def _gaussian(element: str):
    from cctbx.eltbx import xray_scattering

    try:
        return xray_scattering.wk1995(element, True).fetch()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"unknown element {element!r}") from e


def atomic_number(element: str) -> int:
    from cctbx.eltbx import tiny_pse

    return int(tiny_pse.table(element).atomic_number())


def form_factor(element: str, d_star: np.ndarray) -> np.ndarray:
    """Coherent atomic form factor f(d*) (electrons); d* in Å⁻¹."""
    from scitbx.array_family import flex

    ds = np.asarray(d_star, dtype=np.float64)
    f = _gaussian(element).at_d_star_sq(flex.double((ds * ds).ravel())).as_numpy_array()
    return f.reshape(ds.shape)


#: Compton wavelength h/(m_e c) in Å (CODATA 2018)
COMPTON_WAVELENGTH = 0.0242631024

# S(x, Z) is tabulated (and spline-interpolated by xraylib) from x = 0.001 Å⁻¹;
# we sample it once per element on this grid (x in Å⁻¹, log-spaced: fine at
# low x where S ∝ x²) and interpolate linearly, with S(0) = 0 and S = Z beyond.
_S_GRID_X = np.concatenate([[0.0], np.geomspace(1e-3, 10.0, 4000)])


@functools.lru_cache(maxsize=None)
def _incoherent_table(z: int) -> np.ndarray:
    try:
        import xraylib
    except ImportError as e:  # a missing dependency, not a user mistake
        raise ImportError("diffuse.merge's absolute scale needs xraylib (Debian: apt-get install "
                          "python3-xraylib; conda-forge/PyPI: xraylib)") from e
    return np.array([0.0] + [xraylib.SF_Compt(z, float(x)) for x in _S_GRID_X[1:]])


def incoherent_scattering_function(element: str, d_star: np.ndarray) -> np.ndarray:
    """S(x, Z) of Hubbell et al. (1975) at x = sin θ/λ = d*/2 (d* in Å⁻¹).

    Electron units per atom (dimensionless; → Z at high d*), through xraylib.
    """
    z = atomic_number(element)
    x = 0.5 * np.asarray(d_star, dtype=np.float64)
    return np.interp(x, _S_GRID_X, _incoherent_table(z), right=float(z))


def compton_recoil(d_star: np.ndarray, wavelength: float | None) -> np.ndarray | float:
    """(E′/E)² = (1 + λ_C·λ·d*²/2)⁻²: Klein–Nishina / Thomson for a photon counter.

    1 − cos 2θ = λ²d*²/2, so E′/E = 1/(1 + (λ_C/λ)(1 − cos 2θ)). λ in Å.
    """
    if not wavelength:
        return 1.0
    ds = np.asarray(d_star, dtype=np.float64)
    return (1.0 + 0.5 * COMPTON_WAVELENGTH * float(wavelength) * ds * ds) ** -2


def incoherent(element: str, d_star: np.ndarray, wavelength: float | None = None) -> np.ndarray:
    """Incoherent (Compton) scattering per atom, R(d*)·S(d*/2, Z), in electron units.

    d* in Å⁻¹; wavelength (Å) for the recoil factor R (see :func:`compton_recoil`),
    None: R = 1.
    """
    return incoherent_scattering_function(element, d_star) * compton_recoil(d_star, wavelength)


def coherent_total(composition: dict[str, float], d_star: np.ndarray) -> np.ndarray:
    """Σ n_j f_j² per unit cell at d* (Å⁻¹), electron units (cctbx wk1995)."""
    ds = np.asarray(d_star, dtype=np.float64)
    coh = np.zeros_like(ds)
    for el, n in composition.items():
        f = form_factor(el, ds)
        coh += n * f * f
    return coh


def incoherent_total(composition: dict[str, float], d_star: np.ndarray,
                     wavelength: float | None = None) -> np.ndarray:
    """R·Σ n_j S_j per unit cell at d* (Å⁻¹), electron units (see :func:`theory`)."""
    ds = np.asarray(d_star, dtype=np.float64)
    inc = np.zeros_like(ds)
    for el, n in composition.items():
        inc += n * incoherent_scattering_function(el, ds)
    return inc * compton_recoil(ds, wavelength)


def theory(composition: dict[str, float], d_star: np.ndarray,
           wilson_b: float | None = None,
           wavelength: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Σ n_j f_j², R·Σ n_j S_j) per unit cell at d* (Å⁻¹), electron units.

    wilson_b (Å²): the coherent part becomes (1 − exp(−B d*²/2))·Σf², the
    scattering left between the Bragg peaks (Wilson: ⟨|F|²⟩ = Σf² exp(−B d*²/2)),
    for maps whose Bragg peaks were masked. wavelength (Å): Compton recoil
    factor R (None: R = 1).
    """
    ds = np.asarray(d_star, dtype=np.float64)
    coh = coherent_total(composition, ds)
    inc = incoherent_total(composition, ds, wavelength)
    if wilson_b:
        coh *= -np.expm1(-0.5 * float(wilson_b) * ds * ds)
    return coh, inc


def radial_profile(values: np.ndarray, d_star: np.ndarray, d_star_max: float,
                   n_bins: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of finite ``values`` in equal-width d* bins on [0, d*_max].

    Returns (bin centres Å⁻¹, means, counts); NaN where a bin is empty.
    """
    v = np.asarray(values).ravel()
    ds = np.asarray(d_star).ravel()
    ok = np.isfinite(v) & (ds <= d_star_max)
    b = np.minimum((ds[ok] / d_star_max * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(b, minlength=n_bins)
    s = np.bincount(b, v[ok], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / n, np.nan)
    centres = (np.arange(n_bins) + 0.5) * d_star_max / n_bins
    return centres, mean, n


@dataclass
class AbsoluteScale:
    K: float  # electron units per unit cell per merged-intensity unit
    fit_range: tuple[float, float]  # d* (Å⁻¹)
    d_star: np.ndarray  # profile bin centres
    mean_I: np.ndarray  # merged ⟨I⟩ per bin (input units)
    coherent: np.ndarray  # Σ f² per unit cell
    incoherent: np.ndarray  # R·Σ S per unit cell (Hubbell et al. 1975)
    composition: dict
    residual: float  # rms relative deviation of K⟨I⟩ from T over the fit range
    wilson_b: float | None = None  # Å²: coherent part (1 − exp(−B d*²/2))·Σf² (Bragg masked)
    wavelength: float | None = None  # Å, for the Compton recoil factor (None: R = 1)
    wilson: dict | None = None  # how B was obtained (WilsonFit.as_dict(), or {"source": ...})

    def as_dict(self) -> dict:
        return {
            "K": self.K,
            "fit_range_d_star": list(self.fit_range),
            "fit_range_d": [1.0 / x if x > 0 else None for x in self.fit_range],
            "rms_relative_residual": self.residual,
            "composition_per_unit_cell": self.composition,
            "wilson_b": self.wilson_b,
            "wilson": self.wilson,
            "wavelength": self.wavelength,
            "method": "Krogh-Moe ratio of ∫s²T ds to ∫s²<I> ds; I_inc = R·S(x,Z), S from Hubbell et al. "
            "(1975) J. Phys. Chem. Ref. Data 4, 471 (xraylib), x = d*/2, R = (1 + λ_C λ s²/2)^-2"
            + ("; T = (1 - exp(-B s²/2)) Σf² + Σ I_inc (Bragg masked)" if self.wilson_b else "; T = Σf² + Σ I_inc"),
        }


def fit_absolute_scale(d_star: np.ndarray, mean_I: np.ndarray, composition: dict,
                       fit_range: tuple[float, float] | None = None,
                       counts: np.ndarray | None = None,
                       wilson_b: float | None = None,
                       wavelength: float | None = None) -> AbsoluteScale:
    """Krogh-Moe scale from a radial profile ⟨I⟩(d*) and the unit-cell composition.

    wilson_b (Å²): the map's Bragg peaks were masked; the theory is then the
    scattering between them (see :func:`theory`). wavelength (Å): Compton
    recoil factor.

    fit_range: (d*_lo, d*_hi) in Å⁻¹; default: the outer 40 % of the
    non-empty profile in d*. Bins with NaN (or zero counts) are skipped.
    """
    ds = np.asarray(d_star, dtype=np.float64)
    m = np.asarray(mean_I, dtype=np.float64)
    ok = np.isfinite(m)
    if counts is not None:
        ok &= np.asarray(counts) > 0
    if ok.sum() < 3:
        raise ValueError("too few resolution bins with data for an absolute scale")
    if fit_range is None:
        hi = float(ds[ok].max())
        fit_range = (0.6 * hi, hi)
    sel = ok & (ds >= fit_range[0]) & (ds <= fit_range[1])
    if sel.sum() < 2:
        raise ValueError(f"fewer than 2 profile bins in the fit range {fit_range} Å⁻¹")
    coh, inc = theory(composition, ds, wilson_b=wilson_b, wavelength=wavelength)
    T = coh + inc
    w = ds[sel] ** 2
    denom = float(np.sum(w * m[sel]))
    if not denom > 0:
        raise ValueError("mean intensity in the fit range is not positive")
    K = float(np.sum(w * T[sel]) / denom)
    resid = float(np.sqrt(np.mean((K * m[sel] / T[sel] - 1.0) ** 2)))
    return AbsoluteScale(K, (float(fit_range[0]), float(fit_range[1])), ds, m, coh, inc,
                         dict(composition), resid, wilson_b, wavelength)


def to_electron_units(I: np.ndarray, sigma: np.ndarray, d_star: np.ndarray,
                      scale: AbsoluteScale) -> tuple[np.ndarray, np.ndarray]:
    """K·I − Σ I_inc(d*) and K·σ (electron units per unit cell)."""
    inc = incoherent_total(scale.composition, d_star, wavelength=scale.wavelength)
    return scale.K * np.asarray(I) - inc, scale.K * np.asarray(sigma)


def plot_absolute_scale(scale: AbsoluteScale, path) -> None:
    """K⟨I⟩ against Σf² + I_inc and Σf² with the fit range shaded (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffuse_cli import program

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(scale.d_star, scale.K * scale.mean_I, "k.-", lw=1, ms=3, label="K·⟨I⟩ (data)")
    coherent = "(1 − exp(−Bs²/2))·Σf²" if scale.wilson_b else "Σf²"
    ax.plot(scale.d_star, scale.coherent + scale.incoherent, "C0-", label=f"{coherent} + I_inc (theory)")
    ax.plot(scale.d_star, scale.coherent, "C1--", label=f"{coherent} (coherent)")
    ax.plot(scale.d_star, scale.incoherent, "C2:", label="Σ I_inc")
    ax.axvspan(*scale.fit_range, color="0.9", zorder=0, label="fit range")
    ax.set_xlabel("d* = 1/d (Å⁻¹)")
    ax.set_ylabel("electron units per unit cell")
    ax.set_yscale("log")
    ax.set_title(f"Krogh-Moe absolute scale K = {scale.K:.4g}")
    ax.legend(fontsize=8)
    program.save_figure(path, fig)
