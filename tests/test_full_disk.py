"""Output that scales, and a full disk: failures summed up by reason, throughput of ok
scans only, `status` on a folder that is not a run, and an output file system that
fills up mid-run (a real tmpfs, mounted small: this machine and CI run as root).

A full disk or quota is no scan's fault: the run stops with one line (what is kept, what
to free, that the same command resumes), exit code 4, and the rerun after space was
freed does every scan exactly once. The stand-in tests (the real stages around the
stand-in model of scripts/benchkit/standins.py: real Dask workers, masks and Parquet
files, no network) take seconds; the command-line test runs the tiny random-weight
model (conftest's `tiny_model`) and is marked slow.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import pytest
from benchkit import standins
from click.testing import CliRunner
from distributed import Client
from helpers import absolute_manifest

from pingu_dask.cli import main
from pingu_dask.cli.progress import (
    FAILURE_REASONS,
    LIVE_FAILURE_LINES,
    FailureReason,
    ProgressBar,
    failure_reasons,
    normalise_message,
)
from pingu_dask.cli.run import OUT_OF_SPACE_EXIT_CODE
from pingu_dask.errors import ErrorReport, OutOfSpace, StageFailure, Verdict, is_out_of_space
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output import layout, ledger, masks, tables
from pingu_dask.records import ScanResult, Status
from pingu_dask.run.loop import Progress, Segmentation, segment_scans
from pingu_dask.run.stages import Pipeline

PAGE = 4096


# --- a small file system ---------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """mount(kib) -> a fresh tmpfs of that size (unmounted at the end); skipped where
    mounting is not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("no `mount` command here: cannot make a small file system")
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int = 0) -> Path:
    """A filler file that leaves `leave` bytes free on the file system of `disk`."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as file:
        file.write(b"\0" * max(0, (free - leave) // PAGE * PAGE))
    return filler


def free_bytes(disk: Path) -> int:
    stats = os.statvfs(disk)
    return stats.f_bavail * stats.f_frsize


# --- recognising a full disk ---------------------------------------------------------------


def test_a_full_disk_or_quota_is_recognised_in_errors_and_reports() -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/tables/x.parquet")
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert is_out_of_space(full) and is_out_of_space(quota)
    try:  # wrapped by a library: found through the cause
        raise RuntimeError("zarr: could not store chunk") from full
    except RuntimeError as wrapped:
        assert is_out_of_space(wrapped)
    # From a worker, a StageFailure carries the message only (its cause is not pickled).
    stage_failure = StageFailure("finish", "tcp://w", "OSError", f"{full}", Verdict.TRANSIENT)
    assert is_out_of_space(stage_failure)
    for message in (
        "finish: [Errno 28] No space left on device: '/out/.masks-tmp/x'",
        "finish: OSError: [Errno 122] Disk quota exceeded",
        "Error writing bytes to file. Detail: [errno 28] No space left on device",
    ):
        assert is_out_of_space(ErrorReport(error_type="OSError", message=message)), message
    assert is_out_of_space(OutOfSpace("the driver's table write"))
    for other in (
        OSError(errno.ENOENT, "No such file or directory", "/x"),
        OSError(errno.EIO, "Input/output error"),
        ValueError("space left between the brain and the skull"),
    ):
        assert not is_out_of_space(other)
    not_full = ErrorReport(error_type="ImageError", message="file not found: /data/no space.nii")
    assert not is_out_of_space(not_full)


# --- failures by reason ------------------------------------------------------------------


def failure_rows(n: int, error_type: str, message: Callable[[str], str], first: int) -> list:
    rows = []
    for i in range(first, first + n):
        scan_id = f"sub-{i:05d}"
        rows.append({"scan_id": scan_id, "status": "failed", "error_type": error_type,
                     "message": message(scan_id)})  # fmt: skip
    return rows


def odd(k: int, scan_id: str) -> str:
    return f"odd thing {k} in {scan_id}"


def ten_thousand_failures() -> pd.DataFrame:
    """9,812 missing files, 150 NaN images, 30 dead workers and 8 reasons seen once."""

    def missing(s: str) -> str:
        return f"preprocess: file not found: /data/cohort/{s}/anat/{s}_T1w.nii.gz"

    def nan(s: str) -> str:
        voxels = 1000 + int(s[-3:])
        return f"preprocess: {voxels} voxels are NaN or infinite (of 2256896): /d/{s}.nii.gz"

    def died(s: str) -> str:
        return f"the worker process died; Dask says: task ('finish-9f3a2b1c', {s[-2:]}, 1) " \
            "on tcp://10.0.0.7:40211"  # fmt: skip

    rows = failure_rows(9812, "ImageError", missing, 0)
    rows += failure_rows(150, "ImageError", nan, 9812)
    rows += failure_rows(30, "KilledWorker", died, 9962)
    for k in range(8):
        rows += failure_rows(1, f"Error{k}", functools.partial(odd, k), 9992 + k)
    return pd.DataFrame(rows)


def test_ten_thousand_failures_become_a_few_reasons_with_counts() -> None:
    reasons = failure_reasons(ten_thousand_failures())
    assert len(reasons) == 3 + 8
    assert reasons[0] == FailureReason(
        9812, "ImageError", "preprocess: file not found: <path>", "sub-00000"
    )
    assert reasons[1] == FailureReason(
        150, "ImageError", "preprocess: <n> voxels are NaN or infinite (of <n>): <path>",
        "sub-09812",
    )  # fmt: skip
    assert reasons[2].count == 30 and reasons[2].error_type == "KilledWorker"
    assert reasons[2].reason == (
        "the worker process died; Dask says: task ('finish-<hex>', <n>, <n>) on <address>"
    )
    # Seen once each: sorted by type, with the scan id replaced.
    assert [r.error_type for r in reasons[3:]] == [f"Error{k}" for k in range(8)]
    assert reasons[3].reason == "odd thing <n> in <scan>" and reasons[3].example == "sub-09992"
    assert sum(r.count for r in reasons) == 10_000


def test_normalising_keeps_what_tells_reasons_apart() -> None:
    assert normalise_message("finish: [Errno 28] No space left on device: '/o/x y/z'") == (
        "finish: [Errno 28] No space left on device: '<path>'"
    )
    assert normalise_message("a 2D image of 64x64x64 voxels, float32, T1w") == (
        "a 2D image of <n>x<n>x<n> voxels, float32, T1w"
    )
    assert normalise_message("cannot load fold_0/checkpoint_final.pth for sub-7", "sub-7") == (
        "cannot load <path> for <scan>"
    )
    assert normalise_message("T1w and/or T2w: spacing 0.8 vs 1.0 mm") == (
        "T1w and/or T2w: spacing <n> vs <n> mm"
    )
    # An id that is a plain word is replaced only where quoted: the message stays readable.
    assert normalise_message("row 3, scan 'empty': image is empty: /d/e.nii", "empty") == (
        "row <n>, scan '<scan>': image is empty: <path>"
    )
    assert normalise_message("sub-002_T1w.nii.gz of sub-002 is 2D", "sub-002") == (
        "<scan>_T1w.nii.gz of <scan> is 2D"
    )
    # Quotes around a scan id and an apostrophe later do not make one long "path".
    assert normalise_message("scan 'x' (/c/x.nii): the parcellation's labels", "x") == (
        "scan '<scan>' (<path>): the parcellation's labels"
    )
    assert len(normalise_message("x" * 5000)) <= 200


def write_ledger(out: Path, failures: pd.DataFrame, n_ok: int) -> None:
    started = ledger.now()
    rows = [ledger.attempt_row(f"ok-{i:05d}", "a", Status.OK, 1, "run1", started)
            for i in range(n_ok)]  # fmt: skip
    for row in failures.itertuples():
        error = ErrorReport(error_type=row.error_type, message=row.message)
        rows.append(ledger.attempt_row(row.scan_id, "a", Status.FAILED, 1, "run1", started,
                                       error=error))  # fmt: skip
    with tables.TableWriter(out) as writer:
        writer.add({}, ledger_rows=rows)
    layout.write_json(out / layout.RUN_JSON, {"n_scans": n_ok + len(failures)})


def test_status_prints_the_most_common_reasons_and_all_on_request(tmp_path: Path) -> None:
    failures = ten_thousand_failures()
    write_ledger(tmp_path, failures, n_ok=5)
    result = CliRunner().invoke(main, ["status", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) < 25, result.output  # not 10,000 lines, nor 20,000
    text = " ".join(result.output.split())
    assert "5 done, 10,000 failed, 0 invalid manifest rows" in text
    assert "9,812 x ImageError: preprocess: file not found: <path> (e.g. sub-00000)" in text
    assert "150 x ImageError: preprocess: <n> voxels are NaN or infinite" in text
    reasons = [line for line in lines if re.match(r"\s+[\d,]+ x ", line)]
    assert len(reasons) == FAILURE_REASONS
    assert "and 1 more reason (1 scan: 1 Error7)" in text  # no error type goes unseen
    assert f"pingu-dask status {tmp_path} --all" in text
    assert f"the ledger table {tmp_path / 'tables' / 'ledger'}" in text
    assert "sub-05000" not in text  # no scan-by-scan list without --all

    every = CliRunner().invoke(main, ["status", str(tmp_path), "--all"], terminal_width=200)
    assert every.exit_code == 1
    listed = re.findall(r"^\s+(sub-\d{5}) \(failed, (\w+)\): (.*)$", every.output, re.MULTILINE)
    assert len(listed) == 10_000 and len({scan for scan, _, _ in listed}) == 10_000
    by_scan = {scan: message for scan, _, message in listed}
    assert by_scan["sub-00042"] == "preprocess: file not found: /data/cohort/sub-00042/anat/" \
        "sub-00042_T1w.nii.gz"  # fmt: skip


def test_status_on_a_folder_that_is_not_an_output_says_so(tmp_path: Path) -> None:
    runner = CliRunner()

    def status(path: Path) -> tuple[int, str]:
        """Exit code and output with its line breaks undone (the console wraps long paths)."""
        result = runner.invoke(main, ["status", str(path)])
        return result.exit_code, " ".join(result.output.split())

    (tmp_path / "notes.txt").write_text("not a run")
    code, output = status(tmp_path)
    assert code == 2
    assert f"{tmp_path} is not a pingu-dask output folder (no run.json)" in output
    code, output = status(tmp_path / "nowhere")
    assert code == 2 and "does not exist: not a pingu-dask output folder" in output
    code, output = status(tmp_path / "notes.txt")
    assert code == 2 and "is a file, not a pingu-dask output folder" in output
    layout.write_json(tmp_path / layout.RUN_JSON, {"n_scans": 2})  # a run's OUT, nothing done
    code, output = status(tmp_path)
    assert code == 1 and "0 done, 0 failed" in output


def failed_result(i: int) -> ScanResult:
    return ScanResult(scan_id=f"sub-{i:03d}", status=Status.FAILED, attempt=1,
                      error_type="ImageError", message=f"file not found: /d/{i}.nii")  # fmt: skip


def test_the_progress_bar_counts_ok_scans_as_throughput_and_failures_apart() -> None:
    bar = ProgressBar(Path("/results"))
    bar.total = 100  # as start(100), without a live display in a test
    bar.bar.update(bar.task, total=100)
    progress = Progress(total=100, done=12, failed=30, started=time.monotonic() - 60)
    bar.update(progress)
    task = bar.bar.tasks[0]
    assert task.completed == 12 and task.fields["failed"] == 30
    rate = float(task.fields["rate"])
    assert 11.0 < rate <= 12.0  # 12 ok in a minute; the 30 failed are not throughput
    assert task.fields["eta"] == f"{58 / rate:.0f} min"
    with bar.bar.console.capture() as captured:
        for i in range(LIVE_FAILURE_LINES + 30):
            progress.last = failed_result(i)
            progress.failed += 1
            bar.update(progress)
    printed = captured.get()
    assert len(re.findall(r"sub-\d{3} failed", printed)) == LIVE_FAILURE_LINES
    assert printed.count("not printed one by one") == 1
    assert "pingu-dask status /results" in " ".join(printed.split())


# --- a full disk on the driver: table flushes are all or nothing ---------------------------


def regions_row(scan_id: str) -> dict:
    return {"scan_id": scan_id, "region": "whole_brain", "n_clusters": 1, "n_voxels": 2}


def test_a_flush_on_a_full_disk_writes_nothing_and_a_later_one_everything(
    small_disk: Callable[[int], Path], tmp_path: Path
) -> None:
    out = small_disk(512) / "out"
    layout.prepare_output(out)
    writer = tables.TableWriter(out, tables.FlushEvery(scans=1000, seconds=1e6))
    started = ledger.now()
    regions = tables.to_table("regions", [regions_row(f"sub-{i}") for i in range(3)])
    for i in range(3):
        row = ledger.attempt_row(f"sub-{i}", "a", Status.OK, 1, "r", started)
        writer.add({"regions": regions.slice(i, 1)}, [row])
    # Room for the regions part, not for the ledger's after it: a flush cut in the middle.
    probe = tables.write_part(tmp_path, "regions", regions, "probe").stat().st_size
    filler = fill(out.parent, leave=-(-probe // PAGE) * PAGE)
    with pytest.raises(OSError) as full:
        writer.flush()
    assert is_out_of_space(full.value)
    # Nothing half-written: no data part without the ledger's part that vouches for it.
    assert not [p for p in (out / "tables").rglob("*") if p.is_file()]
    filler.unlink()
    writer.flush()  # the same rows, once, under one new flush id
    assert sorted(tables.read_table(out, "regions").scan_id) == ["sub-0", "sub-1", "sub-2"]
    assert sorted(tables.read_table(out, "ledger").scan_id) == ["sub-0", "sub-1", "sub-2"]
    assert len({p.name for p in (out / "tables").rglob("*.parquet")}) == 1


# --- a full disk mid-run, the real stages around the stand-in model --------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with standins.client_for_stand_ins(2, 2, sys.modules[__name__]) as client:
        yield client


@dataclass(frozen=True)
class CountedStandIn(standins.StandInModel):
    """The stand-in model leaving a marker per attempt in controls/attempts (off the
    full disk): restore is the finish stage's first step, before the mask is written."""

    def restore(self, labels: np.ndarray, geometry: Any, shape: tuple[int, ...]) -> np.ndarray:
        Path(self.controls, "attempts", f"{geometry.scan_id}.{uuid.uuid4().hex}").touch()
        return super().restore(labels, geometry, shape)


def stand_in_run(
    tmp_path: Path, disk: Path, n: int, masks_on: Path | None = None
) -> tuple[list[Scan], Pipeline, Path]:
    """Scans whose images and control files lie off the small disk, a pipeline whose
    OUT is on it (its masks.zarr a link to `masks_on`, another disk, if given)."""
    attempts = tmp_path / "attempts"
    attempts.mkdir(exist_ok=True)
    out = disk / "out"
    if masks_on is not None:
        masks_on.mkdir()
        out.mkdir()
        (out / masks.MASKS).symlink_to(masks_on, target_is_directory=True)
    pipeline = standins.pipeline_in(tmp_path, model=CountedStandIn(tmp_path), out=out)
    layout.prepare_output(pipeline.out)
    return standins.make_scans(n, tmp_path), pipeline, attempts


def counted_run(client: Client, scans: list[Scan], pipeline: Pipeline, **given: Any) -> list:
    """The scans through the loop on the counting stand-in model (unwatched)."""
    job = Segmentation(scans=scans, pipeline=pipeline, watch=False, **given)
    return segment_scans(client, job)


def tried(attempts: Path) -> list[str]:
    """The scan of each attempt so far (a marker each, see CountedStandIn)."""
    return [p.name.split(".")[0] for p in attempts.iterdir()]


def assert_every_scan_once(out: Path, scans: list[Scan]) -> None:
    regions = tables.read_table(out, "regions")
    counts = regions[regions.region == "whole_brain"].scan_id.value_counts()
    assert sorted(counts.index) == sorted(s.scan_id for s in scans) and set(counts) == {1}
    latest = ledger.latest_attempts(out)
    assert sorted(latest.scan_id) == sorted(s.scan_id for s in scans)
    assert set(latest.status) == {"ok"}
    assert masks.stored_scan_ids(out) == sorted(s.scan_id for s in scans)


def test_a_full_disk_on_the_workers_stops_the_run_and_the_rerun_does_the_rest(
    client: Client, small_disk: Callable[[int], Path], tmp_path: Path
) -> None:
    """Each scan's finish writes its real (tiny) Zarr mask into OUT, on a disk with no
    space left: the first failure stops the run (not 40 scans failing, nor retries); no
    scan gets a failed ledger row for it; after freeing space the same scans all
    finish, once."""
    disk = small_disk(512)
    scans, pipeline, attempts = stand_in_run(tmp_path, disk, 40)
    filler = fill(disk)
    no_flush_until_the_end = {"pingu.flush-every-scans": 1000, "pingu.flush-every-seconds": 1e6}
    with dask.config.set(no_flush_until_the_end), pytest.raises(OutOfSpace) as stopped:
        counted_run(client, scans, pipeline, window=4)
    message = str(stopped.value)  # the first scan that found the disk full, and why
    assert re.match(r"sub-\d{3}, finish: \[Errno 28\] No space left on device", message)
    first = tried(attempts)
    assert len(first) == len(set(first))  # never retried
    assert len(first) <= 4  # stopped at the first failure: only what was in flight
    assert tables.read_table(pipeline.out, "ledger").empty  # not counted as the scans' fault
    assert masks.stored_scan_ids(pipeline.out) == []

    filler.unlink()
    masks.remove_partial_masks(pipeline.out)  # what a run does at its start
    records = counted_run(client, scans, pipeline)
    assert [r.status for r in records] == ["ok"] * len(scans)
    assert_every_scan_once(pipeline.out, scans)
    assert len(tried(attempts)) == len(first) + len(scans)  # the rerun: once each


def test_a_full_disk_on_the_driver_stops_the_run_and_the_rerun_does_the_rest(
    client: Client, small_disk: Callable[[int], Path], tmp_path: Path
) -> None:
    """The masks on another disk (OUT's masks.zarr a link there, as masks.py allows):
    the workers' writes find space, the first write that finds OUT's disk full is the
    driver's table flush (after each scan here)."""
    disk = small_disk(512)
    scans, pipeline, attempts = stand_in_run(tmp_path, disk, 12, masks_on=tmp_path / "bulk")
    filler = fill(disk)
    with dask.config.set({"pingu.flush-every-scans": 1}):
        with pytest.raises(OutOfSpace, match="the driver's table write") as stopped:
            counted_run(client, scans, pipeline, window=2)
        assert isinstance(stopped.value.__cause__, OSError)
        assert stopped.value.__cause__.errno == errno.ENOSPC
        assert tables.read_table(pipeline.out, "ledger").empty
        assert not [p for p in (pipeline.out / "tables").rglob("*") if p.is_file()]
        first = tried(attempts)
        assert len(first) == len(set(first)) and len(first) <= 2  # only what was in flight
        # The scan whose rows the flush could not write has its mask (on the other disk).
        stored = set(masks.stored_scan_ids(pipeline.out))
        assert stored and stored <= set(first)
        filler.unlink()
        masks.remove_partial_masks(pipeline.out)  # what a run does at its start
        counted_run(client, scans, pipeline)
    assert_every_scan_once(pipeline.out, scans)
    assert len(tried(attempts)) == len(first) + len(scans)  # the rerun: once each
    assert (tmp_path / "bulk" / scans[0].scan_id / "zarr.json").is_file()  # not on the disk


def test_the_last_flush_on_a_full_disk_is_out_of_space_too(
    client: Client, small_disk: Callable[[int], Path], tmp_path: Path
) -> None:
    """No flush until the run ends: the first write to find OUT's disk full is the table
    writer's last flush, after the loop; it stops the run as OutOfSpace, as a flush
    inside the loop does, and the rerun does every scan once."""
    disk = small_disk(512)
    scans, pipeline, attempts = stand_in_run(tmp_path, disk, 3, masks_on=tmp_path / "bulk")
    filler = fill(disk)
    no_flush_until_the_end = {"pingu.flush-every-scans": 1000, "pingu.flush-every-seconds": 1e6}
    with dask.config.set(no_flush_until_the_end):
        with pytest.raises(OutOfSpace, match="the driver's table write") as stopped:
            counted_run(client, scans, pipeline)
        assert stopped.value.__cause__.errno == errno.ENOSPC  # type: ignore[union-attr]
        assert sorted(tried(attempts)) == sorted(s.scan_id for s in scans)  # all ran
        assert tables.read_table(pipeline.out, "ledger").empty
        filler.unlink()
        counted_run(client, scans, pipeline)
    assert_every_scan_once(pipeline.out, scans)


# --- the command line, with a real model ---------------------------------------------------


def run_command(manifest: Path, out: Path, model: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pingu_dask.cli", "run", str(manifest), "--out", str(out),
               "--model", str(model), "--no-tta", "--step-size", "1.0", "--device", "cpu",
               "--workers", "2", "--no-nifti"]  # fmt: skip
    # A flush per scan: what finished is on the disk before it fills (a run's default
    # flushes every 50 scans or 10 s).
    environment = dict(os.environ, DASK_PINGU__FLUSH_EVERY_SCANS="1", COLUMNS="200")
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def eight_scans(cohort: Path, target: Path) -> list[str]:
    """The cohort's 3 scans as 8 manifest rows with ids of their own."""
    rows = absolute_manifest(cohort, target)
    eight = pd.concat([rows] * 3).head(8).reset_index(drop=True)
    eight["scan_id"] = [f"sub-{i:03d}" for i in range(1, 9)]
    eight["subject"] = [f"{i:03d}" for i in range(1, 9)]
    eight.to_csv(target, index=False)
    return list(eight.scan_id)


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_stops_it_in_one_line_and_the_same_command_resumes(
    cohort: Path, tiny_model: Path, small_disk: Callable[[int], Path], tmp_path: Path
) -> None:
    """8 scans of the tiny model need ~370 kB here (a ~30 kB mask and ~16 kB of table
    parts each); the disk has 200 kB free: it fills after a few scans."""
    manifest = tmp_path / "eight.csv"
    scan_ids = eight_scans(cohort, manifest)
    disk = small_disk(1024)
    filler = fill(disk, leave=200 * 1024)
    out = disk / "out"

    full = run_command(manifest, out, tiny_model)
    output = full.stdout + full.stderr
    assert full.returncode == OUT_OF_SPACE_EXIT_CODE, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "no space left" in line]
    assert len(lines) == 1, output
    found = re.search(
        rf"stopped: no space left in {re.escape(str(out))} \(its file system is full or over "
        rf"quota\); (\d+) of 8 scans are finished and kept; free space there "
        rf"\(`df -h {re.escape(str(out))}`\), then run the same command again to resume",
        lines[0],
    )
    assert found, lines[0]
    assert "(the write that failed: " in lines[0] and "[Errno 28]" in lines[0], lines[0]
    kept = int(found.group(1))
    ok = ledger.latest_attempts(out)
    assert kept == (ok.status == "ok").sum()
    assert 1 <= kept < 8  # it filled part way: some scans were kept, the rest not done
    assert "failed" not in set(ok.status)  # a full disk is not the scans' fault
    assert not (out / ".lock").exists()  # released

    filler.unlink()  # free space, on the same file system
    again = run_command(manifest, out, tiny_model)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming: {kept} scans done earlier are skipped" in again.stdout
    regions = tables.read_table(out, "regions")
    counts = regions[regions.region == "whole_brain"].scan_id.value_counts()
    assert sorted(counts.index) == scan_ids and set(counts) == {1}
    latest = ledger.latest_attempts(out)
    assert sorted(latest.scan_id) == scan_ids and set(latest.status) == {"ok"}
