"""The MODEL_DIR contract of `pingu-dask train` (what tests and users read).

    MODEL_DIR/
      training.json       manifest fingerprint, cases, splits, plans, schedule, seeds,
                          versions, the command of every run
      cases.csv           one row per manifest row: included, or left out and why
      splits_final.json   the folds (nnU-Net's format; a copy is where nnU-Net reads it)
      nnUNet_raw/ nnUNet_preprocessed/ nnUNet_results/
                          nnU-Net's own three folders (its commands work with these set);
                          the model is nnUNet_results/Dataset001_pingu/Trainer__Plans__conf/
      ledger/             Parquet parts: one row per fold attempt
      validation/fold_N/  the out-of-fold predictions of fold N: a `run`'s OUT
      validation/initial/ with --init: the initial model on the same cases
      evaluation/         out_of_fold.parquet (per scan x region, by model), summary.csv
      .lock               held by the running `train`

Only the driver writes here, except the workers' case, preprocessing and fold tasks
(each into its own files). Ledger rows are few (folds x attempts): each flush is one
small part written atomically, so a killed driver loses at most the rows not yet flushed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pingu_dask.output.files import atomic_path

TRAINING_JSON = "training.json"
CASES_CSV = "cases.csv"
SPLITS_JSON = "splits_final.json"
LEDGER = "ledger"
VALIDATION = "validation"
EVALUATION = "evaluation"
INITIAL = "initial"  # the --init model's predictions, beside the folds'

#: One row per attempt at a fold.
LEDGER_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("fold", pa.int64()),
        ("attempt", pa.int64()),
        # ok | retried (a transient failure, another attempt followed) | failed (for good)
        # | lost (its worker left, Dask handed the task to another) | interrupted
        ("status", pa.string()),
        ("from_epoch", pa.int64()),  # the checkpoint it started from (0: afresh)
        ("epochs_reached", pa.int64()),  # epochs completed when it ended
        ("checkpoint_epoch", pa.int64()),  # epochs held by the latest checkpoint then
        ("epochs", pa.int64()),  # the schedule's epochs
        ("worker", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("iterations_per_second", pa.float64()),
        ("data_wait_share", pa.float64()),
        ("started", pa.timestamp("us", tz="UTC")),
        ("finished", pa.timestamp("us", tz="UTC")),
    ]
)
LEDGER_COLUMNS = tuple(LEDGER_SCHEMA.names)


def now() -> datetime:
    return datetime.now(UTC)


def write_ledger_rows(model_dir: Path, rows: Sequence[dict]) -> Path | None:
    """One Parquet part of fold attempts (atomic); None when there is nothing to write."""
    if not rows:
        return None
    folder = Path(model_dir) / LEDGER
    folder.mkdir(parents=True, exist_ok=True)
    columns = {name: [row.get(name) for row in rows] for name in LEDGER_COLUMNS}
    table = pa.table(columns, schema=LEDGER_SCHEMA)
    path = folder / f"part-{now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.parquet"
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)
    return path


def read_ledger(model_dir: Path) -> pd.DataFrame:
    """Every fold attempt so far, oldest first (an empty frame with the columns if none)."""
    folder = Path(model_dir) / LEDGER
    parts = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not parts:
        return LEDGER_SCHEMA.empty_table().to_pandas()
    frame = pd.concat([pq.read_table(p, schema=LEDGER_SCHEMA).to_pandas() for p in parts])
    return frame.sort_values(["finished", "fold", "attempt"]).reset_index(drop=True)


def finished_folds(model_dir: Path) -> set[int]:
    """Folds whose latest ledger row is ok."""
    ledger = read_ledger(model_dir)
    if ledger.empty:
        return set()
    latest = ledger.drop_duplicates("fold", keep="last")
    return {int(fold) for fold in latest.loc[latest.status == "ok", "fold"]}


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2, default=str))


def read_training_json(model_dir: Path) -> dict | None:
    path = Path(model_dir) / TRAINING_JSON
    return json.loads(path.read_text()) if path.exists() else None


def write_cases_table(model_dir: Path, rows: Sequence[dict]) -> Path:
    """MODEL_DIR/cases.csv: every manifest row, included or left out with its reason."""
    path = Path(model_dir) / CASES_CSV
    with atomic_path(path) as temporary:
        pd.DataFrame(list(rows)).to_csv(temporary, index=False)
    return path


def read_cases_table(model_dir: Path) -> pd.DataFrame | None:
    """MODEL_DIR/cases.csv as written by an earlier train, or None (none yet, or one
    written before input fingerprints were recorded: nothing to compare)."""
    path = Path(model_dir) / CASES_CSV
    if not path.exists():
        return None
    cases = pd.read_csv(path, dtype={"scan_id": str, "input_fingerprint": str})
    return cases if "input_fingerprint" in cases else None


def validation_out(model_dir: Path, fold: int | str) -> Path:
    """The OUT of a fold's out-of-fold predictions (or INITIAL: the --init model's)."""
    name = INITIAL if fold == INITIAL else f"fold_{fold}"
    return Path(model_dir) / VALIDATION / name
