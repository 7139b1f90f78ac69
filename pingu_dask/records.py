"""The records that cross layers: what one scan came to, and the statuses of attempts.

A worker's `finish` makes a ScanResult; the driver's loop records it (ledger row,
table rows), keeps it for the caller, and the command line prints it. Failed
attempts become ScanResults too, made by the driver from the error. Plain dataclasses,
keyword-only, so that a field is always named where a record is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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
