"""OUT/tables/scans: one row per scan of the latest manifest, whatever became of it.

The table a statistician opens first: every scan the manifest names is a row, the
failed, the invalid and those not yet run too, with its status and reason, how its
file was stored (orientation, voxel size), what the pre-flight checks flagged, where
its regions came from, and the model and pipeline that made its figures. A cohort's
missing scans are then visible instead of silently absent.

It is made from the ledger (each attempt's row carries the facts its worker measured)
and rewritten whole at the end of every run, under the run's lock. Failed attempts
carry no facts from the worker; for those the header is read here (cheap, and only for
scans that failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from pingu_dask.inputs.imaging import ImageError, read_info
from pingu_dask.inputs.manifest import Problem, Scan, scan_columns
from pingu_dask.inputs.orientation import orientation_code
from pingu_dask.output import ledger, tables
from pingu_dask.output.parts import LEDGER
from pingu_dask.records import Status

SCANS = "scans"
NOT_RUN = "not_run"  # a manifest scan with no attempt yet (e.g. after Ctrl-C)


def scans_rows(out: Path, scans: Sequence[Scan], problems: Sequence[Problem] = ()) -> list[dict]:
    """The scans table's rows: the manifest's valid scans in manifest order, then one
    row per invalid manifest row (from `problems`)."""
    attempts = tables.read_table(out, LEDGER)
    valid = attempts[attempts.status != ledger.INVALID]
    tries = valid.groupby("scan_id").size().to_dict() if len(valid) else {}  # over all runs
    latest = ledger.latest_attempts(out, attempts).set_index("scan_id")
    rows = []
    for scan in scans:
        row: dict = {**scan_columns(scan), **dict.fromkeys(tables.FACT_COLUMNS)}
        if scan.scan_id in latest.index:
            attempt = latest.loc[scan.scan_id]
            row.update(_attempt_columns(attempt))
            row["attempts"] = int(tries.get(scan.scan_id, 0))
        else:
            row.update(status=NOT_RUN, attempts=0)
        if row["status"] == Status.FAILED.value and row["stored_orientation"] is None:
            row.update(_header_facts(scan))
        rows.append(row)
    rows.extend(_invalid_rows(problems))
    return rows


def write_scans_table(out: Path, scans: Sequence[Scan], problems: Sequence[Problem] = ()) -> int:
    """(Re)write OUT/tables/scans from the ledger; returns the number of rows."""
    rows = scans_rows(out, scans, problems)
    tables.replace_table(out, SCANS, pa.Table.from_pylist(rows, schema=tables.SCHEMAS[SCANS]))
    return len(rows)


def read_scans(out: Path) -> pd.DataFrame:
    """The scans table as written by the latest run (empty for an older OUT)."""
    return tables.read_table(out, SCANS)


def _attempt_columns(attempt: pd.Series) -> dict:
    ok = attempt["status"] == Status.OK.value
    reason = None
    if not ok:
        reason = f"{attempt['error_type']}: {attempt['message']}"
    columns = {
        "status": attempt["status"],
        "reason": reason,
        "model_fingerprint": attempt.get("model_fingerprint"),
        "pipeline_fingerprint": attempt.get("pipeline_fingerprint"),
        "finished": attempt.get("finished"),
    }
    for name in tables.FACT_COLUMNS:
        value = attempt.get(name)
        columns[name] = None if _missing(value) else value
    return columns


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _header_facts(scan: Scan) -> dict:
    """Stored orientation and voxel size from the first channel's header, where it can
    be read (a failed scan's worker reports no facts)."""
    try:
        info = read_info(scan.channel_paths[0])
    except (ImageError, IndexError):
        return {}
    x, y, z = (float(v) for v in info.spacing[:3])
    return {
        "stored_orientation": orientation_code(info.affine),
        "voxel_size_x_mm": x,
        "voxel_size_y_mm": y,
        "voxel_size_z_mm": z,
        "region_source": None,
    }


def _invalid_rows(problems: Sequence[Problem]) -> list[dict]:
    """One row per manifest row that could not become a scan."""
    return [
        {
            "scan_id": scan_id,
            "status": Status.INVALID.value,
            "reason": f"ManifestError: {message}",
            "attempts": 0,
        }
        for scan_id, message in ledger.invalid_scans(problems)
    ]
