"""PVS masks in OUT/masks.zarr: one Zarr v3 group per scan, written whole or not at all.

A worker writes each attempt's group under its own name in OUT/.masks-tmp and renames it
into masks.zarr when it is complete (an older group is moved aside first and removed
after), so two attempts never interleave and a reader sees the old group or the new
one. Leftovers of an interrupted run are removed at the next run's start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from pingu_dask.records import timestamp

MASKS = "masks.zarr"  # OUT/masks.zarr: one group per scan (layout.py lays out OUT)
MASK_ARRAY = "pvs"  # the model's PVS label values where PVS was kept, 0 elsewhere
STRUCTURES_ARRAY = "structures"  # its other labels (e.g. WMH), for models that have them


CHUNK = 64  # voxels per chunk side; one shard holds a whole mask (one file per scan)


def write_mask(
    out: Path,
    scan_id: str,
    mask: np.ndarray,
    affine: np.ndarray,
    attrs: dict,
    structures: np.ndarray | None = None,
) -> str:
    """Store one scan's mask as group `scan_id` of masks.zarr, atomically.

    `mask` holds PVS only (the model's PVS label values), so that every reader of
    MASK_ARRAY reads PVS; a model's other structures go to STRUCTURES_ARRAY beside it.

    The group is written whole under a name of its own in OUT/.masks-tmp (see
    _staging_folder) and only then renamed into masks.zarr, so two attempts of one
    scan (a retry beside a straggler, a redo) never write into the same files, and a
    reader or a crash sees the old complete group or the new one, never a mix.
    """
    attempt = uuid.uuid4().hex
    staged = _staging_folder(out) / _staged_name(NEW, attempt, scan_id)
    try:
        _write_group(staged, scan_id, attempt, mask, affine, attrs, structures)
        _publish(staged, Path(out) / MASKS / scan_id, scan_id)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already when published
    return f"{MASKS}/{scan_id}"


def mask_attrs(out: Path, scan_id: str) -> dict | None:
    """The attributes of a scan's mask group, or None when there is none.

    Read straight from the group's zarr.json (Zarr v3 keeps a group's attributes
    there): the resume check calls this for every scan of a cohort, and opening
    100,000 groups through zarr costs several times more. A rewrite leaves the name
    missing for the two renames of a swap (_publish); a missing group is read again
    while that swap's moved-aside group exists, so a swap never reads as "no mask".
    """
    path = Path(out) / MASKS / scan_id / "zarr.json"
    deadline = time.monotonic() + SWAP_WAIT_S
    confirmed_missing = 0
    while True:
        document = _read_json_file(path)
        if document is not None:
            return dict(document.get("attributes", {}))
        if _swapping(out, scan_id):
            confirmed_missing = 0
            if time.monotonic() > deadline:  # a writer died mid-swap; not ours to fix
                return None
            time.sleep(SWAP_POLL_S)
            continue
        # Missing and no swap: but a swap may have ended between the two looks, so
        # only missing twice in a row, each time with no swap going on, counts.
        confirmed_missing += 1
        if confirmed_missing == 2:
            return None


def read_mask(out: Path, scan_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A complete stored mask as (uint8 array, affine). KeyError when missing or incomplete.

    The array is read by path, so a rewrite that swaps the group in between would give
    the attributes of one attempt and the voxels of another (or zeros: Zarr fills a
    missing shard). The attributes are read again afterwards; each attempt's group has
    its own `attempt` id, and a swapped-out group never comes back, so equal attributes
    before and after mean every read hit the same group.
    """
    import zarr

    for _ in range(CONSISTENT_READ_TRIES):
        attrs = mask_attrs(out, scan_id)
        if not attrs or not attrs.get("complete"):
            raise KeyError(f"no complete mask for scan {scan_id!r} in {Path(out) / MASKS}")
        try:
            array = zarr.open_array(Path(out) / MASKS / scan_id / MASK_ARRAY, mode="r")
            data = np.asarray(array[...])
        except FileNotFoundError:  # swapped out while we read; zarr's errors included
            continue
        if mask_attrs(out, scan_id) == attrs:
            return data, np.asarray(attrs["affine"])
    raise RuntimeError(f"mask of scan {scan_id!r} kept being rewritten while read")


def stored_scan_ids(out: Path) -> list[str]:
    """Scan ids with a mask group in masks.zarr (complete or not), sorted.

    Hidden names (starting with '.') are never scan groups: masks are staged outside
    masks.zarr, but other tools leave such names (.DS_Store, editors, rsync temps).
    """
    root = Path(out) / MASKS
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "zarr.json").exists()
    )


def remove_partial_masks(out: Path) -> int:
    """Delete what crashed mask writers left in OUT/.masks-tmp; returns how many.

    Those are groups being written (never published) and old groups moved aside by a
    swap that died before deleting them; either way masks.zarr does not use them (a
    swap that died between its two renames leaves the scan without a group, and the
    resume plan redoes it). Call this only when no attempt writes into OUT: it would
    delete a running attempt's staged group. At run start that holds, since the OUT
    lock admits a single driver and this run has no workers yet.
    """
    staging = _staging_folder(out)
    if not staging.is_dir():
        return 0
    leftovers = list(staging.iterdir())
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return len(leftovers)


# Staged groups live beside masks.zarr, not in it: Zarr v3 lists every folder of a group
# as a member, hidden ones too (root.group_keys() would show a staged group, and a plain
# hidden folder gives a ZarrUserWarning on each listing), and a small folder of its own
# is cheap to scan for a swap in progress, where masks.zarr may hold 100,000 groups.
STAGING = ".masks-tmp"
NEW, OLD = "new", "old"  # a group being written; an old group moved aside by a swap


SWAP_WAIT_S = 0.5  # the longest a reader waits for a swap (two renames) to finish


SWAP_POLL_S = 0.0005


PUBLISH_TRIES = 100


CONSISTENT_READ_TRIES = 100


def _staging_folder(out: Path) -> Path:
    """OUT/.masks-tmp, on the file system of masks.zarr (a rename cannot cross one).

    Beside the resolved masks.zarr, so a masks.zarr that is a link to another disk
    still gets its staging folder there.
    """
    return (Path(out) / MASKS).resolve().parent / STAGING


def _staged_name(kind: str, attempt: str, scan_id: str) -> str:
    """kind-<32 hex>-<scan_id>: fixed width, so the scan id reads back exactly."""
    return f"{kind}-{attempt}-{scan_id}"


def _swapping(out: Path, scan_id: str) -> bool:
    """Whether a swap of this scan's group is under way (an old group is moved aside)."""
    try:
        names = os.listdir(_staging_folder(out))
    except FileNotFoundError:
        return False
    return any(_scan_in(name, OLD) == scan_id for name in names)


def _scan_in(name: str, kind: str) -> str | None:
    """The scan id in a staged name of this kind, else None."""
    head = f"{kind}-"
    return name[len(head) + 33 :] if name.startswith(head) else None  # 32 hex and '-'


def _write_group(
    path: Path,
    scan_id: str,
    attempt: str,
    mask: np.ndarray,
    affine: np.ndarray,
    attrs: dict,
    structures: np.ndarray | None = None,
) -> None:
    """Write a whole mask group at `path` (nobody reads it there); `complete` goes last."""
    import zarr
    from zarr.codecs import BloscCodec

    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(path, mode="w-", zarr_format=3)
    shards = tuple(int(np.ceil(n / CHUNK) * CHUNK) for n in mask.shape)
    named = {MASK_ARRAY: mask, STRUCTURES_ARRAY: structures}
    for name, values in named.items():
        if values is None:
            continue
        array = group.create_array(
            name,
            shape=mask.shape,
            chunks=(CHUNK,) * 3,
            shards=shards,
            dtype="uint8",
            compressors=BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
            dimension_names=("i", "j", "k"),
        )
        array[...] = values.astype(np.uint8)
    group.attrs.update(
        {
            **attrs,
            "scan_id": scan_id,
            "attempt": attempt,
            "affine": np.asarray(affine, dtype=float).tolist(),
            "spacing": nib.affines.voxel_sizes(affine).tolist(),
            "shape": list(mask.shape),
            "written": timestamp(),
        }
    )
    group.attrs.update({"complete": True})


def _publish(staged: Path, final: Path, scan_id: str) -> None:
    """Rename the staged group onto `final`; the last attempt to rename wins.

    A rename cannot replace a non-empty folder, so an existing group is first renamed
    aside (into the staging folder), the new one renamed in, and the old one deleted
    afterwards: `final` is missing only between two renames, and readers wait that out
    while the moved-aside group exists (mask_attrs). Another attempt of the same scan
    may rename between our steps: then the group we meant to move aside is gone
    (FileNotFoundError: try again) or a new one appeared where we meant to rename ours
    (ENOTEMPTY/EEXIST: move that aside too and try again). Each try that fails means
    another attempt published, which each does once, so this ends.
    """
    moved_aside: list[Path] = []
    try:
        for _ in range(PUBLISH_TRIES):
            if _rename_into_place(staged, final):
                return
            aside = staged.with_name(_staged_name(OLD, uuid.uuid4().hex, scan_id))
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                continue
            moved_aside.append(aside)
        raise RuntimeError(f"could not publish the mask of scan {scan_id!r}: {final}")
    except BaseException:
        _put_back(moved_aside, final)
        raise
    finally:
        for aside in moved_aside:
            shutil.rmtree(aside, ignore_errors=True)


def _rename_into_place(staged: Path, final: Path) -> bool:
    """Rename staged onto final; False when final exists (and is not empty)."""
    try:
        os.rename(staged, final)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _put_back(moved_aside: list[Path], final: Path) -> None:
    """After a failed swap, return the last group we moved aside if `final` is empty."""
    if moved_aside:
        with contextlib.suppress(OSError):
            os.rename(moved_aside.pop(), final)


def _read_json_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
