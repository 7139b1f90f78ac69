"""Writing files so that nobody ever sees half of one.

Every output (masks, tables, JSON, pictures, the report) is written under a hidden
temporary name beside its final one and renamed into place when complete: a rename
within a folder is atomic, so a reader, a crash or Ctrl-C leaves either the old file
or the new one. Readers of table folders skip names starting with '.'.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write `path` to; renamed onto `path` if the block succeeds,
    removed if it fails. It ends with the final name, so writers that choose the format
    by the extension (.nii.gz) do the right thing.

    The temporary name is unique to this call (pid and a random uuid), not just to the
    process: two attempts of one task in one worker (threads), or a retry beside a
    straggler on a shared file system, would otherwise write into the same temporary
    file and rename each other's half-written bytes into place."""
    path = Path(path)
    temporary = path.with_name(f".{os.getpid()}.{uuid.uuid4().hex}.partial.{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_nifti(
    path: str | os.PathLike[str],
    data: np.ndarray,
    affine: np.ndarray,
    intent: str | None = None,
) -> Path:
    """Write a 3D array as NIfTI-1 in scanner space, atomically.

    The file is written under a temporary name in the same folder and renamed into
    place, so a reader (or a crash) never sees half a file. qform and sform both carry
    the affine with code 1 (scanner), which is what converters such as dcm2niix write.
    `intent` is the NIfTI intent, e.g. "label" for a label image.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm", "sec")
    if intent is not None:
        image.header.set_intent(intent)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as temporary:
        nib.save(image, temporary)
    return path
