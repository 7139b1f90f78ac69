"""Manifest rows with a reference mask -> nnU-Net training cases, checked as `run` checks scans.

One Dask task per case (`prepare_case`, CPU): every channel read in full and put
through the same pre-flight checks as a scan of `run` (run.stages.check_inputs); the
reference mask read, refused when it is empty or does not overlap the image, brought
onto the image grid (nearest neighbour) and binarised (any label above 0 is PVS);
images and mask turned onto the model's orientation (exact permutations and flips, as
`run` does before the network, so that the network is trained on the array layout it
will be run on); then written into nnU-Net's raw dataset (an image already in that
orientation is linked, not copied, where the file system allows) and given nnU-Net's
fingerprint (its own per-case function).

A row that cannot be a training case is left out with its reason (`LeftOut`), never
silently: no reference, a missing file, an empty or non-overlapping reference, an
image that fails a pre-flight check.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pingu_dask.analysis.regions import label_map_on_grid
from pingu_dask.errors import InputError
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.imaging import LABEL_MAP_SUFFIXES, load_volume
from pingu_dask.inputs.manifest import ManifestReport, Scan, input_fingerprint
from pingu_dask.inputs.orientation import Reorientation
from pingu_dask.nnunet.planning import FILE_ENDING, CaseFingerprint, analyze_case, case_files
from pingu_dask.nnunet.trainer_process import NnunetFolders
from pingu_dask.output.files import save_nifti
from pingu_dask.output.ledger import invalid_scans
from pingu_dask.run.stages import check_inputs, stage, worker_name


class ReferenceError(InputError):
    """A reference mask that cannot train a model (empty, off the image, unreadable)."""


@dataclass(frozen=True)
class CaseJob:
    """What every case task shares (small; it travels with each task)."""

    folders: NnunetFolders
    channels: tuple[str, ...]  # manifest columns, in the model's channel order
    orientation: str  # the model's orientation, as `run` uses it
    checks: CheckThresholds
    strict: bool
    n_cases: int  # nnU-Net samples its intensity statistics per case from this


@dataclass
class PreparedCase:
    """A case written into the raw dataset, with what the driver records of it."""

    scan_id: str
    site: str | None
    fingerprint: CaseFingerprint
    input_fingerprint: str
    stored_orientation: str
    voxel_size_mm: tuple[float, float, float]
    reference_voxels: int  # PVS voxels of the binarised reference on the image grid
    flags: tuple[str, ...]
    linked: bool  # the images are links to the manifest's files
    seconds: float
    worker: str


@dataclass(frozen=True)
class LeftOut:
    """A manifest row that is not a training case, and why."""

    scan_id: str
    site: str | None
    reason: str


def missing_reference(scan: Scan) -> LeftOut | None:
    """The row's reason to be left out before any file is read, if it has one."""
    if scan.reference is None:
        return LeftOut(scan.scan_id, scan.site, "no reference mask (the `reference` column)")
    return None


@stage("prepare")
def prepare_case(scan: Scan, job: CaseJob) -> PreparedCase:
    """Check, turn, binarise and write one training case (see the module docstring)."""
    started = time.perf_counter()
    checked = check_inputs(scan, job.channels, job.checks, job.strict)
    stored = checked.stored
    reference = reference_on_grid(scan, stored.shape[:3], stored.affine)
    turn = Reorientation.for_image(stored.affine, stored.shape, job.orientation)
    affine = turn.target_affine(stored.affine)
    images, label = case_files(job.folders, scan.scan_id, len(job.channels))
    linked = True
    for column, target in zip(job.channels, images, strict=True):
        source = scan.channel(column)
        if not (turn.is_identity and _link(source, target, len(stored.shape))):
            save_nifti(target, turn.to_target(checked.voxels[source]), affine)
            linked = False
    save_nifti(label, turn.to_target(reference.astype(np.uint8)), affine, intent="label")
    spacing = stored.spacing
    return PreparedCase(
        scan_id=scan.scan_id,
        site=scan.site,
        fingerprint=analyze_case(images, label, job.n_cases),
        input_fingerprint=input_fingerprint(scan),
        stored_orientation=turn.stored,
        voxel_size_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        reference_voxels=int(reference.sum()),
        flags=tuple(finding.check for finding in checked.findings.flags),
        linked=linked,
        seconds=time.perf_counter() - started,
        worker=worker_name(),
    )


def reference_on_grid(scan: Scan, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The scan's reference mask on its image grid, binarised (label > 0 is PVS).

    Refused when it has no foreground at all (an empty mask would teach the network
    that the scan has no PVS) or none of it lands on the image (another subject's or
    session's mask, or a wrong affine).
    """
    path = scan.reference
    if path is None:
        raise ReferenceError(f"scan {scan.scan_id!r} has no reference mask")
    data, _ = load_volume(path, LABEL_MAP_SUFFIXES)
    if not np.any(data > 0):
        raise ReferenceError(f"reference mask {path} is empty: no voxel above 0")
    on_grid = label_map_on_grid(path, shape, affine, "reference mask") > 0
    if not on_grid.any():
        raise ReferenceError(
            f"reference mask {path} does not overlap the image: check that both are of the "
            "same subject and session and that their affines (qform/sform) are right"
        )
    return on_grid


def _link(source: Path, target: Path, dimensions: int) -> bool:
    """Link `target` to `source` when nnU-Net can read it as it is (a 3D .nii.gz);
    False when it must be written instead."""
    if dimensions != 3 or not str(source).endswith(FILE_ENDING):
        return False
    target.unlink(missing_ok=True)
    try:
        os.symlink(Path(source).resolve(), target)
    except OSError:  # no symlinks on this file system: copy
        shutil.copyfile(source, target)
    return True


def invalid_rows(report: ManifestReport) -> list[LeftOut]:
    return [LeftOut(scan_id, None, message) for scan_id, message in invalid_scans(report.problems)]


def case_changes(earlier: pd.DataFrame, included: Sequence[PreparedCase]) -> list[str]:
    """How the included cases differ from an earlier train's cases.csv (`earlier`, a
    DataFrame): cases in or out, or input files changed (path, size, mtime)."""
    before = earlier[earlier.status == "included"]
    was = dict(zip(before.scan_id.astype(str), before.input_fingerprint.astype(str), strict=True))
    now = {case.scan_id: case.input_fingerprint for case in included}
    changes = [f"{scan_id} now included" for scan_id in sorted(set(now) - set(was))]
    changes += [f"{scan_id} now left out" for scan_id in sorted(set(was) - set(now))]
    changes += [
        f"{scan_id}'s files changed"
        for scan_id in sorted(set(now) & set(was))
        if now[scan_id] != was[scan_id]
    ]
    return changes


def case_rows(included: Sequence[PreparedCase], left_out: Sequence[LeftOut]) -> list[dict]:
    rows = []
    for case in included:
        rows.append(
            {
                "scan_id": case.scan_id,
                "site": case.site,
                "status": "included",
                "reason": "",
                "stored_orientation": case.stored_orientation,
                "voxel_size_mm": "x".join(f"{v:g}" for v in case.voxel_size_mm),
                "reference_voxels": case.reference_voxels,
                "flags": ";".join(case.flags),
                "images": "linked" if case.linked else "written (reoriented or not .nii.gz)",
                "input_fingerprint": case.input_fingerprint,
            }
        )
    for row in left_out:
        rows.append(
            {"scan_id": row.scan_id, "site": row.site, "status": "left out", "reason": row.reason}
        )
    return rows
