"""Folds on Dask: one long task per fold on a worker's inference slot, retried from its checkpoint.

Worker side, `train_fold`: starts the fold's nnU-Net trainer as a child process
(nnunet/trainer_process.py: a daemonic Dask worker cannot start nnU-Net's augmentation
processes, its child can), relays each epoch's figures as an event (the driver's
terminal, the run page and Prometheus read them), and ends with the fold's figures or
a StageFailure that carries the verdict on retrying (errors.py): a child stopped or
killed (SIGTERM, the walltime, a lost worker) or out of memory is transient: another
attempt goes on from its checkpoint; an error in the trainer repeats.

Driver side, `FoldLoop`: submits every fold not yet finished at once (each asks for the
`GPU` resource, so folds run in parallel up to the slots there are), writes one ledger
row per attempt (fold, attempt, the epoch it started from and reached, worker, reason),
retries transient failures up to `retries`, and on Ctrl-C / SIGTERM asks every fold's
child to save a checkpoint before it cancels. A task Dask hands to another worker
itself (a worker leaving gracefully at its --lifetime) is seen from the events (a new
`started` from another worker) and gets a `lost` row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from distributed import Client, Future

from pingu_dask.config import INFERENCE_RESOURCE, worker_threads
from pingu_dask.errors import ErrorReport, StageFailure, Verdict, describe
from pingu_dask.monitor.feed import TrainFeed
from pingu_dask.monitor.training import TRAIN_TOPIC
from pingu_dask.nnunet.trainer_process import (
    FoldProcess,
    TrainerSpec,
    checkpoint_epoch,
    child_device,
    stop_all,
)
from pingu_dask.output.training import now, write_ledger_rows
from pingu_dask.run.capacity import Capacity
from pingu_dask.run.stages import worker_name

TICK_SECONDS = 1.0
STOP_WAIT_SECONDS = 60.0  # after Ctrl-C: how long folds get to save their checkpoints

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldJob:
    """One attempt at one fold, as its task gets it (small, picklable)."""

    spec: TrainerSpec  # parent pid, device, threads are filled in on the worker
    attempt: int
    token: str  # the training's events
    device: str  # auto | cpu | cuda | cuda:N
    augmentation_processes: int | None  # None: the worker's threads - 1, at least 1


@dataclass
class FoldResult:
    """A finished fold, as the driver records it."""

    fold: int
    attempt: int
    worker: str
    from_epoch: int
    epochs: int
    seconds: float
    iterations_per_second: float | None = None
    data_wait_share: float | None = None
    final_pseudo_dice: float | None = None
    final_ema_pseudo_dice: float | None = None


def _emit(event: dict) -> None:
    """An event on the training topic, from the worker (best effort)."""
    from distributed import get_worker

    try:
        get_worker().log_event(TRAIN_TOPIC, event)
    except Exception as error:  # watching must never stop a fold
        logger.debug("could not send a training event: %s", error)


def _slot() -> int:
    from distributed import get_worker

    from pingu_dask.nnunet.predictor import worker_slot

    try:
        return worker_slot(get_worker().name)
    except ValueError:
        return 0


def train_fold(job: FoldJob) -> FoldResult:
    """One fold's training in a child process of this worker (see the module docstring)."""
    worker = worker_name()
    try:
        return _train_fold(job, worker)
    except StageFailure:
        raise
    except Exception as error:
        raise StageFailure(
            f"fold {job.spec.fold}",
            worker,
            type(error).__name__,
            str(error),
            Verdict.TRANSIENT if isinstance(error, OSError | MemoryError) else Verdict.REPEATS,
        ) from error


def _train_fold(job: FoldJob, worker: str) -> FoldResult:
    threads = worker_threads()
    processes = job.augmentation_processes
    device, visible_gpu = child_device(job.device, _slot())
    spec = replace(
        job.spec,
        parent_pid=os.getpid(),
        device=device,
        visible_gpu=visible_gpu,
        threads=threads,
        augmentation_processes=max(1, threads - 1) if processes is None else processes,
    )
    fold = spec.fold
    base = {"token": job.token, "fold": fold, "attempt": job.attempt, "worker": worker}
    from_epoch = checkpoint_epoch(spec.fold_folder) or 0
    started = time.perf_counter()
    child = FoldProcess(spec, log_name=f"trainer_attempt{job.attempt}.log")
    child.start()

    def relay(line: dict) -> None:
        """The child's own lines: `started` once it holds the fold and has loaded its
        checkpoint (so from_epoch is what it really resumed from), then each epoch."""
        _emit({**base, **line})

    ended = child.watch(relay)
    if ended.ok:
        outcome = ended.outcome
        return FoldResult(
            fold=fold,
            attempt=job.attempt,
            worker=worker,
            from_epoch=int(outcome.get("resumed_from", from_epoch)),
            epochs=int(outcome.get("epochs") or spec.settings.epochs),
            seconds=time.perf_counter() - started,
            iterations_per_second=outcome.get("iterations_per_second"),
            data_wait_share=outcome.get("data_wait_share"),
            final_pseudo_dice=outcome.get("final_pseudo_dice"),
            final_ema_pseudo_dice=outcome.get("final_ema_pseudo_dice"),
        )
    error_type, message = ended.describe()
    transient = ended.stopped or error_type in ("OutOfMemoryError", "MemoryError", "OSError")
    tail = child.log_tail(8) if not ended.stopped else ""
    raise StageFailure(
        f"fold {fold}",
        worker,
        error_type,
        message + (f"\n{tail}" if tail else ""),
        Verdict.TRANSIENT if transient else Verdict.REPEATS,
    )


def stop_fold_children() -> int:
    """Run on every worker at Ctrl-C: ask each fold's child to checkpoint and exit."""
    return stop_all()


# --- the driver -------------------------------------------------------------------------


@dataclass
class _Session:
    """One attempt's life as the events show it."""

    attempt: int
    worker: str
    from_epoch: int
    started: datetime
    epochs: int  # the schedule's
    epoch: int = 0
    checkpoint_epoch: int | None = None
    figures: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class FoldLoop:
    """Run the folds on a client: submit, relay events, record, retry (module docstring)."""

    client: Client
    model_dir: Path  # where the ledger goes
    run_id: str
    retries: int
    capacity: Capacity | None = None  # batch jobs: asked for from the folds left
    feed: TrainFeed | None = None
    on_event: Callable[[dict], None] | None = None  # the terminal's view of each event
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # this training's events
    # What runs a fold on a worker: train_fold; tests of the loop itself pass a stand-in.
    task: Callable[[FoldJob], FoldResult] = train_fold

    def __post_init__(self) -> None:
        self.events: queue.Queue[dict] = queue.Queue()
        self.done: queue.Queue[Future] = queue.Queue()
        self.sessions: dict[int, _Session] = {}
        self.submitted: dict[object, tuple[FoldJob, Future]] = {}
        self.results: dict[int, FoldResult] = {}
        self.failures: dict[int, ErrorReport] = {}

    def run(self, jobs: Sequence[FoldJob]) -> dict[int, FoldResult]:
        """Train every fold; the finished ones' results (failures are in `failures`)."""
        self.client.subscribe_topic(TRAIN_TOPIC, self._received)
        try:
            for job in jobs:
                self._submit(replace(job, token=self.token))
            while self.submitted:
                self._scale()
                try:
                    future = self.done.get(timeout=TICK_SECONDS)
                except queue.Empty:
                    future = None
                self._drain_events()
                if future is not None and future.key in self.submitted:
                    self._settle(self.submitted.pop(future.key)[0], future)
            self._drain_events()
        except BaseException:  # Ctrl-C, SIGTERM (Stopped), a driver error
            self._stop()
            raise
        finally:
            self.client.unsubscribe_topic(TRAIN_TOPIC)
        return self.results

    # --- submitting -------------------------------------------------------------------

    def _submit(self, job: FoldJob) -> None:
        future = self.client.submit(
            self.task,
            job,
            key=(f"train-{self.token}", job.spec.fold, job.attempt),
            resources={INFERENCE_RESOURCE: 1},
            pure=False,
        )
        self.submitted[future.key] = (job, future)
        future.add_done_callback(self.done.put)

    def _scale(self) -> None:
        if self.capacity is not None:
            self.capacity.workers(len(self.submitted))

    # --- events -----------------------------------------------------------------------

    def _received(self, event: tuple) -> None:
        """subscribe_topic's handler (the client's thread): queue it for the loop."""
        message = event[1] if isinstance(event, tuple) else event
        if not isinstance(message, dict) or message.get("token") != self.token:
            return
        if message.get("event") not in ("fold-ended", "stage", "ended"):  # the driver's own
            self.events.put(message)

    def _drain_events(self) -> None:
        while True:
            try:
                message = self.events.get_nowait()
            except queue.Empty:
                return
            self._track(message)
            if self.on_event:
                self.on_event(message)

    def _track(self, message: dict) -> None:
        fold = int(message.get("fold", -1))
        kind = message.get("event")
        if kind == "started":
            earlier = self.sessions.get(fold)
            if earlier is not None and earlier.worker != message.get("worker"):
                # The same attempt started again elsewhere: Dask handed the task on.
                self._write(
                    fold,
                    earlier,
                    "lost",
                    ErrorReport(
                        error_type="WorkerLeft",
                        message=f"its worker {earlier.worker} left at epoch {earlier.epoch} "
                        "(lifetime, walltime or shutdown); Dask handed the fold to another worker",
                        verdict=Verdict.TRANSIENT,
                    ),
                )
            self.sessions[fold] = _Session(
                attempt=int(message.get("attempt", 1)),
                worker=str(message.get("worker")),
                from_epoch=int(message.get("from_epoch") or 0),
                started=now(),
                epochs=int(message.get("epochs") or 0),
                epoch=int(message.get("from_epoch") or 0),
            )
        elif kind == "epoch" and fold in self.sessions:
            session = self.sessions[fold]
            session.epoch = int(message.get("epoch") or session.epoch)
            if message.get("checkpoint_epoch") is not None:
                session.checkpoint_epoch = int(message["checkpoint_epoch"])
            session.figures = message

    # --- settling ---------------------------------------------------------------------

    def _settle(self, job: FoldJob, future: Future, retry: bool = True) -> None:
        """Record a finished attempt; a transient failure is submitted again (`retry`)."""
        fold = job.spec.fold
        try:
            result: FoldResult = future.result()
        except Exception as error:
            report = describe(error)
            retry = retry and report.retryable and job.attempt <= self.retries
            status = "retried" if retry else "failed"
            session = self._session(job, report.worker)
            self._write(fold, session, status, report)
            self._tell(fold, job.attempt, "retry" if retry else "failed", report.message)
            if retry:
                self._submit(replace(job, attempt=job.attempt + 1))
            else:
                self.failures[fold] = report
        else:
            session = self._session(job, result.worker)
            session.epoch = session.checkpoint_epoch = result.epochs
            session.from_epoch = result.from_epoch
            session.figures = {
                "iterations_per_second": result.iterations_per_second,
                "data_wait_share": result.data_wait_share,
            }
            self._write(fold, session, "ok", None)
            self._tell(fold, job.attempt, "ok", None)
            self.results[fold] = result
        future.release()
        self.sessions.pop(fold, None)

    def _session(self, job: FoldJob, worker: str | None) -> _Session:
        """The attempt's session from its events, or one made up from the job (a task
        that failed before its first event)."""
        session = self.sessions.get(job.spec.fold)
        if session is None or session.attempt != job.attempt:
            epoch = checkpoint_epoch(job.spec.fold_folder) or 0
            epochs = job.spec.settings.epochs
            session = _Session(
                job.attempt, worker or "?", epoch, now(), epochs, epoch, epoch or None
            )
        return session

    def _write(self, fold: int, session: _Session, status: str, report: ErrorReport | None) -> None:
        figures = session.figures or {}
        row = {
            "run_id": self.run_id,
            "fold": fold,
            "attempt": session.attempt,
            "status": status,
            "from_epoch": session.from_epoch,
            "epochs_reached": session.epoch,
            "checkpoint_epoch": session.checkpoint_epoch,
            "epochs": session.epochs,
            "worker": session.worker,
            "error_type": report.error_type if report else None,
            "message": report.message if report else None,
            "iterations_per_second": figures.get("iterations_per_second"),
            "data_wait_share": figures.get("data_wait_share"),
            "started": session.started,
            "finished": now(),
        }
        write_ledger_rows(self.model_dir, [row])

    def _tell(self, fold: int, attempt: int, status: str, message: str | None) -> None:
        event = {
            "event": "fold-ended",
            "fold": fold,
            "attempt": attempt,
            "status": status,
            "message": message,
        }
        if self.feed is not None:
            self.feed.send(**event)
        if self.on_event:  # directly: its echo on the topic may come after the last fold
            self.on_event({"token": self.token, **event})

    # --- stopping ---------------------------------------------------------------------

    def _stop(self) -> None:
        """Ask every fold's child to checkpoint and exit, wait for them a while, then
        record and cancel what is left."""
        if not self.submitted:
            return
        jobs = [job for job, _ in self.submitted.values()]
        futures = [future for _, future in self.submitted.values()]
        try:
            self.client.run(stop_fold_children)
        except Exception as error:  # workers gone: their children stop themselves
            logger.warning("could not ask the folds to stop: %s", error)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        pending = [f for f in futures if not f.done()]
        while pending and time.monotonic() < deadline:
            time.sleep(0.5)
            pending = [f for f in pending if not f.done()]
        with contextlib.suppress(Exception):  # the terminal may be gone: record regardless
            self._drain_events()
        for job, future in zip(jobs, futures, strict=True):
            if future.status == "finished":  # done before it could be stopped: it is ok
                self._settle(job, future, retry=False)
                continue
            session = self._session(job, None)
            session.checkpoint_epoch = checkpoint_epoch(job.spec.fold_folder)
            report = ErrorReport(
                error_type="Interrupted",
                message="the training was stopped (Ctrl-C or a signal); its checkpoint is kept",
                verdict=Verdict.TRANSIENT,
            )
            self._write(job.spec.fold, session, "interrupted", report)
        self.client.cancel(futures)
        self.submitted.clear()
