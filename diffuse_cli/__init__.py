"""diffuse: X-ray diffuse scattering data reduction built on DIALS.

Importing the package sets up the DIALS environment (see
:mod:`diffuse_cli.dials_compat`) before anything imports libtbx, so that the
console scripts work when called directly from a virtual environment.
"""

from diffuse_cli import dials_compat as _dials_compat

__version__ = "0.1.0"

_dials_compat.prepare_environment()
