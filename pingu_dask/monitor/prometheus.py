"""pingu_* metrics on the scheduler's /metrics (prometheus_client's default registry)."""

from __future__ import annotations

from collections.abc import Iterator

from pingu_dask.monitor.plugin import STAGES, STATES, RunMonitor


class MetricsCollector:
    """pingu_* metrics of the monitors attached in this process, for the scheduler's
    /metrics (which serves prometheus_client's default registry). Registered once per
    process; one monitor per scheduler (a new run's replaces the last one's)."""

    def __init__(self) -> None:
        self.monitors: list[RunMonitor] = []
        self.registered = False

    def attach(self, monitor: RunMonitor) -> None:
        self.monitors = [
            m for m in self.monitors if m.scheduler is None or m.scheduler is not monitor.scheduler
        ]
        self.monitors.append(monitor)
        if not self.registered:
            try:
                import prometheus_client
            except ImportError:  # /metrics says so itself
                return
            prometheus_client.REGISTRY.register(self)
            self.registered = True

    def detach(self, monitor: RunMonitor) -> None:
        self.monitors = [m for m in self.monitors if m is not monitor]

    def describe(self) -> list:
        return []  # no fixed set: the registry then does not call collect() early

    def collect(self) -> Iterator:
        return iter(metric_families(self.monitors))


def metric_families(monitors: list[RunMonitor]) -> list:
    """The pingu_* metric families, one sample per run (label `run`)."""
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


METRICS = MetricsCollector()
