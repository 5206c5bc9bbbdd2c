"""The fitted motion-model map: ``model.npz`` (schema ``diffuse.model/1``), written by diffuse.model.

On the grid contract of merged.npz (dense arrays indexed ``[h, k, l]``, axes
``h``, ``k``, ``l``, ``ndiv``, ``unit_cell``, ``space_group``, ``units``):

* ``model`` (float32): the fitted model intensity, scaled to the data's units
  (scale × I_LLM or scale × I_RBT; docs/model.md), NaN outside the fit voxels;
* ``model_aniso``, ``data_aniso`` (float32): the anisotropic parts of model and
  data on the fit voxels (each minus its isotropic component over the same
  voxels), ``difference`` = data_aniso − model_aniso; ``fit_mask`` (bool,
  True = voxel used in the fit);
* fit: ``model_kind`` (llm or rbt), ``sigma_A``, ``gamma_A`` (NaN for rbt),
  their errors ``sigma_error_A``, ``gamma_error_A``, ``scale``, ``cc_aniso``;
* provenance: ``source`` (merged.npz), ``source_fingerprint``,
  ``structure_factors`` (the model or .refl file), ``parameters`` (PHIL
  diff), ``program_version``.
"""

from __future__ import annotations

import numpy as np

from diffuse_cli.formats.common import read_npz

MODEL_SCHEMA = "diffuse.model/1"
REQUIRED = ("model", "model_aniso", "data_aniso", "difference", "fit_mask", "h", "k", "l", "ndiv",
            "unit_cell", "model_kind", "sigma_A", "gamma_A", "scale")


def write_model_map(path, h, k, l, ndiv, unit_cell, maps: dict, fit: dict, space_group: str = "P1",
                    units: str = "", **provenance) -> None:
    """Write model.npz atomically (the only writer). maps: model, model_aniso, data_aniso, fit_mask."""
    from diffuse_cli import __version__, program

    shape = (len(h), len(k), len(l))
    f32 = {name: np.asarray(maps[name], dtype=np.float32).reshape(shape)
           for name in ("model", "model_aniso", "data_aniso")}
    program.write_npz(
        path,
        schema=np.array(MODEL_SCHEMA),
        difference=(f32["data_aniso"] - f32["model_aniso"]).astype(np.float32),
        fit_mask=np.asarray(maps["fit_mask"], dtype=bool).reshape(shape),
        h=np.asarray(h, dtype=np.float64), k=np.asarray(k, dtype=np.float64), l=np.asarray(l, dtype=np.float64),
        ndiv=np.asarray(ndiv, dtype=np.int64), unit_cell=np.asarray(unit_cell, dtype=np.float64),
        space_group=np.array(str(space_group)), units=np.array(str(units)),
        model_kind=np.array(str(fit["model"])), sigma_A=np.float64(fit["sigma"]),
        gamma_A=np.float64(fit["gamma"]), sigma_error_A=np.float64(fit["sigma_error"]),
        gamma_error_A=np.float64(fit["gamma_error"]), scale=np.float64(fit["scale"]),
        cc_aniso=np.float64(fit["cc_aniso"]), program_version=np.array(str(__version__)),
        **f32, **{key: np.asarray(v) for key, v in provenance.items()},
    )


def read_model_map(path, fields=None) -> dict:
    """The arrays of model.npz (all, or ``fields``), schema and fields checked."""
    return read_npz(path, MODEL_SCHEMA, fields=fields,
                    required=REQUIRED if fields is None else [f for f in REQUIRED if f in fields])
