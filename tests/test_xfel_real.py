"""The whole chain on the two real CSPAD XFEL shots (thermolysin, LCLS, 64 panels).

The headers say ``integration_time 0.0``: an XFEL pulse has no exposure
time, so each shot is normalised per shot (here by 1: no pulse energy in
these headers; the per-shot scale is left to merge), never per second. With
Bragg masking off the merged map at ndiv=3 shows the Bragg lattice at integer
hkl; with the default Bragg mask it does not (within 10%), as for thaumatin
in test_real_data_chain.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import diffuse_cli  # noqa: F401
from conftest import lattice_contrast
from diffuse_cli import corrections
from diffuse_cli.command_line import azimuthal_fit, bragg_mask, correct, extract, merge

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def cspad_chain(processed_real, tmp_path_factory):
    """DIALS once per session, then bragg_mask, extract, correct, merge (with and without Bragg masks), azimuthal_fit."""
    root = tmp_path_factory.mktemp("cspad_chain")
    processed = processed_real("thermolysin")["out"]
    (root / "processed").symlink_to(processed, target_is_directory=True)
    expt = str(processed / "combined.expt")
    refl = str(processed / "combined.refl")
    bragg_mask.run([expt, refl, f"output.directory={root / 'masks'}", "nproc=2", f"output.log={root / 'mask.log'}"])
    for label, mask_args in (
        ("bragg_masked", [f"masks.summary={root / 'masks' / 'summary.json'}"]),
        ("no_bragg_mask", [f"masks.static={root / 'masks' / 'static.mask'}"]),
    ):
        extract.run([expt, *mask_args, f"output.directory={root / label / 'extracted'}",
                     "nproc=2", f"output.log={root / label / 'extract.log'}"])
        correct.run([expt, str(root / label / "extracted"), "nproc=2",
                     f"output.directory={root / label / 'corrected'}",
                     f"output.log={root / label / 'correct.log'}"])
        # without Bragg masks, outlier rejection would remove the peaks from their voxels
        reject = ["merging.reject_sigma=None"] if label == "no_bragg_mask" else []
        merge.run([expt, str(root / label / "corrected"), "ndiv=3", "d_min=2.5",
                   "space_group=P6122", f"output.directory={root / label / 'merged'}",
                   *reject, f"output.log={root / label / 'merge.log'}"])
    azimuthal_fit.run([str(root / "bragg_masked" / "merged" / "merged.npz"), "radial.n_bins=40",
                       f"output.directory={root / 'profiles'}", f"output.log={root / 'az.log'}"])
    return root


def _lattice_contrast(path) -> tuple[float, int]:
    """conftest.lattice_contrast with a smaller floor: two shots measure fewer voxels."""
    return lattice_contrast(path, min_off_lattice=5_000)


def test_shots_are_normalised_per_shot(cspad_chain):
    """Both shots reach the corrected files, each recording a per-shot normalisation
    (no exposure time, no pulse energy in these headers: N = 1), and their own wavelength."""
    rows = json.loads((cspad_chain / "bragg_masked" / "corrected" / "summary.json").read_text())["stills"]
    assert len(rows) == 2
    assert {r["normalisation"] for r in rows} == {"unit"}
    assert all(r["exposure_time"] == 0.0 and r["normalisation_value"] == 1.0 for r in rows)
    # λ = 1.272607 and 1.272444 Å in the two headers: one geometry and one factors file for both
    assert sorted(round(r["wavelength"], 6) for r in rows) == [1.272444, 1.272607]
    assert len(list((cspad_chain / "bragg_masked" / "extracted").glob("geometry_*.npz"))) == 1
    assert len(list((cspad_chain / "bragg_masked" / "corrected").glob("factors_*.npz"))) == 1
    for f in sorted((cspad_chain / "bragg_masked" / "corrected").glob("idx-*.npz")):
        obs = corrections.load_observations(f)
        assert obs["normalisation"] == "unit" and len(obs["I"]) > 100_000
        assert np.isfinite(obs["I"]).all()


def _excited_lattice_contrast(root, label) -> tuple[float, int]:
    """Mean I at the voxels of the Miller indices DIALS integrated on these shots
    / mean I of the measured off-lattice voxels, and the number of such voxels.

    Two shots of a 93 × 93 × 130 Å cell excite few of the ~10⁵ lattice points
    in the sphere, so the mean over every integer-hkl voxel (the thaumatin
    test's measure) dilutes the peaks; DIALS's own reflection list says which
    lattice points were on the Ewald sphere. The map is the full symmetric box.
    """
    from dials.array_family import flex

    m = np.load(root / label / "merged" / "merged.npz")
    refl = flex.reflection_table.from_file(str(root / "processed" / "combined.refl"))
    miller = np.array(refl["miller_index"], dtype=float)
    index, inside = [], np.ones(len(miller), dtype=bool)
    for axis, v in zip((m["h"], m["k"], m["l"]), miller.T):
        i = np.clip(np.searchsorted(axis, v - 1e-6), 0, len(axis) - 1)
        inside &= np.isclose(axis[i], v)
        index.append(i)
    excited = np.zeros(m["I"].shape, dtype=bool)
    excited[tuple(i[inside] for i in index)] = True
    measured = (m["counts"] > 0) & np.isfinite(m["I"])
    on = [np.isclose(ax, np.round(ax)) for ax in (m["h"], m["k"], m["l"])]
    lattice = on[0][:, None, None] & on[1][None, :, None] & on[2][None, None, :]
    at, off = measured & excited, measured & ~lattice
    if not at.any():
        return float("nan"), 0
    return float(np.mean(m["I"][at]) / np.mean(m["I"][off])), int(at.sum())


def test_bragg_lattice_visible_without_bragg_mask(cspad_chain):
    contrast, n = _excited_lattice_contrast(cspad_chain, "no_bragg_mask")
    assert n > 100
    # a voxel (1/3 lattice unit wide) holds many diffuse pixels besides the peak
    assert contrast > 1.5, (contrast, n)


def test_bragg_lattice_gone_with_default_bragg_mask(cspad_chain):
    contrast, n = _excited_lattice_contrast(cspad_chain, "bragg_masked")
    # either the excited lattice voxels are masked out entirely, or they are not brighter (within 10%)
    assert n == 0 or abs(contrast - 1) < 0.1, (contrast, n)
    contrast, n = _lattice_contrast(cspad_chain / "bragg_masked" / "merged" / "merged.npz")
    assert n == 0 or contrast < 1.1, (contrast, n)


def test_azimuthal_profile_of_the_map(cspad_chain):
    """azimuthal_fit's radial profile of the masked map: finite, positive, out to d_min = 2.5 Å."""
    import csv

    path = cspad_chain / "profiles" / "profiles" / "merged_radial.csv"
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if r["I"] not in ("", "nan")]
    assert len(rows) > 20
    I = np.array([float(r["I"]) for r in rows])
    d = np.array([float(r["d"]) for r in rows])
    assert np.all(np.isfinite(I)) and np.all(I > 0)
    assert d.min() < 2.7
