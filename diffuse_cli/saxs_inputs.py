"""SAXS/WAXS inputs of ``diffuse.azimuthal_fit`` without ``dials.import``.

* Geometry from a pyFAI ``.poni`` file (:func:`load_poni`), turned into a
  single-panel dxtbx detector and beam (:func:`models_from_integrator`) so
  the pixels' |q|, χ, solid angle and polarization come from the same code
  as for DIALS-imported images. :func:`poni_from_models` / :func:`write_poni`
  go the other way (dxtbx → pyFAI, through ``pyfai_glue.pyfai_geometry``).
* Images from EDF (fabio, one or more frames per file), HDF5/NeXus (h5py:
  a 2D image or a 3D stack) or anything else fabio reads (CBF, TIFF...),
  one file at a time (no grouping into sequences): :class:`SaxsFile`.
* Masks from EDF/HDF5/TIFF or NumPy ``.npy``: :func:`read_saxs_mask`.

Frames (see docs/azimuthal_fit.md): pyFAI's axes (dim1 = slow, dim2 = fast,
along the beam) are put in the DIALS laboratory frame as slow → −y,
fast → +x, beam → −z (a reflection: pyFAI's frame is left-handed in DIALS
terms), so for an untilted detector fast = +x, slow = −y, as dxtbx models
most area detectors, and χ_pyFAI = −χ. Lengths: pyFAI metres, dxtbx mm.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
from libtbx.utils import Sorry

logger = logging.getLogger("diffuse.azimuthal_fit")

#: pyFAI's (dim1 = slow, dim2 = fast, along-beam) axes as DIALS lab vectors.
PYFAI_AXES_IN_LAB = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])

HDF5_EXT = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5")
IMAGE_EXT = (".edf", ".edf.gz", ".edf.bz2", ".tif", ".tiff") + HDF5_EXT
MASK_EXT = (".npy",)


def is_hdf5(path) -> bool:
    return str(path).lower().endswith(HDF5_EXT)


# ------------------------------------------------------------------ geometry


def load_poni(path):
    """A pyFAI AzimuthalIntegrator from a ``.poni`` file (Sorry if unreadable)."""
    import pyFAI

    if not os.path.exists(path):
        raise Sorry(f"File not found: {path}")
    try:
        ai = pyFAI.load(path)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise Sorry(f"{path}: not a pyFAI .poni file ({e})")
    if not ai.wavelength:
        raise Sorry(f"{path}: the .poni file gives no Wavelength")
    return ai


def models_from_integrator(ai, shape=None, polarization_fraction=0.99, trusted_range=(-1.0, 1e12)):
    """(dxtbx Detector, Beam) placing every pixel where pyFAI ``ai`` does.

    shape: (n_slow, n_fast) of the images (default: the pyFAI detector's).
    polarization_fraction: dxtbx's fraction of the beam polarised with its
    E-vector along lab x (horizontal), polarization normal (0, 1, 0); pyFAI's
    ``polarization_factor`` = 2·fraction − 1.
    The panel is flat: its origin and axes come from pyFAI's own
    ``calc_pos_zyx`` at pixel corners (0, 0), (0, 1) and (1, 0).
    """
    from dxtbx.model import BeamFactory, DetectorFactory

    if shape is None:
        shape = ai.detector.max_shape
    if shape is None:
        raise Sorry("the .poni detector has no shape: give images to take it from")
    n_slow, n_fast = int(shape[0]), int(shape[1])
    # pixel index i (centre at i + 0.5 in pyFAI): −0.5 is the corner
    z, y, x = ai.calc_pos_zyx(d1=np.array([-0.5, -0.5, 0.5]), d2=np.array([-0.5, 0.5, -0.5]))
    pts = np.stack([np.ravel(y), np.ravel(x), np.ravel(z)], axis=1) @ PYFAI_AXES_IN_LAB * 1e3  # mm
    origin, fast, slow = pts[0], pts[1] - pts[0], pts[2] - pts[0]
    px_fast, px_slow = np.linalg.norm(fast), np.linalg.norm(slow)
    det = DetectorFactory.make_detector(
        "PAD",
        tuple(fast / px_fast),
        tuple(slow / px_slow),
        tuple(origin),
        (float(px_fast), float(px_slow)),
        (n_fast, n_slow),
        tuple(trusted_range),
    )
    beam = BeamFactory.make_polarized_beam(
        sample_to_source=(0.0, 0.0, 1.0),
        wavelength=float(ai.wavelength) * 1e10,
        polarization=(0.0, 1.0, 0.0),
        polarization_fraction=float(polarization_fraction),
    )
    return det, beam


def poni_from_models(detector, beam) -> dict:
    """pyFAI geometry (metres, radians) of a single-panel dxtbx detector."""
    from diffuse_cli import pyfai_glue

    if len(detector) != 1:
        raise ValueError(f"a .poni holds one flat panel; the detector has {len(detector)}")
    return pyfai_glue.pyfai_geometry(detector[0], beam)


def write_poni(path, detector, beam) -> None:
    """A pyFAI ``.poni`` file for a single-panel dxtbx detector + beam."""
    import pyFAI.azimuthalIntegrator
    import pyFAI.detectors

    p = poni_from_models(detector, beam)
    n_fast, n_slow = detector[0].get_image_size()
    det = pyFAI.detectors.Detector(pixel1=p["pixel1"], pixel2=p["pixel2"], max_shape=(n_slow, n_fast))
    ai = pyFAI.azimuthalIntegrator.AzimuthalIntegrator(
        dist=p["dist"], poni1=p["poni1"], poni2=p["poni2"], rot1=p["rot1"], rot2=p["rot2"], rot3=p["rot3"],
        detector=det, wavelength=p["wavelength"],
    )
    if os.path.exists(path):
        os.remove(path)  # pyFAI appends to an existing file
    ai.write(path)


# ------------------------------------------------------------------ images


def _find_stack(h5, dataset=None):
    """The image dataset: ``dataset`` if given, else /entry*/measurement/*,
    /entry*/data/data, then the first ≥2D numeric dataset found."""
    import h5py

    if dataset:
        if dataset not in h5 or not isinstance(h5[dataset], h5py.Dataset):
            raise Sorry(f"{h5.filename}: no dataset {dataset} (input.hdf5_dataset)")
        return h5[dataset]
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3) and obj.dtype.kind in "iuf" and min(obj.shape[-2:]) > 1:
            found.append(name)

    h5.visititems(visit)
    for pattern in (r"^entry[^/]*/measurement/", r"^entry[^/]*/data/data$", r"^entry[^/]*/"):
        for name in found:
            if re.search(pattern, name):
                return h5[name]
    if found:
        return h5[found[0]]
    raise Sorry(f"{h5.filename}: no 2D or 3D image dataset (give input.hdf5_dataset=)")


_EXPOSURE_KEYS = ("ExposureTime", "exposure_time", "count_time", "acq_expo_time", "Exposure_time", "exposure")


def _number(value):
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        m = re.match(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", value)
        if not m:
            raise ValueError(value)
        return float(m.group(1))
    return float(value)


class SaxsFile:
    """One image file read without dxtbx, with the imageset methods the
    azimuthal_fit driver uses (``get_path``, ``len``, ``get_raw_data``).

    EDF/TIFF/CBF through fabio (all frames of the file), HDF5 through h5py
    (a 3D dataset is a stack of frames along its first axis).
    """

    def __init__(self, path, hdf5_dataset=None):
        self.path = str(path)
        self.hdf5_dataset = hdf5_dataset
        if not os.path.exists(self.path):
            raise Sorry(f"File not found: {self.path}")
        if is_hdf5(self.path):
            import h5py

            try:
                with h5py.File(self.path, "r") as h5:
                    ds = _find_stack(h5, hdf5_dataset)
                    self.dataset = ds.name
                    self.shape = ds.shape[-2:]
                    self.n_frames = ds.shape[0] if ds.ndim == 3 else 1
            except OSError as e:
                raise Sorry(f"{self.path}: not a readable HDF5 file ({e})")
        else:
            img = self._fabio()
            self.shape = img.data.shape
            self.n_frames = max(1, int(getattr(img, "nframes", 1)))

    def _fabio(self):
        import fabio

        try:
            return fabio.open(self.path)
        except (OSError, ValueError, IOError) as e:
            raise Sorry(f"{self.path}: not an image fabio reads ({e})")

    def __len__(self):
        return self.n_frames

    def get_path(self, index=0):
        return self.path

    def get_raw_data(self, index=0):
        return (self.frame(index),)

    def frame(self, index=0) -> np.ndarray:
        """Frame ``index`` as a 2D numpy array (slow, fast)."""
        if is_hdf5(self.path):
            import h5py

            with h5py.File(self.path, "r") as h5:
                ds = h5[self.dataset]
                return np.asarray(ds[index] if ds.ndim == 3 else ds[()])
        img = self._fabio()
        if index:
            img = img.getframe(index)
        return np.asarray(img.data)

    def header(self, index=0) -> dict:
        """EDF/fabio header of frame ``index`` (empty for HDF5)."""
        if is_hdf5(self.path):
            return {}
        img = self._fabio()
        if index:
            img = img.getframe(index)
        return dict(img.header)

    def header_value(self, index, key) -> float:
        """A number for ``series.header_key``: an EDF header key; in HDF5 a
        dataset (path from the file root or the image's entry, or any
        dataset of that name; scalar or one value per frame) or an attribute
        of the image dataset or one of its groups. Sorry when absent."""
        if not is_hdf5(self.path):
            head = self.header(index)
            if key not in head:
                raise Sorry(f"{self.path}: no header key '{key}' (series.header_key)")
            try:
                return _number(head[key])
            except ValueError:
                raise Sorry(f"{self.path}: header {key} = {head[key]!r} is not a number")
        return self._hdf5_value(index, key)

    def _hdf5_value(self, index, key):
        import h5py

        with h5py.File(self.path, "r") as h5:
            entry = "/" + self.dataset.strip("/").split("/")[0]
            value = None
            for name in (key, f"{entry}/{key}"):
                if name in h5 and isinstance(h5[name], h5py.Dataset):
                    value = h5[name][()]
                    break
            if value is None:
                group = h5[self.dataset]
                while value is None:
                    if key in group.attrs:
                        value = group.attrs[key]
                    elif group.name == "/":
                        break
                    else:
                        group = group.parent
            if value is None:
                hits = []
                h5.visititems(lambda n, o: hits.append(n) if isinstance(o, h5py.Dataset) and n.split("/")[-1] == key else None)
                if hits:
                    value = h5[hits[0]][()]
        if value is None:
            raise Sorry(f"{self.path}: no dataset or attribute '{key}' (series.header_key)")
        arr = np.atleast_1d(value)
        if arr.size == self.n_frames and self.n_frames > 1:
            arr = arr[index : index + 1]
        if arr.size != 1:
            raise Sorry(f"{self.path}: {key} holds {arr.size} values for {self.n_frames} frame(s)")
        try:
            return _number(arr.reshape(-1)[0])
        except ValueError:
            raise Sorry(f"{self.path}: {key} = {arr.reshape(-1)[0]!r} is not a number")

    def exposure_time(self, index=0):
        """Exposure time (s) from the header, or None."""
        for key in _EXPOSURE_KEYS:
            try:
                t = self.header_value(index, key)
            except Sorry:
                continue
            if t > 0:
                return t
        return None


def read_saxs_mask(path, shape, nonzero_is_masked=True, hdf5_dataset=None) -> np.ndarray:
    """A mask file as a 2D bool array, **True = usable** (our convention).

    EDF/TIFF/HDF5 masks (pyFAI, ID02, Fit2D) mark bad pixels nonzero, so by
    default usable = (value == 0); ``nonzero_is_masked=False`` reads nonzero
    as usable. A ``.npy`` file of dtype bool is taken as True = usable; a
    numeric ``.npy`` follows ``nonzero_is_masked`` like the images.
    """
    if not os.path.exists(path):
        raise Sorry(f"File not found: {path}")
    if str(path).lower().endswith(".npy"):
        from diffuse_cli.formats.masks import read_mask_npy

        m = read_mask_npy(path)
        usable = m if m.dtype == bool else ((m == 0) if nonzero_is_masked else (m != 0))
    else:
        m = SaxsFile(path, hdf5_dataset if is_hdf5(path) else None).frame(0)
        usable = (m == 0) if nonzero_is_masked else (m != 0)
    if usable.shape != tuple(shape):
        raise Sorry(f"{path}: mask shape {usable.shape} differs from the images {tuple(shape)}")
    return np.asarray(usable, dtype=bool)


# ------------------------------------------------------------------ experiments


class SaxsExperiment:
    """Detector, beam and (no) crystal of a SAXS image, as the driver expects."""

    def __init__(self, detector, beam, imageset):
        self.detector = detector
        self.beam = beam
        self.crystal = None
        self.imageset = imageset


def saxs_images(params):
    """[(SaxsFile, frame, SaxsExperiment)] for ``input.image`` files with the
    ``input.poni`` geometry, file by file and frame by frame; and the user
    mask (tuple of one 2D bool array, True = usable) or None."""
    inp = params.input
    if not inp.poni:
        raise Sorry("images read without dials.import need a pyFAI geometry: give calib.poni (input.poni=)")
    ai = load_poni(inp.poni)
    files = [SaxsFile(p, inp.hdf5_dataset) for p in inp.image]
    shapes = {f.shape for f in files}
    if len(shapes) > 1:
        raise Sorry(f"images of different shapes {sorted(shapes)}: run them separately")
    shape = files[0].shape
    max_shape = ai.detector.max_shape
    if max_shape is not None and tuple(max_shape) != tuple(shape):
        raise Sorry(f"{inp.poni}: detector shape {tuple(max_shape)} differs from the images {tuple(shape)}")
    trusted = (inp.saxs.trusted_min, 1e12)
    detector, beam = models_from_integrator(ai, shape, inp.saxs.polarization_fraction, trusted)
    logger.info("Geometry from %s: distance %.4g mm, PONI (%.4g, %.4g) mm, rot (%.4g, %.4g, %.4g) rad, λ = %.5g Å",
                inp.poni, ai.dist * 1e3, ai.poni1 * 1e3, ai.poni2 * 1e3, ai.rot1, ai.rot2, ai.rot3, ai.wavelength * 1e10)
    mask = None
    if inp.mask and not inp.mask.lower().endswith((".pickle", ".pkl", ".mask")):  # else a DIALS mask
        mask = (read_saxs_mask(inp.mask, shape, inp.saxs.mask_nonzero_is_masked, inp.hdf5_dataset),)
    out = []
    for f in files:
        expt = SaxsExperiment(detector, beam, f)
        out += [(f, i, expt) for i in range(len(f))]
    return out, mask


# ------------------------------------------------------------------ command line

#: Parameters of the ``input`` scope of diffuse.azimuthal_fit for these inputs.
INPUT_PHIL = """
  poni = None
    .type = path
    .help = "pyFAI geometry (.poni: distance, PONI, rot1-3, pixel size, wavelength) "
            "for images read without dials.import (EDF, HDF5, anything fabio reads). "
            "A .poni given as a plain argument lands here."
  image = None
    .type = path
    .multiple = True
    .help = "Image files read with the .poni geometry, file by file (no dxtbx "
            "sequences). With a .poni, plain image arguments land here."
  hdf5_dataset = None
    .type = str
    .help = "HDF5 dataset of the image (stack), e.g. /entry_0000/measurement/data. "
            "Default: the first 2D/3D dataset under entry*/measurement, then "
            "entry*/data/data, then any."
  cif = None
    .type = path
    .help = "CIF with a unit cell: hkl= rings at q = 2π/d(hkl) when there is no "
            "crystal model. A .cif given as a plain argument lands here."
  saxs {
    polarization_fraction = 0.99
      .type = float(value_min=0, value_max=1)
      .help = "Fraction of the beam polarised horizontally (E along lab x) for "
              "images with a .poni; pyFAI polarization_factor = 2*fraction - 1."
    trusted_min = -1
      .type = float
      .help = "Pixels with value <= this are unusable (ID02/EDF dummy values)."
    mask_nonzero_is_masked = True
      .type = bool
      .help = "EDF/HDF5/TIFF/numeric .npy masks: nonzero = masked (pyFAI, ID02, "
              "Fit2D). Set False for masks with nonzero = usable. A bool .npy "
              "is always True = usable."
  }
"""

_DIALS_MASK = (".pickle", ".pkl", ".mask")
_NOT_IMAGES = (".expt", ".json", ".refl", ".phil", ".npz", ".cif", ".poni", ".npy", ".csv") + _DIALS_MASK


def route_args(args) -> list[str]:
    """Plain arguments to PHIL: ``.poni`` → input.poni, ``.cif`` → input.cif,
    ``.npy`` → input.mask; with a .poni (plain or ``poni=``), every other
    plain file is an image (``input.image``), except one whose name contains
    "mask" (→ input.mask). EDF files always need a .poni."""
    from diffuse_cli import program

    has_poni = any(a.lower().endswith(".poni") or re.match(r"(input\.)?poni=", a) for a in args)

    def image(a):
        low = a.lower()
        if low.endswith(_NOT_IMAGES):
            return False
        return (has_poni and os.path.isfile(a)) or low.endswith((".edf", ".edf.gz", ".edf.bz2"))

    def mask(a):
        low = os.path.basename(a).lower()
        return low.endswith(MASK_EXT) or (image(a) and "mask" in low)

    return program.plain_args_to_phil(args, [
        (lambda a: a.lower().endswith(".poni"), "input.poni"),
        (lambda a: a.lower().endswith(".cif"), "input.cif"),
        (mask, "input.mask"),
        (image, "input.image"),
    ])
