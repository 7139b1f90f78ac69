"""What watching a run costs: the dashboard plugin's per-transition time, its snapshot
(page, JSON, /metrics) at cohort scale, and the runner's throughput with and without it.

The runner comparison uses the tests' stand-in model (benchkit/standins.py: no network,
an empty label map) behind the real stages: each scan is a tiny real image (12³), read,
checked, analysed and its mask written to Zarr, so the per-scan work is small and the
scheduler and the driver are the bottleneck: any cost of the plugin shows at its
largest. Run:

    .venv/bin/python scripts/bench_dashboard.py [--scans 4000] [--rounds 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from benchkit import standins
from benchkit.benchdoc import git_revision, machine, write_section
from distributed import Client
from prometheus_client import CollectorRegistry, generate_latest

from pingu_dask.inputs.manifest import Scan
from pingu_dask.monitor import plugin, prometheus
from pingu_dask.run.local import local_cluster
from pingu_dask.run.loop import Segmentation, segment_scans
from pingu_dask.run.stages import Pipeline


def transition_cost(scans: int) -> float:
    """Microseconds per transition call: a whole run's worth of transitions, replayed."""
    monitor = plugin.RunMonitor("tok", "bench", scans, window_seconds=300.0)
    calls = []
    for index in range(scans):
        for stage in plugin.STAGES:
            key = (f"{stage}-tok", index, 1)
            startstops = ({"action": "compute", "start": 1.0, "stop": 2.0},)
            calls.append((key, "released", "waiting", {}))
            calls.append((key, "waiting", "processing", {}))
            ended = {"worker": "tcp://w", "startstops": startstops}
            calls.append((key, "processing", "memory", ended))
            calls.append((key, "memory", "released", {}))
            calls.append((key, "released", "forgotten", {}))
    started = time.perf_counter()
    for key, start, finish, kwargs in calls:
        monitor.transition(key, start, finish, stimulus_id="s", **kwargs)
    seconds = time.perf_counter() - started
    assert monitor.snapshot()["counts"]["done"] == scans
    return seconds / len(calls) * 1e6


def snapshot_cost(scans: int, workers: int) -> tuple[float, float, int]:
    """Milliseconds for the JSON snapshot and for /metrics' text, for a run of `scans`
    with `workers` workers and its failures list full; and the snapshot's size."""
    monitor = plugin.RunMonitor("tok", "bench", scans, window_seconds=300.0)
    for index in range(scans):
        for stage in plugin.STAGES:
            monitor.transition(
                (f"{stage}-tok", index, 1),
                "processing",
                "memory",
                stimulus_id="s",
                worker=f"tcp://10.0.0.{index % workers}:1234",
                startstops=({"action": "compute", "start": time.time() - 1, "stop": time.time()},),
            )
    for index in range(plugin.FAILURES_KEPT):
        monitor.log_event("pingu", {"token": "tok", "event": "retry", "index": index,
                                    "scan_id": f"s{index}", "message": "x" * 200})  # fmt: skip
    started = time.perf_counter()
    text = json.dumps(monitor.snapshot())
    snapshot_ms = (time.perf_counter() - started) * 1e3
    registry = CollectorRegistry()
    collector = prometheus.MetricsCollector()
    collector.monitors.append(monitor)
    registry.register(collector)
    started = time.perf_counter()
    generate_latest(registry)
    metrics_ms = (time.perf_counter() - started) * 1e3
    return snapshot_ms, metrics_ms, len(text)


def runner_rate(client: Client, scans: list[Scan], pipeline: Pipeline, watch: bool) -> float:
    started = time.perf_counter()
    records = segment_scans(
        client,
        Segmentation(scans=scans, pipeline=pipeline, keep_details=False, watch=watch),
    )
    seconds = time.perf_counter() - started
    assert sum(r.status == "ok" for r in records) == len(scans)
    return len(scans) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    per_transition = transition_cost(20_000)
    snapshot_ms, metrics_ms, size = snapshot_cost(100_000, 64)

    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        scans = standins.make_scans(args.scans, scratch)  # tiny real images, linked
        cluster = local_cluster(n_workers=args.workers, threads_per_worker=3)
        with cluster, Client(cluster) as client:
            for round_ in range(args.rounds):
                for watch in (False, True):  # alternate, so that drift hits both alike
                    out = scratch / f"out-{round_}-{watch:d}"  # a fresh output per run
                    pipeline = standins.pipeline_in(scratch, out=out)
                    rates[watch].append(runner_rate(client, scans, pipeline, watch))
                    print(f"round {round_} watch={watch}: {rates[watch][-1]:.1f} scans/s")

    off, on = np.mean(rates[False]), np.mean(rates[True])

    def listed(values: list[float]) -> str:
        return ", ".join(f"{value:.1f}" for value in values)

    runs = f"{args.scans:,} scans x {args.rounds} rounds"
    rows = [
        (
            "plugin `transition` hook, per call (a 20,000-scan run's transitions replayed)",
            f"{per_transition:.2f} µs",
        ),
        (
            "status.json snapshot, 100,000-scan run, 64 workers, 50 failures kept",
            f"{snapshot_ms:.1f} ms ({size / 1024:.0f} KiB)",
        ),
        ("/metrics text (pingu_* only), same run", f"{metrics_ms:.1f} ms"),
        (
            f"runner, stand-in model (no network) behind the real stages, {runs}, "
            "without the plugin",
            f"{off:.1f} scans/s ({listed(rates[False])})",
        ),
        ("the same with the plugin", f"{on:.1f} scans/s ({listed(rates[True])})"),
    ]
    table = "\n".join(f"| {measure} | {figure} |" for measure, figure in rows)
    command = (
        f"scripts/bench_dashboard.py --scans {args.scans} --rounds {args.rounds} "
        f"--workers {args.workers}"
    )
    body = f"""## Cost of watching a run (scripts/bench_dashboard.py)

Machine: {machine()}; revision {git_revision()}.
Command: `.venv/bin/python {command}`

| measure | figure |
|---|---|
{table}

The page polls status.json every 2 s per open browser tab; Prometheus scrapes /metrics
at its own interval (typically 15 s).
"""
    write_section("bench_dashboard", body)
    print(body)


if __name__ == "__main__":
    main()
