"""The 3D-ΔPDF of the anisotropic map and the Patterson of the total map, by FFT.

diffuse.pdf reads anisotropic.npz (diffuse.anisotropic) or merged.npz (then
it first computes the anisotropic map and its punch-and-fill with the
anisotropic.* parameters, as diffuse.anisotropic does) and writes, in
output.directory:

- pdf.npz (schema diffuse.pdf/1): the ΔPDF and the Patterson on the
  real-space grid, with the strongest ΔPDF features;
- delta_pdf.ccp4, patterson.ccp4: real-space maps (cell ndiv × the unit cell,
  origin u = 0 at the coordinate origin) for ChimeraX and Coot;
- delta_pdf_xy0/x0z/0yz.png, patterson_*.png: sections through the origin (Å);
- features.csv, features.json: strongest extrema (vector, fractional and Å;
  value; sign), one of each ± pair; pdf.json (grid, taper, units).

P(u) = ΔV* Σ_h w(|q|) I(h) cos(2π h·x), with a radial cosine taper w ending
at s_max; e²/Å³ when the map is in electron units per unit cell. The
real-space voxel is ndiv·a/N_h along a (about d_min/2) and the grid spans
ndiv cells. Formulas: docs/pdf.md.

Examples::

  diffuse.pdf analysis/anisotropic.npz output.directory=analysis

  # straight from the merged map, punching the integer voxels first
  diffuse.pdf merged/merged.npz anisotropic.fill.punch_radius=0.2 output.directory=pdf

  # cut at 2.5 Å, cosine taper over the outer 70 %, 50 features beyond 3 Å
  diffuse.pdf anisotropic.npz d_min=2.5 taper_start=0.3 features.n=50 features.min_distance=3
"""

from __future__ import annotations

import sys

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import program
from diffuse_cli.analysis.anisotropic_driver import ANISOTROPIC_PHIL
from diffuse_cli.analysis.pdf_driver import PDF_PHIL

phil_scope = program.parse_phil(
    """
input {
  map = None
    .type = path
    .help = "anisotropic.npz (diffuse.anisotropic) or merged.npz (diffuse.merge). "
            "A .npz file given as a plain argument lands here."
}
%s
anisotropic
  .help = "Used only when the input is merged.npz (as in diffuse.anisotropic)."
{
%s
}
output {
  directory = pdf
    .type = path
}
""" % (PDF_PHIL, ANISOTROPIC_PHIL),
    program="pdf",
)


@program.entry_point("pdf")
def run(args=None, phil=phil_scope):
    from diffuse_cli.analysis import pdf_driver

    usage = "diffuse.pdf anisotropic.npz|merged.npz [options]"
    parser = program.ArgumentParser(usage=usage, phil=phil, epilog=__doc__)
    arg_list = program.plain_args_to_phil(list(args) if args is not None else sys.argv[1:],
                                          [(lambda a: a.lower().endswith(".npz"), "input.map")])
    params, options = parser.parse_args(arg_list)
    program.configure_logging("pdf", params, options)
    program.log_diff_phil(parser)
    pdf_driver.run(params)
