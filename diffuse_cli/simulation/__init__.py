"""diffuse.simulate's simulator: images with a known diffuse truth, independent of the pipeline.

Modules (docs/simulate.md gives every formula):

* :mod:`.crystal` — Laue operators, B matrix, lattice tables, the truth grid;
* :mod:`.truth` — I_true(hkl, d*) and the Bragg intensity table;
* :mod:`.atomic` — independent-atom coherent + Compton scattering (xraylib);
* :mod:`.instrument` — dxtbx beam, detectors (single, grid, CSPAD-like), goniometer, scan, pixel defects;
* :mod:`.forward` — pixel geometry, Ω, polarization, sensor absorption, air;
* :mod:`.bragg` — spots of stills and of rotation sweeps;
* :mod:`.simulator` — everything computed once, then the images;
* :mod:`.writers` — the driver: output directory, images, truth.json/.npz.

None of them imports the pipeline's geometry, corrections, absolute-scale,
extraction, masking, merging, scaling or symmetry modules (a test checks it),
so an error there cannot cancel between simulation and reduction.
"""

from diffuse_cli.simulation.atomic import cell_scattering, parse_composition  # noqa: F401
from diffuse_cli.simulation.bragg import render_spots  # noqa: F401
from diffuse_cli.simulation.crystal import (  # noqa: F401
    LatticeTable,
    TruthGrid,
    b_matrix,
    laue_rotations,
    make_crystal,
    quadratic_form,
    random_rotations,
    rotation_about,
    symmetric_random_table,
    symmetrise_quadratic_form,
)
from diffuse_cli.simulation.instrument import (  # noqa: F401
    beamstop_shadow,
    detector_description,
    make_beam,
    make_cspad_detector,
    make_multi_detector,
    make_single_detector,
    pilatus_module_gaps,
    sensor_mu,
)
from diffuse_cli.simulation.simulator import (  # noqa: F401
    BAD_PIXEL_VALUE,
    MICROSTERADIAN,
    FrameTruth,
    Simulator,
    StillTruth,
)
from diffuse_cli.simulation.truth import DiffuseModelParameters, TruthModel, bragg_table  # noqa: F401
from diffuse_cli.simulation.writers import image_path, run_simulation  # noqa: F401
