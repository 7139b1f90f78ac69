"""Feed a cohort's scans through the three stages on a Dask client, dependably.

- A bounded window of scans is in flight at once (a few per worker), never the whole
  manifest as one graph: the scheduler stays small at 100,000 scans, and tasks that
  ask for a resource (predict) bypass the scheduler's own queuing, so the client
  throttles. Task keys are tuples (stage-token, index, attempt): a bare scan id as a
  key could collide with a string argument and be substituted by Dask.
- Every attempt becomes a ledger row. Errors that a retry can help with (a worker
  that died, out of memory, I/O) are retried up to `retries` times; input errors
  fail at once (errors.py). One scan's failure never stops the others.
- Table rows and ledger rows are written by the driver in flushes (tables.py), so a
  crash loses at most the unflushed tail, which a rerun simply redoes.
- Ctrl-C cancels what is in flight, flushes what finished, and re-raises.
- A scheduler plugin (dashboard.py) watches the run's task keys; the driver only tells
  it the verdicts (failed for good, or retried), which it alone decides.
"""

from __future__ import annotations

import hashlib
import platform
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from distributed import Client, as_completed

from pingu_dask import __version__, dashboard, ledger, stages, store, tables
from pingu_dask.cluster import INFERENCE_RESOURCE
from pingu_dask.config import setting
from pingu_dask.errors import describe
from pingu_dask.manifest import Scan

SCANS_IN_FLIGHT_PER_WORKER = 3  #: one preprocessing, one predicting, one finishing


class StageFunctions(NamedTuple):
    """The three per-scan task functions. The real ones run nnU-Net; benchmarks of the
    runner itself (scripts/bench_scale.py) pass a no-op stand-in, named as such."""

    preprocess: Callable
    predict: Callable
    finish: Callable


NNUNET_STAGES = StageFunctions(stages.preprocess, stages.predict, stages.finish)


@dataclass
class Progress:
    """Running counts, handed to the `on_progress` callback after every attempt."""

    total: int
    done: int = 0
    failed: int = 0
    retried: int = 0
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    last: dict | None = None  # the latest finished scan's record, or failed ledger row


def segment_cohort(
    client: Client,
    scans: Sequence[Scan],
    pipeline: stages.Pipeline,
    window: int | None = None,
    retries: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    run_id: str | None = None,
    extra_ledger_rows: Sequence[dict] = (),
    keep_details: bool = True,
    stage_functions: StageFunctions = NNUNET_STAGES,
    done_before: int = 0,
    watch: bool = True,
) -> list[dict]:
    """Segment every scan and write its outputs; return one small record per scan.

    Masks are written by the workers; the scans' table rows come back in the records
    and are written here with the ledger rows. `extra_ledger_rows` (e.g. invalid
    manifest rows) are written with the first flush. With `keep_details` False, a
    successful scan's record shrinks to its id and status (large cohorts: the driver's
    memory stays flat; everything else is in the tables). With `watch`, the run's
    page (/pingu) and pingu_* metrics appear on the scheduler's web server;
    `done_before` (scans done in earlier runs) is shown there.
    """
    store.prepare_output(pipeline.out)
    names = store.nifti_names(scans) if pipeline.write_nifti else {}
    if pipeline.write_nifti:
        store.describe_nifti_dataset(pipeline.out)
    retries = int(setting("retries")) if retries is None else retries
    run_id = run_id or uuid.uuid4().hex[:12]
    token = uuid.uuid4().hex[:8]  # this run's task keys: (f"{stage}-{token}", index, attempt)
    feed = None
    if watch:
        monitor = dashboard.RunMonitor(
            token,
            run_id,
            len(scans),
            done_before=done_before,
            out=str(pipeline.out),
            model=pipeline.model.name,
        )
        feed = dashboard.RunFeed(client, monitor)
    with tables.TableWriter(pipeline.out) as writer:
        if extra_ledger_rows:
            writer.add({}, ledger_rows=extra_ledger_rows)
        loop = _Loop(
            client,
            pipeline,
            names,
            writer,
            retries,
            run_id,
            on_progress,
            keep_details,
            stage_functions,
            token,
            feed,
        )
        return loop.run(scans, window)


@dataclass
class _Loop:
    """The driver's loop: submit, collect, record, retry; one instance per run."""

    client: Client
    pipeline: stages.Pipeline
    names: dict[str, str]  # scan id -> NIfTI file name
    writer: tables.TableWriter
    retries: int
    run_id: str
    on_progress: Callable[[Progress], None] | None
    keep_details: bool
    functions: StageFunctions
    token: str
    feed: dashboard.RunFeed | None  # the run's dashboard, if watched

    def __post_init__(self) -> None:
        self.fingerprint = self.pipeline.fingerprint()

    def run(self, scans: Sequence[Scan], window: int | None) -> list[dict]:
        fixed_window = window
        progress = Progress(total=len(scans))
        queue: deque[tuple[int, Scan, int]] = deque((i, s, 1) for i, s in enumerate(scans))
        in_flight = as_completed()
        submitted: dict = {}  # finish key -> (index, scan, attempt, started, all futures)
        records: list[dict] = []

        def window_size() -> int:
            # Workers may come and go (batch jobs start, reach their lifetime): the
            # window follows the workers present, at least one worker's worth.
            if fixed_window:
                return fixed_window
            workers = len(self.client.scheduler_info()["workers"])
            return SCANS_IN_FLIGHT_PER_WORKER * max(1, workers)

        def submit_next() -> None:
            while queue and len(submitted) < window_size():
                index, scan, attempt = queue.popleft()
                futures = self._submit(index, scan, attempt)
                submitted[futures[-1].key] = (index, scan, attempt, ledger.now(), futures)
                in_flight.add(futures[-1])

        submit_next()
        progress.in_flight = len(submitted)
        try:
            for future in in_flight:
                index, scan, attempt, started, futures = submitted.pop(future.key)
                record = self._collect(future, scan, attempt, started)
                for each in futures:
                    each.release()
                progress.last = record
                if self.feed and record["status"] != ledger.OK:
                    self.feed.failed(index, record, scan.site, final=record["status"] != "retry")
                if record["status"] == "retry":
                    queue.appendleft((index, scan, attempt + 1))
                    progress.retried += 1
                else:
                    if record["status"] == ledger.OK and not self.keep_details:
                        record = {"scan_id": record["scan_id"], "status": record["status"]}
                    records.append(record)
                    progress.done += record["status"] == ledger.OK
                    progress.failed += record["status"] != ledger.OK
                submit_next()
                progress.in_flight = len(submitted)
                if self.on_progress:
                    self.on_progress(progress)
        except BaseException:  # Ctrl-C (KeyboardInterrupt) or a driver error
            self.client.cancel([f for *_, futures in submitted.values() for f in futures])
            if self.feed:
                self.feed.ended("interrupted")
            raise
        if self.feed:
            self.feed.ended("finished")
        return records

    def _submit(self, index: int, scan: Scan, attempt: int) -> list:
        client, pipeline, token, functions = self.client, self.pipeline, self.token, self.functions
        prepared = client.submit(
            functions.preprocess, scan, pipeline, key=(f"preprocess-{token}", index, attempt)
        )
        predicted = client.submit(
            functions.predict,
            prepared,
            pipeline,
            key=(f"predict-{token}", index, attempt),
            resources={INFERENCE_RESOURCE: 1},
        )
        finished = client.submit(
            functions.finish,
            predicted,
            scan,
            pipeline,
            self.names.get(scan.scan_id),
            key=(f"finish-{token}", index, attempt),
        )
        return [prepared, predicted, finished]

    def _collect(self, future, scan: Scan, attempt: int, started) -> dict:
        """The attempt's record (status ok, failed, or retry) and its ledger row.

        The input fingerprint comes from the worker that read the files (no file
        system calls here: this runs once per scan on the driver).
        """
        common = dict(pipeline_fingerprint=self.fingerprint)
        try:
            record = future.result()
        except Exception as error:
            described = describe(error)
            error_type, message, retryable, worker = described
            final = not retryable or attempt > self.retries
            row = ledger.attempt_row(
                scan.scan_id,
                scan.site,
                ledger.FAILED,
                attempt,
                self.run_id,
                started,
                error=described,
                **common,
            )
            self.writer.add({}, ledger_rows=[row])
            status = ledger.FAILED if final else "retry"
            return {
                "scan_id": scan.scan_id,
                "status": status,
                "error_type": error_type,
                "message": message,
                "attempt": attempt,
                "worker": worker,
            }
        row = ledger.attempt_row(
            scan.scan_id,
            scan.site,
            ledger.OK,
            attempt,
            self.run_id,
            started,
            record=record,
            input_fingerprint=record.get("input_fingerprint"),
            **common,
        )
        scan_tables = record.pop("tables", {})
        self.writer.add(scan_tables, ledger_rows=[row])
        record["attempt"] = attempt
        return record


def manifest_info(manifest: Path | None) -> dict | None:
    """Where the manifest is and its SHA-256 (run.json: which cohort this was)."""
    if manifest is None:
        return None
    return {
        "path": str(Path(manifest).resolve()),
        "sha256": hashlib.sha256(Path(manifest).read_bytes()).hexdigest(),
    }


def provenance(pipeline: stages.Pipeline, manifest: Path | None, n_scans: int) -> dict:
    """What run.json records: tool and library versions, model, settings, manifest."""
    versions = {}
    for package in ("nnunetv2", "torch", "dask", "distributed", "zarr", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "tool": "pingu-dask",
        "version": __version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "libraries": versions,
        "model": {
            "folder": str(pipeline.model.folder),
            "name": pipeline.model.name,
            "folds": list(pipeline.model.folds),
            "checkpoint": pipeline.model.checkpoint,
            "fingerprint": pipeline.model.fingerprint,
        },
        "inference": asdict(pipeline.inference),
        "clusters": asdict(pipeline.clusters),
        "regions": {"table": pipeline.regions.name, "regions": dict(pipeline.regions.regions)},
        "pipeline_fingerprint": pipeline.fingerprint(),
        "manifest": manifest_info(manifest),
        "n_scans": n_scans,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished": None,
    }
