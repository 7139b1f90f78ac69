"""The Parquet tables of the output directory: fixed schemas, writing in parts, reading.

    OUT/tables/regions/     one row per scan x region
    OUT/tables/clusters/    one row per cluster
    OUT/tables/evaluation/  one row per scan x region, for scans with a reference
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

import itertools
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pingu_dask.inputs.manifest import Scan
from pingu_dask.output.files import atomic_path

TABLES = "tables"
LEDGER = "ledger"
DATA_TABLES = ("regions", "clusters", "evaluation")
REPLACED_PART = "part-replaced.parquet"  # written by replace_table, vouched for by itself
COMPACT_ROWS_PER_PART = 1_000_000  # compact_tables fills parts up to about this many rows
_ROW_GROUP_ROWS = 128 * 1024  # rows per Parquet row group in a compacted part
_FILES_PER_SCAN = 256  # parts read by one pyarrow scan (see _slices)
_BATCHES_PER_CHUNK = 1024  # small batches copied into one while compacting (_row_groups)
_COMPACTED = re.compile(
    r"^part-(?P<key>.+)\.(?P<token>compact-\d{8}T\d{6}-[0-9a-f]{12})-\d{4}\.parquet$"
)
_COMMITS = "_compact-*.json"  # in the ledger folder: one per compaction, see compact_tables

logger = logging.getLogger(__name__)

_SCAN = [
    ("scan_id", pa.string()),
    ("subject", pa.string()),
    ("session", pa.string()),
    ("site", pa.string()),
]
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
        ]
    ),
    "clusters": pa.schema(
        [
            ("scan_id", pa.string()),
            ("cluster", pa.int64()),
            ("region", pa.string()),
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
        ]
    ),
}


def scan_columns(scan: Scan) -> dict[str, str | None]:
    """The identifying columns every per-scan table row starts with."""
    return {
        "scan_id": scan.scan_id,
        "subject": scan.subject,
        "session": scan.session,
        "site": scan.site,
    }


def to_table(name: str, rows: list[dict] | Mapping[str, object]) -> pa.Table:
    """Rows (list of dicts) or columns (mapping) -> a table with the fixed schema `name`."""
    schema = SCHEMAS[name]
    if isinstance(rows, Mapping):
        return pa.Table.from_pydict({f: rows[f] for f in schema.names}, schema=schema)
    return pa.Table.from_pylist(rows, schema=schema)


class TableWriter:
    """Buffers table rows from finished scans and writes them as Parquet parts.

    A flush happens every `every_scans` scans or `every_seconds` seconds (whichever
    comes first; the runner calls flush_if_due while it waits) and at close, so a
    crashed driver loses at most that tail, and those scans are simply redone on
    resume. Defaults come from the `pingu` config (flush-every-scans / -seconds).
    """

    def __init__(
        self, out: Path, every_scans: int | None = None, every_seconds: float | None = None
    ) -> None:
        from pingu_dask.config import setting

        self.out = Path(out)
        self.every_scans = every_scans or int(setting("flush-every-scans"))
        self.every_seconds = every_seconds or float(setting("flush-every-seconds"))
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
        if self._scans >= self.every_scans:
            self.flush()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        if self._scans and time.monotonic() - self._last_flush >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        if self._ledger_rows:
            self._buffers[LEDGER].append(to_table(LEDGER, self._ledger_rows))
            self._ledger_rows = []
        if any(self._buffers.values()):
            flush_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
            for name in (*DATA_TABLES, LEDGER):  # the ledger last: it vouches for the rest
                if self._buffers[name]:
                    write_part(self.out, name, pa.concat_tables(self._buffers[name]), flush_id)
                    self._buffers[name].clear()
            self.flushes += 1
        self._scans = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def parts(out: Path, name: str) -> list[Path]:
    """The part files that hold one table, oldest flush first.

    Parts of a compaction that has not committed, and parts that a committed one
    superseded but has not deleted yet, are left out: either way their rows are in
    the other parts, and reading both would double them. A reader may list parts
    while a run compacts (`pingu-dask status`), so the compactions are read before
    and after the listing, and the listing repeated until they agree: a commit in
    between would otherwise pair a listing with the wrong state and drop rows.
    """
    state = _compactions(out)
    while True:
        found = _all_parts(out, name)
        again = _compactions(out)
        if again == state:
            return [part for part in found if state.visible(name, part.name)]
        state = again


def _all_parts(out: Path, name: str) -> list[Path]:
    """Every part file of one table on disk, in flush order (see _flush_key)."""
    folder = Path(out) / TABLES / name
    if not folder.is_dir():
        return []
    return sorted(folder.glob("part-*.parquet"), key=lambda p: (_flush_key(p.name), p.name))


def _flush_key(part_name: str) -> str:
    """Where a part stands in flush order: its flush id, or for a compacted part the
    flush id of the first part it holds (so compaction never reorders rows)."""
    match = _COMPACTED.match(part_name)
    return match["key"] if match else part_name.removeprefix("part-").removesuffix(".parquet")


def _token(part_name: str) -> str | None:
    """The compaction that wrote this part, or None for a part written by a flush."""
    match = _COMPACTED.match(part_name)
    return match["token"] if match else None


def remove_orphan_parts(out: Path) -> int:
    """Delete data parts whose flush has no ledger part (a driver died mid-flush).

    First settles a compaction a crash interrupted (finishing or undoing it); the
    parts of a committed compaction are vouched for by its commit file, not by name.
    Returns the parts removed that no ledger vouched for.
    """
    removed = _settle_compactions(out)
    vouched = {p.name for p in parts(out, LEDGER)} | {REPLACED_PART}
    for name in DATA_TABLES:
        for part in parts(out, name):
            if _token(part.name) is None and part.name not in vouched:
                part.unlink()
                removed += 1
    return removed


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
    pieces = [_dataset(some, schema).to_table().combine_chunks() for some in _slices(files)]
    return pa.concat_tables(pieces).to_pandas()


def _dataset(files: list[Path], schema: pa.Schema) -> ds.Dataset:
    return ds.dataset(files, format="parquet", schema=schema)


def _slices(files: list[Path]) -> Iterator[list[Path]]:
    """A few hundred files at a time: a scan holds on to ~60 KiB per file it has
    opened until it ends, which at 100,000 small parts would be gigabytes."""
    for start in range(0, len(files), _FILES_PER_SCAN):
        yield files[start : start + _FILES_PER_SCAN]


# --- compaction ---------------------------------------------------------------------
@dataclass
class _Compactions:
    """The compactions recorded in the ledger folder: which committed, and which have
    superseded parts still on disk (a crash came between commit and clean-up)."""

    committed: set[str] = field(default_factory=set)
    # token -> table -> names of the parts it superseded that may still be on disk
    pending: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    superseded: dict[str, set[str]] = field(default_factory=dict)  # table -> those names

    def visible(self, table: str, part_name: str) -> bool:
        token = _token(part_name)
        if token is not None and token not in self.committed:
            return False
        return part_name not in self.superseded.get(table, ())


def _commit_path(out: Path, token: str) -> Path:
    return Path(out) / TABLES / LEDGER / f"_{token}.json"


def _compactions(out: Path) -> _Compactions:
    state = _Compactions()
    folder = Path(out) / TABLES / LEDGER
    for path in folder.glob(_COMMITS) if folder.is_dir() else ():
        try:
            commit = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # deleted since the listing: it vouched for no part any more
        state.committed.add(commit["token"])
        if commit.get("supersedes"):
            state.pending[commit["token"]] = commit["supersedes"]
            for table, names in commit["supersedes"].items():
                state.superseded.setdefault(table, set()).update(names)
    return state


def _write_commit(out: Path, token: str, supersedes: Mapping[str, list[str]]) -> None:
    """Commit a compaction: from this rename on, its parts hold the rows and the parts
    it lists are superseded. Synced, because the superseded ones are deleted next."""
    path = _commit_path(out, token)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps({"token": token, "supersedes": supersedes}) + "\n")
        _fsync(temporary)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, where the system allows."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems cannot sync a folder
    finally:
        os.close(descriptor)


def _delete_superseded(out: Path, supersedes: Mapping[str, list[str]]) -> None:
    """Delete what a committed compaction superseded: data tables first, the ledger
    last, so that even without the commit file a leftover data part would be an
    orphan (its ledger part gone) rather than a double."""
    for name in sorted(supersedes, key=lambda table: table == LEDGER):
        folder = Path(out) / TABLES / name
        for part_name in supersedes[name]:
            (folder / part_name).unlink(missing_ok=True)


def _settle_compactions(out: Path) -> int:
    """Finish what a crash left of a compaction, so that one state holds on disk.

    A committed compaction with superseded parts left: delete them, then rewrite the
    commit without its list. Parts of a compaction that never committed: delete them
    (their rows are still in the parts they were to replace). A commit none of whose
    parts exist any more (a later compaction superseded them all): delete it.
    Returns the uncommitted parts deleted. Call it holding OUT's lock.
    """
    state = _compactions(out)
    for token, supersedes in state.pending.items():
        _delete_superseded(out, supersedes)
        _write_commit(out, token, {})
    removed = 0
    live: set[str] = set()
    for name in SCHEMAS:
        for part in _all_parts(out, name):
            token = _token(part.name)
            if token in state.committed:
                live.add(token)
            elif token is not None:
                part.unlink()
                removed += 1
    for token in state.committed - live:
        _commit_path(out, token).unlink(missing_ok=True)
    return removed


def compact_if_fragmented(out: Path) -> dict[str, tuple[int, int]]:
    """compact_tables when a table has more parts than config pingu.compact-above-parts
    (None: never). run_cohort calls it at the start and the end of a run; it costs a
    listing of the table folders when there is nothing to do. Compaction is only
    housekeeping and never loses rows, so an OSError (a full disk) is logged and the
    next run tries again, rather than failing a run whose scans are all done."""
    from pingu_dask.config import setting

    above = setting("compact-above-parts")
    if above is None:
        return {}
    try:
        return compact_tables(out, above_parts=int(above))
    except OSError as error:
        logger.warning("table compaction failed, left for the next run: %s", error)
        return {}


def compact_tables(
    out: Path, max_rows_per_part: int | None = None, *, above_parts: int = 1
) -> dict[str, tuple[int, int]]:
    """Merge each table's small parts into few large ones; files (before, after) per table.

    Why: a run flushes every few scans or seconds, so 100,000 slow scans leave about
    100,000 small files per table, which file systems (quotas on inodes) and every
    reader pay for. Nothing happens unless some table has more than `above_parts`
    parts and merging would make fewer files.

    What merges: consecutive parts in flush order, streamed (memory stays small) into
    parts of about `max_rows_per_part` rows (COMPACT_ROWS_PER_PART), each named after
    the first flush it holds, so read_table gives the same rows in the same order.
    Left alone: compacted parts already at least half full, REPLACED_PART (a table
    replace_table wrote stays one part, and a new replace_table never meets a part of
    the same name listed as superseded), and data parts no ledger part vouches for
    (orphans, for remove_orphan_parts). Every other flush part is rewritten, even
    alone, because its ledger part, which vouched for it by name, is merged away.

    Crash safety: a compaction has a token; its parts (part-KEY.TOKEN-NNNN.parquet)
    are written first (atomically, synced) and count for nothing until the commit,
    OUT/tables/ledger/_TOKEN.json, is renamed into place listing the parts it
    supersedes; only then are those deleted, and the list dropped from the commit.
    parts() hides uncommitted compacted parts and superseded ones, so a crash at any
    point neither loses nor doubles rows; the next remove_orphan_parts (or
    compact_tables) finishes or undoes it. drop_scans rewrites compacted parts under
    the same name, so their commit still vouches for them. Call it holding OUT's lock.
    """
    out = Path(out)
    _settle_compactions(out)
    before = {name: parts(out, name) for name in SCHEMAS}
    counts = {name: (len(files), len(files)) for name, files in before.items()}
    if not any(len(files) > above_parts for files in before.values()):
        return counts
    max_rows = max_rows_per_part or COMPACT_ROWS_PER_PART
    vouched = {p.name for p in before[LEDGER]}
    runs = {name: _runs(files, name, vouched, max_rows) for name, files in before.items()}
    if not any(len(run) > 1 for table_runs in runs.values() for run in table_runs):
        return counts  # nothing to gain: every part is full, alone or not ours to merge
    token = f"compact-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
    for name in (*DATA_TABLES, LEDGER):
        _merge_runs(out, name, runs[name], token, max_rows)
    supersedes = {name: [p.name for run in runs[name] for p in run] for name in SCHEMAS}
    _write_commit(out, token, supersedes)
    _settle_compactions(out)  # deletes what it superseded, then drops the list
    return {name: (len(before[name]), len(parts(out, name))) for name in SCHEMAS}


def _runs(files: list[Path], name: str, vouched: set[str], max_rows: int) -> list[list[Path]]:
    """The stretches of consecutive parts to merge (see compact_tables: what merges)."""
    runs: list[list[Path]] = [[]]
    for part in files:
        if _left_alone(part, name, vouched, max_rows):
            runs.append([])
        else:
            runs[-1].append(part)
    return [run for run in runs if len(run) > 1 or any(_token(p.name) is None for p in run)]


def _left_alone(part: Path, name: str, vouched: set[str], max_rows: int) -> bool:
    if part.name == REPLACED_PART:
        return True
    if _token(part.name) is None:
        return name != LEDGER and part.name not in vouched  # an orphan
    return pq.read_metadata(part).num_rows >= max_rows // 2  # compacted, already full


def _merge_runs(out: Path, name: str, runs: list[list[Path]], token: str, max_rows: int) -> None:
    """Write the compacted parts of one table (not yet committed)."""
    folder = Path(out) / TABLES / name
    schema = SCHEMAS[name]
    numbers = itertools.count()
    for run in runs:
        for first, batches in _chunks(_tagged_batches(run, schema), max_rows):
            key = _flush_key(Path(first).name)
            path = folder / f"part-{key}.{token}-{next(numbers):04d}.parquet"
            with atomic_path(path) as temporary:
                with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
                    for table in _row_groups(batches, schema, _ROW_GROUP_ROWS):
                        writer.write_table(table, row_group_size=len(table))
                _fsync(temporary)
    _fsync(folder)


def _tagged_batches(files: list[Path], schema: pa.Schema) -> Iterator[tuple[str, pa.RecordBatch]]:
    """The rows of `files` in their order, as (part, batch); scan_batches keeps the
    order of the files, and says which file each batch came from."""
    for some in _slices(files):
        scanner = _dataset(some, schema).scanner(batch_size=_ROW_GROUP_ROWS)
        for tagged in scanner.scan_batches():
            yield tagged.fragment.path, tagged.record_batch


def _chunks(
    tagged: Iterator[tuple[str, pa.RecordBatch]], max_rows: int
) -> Iterator[tuple[str, Iterator[pa.RecordBatch]]]:
    """Split an ordered stream of (part, batch) into compacted parts: a new one starts
    at the first part boundary after `max_rows` rows (parts are never split). Yields
    the first part's path and that compacted part's batches (consume before the next)."""
    state = {"number": 0, "rows": 0, "part": None}
    firsts: dict[int, str] = {}  # compacted part number -> the first part it holds

    def number(item: tuple[str, pa.RecordBatch]) -> int:
        part, batch = item
        if part != state["part"]:
            state["part"] = part
            if state["rows"] >= max_rows:
                state["number"], state["rows"] = state["number"] + 1, 0
        state["rows"] += batch.num_rows
        firsts.setdefault(state["number"], part)
        return state["number"]

    for chunk, group in itertools.groupby(tagged, key=number):
        yield firsts[chunk], (batch for _, batch in group)


def _row_groups(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, rows: int
) -> Iterator[pa.Table]:
    """Gather small batches (one flush each) into tables of at least `rows` rows.

    Every _BATCHES_PER_CHUNK batches are copied into one: a batch of one row costs
    ~10 KiB of bookkeeping, so 100,000 of them held at once would cost a gigabyte."""
    chunks: list[pa.Table] = []
    small: list[pa.RecordBatch] = []
    buffered = 0
    for batch in batches:
        small.append(batch)
        buffered += batch.num_rows
        if len(small) >= _BATCHES_PER_CHUNK:
            chunks.append(pa.Table.from_batches(small, schema).combine_chunks())
            small = []
        if buffered >= rows:
            yield pa.concat_tables([*chunks, pa.Table.from_batches(small, schema)])
            chunks, small, buffered = [], [], 0
    if buffered:
        yield pa.concat_tables([*chunks, pa.Table.from_batches(small, schema)])
