"""The ledger: one row per attempt at a scan, and what the runner and `status` read from it.

The scheduler forgets everything when it stops, so the ledger (OUT/tables/ledger) is
what decides, on a rerun, which scans are done. A scan is done when its latest
attempt is `ok`, its Zarr group is marked complete by the same pipeline (model and
settings), and its input files are the ones it was made from.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from pingu_dask.errors import ErrorReport, Verdict
from pingu_dask.inputs.manifest import Problem, Scan
from pingu_dask.output import masks, tables
from pingu_dask.output.tables import FACT_COLUMNS
from pingu_dask.records import ScanResult, Status

OK, FAILED, INVALID = Status.OK.value, Status.FAILED.value, Status.INVALID.value
# The scan ids of the manifest the latest run was given: `status` counts these only, so
# that scans of an earlier, larger manifest in the same OUT are not "pending" forever.
MANIFEST_SCANS = "manifest_scans.parquet"


def write_manifest_scans(out: Path, scan_ids: Sequence[str]) -> None:
    """Record the latest run's manifest scan ids in OUT/manifest_scans.parquet (atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pingu_dask.output.files import atomic_path

    with atomic_path(Path(out) / MANIFEST_SCANS) as temporary:
        pq.write_table(pa.table({"scan_id": pa.array(scan_ids, pa.string())}), temporary)


def manifest_scans(out: Path) -> set[str] | None:
    """The latest run's manifest scan ids, or None for an OUT written before they were kept."""
    import pyarrow.parquet as pq

    path = Path(out) / MANIFEST_SCANS
    if not path.exists():
        return None
    return set(pq.read_table(path)["scan_id"].to_pylist())


def now() -> datetime:
    return datetime.now(UTC)


def attempt_row(
    scan_id: str,
    site: str | None,
    status: Status,
    attempt: int,
    run_id: str,
    started: datetime,
    *,
    result: ScanResult | None = None,
    error: ErrorReport | None = None,
    pipeline_fingerprint: str | None = None,
    model_fingerprint: str | None = None,
) -> dict:
    """One ledger row. `result` is a finished scan's; `error` is errors.describe()'s.

    The input fingerprint and the scan's facts (stored orientation, voxel size, flags,
    region source) come from the worker that read the files (in `result`): no file
    system calls here, once per scan.
    """
    seconds = result.seconds if result else {}
    workers = result.workers if result else {}
    facts = result.facts.columns() if result and result.facts else {}
    return {
        **dict.fromkeys(FACT_COLUMNS),
        **facts,
        "scan_id": scan_id,
        "site": site,
        "status": Status(status).value,
        "error_type": error.error_type if error else None,
        "message": error.message if error else None,
        "retryable": error.retryable if error else None,
        "attempt": attempt,
        "worker": workers.get("predict") or (error.worker if error else None),
        "seconds_preprocess": seconds.get("preprocess"),
        "seconds_predict": seconds.get("predict"),
        "seconds_finish": seconds.get("finish"),
        "started": started,
        "finished": now(),
        "run_id": run_id,
        "input_fingerprint": result.input_fingerprint if result else None,
        "pipeline_fingerprint": pipeline_fingerprint,
        "model_fingerprint": model_fingerprint,
    }


def invalid_rows(problems: Sequence[Problem], run_id: str) -> list[dict]:
    """Ledger rows for manifest rows that could not become scans (one per row)."""
    rows = []
    started = now()
    for scan_id, message in invalid_scans(problems):
        error = ErrorReport(error_type="ManifestError", message=message, verdict=Verdict.INPUT)
        rows.append(attempt_row(scan_id, None, Status.INVALID, 0, run_id, started, error=error))
    return rows


def invalid_scans(problems: Sequence[Problem]) -> list[tuple[str, str]]:
    """(scan id, every problem of its row) for each manifest row that could not become
    a scan; a row without a usable id is named '(row N)'."""
    by_row: dict[int | None, list[Problem]] = {}
    for problem in problems:
        by_row.setdefault(problem.row, []).append(problem)
    found = []
    for row, of_row in by_row.items():
        scan_id = next((p.scan_id for p in of_row if p.scan_id), "") or f"(row {row})"
        found.append((scan_id, "; ".join(str(p) for p in of_row)))
    return found


def latest_attempts(out: Path, ledger: pd.DataFrame | None = None) -> pd.DataFrame:
    """The latest attempt per scan id (by finish time); invalid manifest rows left out."""
    ledger = tables.read_table(out, "ledger") if ledger is None else ledger
    attempts = ledger[ledger.status != INVALID]
    return attempts.sort_values(["finished", "attempt"]).drop_duplicates("scan_id", keep="last")


@dataclass
class ResumePlan:
    """What a rerun does with each scan of the manifest."""

    todo: list[Scan] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    redo: list[str] = field(default_factory=list)  # were ok, but inputs or outputs changed


def plan_resume(out: Path, scans: Sequence[Scan], pipeline_fingerprint: str) -> ResumePlan:
    """Split the scans into done and to-do, from the ledger and the Zarr groups."""
    latest = latest_attempts(out)
    ok = latest[latest.status == OK].set_index("scan_id")["input_fingerprint"].to_dict()

    def unchanged(scan: Scan) -> bool:
        group = masks.mask_attrs(out, scan.scan_id) or {}
        return (
            group.get("complete") is True
            and group.get("pipeline_fingerprint") == pipeline_fingerprint
            and ok[scan.scan_id] == _safe_fingerprint(scan) == group.get("input_fingerprint")
        )

    candidates = [scan for scan in scans if scan.scan_id in ok]
    with ThreadPoolExecutor(max_workers=16) as pool:  # file system latency, not CPU
        verdicts = list(pool.map(unchanged, candidates))
    done = {s.scan_id for s, same in zip(candidates, verdicts, strict=True) if same}
    plan = ResumePlan()
    for scan in scans:
        if scan.scan_id not in ok:
            plan.todo.append(scan)
        elif scan.scan_id in done:
            plan.done.append(scan.scan_id)
        else:
            plan.redo.append(scan.scan_id)
            plan.todo.append(scan)
    return plan


def _safe_fingerprint(scan: Scan) -> str | None:
    from pingu_dask.inputs.manifest import input_fingerprint

    try:
        return input_fingerprint(scan)
    except OSError:
        return None  # a file went missing: redo, and let the scan report it


@dataclass
class LedgerSummary:
    """What `pingu-dask status` and the end of a run print."""

    counts: dict[str, int]
    attempts: int
    retried: int
    failures: pd.DataFrame  # latest failed / invalid rows
    scans_per_minute: float | None
    last_finished: datetime | None
    other_scans: int = 0  # scans in the ledger that the latest manifest no longer names


def summarise_ledger(out: Path, ledger: pd.DataFrame | None = None) -> LedgerSummary:
    """Counts by the latest attempt per scan of the latest run's manifest, plus that
    run's invalid manifest rows; `other_scans` counts the scans of earlier manifests."""
    ledger = tables.read_table(out, "ledger") if ledger is None else ledger
    latest = latest_attempts(out, ledger)
    current = manifest_scans(out)
    other_scans = 0
    if current is not None:
        mine = latest.scan_id.isin(current)
        other_scans = int((~mine).sum())
        latest = latest[mine]
    latest_run = ledger.sort_values("finished")["run_id"].iloc[-1] if len(ledger) else None
    invalid = ledger[(ledger.status == INVALID) & (ledger.run_id == latest_run)]
    counts = latest["status"].value_counts().to_dict() if len(latest) else {}
    counts[INVALID] = len(invalid)
    failures = pd.concat([latest[latest.status != OK], invalid])
    failures = failures.sort_values(["error_type", "scan_id"])
    # Throughput of the latest run only: earlier runs would count the pause in between.
    ok_rows = ledger[(ledger.status == OK) & (ledger.run_id == latest_run)]
    rate = None
    if len(ok_rows) > 1:
        span = (ok_rows["finished"].max() - ok_rows["started"].min()).total_seconds()
        rate = len(ok_rows) / span * 60 if span > 0 else None
    attempts = ledger[ledger.status != INVALID]
    retried = int((attempts.attempt > 1).sum())
    last = ledger["finished"].max() if len(ledger) else None
    return LedgerSummary(counts, len(attempts), retried, failures, rate, last, other_scans)
