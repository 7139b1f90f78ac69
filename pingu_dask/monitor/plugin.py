"""Watching a run: a page at /pingu, its data at /pingu/status.json, and Prometheus
metrics named pingu_* on the scheduler's /metrics.

`RunMonitor` is a scheduler plugin that the runner registers at the start of a run.
It counts from two sources, both cheap:

- the scheduler's task transitions of this run's keys, (stage-token, index, attempt):
  a stage that starts or ends sets its scan's state in a one-byte-per-scan array (the
  counts by state are taken from it when read: bytearray.count, ~0.1 ms at 100,000
  scans), and an ended stage adds its compute time (reported by the worker) to that
  stage's histogram and to its worker's figures. Nothing else is done per transition,
  so the scheduler does not slow down (see docs/benchmarks.md).
  "waiting" means preprocessed but not predicting yet: either not handed to a worker,
  or handed to one whose inference slot is busy (the scheduler gives resource-bound
  tasks to a worker at once and the worker holds them; we count per worker);
- events the driver sends when a scan fails for good or is retried (the driver is the
  one that decides which, from the error; see run/loop.py). These are rare.

The page and the JSON are served by the scheduler's own web server (the one that
serves the Dask dashboard), which binds to localhost unless told otherwise
(config `pingu.dashboard-address`, `run --dashboard-address`); from a laptop, reach it
through an SSH tunnel (docs/hpc.md).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from pingu_dask.config import DEFAULTS, INFERENCE_RESOURCE

logger = logging.getLogger(__name__)

PLUGIN_NAME = "pingu"
TOPIC = "pingu"  # the driver's events
PAGE_PATH = "/pingu"
STAGES = ("preprocess", "predict", "finish")
PREPROCESS, PREDICT, FINISH = range(len(STAGES))
STATES = ("queued", "preprocessing", "waiting", "predicting", "finishing", "done", "failed")
QUEUED, PREPROCESSING, WAITING, PREDICTING, FINISHING, DONE, FAILED = range(len(STATES))
RUNNING = (PREPROCESSING, PREDICTING, FINISHING)  # a stage is running, by stage
AFTER = (WAITING, FINISHING, DONE)  # a stage has ended, by stage
IN_FLIGHT = (PREPROCESSING, WAITING, PREDICTING, FINISHING)
#: Histogram bucket bounds for stage durations, seconds (Prometheus `le`).
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FAILURES_KEPT = 50
FAILURE_FIELDS = ("scan_id", "site", "error_type", "message", "attempt", "worker")
HISTORY_POINTS = 720  # throughput-over-time samples kept; older ones are thinned
HISTORY_FIRST_INTERVAL = 5.0  # seconds between samples, doubled when thinned


@dataclass
class StageTimes:
    """Compute seconds of one stage's finished tasks: a Prometheus-style histogram."""

    count: int = 0
    total: float = 0.0
    maximum: float = 0.0
    per_bucket: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.maximum = max(self.maximum, seconds)
        self.per_bucket[bisect.bisect_left(BUCKETS, seconds)] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of durations <= le) pairs, ending with +Inf."""
        pairs, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.per_bucket, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs

    def summary(self) -> dict:
        mean = self.total / self.count if self.count else None
        return {"count": self.count, "mean_s": mean, "max_s": self.maximum or None}


@dataclass
class WorkerFigures:
    """What one worker did: scans through predict (the GPU stage) and finish."""

    predicted: int = 0
    finished: int = 0
    predict_seconds: float = 0.0
    recent_predicts: deque = field(default_factory=deque)  # (stop time, seconds)
    recent_seconds: float = 0.0  # the sum of recent_predicts' seconds

    def add_predict(self, stop: float, seconds: float) -> None:
        self.predicted += 1
        self.predict_seconds += seconds
        self.recent_predicts.append((stop, seconds))
        self.recent_seconds += seconds

    def forget_before(self, cutoff: float) -> None:
        while self.recent_predicts and self.recent_predicts[0][0] < cutoff:
            self.recent_seconds -= self.recent_predicts.popleft()[1]


class ServedMonitor(SchedulerPlugin):
    """A monitor the scheduler's web server shows (pages.Pages serves it: /pingu and
    /metrics find it among the scheduler's plugins). The scheduler's clock, which the
    transitions and events use, starts the monitor's `started`."""

    started: float
    clock: Callable[[], float]
    scheduler: Any

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self.started = self.clock()


class RunMonitor(ServedMonitor):
    """Live counts of one run, on the scheduler. See the module docstring."""

    name = PLUGIN_NAME

    def __init__(
        self,
        token: str,
        run_id: str,
        total: int,
        done_before: int = 0,
        out: str = "",
        model: str = "",
        window_seconds: float = DEFAULTS["pingu"]["throughput-window-seconds"],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self.run_id = run_id
        self.total = total
        self.done_before = done_before
        self.out = out
        self.model = model
        self.window = float(window_seconds)
        self.clock = clock
        self.stage_of = {f"{stage}-{token}": i for i, stage in enumerate(STAGES)}
        self.states = bytearray(total)  # QUEUED == 0
        self.retried = 0
        self.stage_times = [StageTimes() for _ in STAGES]
        self.workers: dict[str, WorkerFigures] = {}
        self.predict_on: dict[int, str] = {}  # scan index -> worker its predict went to
        self.failures: deque[dict] = deque(maxlen=FAILURES_KEPT)
        self.recent: deque[float] = deque()  # times scans ended (done or failed)
        self.history: list[tuple[float, int, int]] = []  # (seconds since start, done, failed)
        self.history_interval = HISTORY_FIRST_INTERVAL
        self.started = clock()
        self.ended: float | None = None
        self.end_status: str | None = None
        self.scheduler = None

    # -- scheduler hooks: start and close are ServedMonitor's -------------------------------

    def transition(self, key, start, finish, *args, stimulus_id=None, **kwargs) -> None:
        if type(key) is not tuple:
            return
        stage = self.stage_of.get(key[0])
        if stage is None:
            return
        index = key[1]
        if self.states[index] >= DONE:
            return
        if finish == "processing":
            self.states[index] = RUNNING[stage]
            if stage == PREDICT:
                self._predict_assigned(key, index)
        elif start == "processing":
            self.predict_on.pop(index, None)
            if finish == "memory":
                self._stage_ended(index, stage, kwargs.get("worker"), kwargs.get("startstops"))
            else:  # erred, or its worker left: it waits for a retry or a verdict
                self.states[index] = QUEUED

    def log_event(self, topic, msg) -> None:
        if topic != TOPIC or not isinstance(msg, dict) or msg.get("token") != self.token:
            return
        event = msg.get("event")
        if event == "ended":
            self.ended, self.end_status = self.clock(), msg.get("status")
            return
        index = msg["index"]
        if self.states[index] >= DONE:
            return
        failure = {key: msg.get(key) for key in FAILURE_FIELDS}
        failure["time"] = self.clock()
        failure["final"] = event == "failed"
        self.failures.appendleft(failure)
        if event == "failed":
            self.states[index] = FAILED
            self._scan_ended()
        elif event == "retry":
            self.retried += 1
            self.states[index] = QUEUED

    # -- counting ----------------------------------------------------------------------

    def _predict_assigned(self, key, index: int) -> None:
        """Note the worker a predict went to. The scheduler hands resource-bound tasks
        to a worker whether or not its inference slot is free (the worker holds them
        until it is), so "processing" alone does not mean "predicting"."""
        task = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        worker = task.processing_on.address if task and task.processing_on else "?"
        self.predict_on[index] = worker

    def predicting_now(self) -> int:
        """Predicts running: per worker, those assigned up to its inference slots."""
        live = getattr(self.scheduler, "workers", None) or {}
        running = 0
        for worker, count in Counter(self.predict_on.values()).items():
            state = live.get(worker)
            slots = state.resources.get(INFERENCE_RESOURCE, 1) if state is not None else 1
            running += min(count, int(slots))
        return running

    def _stage_ended(self, index: int, stage: int, worker: str | None, startstops) -> None:
        seconds, stop = compute_time(startstops)
        if seconds is not None:
            self.stage_times[stage].add(seconds)
        figures = self.workers.setdefault(worker or "?", WorkerFigures())
        if stage == PREDICT:
            figures.add_predict(stop or self.clock(), seconds or 0.0)
        elif stage == FINISH:
            figures.finished += 1
        self.states[index] = AFTER[stage]
        if stage == FINISH:
            self._scan_ended()

    def _scan_ended(self) -> None:
        now = self.clock()
        self.recent.append(now)
        elapsed = now - self.started
        if not self.history or elapsed - self.history[-1][0] >= self.history_interval:
            self.history.append((elapsed, self.states.count(DONE), self.states.count(FAILED)))
            if len(self.history) > HISTORY_POINTS:
                self.history = self.history[::2]
                self.history_interval *= 2

    # -- reading -----------------------------------------------------------------------

    def throughput(self, now: float) -> float:
        """Scans ended (done or failed) per minute over the last `window` seconds."""
        while self.recent and self.recent[0] < now - self.window:
            self.recent.popleft()
        span = min(self.window, now - self.started)
        return len(self.recent) / span * 60 if span > 0 else 0.0

    def snapshot(self) -> dict:
        """Everything the page shows, as JSON-ready values."""
        now = self.ended or self.clock()
        counts = {state: self.states.count(code) for code, state in enumerate(STATES)}
        predicting = self.predicting_now()
        counts["waiting"] += counts["predicting"] - predicting
        counts["predicting"] = predicting
        remaining = self.total - counts["done"] - counts["failed"]
        rate = self.throughput(now)
        eta = 0.0 if remaining == 0 else (remaining / rate * 60 if rate else None)
        return {
            "run": {
                "run_id": self.run_id,
                "out": self.out,
                "model": self.model,
                "to_do": self.total,
                "done_before": self.done_before,
                "started": self.started,
                "elapsed_s": now - self.started,
                "status": self.end_status or "running",
            },
            "counts": {
                **counts,
                "retried": self.retried,
                "in_flight": sum(counts[STATES[code]] for code in IN_FLIGHT),
                "remaining": remaining,
            },
            "throughput": {
                "scans_per_minute": rate,
                "window_s": self.window,
                "eta_s": eta,
            },
            "stages": {
                stage: times.summary()
                for stage, times in zip(STAGES, self.stage_times, strict=True)
            },
            "workers": self._worker_rows(now),
            "failures": list(self.failures),
            "history": [
                *self.history,
                (now - self.started, counts["done"], counts["failed"]),
            ],
        }

    def _worker_rows(self, now: float) -> list[dict]:
        """Per worker: scans through predict, their rate and the share of time it was
        predicting over the window (on a GPU worker: roughly how busy the GPU was)."""
        span = min(self.window, now - self.started) or 1.0
        live = getattr(self.scheduler, "workers", {}) or {}
        rows = []
        for address, figures in sorted(self.workers.items()):
            figures.forget_before(now - self.window)
            state = live.get(address)
            rows.append(
                {
                    "worker": address,
                    "name": str(state.name) if state is not None else None,
                    "connected": state is not None,
                    "predicted": figures.predicted,
                    "finished": figures.finished,
                    "scans_per_minute": len(figures.recent_predicts) / span * 60,
                    "predict_mean_s": (
                        figures.predict_seconds / figures.predicted if figures.predicted else None
                    ),
                    "busy": min(1.0, max(0.0, figures.recent_seconds) / span),
                }
            )
        return rows


def compute_time(startstops) -> tuple[float | None, float | None]:
    """(seconds, stop time) of a task's compute, from what its worker reported."""
    for entry in startstops or ():
        if entry.get("action") == "compute":
            return entry["stop"] - entry["start"], entry["stop"]
    return None, None
