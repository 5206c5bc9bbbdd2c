"""The isotropic component I_iso(|q|) of a merged map and the anisotropic map I − I_iso, with σ.

diffuse.anisotropic reads a merged map (merged.npz from diffuse.merge) and
writes, in output.directory:

- anisotropic.npz (schema diffuse.anisotropic/1, the grid of merged.npz):
  I − I_iso and its propagated σ, I_iso on every voxel, the punched-and-filled
  anisotropic map (for diffuse.pdf), the shells;
- anisotropic.ccp4 (and anisotropic_filled.ccp4): reciprocal-space maps as
  merged.ccp4 (ChimeraX, Coot);
- anisotropic_hk0/h0l/0kl.png: central sections; I_iso.png: I_iso(|q|) with σ;
- isotropic.csv (per shell), anisotropic.json (summary).

I_iso is the mean of each |q| shell (|q| = 1/d,
Å⁻¹), interpolated linearly in |q| onto the voxels; σ of I − I_iso counts
the voxel's own weight in its shell. Punch-and-fill replaces voxels within
fill.punch_radius of integer hkl, and unmeasured voxels up to the largest
measured |q|, by a biharmonic (or Laplace) fill. Formulas: docs/anisotropic.md.

Examples::

  diffuse.anisotropic merged/merged.npz output.directory=analysis

  # punch the integer voxels and their face neighbours at ndiv=3, Laplace fill
  diffuse.anisotropic merged.npz anisotropic.fill.punch_radius=0.34 \\
      anisotropic.fill.method=laplace

  # 100 equal shells, no fill
  diffuse.anisotropic merged.npz anisotropic.shells.n_shells=100 anisotropic.fill.enable=False
"""

from __future__ import annotations

import sys

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import program
from diffuse_cli.analysis.anisotropic_driver import ANISOTROPIC_PHIL

phil_scope = program.parse_phil(
    """
input {
  merged = None
    .type = path
    .help = "diffuse.merge merged.npz. A .npz file given as a plain argument lands here."
}
anisotropic {
%s
}
output {
  directory = anisotropic
    .type = path
}
""" % ANISOTROPIC_PHIL,
    program="anisotropic",
)


@program.entry_point("anisotropic")
def run(args=None, phil=phil_scope):
    from diffuse_cli.analysis import anisotropic_driver

    usage = "diffuse.anisotropic merged.npz [options]"
    parser = program.ArgumentParser(usage=usage, phil=phil, epilog=__doc__)
    arg_list = program.plain_args_to_phil(list(args) if args is not None else sys.argv[1:],
                                          [(lambda a: a.lower().endswith(".npz"), "input.merged")])
    params, options = parser.parse_args(arg_list)
    program.configure_logging("anisotropic", params, options)
    program.log_diff_phil(parser)
    anisotropic_driver.run(params)
