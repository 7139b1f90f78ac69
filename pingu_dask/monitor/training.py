"""Watching a training: per-fold progress of `pingu-dask train` on the run page (/pingu),
in /pingu/status.json (its "training" key) and as pingu_train_* metrics.

A training is one long task per cross-validation fold, so the scheduler's transitions
say little (a fold is "processing" for hours). `TrainMonitor` therefore counts only from
events on the topic TRAIN_TOPIC, all small msgpack-able dicts carrying the training's
token (others are ignored):

- the driver (feed.TrainFeed, `client.log_event`) sends the stages around the folds
  (cases, plan, preprocess, train, evaluate: done / total), a fold's verdict after each
  attempt (ok, retry, failed; the driver decides, as for scans) and the end;
- the worker training a fold sends "started" (attempt, worker, the checkpoint epoch it
  resumes from) and one "epoch" per epoch (`get_worker().log_event(TRAIN_TOPIC, ...)`):
  losses, pseudo-Dice, its EMA, seconds per epoch, iterations per second, the share of
  the epoch spent waiting for augmented batches, the latest checkpoint's epoch.

Distributed's Broker hands both kinds to every scheduler plugin's `log_event`. Work per
event is a dict lookup, a few assignments and an append (the scheduler's event loop runs
it); medians, counts and ETAs are computed when the page or /metrics reads them.

ETAs: a training fold needs (epochs - epoch) x the median of its recent epoch times; a
queued fold epochs x the median over all folds (a retrying one resumes from its last
checkpoint); the training needs the longest running fold plus the waiting folds shared
among the running ones (folds run side by side on as many GPUs as are training now).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pingu_dask.monitor.plugin import ServedMonitor

logger = logging.getLogger(__name__)

TRAIN_TOPIC = "pingu-train"  # events of the driver and of the workers training folds
TRAIN_PLUGIN_NAME = "pingu-train"
FOLD_STATES = ("queued", "training", "retrying", "done", "failed")
WAITING = ("queued", "retrying")  # not running, will run
#: A fold attempt's verdict ("fold-ended" status) -> the fold's state.
VERDICT_STATES = {"ok": "done", "retry": "retrying", "failed": "failed"}
#: The per-epoch figures a worker reports, kept as the fold's latest values.
EPOCH_FIGURES = (
    "train_loss",
    "val_loss",
    "pseudo_dice",
    "ema_pseudo_dice",
    "iterations_per_second",
    "data_wait_share",
)
EPOCH_TIMES_KEPT = 50  # recent epoch durations per fold, for the median (ETA)
HISTORY_POINTS = 200  # (epoch, train loss, pseudo-Dice) points kept per fold; thinned


def number(value: Any) -> float | None:
    """A reported figure as a float, None when missing or not finite: JSON has no NaN
    (the page's JSON.parse would fail on it), so a diverged loss reads as unknown."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def whole(value: Any) -> int | None:
    """A reported count (epoch, attempt) as an int, None when missing."""
    return None if value is None else int(value)


@dataclass
class FoldProgress:
    """One fold: its plan (cases, epochs), where its latest attempt is, its figures."""

    fold: int
    name: str
    train: int
    val: int
    epochs: int
    state: str = "queued"
    attempt: int = 0  # the latest attempt's number, as the driver counts them
    attempts: int = 0  # attempts started
    worker: str | None = None
    epoch: int = 0  # epochs completed
    from_epoch: int = 0  # the checkpoint epoch the latest attempt resumed from
    checkpoint_epoch: int | None = None
    message: str | None = None
    figures: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(EPOCH_FIGURES))
    epoch_times: deque[float] = field(default_factory=lambda: deque(maxlen=EPOCH_TIMES_KEPT))
    history: list[list] = field(default_factory=list)  # [epoch, train loss, pseudo-Dice]
    history_step: int = 1  # epochs between kept points, doubled when thinned
    latest: list | None = None  # the latest epoch's point (kept or not)

    def started(self, msg: dict) -> None:
        self.state = "training"
        self.attempt = whole(msg.get("attempt")) or self.attempt + 1
        self.attempts += 1
        self.worker = msg.get("worker")
        self.from_epoch = self.epoch = whole(msg.get("from_epoch")) or 0
        self.epochs = whole(msg.get("epochs")) or self.epochs
        # Rates describe the worker; the new one has measured nothing yet.
        self.figures["iterations_per_second"] = self.figures["data_wait_share"] = None
        self._forget_after(self.from_epoch)  # the epochs past the checkpoint run again

    def epoch_ended(self, msg: dict) -> None:
        attempt = whole(msg.get("attempt"))
        if attempt is not None and attempt > self.attempt:  # its "started" was lost
            self.attempt = attempt
        self.state = "training"
        self.worker = msg.get("worker") or self.worker
        self.epoch = whole(msg.get("epoch")) or 0
        self.epochs = whole(msg.get("epochs")) or self.epochs
        for name in EPOCH_FIGURES:
            self.figures[name] = number(msg.get(name))
        checkpoint = msg.get("checkpoint_epoch")
        if checkpoint is not None:
            self.checkpoint_epoch = int(checkpoint)
        seconds = number(msg.get("epoch_seconds"))
        if seconds is not None and seconds > 0:
            self.epoch_times.append(seconds)
        self._record([self.epoch, self.figures["train_loss"], self.figures["pseudo_dice"]])

    def ended(self, msg: dict) -> None:
        self.state = VERDICT_STATES.get(msg.get("status") or "", "failed")
        self.message = msg.get("message")

    def _forget_after(self, epoch: int) -> None:
        while self.history and self.history[-1][0] > epoch:
            self.history.pop()
        if self.latest is not None and self.latest[0] > epoch:
            self.latest = None

    def _record(self, point: list) -> None:
        """Keep one point every `history_step` epochs; past HISTORY_POINTS, drop every
        other one and double the step (so a 1000-epoch fold keeps ~200 points)."""
        self._forget_after(point[0] - 1)  # an epoch seen again (a restart we missed)
        self.latest = point
        if not self.history or point[0] - self.history[-1][0] >= self.history_step:
            self.history.append(point)
            if len(self.history) > HISTORY_POINTS:
                self.history = self.history[::2]
                self.history_step *= 2

    # -- reading ------------------------------------------------------------------------

    def epoch_seconds(self) -> float | None:
        return statistics.median(self.epoch_times) if self.epoch_times else None

    def eta(self, typical_epoch: float | None) -> float | None:
        """Seconds until this fold is done: see the module docstring."""
        if self.state == "done":
            return 0.0
        if self.state == "training":
            own = self.epoch_seconds()
            return None if own is None else max(0, self.epochs - self.epoch) * own
        if self.state not in WAITING or typical_epoch is None:
            return None  # failed: it will not end
        resumes_at = (self.checkpoint_epoch or 0) if self.state == "retrying" else 0
        return max(0, self.epochs - resumes_at) * typical_epoch

    def row(self, typical_epoch: float | None) -> dict:
        points = self.history
        if self.latest is not None and (not points or points[-1][0] < self.latest[0]):
            points = [*points, self.latest]
        return {
            "fold": self.fold,
            "name": self.name,
            "train": self.train,
            "val": self.val,
            "state": self.state,
            "attempt": self.attempt,
            "attempts": self.attempts,
            "worker": self.worker,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "from_epoch": self.from_epoch,
            **self.figures,
            "checkpoint_epoch": self.checkpoint_epoch,
            "epoch_seconds": self.epoch_seconds(),
            "eta_s": self.eta(typical_epoch),
            "message": self.message,
            "history": [list(point) for point in points],
        }


class TrainMonitor(ServedMonitor):
    """Live progress of one training, on the scheduler. See the module docstring.

    `folds`: one dict per fold, {"fold": int, "name": str, "train": cases, "val": cases,
    "epochs": int}, in the order the page lists them.
    """

    name = TRAIN_PLUGIN_NAME

    def __init__(
        self,
        token: str,
        run_id: str,
        model_dir: str,
        folds: list[dict],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self.run_id = run_id
        self.model_dir = model_dir
        self.clock = clock
        self.folds = {
            int(f["fold"]): FoldProgress(
                int(f["fold"]), str(f["name"]), int(f["train"]), int(f["val"]), int(f["epochs"])
            )
            for f in folds
        }
        self.stage: dict | None = None
        self.started = clock()
        self.ended: float | None = None
        self.end_status: str | None = None
        self.scheduler = None

    # -- scheduler hooks ---------------------------------------------------------------

    def log_event(self, topic, msg) -> None:
        if topic != TRAIN_TOPIC or not isinstance(msg, dict) or msg.get("token") != self.token:
            return
        try:
            self._consume(msg)
        except (KeyError, TypeError, ValueError) as error:  # a sender's bug: note, go on
            logger.warning("ignored a malformed training event %r: %s", msg, error)

    def _consume(self, msg: dict) -> None:
        event = msg.get("event")
        if event == "stage":
            self.stage = {key: msg.get(key) for key in ("stage", "done", "total")}
            return
        if event == "ended":
            self.ended, self.end_status = self.clock(), str(msg.get("status"))
            return
        fold = self.folds.get(int(msg["fold"]))
        if fold is None:
            logger.debug("training event for a fold not in the plan: %r", msg)
            return
        attempt = whole(msg.get("attempt"))
        if event == "started":
            fold.started(msg)
        elif attempt is not None and attempt < fold.attempt:
            return  # a late word from an attempt already given up on
        elif event == "epoch":
            if fold.state != "training" and attempt == fold.attempt and fold.attempts:
                # After its verdict: a cancelled attempt's thread may still be running
                # (Python threads cannot be stopped); its epochs no longer count.
                return
            fold.epoch_ended(msg)
        elif event == "fold-ended":
            fold.ended(msg)

    # -- reading -----------------------------------------------------------------------

    def typical_epoch_seconds(self) -> float | None:
        """The median recent epoch time over all folds (for folds not started)."""
        times = [seconds for fold in self.folds.values() for seconds in fold.epoch_times]
        return statistics.median(times) if times else None

    def snapshot(self) -> dict:
        """What the page shows, as JSON-ready values, under the key "training"."""
        now = self.ended or self.clock()
        typical = self.typical_epoch_seconds()
        rows = [fold.row(typical) for fold in self.folds.values()]
        counts = Counter(row["state"] for row in rows)
        return {
            "training": {
                "run_id": self.run_id,
                "model_dir": self.model_dir,
                "status": self.end_status or "running",
                "stage": self.stage,
                "started": self.started,
                "elapsed_s": now - self.started,
                "eta_s": self._eta(rows),
                "folds": rows,
                "counts": {state: counts[state] for state in FOLD_STATES},
            }
        }

    def _eta(self, rows: list[dict]) -> float | None:
        """The longest running fold, plus the waiting folds spread over the running ones;
        None while a figure it needs is unknown."""
        if self.end_status is not None:
            return 0.0 if all(row["state"] == "done" for row in rows) else None
        running = [row["eta_s"] for row in rows if row["state"] == "training"]
        waiting = [row["eta_s"] for row in rows if row["state"] in WAITING]
        if None in running or None in waiting:
            return None
        return max(running, default=0.0) + sum(waiting) / max(1, len(running))
