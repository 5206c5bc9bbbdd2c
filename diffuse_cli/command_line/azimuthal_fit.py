"""Radial and azimuthal profiles of diffraction images, with peak fits.

diffuse.azimuthal_fit bins the pixels of every image in the experiments
(any DIALS-readable format, single or multi-panel) into:

- a radial profile I(|q|), the full circle and optionally azimuthal sectors;
- azimuthal profiles I(χ) in a band of |q| around each requested q= (or d=,
  d_star=) value, or around reflections hkl= (|q| from the crystal model);

fits them (pseudo-Voigt + linear background on radial profiles in
fit.radial_range; pseudo-Voigt and Maier–Saupe on azimuthal profiles, with the
order parameter S = <P2(cos θ)>), and writes per-image profile CSVs, SasView
1D files, fit plots, q-space maps, one tidy CSV of all fits and summary plots
of peak position, width and S against a series variable (field, time,
temperature...) read from image headers, file names or a CSV file.

Units: q= and every q_inv_angstrom column are 4π sinθ/λ = 2π/d (Å⁻¹), as in
SAXS and pyFAI's q_A^-1. d_star= is DIALS' |q| = 1/d (Å⁻¹); d= is in Å.
χ = atan2(s1_y, s1_x) in the DIALS laboratory frame (degrees; pyFAI's chi is
its mirror image). A mask is a DIALS mask file (pickled tuple of flex.bool,
True = usable). Pixels outside the detector's trusted range are never used.

A merged map from diffuse.merge (merged.npz) gives I(|q|) of the 3D data.

Examples::

  # full radial profile of every image
  diffuse.azimuthal_fit imported.expt

  # azimuthal profile of the ring at q = 1.8 Å⁻¹ (2π/d), with a mask
  diffuse.azimuthal_fit imported.expt mask.pickle q=1.8 output.directory=az

  # the same ring given as d = 3.49 Å, narrower band, Maier–Saupe only
  diffuse.azimuthal_fit imported.expt d=3.49 q_tolerance=0.01 \\
      fit.azimuthal_models=maier_saupe

  # azimuthal profile through the 1 1 0 reflection, radial sectors
  diffuse.azimuthal_fit indexed.expt hkl=1,1,0 \\
      radial.sector=0,30 radial.sector=90,30

  # a field series: value from the file name, fit the water ring radially
  diffuse.azimuthal_fit series.expt q=1.8 'series.filename_pattern=_(\\d+)mT' \\
      series.name=field_mT fit.radial_range=1.5,2.4

  # temperature from a CSV (columns image,temperature), time from headers
  diffuse.azimuthal_fit series.expt q=1.8 series.csv=temps.csv series.name=temperature
  diffuse.azimuthal_fit series.expt q=1.8 series.header_key=timestamp series.name=time_s

  # radial profile of a merged 3D map
  diffuse.azimuthal_fit merged.npz
"""

from __future__ import annotations

import csv
import datetime
import logging
import os
import pickle
import re
import sys

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment before libtbx)
from diffuse_cli import azimuthal as az
from diffuse_cli import dials_compat
from diffuse_cli import profile_fitting as pf
from diffuse_cli import program

from libtbx.utils import Sorry

logger = logging.getLogger("diffuse.azimuthal_fit")

phil_scope = program.parse_phil(
    """
input {
  mask = None
    .type = path
    .help = "DIALS mask (pickled tuple of flex.bool, True = usable) applied to "
            "every image. A .pickle or .mask file given as a plain argument lands here."
  merged = None
    .type = path
    .help = "diffuse.merge merged.npz: write the radial profile of the 3D map. "
            "A .npz file given as a plain argument lands here."
}
q = None
  .type = floats(value_min=0)
  .help = "|q| values (Å⁻¹, q_inv_angstrom = 4π sinθ/λ = 2π/d) for azimuthal profiles."
d_star = None
  .type = floats(value_min=0)
  .help = "The same, given as d* = 1/d (Å⁻¹, DIALS convention)."
d = None
  .type = floats(value_min=0)
  .help = "The same, given as d spacings (Å)."
hkl = None
  .type = ints(size=3)
  .multiple = True
  .help = "Reflections for azimuthal profiles; |q| from the crystal model."
q_tolerance = 0.02
  .type = float(value_min=0)
  .help = "Half width of the |q| band of an azimuthal profile (Å⁻¹, q_inv_angstrom)."
radial {
  n_bins = 500
    .type = int(value_min=2)
  q_min = None
    .type = float
    .help = "Å⁻¹ (q_inv_angstrom). Default: the smallest |q| of a usable pixel."
  q_max = None
    .type = float
    .help = "Å⁻¹ (q_inv_angstrom). Default: the largest |q| of a usable pixel."
  sector = None
    .type = floats(size=2)
    .multiple = True
    .help = "Azimuthal sector centre,width (degrees; χ in the DIALS lab frame, "
            "full width). Repeat for more sectors; each wraps across ±180°."
}
azimuthal {
  n_bins = 180
    .type = int(value_min=8)
    .help = "χ bins over the full circle."
}
corrections {
  apply = False
    .type = bool
    .help = "Multiply each pixel by diffuse.correct's multipliers (solid angle per"
            "microsteradian, polarization, sensor efficiency, air; docs/corrections.md)"
            "and divide by the exposure time: profiles in photons/µsr/s instead of"
            "raw counts per pixel. Poisson errors follow the counts."
}
error_model = *poisson spread
  .type = choice
  .help = "poisson: sigma(mean) = sqrt(sum)/n (raw counts); spread: std/sqrt(n) "
          "of the pixels in a bin (for data that are not counts)."
fit {
  azimuthal_models = *pseudo_voigt *maier_saupe
    .type = choice(multi=True)
    .help = "Models fitted to every azimuthal profile."
  pair = True
    .type = bool
    .help = "Pseudo-Voigt in χ has a partner peak 180° away (apolar order)."
  centre = None
    .type = float
    .help = "Fix the Maier-Saupe director χ0 (degrees) instead of fitting it."
  radial_range = None
    .type = floats(size=2)
    .help = "Fit a pseudo-Voigt + linear background to every radial profile "
            "in this q range (Å⁻¹, q_inv_angstrom)."
  smooth = 5
    .type = int(value_min=0)
    .help = "Moving-average window (bins) for starting values only; fits and "
            "R² always use the unsmoothed profile."
}
series {
  name = series
    .type = str
    .help = "Name of the series variable (CSV column and plot label)."
  header_key = None
    .type = str
    .help = "Take the value from the image header line with this key (text "
            "headers: CBF, SMV...). Special keys: timestamp (ISO date in the "
            "header, seconds after the first image), exposure_time, wavelength, distance."
  filename_pattern = None
    .type = str
    .help = "Regular expression with one group, matched against the file name; "
            "the group is the value (e.g. '_(\\\\d+)mT')."
  csv = None
    .type = path
    .help = "CSV with columns image,<value>: image is the file name (with or "
            "without directory and extension)."
}
maps {
  enable = True
    .type = bool
    .help = "Write q-space pictures (detector projected to (q_x, q_y), and the "
            "(|q|, χ) cake) as PNG, with the arrays as .npz."
  n_bins = 500
    .type = int(value_min=16)
    .help = "Pixels per side of the (q_x, q_y) map; |q| bins of the cake."
  rings = None
    .type = floats(value_min=0)
    .help = "Draw rings at these |q| (Å⁻¹, q_inv_angstrom). Default: the q= values."
  fill_centrosymmetric = False
    .type = bool
    .help = "Display only: fill masked pixels from their centrosymmetric partner "
            "(same |q|, χ + 180°). The .npz keeps the unfilled arrays too."
}
output {
  directory = azimuthal_fit
    .type = path
  sasview = True
    .type = bool
    .help = "Also write radial profiles as 3-column text (q, I, sigma) for SasView."
  plots = True
    .type = bool
    .help = "Per-image profile/fit plots and summary plots."
}
""",
    program="azimuthal_fit",
)

_MASK_EXT = (".pickle", ".pkl", ".mask")


def _split_args(args):
    """Turn plain .npz / mask arguments into input.merged= / input.mask=."""
    return program.plain_args_to_phil(args, [
        (lambda a: a.lower().endswith(".npz"), "input.merged"),
        (lambda a: a.lower().endswith(_MASK_EXT), "input.mask"),
    ])


# ------------------------------------------------------------------ images


def images_from_experiments(experiments):
    """(imageset, index, experiment) for every distinct image, in order."""
    from dxtbx.imageset import ImageSequence

    seen = set()
    out = []
    for expt in experiments:
        iset = expt.imageset
        if iset is None:
            continue
        if len(iset) == 1:
            indices = [0]
        elif expt.scan is not None and isinstance(iset, ImageSequence):
            a0 = iset.get_array_range()[0]
            s0, s1 = expt.scan.get_array_range()
            indices = range(s0 - a0, s1 - a0)
        else:
            indices = range(len(iset))
        for i in indices:
            key = (id(iset), i)
            if key not in seen:
                seen.add(key)
                out.append((iset, i, expt))
    return out


def image_stem(iset, index) -> str:
    path = iset.get_path(index)
    base = os.path.basename(path)
    for ext in (".bz2", ".gz"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    stem = os.path.splitext(base)[0]
    if len(iset) > 1 and iset.get_path(0) == iset.get_path(len(iset) - 1):
        stem = f"{stem}_{index:05d}"  # several images in one file
    return stem


def external_mask(iset):
    """The imageset's attached mask (dials.apply_mask), or None."""
    data = iset.external_lookup.mask.data
    if data is None or data.empty():
        return None
    return tuple(data.tile(i).data() for i in range(data.n_tiles()))


# ------------------------------------------------------------------ series


def _read_text_header(path, limit=65536) -> str:
    opener = open
    if path.endswith(".bz2"):
        import bz2

        opener = bz2.open
    elif path.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rb") as fh:
        head = fh.read(limit)
    for marker in (b"--CIF-BINARY-FORMAT-SECTION--", b"\x0c\x1a\x04\xd5", b"\x89HDF"):
        i = head.find(marker)
        if i == 0 and marker == b"\x89HDF":
            raise Sorry(f"{path}: series.header_key needs a text header (this is HDF5)")
        if i > 0:
            head = head[:i]
    return head.decode("latin-1")


_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_ISO = r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?)"


def header_value(path, key, iset=None, index=0) -> float:
    """A number from an image header line ``key value`` / ``key=value``."""
    if key == "exposure_time" and iset is not None and iset.get_scan(index) is not None:
        return float(iset.get_scan(index).get_exposure_times()[0])
    if key == "wavelength" and iset is not None:
        return float(iset.get_beam(index).get_wavelength())
    if key == "distance" and iset is not None:
        return float(iset.get_detector(index)[0].get_distance())
    text = _read_text_header(path)
    if key == "timestamp":
        m = re.search(_ISO, text)
        if not m:
            raise Sorry(f"{path}: no ISO date/time in the header")
        stamp = datetime.datetime.fromisoformat(m.group(1).replace(" ", "T"))
        return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
    pattern = r"(?im)^[#\s]*" + re.escape(key) + r"\s*[=:]?\s*\(?\s*" + _NUMBER
    m = re.search(pattern, text)
    if not m:
        raise Sorry(f"{path}: no header line '{key} <number>'")
    return float(m.group(1))


def load_series_csv(path) -> dict:
    """{image name: value} from a CSV with columns image,<value>."""
    table = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise Sorry(f"{path}: expected a header line 'image,<value>'")
        for row in reader:
            if len(row) < 2 or not row[0].strip():
                continue
            try:
                value = float(row[1])
            except ValueError:
                raise Sorry(f"{path}: not a number for {row[0]}: {row[1]!r}")
            name = os.path.basename(row[0].strip())
            table[name] = value
            table[os.path.splitext(name)[0]] = value
    return table


class SeriesValues:
    """The series value of an image: series.csv, else filename_pattern, else
    header_key, else the image's position in the run."""

    def __init__(self, params):
        s = params.series
        self.name = s.name
        self.csv = load_series_csv(s.csv) if s.csv else None
        self.pattern = re.compile(s.filename_pattern) if s.filename_pattern else None
        if self.pattern is not None and self.pattern.groups < 1:
            raise Sorry("series.filename_pattern needs one (group) holding the value")
        self.header_key = s.header_key
        self._t0 = None

    def __call__(self, iset, index, ordinal) -> float:
        path = iset.get_path(index)
        base = os.path.basename(path)
        if self.csv is not None:
            stem = image_stem(iset, index)
            for key in (base, stem, os.path.splitext(base)[0]):
                if key in self.csv:
                    return self.csv[key]
            raise Sorry(f"series.csv has no row for {base}")
        if self.pattern is not None:
            m = self.pattern.search(base)
            if not m:
                raise Sorry(f"series.filename_pattern does not match {base}")
            try:
                return float(m.group(1))
            except ValueError:
                raise Sorry(f"series.filename_pattern matched {m.group(1)!r} in {base}: not a number")
        if self.header_key:
            value = header_value(path, self.header_key, iset, index)
            if self.header_key == "timestamp":
                if self._t0 is None:
                    self._t0 = value
                value -= self._t0
            return value
        return float(ordinal)


# ------------------------------------------------------------------ geometry cache


class GeometryCache:
    """Pixels and binnings per (detector, beam, mask), reused across images.

    Keeps the ``max_entries`` most recently used geometries (a 6M-pixel one
    with its binnings holds a few hundred MB).
    """

    max_entries = 2

    def __init__(self, params, user_mask):
        self.params = params
        self.user_mask = user_mask
        self.entries = []
        self.n_computed = 0

    def get(self, detector, beam, iset):
        ext = external_mask(iset)
        ext_key = iset.external_lookup.mask.filename if ext is not None else None
        for i, entry in enumerate(self.entries):
            if entry["ext_key"] == ext_key and entry["detector"] == detector and entry["beam"] == beam:
                self.entries.append(self.entries.pop(i))  # most recent last
                return entry
        self.n_computed += 1
        logger.info("Computing pixel geometry %d (%d panels)", self.n_computed, len(detector))
        pixels = az.DetectorPixels.from_models(detector, beam)
        try:
            mask = pixels.flat_mask(self.user_mask)
            if ext is not None:
                mask &= pixels.flat_mask(ext)
        except ValueError as e:
            raise Sorry(f"mask does not fit the detector: {e}")
        entry = {"detector": detector, "beam": beam, "ext_key": ext_key, "pixels": pixels, "mask": mask}
        if self.params.corrections.apply:
            from diffuse_cli import corrections

            try:
                total = corrections.detector_multipliers(detector, beam, corrections.CorrectionOptions())["total"]
            except ValueError as e:
                raise Sorry(f"corrections: {e}")
            entry["multiplier"] = np.asarray(total, dtype=np.float64)
        self.entries.append(entry)
        del self.entries[: -self.max_entries]
        return entry


def radial_binnings(entry, params):
    if "radial" in entry:
        return entry["radial"]
    pixels, mask = entry["pixels"], entry["mask"]
    r = params.radial
    q_range = (r.q_min, r.q_max)
    out = {"radial": az.radial_binning(pixels, mask, r.n_bins, q_range)}
    # sectors share the full profile's bins, so profiles line up
    edges = out["radial"].edges
    for sec in r.sector or []:
        if sec is None:
            continue
        centre, width = sec
        if not 0 < width <= 360:
            raise Sorry(f"radial.sector width must be in (0, 360] degrees, got {width:g}")
        label = f"radial_chi{centre:g}_w{width:g}"
        out[label] = az.radial_binning(pixels, mask, r.n_bins, (edges[0], edges[-1]), [(centre, width)])
    entry["radial"] = out
    return out


def azimuthal_targets(params, expt):
    """[(label, q_inv_angstrom, meta)] for q=, d_star=, d= and hkl=."""
    targets = []
    for q in params.q or []:
        targets.append((f"azimuthal_q{q:.4f}", float(q), {}))
    for ds in params.d_star or []:
        q = float(az.q_from_d_star(ds))
        targets.append((f"azimuthal_q{q:.4f}", q, {"d_star": ds}))
    for d in params.d or []:
        if d <= 0:
            raise Sorry("d= must be positive")
        q = float(az.q_from_d_star(1.0 / d))
        targets.append((f"azimuthal_q{q:.4f}", q, {"d": d}))
    for hkl in params.hkl or []:
        if expt.crystal is None:
            raise Sorry("hkl= needs a crystal model: give an indexed .expt")
        if not any(hkl):
            raise Sorry("hkl=0,0,0 is the direct beam")
        A = np.array(expt.crystal.get_A()).reshape(3, 3)
        q = float(az.q_from_d_star(np.linalg.norm(A @ np.array(hkl, dtype=float))))
        targets.append(("azimuthal_hkl{}_{}_{}".format(*hkl), q, {"hkl": tuple(hkl)}))
    return targets


def azimuthal_binning(entry, label, q, params):
    cache = entry.setdefault("azimuthal", {})
    key = (round(q, 9), params.q_tolerance, params.azimuthal.n_bins)
    if key not in cache:
        b = az.azimuthal_binning(entry["pixels"], q, params.q_tolerance, entry["mask"], params.azimuthal.n_bins)
        if b.static_counts.sum() == 0:
            logger.warning("No usable pixel within %.4g of q = %.4g Å⁻¹", params.q_tolerance, q)
        cache[key] = b
    return cache[key]


# ------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_profile(path, prof, fits, title, rings=()):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = prof.n_pixels > 0
    ax.errorbar(prof.x[ok], prof.I[ok], yerr=prof.sigma[ok], fmt=".", ms=3, lw=0.5, color="k", label="data")
    for res in fits:
        if res.success and res.x is not None:
            order = np.argsort(res.x)
            lab = res.model
            if np.isfinite(res.S):
                lab += f" S={res.S:.3f}±{res.S_error:.3f}"
            lab += f" R²={res.r_squared:.3f}"
            ax.plot(res.x[order], res.y_model[order], lw=1.5, label=lab)
    if prof.kind == "radial":
        ax.set_xlabel("q = 4π sinθ/λ (Å⁻¹)")
        for q in rings:
            ax.axvline(q, color="0.6", lw=0.8, ls="--")
    else:
        ax.set_xlabel("χ (deg, DIALS lab frame)")
        ax.set_xlim(-180, 180)
    ax.set_ylabel("mean intensity per pixel")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    program.save_figure(path, fig)


def write_maps(outdir, stem, entry, image, params, rings):
    plt = _plt()
    pixels, mask = entry["pixels"], entry["mask"]
    if "maps" not in entry:
        n = params.maps.n_bins
        entry["maps"] = (
            az.qmap_binning(pixels, mask, n=n),
            az.cake_binning(pixels, mask, n_q=n, n_chi=360),
        )
    qmap_b, cake_b = entry["maps"]
    qmap, qmap_n = qmap_b.map2d(image)
    cake, cake_n = cake_b.map2d(image)
    arrays = {
        "qmap": qmap.astype(np.float32),
        "qmap_n_pixels": qmap_n.astype(np.int32),
        "qx_edges": qmap_b.meta["qx_edges"],
        "qy_edges": qmap_b.meta["qy_edges"],
        "cake": cake.astype(np.float32),
        "cake_n_pixels": cake_n.astype(np.int32),
        "q_edges": cake_b.meta["q_edges"],
        "chi_edges": cake_b.meta["chi_edges"],
    }
    if params.maps.fill_centrosymmetric:
        qmap = az.fill_centrosymmetric(qmap, "qmap")
        cake = az.fill_centrosymmetric(cake, "cake")
        arrays["qmap_filled"] = qmap.astype(np.float32)
        arrays["cake_filled"] = cake.astype(np.float32)
    program.write_npz(os.path.join(outdir, f"{stem}_maps.npz"), **arrays)

    def log_image(a):
        with np.errstate(invalid="ignore", divide="ignore"):
            pos = a[np.isfinite(a) & (a > 0)]
            floor = np.percentile(pos, 1) if pos.size else 1.0
            return np.log10(np.where(np.isfinite(a), np.maximum(a, floor), np.nan)), floor

    fill_note = " (masked pixels filled from χ+180°, display only)" if params.maps.fill_centrosymmetric else ""
    fig, ax = plt.subplots(figsize=(6.5, 6))
    img, _ = log_image(qmap)
    e = qmap_b.meta["qx_edges"]
    lo, hi = np.nanpercentile(img, [1, 99.7]) if np.isfinite(img).any() else (0, 1)
    im = ax.imshow(img, origin="lower", extent=(e[0], e[-1], e[0], e[-1]), cmap="viridis", vmin=lo, vmax=hi)
    t = np.linspace(0, 2 * np.pi, 361)
    for q in rings:
        ax.plot(q * np.cos(t), q * np.sin(t), color="w", lw=0.7, ls="--")
    ax.set_xlabel("q_x (Å⁻¹, 2π/d, DIALS lab x)")
    ax.set_ylabel("q_y (Å⁻¹, 2π/d, DIALS lab y)")
    ax.set_title(f"{stem}: log10 I{fill_note}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="log10 mean intensity")
    program.save_figure(os.path.join(outdir, f"{stem}_qmap.png"), fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    img, _ = log_image(cake)
    qe, ce = cake_b.meta["q_edges"], cake_b.meta["chi_edges"]
    lo, hi = np.nanpercentile(img, [1, 99.7]) if np.isfinite(img).any() else (0, 1)
    im = ax.imshow(img.T, origin="lower", aspect="auto", extent=(qe[0], qe[-1], ce[0], ce[-1]), cmap="viridis", vmin=lo, vmax=hi)
    for q in rings:
        ax.axvline(q, color="w", lw=0.7, ls="--")
    ax.set_xlabel("q = 4π sinθ/λ (Å⁻¹)")
    ax.set_ylabel("χ (deg, DIALS lab frame)")
    ax.set_title(f"{stem}: cake, log10 I{fill_note}", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 mean intensity")
    program.save_figure(os.path.join(outdir, f"{stem}_cake.png"), fig)


def plot_summary(outdir, rows, series_name):
    plt = _plt()
    groups = {}
    for r in rows:
        if r["success"]:
            groups.setdefault((r["profile"], r["model"]), []).append(r)
    if not groups:
        return []
    written = []
    for quantity, label in (("centre", "peak position"), ("fwhm", "FWHM"), ("S", "order parameter S"), ("S_total", "S_total")):
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for (profile, model), rs in sorted(groups.items()):
            x = np.array([r[series_name] for r in rs], dtype=float)
            y = np.array([r[quantity] for r in rs], dtype=float)
            e = np.array([r[quantity + "_error"] for r in rs], dtype=float)
            if not np.isfinite(y).any():
                continue
            o = np.argsort(x)
            ax.errorbar(x[o], y[o], yerr=np.where(np.isfinite(e[o]), e[o], 0), fmt="o-", ms=3, label=f"{profile} {model}")
            drawn = True
        if drawn:
            ax.set_xlabel(series_name)
            ax.set_ylabel(label + (" (Å⁻¹ or deg)" if quantity in ("centre", "fwhm") else ""))
            ax.legend(fontsize=7)
            path = os.path.join(outdir, f"summary_{quantity}.png")
            program.save_figure(path, fig)
            written.append(path)
        else:
            plt.close(fig)
    return written


# ------------------------------------------------------------------ main work

def fit_rows(base, profile_label, target_q, prof, fits):
    rows = []
    for res in fits:
        row = dict(base)
        row["profile"] = profile_label
        row["q_inv_angstrom"] = target_q
        row.update(res.row())
        rows.append(row)
    return rows


def fit_azimuthal(prof, params):
    fits = []
    ok = prof.n_pixels > 0
    for model in params.fit.azimuthal_models:
        if model == "pseudo_voigt":
            fits.append(pf.fit_pseudo_voigt_azimuthal(prof.x[ok], prof.I[ok], prof.sigma[ok], pair=params.fit.pair, smooth_window=params.fit.smooth))
        elif model == "maier_saupe":
            fits.append(pf.fit_maier_saupe(prof.x[ok], prof.I[ok], prof.sigma[ok], smooth_window=params.fit.smooth, centre=params.fit.centre))
    return fits


def fit_radial(prof, params):
    if not params.fit.radial_range:
        return []
    ok = prof.n_pixels > 0
    return [pf.fit_pseudo_voigt(prof.x[ok], prof.I[ok], prof.sigma[ok], x_range=params.fit.radial_range, smooth_window=params.fit.smooth)]


def write_table(path, rows):
    if not rows:
        return
    names = []
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    with program.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        for r in rows:
            w.writerow([_cell(r.get(k, "")) for k in names])


def _cell(v):
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else f"{float(v):.8g}"
    return v


def process_merged(path, params, outdir):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise Sorry(f"{path}: not a readable .npz ({e})")
    missing = [k for k in ("I", "sigma", "counts", "h", "k", "l", "unit_cell") if k not in data.files]
    if missing:
        raise Sorry(f"{path}: not a merged map (missing {', '.join(missing)})")
    merged = {k: data[k] for k in ("I", "sigma", "counts", "h", "k", "l", "unit_cell")}
    q_range = None
    if params.radial.q_min is not None and params.radial.q_max is not None:
        q_range = (params.radial.q_min, params.radial.q_max)
    try:
        prof = az.merged_radial_profile(merged, n_bins=params.radial.n_bins, q_range=q_range)
    except ValueError as e:
        raise Sorry(f"{path}: {e}")
    stem = os.path.splitext(os.path.basename(path))[0]
    prof.write_csv(os.path.join(outdir, "profiles", f"{stem}_radial.csv"))
    if params.output.sasview:
        prof.write_sasview(os.path.join(outdir, "profiles", f"{stem}_radial.dat"))
    fits = fit_radial(prof, params)
    if params.output.plots:
        plot_profile(os.path.join(outdir, "plots", f"{stem}_radial.png"), prof, fits, f"{stem}: merged map I(|q|)")
    logger.info("Merged map %s: radial profile over %d voxels", path, int(prof.n_pixels.sum()))
    base = {"image": os.path.basename(path), "image_index": 0, params.series.name: 0.0}
    return fit_rows(base, "radial", float("nan"), prof, fits)


# State shared with forked workers (set before the pool starts).
_STATE: dict = {}


def process_image(ordinal: int) -> list[dict]:
    """Profiles, fits, plots and maps of image ``ordinal``; returns its fits.csv rows."""
    st = _STATE
    params, outdir, cache = st["params"], st["outdir"], st["cache"]
    iset, index, expt = st["images"][ordinal]
    rows: list[dict] = []
    stem = image_stem(iset, index)
    detector, beam = expt.detector, expt.beam
    entry = cache.get(detector, beam, iset)
    multiplier = None
    if "multiplier" in entry:  # photons/µsr/s, as diffuse.correct
        try:
            t = dials_compat.exposure_time(iset, index)
        except ValueError as e:
            raise Sorry(f"corrections.apply=True needs the exposure time: {e}")
        multiplier = entry["multiplier"] * (1.0 / t)
    image = az.ImageData(iset.get_raw_data(index), entry["pixels"], multiplier=multiplier)
    value = st["series_values"][ordinal]
    base = {"image": os.path.basename(iset.get_path(index)), "image_index": index, params.series.name: value}

    ring_qs = []
    for label, binning in radial_binnings(entry, params).items():
        prof = binning.profile(image, params.error_model)
        prof.write_csv(os.path.join(outdir, "profiles", f"{stem}_{label}.csv"))
        if params.output.sasview:
            prof.write_sasview(os.path.join(outdir, "profiles", f"{stem}_{label}.dat"))
        fits = fit_radial(prof, params)
        rows += fit_rows(base, label, float("nan"), prof, fits)
        if params.output.plots:
            plot_profile(os.path.join(outdir, "plots", f"{stem}_{label}.png"), prof, fits, f"{stem} {label}", params.q or [])
    for label, q, meta in azimuthal_targets(params, expt):
        ring_qs.append(q)
        prof = azimuthal_binning(entry, label, q, params).profile(image, params.error_model)
        prof.write_csv(os.path.join(outdir, "profiles", f"{stem}_{label}.csv"))
        fits = fit_azimuthal(prof, params)
        # model-free S of the measured profile (background included, so
        # comparable with S_total) about each fit's centre
        rows_here = fit_rows(base, label, q, prof, fits)
        for row, res in zip(rows_here, fits):
            row["S_data"] = (
                pf.order_parameter_from_profile(prof.x, prof.I, res.params["centre"])
                if res.success
                else float("nan")
            )
            if not res.success:
                logger.warning("%s %s %s: fit failed: %s", stem, label, res.model, res.message)
        rows += rows_here
        if params.output.plots:
            plot_profile(
                os.path.join(outdir, "plots", f"{stem}_{label}.png"),
                prof,
                fits,
                f"{stem} {label}: |q − {q:.4g}| ≤ {params.q_tolerance:g} Å⁻¹",
            )
    if params.maps.enable:
        rings = params.maps.rings if params.maps.rings else ring_qs
        write_maps(os.path.join(outdir, "maps"), stem, entry, image, params, rings)

    return rows


@program.entry_point("azimuthal_fit")
def run(args=None, phil=phil_scope):
    from dials.util.options import flatten_experiments

    usage = "diffuse.azimuthal_fit imported.expt [mask.pickle] [merged.npz] [q=1.8] [options]"
    parser = program.ArgumentParser(
        usage=usage,
        phil=phil,
        read_experiments=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=__doc__,
    )
    arg_list = _split_args(list(args) if args is not None else sys.argv[1:])
    params, options = parser.parse_args(arg_list)
    program.configure_logging("azimuthal_fit", params, options)
    program.log_diff_phil(parser)

    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0 and not params.input.merged:
        raise Sorry("No experiments (.expt) or merged map (.npz) given")
    user_mask = None
    if params.input.mask:
        if not os.path.exists(params.input.mask):
            raise Sorry(f"File not found: {params.input.mask}")
        try:
            user_mask = az.read_mask(params.input.mask)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
            raise Sorry(f"{params.input.mask}: not a DIALS mask ({type(e).__name__})")
    reserved = {"image", "image_index", "profile", "q_inv_angstrom", "S_data"} | set(pf.FitResult("x", True).row())
    if params.series.name in reserved or not params.series.name:
        raise Sorry(f"series.name={params.series.name} clashes with a column of fits.csv")
    if params.fit.radial_range and not params.fit.radial_range[0] < params.fit.radial_range[1]:
        raise Sorry("fit.radial_range must be lo,hi with lo < hi")

    outdir = params.output.directory
    for sub in ("profiles", "plots", "maps"):
        os.makedirs(os.path.join(outdir, sub), exist_ok=True)

    rows = []
    if params.input.merged:
        rows += process_merged(params.input.merged, params, outdir)

    images = images_from_experiments(experiments)
    if experiments and not images:
        raise Sorry("The experiments hold no images")
    series = SeriesValues(params)
    cache = GeometryCache(params, user_mask)
    if images:
        logger.info("%d image(s); q convention: q_inv_angstrom = 4π sinθ/λ = 2π/d", len(images))
    nproc = min(program.resolve_nproc(params.nproc), max(1, len(images)))
    # series values in image order (a timestamp series counts from the first
    # image) and the geometry, before the workers fork
    series_values = [series(iset, index, ordinal) for ordinal, (iset, index, _) in enumerate(images)]
    for iset, _, expt in images:
        cache.get(expt.detector, expt.beam, iset)
    _STATE.update(params=params, outdir=outdir, cache=cache, images=images, series_values=series_values)
    try:
        for image_rows in program.parallel_map(process_image, range(len(images)), nproc, desc="images", unit="image"):
            rows += image_rows
    finally:
        _STATE.clear()

    for r in rows:
        r.setdefault("S_data", float("nan"))
    table = os.path.join(outdir, "fits.csv")
    if rows:
        write_table(table, rows)
        n_ok = sum(1 for r in rows if r["success"])
        logger.info("%d fits (%d failed) written to %s", len(rows), len(rows) - n_ok, table)
        if params.output.plots and len(images) > 1:
            for p in plot_summary(outdir, rows, params.series.name):
                logger.info("Summary plot: %s", p)
    elif images:
        logger.info("No fits asked for (give q=, d=, d_star=, hkl= or fit.radial_range=)")
    logger.info("Profiles in %s", os.path.join(outdir, "profiles"))
