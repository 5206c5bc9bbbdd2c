"""The frame reference: every conversion between the ways a rotation frame is named.

dxtbx and DIALS name one frame of a sweep in five ways, and mixing them up
silently rotates every pixel of a sweep that does not start at image 1:

* **image number** ``n``: the file/scan numbering, ``scan.get_image_range()``
  = ``(first, last)``; 1-based in most formats, but any integer is allowed;
* **array index** ``a = n − 1``: absolute, ``scan.get_array_range()`` =
  ``(first − 1, last)``; ``scan.get_angle_from_array_index`` takes it;
* **index within the imageset** ``i``: what ``imageset[i]`` and
  ``imageset.get_raw_data(i)`` take, ``a = a0(imageset) + i``;
* **reflection z** (``xyzobs.px``, ``xyzcal.px``, ``bbox`` z): absolute, in
  array-index units; frame ``a`` covers ``a ≤ z < a + 1``, its centre is
  ``a + 0.5``;
* **scan point** ``k`` of a scan-varying model: ``num_scan_points =`` frames
  + 1, point ``k`` at the boundary ``z = a0(scan) + k``.

Nothing else in the package does this arithmetic: it asks a :class:`FrameRef`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FrameRef:
    """Frame arithmetic for one rotation experiment (its scan and imageset).

    ``scan_first``: array index of the scan's first frame; ``n_frames``: frames
    in the scan; ``imageset_first``: array index of ``imageset[0]``;
    ``phi0_deg``/``width_deg``: rotation angle at the start of the first frame
    and the oscillation width (degrees).
    """

    scan_first: int
    n_frames: int
    imageset_first: int
    phi0_deg: float
    width_deg: float

    @classmethod
    def from_scan(cls, scan, imageset=None) -> "FrameRef":
        """From a dxtbx Scan; ``imageset`` (an ImageSequence) when it may start elsewhere."""
        first, end = scan.get_array_range()
        iset_first = first
        if imageset is not None and hasattr(imageset, "get_array_range"):
            iset_first = int(imageset.get_array_range()[0])
        phi0, width = scan.get_oscillation(deg=True)
        return cls(int(first), int(end - first), iset_first, float(phi0), float(width))

    @classmethod
    def from_experiment(cls, experiment) -> "FrameRef":
        return cls.from_scan(experiment.scan, experiment.imageset)

    # ------------------------------------------------------------ conversions
    @property
    def array_range(self) -> tuple[int, int]:
        """(first, end) array indices of the scan, end exclusive."""
        return self.scan_first, self.scan_first + self.n_frames

    @property
    def image_range(self) -> tuple[int, int]:
        """(first, last) image numbers of the scan, inclusive."""
        return self.scan_first + 1, self.scan_first + self.n_frames

    def array_indices(self) -> range:
        """Array indices of every frame of the scan."""
        return range(*self.array_range)

    def image_number(self, array_index):
        return np.asarray(array_index) + 1

    def imageset_index(self, array_index) -> int:
        """Index within the imageset (``imageset[i]``) of an array index."""
        i = int(array_index) - self.imageset_first
        if i < 0:
            raise IndexError(f"array index {array_index} is before the imageset's first frame")
        return i

    def array_index_of_imageset_index(self, index: int) -> int:
        return self.imageset_first + int(index)

    def array_index_of_z(self, z) -> np.ndarray:
        """Array index (int64) of the frame holding reflection z (absolute)."""
        return np.floor(np.asarray(z, dtype=np.float64)).astype(np.int64)

    def in_scan(self, array_index) -> np.ndarray:
        """True where an array index is a frame of this scan."""
        a = np.asarray(array_index)
        return (a >= self.scan_first) & (a < self.scan_first + self.n_frames)

    def phi_deg(self, z) -> np.ndarray:
        """Rotation angle (degrees) at absolute z (array-index units), as
        ``scan.get_angle_from_array_index``; frame centres are at ``a + 0.5``."""
        return self.phi0_deg + (np.asarray(z, dtype=np.float64) - self.scan_first) * self.width_deg

    def phi_centre_deg(self, array_index) -> np.ndarray:
        """Rotation angle (degrees) at the centre of a frame."""
        return self.phi_deg(np.asarray(array_index, dtype=np.float64) + 0.5)

    def z_of_phi(self, phi_deg) -> np.ndarray:
        """Absolute z (array-index units) at a rotation angle (degrees)."""
        return self.scan_first + (np.asarray(phi_deg, dtype=np.float64) - self.phi0_deg) / self.width_deg

    def scan_point_of_z(self, z) -> np.ndarray:
        """Scan point (float) at absolute z: point k sits at z = scan_first + k."""
        return np.asarray(z, dtype=np.float64) - self.scan_first

    # ------------------------------------------------------------ models
    def crystal_A(self, crystal, z) -> np.ndarray:
        """Setting matrix A (3×3, or (n, 3, 3) for array z) at absolute z.

        Static crystals: ``crystal.get_A()``. Scan-varying crystals: linear
        interpolation between the scan points around z, as DIALS's scan-varying
        predictor does within a frame.
        """
        z = np.asarray(z, dtype=np.float64)
        if crystal.num_scan_points == 0:
            A = np.asarray(crystal.get_A(), dtype=np.float64).reshape(3, 3)
            return A if z.ndim == 0 else np.broadcast_to(A, z.shape + (3, 3)).copy()
        n_points = crystal.num_scan_points
        points = np.array(
            [np.asarray(crystal.get_A_at_scan_point(k), dtype=np.float64) for k in range(n_points)]
        ).reshape(n_points, 3, 3)
        k = np.clip(self.scan_point_of_z(z), 0.0, n_points - 1.0)
        k0 = np.minimum(np.floor(k).astype(np.int64), n_points - 2) if n_points > 1 else np.zeros_like(k, dtype=np.int64)
        t = (k - k0)[..., None, None]
        k1 = np.minimum(k0 + 1, n_points - 1)
        return (1.0 - t) * points[k0] + t * points[k1]

    def setting_matrix(self, crystal, goniometer, z) -> np.ndarray:
        """M = S·R(φ)·F·A(φ) (3×3, or (n, 3, 3)) at absolute z, so that q = M·hkl.

        S: goniometer setting rotation, R(φ): rotation by φ(z) about the
        rotation axis datum, F: fixed rotation, A(φ): the (scan-varying) setting
        matrix.
        """
        z = np.asarray(z, dtype=np.float64)
        S = np.asarray(goniometer.get_setting_rotation(), dtype=np.float64).reshape(3, 3)
        F = np.asarray(goniometer.get_fixed_rotation(), dtype=np.float64).reshape(3, 3)
        R = rotation_matrices(goniometer.get_rotation_axis_datum(), self.phi_deg(z))
        return S @ R @ F @ self.crystal_A(crystal, z)


def rotation_matrices(axis, angle_deg) -> np.ndarray:
    """Right-handed rotations (Rodrigues) about ``axis`` by angles in degrees; (..., 3, 3)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    K = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    phi = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))[..., None, None]
    return np.eye(3) + np.sin(phi) * K + (1.0 - np.cos(phi)) * (K @ K)
