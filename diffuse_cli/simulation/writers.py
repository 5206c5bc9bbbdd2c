"""The diffuse.simulate driver: the output directory, images, truth.json and truth.npz.

Image names: stills ``<prefix><5-digit index from 0>.cbf``; a rotation sweep
``<prefix><5-digit image number>.cbf`` from ``rotation.first_image``, one
numbered series that dials.import reads as one sweep.

A rerun into the same directory removes the images of an earlier run that this
run does not write (and a stale truth.npz, and temporary files of a killed
run), so the directory never holds foreign images; other ``.cbf`` files, not
written by diffuse.simulate, make it stop before any work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli import program
from diffuse_cli.simulation.instrument import detector_description, make_beam, make_scan
from diffuse_cli.simulation.simulator import Simulator, check_sweep

logger = logging.getLogger("diffuse.simulate")

TRUTH_SCHEMA = "diffuse.simulate/1"
TRUTH_MAP_SCHEMA = "diffuse.simulate.truth/1"


def image_path(directory, prefix: str, number: int) -> str:
    return os.path.join(directory, f"{prefix}{number:05d}.cbf")


def image_numbers(params) -> list[int]:
    if params.kind == "rotation":
        first = params.rotation.first_image
        return list(range(first, first + params.rotation.n_images))
    return list(range(params.n_stills))


def _written_by_simulate(directory) -> set:
    """Image names an earlier run recorded in its truth.json (empty if none or unreadable)."""
    path = os.path.join(directory, "truth.json")
    if not os.path.exists(path):
        return set()
    try:
        with open(path) as fh:
            truth = json.load(fh)
    except (OSError, ValueError):
        return set()
    if not isinstance(truth, dict) or truth.get("schema") != TRUTH_SCHEMA:
        return set()
    return set(truth.get("images", []))


def prepare_output_directory(params) -> list[str]:
    """Make the directory; remove what an earlier run left that this run does not write.

    Removed: earlier images (``<prefix><digits>.cbf`` or listed in the old
    truth.json) not among this run's names, temporary files of a killed run,
    and truth.npz when ``truth.map=False``. Returns the removed names. Raises
    ValueError when the directory holds other .cbf files (not ours to delete).
    """
    from libtbx.utils import Sorry

    directory = params.output.directory
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise Sorry(f"output.directory={directory}: exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise Sorry(f"output.directory={directory}: cannot be created ({e.strerror})") from e
    ours = {os.path.basename(image_path(directory, params.output.prefix, n)) for n in image_numbers(params)}
    earlier = _written_by_simulate(directory)
    numbered = re.compile(re.escape(params.output.prefix) + r"\d+\.cbf\Z")
    stale, foreign = [], []
    for name in sorted(os.listdir(directory)):
        if name in ours:
            continue
        if name.startswith(".") and ".tmp" in name:
            stale.append(name)  # a killed run's atomic-write leftovers
        elif name.endswith(".cbf") or name.endswith(".cbf.tmp"):
            (stale if (numbered.match(name) or name in earlier) else foreign).append(name)
    if foreign:
        raise Sorry(
            f"output.directory={directory}: holds {len(foreign)} .cbf file(s) not written by "
            f"diffuse.simulate (e.g. {foreign[0]}); choose another directory or remove them"
        )
    if not params.truth.map and os.path.exists(os.path.join(directory, "truth.npz")):
        stale.append("truth.npz")
    for name in stale:
        os.remove(os.path.join(directory, name))
    if stale:
        logger.info(
            "Removed %d file(s) of an earlier run that this run does not write: %s",
            len(stale), ", ".join(stale[:5]) + (" …" if len(stale) > 5 else ""),
        )
    return stale


_WORKER_SIMULATOR = None


def _simulate_still(i: int):
    """Simulate and write still i with the module's current simulator."""
    from diffuse_cli import cbf_writer

    sim = _WORKER_SIMULATOR
    params = sim.params
    st = sim.still_truth(i)
    data = sim.image(st)
    path = image_path(params.output.directory, params.output.prefix, i)
    if st.wavelength is None:
        cbf_writer.write_image(path, sim.detector, sim.beam, params.exposure_time, data)
    else:
        # an XFEL shot: its own (mean) wavelength, no exposure time, as real shots
        beam = make_beam(st.wavelength, params.beam.polarization_fraction)
        if st.incident_photons:
            beam.set_flux(st.incident_photons)
        cbf_writer.write_image(path, sim.detector, beam, 0.0, data)
    return st


def _simulate_frame(j: int):
    """Simulate and write frame j of the sweep."""
    from diffuse_cli import cbf_writer

    sim = _WORKER_SIMULATOR
    params = sim.params
    ft = sim.frame_truth(j)
    data = sim.frame_image(ft)
    scan = make_scan(ft.image_number, 1, ft.phi_start, params.rotation.oscillation, params.exposure_time)
    path = image_path(params.output.directory, params.output.prefix, ft.image_number)
    cbf_writer.write_image(
        path, sim.detector, sim.beam, params.exposure_time, data, goniometer=sim.goniometer, scan=scan
    )
    return ft


def _intensity_model_text(kind: str) -> str:
    per_image = {
        "rotation": "mean over rotation.sub_steps sub-steps phi_k of the frame of I_true((R(phi_k) A(phi_k))^-1 q)",
        "stills": "I_true(A^-1 q, d*)",
        "xfel": "sum_k w_k I_true(A^-1 q(lambda_k), d*(lambda_k)) over the shot's spectrum, "
                "q(lambda) = (unit s1 - unit s0)/lambda, eta and T_air at lambda_k",
    }[kind]
    time_factor = "1 (per pulse; headers carry exposure time 0)" if kind == "xfel" else "exposure_time"
    unit = "per pulse" if kind == "xfel" else "per second"
    return (
        f"expected_counts = scale * {time_factor} * (Omega/1e-6 sr) * P * eta * T_air * [{per_image}] + Bragg; "
        f"I_true in photons per microsteradian {unit} at scale 1; computed by diffuse_cli.simulation.forward "
        "(independent of the pipeline): geometry from dxtbx Panel.pixel_to_millimeter + get_lab_coord at pixel "
        "centres; Omega exact for the pixel's corner quadrilateral (Van Oosterom-Strackee); P Thomson for the "
        "beam's polarization fraction and normal; eta = 1 - exp(-mu t / cos psi), mu = xraylib CS_Total; "
        "T_air = exp(-mu_air L), mu_air from xraylib with NIST dry-air composition, density ideal-gas scaled "
        "from 1.20479e-3 g/cm^3 at 293.15 K, 101.325 kPa; noise-free images are rounded to integers; "
        "pixels -1 = gap/dead/beamstop, = overload: hot or saturated"
    )


def run_simulation(params, phil_text: str = "") -> dict:
    """Write the images, truth.json and truth.npz; return a summary dict."""
    from libtbx.utils import Sorry

    if params.kind == "rotation":
        try:
            check_sweep(params)
        except ValueError as e:
            raise Sorry(str(e)) from e
        if params.detector != "single":
            raise Sorry("kind=rotation: only detector=single is written as a sweep so far")
    out_dir = params.output.directory
    removed = prepare_output_directory(params)
    t0 = time.perf_counter()
    sim = Simulator.from_params(params)
    logger.info(
        "Detector: %d panel(s), d_min %.3f Å at the corners; geometry, forward factors and lattice tables "
        "set up in %.2f s", len(sim.detector), sim.d_min, time.perf_counter() - t0,
    )
    if params.detector == "single" and abs(params.beam.polarization_fraction - 0.999) > 1e-9:
        logger.warning(
            "A miniCBF cannot carry the polarization fraction: dxtbx reads 0.999, "
            "the images were simulated with %g (recorded in truth.json)",
            params.beam.polarization_fraction,
        )
    axis_carried = True
    if params.kind == "rotation" and not np.allclose(sim.rotation_axis, (1.0, 0.0, 0.0)):
        axis_carried = False
        logger.warning(
            "A miniCBF cannot carry the rotation axis: dxtbx reads 1,0,0. Import the sweep with "
            "dials.import geometry.goniometer.axes=%s",
            ",".join("%g" % v for v in sim.rotation_axis),
        )
    numbers = image_numbers(params)
    nproc = min(program.resolve_nproc(getattr(params, "nproc", 1)), len(numbers))
    global _WORKER_SIMULATOR
    _WORKER_SIMULATOR = sim
    try:
        # workers inherit the simulator (geometry, factors, tables) through fork;
        # every image has its own random stream, so results do not depend on nproc
        if params.kind == "rotation":
            if params.bragg:
                sim.sweep_spots()  # once, before forking
            records = program.parallel_map(_simulate_frame, range(len(numbers)), nproc, desc="frames", unit="frame")
        else:
            records = program.parallel_map(_simulate_still, numbers, nproc, desc="stills", unit="still")
    finally:
        _WORKER_SIMULATOR = None
    paths = [os.path.basename(image_path(out_dir, params.output.prefix, n)) for n in numbers]
    logger.info("%d %s in %.2f s (nproc %d)", len(records), "frames" if params.kind == "rotation" else "stills",
                time.perf_counter() - t0, nproc)

    truth = {
        "schema": TRUTH_SCHEMA,
        "kind": params.kind,
        "seed": int(params.seed),
        "images": paths,
        "removed_from_earlier_run": removed,
        "detector_kind": params.detector,
        "exposure_time_s": 0.0 if params.kind == "xfel" else params.exposure_time,
        "xfel": {
            "wavelength_jitter": params.xfel.wavelength_jitter,
            "flux_jitter": params.xfel.flux_jitter,
            "bandwidth": params.xfel.bandwidth,
            "photons_per_pulse": params.xfel.photons_per_pulse,
            "spectrum_samples": params.xfel.spectrum_samples,
            "scale": "scale = flux * overlap, overlap uniform in [scale_min, scale_max], flux gamma with mean 1 "
                     "and relative rms flux_jitter; header wavelength = the spectrum's weighted mean",
        } if params.kind == "xfel" else None,
        "unit_cell": list(params.unit_cell),
        "space_group": str(params.space_group),
        "d_min_A": sim.d_min,
        "intensity_model": _intensity_model_text(params.kind),
        "sensor": {
            "material": None if params.sensor.material == "none" else params.sensor.material,
            "thickness_mm": params.sensor.thickness,
            "carried_by_image_format": params.detector == "single",
            "mu_per_mm_xraylib": sim.sensor_mu_per_mm,
        },
        "air": {
            "pressure_kpa": params.air.pressure_kpa,
            "temperature_k": params.air.temperature_k,
            "mu_per_mm_xraylib": sim.air_mu_per_mm,
        },
        "beam_polarization_fraction_carried_by_format": params.detector == "multi",
        "detector_and_beam": detector_description(sim.detector, sim.beam),
        "truth_model": sim.truth.to_dict(),
        "bragg": {
            "enabled": bool(params.bragg),
            "intensity": params.bragg_model.intensity,
            "b_factor": params.bragg_model.b_factor if not params.absolute_scale.composition else None,
            "mean_intensity": (
                "intensity * eps(h) * sum_f2(d*)/sum_f2(0) * exp(-wilson_b d*^2/2) (xraylib FF_Rayl; acentric "
                "Wilson: exponential draws per Laue orbit)" if params.absolute_scale.composition
                else "intensity * eps(h) * exp(-b_factor d*^2/2) (exponential draws per Laue orbit)"
            ),
            "wilson_b": params.absolute_scale.wilson_b if params.absolute_scale.composition else None,
            "excitation_sigma_inv_A": params.bragg_model.excitation_sigma,
            "mosaicity_deg": params.bragg_model.mosaicity_deg,
            "partiality": "exp(-eps^2/(2 s^2)), s = excitation_sigma + d* tan(mosaicity/2)",
            "profile_sigma_px": params.bragg_model.profile_sigma_px,
            "predictor": (
                "own rotation geometry (Ewald crossings about the axis), rocking Gaussian sigma_phi = s/|d eps/d phi|, "
                "passage photons I_full * L, Lorentz L = |s0|/|d eps/d phi|"
                if params.kind == "rotation"
                else "dials StillsDeltaPsiReflectionPredictor"
            ),
        },
        "noise": bool(params.noise),
        "parameters_phil": phil_text,
    }
    if params.kind == "rotation":
        r = params.rotation
        U0, drift_axis, rate = sim._sweep_orientation()
        truth.update(
            n_images=len(records),
            sweep={
                "image_range": [r.first_image, r.first_image + r.n_images - 1],
                "phi_start_deg": r.phi_start,
                "oscillation_deg": r.oscillation,
                "rotation_axis": sim.rotation_axis.tolist(),
                "axis_carried_by_image_format": axis_carried,
                "sub_steps": r.sub_steps,
                "U0": U0.tolist(),
                "B": sim.truth.B.tolist(),
                "drift_axis": drift_axis.tolist(),
                "drift_deg": r.drift_deg,
                "scan_point_A": sim.scan_point_A().tolist(),
                "setting": "q_lab = R(axis, phi) A(phi) hkl; A(phi) = R(drift_axis, drift_deg (phi - phi_start) / "
                "(n_images oscillation)) U0 B; scan_point_A at the n_images + 1 frame boundaries",
            },
            frames=[ft.to_dict() for ft in records],
        )
    else:
        truth.update(n_stills=len(records), stills=[st.to_dict() for st in records])
    program.write_json(os.path.join(out_dir, "truth.json"), truth)
    if params.truth.map:
        t1 = time.perf_counter()
        grid, I = sim.truth_map(params.truth.ndiv, params.truth.subsample)
        h, k, l = grid.axes()
        program.write_npz(
            os.path.join(out_dir, "truth.npz"),
            schema=np.array(TRUTH_MAP_SCHEMA),
            I=I,
            h=h,
            k=k,
            l=l,
            ndiv=np.array(grid.ndiv),
            hkl_max=np.array(grid.hkl_max),
            unit_cell=np.array(params.unit_cell, dtype=np.float64),
            space_group=np.array(str(params.space_group)),
            d_min=np.array(sim.d_min),
            subsample=np.array(params.truth.subsample),
            pixel_mask=np.stack(sim.static_mask) if len({m.shape for m in sim.static_mask}) == 1 else np.array([]),
        )
        logger.info("Truth map %s (ndiv %s) in %.2f s", grid.shape, grid.ndiv, time.perf_counter() - t1)
    return {"n_images": len(records), "n_stills": len(records), "directory": out_dir, "images": paths, "simulator": sim}
