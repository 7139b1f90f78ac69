"""NIfTI input/output and geometry checks.

This is the only module that opens image files. Everything else passes plain numpy
arrays plus a 4x4 affine (the nibabel way), so that the rest of the code never depends
on a file format and tests can build images in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pingu_dask.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Label maps (parcellations, reference masks) may also be FreeSurfer's MGZ (aseg.mgz);
#: input channels must be NIfTI, which is what nnU-Net's readers take.
LABEL_MAP_SUFFIXES = (*NIFTI_SUFFIXES, ".mgz")


class ImageError(InputError):
    """An image file that cannot be used; the message says why in plain words."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header of a NIfTI file says, read without loading the voxels."""

    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    dtype: str

    @property
    def is_3d(self) -> bool:
        """True for a 3D volume, or a 4D one whose fourth axis has a single frame."""
        return len(self.shape) == 3 or (len(self.shape) == 4 and self.shape[3] == 1)


def read_info(
    path: str | os.PathLike[str], suffixes: tuple[str, ...] = NIFTI_SUFFIXES
) -> ImageInfo:
    """Read an image header (shape, spacing, affine) without loading the voxel data.

    Raises ImageError with a reason a person can act on (missing, unreadable, not NIfTI
    or another of `suffixes`).
    """
    return _open(path, suffixes)[1]


def _open(path: str | os.PathLike[str], suffixes: tuple[str, ...]):
    """(nibabel image, its ImageInfo): the header read once, the voxels not yet."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"file not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    if not os.access(path, os.R_OK):
        raise ImageError(f"file not readable (permissions): {path}")
    if not str(path).lower().endswith(suffixes):
        kinds = "NIfTI" if suffixes == NIFTI_SUFFIXES else "NIfTI or MGZ"
        raise ImageError(f"not a {kinds} file (expected {' or '.join(suffixes)}): {path}")
    try:
        image: Any = nib.load(path)  # a NIfTI or MGZ image (nibabel types it loosely)
        header = image.header
        shape = tuple(int(n) for n in image.shape)
        spacing = tuple(float(z) for z in header.get_zooms()[: len(shape)])
        affine = np.asarray(image.affine, dtype=np.float64)
        dtype = str(header.get_data_dtype())
    except Exception as error:  # nibabel raises many types for a damaged file
        raise ImageError(f"cannot read NIfTI header of {path}: {error}") from error
    return image, ImageInfo(path=path, shape=shape, spacing=spacing, affine=affine, dtype=dtype)


def load_volume(
    path: str | os.PathLike[str], suffixes: tuple[str, ...] = NIFTI_SUFFIXES
) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI volume as (float32 array, affine); a single-frame 4D is squeezed."""
    info, data = read_volume(path, suffixes)
    return data, info.affine


def read_volume(
    path: str | os.PathLike[str], suffixes: tuple[str, ...] = NIFTI_SUFFIXES
) -> tuple[ImageInfo, np.ndarray]:
    """(header facts, float32 voxels) of a 3D volume, the file opened once."""
    image, info = _open(path, suffixes)
    if not info.is_3d:
        raise ImageError(f"expected a 3D image, got shape {info.shape}: {path}")
    try:
        data = np.asanyarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        raise ImageError(
            f"cannot read voxel data of {path} (truncated or corrupt?): {error}"
        ) from error
    return info, data.reshape(info.shape[:3])


def voxel_volume(affine: np.ndarray) -> float:
    """Volume of one voxel in mm³: |det| of the affine's 3x3 part (any orientation)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def check_image_data(path: str | os.PathLike[str]) -> tuple[ImageInfo, np.ndarray]:
    """Read every voxel of an input image and refuse what a model cannot use.

    nnU-Net takes such images silently: a truncated .nii.gz gives a partial volume,
    NaN voxels become numbers and an empty image gives an empty mask, so a cohort
    would hold wrong results without a word. Raises ImageError naming the problem.
    Returns the header facts and the voxels (for the QC picture; no second read).
    """
    info, data = read_volume(path)  # truncated or corrupt data, wrong dimensionality
    finite = np.isfinite(data)
    if not finite.all():
        raise ImageError(
            f"{int((~finite).sum())} voxels are NaN or infinite (of {data.size}): {path}"
        )
    if data.size == 0 or float(data.min()) == float(data.max()):
        value = float(data.flat[0]) if data.size else 0.0
        raise ImageError(f"image is empty: every voxel is {value:g}: {path}")
    return info, data
