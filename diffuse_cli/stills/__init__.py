"""Per-still Bragg processing for ``diffuse.stills_process``.

Drives DIALS stills processing through its Python API
(:class:`dials.command_line.stills_process.Processor`), one still at a time,
and adds what a diffuse pipeline needs around it. One module per job:

* :mod:`.inputs`: image files, directories, globs, multi-image containers
  (HDF5/NeXus: one item per frame) and imported ``.expt`` files become a list
  of :class:`~.inputs.Item` (one per image, each with a unique ``tag``), and
  each image's **route**. Zero-oscillation images are stills. Images whose
  headers give an oscillation width > 0, or whose headers say width 0 while
  the goniometer angle advances by a constant step from one image to the next
  (the staphylococcal nuclease frames), are *rotation frames*: they go either
  through the ``sequence`` route or are processed as stills of width ``Δφ``
  (route ``rotation_as_stills``) with the stills indexer's Ewald-proximity and
  σ_b limits raised to the values in ``rotation_frames`` (see
  docs/stills_process.md for which and why);
* :mod:`.records`: the summary row, the **resume** keys (a hash of the input
  file: path, size, mtime, frame; and of the effective parameters) and the
  done-record written atomically after a still's outputs;
* :mod:`.isolation`: each still's own log file and random seed, so that its
  result does not depend on the process that ran it;
* :mod:`.still_route`: one still through DIALS, with deterministic experiment
  identifiers (the tag), stills ``partiality`` and **q-consistency**
  validation (``Δq = |q_obs − A·h|``, Å⁻¹, with ``q_obs = s1 − s0`` of the
  observed centroid and ``A = crystal.get_A()``); per-still outputs written
  atomically, tagged by image name;
* :mod:`.sequence_route`: consecutive rotation frames imported as one sweep,
  spots found, indexed, refined and integrated as rotation data; one row per
  image;
* :mod:`.drivers`: serial, local processes (``nproc``) and MPI
  (``mp.method=mpi``), all calling the same per-unit function, so their
  per-still results are identical; the summary and the combined
  ``.expt``/``.refl`` pair; the XFEL mode's integration sample
  (``integration.sample``: which stills are integrated, topped up when sample
  stills fail). QC plots: :mod:`diffuse_cli.qc_plots`.

Imports go one way: inputs → records → isolation → still_route,
sequence_route → drivers.
"""
