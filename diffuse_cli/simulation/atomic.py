"""Independent-atom X-ray scattering per unit cell, from xraylib's tables.

Both terms are in electron units (Thomson scattering of one free electron = 1),
as functions of d* = 1/d = 2 sin θ / λ (Å⁻¹). xraylib's momentum transfer is
x = sin θ / λ = d*/2 (Å⁻¹).

* Coherent (Rayleigh): atomic form factor f(x, Z) = ``xraylib.FF_Rayl`` —
  non-relativistic Hartree–Fock form factors of Hubbell et al., J. Phys. Chem.
  Ref. Data 4, 471 (1975). Coherent intensity per atom f².
* Incoherent (Compton): incoherent scattering function S(x, Z) =
  ``xraylib.SF_Compt`` — Hubbell et al. (1975), which includes electron
  exchange and correlation (S → Z at high x, S → 0 at x = 0). Incoherent
  photons per atom R·S (Waller–Hartree), with the recoil factor of
  :func:`compton_recoil` when the wavelength is known.

Free atoms, no anomalous terms. Nothing here comes from the diffuse_cli
pipeline (its absolute-scale code is what these numbers check).
"""

from __future__ import annotations

import re

import numpy as np

#: Compton wavelength of the electron h/(m_e c), Å (CODATA 2018).
COMPTON_WAVELENGTH_A = 0.0242631023867


def parse_composition(text: str) -> dict[str, float]:
    """'C:1200,N:300,O:400' -> {'C': 1200.0, ...} (atoms per unit cell).

    Raises ValueError on a malformed item, a negative count or an element
    xraylib does not know.
    """
    import xraylib

    out: dict[str, float] = {}
    if not text or not text.strip():
        raise ValueError("empty composition")
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"([A-Z][a-z]?)[:=]([0-9.eE+-]+)", item)
        if not m:
            raise ValueError(f"composition item {item!r} is not Element:count")
        element, n = m.group(1), float(m.group(2))
        if n < 0:
            raise ValueError(f"negative count for {element}")
        try:
            xraylib.SymbolToAtomicNumber(element)
        except ValueError as e:
            raise ValueError(f"unknown element {element!r}") from e
        out[element] = out.get(element, 0.0) + n
    return out


#: Smallest x (Å⁻¹) at which xraylib evaluates SF_Compt (it refuses to extrapolate lower).
_SF_COMPT_X_MIN = 1e-3


def _elementwise(function, z: int, x: np.ndarray) -> np.ndarray:
    """xraylib's scalar functions over an array."""
    return np.array([function(z, float(v)) for v in np.ravel(x)]).reshape(np.shape(x))


def form_factor(element: str, d_star: np.ndarray) -> np.ndarray:
    """Coherent form factor f (electrons) at d* (Å⁻¹); f(0) = Z."""
    import xraylib

    z = xraylib.SymbolToAtomicNumber(element)
    return _elementwise(xraylib.FF_Rayl, z, 0.5 * np.asarray(d_star, dtype=np.float64))


def incoherent_function(element: str, d_star: np.ndarray) -> np.ndarray:
    """Incoherent scattering function S (electron units) at d* (Å⁻¹); S(0) = 0.

    Below xraylib's smallest x (1e-3 Å⁻¹, d* = 0.002 Å⁻¹) S ∝ x² is continued
    from the table's first value.
    """
    import xraylib

    z = xraylib.SymbolToAtomicNumber(element)
    x = 0.5 * np.asarray(d_star, dtype=np.float64)
    s = _elementwise(xraylib.SF_Compt, z, np.maximum(x, _SF_COMPT_X_MIN))
    return np.where(x < _SF_COMPT_X_MIN, s * (x / _SF_COMPT_X_MIN) ** 2, s)


def compton_recoil(d_star: np.ndarray, wavelength: float) -> np.ndarray:
    """Klein–Nishina recoil factor (E′/E)² of the Compton photons counted per solid angle.

    Compton: λ′ − λ = λ_C (1 − cos 2θ), and 1 − cos 2θ = 2 sin²θ = λ² d*²/2, so
    E′/E = 1 / (1 + λ_C λ d*²/2) exactly for a free electron at rest. The
    Klein–Nishina cross-section of a photon-counting detector is the Thomson
    one times (E′/E)² [1 + (E′/E + E/E′ − 2)/(2P)]; the bracket differs from 1
    by O((λ_C/λ)²) ≈ 1e-5 and is left out. ``wavelength`` 0 or None: 1.
    """
    ds = np.asarray(d_star, dtype=np.float64)
    if not wavelength:
        return np.ones_like(ds)
    return (1.0 + COMPTON_WAVELENGTH_A * float(wavelength) * ds * ds / 2.0) ** -2


def cell_scattering(
    composition: dict[str, float], d_star: np.ndarray, wavelength: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_j n_j f_j², R·Σ_j n_j S_j) per unit cell at d* (Å⁻¹), electron units.

    R = :func:`compton_recoil` at ``wavelength`` (Å; None or 0: R = 1).
    """
    ds = np.asarray(d_star, dtype=np.float64)
    coherent = np.zeros_like(ds)
    incoherent = np.zeros_like(ds)
    for element, n in composition.items():
        coherent += n * form_factor(element, ds) ** 2
        incoherent += n * incoherent_function(element, ds)
    return coherent, incoherent * compton_recoil(ds, wavelength)
