"""Per-still fits of the scaling passes of :func:`diffuse_cli.merging.scale_and_merge`
against the previous pass's merged map (the reference): the simple model
(:func:`_fit_still`), the richer :class:`~diffuse_cli.scaling_terms.ScalingTerms`
(:func:`_fit_still_terms`), the expected intensity g·I_ref of the variance model
and the outlier test of the merge.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.merge_accumulator import MergedMap, voxel_flat
from diffuse_cli.merge_prepared import _reference_subset
from diffuse_cli.scaling import FitResult, fit_scale, leave_one_out, relax



def _expected_intensity(grid, reference, hkl, I, scale_g):
    """g·I_ref at each observation's voxel; the still's median positive I where no reference."""
    typical = np.median(I[I > 0]) if np.any(I > 0) else 1.0
    expected = np.full(len(I), typical, dtype=np.float64)
    if reference is not None:
        flat, inside = voxel_flat(grid, hkl)
        ref = np.full(len(flat), np.nan)
        ref[inside] = reference.gather(flat[inside])
        have = np.isfinite(ref)
        g = np.broadcast_to(np.asarray(scale_g, dtype=np.float64), expected.shape)
        expected[have] = g[have] * ref[have]
    return expected


def _fit_subset(grid, reference: MergedMap, hkl, I, sig, v1, fit_max_obs, min_counts, seed):
    """(hkl, I, σ as float64 arrays, the selection and its reference values) of the
    still's observations with a reference value (:func:`_reference_subset`)."""
    hkl = np.asarray(hkl)
    I = np.asarray(I, dtype=np.float64)
    sig = np.asarray(sig, dtype=np.float64)
    sel, ref = _reference_subset(grid, reference, hkl, I, sig, v1, fit_max_obs, min_counts, seed)
    return hkl, I, sig, sel, ref


def _fit_still_terms(terms, i, grid, reference: MergedMap, hkl, I, sig, co, fit_max_obs, min_counts,
                     seed, variance_per_intensity=None, previous=None) -> FitResult:
    """Subset of still i's observations with a reference value, then ScalingTerms.fit_still."""
    v1 = variance_per_intensity
    hkl, I, sig, sel, ref = _fit_subset(grid, reference, hkl, I, sig, v1, fit_max_obs, min_counts, seed)
    ref_var = None
    if previous is not None:  # (multiplier, offset, reject limit, own share) of the still's last pass
        ref, ref_var, keep = leave_one_out(reference, grid, hkl, I, sig, previous[0], previous[1], v1, sel,
                                           previous[2], min_counts)
        sel, ref, ref_var = sel[keep], ref[keep], ref_var[keep]
    sub = {k: v[sel] for k, v in co.items()}
    fit = terms.fit_still(i, I[sel], sig[sel], ref, sub,
                          variance_per_intensity=None if v1 is None else np.asarray(v1)[sel],
                          reference_variance=ref_var)
    if previous is not None:
        relax(fit, terms.g[i], terms.alpha[i], terms.kappa[i], previous[3])
    return fit


def _outliers(grid, reference, hkl, I, sig, factor, limit) -> np.ndarray:
    """Observations whose residual (I·f − I_ref)/(σ·f) exceeds ``limit`` (no reference: kept)."""
    flat, inside = voxel_flat(grid, hkl)
    ref = np.full(len(flat), np.nan)
    ref[inside] = reference.gather(flat[inside])
    f = np.asarray(factor, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (np.asarray(I) * f - ref) / (np.asarray(sig) * f)
    return np.abs(z) > limit  # NaN (no reference) compares False: kept


def _fit_still(model, grid, gstar, reference: MergedMap, hkl, I, sig, fit_max_obs,
               min_counts, seed, variance_per_intensity=None, previous=None, redescending=True) -> FitResult:
    v1 = variance_per_intensity
    hkl, I, sig, sel, ref = _fit_subset(grid, reference, hkl, I, sig, v1, fit_max_obs, min_counts, seed)
    ref_var = None
    if previous is not None:  # (scale parameters, reject limit, own share) of the still's last pass
        if model.n_control_points == 1:
            m = float(previous[0][0])
        else:
            ha = hkl.astype(np.float64)
            m = model.evaluate(previous[0], np.einsum("ni,ij,nj->n", ha, gstar, ha))
        ref, ref_var, keep = leave_one_out(reference, grid, hkl, I, sig, m, 0.0, v1, sel, previous[1], min_counts)
        sel, ref, ref_var = sel[keep], ref[keep], ref_var[keep]
    h = hkl[sel].astype(np.float64)
    dss = np.einsum("ni,ij,nj->n", h, gstar, h)
    fit = fit_scale(model, I[sel], sig[sel], ref, dss,
                    variance_per_intensity=None if v1 is None else np.asarray(v1)[sel],
                    reference_variance=ref_var, redescending=redescending)
    return fit if previous is None else relax(fit, previous[0], own_share=previous[2])
