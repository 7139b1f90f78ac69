"""Compaction: many small Parquet parts of a table merged into few large ones.

A long run with slow scans flushes often, so a table grows to one small part per flush
(100,000 files on a cluster file system). compact_tables merges them, in flush order,
into parts of up to ~1,000,000 rows under a new token, then commits by writing one
commit file that lists what it supersedes, then deletes those (parts.py: how a crash
at any point neither loses nor doubles rows). run_cohort compacts at the start and the
end of a run when a table has more parts than the run's compact-above-parts setting.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pingu_dask.output.files import atomic_path
from pingu_dask.output.parts import (
    DATA_TABLES,
    FLUSHED_TABLES,
    LEDGER,
    REPLACED_PART,
    TABLES,
    compaction_token,
    flush_key,
    fsync,
    new_token,
    parts,
    settle_compactions,
    write_commit,
)
from pingu_dask.output.tables import SCHEMAS, in_slices, parquet_dataset

logger = logging.getLogger(__name__)

COMPACT_ROWS_PER_PART = 1_000_000  # compact_tables fills parts up to about this many rows


_ROW_GROUP_ROWS = 128 * 1024  # rows per Parquet row group in a compacted part


_BATCHES_PER_CHUNK = 1024  # small batches copied into one while compacting (_row_groups)


def compact_if_fragmented(out: Path, above_parts: int | None) -> dict[str, tuple[int, int]]:
    """compact_tables when a table has more parts than `above_parts` (the run's
    pingu.compact-above-parts; None: never). run_cohort calls it at the start and the
    end of a run; it costs a listing of the table folders when there is nothing to do.
    Compaction is only housekeeping and never loses rows, so an OSError (a full disk)
    is logged and the next run tries again, rather than failing a run whose scans are
    all done."""
    if above_parts is None:
        return {}
    try:
        return compact_tables(out, above_parts=above_parts)
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
    settle_compactions(out)
    before = {name: parts(out, name) for name in FLUSHED_TABLES}
    counts = {name: (len(files), len(files)) for name, files in before.items()}
    if not any(len(files) > above_parts for files in before.values()):
        return counts
    max_rows = max_rows_per_part or COMPACT_ROWS_PER_PART
    vouched = {p.name for p in before[LEDGER]}
    runs = {name: _runs(files, name, vouched, max_rows) for name, files in before.items()}
    if not any(len(run) > 1 for table_runs in runs.values() for run in table_runs):
        return counts  # nothing to gain: every part is full, alone or not ours to merge
    token = new_token("compact-")
    for name in (*DATA_TABLES, LEDGER):
        _merge_runs(out, name, runs[name], token, max_rows)
    supersedes = {name: [p.name for run in runs[name] for p in run] for name in FLUSHED_TABLES}
    write_commit(out, token, supersedes)
    settle_compactions(out)  # deletes what it superseded, then drops the list
    return {name: (len(before[name]), len(parts(out, name))) for name in FLUSHED_TABLES}


def _runs(files: list[Path], name: str, vouched: set[str], max_rows: int) -> list[list[Path]]:
    """The stretches of consecutive parts to merge (see compact_tables: what merges)."""
    runs: list[list[Path]] = [[]]
    for part in files:
        if _left_alone(part, name, vouched, max_rows):
            runs.append([])
        else:
            runs[-1].append(part)
    return [
        run for run in runs if len(run) > 1 or any(compaction_token(p.name) is None for p in run)
    ]


def _left_alone(part: Path, name: str, vouched: set[str], max_rows: int) -> bool:
    if part.name == REPLACED_PART:
        return True
    if compaction_token(part.name) is None:
        return name != LEDGER and part.name not in vouched  # an orphan
    return pq.read_metadata(part).num_rows >= max_rows // 2  # compacted, already full


def _merge_runs(out: Path, name: str, runs: list[list[Path]], token: str, max_rows: int) -> None:
    """Write the compacted parts of one table (not yet committed)."""
    folder = Path(out) / TABLES / name
    schema = SCHEMAS[name]
    numbers = itertools.count()
    for run in runs:
        for first, batches in _chunks(_tagged_batches(run, schema), max_rows):
            key = flush_key(Path(first).name)
            path = folder / f"part-{key}.{token}-{next(numbers):04d}.parquet"
            with atomic_path(path) as temporary:
                with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
                    for table in _row_groups(batches, schema, _ROW_GROUP_ROWS):
                        writer.write_table(table, row_group_size=len(table))
                fsync(temporary)
    fsync(folder)


def _tagged_batches(files: list[Path], schema: pa.Schema) -> Iterator[tuple[str, pa.RecordBatch]]:
    """The rows of `files` in their order, as (part, batch); scan_batches keeps the
    order of the files, and says which file each batch came from."""
    for some in in_slices(files):
        scanner = parquet_dataset(some, schema).scanner(batch_size=_ROW_GROUP_ROWS)
        for tagged in scanner.scan_batches():
            yield tagged.fragment.path, tagged.record_batch


def _chunks(
    tagged: Iterator[tuple[str, pa.RecordBatch]], max_rows: int
) -> Iterator[tuple[str, Iterator[pa.RecordBatch]]]:
    """Split an ordered stream of (part, batch) into compacted parts: a new one starts
    at the first part boundary after `max_rows` rows (parts are never split). Yields
    the first part's path and that compacted part's batches (consume before the next)."""
    state: dict[str, Any] = {"number": 0, "rows": 0, "part": None}
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
