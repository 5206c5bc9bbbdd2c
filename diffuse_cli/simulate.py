"""Compatibility name for :mod:`diffuse_cli.simulation` (the simulator lives there).

``from diffuse_cli.simulate import TruthModel`` etc. keep working; new code
imports from :mod:`diffuse_cli.simulation`.
"""

from diffuse_cli.simulation import *  # noqa: F401,F403
from diffuse_cli.simulation import (  # noqa: F401
    BAD_PIXEL_VALUE,
    MICROSTERADIAN,
    DiffuseModelParameters,
    FrameTruth,
    LatticeTable,
    Simulator,
    StillTruth,
    TruthGrid,
    TruthModel,
    b_matrix,
    beamstop_shadow,
    bragg_table,
    detector_description,
    image_path,
    laue_rotations,
    make_beam,
    make_crystal,
    make_multi_detector,
    make_single_detector,
    pilatus_module_gaps,
    quadratic_form,
    random_rotations,
    render_spots,
    rotation_about,
    run_simulation,
    sensor_mu,
    symmetric_random_table,
    symmetrise_quadratic_form,
)
