"""The runner's fault handling on a real LocalCluster with stand-in stages (fast tier).

scripts/benchkit/standins.py holds the stand-ins (test-only, not a model): real Dask workers,
real ledger and Parquet files, no inference, so each test takes seconds. What is
tested: transient errors retried and seen in the ledger, repeating errors failed at
once, the circuit breaker, the per-scan time limit, flushes while the driver waits,
and batch-style scaling from the work left (ScaleFromWork on a LocalCluster).
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import replace
from pathlib import Path

import cloudpickle
import pytest
from benchkit import standins
from distributed import Client, LocalCluster

from pingu_dask.config import INFERENCE_RESOURCE
from pingu_dask.output import ledger, tables
from pingu_dask.run.capacity import PresentWorkers
from pingu_dask.run.jobs import JobCapacity, ScaleFromWork
from pingu_dask.run.local import scheduler_options
from pingu_dask.run.loop import RunStopped, Segmentation, segment_scans
from pingu_dask.run.settings import RunSettings
from pingu_dask.run.stages import Pipeline

make_scans, pipeline_in = standins.make_scans, standins.pipeline_in


@pytest.fixture(scope="module")
def client():
    with standins.client_for_stand_ins(2, 3) as client:
        yield client


def ledger_of(pipeline: Pipeline):
    return tables.read_table(pipeline.out, "ledger").sort_values(["scan_id", "attempt"])


def on_stand_ins(client: Client, scans: list, pipeline, **given) -> list:
    """The scans through the loop on the stand-in stages (unwatched)."""
    job = Segmentation(scans=scans, pipeline=pipeline, watch=False, **given)
    return segment_scans(client, job)


def breaker_after(scans: int) -> RunSettings:
    """The run's settings with a circuit breaker that trips after `scans` alike."""
    return replace(RunSettings.from_config(), breaker_scans=scans)


def test_transient_errors_are_retried_and_repeating_ones_fail_at_once(
    client: Client, tmp_path: Path
) -> None:
    scans, pipeline = make_scans(6, tmp_path), pipeline_in(tmp_path)
    (tmp_path / "io-once").write_text("sub-001 sub-004")
    (tmp_path / "type-error").write_text("sub-002")
    records = on_stand_ins(client, scans, pipeline)
    status = {r.scan_id: r.status for r in records}
    assert status == {s.scan_id: "failed" if s.scan_id == "sub-002" else "ok" for s in scans}
    ledger = ledger_of(pipeline)
    for scan_id in ("sub-001", "sub-004"):
        rows = ledger[ledger.scan_id == scan_id]
        assert rows.attempt.tolist() == [1, 2] and rows.status.tolist() == ["failed", "ok"]
        assert rows.error_type.iloc[0] == "OSError" and rows.retryable.iloc[0]
    broken = ledger[ledger.scan_id == "sub-002"]
    assert len(broken) == 1 and not broken.retryable.iloc[0]  # not retried
    assert broken.error_type.iloc[0] == "TypeError"
    assert "unsupported operand" in broken.message.iloc[0]  # the message is kept
    regions = tables.read_table(pipeline.out, "regions")
    assert sorted(regions.scan_id) == sorted(s.scan_id for s in scans if s.scan_id != "sub-002")


def test_the_circuit_breaker_stops_a_run_whose_every_scan_fails_alike(
    client: Client, tmp_path: Path
) -> None:
    scans, pipeline = make_scans(40, tmp_path), pipeline_in(tmp_path)
    (tmp_path / "broken-model").write_text("")
    with pytest.raises(RunStopped) as stopped:
        on_stand_ins(client, scans, pipeline, settings=breaker_after(10), window=4)
    message = str(stopped.value)
    assert "first attempts of 10 scans in a row failed with ModelError on 2 worker(s)" in message
    assert "cannot load the checkpoint" in message
    ledger = ledger_of(pipeline)
    # Stopped after 10 scans, plus what was in flight (window 4): not scan by scan.
    assert 10 <= len(ledger) <= 10 + 4
    assert set(ledger.status) == {"failed"} and not ledger.retryable.any()
    assert (ledger.attempt == 1).all() and ledger.scan_id.is_unique
    assert len(set(ledger.worker)) == 2
    assert len(stopped.value.results) == len(ledger)  # the rest: no row, done next run


def test_the_breaker_does_not_trip_on_scattered_failures(client: Client, tmp_path: Path) -> None:
    scans, pipeline = make_scans(24, tmp_path), pipeline_in(tmp_path)
    (tmp_path / "type-error").write_text(" ".join(s.scan_id for s in scans[::2]))
    records = on_stand_ins(client, scans, pipeline, settings=breaker_after(3), window=2)
    assert len(records) == 24  # every second scan fails: never 3 first attempts in a row
    assert sum(r.status == "failed" for r in records) == 12


@pytest.mark.slow  # seconds of real processes: the full suite runs it
def test_a_hanging_stage_is_timed_out_and_retried(client: Client, tmp_path: Path) -> None:
    scans, pipeline = make_scans(4, tmp_path), pipeline_in(tmp_path)
    (tmp_path / "hang-once").write_text("sub-002")  # its first predict sleeps 300 s
    started = time.monotonic()
    records = on_stand_ins(
        client, scans, pipeline, settings=RunSettings.from_config(scan_timeout=5)
    )
    assert time.monotonic() - started < 240  # not the 300 s of the hang (slack: a loaded CI)
    assert all(r.status == "ok" for r in records) and len(records) == 4
    ledger = ledger_of(pipeline)
    hung = ledger[ledger.scan_id == "sub-002"].sort_values("attempt")
    # The retry runs on the restarted worker; on a loaded machine its first task (imports
    # in a fresh process) may itself pass the timeout once more: then a third attempt.
    assert hung.attempt.tolist() == list(range(1, len(hung) + 1)) and len(hung) >= 2
    assert hung.status.tolist() == ["failed"] * (len(hung) - 1) + ["ok"]
    first = hung.iloc[0]
    assert first.error_type == "TimeoutError" and first.retryable
    assert "predict: no result after 5 s" in first.message
    assert (ledger.groupby("scan_id").status.last() == "ok").all()
    assert len(tables.read_table(pipeline.out, "regions")) == 4  # each scan exactly once


def test_a_rerun_does_only_what_is_not_done(client: Client, tmp_path: Path) -> None:
    """Resume on the stand-ins: the scans that failed, and a scan whose input changed,
    are redone; the others are skipped; each scan is in the tables exactly once."""
    scans, pipeline = make_scans(6, tmp_path), pipeline_in(tmp_path)
    (tmp_path / "type-error").write_text("sub-001 sub-004")
    first = on_stand_ins(client, scans, pipeline)
    assert sorted(r.scan_id for r in first if not r.ok) == ["sub-001", "sub-004"]
    (tmp_path / "type-error").unlink()
    standins.new_image(scans[2])
    plan = ledger.plan_resume(pipeline.out, scans, pipeline.fingerprint())
    assert sorted(s.scan_id for s in plan.todo) == ["sub-001", "sub-002", "sub-004"]
    assert plan.redo == ["sub-002"] and len(plan.done) == 3
    tables.drop_scans(pipeline.out, plan.redo)  # as run_cohort does
    again = on_stand_ins(client, plan.todo, pipeline)
    assert sorted(r.scan_id for r in again if r.ok) == ["sub-001", "sub-002", "sub-004"]
    regions = tables.read_table(pipeline.out, "regions")
    assert sorted(regions.scan_id) == [s.scan_id for s in scans]  # each exactly once
    assert ledger.plan_resume(pipeline.out, scans, pipeline.fingerprint()).todo == []
    assert sorted(p.name for p in (pipeline.out / "masks.zarr").iterdir() if p.is_dir()) == [
        s.scan_id for s in scans
    ]  # the real stages wrote each scan's mask


def test_finished_scans_are_flushed_while_the_driver_waits(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_PINGU__FLUSH_EVERY_SECONDS", "0.5")
    import dask.config

    dask.config.refresh()
    scans, pipeline = make_scans(3, tmp_path), pipeline_in(tmp_path)
    (tmp_path / "hold").write_text("sub-002")
    done: list = []
    runner = threading.Thread(target=lambda: done.append(on_stand_ins(client, scans, pipeline)))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        seen = set()
        while time.monotonic() < deadline and len(seen) < 2:
            seen = set(tables.read_table(pipeline.out, "ledger").scan_id)
            time.sleep(0.1)
        # Two scans are on disk while the third is still held: the time-based flush
        # fired with no scan finishing in between.
        assert seen == {"sub-000", "sub-001"}
        assert runner.is_alive()
    finally:
        (tmp_path / "release").write_text("")
        runner.join(60)
    dask.config.refresh()
    assert len(done[0]) == 3 and set(tables.read_table(pipeline.out, "ledger").scan_id) == {
        "sub-000", "sub-001", "sub-002"
    }  # fmt: skip


def test_job_capacity_follows_the_scans_left() -> None:
    capacity = JobCapacity(minimum_workers=0, maximum_workers=3)
    assert [capacity.workers(n) for n in (8, 3, 2, 1)] == [3, 3, 2, 1]
    capacity.workers(0)
    assert capacity.wanted == 0  # drained: every job can go
    assert JobCapacity(minimum_workers=2, maximum_workers=3).workers(0) == 2  # min kept


@pytest.mark.slow
def test_scaling_from_the_work_grows_to_the_maximum_and_releases_workers(tmp_path: Path) -> None:
    """Batch-style scaling on a LocalCluster: no worker at the start, up to 3 asked for
    from the 9 scans left (Dask's own target would stay at one worker), back to none."""
    cloudpickle.register_pickle_by_value(standins)
    scans, pipeline = make_scans(9, tmp_path), pipeline_in(tmp_path)
    (tmp_path / "sleep").write_text("1.0")
    capacity = JobCapacity(minimum_workers=0, maximum_workers=3)
    capacity.workers(len(scans))
    cluster = LocalCluster(
        n_workers=0,
        threads_per_worker=4,
        processes=True,
        resources={INFERENCE_RESOURCE: 1},
        dashboard_address=":0",
        scheduler_kwargs=scheduler_options(),
    )
    with cluster, Client(cluster) as client:
        capacity.present = PresentWorkers(client, every=0.2)  # as scale_from_work does
        cluster.adapt(Adaptive=functools.partial(ScaleFromWork, capacity=capacity),
                      minimum=0, maximum=3, interval="200ms", wait_count=2)  # fmt: skip
        records = on_stand_ins(client, scans, pipeline, capacity=capacity)
        assert all(r.status == "ok" for r in records) and len(records) == 9
        workers = set(tables.read_table(pipeline.out, "ledger").worker)
        assert len(workers) == 3  # every worker asked for got work
        assert capacity.wanted == 0
        deadline = time.monotonic() + 30
        while client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not client.scheduler_info()["workers"]  # released as the queue drained


def test_a_very_long_error_keeps_its_type_and_verdict_through_dask() -> None:
    """torch's state-dict mismatch is ~40,000 characters; Dask replaces an exception
    that long with a generic one (losing the ModelError and its verdict), so a stage's
    failure carries a shortened message."""
    from pingu_dask.errors import MAX_MESSAGE_LENGTH, StageFailure, Verdict

    failure = StageFailure("predict", "w", "ModelError", "size mismatch " * 5000, Verdict.REPEATS)
    assert len(failure.message) < MAX_MESSAGE_LENGTH + 100
    assert failure.message.endswith("more characters)")
    with (
        LocalCluster(n_workers=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        pytest.raises(StageFailure) as caught,
    ):
        client.submit(_fail_at_length, 70_000).result()
    assert caught.value.error_type == "ModelError" and not caught.value.retryable


def _fail_at_length(length: int) -> None:
    from pingu_dask.errors import StageFailure, Verdict

    raise StageFailure("predict", "w", "ModelError", "x" * length, Verdict.REPEATS)
