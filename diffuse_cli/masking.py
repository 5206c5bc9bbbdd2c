"""Pixel masks for diffuse scattering: static, dynamic (hot/dead) and Bragg.

Polarity: every mask here is **True = pixel usable for diffuse**, the DIALS
convention; a Bragg mask is False on Bragg pixels, so masks combine with ``&``.
Internally masks are flat numpy bool arrays in pixel order (panel-major, then
slow, then fast); :func:`to_dials` / :func:`from_dials` convert to and from the
DIALS file form (a tuple of ``flex.bool``, one per panel).

Bragg masks: predicted from the crystal model for stills
(:mod:`diffuse_cli.mask_bragg`), from the rotation geometry or a fitted peak
model for rotation frames (:mod:`diffuse_cli.mask_rotation`), from shoeboxes
(:mod:`diffuse_cli.mask_shoebox`); static, dynamic and strong pixels in
:mod:`diffuse_cli.mask_pixels`; the program driver in
:mod:`diffuse_cli.mask_driver`, its picture in :mod:`diffuse_cli.mask_plots`.
This module re-exports all of them (docs/bragg_mask.md).
"""

from __future__ import annotations

import diffuse_cli  # noqa: F401  (DIALS environment)

# mask files: one reader and writer, in diffuse_cli.formats.masks
from diffuse_cli.formats.masks import (  # noqa: F401
    MASK_BITS_SCHEMA,
    from_dials,
    read_mask,
    read_mask_any,
    to_dials,
    write_mask_bits,
)
from diffuse_cli.mask_pixels import (  # noqa: F401
    dynamic_mask,
    static_mask,
    strong_pixel_mask,
)
from diffuse_cli.mask_bragg import (  # noqa: F401
    _absent,
    _hkl_key,
    _lattice_points,
    _miller,
    _mosaic_envelope,
    _profile_sigma_b,
    _profile_sigma_m,
    _reflection_excitation,
    BraggShape,
    estimate_bragg_shape,
    ewald_residuals,
    excitation_error,
    pixel_scale,
    predicted_bragg_mask,
)
from diffuse_cli.mask_rotation import (  # noqa: F401
    fit_peak_model,
    fitted_bragg_mask,
    local_background,
    peak_observations,
    PeakModel,
    rotation_bragg_mask,
)
from diffuse_cli.mask_shoebox import (  # noqa: F401
    shoebox_bragg_mask,
)
from diffuse_cli.mask_driver import (  # noqa: F401
    _image_groups,
    _integrated_spots,
    _mask_one,
    _mask_provenance,
    _reflection_fingerprint,
    _stale_masks,
    bragg_mask_for_image,
    fit_peak_models,
    reflections_by_experiment,
    run_bragg_mask,
)
from diffuse_cli.mask_plots import (  # noqa: F401
    write_png,
)
from diffuse_cli.mask_bragg import _CHUNK  # noqa: F401
from diffuse_cli.mask_driver import _STATE  # noqa: F401
