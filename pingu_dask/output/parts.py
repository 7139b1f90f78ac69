"""Which Parquet part files make up a table, and the commit files of compactions.

A part is written by a flush (part-FLUSH_ID.parquet) or by a compaction
(part-FIRST_FLUSH_ID.compact-TOKEN-NNNN.parquet). A compaction counts once its commit
file (OUT/tables/ledger/_compact-TOKEN.json) exists; the commit lists the parts it
supersedes until they are deleted. parts() shows a reader exactly one copy of every
row whatever a crash left; settle_compactions and remove_orphan_parts (run start,
under the lock) make one state hold on disk.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pingu_dask.output.files import atomic_path

TABLES = "tables"


def new_token(prefix: str = "") -> str:
    """A part file's token: when it was written (sortable) and a random tail, so two
    writers never share a name."""
    return f"{prefix}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"


LEDGER = "ledger"


DATA_TABLES = ("regions", "clusters", "evaluation", "structures")


#: The tables the driver's flushes write and compactions merge (the scans table is
#: rewritten whole at the end of a run instead: output/scans.py).
FLUSHED_TABLES = (*DATA_TABLES, LEDGER)


REPLACED_PART = "part-replaced.parquet"  # written by replace_table, vouched for by itself


COMPACTED = re.compile(
    r"^part-(?P<key>.+)\.(?P<token>compact-\d{8}T\d{6}-[0-9a-f]{12})-\d{4}\.parquet$"
)


COMMITS = "_compact-*.json"  # in the ledger folder: one per compaction, see compact_tables


def parts(out: Path, name: str) -> list[Path]:
    """The part files that hold one table, oldest flush first.

    Parts of a compaction that has not committed, and parts that a committed one
    superseded but has not deleted yet, are left out: either way their rows are in
    the other parts, and reading both would double them. A reader may list parts
    while a run compacts (`pingu-dask status`), so the compactions are read before
    and after the listing, and the listing repeated until they agree: a commit in
    between would otherwise pair a listing with the wrong state and drop rows.
    """
    state = compaction_state(out)
    while True:
        found = all_parts(out, name)
        again = compaction_state(out)
        if again == state:
            return [part for part in found if state.visible(name, part.name)]
        state = again


def all_parts(out: Path, name: str) -> list[Path]:
    """Every part file of one table on disk, in flush order (see flush_key)."""
    folder = Path(out) / TABLES / name
    if not folder.is_dir():
        return []
    return sorted(folder.glob("part-*.parquet"), key=lambda p: (flush_key(p.name), p.name))


def flush_key(part_name: str) -> str:
    """Where a part stands in flush order: its flush id, or for a compacted part the
    flush id of the first part it holds (so compaction never reorders rows)."""
    match = COMPACTED.match(part_name)
    return match["key"] if match else part_name.removeprefix("part-").removesuffix(".parquet")


def compaction_token(part_name: str) -> str | None:
    """The compaction that wrote this part, or None for a part written by a flush."""
    match = COMPACTED.match(part_name)
    return match["token"] if match else None


def remove_orphan_parts(out: Path) -> int:
    """Delete data parts whose flush has no ledger part (a driver died mid-flush).

    First settles a compaction a crash interrupted (finishing or undoing it); the
    parts of a committed compaction are vouched for by its commit file, not by name.
    Returns the parts removed that no ledger vouched for.
    """
    removed = settle_compactions(out)
    vouched = {p.name for p in parts(out, LEDGER)} | {REPLACED_PART}
    for name in DATA_TABLES:
        for part in parts(out, name):
            if compaction_token(part.name) is None and part.name not in vouched:
                part.unlink()
                removed += 1
    return removed


# --- compaction ---------------------------------------------------------------------


@dataclass
class CompactionState:
    """The compactions recorded in the ledger folder: which committed, and which have
    superseded parts still on disk (a crash came between commit and clean-up)."""

    committed: set[str] = field(default_factory=set)
    # token -> table -> names of the parts it superseded that may still be on disk
    pending: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    superseded: dict[str, set[str]] = field(default_factory=dict)  # table -> those names

    def visible(self, table: str, part_name: str) -> bool:
        token = compaction_token(part_name)
        if token is not None and token not in self.committed:
            return False
        return part_name not in self.superseded.get(table, ())


def commit_path(out: Path, token: str) -> Path:
    return Path(out) / TABLES / LEDGER / f"_{token}.json"


def compaction_state(out: Path) -> CompactionState:
    state = CompactionState()
    folder = Path(out) / TABLES / LEDGER
    for path in folder.glob(COMMITS) if folder.is_dir() else ():
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


def write_commit(out: Path, token: str, supersedes: Mapping[str, list[str]]) -> None:
    """Commit a compaction: from this rename on, its parts hold the rows and the parts
    it lists are superseded. Synced, because the superseded ones are deleted next."""
    path = commit_path(out, token)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps({"token": token, "supersedes": supersedes}) + "\n")
        fsync(temporary)
    fsync(path.parent)


def fsync(path: Path) -> None:
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


def delete_superseded(out: Path, supersedes: Mapping[str, list[str]]) -> None:
    """Delete what a committed compaction superseded: data tables first, the ledger
    last, so that even without the commit file a leftover data part would be an
    orphan (its ledger part gone) rather than a double."""
    for name in sorted(supersedes, key=lambda table: table == LEDGER):
        folder = Path(out) / TABLES / name
        for part_name in supersedes[name]:
            (folder / part_name).unlink(missing_ok=True)


def settle_compactions(out: Path) -> int:
    """Finish what a crash left of a compaction, so that one state holds on disk.

    A committed compaction with superseded parts left: delete them, then rewrite the
    commit without its list. Parts of a compaction that never committed: delete them
    (their rows are still in the parts they were to replace). A commit none of whose
    parts exist any more (a later compaction superseded them all): delete it.
    Returns the uncommitted parts deleted. Call it holding OUT's lock.
    """
    state = compaction_state(out)
    for token, supersedes in state.pending.items():
        delete_superseded(out, supersedes)
        write_commit(out, token, {})
    removed = 0
    live: set[str] = set()
    for name in (*DATA_TABLES, LEDGER):
        for part in all_parts(out, name):
            wrote = compaction_token(part.name)
            if wrote is not None and wrote in state.committed:
                live.add(wrote)
            elif wrote is not None:
                part.unlink()
                removed += 1
    for token in state.committed - live:
        commit_path(out, token).unlink(missing_ok=True)
    return removed
