"""Feed a cohort's scans through the three stages on a Dask client, dependably.

- A bounded window of scans is in flight at once (a few per worker the run plans for,
  see capacity.py), never the whole manifest as one graph: the scheduler stays
  small at 100,000 scans, and tasks that ask for a resource (predict) bypass the
  scheduler's own queuing, so the client throttles. With batch jobs the window follows
  the workers asked for, not those present, so that a job that starts finds work.
  Task keys are tuples (stage-token, index, attempt): a bare scan id as a key could
  collide with a string argument and be substituted by Dask.
- Every attempt becomes a ledger row. Transient errors (a lost worker, out of memory,
  I/O, the per-scan time limit) are retried up to `retries` times; errors that would
  repeat (bad input, a model that cannot load, a programming error) fail at once
  (errors.py). One scan's failure never stops the others, but when the first attempts
  of many scans in a row fail the same way (CircuitBreaker), the run stops submitting,
  lets what is in flight finish, and raises RunStopped: the cause is not in the scans.
- A full disk or quota (errors.is_out_of_space), on a worker writing a mask or here
  writing tables, is no scan's fault either: no retry, no ledger row for the scan, the
  run stops submitting the same way and raises OutOfSpace; the next run does the rest.
- An attempt that runs longer than `scan_timeout` seconds (counted from when a worker
  first holds one of its tasks) is cancelled, recorded as a transient TimeoutError and
  retried; the worker it hung on is restarted, because a stuck thread cannot be
  stopped and would hold the worker's inference slot forever.
- Table rows and ledger rows are written by the driver in flushes (tables.py), also
  while it waits, so a crash loses at most the unflushed tail, which a rerun redoes.
- Ctrl-C (or SIGTERM/SIGHUP, turned into KeyboardInterrupt by the CLI) cancels what is
  in flight, flushes what finished, and re-raises.
- A scheduler plugin (monitor/plugin.py) watches the run's task keys; the driver only tells
  it the verdicts (failed for good, or retried), which it alone decides.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from distributed import Client, Future

from pingu_dask.config import INFERENCE_RESOURCE
from pingu_dask.errors import (
    ErrorReport,
    OutOfSpace,
    RunError,
    Verdict,
    describe,
    is_out_of_space,
)
from pingu_dask.inputs.manifest import Scan
from pingu_dask.monitor.feed import RunFeed
from pingu_dask.monitor.plugin import RunMonitor
from pingu_dask.output import layout, ledger, tables
from pingu_dask.records import ScanResult, Status
from pingu_dask.run import stages
from pingu_dask.run.capacity import Capacity, PresentWorkers
from pingu_dask.run.policies import CircuitBreaker, FeedWindow
from pingu_dask.run.settings import RunSettings

TICK_SECONDS = 1.0  #: the longest the loop waits without flushing or checking time limits

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Running counts, handed to the `on_progress` callback after every attempt."""

    total: int
    done: int = 0
    failed: int = 0
    retried: int = 0
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    last: ScanResult | None = None  # the latest settled attempt's result
    stopping: str | None = None  # why the run stopped submitting (circuit breaker)


class RunStopped(RunError):
    """The circuit breaker stopped the run; `results` are the scans that were settled.

    Everything written stays valid: scans not started have no ledger row and are done
    by the next run, like those whose last attempt failed.
    """

    def __init__(self, message: str, results: list[ScanResult]) -> None:
        super().__init__(message)
        self.results = results


@dataclass(kw_only=True)
class Attempt:
    """One attempt at one scan, while it is in flight."""

    index: int
    scan: Scan
    attempt: int
    started: datetime
    futures: list[Future]
    running_since: float | None = None  # when a worker was first seen holding a task


def _stage_of(key: object) -> str:
    """The stage a task key (f"{stage}-{token}", index, attempt) belongs to."""
    assert isinstance(key, tuple) and isinstance(key[0], str)
    return key[0].split("-")[0]


@dataclass(kw_only=True)
class Segmentation:
    """What the driver's loop is asked to do: one pass over `scans` (run_cohort makes
    one per run; tests and benchmarks make their own).

    `settings` (retries, time limit, circuit breaker, window bound, flushes, the run
    page's window) are resolved before the loop starts (RunSettings.from_config).
    `extra_ledger_rows` (e.g. invalid manifest rows) are written with the first flush.
    With `keep_details` False, a successful scan's result shrinks to its id and status
    (large cohorts: the driver's memory stays flat; everything else is in the tables).
    With `watch`, the run's page (/pingu) and pingu_* metrics appear on the scheduler's
    web server; `done_before` (scans done in earlier runs) is shown there. `capacity`
    says how many workers to plan the window for (default: those present); `window`
    fixes it. The model is the pipeline's (the seam: nnU-Net, or the stand-in model of
    the runner's own tests and benchmarks).
    """

    scans: Sequence[Scan]
    pipeline: stages.Pipeline
    settings: RunSettings = field(default_factory=RunSettings.from_config)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    on_progress: Callable[[Progress], None] | None = None
    extra_ledger_rows: Sequence[dict] = ()
    keep_details: bool = True
    done_before: int = 0
    watch: bool = True
    capacity: Capacity | None = None
    window: int | None = None


def segment_scans(client: Client, job: Segmentation) -> list[ScanResult]:
    """Segment every scan of `job` and write its outputs; one ScanResult per scan.

    Masks are written by the workers; the scans' table rows come back in the results
    and are written here with the ledger rows. Raises RunStopped when the circuit
    breaker trips, OutOfSpace when OUT's file system is full.
    """
    pipeline, settings = job.pipeline, job.settings
    layout.prepare_output(pipeline.out)
    names = layout.nifti_names(job.scans) if pipeline.write_nifti else {}
    if pipeline.write_nifti:
        layout.describe_nifti_dataset(pipeline.out, pipeline.model.facts())
    token = uuid.uuid4().hex[:8]  # this run's task keys: (f"{stage}-{token}", index, attempt)
    feed = None
    if job.watch:
        monitor = RunMonitor(
            token,
            job.run_id,
            len(job.scans),
            done_before=job.done_before,
            out=str(pipeline.out),
            model=pipeline.model.name,
            window_seconds=settings.throughput_window_seconds,
        )
        feed = RunFeed(client, monitor)
    try:
        with tables.TableWriter(pipeline.out, settings.flush) as writer:
            if job.extra_ledger_rows:
                writer.add({}, ledger_rows=job.extra_ledger_rows)
            loop = _Loop(client=client, job=job, names=names, writer=writer, token=token,
                         feed=feed)  # fmt: skip
            return loop.run(job.scans)
    except OSError as error:  # a table flush, in the loop or as the writer closes
        if is_out_of_space(error):
            raise OutOfSpace(f"the driver's table write: {error}") from error
        raise


@dataclass(kw_only=True)
class _Loop:
    """The driver's loop: submit, collect, record, retry, time out; one per run."""

    client: Client
    job: Segmentation
    names: dict[str, str]  # scan id -> NIfTI file name
    writer: tables.TableWriter
    token: str
    feed: RunFeed | None  # the run's dashboard, if watched

    def __post_init__(self) -> None:
        self.pipeline = self.job.pipeline
        self.settings = self.job.settings
        self.capacity: Capacity = self.job.capacity or PresentWorkers(self.client)
        self.breaker = CircuitBreaker(self.settings.breaker_scans)
        self.fingerprint = self.pipeline.fingerprint()
        self.queue: deque[tuple[int, Scan, int]] = deque()
        self.submitted: dict = {}  # finish key -> Attempt
        self.ready: queue.Queue[Future] = queue.Queue()  # finished futures, from callbacks
        self.results: list[ScanResult] = []
        self.feed_window = FeedWindow(self.settings.max_scans_per_slot)
        self.stopping: str | None = None
        self.out_of_space: str | None = None  # the first write that found no space left
        self._last_time_check = time.monotonic()

    def run(self, scans: Sequence[Scan]) -> list[ScanResult]:
        progress = Progress(total=len(scans))
        self.queue.extend((i, s, 1) for i, s in enumerate(scans))
        self._submit_next()
        progress.in_flight = len(self.submitted)
        try:
            while self.submitted:
                try:
                    future = self.ready.get(timeout=TICK_SECONDS)
                except queue.Empty:
                    future = None
                settled = 0
                if future is not None and future.key in self.submitted:
                    self._settle(self.submitted.pop(future.key), future, progress)
                    settled += 1
                settled += self._time_out_hung_attempts(progress)
                self.writer.flush_if_due()  # also while nothing finishes
                self._submit_next()
                progress.in_flight = len(self.submitted)
                progress.stopping = self.stopping
                if settled and self.job.on_progress:
                    self.job.on_progress(progress)
        except BaseException:  # Ctrl-C (KeyboardInterrupt) or a driver error
            self._cancel(list(self.submitted.values()))
            if self.feed:
                self.feed.ended("interrupted")
            raise  # a table flush on a full disk: segment_scans names it OutOfSpace
        if self.feed:
            self.feed.ended("stopped" if self.stopping else "finished")
        if self.out_of_space:
            raise OutOfSpace(self.out_of_space)
        if self.stopping:
            raise RunStopped(self.stopping, self.results)
        return self.results

    # --- submitting ---------------------------------------------------------------

    def _window_size(self) -> int:
        if self.job.window:
            return self.job.window
        scans_left = len(self.queue) + len(self.submitted)
        slots = self.capacity.workers(scans_left)
        return self.feed_window.per_slot(self.capacity.threads_per_slot) * slots

    def _submit_next(self) -> None:
        if self.stopping:
            self.capacity.workers(len(self.submitted))  # release jobs no longer needed
            return
        limit = self._window_size()
        while self.queue and len(self.submitted) < limit:
            index, scan, attempt = self.queue.popleft()
            futures = self._submit(index, scan, attempt)
            self.submitted[futures[-1].key] = Attempt(
                index=index, scan=scan, attempt=attempt, started=ledger.now(), futures=futures
            )
            futures[-1].add_done_callback(self.ready.put)

    def _submit(self, index: int, scan: Scan, attempt: int) -> list[Future]:
        client, pipeline, token = self.client, self.pipeline, self.token
        prepared = client.submit(
            stages.preprocess, scan, pipeline, key=(f"preprocess-{token}", index, attempt)
        )
        predicted = client.submit(
            stages.predict,
            prepared,
            pipeline,
            key=(f"predict-{token}", index, attempt),
            resources={INFERENCE_RESOURCE: 1},
        )
        finished = client.submit(
            stages.finish,
            predicted,
            scan,
            pipeline,
            self.names.get(scan.scan_id),
            key=(f"finish-{token}", index, attempt),
        )
        return [prepared, predicted, finished]

    def _cancel(self, attempts: Sequence[Attempt]) -> None:
        futures = [f for attempt in attempts for f in attempt.futures]
        if futures:
            self.client.cancel(futures)

    # --- settling -----------------------------------------------------------------

    def _settle(self, attempt: Attempt, future: Future, progress: Progress) -> None:
        """Record a finished attempt (ok, failed, or to be retried) and release it."""
        try:
            result = future.result()
        except Exception as error:
            report = describe(error)
            if is_out_of_space(report):
                self._stop_for_space(attempt, report)
                progress.last = None  # not a settled scan: nothing to show for it
                for each in attempt.futures:
                    each.release()
                return
            settled = self._failed(attempt, report)
        else:
            settled = self._succeeded(attempt, result)
        for each in attempt.futures:
            each.release()
        self._count(attempt, settled, progress)

    def _count(self, attempt: Attempt, result: ScanResult, progress: Progress) -> None:
        progress.last = result
        if self.feed and not result.ok:
            final = result.status is not Status.RETRY
            self.feed.failed(attempt.index, result, attempt.scan.site, final=final)
        if result.status is Status.RETRY:
            self.queue.appendleft((attempt.index, attempt.scan, attempt.attempt + 1))
            progress.retried += 1
            return
        self.results.append(result if self.job.keep_details or not result.ok else result.brief())
        progress.done += result.ok
        progress.failed += not result.ok

    def _ledger_row(
        self,
        attempt: Attempt,
        status: Status,
        *,
        result: ScanResult | None = None,
        error: ErrorReport | None = None,
    ) -> dict:
        """The attempt's ledger row, with this run's id and pipeline fingerprint."""
        scan = attempt.scan
        return ledger.attempt_row(
            scan.scan_id,
            scan.site,
            status,
            attempt.attempt,
            self.job.run_id,
            attempt.started,
            result=result,
            error=error,
            pipeline_fingerprint=self.fingerprint,
            model_fingerprint=self.pipeline.model.fingerprint,
        )

    def _failed(self, attempt: Attempt, report: ErrorReport) -> ScanResult:
        """The failed attempt's ledger row and record (status failed, or retry)."""
        scan = attempt.scan
        retries = self.settings.retries
        final = not report.retryable or attempt.attempt > retries or bool(self.stopping)
        self.writer.add({}, ledger_rows=[self._ledger_row(attempt, Status.FAILED, error=report)])
        reason = self.breaker.failed(attempt.attempt, report)
        if reason and not self.stopping:
            self.stopping = reason
            self.queue.clear()  # not started: no ledger row, done by the next run
        return ScanResult(
            scan_id=scan.scan_id,
            status=Status.FAILED if final else Status.RETRY,
            attempt=attempt.attempt,
            error_type=report.error_type,
            message=report.message,
            worker=report.worker,
        )

    def _stop_for_space(self, attempt: Attempt, report: ErrorReport) -> None:
        """A worker found the output's file system full (or over quota). That is not the
        scan's fault and would fail every scan after it, so: no ledger row (the scan is
        simply not done, and the next run does it), no retry, nothing for the circuit
        breaker; stop submitting and let what is in flight end, as the breaker does."""
        if self.out_of_space is None:
            self.out_of_space = f"{attempt.scan.scan_id}, {report.message}"
            self.stopping = self.stopping or f"out of space: {report.message}"
            self.queue.clear()  # not started: no ledger row, done by the next run

    def _succeeded(self, attempt: Attempt, result: ScanResult) -> ScanResult:
        """The ok attempt's ledger row and tables (the input fingerprint comes from the
        worker that read the files: no file system calls here, once per scan)."""
        row = self._ledger_row(attempt, Status.OK, result=result)
        self.writer.add(result.tables, ledger_rows=[row])
        result.tables = {}
        self.breaker.succeeded(result.workers.get("predict"))
        self.feed_window.observe(result.seconds)
        result.attempt = attempt.attempt
        return result

    # --- time limits --------------------------------------------------------------

    def _time_out_hung_attempts(self, progress: Progress) -> int:
        """Cancel, record and retry attempts past the per-scan time limit.

        Where each attempt's tasks are is asked of the scheduler (one call for the
        whole window), at most every few seconds: the clock of an attempt starts when
        a worker is first seen holding one of its tasks, so scans waiting for batch
        jobs to start are not timed out.
        """
        limit = self.settings.scan_timeout
        if not limit or not self.submitted:
            return 0
        now = time.monotonic()
        if now - self._last_time_check < min(5.0, limit / 4):
            return 0
        self._last_time_check = now
        where = {key: worker for worker, keys in self.client.processing().items() for key in keys}
        expired: list[tuple[Attempt, str | None]] = []
        for attempt in self.submitted.values():
            holder = next((where[f.key] for f in attempt.futures if f.key in where), None)
            if attempt.running_since is None:
                if holder is not None:
                    attempt.running_since = now
                continue
            if now - attempt.running_since > limit:
                expired.append((attempt, holder))
        for attempt, holder in expired:
            self.submitted.pop(attempt.futures[-1].key, None)
            self._cancel([attempt])
            stage = next((_stage_of(f.key) for f in attempt.futures if where.get(f.key)), "a stage")
            report = ErrorReport(
                error_type="TimeoutError",
                message=f"{stage}: no result after {limit:.0f} s (--scan-timeout) "
                f"on {holder or 'a worker'}; cancelled, and the worker restarted",
                worker=holder,
                verdict=Verdict.TRANSIENT,
            )
            failed = self._failed(attempt, report)
            for each in attempt.futures:
                each.release()
            self._count(attempt, failed, progress)
        self._restart({holder for _, holder in expired if holder})
        return len(expired)

    def _restart(self, workers: set[str]) -> None:
        """Restart workers whose task hung: a Python thread cannot be stopped, and a
        stuck one keeps its worker's inference slot. Other scans in flight there are
        handed back by the scheduler and run again."""
        if not workers:
            return
        try:
            self.client.restart_workers(sorted(workers), raise_for_error=False)
        except Exception as error:  # e.g. workers without a nanny (tcp:// clusters)
            logger.warning("could not restart hung worker(s) %s: %s", sorted(workers), error)
