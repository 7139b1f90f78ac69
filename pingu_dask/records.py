"""The records that cross layers: what one scan came to, the statuses of attempts, and
the model seam (SegmentationModel: what the stages ask of a model).

A worker's `finish` makes a ScanResult; the driver's loop records it (ledger row,
table rows), keeps it for the caller, and the command line prints it. Failed
attempts become ScanResults too, made by the driver from the error. Plain dataclasses,
keyword-only, so that a field is always named where a record is made.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from pingu_dask.config import InferenceSettings


def column_name(text: str) -> str:
    """A name as a table column: 'T1w' -> 't1w', 'T2 FLAIR' -> 't2_flair', 'WMH' -> 'wmh'
    (a model's channel names become manifest columns, its label names export columns)."""
    return re.sub(r"[^0-9a-z]+", "_", text.strip().lower()).strip("_")


TIMESTAMP = "%Y-%m-%dT%H:%M:%S%z"  # local time with its UTC offset, in every record


def timestamp() -> str:
    """Now, as the records (ledger, run.json, training.json, mask attributes) write it."""
    return time.strftime(TIMESTAMP)


class Status(StrEnum):
    """What became of an attempt at a scan (the ledger's `status` column)."""

    OK = "ok"
    FAILED = "failed"  # for good: no attempt follows
    RETRY = "retry"  # another attempt follows (never written to the ledger)
    INVALID = "invalid"  # a manifest row that could not become a scan


@dataclass(frozen=True, kw_only=True)
class ScanCounts:
    """The whole-brain figures of one analysed mask (the per-region ones are in rows)."""

    n_clusters: int
    n_voxels: int
    volume_mm3: float
    clusters_outside_brain: int | None = None  # None: the brain rule did not run
    reference_clusters: int | None = None  # the rest: only with a reference mask
    voxel_dice: float | None = None
    cluster_f1: float | None = None


@dataclass(frozen=True, kw_only=True)
class ScanFacts:
    """What a scan was and what was used for it (the scans table and the mask's
    sidecar): how its file is stored, what the pre-flight checks flagged, where its
    regions came from. Measured by the worker that read the files."""

    stored_orientation: str  # axis codes of the stored array, e.g. "LPS"
    voxel_size_mm: tuple[float, float, float]  # along the stored array axes
    flags: tuple[str, ...] = ()  # pre-flight checks that flagged the scan (their names)
    flag_messages: tuple[str, ...] = ()  # what each found, in plain words
    region_source: str = "none"  # the region table used, or "none" (no parcellation)
    brain_rule: bool = False  # whether clusters outside the brain could be dropped
    icv_mm3: float | None = None  # intracranial volume, where the parcellation gives it

    def columns(self) -> dict:
        """The facts as the scans table's (and the ledger's) columns."""
        x, y, z = self.voxel_size_mm
        return {
            "stored_orientation": self.stored_orientation,
            "voxel_size_x_mm": x,
            "voxel_size_y_mm": y,
            "voxel_size_z_mm": z,
            "flags": ";".join(self.flags),
            "region_source": self.region_source,
            "brain_rule": self.brain_rule,
            "icv_mm3": self.icv_mm3,
        }


@dataclass(kw_only=True)
class ScanRows:
    """One scan's rows of the regions, clusters, structures and evaluation tables, as
    plain Python (the output layer makes Arrow tables of them, with their fixed schemas)."""

    regions: list[dict]
    clusters: dict[str, list]  # by column
    evaluation: list[dict] | None = None  # with a reference mask
    structures: list[dict] = field(default_factory=list)  # the model's non-PVS labels


@dataclass(kw_only=True)
class ScanResult:
    """One scan's outcome, as the driver keeps it.

    A successful scan carries its counts, where its outputs went, its seconds and
    workers per stage, and its table rows (`tables`, Arrow tables by table name, which
    the driver writes and then drops). A failed one carries the error's type and
    message and the worker it happened on.
    """

    scan_id: str
    status: Status
    attempt: int = 1
    n_clusters: int | None = None
    n_voxels: int | None = None
    volume_mm3: float | None = None
    clusters_outside_brain: int | None = None
    reference_clusters: int | None = None
    voxel_dice: float | None = None
    cluster_f1: float | None = None
    input_fingerprint: str | None = None
    facts: ScanFacts | None = None  # how it was stored, flags, region source
    mask: str | None = None  # the Zarr group, relative to OUT
    nifti: str | None = None
    qc: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    workers: dict[str, str] = field(default_factory=dict)  # per stage
    tables: dict[str, Any] = field(default_factory=dict)  # table name -> pyarrow.Table
    error_type: str | None = None
    message: str | None = None
    worker: str | None = None

    @classmethod
    def counted(cls, scan_id: str, counts: ScanCounts, **fields: Any) -> ScanResult:
        """A successful scan's result from its counts."""
        return cls(scan_id=scan_id, status=Status.OK, **vars(counts), **fields)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def brief(self) -> ScanResult:
        """Its id and status only (a large run keeps no more per successful scan)."""
        return ScanResult(
            scan_id=self.scan_id, status=self.status, attempt=self.attempt, facts=self.facts
        )


@dataclass(frozen=True)
class ScanImages:
    """A scan's channels as SegmentationModel.prepare gets them: read, checked and
    turned onto the model's orientation, in the model's channel order."""

    images: Sequence[np.ndarray]
    spacing: Sequence[float]  # mm per array axis, of the images as given
    paths: Sequence[Path]  # the files they were read from (for a model's own records)


class PreparedScan(Protocol):
    """A scan made ready for a network by SegmentationModel.prepare (on a CPU worker)."""

    @property
    def geometry(self) -> Any:
        """Where the network's grid lies in the scan: what `restore` needs (small)."""


class SegmentationModel(Protocol):
    """The model seam: the three things the stages (run/stages.py) ask of a model.

    `prepare` runs on a CPU worker, `predict` on a worker holding an inference slot,
    `restore` on a CPU worker again; the stages around them do everything else (read
    and check the inputs, orientation, regions, clusters, writes), for every model
    alike. nnU-Net is one implementation (nnunet/engine.py). Implementations are small
    and picklable: they travel with every task.
    """

    @property
    def name(self) -> str: ...
    @property
    def folder(self) -> Path: ...
    @property
    def channels(self) -> tuple[str, ...]:
        """Manifest column names of the input channels, in input order."""

    @property
    def labels(self) -> tuple[tuple[str, int], ...]:
        """The label map's (name, value) pairs, as dataset.json names them."""

    @property
    def fingerprint(self) -> str:
        """Changes whenever the model's outputs could (weights, plans, folds)."""

    def facts(self) -> dict[str, object]:
        """What names the model in outputs (run.json, sidecars): plain values."""

    def check(self) -> None:
        """Raise ModelError now, before any scan is sent, when the model cannot load."""

    def prepare(self, scan: ScanImages, inference: InferenceSettings) -> PreparedScan:
        """The channels (on the model's orientation, as read) made ready for the network."""

    def predict(self, prepared: Any, inference: InferenceSettings, slot: int) -> np.ndarray:
        """The label map of `prepared` (uint8/uint16), on this worker's slot `slot`."""

    def restore(self, labels: np.ndarray, geometry: Any, shape: tuple[int, ...]) -> np.ndarray:
        """The label map onto the whole image grid `shape` that `prepare` was given."""
