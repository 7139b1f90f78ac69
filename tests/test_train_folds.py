"""The driver's fold loop (train/folds.py FoldLoop) with stand-in fold tasks, and the fold
ledger and trainer-process helpers it relies on.

Fast tier. The fold tasks here are STAND-INS, not training: on a real LocalCluster of
separate worker processes (each with one `GPU` slot) they send the events a fold's
trainer would send, write progress lines, and end with a FoldResult or a StageFailure
with a verdict, as `control.json` in the test's folder tells each fold. So the loop's
submissions, retries, ledger rows, events and Ctrl-C path run for real, in seconds.
This module is shipped to the workers by value (see standins.client_for_stand_ins).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pandas as pd
import pytest
from benchkit import standins
from distributed import Client

from pingu_dask.errors import StageFailure, Verdict
from pingu_dask.monitor.training import TRAIN_TOPIC
from pingu_dask.nnunet import planning
from pingu_dask.nnunet.trainer_process import (
    PROGRESS_FILE,
    STOPPED_EXIT_CODE,
    FoldExit,
    NnunetFolders,
    TrainerSettings,
    TrainerSpec,
    checkpoint_epoch,
    read_progress,
)
from pingu_dask.output.training import (
    LEDGER_COLUMNS,
    finished_folds,
    read_ledger,
    write_ledger_rows,
)
from pingu_dask.run.capacity import Capacity
from pingu_dask.train import folds as folds_module
from pingu_dask.train.folds import FoldJob, FoldLoop, FoldResult

EPOCHS = 3
SETTINGS = TrainerSettings(
    epochs=EPOCHS, iterations_per_epoch=2, val_iterations_per_epoch=1, checkpoint_every=1
)
WAIT_SECONDS = 30.0  # the longest a stand-in waits for another fold or a stop file


# --- the stand-in fold task (runs on the workers) -------------------------------------


def _control(job: FoldJob) -> Path:
    return Path(job.spec.trainer_folder).parent


def _send(job: FoldJob, **event) -> None:
    """An event of this fold from this worker (the scheduler stamps it with the worker's
    address: a "worker" set here would be overwritten)."""
    from distributed import get_worker

    base = {"token": job.token, "fold": job.spec.fold, "attempt": job.attempt}
    get_worker().log_event(TRAIN_TOPIC, {**base, **event})


def _epoch(job: FoldJob, epoch: int) -> None:
    """One epoch as the trainer reports it: a progress line (a checkpoint each epoch),
    then its event."""
    folder = job.spec.fold_folder
    with (folder / PROGRESS_FILE).open("a") as progress:
        progress.write(json.dumps({"epoch": epoch, "checkpoint_epoch": epoch}) + "\n")
    _send(job, event="epoch", epoch=epoch, checkpoint_epoch=epoch, loss=-0.1 * epoch,
          iterations_per_second=5.0)  # fmt: skip


def _finished(job: FoldJob, worker: str, from_epoch: int, started: float) -> FoldResult:
    time.sleep(0.2)  # the events go out before the result does
    return FoldResult(
        fold=job.spec.fold,
        attempt=job.attempt,
        worker=worker,
        from_epoch=from_epoch,
        epochs=job.spec.settings.epochs,
        seconds=time.perf_counter() - started,
        iterations_per_second=10.0 + job.spec.fold,
        data_wait_share=0.125,
        final_pseudo_dice=0.5,
    )


def _fail(job: FoldJob, worker: str, error_type: str, message: str, verdict: Verdict) -> NoReturn:
    time.sleep(0.2)
    raise StageFailure(f"fold {job.spec.fold}", worker, error_type, message, verdict)


def _from_here(events: list[dict], dask_worker=None) -> None:
    """Sends `events` from the worker this runs on (client.run passes it)."""
    for event in events:
        dask_worker.log_event(TRAIN_TOPIC, event)


def _wait_for(path: Path) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stand_in_fold(job: FoldJob) -> FoldResult:
    """A fold task steered by control.json ({fold: behaviour}; missing: "ok"):

    ok                 started, an epoch per scheduled epoch, a result
    transient-once     attempt 1: an epoch, then killed (transient); later attempts: ok,
                       resumed from the checkpoint
    transient-always   fails (transient, an OSError) before its first event
    repeats            started, then an error in the trainer (repeats)
    lost               started on the other worker, which "leaves" at epoch 2; started
                       again here from its checkpoint, then ok
    together           waits until every `together` fold has started, writes saw-N
    until-stopped      epochs until the file `stop` appears, then stopped (transient)
    ok-when-stopped    started, then waits for `stop`, then finishes its epochs: ok (a
                       fold in its last moments when the training is stopped)
    """
    from distributed import get_worker

    started = time.perf_counter()
    worker = get_worker().address
    control = _control(job)
    fold, attempt = job.spec.fold, job.attempt
    with (control / "attempts.txt").open("a") as attempts:
        attempts.write(f"{fold} {attempt} {worker}\n")
    plan = json.loads((control / "control.json").read_text())
    behaviour = plan.get(str(fold), "ok")
    job.spec.fold_folder.mkdir(parents=True, exist_ok=True)
    resumed = checkpoint_epoch(job.spec.fold_folder) or 0

    if behaviour == "transient-always":
        _fail(job, worker, "OSError", "[Errno 5] Input/output error", Verdict.TRANSIENT)
    _send(job, event="started", token="another-training")  # to be ignored
    if behaviour != "lost":
        _send(job, event="started", from_epoch=resumed, epochs=job.spec.settings.epochs)
    if behaviour == "transient-once" and attempt == 1:
        _epoch(job, 1)
        _fail(job, worker, "TrainerKilled", "the trainer process was killed by SIGKILL",
              Verdict.TRANSIENT)  # fmt: skip
    if behaviour == "repeats":
        _fail(job, worker, "KeyError", "'patch_size'", Verdict.REPEATS)
    if behaviour == "lost":
        # The other worker started the fold and trained two epochs, then "left"; Dask
        # handed the task to this one, which resumes from the checkpoint. (The scheduler
        # stamps a worker's events with its address, so they are sent from there.)
        from distributed import get_client

        other = next(a for a in get_client().scheduler_info()["workers"] if a != worker)
        base = {"token": job.token, "fold": fold, "attempt": attempt}
        get_client().run(_from_here, [
            {**base, "event": "started", "from_epoch": 0, "epochs": job.spec.settings.epochs},
            *({**base, "event": "epoch", "epoch": e, "checkpoint_epoch": e} for e in (1, 2)),
        ], workers=[other])  # fmt: skip
        with (job.spec.fold_folder / PROGRESS_FILE).open("a") as progress:
            progress.writelines(json.dumps({"epoch": e, "checkpoint_epoch": e}) + "\n"
                                for e in (1, 2))  # fmt: skip
        time.sleep(0.3)  # its events reach the scheduler first
        resumed = 2
        _send(job, event="started", from_epoch=resumed, epochs=job.spec.settings.epochs)
    if behaviour == "together":
        (control / f"started-{fold}").touch()
        others = [f for f, b in plan.items() if b == "together"]
        saw = all(_wait_for(control / f"started-{f}") for f in others)
        (control / f"saw-{fold}").write_text("yes" if saw else "no")
    if behaviour == "until-stopped":
        epoch, deadline = resumed, time.monotonic() + WAIT_SECONDS
        while not (control / "stop").exists() and time.monotonic() < deadline:
            epoch += 1
            _epoch(job, epoch)
            _wait_for_quickly(control / "stop")
        _fail(job, worker, "TrainerStopped", "SIGTERM: saved a checkpoint", Verdict.TRANSIENT)
    if behaviour == "ok-when-stopped":
        _wait_for(control / "stop")
    for epoch in range(resumed + 1, job.spec.settings.epochs + 1):
        _epoch(job, epoch)
    return _finished(job, worker, resumed, started)


def _wait_for_quickly(path: Path) -> None:
    """An epoch's time (0.3 s), cut short when `path` appears."""
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.05)


# --- the driver side ------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with standins.client_for_stand_ins(2, 2, sys.modules[__name__]) as client:
        yield client


def fold_jobs(folder: Path, n_folds: int) -> list[FoldJob]:
    """First attempts at `n_folds` folds; the trainer folder's parent holds control files."""
    folders = planning.folders_in(folder / "model")
    trainer = folder / "Trainer__Plans__3d_fullres"
    return [
        FoldJob(
            spec=TrainerSpec(
                folders=folders,
                plans="nnUNetPlans",
                configuration="3d_fullres",
                trainer_folder=str(trainer),
                fold=fold,
                settings=SETTINGS,
            ),
            attempt=1,
            token="replaced-by-the-loop",
            device="cpu",
            augmentation_processes=1,
        )
        for fold in range(n_folds)
    ]


class Recorded(Capacity):
    """What the loop asks of the capacity (batch jobs would be asked for)."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def workers(self, scans_left: int) -> int:
        self.asked.append(scans_left)
        return 2


def run_loop(client: Client, folder: Path, plan: dict[int, str], n_folds: int, **options):
    (folder / "control.json").write_text(json.dumps({str(k): v for k, v in plan.items()}))
    events: list[dict] = []
    loop = FoldLoop(client=client, model_dir=folder / "model", run_id="run-1",
                    on_event=events.append, task=stand_in_fold,
                    **{"retries": 2, **options})  # fmt: skip
    results = loop.run(fold_jobs(folder, n_folds))
    return loop, results, events, read_ledger(folder / "model")


def attempts_made(folder: Path) -> list[tuple[int, int]]:
    lines = (folder / "attempts.txt").read_text().split("\n")
    return sorted((int(line.split()[0]), int(line.split()[1])) for line in lines if line)


def rows_of(ledger: pd.DataFrame, fold: int) -> pd.DataFrame:
    return ledger[ledger.fold == fold].reset_index(drop=True)


def workers_of(client: Client) -> set[str]:
    return set(client.scheduler_info()["workers"])


def test_every_fold_ok_gives_one_ok_row_per_fold(client: Client, tmp_path: Path) -> None:
    capacity = Recorded()
    loop, results, events, ledger = run_loop(client, tmp_path, {}, 3, capacity=capacity)
    assert sorted(results) == [0, 1, 2] and not loop.failures
    assert attempts_made(tmp_path) == [(0, 1), (1, 1), (2, 1)]
    assert list(ledger.columns) == list(LEDGER_COLUMNS)
    assert sorted(ledger.fold) == [0, 1, 2] and set(ledger.status) == {"ok"}
    for fold in range(3):
        (row,) = rows_of(ledger, fold).itertuples()
        result = results[fold]
        assert (result.fold, result.attempt, result.from_epoch) == (fold, 1, 0)
        assert (row.run_id, row.attempt, row.from_epoch) == ("run-1", 1, 0)
        assert (row.epochs_reached, row.checkpoint_epoch, row.epochs) == (EPOCHS, EPOCHS, EPOCHS)
        assert row.worker == result.worker and row.worker in workers_of(client)
        assert row.iterations_per_second == 10.0 + fold and row.data_wait_share == 0.125
        assert pd.isna(row.error_type) and pd.isna(row.message)
        assert row.started <= row.finished and str(row.started.tz) == "UTC"
    assert finished_folds(tmp_path / "model") == {0, 1, 2}

    for fold in range(3):
        mine = [e for e in events if e.get("fold") == fold]
        assert [e["event"] for e in mine] == ["started"] + ["epoch"] * EPOCHS + ["fold-ended"]
        assert [e["epoch"] for e in mine if e["event"] == "epoch"] == [1, 2, 3]
        ended = mine[-1]
        assert (ended["status"], ended["attempt"], ended["message"]) == ("ok", 1, None)
    assert {e["token"] for e in events} == {loop.token}  # another training's: not relayed
    assert capacity.asked and capacity.asked[0] == 3  # every fold is submitted at once
    assert capacity.asked == sorted(capacity.asked, reverse=True) and min(capacity.asked) >= 1


def test_a_transient_failure_is_retried_from_its_checkpoint(client: Client, tmp_path: Path) -> None:
    loop, results, events, ledger = run_loop(client, tmp_path, {1: "transient-once"}, 2)
    assert sorted(results) == [0, 1] and not loop.failures
    assert attempts_made(tmp_path) == [(0, 1), (1, 1), (1, 2)]
    assert results[1].attempt == 2 and results[1].from_epoch == 1  # the second job
    fold = rows_of(ledger, 1)
    assert fold.status.tolist() == ["retried", "ok"] and fold.attempt.tolist() == [1, 2]
    retried, ok = fold.iloc[0], fold.iloc[1]
    assert retried.error_type == "TrainerKilled"
    assert retried.message == "fold 1: the trainer process was killed by SIGKILL"
    assert (retried.from_epoch, retried.epochs_reached, retried.checkpoint_epoch) == (0, 1, 1)
    assert (ok.from_epoch, ok.epochs_reached) == (1, EPOCHS) and pd.isna(ok.error_type)
    assert rows_of(ledger, 0).status.tolist() == ["ok"]
    ended = [(e["attempt"], e["status"]) for e in events
             if e["event"] == "fold-ended" and e["fold"] == 1]  # fmt: skip
    assert ended == [(1, "retry"), (2, "ok")]
    started = [e["attempt"] for e in events if e["event"] == "started" and e["fold"] == 1]
    assert started == [1, 2]
    assert finished_folds(tmp_path / "model") == {0, 1}


def test_a_repeating_failure_fails_at_once(client: Client, tmp_path: Path) -> None:
    loop, results, events, ledger = run_loop(client, tmp_path, {0: "repeats"}, 2)
    assert sorted(results) == [1]
    assert attempts_made(tmp_path) == [(0, 1), (1, 1)]  # not retried
    (row,) = rows_of(ledger, 0).itertuples()
    assert (row.status, row.attempt, row.error_type) == ("failed", 1, "KeyError")
    assert row.message == "fold 0: 'patch_size'" and row.worker in workers_of(client)
    report = loop.failures[0]
    assert (report.error_type, report.verdict, report.retryable) == (
        "KeyError",
        Verdict.REPEATS,
        False,
    )
    assert set(loop.failures) == {0}
    ended = [e for e in events if e["event"] == "fold-ended" and e["fold"] == 0]
    assert [(e["status"], e["message"]) for e in ended] == [("failed", "fold 0: 'patch_size'")]
    assert finished_folds(tmp_path / "model") == {1}


@pytest.mark.parametrize("retries", [0, 1])
def test_retries_run_out(client: Client, tmp_path: Path, retries: int) -> None:
    """A fold failing (transiently) before its first event, every time: its rows are made
    from the job and the checkpoint its progress lines name (one of them half written)."""
    folder = fold_jobs(tmp_path, 1)[0].spec.fold_folder
    folder.mkdir(parents=True)
    (folder / PROGRESS_FILE).write_text(
        '{"epoch": 1, "checkpoint_epoch": 1}\n{"epoch": 2, "checkpoint_epoch": 2}\n{"epo'
    )
    loop, results, events, ledger = run_loop(client, tmp_path, {0: "transient-always"}, 1,
                                             retries=retries)  # fmt: skip
    assert results == {} and set(loop.failures) == {0}
    assert loop.failures[0].error_type == "OSError" and loop.failures[0].retryable
    attempts = list(range(1, retries + 2))
    assert attempts_made(tmp_path) == [(0, a) for a in attempts]
    assert ledger.attempt.tolist() == attempts
    assert ledger.status.tolist() == ["retried"] * retries + ["failed"]
    for row in ledger.itertuples():
        assert (row.from_epoch, row.epochs_reached, row.checkpoint_epoch, row.epochs) == (
            2,
            2,
            2,
            EPOCHS,
        )
        assert row.worker in workers_of(client)  # the StageFailure's worker
        assert row.message == "fold 0: [Errno 5] Input/output error"
    ended = [e["status"] for e in events if e["event"] == "fold-ended"]
    assert ended == ["retry"] * retries + ["failed"]
    assert not [e for e in events if e["event"] == "started"]
    assert finished_folds(tmp_path / "model") == set()


def test_a_fold_started_again_elsewhere_gets_a_lost_row(client: Client, tmp_path: Path) -> None:
    _, results, events, ledger = run_loop(client, tmp_path, {0: "lost"}, 1)
    assert sorted(results) == [0] and results[0].from_epoch == 2
    assert attempts_made(tmp_path) == [(0, 1)]  # one task, "run" by two workers
    assert ledger.status.tolist() == ["lost", "ok"]
    lost, ok = ledger.iloc[0], ledger.iloc[1]
    assert ok.worker == results[0].worker
    (gone,) = workers_of(client) - {ok.worker}
    assert (lost.attempt, lost.worker, lost.error_type) == (1, gone, "WorkerLeft")
    assert f"its worker {gone} left at epoch 2" in lost.message
    assert (lost.from_epoch, lost.epochs_reached, lost.checkpoint_epoch) == (0, 2, 2)
    assert (ok.attempt, ok.from_epoch, ok.epochs_reached) == (1, 2, EPOCHS)
    assert lost.finished <= ok.finished
    started = [e["worker"] for e in events if e["event"] == "started"]
    assert started == [gone, ok.worker]
    assert finished_folds(tmp_path / "model") == {0}


def test_folds_run_side_by_side_one_per_gpu_slot(client: Client, tmp_path: Path) -> None:
    _, results, _, ledger = run_loop(client, tmp_path, {0: "together", 1: "together"}, 2)
    assert sorted(results) == [0, 1]
    # Each fold waited until the other had started: both ran at the same time...
    assert (tmp_path / "saw-0").read_text() == "yes" and (tmp_path / "saw-1").read_text() == "yes"
    # ...each on its own worker (one GPU slot each).
    assert {results[0].worker, results[1].worker} == workers_of(client)
    assert set(ledger.status) == {"ok"}


class Interrupt(Exception):
    """Stands for Ctrl-C / SIGTERM reaching the driver while folds train."""


def test_an_interrupted_training_records_each_folds_checkpoint(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(folds_module, "STOP_WAIT_SECONDS", 20.0)
    (tmp_path / "control.json").write_text(json.dumps({"0": "until-stopped", "1": "until-stopped"}))
    seen: dict[int, int] = {}

    def on_event(event: dict) -> None:
        if event.get("event") == "epoch":
            seen[event["fold"]] = event["epoch"]
        if len(seen) == 2 and min(seen.values()) >= 2 and not (tmp_path / "stop").exists():
            (tmp_path / "stop").touch()  # what stop_fold_children asks of the children
            raise Interrupt  # once: the loop relays the events left while it stops

    loop = FoldLoop(client=client, model_dir=tmp_path / "model", run_id="run-1", retries=2,
                    on_event=on_event, task=stand_in_fold)  # fmt: skip
    jobs = fold_jobs(tmp_path, 2)
    with pytest.raises(Interrupt):
        loop.run(jobs)
    assert loop.submitted == {}
    ledger = read_ledger(tmp_path / "model")
    assert sorted(ledger.fold) == [0, 1] and set(ledger.status) == {"interrupted"}
    for row in ledger.itertuples():
        saved = checkpoint_epoch(jobs[row.fold].spec.fold_folder)
        assert saved is not None and saved >= 2
        assert row.checkpoint_epoch == saved  # what the next attempt resumes from
        assert (row.attempt, row.error_type) == (1, "Interrupted")
        assert "checkpoint is kept" in row.message
    assert attempts_made(tmp_path) == [(0, 1), (1, 1)]  # nothing retried after the stop
    assert finished_folds(tmp_path / "model") == set()


def test_a_fold_that_finishes_while_the_training_stops_is_recorded_ok(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(folds_module, "STOP_WAIT_SECONDS", 20.0)
    plan = {"0": "until-stopped", "1": "ok-when-stopped"}
    (tmp_path / "control.json").write_text(json.dumps(plan))
    started: set[int] = set()

    def on_event(event: dict) -> None:
        if event.get("event") == "started":
            started.add(event["fold"])
        ready = started == {0, 1} and event.get("event") == "epoch" and event["epoch"] >= 2
        if ready and not (tmp_path / "stop").exists():
            (tmp_path / "stop").touch()
            raise Interrupt

    loop = FoldLoop(client=client, model_dir=tmp_path / "model", run_id="run-1", retries=2,
                    on_event=on_event, task=stand_in_fold)  # fmt: skip
    with pytest.raises(Interrupt):
        loop.run(fold_jobs(tmp_path, 2))
    ledger = read_ledger(tmp_path / "model")
    assert rows_of(ledger, 0).status.tolist() == ["interrupted"]
    assert rows_of(ledger, 1).status.tolist() == ["ok"]  # it finished: not interrupted
    assert sorted(loop.results) == [1]


def test_no_folds_to_train(client: Client, tmp_path: Path) -> None:
    loop = FoldLoop(client=client, model_dir=tmp_path / "model", run_id="run-1", retries=2,
                    task=stand_in_fold)  # fmt: skip
    assert loop.run([]) == {} and not loop.failures
    assert read_ledger(tmp_path / "model").empty


# --- the fold ledger ------------------------------------------------------------------


def ledger_row(fold: int, attempt: int, status: str, finished: str, **more) -> dict:
    return {"run_id": "r", "fold": fold, "attempt": attempt, "status": status,
            "started": pd.Timestamp("2024-01-01T00:00:00Z"),
            "finished": pd.Timestamp(finished), **more}  # fmt: skip


def test_ledger_rows_round_trip_and_the_latest_row_per_fold_decides(tmp_path: Path) -> None:
    assert write_ledger_rows(tmp_path, []) is None and not (tmp_path / "ledger").exists()
    empty = read_ledger(tmp_path)
    assert empty.empty and list(empty.columns) == list(LEDGER_COLUMNS)
    assert finished_folds(tmp_path) == set()

    first = write_ledger_rows(tmp_path, [
        ledger_row(0, 1, "retried", "2024-01-01T01:00:00Z", error_type="KilledWorker",
                   message="gone", epochs_reached=4, worker="tcp://a:1"),
        ledger_row(1, 1, "ok", "2024-01-01T02:00:00Z", iterations_per_second=3.5),
        ledger_row(2, 1, "ok", "2024-01-01T01:30:00Z"),
    ])  # fmt: skip
    assert first is not None and first.parent == tmp_path / "ledger"
    assert first.suffix == ".parquet" and first.name.startswith("part-")
    assert finished_folds(tmp_path) == {1, 2}
    write_ledger_rows(tmp_path, [
        ledger_row(0, 2, "ok", "2024-01-01T03:00:00Z"),
        ledger_row(2, 2, "failed", "2024-01-01T04:00:00Z"),  # a later attempt failed
    ])  # fmt: skip
    (tmp_path / "ledger" / ".part-being-written.parquet").write_text("not yet")  # skipped

    ledger = read_ledger(tmp_path)
    assert len(ledger) == 5 and list(ledger.columns) == list(LEDGER_COLUMNS)
    assert list(zip(ledger.fold, ledger.attempt, ledger.status, strict=True)) == [
        (0, 1, "retried"),
        (2, 1, "ok"),
        (1, 1, "ok"),
        (0, 2, "ok"),
        (2, 2, "failed"),
    ]  # oldest first
    retried = ledger.iloc[0]
    assert (retried.error_type, retried.message, retried.epochs_reached) == (
        "KilledWorker",
        "gone",
        4,
    )
    assert retried.worker == "tcp://a:1" and pd.isna(retried.from_epoch)  # not given: null
    assert ledger.iloc[2].iterations_per_second == 3.5
    assert str(ledger.finished.dt.tz) == "UTC"
    assert finished_folds(tmp_path) == {0, 1}  # fold 2's latest row failed


# --- trainer_process: the spec, the environment, how a child ended --------------------


def spec(**changes) -> TrainerSpec:
    folders = NnunetFolders(raw="/m/raw", preprocessed="/m/pre", results="/m/res",
                            dataset="Dataset001_pingu")  # fmt: skip
    settings = TrainerSettings(epochs=30, iterations_per_epoch=40, val_iterations_per_epoch=5,
                               checkpoint_every=5, optimizer="adamw", initial_lr=3e-4,
                               oversample_foreground=0.66, seed=11)  # fmt: skip
    values = dict(folders=folders, plans="nnUNetPlans_tiny", configuration="3d_fullres",
                  trainer_folder="/m/res/Dataset001_pingu/T__P__3d_fullres", fold=2,
                  settings=settings, device="cuda", threads=4, augmentation_processes=3,
                  init_weights="/models/demo/fold_0/checkpoint_final.pth", init_heads=True,
                  parent_pid=4321, visible_gpu="1")  # fmt: skip
    return TrainerSpec(**{**values, **changes})


def test_a_trainer_spec_survives_its_json_file() -> None:
    original = spec()
    text = original.to_json()
    again = TrainerSpec.from_json(text)
    assert again == original
    assert isinstance(again.folders, NnunetFolders) and isinstance(again.settings, TrainerSettings)
    assert json.loads(text)["settings"]["initial_lr"] == 3e-4
    plain = spec(init_weights=None, init_heads=False, visible_gpu=None, device="cpu")
    assert TrainerSpec.from_json(plain.to_json()) == plain
    assert original.fold_folder == Path("/m/res/Dataset001_pingu/T__P__3d_fullres/fold_2")


def test_the_childs_environment() -> None:
    base = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "64", "CUDA_VISIBLE_DEVICES": "0,1,2"}
    environment = spec().environment(base)
    assert environment["PATH"] == "/usr/bin"
    assert (environment["nnUNet_raw"], environment["nnUNet_preprocessed"],
            environment["nnUNet_results"]) == ("/m/raw", "/m/pre", "/m/res")  # fmt: skip
    assert environment["nnUNet_n_proc_DA"] == "3" and environment["nnUNet_def_n_proc"] == "1"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert environment[name] == "4"
    assert environment["CUDA_VISIBLE_DEVICES"] == "1"  # the slot's own GPU only
    assert "nnUNet_compile" not in environment  # on a GPU nnU-Net decides
    assert base["OMP_NUM_THREADS"] == "64"  # the base is not changed

    on_cpu = spec(device="cpu", visible_gpu=None, threads=1, augmentation_processes=0)
    environment = on_cpu.environment({"PATH": "/usr/bin"})
    assert "CUDA_VISIBLE_DEVICES" not in environment  # only set when the spec says
    assert environment["nnUNet_compile"] == "false"
    assert environment["nnUNet_n_proc_DA"] == "0" and environment["OMP_NUM_THREADS"] == "1"
    assert on_cpu.environment({"CUDA_VISIBLE_DEVICES": "5"})["CUDA_VISIBLE_DEVICES"] == "5"


def test_the_childs_environment_starts_from_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINGU_TEST_MARKER", "kept")
    monkeypatch.setenv("nnUNet_raw", "/somewhere/else")
    environment = spec().environment()
    assert environment["PINGU_TEST_MARKER"] == "kept" and environment["nnUNet_raw"] == "/m/raw"
    assert os.environ["nnUNet_raw"] == "/somewhere/else"  # noqa: SIM112 (nnU-Net's name)


@pytest.mark.parametrize(
    ("returncode", "outcome", "ok", "stopped", "described"),
    [
        (0, {"status": "ok", "epochs": 30}, True, False, None),
        (0, {}, False, False, ("TrainerFailed", "the trainer process exited with code 0")),
        (STOPPED_EXIT_CODE, {"status": "stopped", "message": "SIGTERM: saved at epoch 10"},
         False, True, ("TrainerStopped", "SIGTERM: saved at epoch 10")),
        (STOPPED_EXIT_CODE, {}, False, True, ("TrainerStopped", "stopped early")),
        (-signal.SIGKILL, {}, False, True,
         ("TrainerKilled", "the trainer process was killed by SIGKILL")),
        (-signal.SIGTERM, {}, False, True,
         ("TrainerKilled", "the trainer process was killed by SIGTERM")),
        (1, {"status": "error", "error_type": "KeyError", "message": "'patch_size'"},
         False, False, ("KeyError", "'patch_size'")),
        (1, {}, False, False, ("TrainerFailed", "the trainer process exited with code 1")),
    ],
)  # fmt: skip
def test_how_a_child_ended(
    returncode: int, outcome: dict, ok: bool, stopped: bool, described: tuple | None
) -> None:
    ended = FoldExit(returncode, outcome)
    assert (ended.ok, ended.stopped) == (ok, stopped)
    if described is not None:
        assert ended.describe() == described


def test_a_child_killed_by_a_signal_without_a_name_is_described() -> None:
    ended = FoldExit(-40, {})
    assert ended.stopped
    error_type, message = ended.describe()
    assert error_type == "TrainerKilled" and "40" in message


def test_checkpoint_epoch_reads_whole_progress_lines_only(tmp_path: Path) -> None:
    assert checkpoint_epoch(tmp_path) is None and read_progress(tmp_path) == []
    (tmp_path / PROGRESS_FILE).write_text(
        '{"epoch": 1, "checkpoint_epoch": null}\n'
        '{"epoch": 2, "checkpoint_epoch": 2}\n'
        '{"epoch": 3}\n'
        '{"epoch": 4, "checkpoint_epo'  # being written
    )
    assert [line["epoch"] for line in read_progress(tmp_path)] == [1, 2, 3]
    assert checkpoint_epoch(tmp_path) == 2
    with (tmp_path / PROGRESS_FILE).open("a") as progress:
        progress.write('ch": 4}\n{"epoch": 5, "checkpoint_epoch": 5}\n')  # the line completed
    assert checkpoint_epoch(tmp_path) == 5
