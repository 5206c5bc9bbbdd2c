"""Simulate still diffraction images, XFEL shots or a rotation sweep from a known diffuse-scattering truth.

Writes CBF images that dials.import reads with the simulated geometry and
exposure time (kind=rotation: one sweep, numbered from rotation.first_image;
kind=xfel: each shot with its own wavelength and exposure time 0),
together with the truth: ``truth.json`` (every model parameter, per-still or
per-frame orientation U, setting matrix A and scale, detector and beam) and
``truth.npz`` (the exact merged diffuse map on the diffuse.merge hkl grid).
The forward model shares no code with the reduction programs.

The expected counts in a pixel are

    scale_i * exposure_time * (Omega / 1e-6 sr) * P * eta * T * I_true(hkl, d*) + Bragg

with I_true in photons per microsteradian per second at scale 1 (see
docs/simulate.md). Results depend only on the parameters and ``seed``.

Examples:

  diffuse.simulate n_stills=10 seed=7 output.directory=sim

  diffuse.simulate n_stills=20 detector=multi noise=False bragg=False output.directory=sim_multi

  diffuse.simulate unit_cell=58.4,58.4,152.3,90,90,90 space_group=P41212 output.directory=thau

  diffuse.simulate kind=rotation rotation.n_images=20 rotation.first_image=101 rotation.oscillation=0.5 output.directory=sweep

  diffuse.simulate kind=xfel n_stills=40 detector=multi multi.layout=cspad xfel.wavelength_jitter=0.002 output.directory=xfel

  diffuse.simulate my_simulation.phil
"""

from __future__ import annotations

import logging
import time

import diffuse_cli  # noqa: F401  (DIALS environment)
from libtbx.utils import Sorry

from diffuse_cli import program

logger = logging.getLogger("diffuse.simulate")

phil_scope = program.parse_phil(
    """
kind = *stills rotation xfel
  .type = choice
  .help = "stills: n_stills stills, each with a random orientation. rotation: one"
          "sweep of rotation.n_images frames of one crystal on a single-axis"
          "goniometer, a numbered series that dials.import reads as one sweep."
          "xfel: n_stills XFEL shots, each with its own wavelength (header), pulse"
          "flux and orientation, exposure time 0 in the header (see xfel)."
n_stills = 20
  .type = int(value_min=1)
  .help = "Number of still images (kind=stills) or shots (kind=xfel)."
xfel {
  wavelength_jitter = 0.002
    .type = float(value_min=0, value_max=0.05)
    .help = "Relative rms of the per-shot (mean) wavelength about beam.wavelength"
            "(Gaussian; 0.002 = 0.2 %). Each image header carries its shot's"
            "mean wavelength."
  flux_jitter = 0.3
    .type = float(value_min=0)
    .help = "Relative rms of the pulse flux (gamma distribution of mean 1). A shot's"
            "scale is flux times an overlap factor uniform in [scale_min, scale_max]."
  photons_per_pulse = None
    .type = float(value_min=0)
    .help = "If set, each header carries the shot's incident flux,"
            "photons_per_pulse times its relative pulse flux (miniCBF Flux, full"
            "CBF beam flux), which diffuse.correct normalises by; the per-shot"
            "scale left to merge is then the overlap factor alone. None: no flux in"
            "the headers, as on the real CSPAD shots."
  bandwidth = 0.0
    .type = float(value_min=0, value_max=0.05)
    .help = "Relative rms width of each shot's Gaussian spectrum (e.g. 0.001 for a"
            "SASE pulse); 0: monochromatic shots. The diffuse and Bragg signal is"
            "summed over spectrum_samples wavelengths within +-2 rms."
  spectrum_samples = 5
    .type = int(value_min=1)
    .help = "Wavelength samples of a shot's spectrum (with bandwidth > 0)."
}
rotation {
  n_images = 10
    .type = int(value_min=1)
    .help = "Frames in the sweep."
  first_image = 1
    .type = int(value_min=0)
    .help = "Image number of the first frame (file <prefix><5 digits>.cbf)."
  phi_start = 0.0
    .type = float
    .help = "Rotation angle at the start of the first frame (degrees)."
  oscillation = 0.5
    .type = float(value_min=0)
    .help = "Oscillation width of each frame (degrees)."
  axis = 1 0 0
    .type = floats(size=3)
    .help = "Rotation axis (lab frame). A miniCBF carries none: dxtbx reads 1,0,0,"
            "so import other axes with dials.import geometry.goniometer.axes=..."
  sub_steps = 5
    .type = int(value_min=1)
    .help = "Diffuse intensity of a frame: mean of I_true over this many equal"
            "steps of its oscillation."
  drift_deg = 0.0
    .type = float(value_min=0)
    .help = "Scan-varying crystal: the orientation turns by this angle over the"
            "whole sweep (degrees), linearly in phi, about a fixed random axis."
}
seed = 0
  .type = int(value_min=0)
  .help = "Random seed: orientations, scales, noise, defects, lattice tables."
unit_cell = 79.1 79.1 37.9 90 90 90
  .type = floats(size=6)
  .help = "Unit cell a b c (Å) alpha beta gamma (degrees)."
space_group = P43212
  .type = str
  .help = "Space group; the truth has the symmetry of its Laue group."
exposure_time = 1.0
  .type = float(value_min=0, allow_none=False)
  .help = "Exposure time per still or frame (s). kind=xfel: not used (counts per"
          "pulse, I_true in photons/microsteradian per pulse at scale 1; headers 0)."
scale_min = 0.5
  .type = float(value_min=0)
  .help = "Per-still scale factors are uniform in [scale_min, scale_max]; along a"
          "sweep the scale falls linearly from scale_max to scale_min."
scale_max = 2.0
  .type = float(value_min=0)
noise = True
  .type = bool
  .help = "Poisson noise. False: expected counts rounded to integers."
bragg = True
  .type = bool
  .help = "Add Bragg spots."
water_ring = True
  .type = bool
  .help = "Add the isotropic water ring to I_true."
detector = *single multi
  .type = choice
  .help = "single: one Pilatus-like panel (miniCBF). multi: a grid of slightly"
          "tilted panels with gaps (full CBF)."
detector_model {
  distance = 200.0
    .type = float(value_min=0)
    .help = "Sample to detector distance (mm)."
  pixel_size = 0.172
    .type = float(value_min=0)
    .help = "Square pixel size (mm)."
  n_fast = 1024
    .type = int(value_min=1)
    .help = "Pixels along fast (detector=single)."
  n_slow = 1024
    .type = int(value_min=1)
    .help = "Pixels along slow (detector=single)."
  beam_centre_px = None
    .type = floats(size=2)
    .help = "Beam centre (fast, slow) in pixels of the gap-free layout. Default: centre."
  overload = 1048575
    .type = int(value_min=1)
    .help = "Count cutoff: counts are clipped to it; the trusted range is (-1, overload)."
}
multi {
  layout = *grid cspad
    .type = choice
    .help = "grid: n_panels_fast x n_panels_slow panels with gaps, beam centre at"
            "detector_model.beam_centre_px. cspad: four quadrants turned by 90"
            "degrees from each other around the beam (hole in the middle), each"
            "with modules_per_quadrant modules stacked with gaps."
  n_panels_fast = 2
    .type = int(value_min=1)
    .help = "layout=grid."
  n_panels_slow = 2
    .type = int(value_min=1)
    .help = "layout=grid."
  modules_per_quadrant = 2
    .type = int(value_min=1)
    .help = "layout=cspad."
  panel_size = 512 512
    .type = ints(size=2, value_min=1)
    .help = "Pixels (fast, slow) of each panel (module)."
  gap_px = 10
    .type = int(value_min=0)
    .help = "Gap between panels, in pixels (cspad: the central hole is 3 gaps wide)."
  tilt_deg = 0.5
    .type = float(value_min=0)
    .help = "Each panel is tilted by random angles within +-tilt_deg about x and y."
  rotation_deg = 0.0
    .type = float(value_min=0)
    .help = "layout=cspad: each module is also turned about its normal by a random"
            "angle within +-rotation_deg."
}
beam {
  wavelength = 1.0
    .type = float(value_min=0)
    .help = "Wavelength (Å)."
  polarization_fraction = 0.999
    .type = float(value_min=0, value_max=1)
    .help = "Beam polarization fraction (DIALS convention). A miniCBF"
            "(detector=single) cannot carry it: dxtbx reads 0.999."
}
sensor {
  material = *Si CdTe none
    .type = choice
    .help = "Sensor material (sensor efficiency and parallax)."
  thickness = 0.45
    .type = float(value_min=0)
    .help = "Sensor thickness (mm)."
}
air {
  pressure_kpa = 101.325
    .type = float(value_min=0)
  temperature_k = 293.15
    .type = float(value_min=0)
}
masking {
  panel_gaps = True
    .type = bool
    .help = "Pilatus-like module gaps (value -1) on the single panel."
  beamstop = True
    .type = bool
    .help = "Beamstop disc + arm shadow (value -1)."
  beamstop_radius = 3.0
    .type = float(value_min=0)
    .help = "mm"
  beamstop_arm_width = 1.5
    .type = float(value_min=0)
    .help = "mm"
  dead_fraction = 0.0002
    .type = float(value_min=0, value_max=1)
    .help = "Fraction of dead pixels (value -1)."
  hot_fraction = 0.0001
    .type = float(value_min=0, value_max=1)
    .help = "Fraction of hot pixels (value = overload, outside the trusted range)."
}
model {
  intensity_scale = 1.0
    .type = float(value_min=0)
    .help = "Multiplies every diffuse amplitude (photons / microsteradian / s)."
  background = 20.0
    .type = float(value_min=0)
    .help = "Isotropic floor of I_true."
  halo {
    amplitude = 50.0
      .type = float(value_min=0)
    sigma = 0.12 0.14 0.18
      .type = floats(size=3, value_min=0)
      .help = "Halo Gaussian widths in fractional hkl, before tilt and Laue average."
    tilt_deg = 25.0
      .type = float
    b_factor = 20.0
      .type = float
      .help = "Halo weights fall as exp(-B d*^2/4) (Å^2)."
  }
  shell {
    amplitude = 150.0
      .type = float(value_min=0)
    radius = 0.18
      .type = float(value_min=0)
      .help = "Å^-1"
    width = 0.05
      .type = float(value_min=0)
      .help = "Å^-1"
    axes = 1.0 0.8 1.3
      .type = floats(size=3, value_min=0)
      .help = "Relative ellipsoid semi-axes (crystal frame), before tilt and Laue average."
    tilt_deg = 20.0
      .type = float
  }
  water {
    amplitude = 120.0
      .type = float(value_min=0)
    d = 3.1
      .type = float(value_min=0)
      .help = "Ring position, d spacing (Å)."
    width = 0.03
      .type = float(value_min=0)
      .help = "Gaussian sigma in d* (Å^-1)."
  }
}
absolute_scale {
  composition = None
    .type = str
    .help = "Atoms per unit cell, e.g. C:4920,N:1560,O:1680,S:80,H:7800. Adds the"
            "independent-atom scattering per unit cell, (1 - exp(-wilson_b d*^2/2))"
            "sum f^2 + sum I_inc in electron units times photons_per_electron_unit,"
            "to I_true and drops model.background: the truth then has a known"
            "absolute scale (recorded in truth.json) for diffuse.merge composition=..."
  wilson_b = 30.0
    .type = float(value_min=0)
    .help = "Å^2. The Bragg (Wilson) part exp(-B d*^2/2) sum f^2 is left out of the"
            "continuous scattering; the Bragg spots carry it (mean spot intensity"
            "proportional to sum f^2 exp(-B d*^2/2), the target of a Wilson plot)."
  photons_per_electron_unit = 0.0001
    .type = float(value_min=0)
    .help = "Photons per microsteradian per second (scale 1) per electron unit per"
            "unit cell: the simulated absolute scale."
}
bragg_model {
  intensity = 100000.0
    .type = float(value_min=0)
    .help = "Mean full-spot photons per second (kind=xfel: per pulse) at scale 1"
            "and d* = 0 (before the resolution envelope)."
  b_factor = 15.0
    .type = float
    .help = "Spot intensities fall as exp(-B d*^2/2) (Å^2). With"
            "absolute_scale.composition the envelope is instead the Wilson one,"
            "sum f^2(d*)/sum f^2(0) exp(-absolute_scale.wilson_b d*^2/2)."
  excitation_sigma = 0.0003
    .type = float(value_min=0)
    .help = "Partiality is a Gaussian in the excitation error |A h + s0| - 1/lambda"
            "with sigma = excitation_sigma + |A h| tan(mosaicity/2) (Å^-1): a domain-size"
            "term plus a mosaic-spread term, as in Nave's model used by DIALS stills."
  mosaicity_deg = 0.1
    .type = float(value_min=0)
    .help = "Full mosaic spread (degrees), see excitation_sigma."
  profile_sigma_px = 1.0
    .type = float(value_min=0)
    .help = "Spot profile: 2D Gaussian sigma (pixels)."
}
truth {
  ndiv = 2
    .type = int(value_min=1)
    .help = "Voxels per reciprocal-lattice unit of truth.npz (diffuse_cli.grid.HKLGrid)."
  subsample = 3
    .type = int(value_min=1)
    .help = "Voxel mean: smooth terms on a subsample^3 sub-grid, halos exactly; 1 = values at voxel centres."
  map = True
    .type = bool
    .help = "Write truth.npz (the merged truth map)."
}
output {
  directory = simulated
    .type = path
  prefix = image_
    .type = str
    .help = "Images are <prefix><5-digit index>.cbf (stills from 0; a sweep from"
            "rotation.first_image). A rerun removes the images of an earlier run"
            "that it does not write."
}
""",
    program="simulate",
)


@program.entry_point("simulate")
def run(args=None, phil=phil_scope):
    parser = program.ArgumentParser(
        usage="diffuse.simulate [options] [param.phil] output.directory=DIR",
        phil=phil,
        read_experiments=False,
        read_reflections=False,
        check_format=False,
        epilog=__doc__,
    )
    params, options = parser.parse_args(args)
    program.configure_logging("simulate", params, options)
    program.log_diff_phil(parser)
    if params.scale_max < params.scale_min:
        raise Sorry("scale_max must not be smaller than scale_min")
    from diffuse_cli.simulation import run_simulation
    from diffuse_cli.simulation.crystal import check_symmetry

    check_symmetry(params)

    t0 = time.perf_counter()
    summary = run_simulation(params, phil.format(python_object=params).as_str())
    logger.info(
        "Wrote %d %s, truth.json%s to %s in %.1f s",
        summary["n_images"],
        "frames" if params.kind == "rotation" else "stills",
        " and truth.npz" if params.truth.map else "",
        params.output.directory,
        time.perf_counter() - t0,
    )
