"""One orientation for the network: exact axis permutations and flips, there and back.

nnU-Net hands the network the voxel array as it is stored. The same head stored in
another axis order (a sagittal MPRAGE, a file written LPI instead of RAS) is then
another input, and the network gives other numbers for the same brain: +13 % clusters
on one synthetic scan stored ILP instead of RAS. So every scan is brought to one
orientation first (the one the model was trained in, `InferenceSettings.orientation`)
and its prediction is brought back onto the stored grid the same way.

Only permutations and flips of whole axes are used (nibabel's `io_orientation`,
`apply_orientation`): no voxel is interpolated, the way there and back is exact, and
the world-space geometry is untouched (the affine changes with the array). A slightly
oblique affine goes to its closest axes, as nibabel's `as_closest_canonical` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from pingu_dask.config import AS_STORED


def orientation_code(affine: np.ndarray) -> str:
    """Where each stored array axis points, as nibabel's axis codes, e.g. 'LPS'."""
    return "".join(str(code) for code in nib.orientations.aff2axcodes(affine))


@dataclass(frozen=True)
class Reorientation:
    """How one scan's stored array maps onto the target orientation, and back.

    `stored` and `target` are axis codes; `stored_shape` the shape as stored. An
    identity (target already the stored orientation, or reorienting off) costs nothing.
    """

    stored: str
    target: str
    stored_shape: tuple[int, int, int]
    forward: np.ndarray  # nibabel orientation transform, stored -> target (3 x 2)

    @classmethod
    def for_image(cls, affine: np.ndarray, shape: tuple[int, ...], target: str) -> Reorientation:
        stored_ornt = nib.orientations.io_orientation(affine)
        stored = "".join(str(c) for c in nib.orientations.ornt2axcodes(stored_ornt))
        goal = stored if target == AS_STORED else target
        forward = nib.orientations.ornt_transform(
            stored_ornt, nib.orientations.axcodes2ornt(tuple(goal))
        )
        size = (int(shape[0]), int(shape[1]), int(shape[2]))
        return cls(stored=stored, target=goal, stored_shape=size, forward=forward)

    @property
    def is_identity(self) -> bool:
        identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        return bool(np.array_equal(self.forward, identity))

    @property
    def target_shape(self) -> tuple[int, int, int]:
        order = [int(axis) for axis in self.forward[:, 0]]
        shape = [0, 0, 0]
        for source_axis, target_axis in enumerate(order):
            shape[target_axis] = self.stored_shape[source_axis]
        return (shape[0], shape[1], shape[2])

    def target_affine(self, affine: np.ndarray) -> np.ndarray:
        """The affine of the reoriented array (same world positions for every voxel)."""
        if self.is_identity:
            return np.asarray(affine, dtype=np.float64)
        return np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(
            self.forward, self.stored_shape
        )

    def target_spacing(self, spacing: tuple[float, ...]) -> tuple[float, float, float]:
        """Voxel sizes along the reoriented axes."""
        sizes = [0.0, 0.0, 0.0]
        for source_axis, target_axis in enumerate(int(a) for a in self.forward[:, 0]):
            sizes[target_axis] = float(spacing[source_axis])
        return (sizes[0], sizes[1], sizes[2])

    def to_target(self, array: np.ndarray) -> np.ndarray:
        """A stored-grid array (3D) on the target grid: a contiguous copy."""
        if self.is_identity:
            return array
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, self.forward))

    def to_stored(self, array: np.ndarray) -> np.ndarray:
        """A target-grid array (3D) back on the stored grid, exactly."""
        if self.is_identity:
            return array
        backward = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(tuple(self.target)),
            nib.orientations.axcodes2ornt(tuple(self.stored)),
        )
        result = np.ascontiguousarray(nib.orientations.apply_orientation(array, backward))
        if result.shape != self.stored_shape:
            raise ValueError(f"array of shape {array.shape} is not on the target grid")
        return result
