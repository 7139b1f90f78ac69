"""The Parquet tables of the output directory: fixed schemas, writing in parts, reading.

    OUT/tables/regions/     one row per scan x region
    OUT/tables/clusters/    one row per cluster
    OUT/tables/evaluation/  one row per scan x region, for scans with a reference
    OUT/tables/structures/  one row per scan x non-PVS model label (e.g. WMH volume)
    OUT/tables/ledger/      one row per attempt at a scan: what happened and why

Only the driver writes tables. Rows are buffered and written together as one
"flush": a part file per table, all named after the flush id, the ledger's part
last. A data part whose flush has no ledger part (the driver died in between) is an
orphan, removed on the next run, so the tables never hold rows that the ledger does
not vouch for. Parts are written under a hidden temporary name, then renamed;
readers (pandas, pyarrow, DuckDB) skip names starting with '.' or '_'.

A long run with slow scans flushes often, so tables grow to one small part per flush;
compact_tables merges them into few large parts (see its docstring for how a crash in
the middle neither loses nor doubles rows).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pingu_dask.config import DEFAULTS
from pingu_dask.output.files import atomic_path
from pingu_dask.output.parts import DATA_TABLES, LEDGER, REPLACED_PART, TABLES, new_token, parts
from pingu_dask.records import ScanRows

_FILES_PER_SCAN = 256  # parts read by one pyarrow scan (see in_slices)

logger = logging.getLogger(__name__)

_SCAN = [
    ("scan_id", pa.string()),
    ("subject", pa.string()),
    ("session", pa.string()),
    ("site", pa.string()),
]
#: What the worker learnt of a scan (records.ScanFacts.columns): in the ledger rows of
#: its attempts, and so in the scans table.
_FACTS = [
    ("stored_orientation", pa.string()),
    ("voxel_size_x_mm", pa.float64()),
    ("voxel_size_y_mm", pa.float64()),
    ("voxel_size_z_mm", pa.float64()),
    ("flags", pa.string()),  # pre-flight flags, ';'-joined ('' none)
    ("region_source", pa.string()),  # the region table used, or 'none'
    ("brain_rule", pa.bool_()),  # whether clusters outside the brain could be dropped
    ("icv_mm3", pa.float64()),  # where the parcellation gives it
]
FACT_COLUMNS = tuple(name for name, _ in _FACTS)
_STATISTICS = [
    (f"{name}_volume_mm3", pa.float64()) for name in ("total", "mean", "median", "sd", "min", "max")
]
SCHEMAS: dict[str, pa.Schema] = {
    "regions": pa.schema(
        [
            *_SCAN,
            ("region", pa.string()),
            ("n_clusters", pa.int64()),
            ("n_voxels", pa.int64()),
            *_STATISTICS,
            # whole_brain row: clusters dropped by the brain rule (not counted above);
            # null where it did not run, and in parts written before it existed.
            ("n_clusters_outside_brain", pa.int64()),
            # The region's tissue on the image grid (parcellation voxels x voxel
            # volume; whole_brain: every labelled voxel) and total PVS volume / it.
            # Null without a parcellation.
            ("tissue_volume_mm3", pa.float64()),
            ("pvs_volume_fraction", pa.float64()),
            # Where the regions came from: the parcellation's region table, "atlas",
            # "model" (the model's region-specific labels) or "none" (whole brain).
            ("region_source", pa.string()),
        ]
    ),
    "clusters": pa.schema(
        [
            *_SCAN,
            ("cluster", pa.int64()),
            ("region", pa.string()),
            ("label", pa.string()),  # the model label most of the cluster's voxels carry
            ("region_source", pa.string()),
            ("n_voxels", pa.int64()),
            ("volume_mm3", pa.float64()),
            ("centroid_x_mm", pa.float64()),
            ("centroid_y_mm", pa.float64()),
            ("centroid_z_mm", pa.float64()),
            ("length_mm", pa.float64()),
            ("width_mm", pa.float64()),
        ]
    ),
    "evaluation": pa.schema(
        [
            *_SCAN,
            ("region", pa.string()),
            ("voxel_dice", pa.float64()),
            ("cluster_precision", pa.float64()),
            ("cluster_recall", pa.float64()),
            ("cluster_f1", pa.float64()),
            ("n_predicted_clusters", pa.int64()),
            ("n_reference_clusters", pa.int64()),
            ("predicted_voxels", pa.int64()),
            ("reference_voxels", pa.int64()),
            ("predicted_volume_mm3", pa.float64()),
            ("reference_volume_mm3", pa.float64()),
            # True: the reference went through the size filter and exclusions as well
            # (--filter-reference); False: compared as given; null: written before this
            # was recorded (such tables filtered the reference).
            ("reference_filtered", pa.bool_()),
        ]
    ),
    # The model's labels that are not PVS (e.g. WMH): one row per scan x label, never
    # counted as PVS. Empty for a model that labels PVS only.
    "structures": pa.schema(
        [
            *_SCAN,
            ("label", pa.string()),
            ("label_value", pa.int64()),
            ("n_voxels", pa.int64()),
            ("volume_mm3", pa.float64()),
        ]
    ),
    "ledger": pa.schema(
        [
            ("scan_id", pa.string()),
            ("site", pa.string()),
            ("status", pa.string()),  # ok | failed | invalid
            ("error_type", pa.string()),
            ("message", pa.string()),
            ("retryable", pa.bool_()),
            ("attempt", pa.int64()),
            ("worker", pa.string()),
            ("seconds_preprocess", pa.float64()),
            ("seconds_predict", pa.float64()),
            ("seconds_finish", pa.float64()),
            ("started", pa.timestamp("ms", tz="UTC")),
            ("finished", pa.timestamp("ms", tz="UTC")),
            ("run_id", pa.string()),
            ("input_fingerprint", pa.string()),
            ("pipeline_fingerprint", pa.string()),
            ("model_fingerprint", pa.string()),
            *_FACTS,
        ]
    ),
    # One row per scan of the latest manifest, failed, invalid and not yet run ones
    # too (output/scans.py makes it from the ledger at the end of every run).
    "scans": pa.schema(
        [
            *_SCAN,
            ("status", pa.string()),  # ok | failed | invalid | not_run
            ("reason", pa.string()),  # why not ok: the error type and message
            ("attempts", pa.int64()),  # over every run (the ledger's rows for the scan)
            *_FACTS,
            ("model_fingerprint", pa.string()),
            ("pipeline_fingerprint", pa.string()),
            ("finished", pa.timestamp("ms", tz="UTC")),
        ]
    ),
}


def scan_tables(rows: ScanRows) -> dict[str, pa.Table | None]:
    """One scan's rows as Arrow tables with the fixed schemas."""
    evaluation = None if rows.evaluation is None else to_table("evaluation", rows.evaluation)
    return {
        "regions": to_table("regions", rows.regions),
        "clusters": to_table("clusters", rows.clusters),
        "evaluation": evaluation,
        "structures": to_table("structures", rows.structures) if rows.structures else None,
    }


def to_table(name: str, rows: list[dict] | Mapping[str, object]) -> pa.Table:
    """Rows (list of dicts) or columns (mapping) -> a table with the fixed schema `name`."""
    schema = SCHEMAS[name]
    if isinstance(rows, Mapping):
        return pa.Table.from_pydict({f: rows[f] for f in schema.names}, schema=schema)
    return pa.Table.from_pylist(rows, schema=schema)


@dataclass(frozen=True)
class FlushEvery:
    """How often TableWriter writes its rows: after this many scans or seconds."""

    scans: int = DEFAULTS["pingu"]["flush-every-scans"]
    seconds: float = DEFAULTS["pingu"]["flush-every-seconds"]


class TableWriter:
    """Buffers table rows from finished scans and writes them as Parquet parts.

    A flush happens every `flush.scans` scans or `flush.seconds` seconds (whichever
    comes first; the runner calls flush_if_due while it waits) and at close, so a
    crashed driver loses at most that tail, and those scans are simply redone on
    resume. The run's values come from its settings (run/settings.py).
    """

    def __init__(self, out: Path, flush: FlushEvery | None = None) -> None:
        self.out = Path(out)
        self.flush_every = flush if flush is not None else FlushEvery()
        self._buffers: dict[str, list[pa.Table]] = {name: [] for name in SCHEMAS}
        self._ledger_rows: list[dict] = []
        self._scans = 0
        self._last_flush = time.monotonic()
        self.flushes = 0

    def add(self, tables: Mapping[str, pa.Table | None], ledger_rows: Iterable[dict] = ()) -> None:
        """Add one attempt's tables (by name) and ledger rows; flush when due.

        Ledger rows stay Python dicts until the flush: one Arrow conversion per flush
        instead of one per scan keeps the driver's loop short.
        """
        for name, table in tables.items():
            if table is not None and table.num_rows:
                self._buffers[name].append(table)
        self._ledger_rows.extend(ledger_rows)
        self._scans += 1
        if self._scans >= self.flush_every.scans:
            self.flush()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        if self._scans and time.monotonic() - self._last_flush >= self.flush_every.seconds:
            self.flush()

    def flush(self) -> None:
        if self._ledger_rows:
            self._buffers[LEDGER].append(to_table(LEDGER, self._ledger_rows))
            self._ledger_rows = []
        if any(self._buffers.values()):
            flush_id = new_token()
            written: list[Path] = []
            try:
                for name in (*DATA_TABLES, LEDGER):  # the ledger last: it vouches for the rest
                    if self._buffers[name]:
                        table = pa.concat_tables(self._buffers[name])
                        written.append(write_part(self.out, name, table, flush_id))
            except BaseException:
                # All or nothing (e.g. a full disk): the parts written are orphans without
                # the ledger's; remove them and keep every buffer, so that a later flush
                # writes the rows again, all under one new flush id.
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            for buffer in self._buffers.values():
                buffer.clear()
            self.flushes += 1
        self._scans = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # Ctrl-C or a driver error: still write what finished...
            self.close()
        except Exception as error:  # ...but a write that fails too (a full disk) must not
            # hide the error on its way out; those scans have no ledger row: redone next run
            logger.info("the last rows were not written (%s); the next run redoes them", error)


def _write_parquet(table: pa.Table, path: Path) -> Path:
    """Write under a hidden temporary name, then rename: readers see all or nothing."""
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="zstd")
    return path


def write_part(out: Path, name: str, table: pa.Table, flush_id: str) -> Path:
    """Write one part atomically: OUT/tables/NAME/part-FLUSH_ID.parquet."""
    folder = Path(out) / TABLES / name
    folder.mkdir(parents=True, exist_ok=True)
    return _write_parquet(table.cast(SCHEMAS[name]), folder / f"part-{flush_id}.parquet")


def drop_scans(out: Path, scan_ids: Iterable[str]) -> int:
    """Remove every data-table row of these scans (they are about to be redone).

    Only parts that hold such rows are rewritten (same name, atomically), so this
    costs nothing when no finished scan is redone. Returns the rows removed.
    """
    chosen = pa.array(sorted(set(scan_ids)), pa.string())
    if not len(chosen):
        return 0
    removed = 0
    for name in DATA_TABLES:
        for part in parts(out, name):
            table = pq.read_table(part)
            hit = pc.is_in(table["scan_id"], value_set=chosen)
            count = pc.sum(hit).as_py() or 0
            if count:
                _write_parquet(table.filter(pc.invert(hit)), part)
                removed += count
    return removed


def replace_table(out: Path, name: str, table: pa.Table) -> None:
    """Make `table` the whole of OUT/tables/NAME (e.g. a re-run evaluation).

    The new part is written in a hidden folder, which then takes the old folder's place.
    """
    folder = Path(out) / TABLES / name
    fresh = folder.with_name(f".{name}-new-{uuid.uuid4().hex[:8]}")
    fresh.mkdir(parents=True)
    _write_parquet(table.cast(SCHEMAS[name]), fresh / REPLACED_PART)
    old = folder.with_name(f".{name}-old-{uuid.uuid4().hex[:8]}")
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_table(out: Path, name: str) -> pd.DataFrame:
    """One table of OUT as a pandas DataFrame (empty, with its columns, when no parts)."""
    for _ in range(2):
        try:
            return _read_parts(parts(out, name), SCHEMAS[name])
        except FileNotFoundError:
            # A compaction (in the run holding OUT's lock) deleted parts it had just
            # superseded between our listing and our reading: list again.
            continue
    return _read_parts(parts(out, name), SCHEMAS[name])


def _read_parts(files: list[Path], schema: pa.Schema) -> pd.DataFrame:
    if not files:
        return schema.empty_table().to_pandas()
    # One chunk per slice, not one per part: 100,000 tiny chunks cost ~20 KiB each.
    pieces = [
        parquet_dataset(some, schema).to_table().combine_chunks() for some in in_slices(files)
    ]
    return pa.concat_tables(pieces).to_pandas()


def parquet_dataset(files: list[Path], schema: pa.Schema) -> ds.Dataset:
    return ds.dataset(files, format="parquet", schema=schema)


def in_slices(files: list[Path]) -> Iterator[list[Path]]:
    """A few hundred files at a time: a scan holds on to ~60 KiB per file it has
    opened until it ends, which at 100,000 small parts would be gigabytes."""
    for start in range(0, len(files), _FILES_PER_SCAN):
        yield files[start : start + _FILES_PER_SCAN]
