"""Mask groups are published whole: staged under a name of their own, then renamed in.

Real Zarr throughout; crashes are real process deaths (os._exit in a spawned child,
so no `finally` cleans up), and the race is real processes writing one scan at once.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pingu_dask.output import layout, masks
from pingu_dask.output.files import atomic_path

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])
SHAPE = (96, 80, 40)  # 2 x 2 x 1 chunks in one shard: a read is several file reads
WRITES_EACH = 40


def random_mask(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(SHAPE) < 0.1 + 0.2 * seed).astype(np.uint8)


def write(out: Path, scan_id: str, seed: int, **attrs) -> np.ndarray:
    mask = random_mask(seed)
    masks.write_mask(out, scan_id, mask, AFFINE, {"model_fingerprint": "abc", **attrs})
    return mask


def staged(out: Path) -> list[str]:
    """What is left in the staging folder (nothing, after a clean write)."""
    folder = out / masks.STAGING
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def out(tmp_path: Path) -> Path:
    layout.prepare_output(tmp_path)
    return tmp_path


# --- one writer ----------------------------------------------------------------------


def test_a_rewrite_replaces_the_group_whole_and_leaves_nothing(out: Path) -> None:
    write(out, "s1", 0, run="first")
    second = write(out, "s1", 1, run="second")
    data, affine = masks.read_mask(out, "s1")
    assert np.array_equal(data, second) and np.allclose(affine, AFFINE)
    attrs = masks.mask_attrs(out, "s1")
    assert attrs["run"] == "second" and attrs["complete"] is True and len(attrs["attempt"]) == 32
    assert sorted(zarr.open_group(out / layout.MASKS, mode="r").group_keys()) == ["s1"]
    assert masks.stored_scan_ids(out) == ["s1"]
    assert staged(out) == []
    assert sorted(p.name for p in (out / layout.MASKS).iterdir()) == ["s1", "zarr.json"]


def test_the_layout_is_unchanged_by_staging(out: Path) -> None:
    write(out, "s1", 0)
    array = zarr.open_array(out / layout.MASKS / "s1" / masks.MASK_ARRAY, mode="r")
    assert array.chunks == (64, 64, 64) and array.shards == (128, 128, 64)
    assert array.metadata.dimension_names == ("i", "j", "k")
    assert "consolidated_metadata" not in (out / layout.MASKS / "zarr.json").read_text()
    assert "consolidated_metadata" not in (out / layout.MASKS / "s1" / "zarr.json").read_text()


def test_a_failed_write_keeps_the_old_group_and_removes_its_own(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write(out, "s1", 0)

    def fail(*args) -> None:
        raise RuntimeError("worker lost")

    monkeypatch.setattr(masks, "_publish", fail)
    with pytest.raises(RuntimeError, match="worker lost"):
        write(out, "s1", 1)
    assert np.array_equal(masks.read_mask(out, "s1")[0], first)
    assert staged(out) == []


# --- crashes (a child process dies where told) -------------------------------------


def _crash_while_writing(out: str, where: str) -> None:
    """Write mask 1 of scan s1 and die: before the first rename, or between the two."""
    if where == "before rename":
        masks._publish = lambda *args: os._exit(3)
    else:
        rename = os.rename

        def rename_then_die(source, target) -> None:
            rename(source, target)
            if Path(target).name.startswith(f"{masks.OLD}-"):
                os._exit(3)  # the old group is aside, the new one not yet in

        os.rename = rename_then_die
    write(Path(out), "s1", 1)


def crash(out: Path, where: str) -> None:
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_crash_while_writing, args=(str(out), where))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 3


def test_a_crash_before_the_rename_leaves_the_old_group_intact(out: Path) -> None:
    first = write(out, "s1", 0)
    crash(out, "before rename")
    data, _ = masks.read_mask(out, "s1")
    assert np.array_equal(data, first) and masks.mask_attrs(out, "s1")["complete"] is True
    [leftover] = staged(out)
    assert leftover.startswith(f"{masks.NEW}-") and leftover.endswith("-s1")
    assert masks.stored_scan_ids(out) == ["s1"]  # the staged group is no scan group
    assert masks.remove_partial_masks(out) == 1
    assert not (out / masks.STAGING).exists()
    assert np.array_equal(masks.read_mask(out, "s1")[0], first)


def test_a_crash_between_the_renames_leaves_no_group_and_is_cleaned_up(out: Path) -> None:
    write(out, "s1", 0)
    crash(out, "between renames")
    assert masks.mask_attrs(out, "s1") is None  # after waiting SWAP_WAIT_S for the swap
    assert sorted(name.split("-")[0] for name in staged(out)) == [masks.NEW, masks.OLD]
    assert masks.remove_partial_masks(out) == 2
    assert staged(out) == [] and masks.stored_scan_ids(out) == []
    with pytest.raises(KeyError):
        masks.read_mask(out, "s1")
    assert masks.remove_partial_masks(out) == 0


# --- another attempt renames between our steps -------------------------------------


def test_another_attempt_publishing_between_our_steps_is_moved_aside(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ours finds the other's fresh group where it meant to rename: the last one wins."""
    write(out, "s1", 0)
    real = masks._rename_into_place
    calls: list[Path] = []

    def other_attempt_first(staged_group: Path, final: Path) -> bool:
        calls.append(staged_group)
        if len(calls) == 1:
            write(out, "s1", 2, run="other")  # publishes through this hook (call 2)
        return real(staged_group, final)

    monkeypatch.setattr(masks, "_rename_into_place", other_attempt_first)
    ours = write(out, "s1", 1, run="ours")
    assert np.array_equal(masks.read_mask(out, "s1")[0], ours)
    assert masks.mask_attrs(out, "s1")["run"] == "ours"
    assert staged(out) == [] and masks.stored_scan_ids(out) == ["s1"]


def test_a_group_moved_away_before_we_move_it_aside_is_retried(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group we meant to move aside vanished (another attempt's swap): try again."""
    write(out, "s1", 0)
    rename = os.rename
    stolen = out / masks.STAGING / "taken-by-the-other-attempt"

    def other_moves_it_first(source, target) -> None:
        if Path(target).name.startswith(f"{masks.OLD}-") and not stolen.exists():
            rename(source, stolen)
        rename(source, target)

    monkeypatch.setattr(masks.os, "rename", other_moves_it_first)
    ours = write(out, "s1", 1)
    monkeypatch.undo()
    assert np.array_equal(masks.read_mask(out, "s1")[0], ours)
    assert staged(out) == [stolen.name]  # the other attempt's to delete


# --- a reader in the middle of a swap -------------------------------------------------


def test_a_reader_waits_out_a_swap_instead_of_seeing_no_mask(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the two renames the name is missing; a reader then gets the new group."""
    write(out, "s1", 0)
    rename = os.rename
    aside = threading.Event()

    def slow_swap(source, target) -> None:
        rename(source, target)
        if Path(target).name.startswith(f"{masks.OLD}-"):
            aside.set()
            time.sleep(0.2)  # hold the window open

    monkeypatch.setattr(masks.os, "rename", slow_swap)
    writer = threading.Thread(target=write, args=(out, "s1", 1))
    writer.start()
    assert aside.wait(timeout=30)
    assert not (out / layout.MASKS / "s1").exists()
    data, _ = masks.read_mask(out, "s1")  # waits, no KeyError
    writer.join()
    assert np.array_equal(data, random_mask(1))


def test_a_swap_between_reading_attributes_and_voxels_is_read_again(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attributes of one attempt never come back with the voxels of another."""
    write(out, "s1", 0)
    open_array = zarr.open_array
    swapped: list[bool] = []

    def swap_first(*args, **kwargs):
        if not swapped:
            swapped.append(True)
            masks.write_mask(out, "s1", random_mask(1), np.eye(4), {})
        return open_array(*args, **kwargs)

    monkeypatch.setattr(zarr, "open_array", swap_first)
    data, affine = masks.read_mask(out, "s1")
    assert swapped and np.array_equal(data, random_mask(1)) and np.allclose(affine, np.eye(4))


# --- two writers and a reader, at once ----------------------------------------------


def _keep_writing(out: str, seed: int, barrier, writes: int) -> None:
    barrier.wait()
    for _ in range(writes):
        write(Path(out), "s1", seed)


@pytest.mark.slow  # seconds of real processes: the full suite runs it
def test_racing_attempts_never_show_a_reader_a_mixed_or_missing_mask(out: Path) -> None:
    expected = [random_mask(1), random_mask(2)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3, timeout=120)
    writers = [
        context.Process(target=_keep_writing, args=(str(out), seed, barrier, WRITES_EACH))
        for seed in (1, 2)
    ]
    for writer in writers:
        writer.start()
    seen = [0, 0]
    try:
        barrier.wait()
        while masks.mask_attrs(out, "s1") is None:  # the first publish
            assert any(w.is_alive() for w in writers)
            time.sleep(0.001)
        while any(w.is_alive() for w in writers):
            data, _ = masks.read_mask(out, "s1")  # no KeyError, no RuntimeError
            matches = [np.array_equal(data, mask) for mask in expected]
            assert any(matches), "a read mixed two attempts"
            seen[matches.index(True)] += 1
            assert masks.stored_scan_ids(out) in ([], ["s1"])
        for writer in writers:
            writer.join(timeout=60)
            assert writer.exitcode == 0
    finally:
        for writer in writers:
            if writer.is_alive():
                writer.kill()
    assert sum(seen) > 10, seen
    final, _ = masks.read_mask(out, "s1")
    assert any(np.array_equal(final, mask) for mask in expected)
    assert staged(out) == [] and masks.stored_scan_ids(out) == ["s1"]


# --- names ---------------------------------------------------------------------------


def test_stored_scan_ids_ignore_hidden_and_staged_names(out: Path) -> None:
    write(out, "s1", 0)
    zarr.open_group(out / layout.MASKS / ".hidden", mode="w", zarr_format=3)
    (out / masks.STAGING / f"{masks.NEW}-{'0' * 32}-s2").mkdir(parents=True)
    assert masks.stored_scan_ids(out) == ["s1"]
    assert masks.mask_attrs(out, "s2") is None


def test_atomic_path_gives_each_use_its_own_temporary_name(tmp_path: Path) -> None:
    target = tmp_path / "mask.nii.gz"
    with atomic_path(target) as outer, atomic_path(target) as inner:
        assert outer != inner
        assert all(p.name.startswith(".") and p.name.endswith(".nii.gz") for p in (outer, inner))
        outer.write_text("outer")
        inner.write_text("inner")
    assert target.read_text() == "outer"  # the last rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
