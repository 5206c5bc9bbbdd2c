"""Fit liquid-like-motion (LLM) or rigid-body-translation (RBT) models to the anisotropic part of a merged map.

diffuse.model reads diffuse.merge's merged.npz and structure factors, either
from an atomic model (PDB or mmCIF, through iotbx/cctbx) or from the Bragg
intensities stills_process integrated (a .refl, merged onto integer hkl; LLM
only), computes the model diffuse intensity on the map's grid:

* LLM (Caspar/Clarage; Lunus llmlt): displacements σ (Å, rms along one
  direction) correlated as exp(−r/γ) over the correlation length γ (Å);
  I = e^{−x} Σ_n xⁿ/n! (|F_H|² ⊗ Γ̂_n), x = 4π²σ²|q|², |q| = 1/d;
* RBT: I = (1 − e^{−x}) Σ_k |F_k(q)|², the molecular transform of each
  asymmetric-unit copy (needs the atomic model);

and fits σ (and γ) by maximising the correlation coefficient between the
anisotropic parts (map minus its isotropic component I_iso(|q|)) of model and
data, as Lunus refine_llm.py does. Errors come from the least-squares curvature
at the optimum. Writes model.npz (the scaled model, both anisotropic maps,
their difference), CCP4 maps of the model and the difference, PNG slices
(data, model, difference) and model_fit.json (σ, γ ± errors, scale, CC
total and anisotropic per resolution shell). See docs/model.md.

Examples::

  # LLM fit with structure factors from an atomic model
  diffuse.model merged/merged.npz model.pdb

  # the same from the integrated Bragg intensities (no model needed)
  diffuse.model merged/merged.npz processed/combined.refl output.directory=model_bragg

  # rigid-body translations, fit between 10 and 2.5 Å
  diffuse.model merged.npz model.cif model=rbt fit.d_max=10 fit.d_min=2.5

  # narrower search ranges and a coarser γ scan
  diffuse.model merged.npz model.pdb fit.sigma_range=0.2,0.8 fit.gamma_range=2,15 fit.n_scan=4
"""

from __future__ import annotations

import sys

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import program

phil_scope = program.parse_phil(
    """
input {
  merged = None
    .type = path
    .help = "diffuse.merge merged.npz. A .npz given as a plain argument lands here."
  model = None
    .type = path
    .help = "Atomic model (PDB or mmCIF) for |F|². A .pdb/.ent/.cif/.mmcif plain argument lands here."
  reflections = None
    .type = path
    .help = "Integrated reflections (.refl, intensity.sum.value) for |F_H|² at integer hkl when "
            "no model is given (LLM only). A .refl plain argument lands here."
}
model = *llm rbt
  .type = choice
  .help = "llm: liquid-like motions (sigma, gamma); rbt: rigid-body translations (sigma)."
structure_factors {
  b_iso = None
    .type = float(value_min=0)
    .help = "Set every atom's B (Å²) before computing F; default: the model's own B factors."
}
llm {
  padding = 0.5
    .type = float(value_min=0)
    .help = "Zeros added along each grid axis before the FFT convolution, as a fraction of its "
            "length (against wrap-around of the kernel's tails)."
  series_tolerance = 1e-4
    .type = float(value_min=0)
    .help = "Terms n of the LLM series until the Poisson tail beyond n at the largest |q| is below this."
}
fit {
  sigma_range = 0.05 1.0
    .type = floats(size=2, value_min=0)
    .help = "Search range of sigma (Å)."
  gamma_range = 1.0 20.0
    .type = floats(size=2, value_min=0)
    .help = "Search range of the LLM correlation length gamma (Å)."
  n_scan = 6
    .type = int(value_min=3)
    .help = "Log-spaced gamma values scanned before the bounded Brent search."
  tolerance = 0.005
    .type = float(value_min=0)
    .help = "Relative precision of sigma and gamma in the search (bounded Brent in ln sigma, ln gamma)."
  d_min = None
    .type = float(value_min=0)
    .help = "High-resolution limit of the fit voxels (Å)."
  d_max = None
    .type = float(value_min=0)
    .help = "Low-resolution limit of the fit voxels (Å)."
  exclude_integer_hkl = True
    .type = bool
    .help = "Leave out the voxels at integer hkl (Bragg positions) from the fit."
  shell_width = None
    .type = float(value_min=0)
    .help = "Width (Å⁻¹) of the shells of the isotropic component; default one voxel step."
  shell_weights = *equal inverse_variance
    .type = choice
    .help = "Weights of the isotropic shell means (data and model alike): equal (as Lunus anisolt; "
            "no bias when sigma grows with I) or inverse_variance (1/sigma^2 of the data)."
  n_shells = 10
    .type = int(value_min=1)
    .help = "Resolution shells (equal volume) of the reported CCs."
}
output {
  directory = model
    .type = path
  ccp4 = True
    .type = bool
    .help = "Write model.ccp4 and model_difference.ccp4."
  plots = True
    .type = bool
    .help = "Write PNG slices (data, model, difference) and the CC per shell."
}
""",
    program="model",
)

_MODEL_EXT = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz")


def _split_args(args):
    """Plain .npz / model / .refl arguments into input.merged= / input.model= / input.reflections=."""
    return program.plain_args_to_phil(args, [
        (lambda a: a.lower().endswith(".npz"), "input.merged"),
        (lambda a: a.lower().endswith(_MODEL_EXT), "input.model"),
        (lambda a: a.lower().endswith(".refl"), "input.reflections"),
    ])


@program.entry_point("model")
def run(args=None, phil=phil_scope):
    from diffuse_cli.analysis import model_driver

    usage = "diffuse.model merged.npz model.pdb|combined.refl [model=llm|rbt] [options]"
    parser = program.ArgumentParser(usage=usage, phil=phil, epilog=__doc__)
    arg_list = _split_args(list(args) if args is not None else sys.argv[1:])
    params, options = parser.parse_args(arg_list)
    program.configure_logging("model", params, options)
    program.log_diff_phil(parser)
    model_driver.run_model(params, diff_phil=parser.diff_phil.as_str())
