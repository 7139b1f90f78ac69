"""pingu_* metrics on the scheduler's /metrics (prometheus_client's default registry):
pingu_scans_* and friends from scan runs (plugin.RunMonitor), pingu_train_* from
trainings (training.TrainMonitor)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from pingu_dask.monitor.plugin import STAGES, STATES, RunMonitor, ServedMonitor
from pingu_dask.monitor.training import FOLD_STATES, TrainMonitor

Monitor = ServedMonitor  # a RunMonitor or a TrainMonitor


class MetricsCollector:
    """pingu_* metrics for the scheduler's /metrics (which serves prometheus_client's
    default registry): of the monitors registered on the schedulers it watches (one of
    each kind per scheduler: a new run's monitor replaces the last run's under the same
    plugin name), and of `monitors` given to it directly (tests, benchmarks).
    Registered once per process."""

    def __init__(self) -> None:
        self.monitors: list[Monitor] = []
        self.schedulers: weakref.WeakSet = weakref.WeakSet()
        self.registered = False

    def watch(self, scheduler) -> None:
        """Show the monitors of `scheduler` (pages.Pages calls it when it starts)."""
        self.schedulers.add(scheduler)
        if not self.registered:
            try:
                import prometheus_client
            except ImportError:  # /metrics says so itself
                return
            prometheus_client.REGISTRY.register(self)
            self.registered = True

    def current(self) -> list[Monitor]:
        """The monitors shown now: the watched schedulers' and the ones given."""
        found = [
            plugin
            for scheduler in list(self.schedulers)
            for plugin in list(scheduler.plugins.values())
            if isinstance(plugin, ServedMonitor)
        ]
        return [*self.monitors, *found]

    def describe(self) -> list:
        return []  # no fixed set: the registry then does not call collect() early

    def collect(self) -> Iterator:
        monitors = self.current()
        runs = [m for m in monitors if isinstance(m, RunMonitor)]
        trainings = [m for m in monitors if isinstance(m, TrainMonitor)]
        families = metric_families(runs)
        if trainings:  # a scheduler that never trained shows no pingu_train_* families
            families += train_metric_families(trainings)
        return iter(families)


def metric_families(monitors: list[RunMonitor]) -> list:
    """The pingu_* metric families of scan runs, one sample per run (label `run`)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    def counter(name, text, labels=("run",)):
        return CounterMetricFamily(name, text, labels=list(labels))

    def gauge(name, text, labels=("run",)):
        return GaugeMetricFamily(name, text, labels=list(labels))

    done = counter("pingu_scans_done", "Scans segmented and stored in this run.")
    failed = counter("pingu_scans_failed", "Scans that failed for good in this run.")
    retried = counter("pingu_scans_retried", "Scan attempts that failed and were retried.")
    in_flight = gauge("pingu_scans_in_flight", "Scans in a stage or between stages.")
    remaining = gauge("pingu_scans_remaining", "Scans of this run not yet done or failed.")
    by_state = gauge("pingu_scans", "Scans of this run by state.", ("run", "state"))
    rate = gauge("pingu_throughput_scans_per_minute", "Scans ended per minute (sliding window).")
    eta = gauge("pingu_eta_seconds", "Estimated seconds until the run ends.")
    durations = HistogramMetricFamily(
        "pingu_stage_duration_seconds", "Compute time of a stage per scan.", labels=["run", "stage"]
    )
    predicted = counter(
        "pingu_worker_scans_predicted", "Scans through predict, by worker.", ("run", "worker")
    )
    busy = gauge(
        "pingu_worker_predict_busy_ratio",
        "Share of the window a worker spent predicting (GPU busy, roughly).",
        ("run", "worker"),
    )
    for monitor in monitors:
        snapshot = monitor.snapshot()
        run, counts = monitor.run_id, snapshot["counts"]
        done.add_metric([run], counts["done"])
        failed.add_metric([run], counts["failed"])
        retried.add_metric([run], counts["retried"])
        in_flight.add_metric([run], counts["in_flight"])
        remaining.add_metric([run], counts["remaining"])
        for state in STATES:
            by_state.add_metric([run, state], counts[state])
        rate.add_metric([run], snapshot["throughput"]["scans_per_minute"])
        if snapshot["throughput"]["eta_s"] is not None:
            eta.add_metric([run], snapshot["throughput"]["eta_s"])
        for stage, times in zip(STAGES, monitor.stage_times, strict=True):
            durations.add_metric([run, stage], times.cumulative(), times.total)
        for row in snapshot["workers"]:
            predicted.add_metric([run, row["worker"]], row["predicted"])
            busy.add_metric([run, row["worker"]], row["busy"])
    return [done, failed, retried, in_flight, remaining, by_state, rate, eta, durations,
            predicted, busy]  # fmt: skip


#: pingu_train_* gauges per fold: (name, help, the snapshot's field).
FOLD_GAUGES = (
    ("pingu_train_fold_epoch", "Epochs a fold has completed.", "epoch"),
    ("pingu_train_fold_epochs", "Epochs a fold is to train (its target).", "epochs"),
    ("pingu_train_loss", "A fold's training loss at its latest epoch.", "train_loss"),
    ("pingu_train_pseudo_dice", "A fold's pseudo-Dice (its EMA where reported).", "dice"),
    (
        "pingu_train_iterations_per_second",
        "A fold's training iterations per second at its latest epoch.",
        "iterations_per_second",
    ),
    (
        "pingu_train_data_wait_ratio",
        "Share of a fold's latest epoch spent waiting for augmented batches.",
        "data_wait_share",
    ),
)


def train_metric_families(monitors: list[TrainMonitor]) -> list:
    """The pingu_train_* metric families: per fold (labels `run`, `fold`: the fold's
    number) and per training. A figure not known yet has no sample."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    per_fold = [
        (GaugeMetricFamily(name, text, labels=["run", "fold"]), key)
        for name, text, key in FOLD_GAUGES
    ]
    attempts = CounterMetricFamily(
        "pingu_train_fold_attempts", "Attempts started at a fold.", labels=["run", "fold"]
    )
    folds = GaugeMetricFamily("pingu_train_folds", "Folds by state.", labels=["run", "state"])
    eta = GaugeMetricFamily(
        "pingu_train_eta_seconds", "Estimated seconds until the training ends.", labels=["run"]
    )
    for monitor in monitors:
        training = monitor.snapshot()["training"]
        run = monitor.run_id
        for row in training["folds"]:
            labels = [run, str(row["fold"])]
            dice = row["ema_pseudo_dice"]
            values = {**row, "dice": dice if dice is not None else row["pseudo_dice"]}
            for family, key in per_fold:
                if values[key] is not None:
                    family.add_metric(labels, values[key])
            attempts.add_metric(labels, row["attempts"])
        for state in FOLD_STATES:
            folds.add_metric([run, state], training["counts"][state])
        if training["eta_s"] is not None:
            eta.add_metric([run], training["eta_s"])
    return [*(family for family, _ in per_fold), attempts, folds, eta]


METRICS = MetricsCollector()
