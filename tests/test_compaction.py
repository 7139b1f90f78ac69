"""Compaction of the Parquet tables (compaction.compact_tables): few files, same rows, no crash
window that loses or doubles rows.

Every test starts from real parts written the way the driver writes them (TableWriter),
one flush per scan, so the tables hold hundreds of small parts, as a slow run leaves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from pingu_dask.inputs.manifest import Scan, scan_columns
from pingu_dask.output import compaction, ledger, parts, tables
from pingu_dask.run.settings import RunSettings

SCANS = 200
# parts per table after SCANS scans flushed one by one: clusters for every 3rd scan,
# evaluation for every 10th, structures (a model's non-PVS labels) every 7th (write_scans)
PARTS = {"regions": 200, "clusters": 67, "evaluation": 20, "structures": 29, "ledger": 200}


def scan(i: int) -> Scan:
    return Scan(f"s{i:04d}", (("t1w", Path(f"s{i:04d}.nii.gz")),), f"{i:04d}", None, "ABC"[i % 3])


def scan_tables(i: int) -> dict:
    """One scan's rows: 2 regions, 2 clusters (every 3rd scan), 1 evaluation (every 10th)."""
    identity = scan_columns(scan(i))
    regions = [
        {**identity, "region": region, "n_clusters": i % 5, "n_voxels": i, "total_volume_mm3": i}
        for region in ("whole_brain", "white_matter")
    ]
    found = {"regions": tables.to_table("regions", regions)}
    if i % 3 == 0:
        rows = [{"scan_id": identity["scan_id"], "cluster": c, "n_voxels": 8 + c} for c in (1, 2)]
        found["clusters"] = tables.to_table("clusters", rows)
    if i % 10 == 0:
        row = {**identity, "region": "whole_brain", "voxel_dice": i / SCANS}
        found["evaluation"] = tables.to_table("evaluation", [row])
    if i % 7 == 0:
        row = {**identity, "label": "WMH", "label_value": 3, "n_voxels": i, "volume_mm3": i}
        found["structures"] = tables.to_table("structures", [row])
    return found


def write_scans(out: Path, ids: range) -> None:
    """Each scan of `ids` through a TableWriter that flushes after every scan."""
    with tables.TableWriter(out, tables.FlushEvery(scans=1, seconds=3600)) as writer:
        for i in ids:
            row = ledger.attempt_row(scan(i).scan_id, scan(i).site, ledger.OK, 1, "r", ledger.now())
            writer.add(scan_tables(i), ledger_rows=[row])


def snapshot(out: Path) -> dict[str, pd.DataFrame]:
    return {name: tables.read_table(out, name) for name in parts.FLUSHED_TABLES}


def assert_same(out: Path, expected: dict[str, pd.DataFrame]) -> None:
    """Every table reads back as `expected`: the same rows in the same order."""
    for name, frame in snapshot(out).items():
        pd.testing.assert_frame_equal(frame, expected[name], obj=name)


def files(out: Path, name: str) -> list[str]:
    """Every file of a table folder, hidden ones too (temporaries must not be left)."""
    return sorted(p.name for p in (out / parts.TABLES / name).iterdir())


@pytest.fixture(scope="module")
def fragmented(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fragmented") / "out"
    write_scans(out, range(SCANS))
    assert {name: len(parts.parts(out, name)) for name in parts.FLUSHED_TABLES} == PARTS
    return out


@pytest.fixture
def out(fragmented: Path, tmp_path: Path) -> Path:
    """A copy of the fragmented tables for one test to change."""
    return Path(shutil.copytree(fragmented, tmp_path / "out"))


def test_compaction_leaves_one_part_per_table_and_the_same_rows(out: Path) -> None:
    before = snapshot(out)
    counts = compaction.compact_tables(out)
    assert counts == {name: (parts, 1) for name, parts in PARTS.items()}
    for name in parts.DATA_TABLES:
        assert len(files(out, name)) == 1
    [part, commit] = sorted(files(out, "ledger"), key=lambda name: name.startswith("_"))
    assert part.startswith("part-") and commit.startswith("_compact-") and commit.endswith(".json")
    assert_same(out, before)
    # The next run's orphan check keeps compacted data: the commit vouches for it.
    assert parts.remove_orphan_parts(out) == 0
    assert_same(out, before)
    # Readers of the folder (pandas, DuckDB) see one copy of each row; the commit is hidden.
    assert len(pd.read_parquet(out / parts.TABLES / "ledger")) == SCANS
    assert len(ledger.latest_attempts(out)) == SCANS


def test_compaction_is_idempotent_and_merges_later_flushes_with_the_tail(out: Path) -> None:
    compaction.compact_tables(out)
    compacted = {name: files(out, name) for name in parts.FLUSHED_TABLES}
    assert compaction.compact_tables(out) == {name: (1, 1) for name in parts.FLUSHED_TABLES}
    assert {name: files(out, name) for name in parts.FLUSHED_TABLES} == compacted  # untouched
    write_scans(out, range(SCANS, SCANS + 20))
    before = snapshot(out)
    assert len(before["regions"]) == 2 * (SCANS + 20)
    counts = compaction.compact_tables(out)
    assert counts == {
        "regions": (21, 1),
        "clusters": (8, 1),
        "evaluation": (3, 1),
        "structures": (4, 1),
        "ledger": (21, 1),
    }
    assert_same(out, before)  # the new rows stay after the old ones
    assert len(files(out, "ledger")) == 2  # the first compaction's commit is gone


def test_parts_are_filled_up_to_max_rows_and_full_ones_left_alone(out: Path) -> None:
    before = snapshot(out)
    counts = compaction.compact_tables(out, max_rows_per_part=50)
    # regions: 400 rows in parts of 2 -> 8 parts of 50; ledger: 200 rows -> 4 parts
    assert counts["regions"] == (200, 8) and counts["ledger"] == (200, 4)
    assert counts["clusters"] == (67, 3) and counts["evaluation"] == (20, 1)
    assert_same(out, before)
    regions = parts.parts(out, "regions")
    assert [len(pd.read_parquet(p)) for p in regions] == [50] * 8
    # Full parts are not rewritten; only the new small parts are merged.
    write_scans(out, range(SCANS, SCANS + 10))
    before = snapshot(out)
    compaction.compact_tables(out, max_rows_per_part=50)
    assert parts.parts(out, "regions")[:8] == regions
    assert len(parts.parts(out, "regions")) == 9
    assert_same(out, before)


def test_a_crash_before_the_commit_leaves_the_old_parts_in_charge(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(out)

    def crash(*args: object) -> None:
        raise RuntimeError("driver killed before the commit")

    monkeypatch.setattr(compaction, "write_commit", crash)
    with pytest.raises(RuntimeError, match="before the commit"):
        compaction.compact_tables(out)
    monkeypatch.undo()
    assert len(files(out, "regions")) == PARTS["regions"] + 1  # written, not committed
    assert_same(out, before)  # the uncommitted part is not read
    assert parts.remove_orphan_parts(out) == len(PARTS)  # one compacted part per table, undone
    assert {name: len(files(out, name)) for name in parts.FLUSHED_TABLES} == PARTS
    assert compaction.compact_tables(out)["regions"] == (200, 1)
    assert_same(out, before)


def test_a_crash_before_deleting_superseded_parts_neither_doubles_nor_loses_rows(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(out)

    def crash(*args: object) -> None:
        raise RuntimeError("driver killed after the commit")

    monkeypatch.setattr(parts, "delete_superseded", crash)
    with pytest.raises(RuntimeError, match="after the commit"):
        compaction.compact_tables(out)
    monkeypatch.undo()
    assert len(files(out, "regions")) == PARTS["regions"] + 1  # old parts and the new one
    assert len(parts.parts(out, "regions")) == 1
    assert_same(out, before)  # superseded parts are not read: no row twice
    # A crash in the middle of the deletion: some superseded parts already gone.
    compacted = parts.parts(out, "ledger")
    superseded = [p for p in (out / parts.TABLES / "ledger").glob("part-*") if p not in compacted]
    for part in sorted(superseded)[:50]:
        part.unlink()
    assert_same(out, before)
    assert parts.remove_orphan_parts(out) == 0  # finishes the compaction, deletes no data
    assert {name: len(files(out, name)) for name in parts.DATA_TABLES} == dict.fromkeys(
        parts.DATA_TABLES, 1
    )
    assert compaction.compact_tables(out) == {name: (1, 1) for name in parts.FLUSHED_TABLES}
    assert_same(out, before)


def test_drop_scans_works_on_compacted_parts(out: Path) -> None:
    compaction.compact_tables(out)
    before = snapshot(out)
    redo = ["s0003", "s0150"]
    # regions 2 + 2, clusters 2 + 2 (both every 3rd), evaluation 1 (s0150)
    assert tables.drop_scans(out, redo) == 9
    assert parts.remove_orphan_parts(out) == 0  # rewritten under the same name: vouched
    for name, frame in snapshot(out).items():
        kept = before[name]
        if name != "ledger":
            kept = kept[~kept.scan_id.isin(redo)].reset_index(drop=True)
        pd.testing.assert_frame_equal(frame, kept, obj=name)
    assert compaction.compact_tables(out) == {name: (1, 1) for name in parts.FLUSHED_TABLES}


def test_orphan_parts_are_not_merged_and_stay_orphans(out: Path) -> None:
    before = snapshot(out)
    tables.write_part(out, "regions", scan_tables(999)["regions"], "zz-died-mid-flush")
    compaction.compact_tables(out)
    assert len(parts.parts(out, "regions")) == 2  # the compacted part and the orphan
    assert parts.remove_orphan_parts(out) == 1
    assert_same(out, before)


def test_a_replaced_table_keeps_its_part(out: Path) -> None:
    replaced = scan_tables(0)["evaluation"]
    tables.replace_table(out, "evaluation", replaced)
    write_scans(out, range(SCANS, SCANS + 20))  # two more evaluation parts
    before = snapshot(out)
    assert compaction.compact_tables(out)["evaluation"] == (3, 2)
    assert parts.REPLACED_PART in files(out, "evaluation")
    assert parts.remove_orphan_parts(out) == 0
    assert_same(out, before)


def test_nothing_happens_below_the_threshold(out: Path) -> None:
    on_disk = {name: files(out, name) for name in parts.FLUSHED_TABLES}
    assert compaction.compact_tables(out, above_parts=500) == {
        name: (count, count) for name, count in PARTS.items()
    }
    assert compaction.compact_if_fragmented(out, None) == {}  # the setting off
    assert {name: files(out, name) for name in parts.FLUSHED_TABLES} == on_disk
    default = RunSettings.from_config().compact_above_parts
    assert compaction.compact_if_fragmented(out, default)["regions"] == (200, 1)  # above 8


def test_a_failed_compaction_does_not_fail_the_run(
    out: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = snapshot(out)

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compaction, "write_commit", disk_full)
    assert compaction.compact_if_fragmented(out, 8) == {}
    assert "left for the next run" in caplog.text
    assert_same(out, before)


def test_a_reader_beside_a_compaction_sees_every_row_once(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pingu-dask status` may read while a run compacts: here the whole compaction
    (commit and deletions) falls between the reader's look at the commits and its
    listing of the parts, the one moment where it would miss rows."""
    before = snapshot(out)
    listing = parts.all_parts
    compacted: dict = {}

    def compaction_meanwhile(out: Path, name: str) -> list[Path]:
        if not compacted:
            compacted["started"] = True  # the compaction's own listings are plain ones
            compacted.update(compaction.compact_tables(out))
        return listing(out, name)

    monkeypatch.setattr(parts, "all_parts", compaction_meanwhile)
    pd.testing.assert_frame_equal(tables.read_table(out, "regions"), before["regions"])
    assert compacted["regions"] == (PARTS["regions"], 1)


def test_parts_are_read_a_few_at_a_time_in_order(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading and compaction scan a slice of the parts at a time (memory per scan
    grows with the files in it); slices must not change the rows or their order."""
    before = snapshot(out)
    monkeypatch.setattr(tables, "_FILES_PER_SCAN", 7)
    assert_same(out, before)
    assert compaction.compact_tables(out, max_rows_per_part=30)["regions"] == (200, 14)
    assert_same(out, before)
