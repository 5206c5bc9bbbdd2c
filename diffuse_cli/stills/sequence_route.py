"""The sequence route: consecutive rotation frames processed as one sweep.

The sweep is built from the image files (scan from the headers' start angles
and the detected width) or from an imported ``.expt``; spots are found,
indexed, refined and integrated with DIALS's rotation defaults; the rows are
per image (reflections assigned to frames by their z centroid) and the
q-consistency uses the crystal rotated to each spot's observed angle.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time

import numpy as np

from diffuse_cli import program
from diffuse_cli.formats.stills_process import read_done_record, write_done_record
from diffuse_cli.stills.inputs import Item, distinct_images, one_line
from diffuse_cli.stills.isolation import seed_random_generators, still_log
from diffuse_cli.stills.records import (
    FAILED_VALIDATION,
    INDEXED,
    PARTIALITY_BINS,
    Config,
    empty_row,
    item_key,
)
from libtbx.utils import Sorry


def sequence_params_for(params):
    """stills_process parameters turned back to DIALS's rotation defaults."""
    p = copy.deepcopy(params)
    p.indexing.method = "fft3d"
    p.indexing.stills.indexer = "sequences"
    p.refinement.reflections.weighting_strategy.override = None
    p.refinement.reflections.outlier.algorithm = "auto"
    p.refinement.parameterisation.scan_varying = bool(params.sequence.scan_varying)
    if params.sequence.refine_detector:
        # stills_process fixes the detector and beam; a sweep determines them (DIALS's defaults)
        p.refinement.parameterisation.detector.fix = None
        p.refinement.parameterisation.beam.fix = ["in_spindle_plane", "wavelength"]
    p.integration.integrator = "3d"
    if params.output.integrated_shoeboxes:
        p.integration.debug.output = True
        p.integration.debug.separate_files = False
        p.integration.debug.delete_shoeboxes = False
    return p


def build_sequence_experiments(items: list[Item], params=None):
    """One ImageSequence experiment over the images of ``items``.

    Images named on the command line: the sweep is imported from the file
    template, with the scan rebuilt from each image's start angle and the
    detected width (headers that say width 0 while the angle advances give a
    proper sweep) and numbered by the files' image numbers. Images from a
    ``.expt`` (dials.import-ed or refined sweep): that experiment's models,
    its scan cut to the items' frames. Then dials.import's ``geometry.*``
    overrides in ``params`` are applied, as dials.import would.
    """
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    if items[0].source == "expt":
        imageset, beam, detector, goniometer, scan = _sequence_from_expt(items)
    else:
        imageset, scan = _sequence_from_files(items)
        beam, detector, goniometer = imageset.get_beam(), imageset.get_detector(), imageset.get_goniometer()
    imageset.set_beam(beam)
    imageset.set_detector(detector)
    imageset.set_goniometer(goniometer)
    imageset.set_scan(scan)
    if params is not None and getattr(params, "geometry", None) is not None:
        from dials.command_line.dials_import import ManualGeometryUpdater

        imageset = ManualGeometryUpdater(params)(imageset)
    return ExperimentList([Experiment(imageset=imageset, beam=imageset.get_beam(),
                                      detector=imageset.get_detector(),
                                      goniometer=imageset.get_goniometer(),
                                      scan=imageset.get_scan())])


def _sequence_from_files(items: list[Item]):
    """(ImageSequence, Scan) from consecutively numbered single-image files."""
    import dxtbx
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model import ScanFactory
    from dxtbx.sequence_filenames import template_regex

    template, first = template_regex(items[0].path)
    if template is None or first is None:
        raise Sorry(f"{items[0].path}: no image number in the file name; rename the "
                    "images or import them with dials.import and pass the .expt")
    # dxtbx writes a relative template relative to the .expt's own directory
    template = os.path.abspath(template)
    numbers = [template_regex(it.path)[1] for it in items]
    if numbers != list(range(first, first + len(items))):
        raise Sorry(f"{items[0].path}: sequence images are not consecutively numbered "
                    f"({numbers[0]}..{numbers[-1]}); give one sweep at a time")
    fmt = dxtbx.load(items[0].path)
    header_scan = fmt.get_scan()
    exposure = header_scan.get_exposure_times()[0] if header_scan is not None else 0.0
    # image numbers are the files' numbers, as dials.import numbers them
    scan = ScanFactory.make_scan(
        (first, first + len(items) - 1),
        [exposure] * len(items),
        (items[0].osc_start, items[0].osc_width),
        {n: 0.0 for n in numbers},
        deg=True,
    )
    imageset = ImageSetFactory.make_sequence(
        template, numbers, format_class=type(fmt), beam=fmt.get_beam(),
        detector=fmt.get_detector(), goniometer=fmt.get_goniometer(), scan=scan,
    )
    return imageset, scan


def _sequence_from_expt(items: list[Item]):
    """(ImageSequence, beam, detector, goniometer, scan) of ``items`` from their .expt."""
    from dxtbx.imageset import ImageSequence, ImageSetFactory
    from dxtbx.model.experiment_list import ExperimentList

    from diffuse_cli.frames import FrameRef

    images = distinct_images(ExperimentList.from_file(items[0].path, check_format=True))
    picked = [images[it.frame] for it in items]
    expt = picked[0][0]
    if not all(e is expt for e, _ in picked) or not isinstance(expt.imageset, ImageSequence):
        raise Sorry(f"{items[0].path}: the sequence route needs the frames of one sweep "
                    "(one ImageSequence experiment)")
    frames = FrameRef.from_experiment(expt)
    first = frames.array_index_of_imageset_index(picked[0][1])
    n = len(picked)
    # Scan slicing counts frames from the scan's own first frame
    k0 = first - frames.array_range[0]
    scan = expt.scan[k0 : k0 + n]
    first_image, last_image = FrameRef.from_scan(scan).image_range
    numbers = list(range(first_image, last_image + 1))
    source = expt.imageset
    imageset = ImageSetFactory.make_sequence(
        source.get_template(), numbers, format_class=source.get_format_class(),
        beam=expt.beam, detector=expt.detector, goniometer=expt.goniometer, scan=scan,
        format_kwargs=source.params(),
    )
    return imageset, expt.beam, expt.detector, expt.goniometer, scan


def _rotated_A(expt, frame_phi_deg: np.ndarray) -> np.ndarray:
    """Lab-frame setting matrices S R(φ) F A(φ) (n, 3, 3) at angles φ (degrees)."""
    from diffuse_cli.frames import FrameRef

    frames = FrameRef.from_experiment(expt)
    return frames.setting_matrix(expt.crystal, expt.goniometer, frames.z_of_phi(frame_phi_deg))


def process_sequence_unit(items: list[Item], config: Config) -> list[tuple[dict, list[int] | None]]:
    """Import → find spots → index → refine → integrate a sweep; one row per image."""
    from dials.algorithms.indexing.indexer import Indexer
    from dials.algorithms.integration.integrator import create_integrator
    from dials.algorithms.profile_model.factory import ProfileModelFactory
    from dials.array_family import flex

    params = config.params
    directory = config.directory
    tag = f"{items[0].tag}_sequence"
    rows = [empty_row(it) for it in items]
    keys = [item_key(it, config.fingerprint) for it in items]
    group_key = hashlib.sha256("".join(keys).encode()).hexdigest()
    if not config.overwrite:
        record = read_done_record(directory, tag, group_key)
        if record is not None:
            return [(dict(r, resumed=True), h) for r, h in zip(record["rows"], record["hists"])]
    t0 = time.perf_counter()
    seed_random_generators(tag)
    sp = sequence_params_for(params)
    stage_name = "import"
    outputs: list[str] = []
    hists: list = [None] * len(items)
    try:
        with still_log(os.path.join(directory, "logs", f"{tag}.log")):
            experiments = build_sequence_experiments(items, params)
            stage_name = "spot finding"
            strong = flex.reflection_table.from_observations(experiments, sp)
            stage_name = "indexing"
            idxr = Indexer.from_parameters(strong, experiments, params=sp)
            idxr.index()
            experiments, indexed = idxr.refined_experiments, idxr.refined_reflections
            if sp.refinement.parameterisation.scan_varying:
                stage_name = "refinement"
                from dials.algorithms.refinement import RefinerFactory

                refiner = RefinerFactory.from_parameters_data_experiments(sp, indexed, experiments)
                refiner.run()
                experiments = refiner.get_experiments()
            stage_name = "integration"
            experiments = ProfileModelFactory.create(sp, experiments, indexed)
            predicted = flex.reflection_table.from_predictions_multi(
                experiments, dmin=sp.prediction.d_min, dmax=sp.prediction.d_max,
                margin=sp.prediction.margin, force_static=sp.prediction.force_static,
            )
            predicted.match_with_reference(indexed)
            integrated = create_integrator(sp, experiments, predicted).integrate()
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:
        if not params.dispatch.squash_errors:
            raise
        for row in rows:
            row["reason"] = f"{stage_name}: {one_line(e)}"
        integrated = None
    if integrated is not None:
        expt = experiments[0]
        expt.identifier = tag
        for table in (integrated, indexed):
            for k in list(table.experiment_identifiers().keys()):
                del table.experiment_identifiers()[k]
            table.experiment_identifiers()[0] = tag
        uc = expt.crystal.get_unit_cell().parameters()
        # per-frame numbers: frame of each reflection from its z centroid
        from diffuse_cli.frames import FrameRef

        frames = FrameRef.from_experiment(expt)
        z_idx = frames.array_index_of_z(indexed["xyzobs.px.value"].parts()[2].as_numpy_array())
        z_int = frames.array_index_of_z(integrated["xyzcal.px"].parts()[2].as_numpy_array())
        z_strong = frames.array_index_of_z(strong["xyzobs.px.value"].parts()[2].as_numpy_array())
        frame_of_row = list(frames.array_indices())  # rows are the scan's frames in order
        phi_obs = np.rad2deg(indexed["xyzobs.mm.value"].parts()[2].as_numpy_array())
        # q-consistency with the rotated model at each spot's observed angle
        lab = np.zeros((len(indexed), 3))
        panels = indexed["panel"].as_numpy_array()
        xyz = indexed["xyzobs.mm.value"].as_numpy_array()
        for ip in np.unique(panels):
            sel = panels == ip
            mm = flex.vec2_double(flex.double(xyz[sel, 0].copy()), flex.double(xyz[sel, 1].copy()))
            lab[sel] = expt.detector[int(ip)].get_lab_coord(mm).as_numpy_array()
        s1 = lab / (np.linalg.norm(lab, axis=1, keepdims=True) * expt.beam.get_wavelength())
        hkl = indexed["miller_index"].as_vec3_double().as_numpy_array()
        A_lab = _rotated_A(expt, phi_obs)
        q_model = np.einsum("nij,nj->ni", A_lab, hkl)
        dq = np.linalg.norm(s1 - np.asarray(expt.beam.get_s0()) - q_model, axis=1)
        from dials.algorithms.indexing.stills_indexer import calc_2D_rmsd_and_displacements

        if "partiality" in integrated:
            part = integrated["partiality"].as_numpy_array()
        else:
            part = np.zeros(0)
        stills_dir = os.path.join(directory, "stills")
        os.makedirs(stills_dir, exist_ok=True)
        expt_rel = os.path.join("stills", f"{tag}_integrated.expt")
        refl_rel = os.path.join("stills", f"{tag}_integrated.refl")
        from dxtbx.model.experiment_list import ExperimentList

        program.write_experiments(os.path.join(directory, expt_rel), ExperimentList([expt]))
        program.write_reflections(os.path.join(directory, refl_rel), integrated)
        outputs = [expt_rel, refl_rel]
        for j, row in enumerate(rows):
            f_idx = z_idx == frame_of_row[j]
            f_int = z_int == frame_of_row[j]
            # reflections used in refinement have predictions (xyzcal) to compare with
            sub = indexed.select(flex.bool(f_idx) & indexed.get_flags(indexed.flags.used_in_refinement))
            rmsd = calc_2D_rmsd_and_displacements(sub)[0] if len(sub) and "xyzcal.px" in sub else None
            pj = part[f_int] if part.size else np.zeros(0)
            hists[j] = np.histogram(np.clip(pj, 0, 1), bins=PARTIALITY_BINS)[0].tolist() if pj.size else None
            row.update({
                "status": INDEXED,
                "reason": "",
                "n_spots": int(np.sum(z_strong == frame_of_row[j])),
                "n_indexed": int(f_idx.sum()),
                "n_integrated": int(f_int.sum()),
                "integrated": True,
                "n_lattices": len(experiments),
                "space_group": str(expt.crystal.get_space_group().info()),
                "a": uc[0], "b": uc[1], "c": uc[2], "alpha": uc[3], "beta": uc[4], "gamma": uc[5],
                "rmsd_px": float(rmsd) if rmsd is not None else None,
                "delta_q_mean": float(dq[f_idx].mean()) if f_idx.any() else None,
                "delta_q_max": float(dq[f_idx].max()) if f_idx.any() else None,
                "mean_partiality": float(pj.mean()) if pj.size else None,
                "partiality_model": "dials",
                "experiments": expt_rel,
                "reflections": refl_rel,
            })
            threshold = params.q_consistency.max_mean_delta_q
            if threshold is not None and row["delta_q_mean"] is not None and row["delta_q_mean"] > threshold:
                row["status"] = FAILED_VALIDATION
                row["reason"] = f"q-consistency: mean |dq| {row['delta_q_mean']:.5f} > {threshold}"
    elapsed = round(time.perf_counter() - t0, 3)
    for row in rows:
        row["time_s"] = elapsed
    write_done_record(directory, tag, group_key, outputs, rows=rows, hists=hists)
    return list(zip(rows, hists))
