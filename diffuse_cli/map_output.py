"""Writing a merged map: CCP4/MRC map, PNG sections and I(|q|) (merged.npz: diffuse_cli.formats.merged).

CCP4 map convention (reciprocal space): the map's "unit cell" is the
reciprocal cell scaled to the grid, ``(n_h·a*/ndiv, n_k·b*/ndiv, n_l·c*/ndiv,
α*, β*, γ*)`` with lengths in Å⁻¹ written where a map normally has Å, so one
grid step is ``a*/ndiv`` and the voxel at grid index (−h_max·ndiv, …) is the
origin of the array; the point h = k = l = 0 is at the coordinate origin.
ChimeraX, Coot and PyMOL read it as an ordinary density map. Unmeasured
voxels are written as 0 (CCP4 has no missing-value marker); merged.npz keeps
NaN.
"""

from __future__ import annotations

import logging

import numpy as np

import diffuse_cli  # noqa: F401  (DIALS environment)
from diffuse_cli import program
from diffuse_cli.grid import HKLGrid
from diffuse_cli.symmetry import b_matrix

logger = logging.getLogger("diffuse.map_output")

def map_unit_cell(grid: HKLGrid, unit_cell) -> tuple:
    """The CCP4 'cell' of the reciprocal-space map (see module doc)."""
    from cctbx import uctbx

    rp = uctbx.unit_cell(tuple(unit_cell)).reciprocal_parameters()
    shape = grid.shape
    return tuple(shape[i] * rp[i] / grid.ndiv[i] for i in range(3)) + tuple(rp[3:])


def write_ccp4(path, grid: HKLGrid, values: np.ndarray, unit_cell, title: str = "diffuse.merge") -> None:
    """Write a dense [h,k,l] map as CCP4/MRC via iotbx.ccp4_map (NaN → 0)."""
    import iotbx.ccp4_map
    from cctbx import sgtbx, uctbx
    from scitbx.array_family import flex

    v = np.nan_to_num(np.asarray(values, dtype=np.float64).reshape(grid.shape), nan=0.0)
    data = flex.double(np.ascontiguousarray(v).ravel())
    off = [m * n for m, n in zip(grid.hkl_max, grid.ndiv)]
    data.reshape(flex.grid(tuple(-o for o in off), tuple(o + 1 for o in off)))
    cell = uctbx.unit_cell(map_unit_cell(grid, unit_cell))
    with program.atomic_path(path) as tmp:
        iotbx.ccp4_map.write_ccp4_map(
            file_name=tmp, unit_cell=cell, space_group=sgtbx.space_group_info("P1").group(),
            map_data=data, labels=flex.std_string([title[:80]]))


def _section(values, grid, plane: str):
    """2D section through 0 of the dense map and its two axis labels/vectors."""
    v = values.reshape(grid.shape)
    off = [m * n for m, n in zip(grid.hkl_max, grid.ndiv)]
    axes = grid.axes()
    if plane == "hk0":
        return v[:, :, off[2]], (0, 1), (axes[0], axes[1]), ("h", "k")
    if plane == "h0l":
        return v[:, off[1], :], (0, 2), (axes[0], axes[2]), ("h", "l")
    if plane == "0kl":
        return v[off[0], :, :], (1, 2), (axes[1], axes[2]), ("k", "l")
    raise ValueError(plane)


def plot_section(path, grid: HKLGrid, values: np.ndarray, unit_cell, plane: str,
                 title: str = "", percentiles=(1.0, 99.0)) -> None:
    """PNG of a central section in Cartesian reciprocal coordinates (Å⁻¹), true aspect."""
    plot_section_values(path, grid, _section(values, grid, plane)[0], unit_cell, plane, title, percentiles)


def plot_section_values(path, grid: HKLGrid, sec: np.ndarray, unit_cell, plane: str,
                        title: str = "", percentiles=(1.0, 99.0)) -> None:
    """:func:`plot_section` of the section ``sec`` itself (as ``_section`` cuts it from the map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    i0, i1 = {"hk0": (0, 1), "h0l": (0, 2), "0kl": (1, 2)}[plane]
    axes = grid.axes()
    ax0, ax1 = axes[i0], axes[i1]
    n0 = "hkl"[i0]
    B = b_matrix(unit_cell)
    e0 = B[:, i0] / np.linalg.norm(B[:, i0])
    u1 = B[:, i1] - (B[:, i1] @ e0) * e0
    e1 = u1 / np.linalg.norm(u1)
    # voxel edges (n+1 per axis), mapped to Cartesian reciprocal space
    def edges(a):
        step = a[1] - a[0] if len(a) > 1 else 1.0
        return np.concatenate([a - step / 2, [a[-1] + step / 2]])

    H0, H1 = np.meshgrid(edges(ax0), edges(ax1), indexing="ij")
    q = H0[..., None] * B[:, i0] + H1[..., None] * B[:, i1]
    X, Y = q @ e0, q @ e1
    finite = sec[np.isfinite(sec)]
    fig, ax = plt.subplots(figsize=(6, 5.4))
    ax.set_facecolor("0.75")
    if finite.size:
        vmin, vmax = np.percentile(finite, percentiles)
        if abs(B[:, i1] @ e0) <= 1e-12 * np.linalg.norm(B[:, i1]):
            # orthogonal axes: the voxels are equal rectangles, an image (far cheaper than a mesh)
            mesh = ax.imshow(np.ma.masked_invalid(sec).T, origin="lower", interpolation="nearest",
                             extent=(X.min(), X.max(), Y.min(), Y.max()), vmin=vmin, vmax=vmax, cmap="viridis")
        else:
            mesh = ax.pcolormesh(X, Y, np.ma.masked_invalid(sec), shading="flat",
                                 vmin=vmin, vmax=vmax, cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="I")
    ax.set_aspect("equal")
    ax.set_xlabel(f"along {n0}* (Å⁻¹)")
    ax.set_ylabel(f"⊥ {n0}* in the {plane} plane (Å⁻¹)")
    ax.set_title(title or f"{plane} section")
    program.save_figure(path, fig)


def plot_radial(path, d_star: np.ndarray, mean_I: np.ndarray, label: str = "⟨I⟩",
                ylabel: str = "I (merged units)") -> None:
    """I(|q|): shell-averaged intensity against d* (Å⁻¹), with d on a top axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ok = np.isfinite(mean_I)
    ax.plot(d_star[ok], mean_I[ok], "k.-", ms=3, lw=1, label=label)
    ax.set_xlabel("|q| = d* = 1/d (Å⁻¹)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, float(np.max(d_star)) * 1.02)
    sec = ax.secondary_xaxis(
        "top", functions=(lambda x: 1.0 / np.maximum(x, 1e-3), lambda d: 1.0 / np.maximum(d, 1e-3)))
    xmax = float(np.max(d_star))
    sec.set_xticks([d for d in (20, 10, 6, 4, 3, 2.5, 2, 1.6, 1.3, 1.0, 0.8) if 1.0 / d <= xmax * 1.02])
    sec.set_xlabel("d (Å)")
    ax.legend(fontsize=8)
    program.save_figure(path, fig)


def plot_shell_statistics(path, stats: dict) -> None:
    """CC½ (total, anisotropic) and the Friedel CC per resolution shell against d* (Å⁻¹)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = stats["shells"]
    d_star = np.array([0.5 * (1.0 / r["d_min"] + (1.0 / r["d_max"] if np.isfinite(r["d_max"]) else 0.0))
                       for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, style, label in (("cc_half", "k.-", "CC½"), ("cc_half_aniso", "b.-", "CC½ anisotropic"),
                              ("cc_friedel", "r.--", "Friedel CC: I(h) vs I(−h)")):
        values = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        if np.isfinite(values).any():
            ax.plot(d_star, values, style, ms=4, lw=1, label=label)
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_xlabel("|q| = d* = 1/d (Å⁻¹), shell centre")
    ax.set_ylabel("correlation coefficient (dimensionless)")
    ax.set_ylim(-0.2, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Merge statistics per resolution shell")
    program.save_figure(path, fig)


def write_ccp4_slabs(path, grid: HKLGrid, slabs, unit_cell, title: str = "diffuse.merge") -> None:
    """As :func:`write_ccp4`, from ``slabs``: an iterable of consecutive [h-range, k, l]
    blocks of the map (NaN → 0), written as they come (memory: one slab). The header
    is the one iotbx.ccp4_map writes (columns l, rows k, sections h; origin at
    −h_max·ndiv), with the density statistics filled in at the end."""
    n0, n1, n2 = grid.shape
    off = [m * n for m, n in zip(grid.hkl_max, grid.ndiv)]
    cell = map_unit_cell(grid, unit_cell)
    lo, hi, total, total2, n = np.inf, -np.inf, 0.0, 0.0, 0
    buf, sq = np.empty(0, dtype="<f4"), np.empty(0)  # reused from slab to slab (no fresh pages each)
    with program.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"\0" * 1024)
        for slab in slabs:
            slab = np.asarray(slab)
            if slab.size > buf.size:
                buf, sq = np.empty(slab.size, dtype="<f4"), np.empty(slab.size)
            v = buf[:slab.size]
            np.copyto(v, slab.reshape(-1), casting="unsafe")  # as astype(float32)
            np.nan_to_num(v, copy=False, nan=0.0)
            if v.size:
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
                total += float(v.sum(dtype=np.float64))
                s2 = sq[:v.size]
                np.square(v, dtype=np.float64, out=s2)
                total2 += float(s2.sum())
                n += v.size
            fh.write(v)
        if n != n0 * n1 * n2:
            raise ValueError(f"slabs hold {n} voxels, the grid {n0 * n1 * n2}")
        mean = total / n
        rms = float(np.sqrt(max(total2 / n - mean * mean, 0.0)))
        ints = np.zeros(256, dtype="<i4")
        ints[0:10] = [n2, n1, n0, 2, -off[2], -off[1], -off[0], n0, n1, n2]
        floats = ints.view("<f4")
        floats[10:16] = [cell[0], cell[1], cell[2], cell[3], cell[4], cell[5]]
        ints[16:19] = [3, 2, 1]
        floats[19:22] = [lo, hi, mean]
        ints[22] = 1  # space group P1
        raw = bytearray(ints.tobytes())
        raw[208:212] = b"MAP "
        raw[212:216] = b"DA\0\0"
        raw[216:220] = np.float32(rms).tobytes()
        raw[220:224] = np.int32(1).astype("<i4").tobytes()
        raw[224:1024] = title[:80].ljust(800).encode("ascii", "replace")  # 10 labels, blank-padded
        fh.seek(0)
        fh.write(bytes(raw))
