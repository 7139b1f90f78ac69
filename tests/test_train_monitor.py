"""A training on the run page (/pingu/status.json's "training") and as pingu_train_* metrics.

First the monitor's arithmetic on made-up events with a fake clock (exact values: fold
states, ETAs from known epoch times, retries, thinning, stale and foreign events), then
the metrics text, then a real LocalCluster: events from the driver (TrainFeed, i.e.
client.log_event) and from a worker task (get_worker().log_event) reach the plugin, and
the page's JSON and /metrics show them over HTTP.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from distributed import Client, LocalCluster, get_worker
from helpers import headless, shown
from prometheus_client import CollectorRegistry, generate_latest

from pingu_dask.monitor import http, plugin, prometheus
from pingu_dask.monitor.feed import TrainFeed
from pingu_dask.monitor.training import (
    HISTORY_POINTS,
    TRAIN_PLUGIN_NAME,
    TRAIN_TOPIC,
    TrainMonitor,
)

TOKEN = "tr41n"
FOLDS = [
    {"fold": 0, "name": "fold_0", "train": 8, "val": 2, "epochs": 10},
    {"fold": 1, "name": "fold_1", "train": 8, "val": 2, "epochs": 10},
    {"fold": 2, "name": "fold_2", "train": 8, "val": 2, "epochs": 10},
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def event(kind: str, token: str = TOKEN, **fields) -> dict:
    return {"token": token, "event": kind, **fields}


def epoch(fold: int, number: int, seconds: float | None, attempt: int = 1, **figures) -> dict:
    """An "epoch" event as a worker sends it; figures default to made-up values."""
    values = {
        "train_loss": 1.0 / number,
        "val_loss": 1.1 / number,
        "pseudo_dice": number / 100,
        "ema_pseudo_dice": number / 200,
        "iterations_per_second": 5.0,
        "data_wait_share": 0.25,
        "checkpoint_epoch": number,
        **figures,
    }
    return event("epoch", fold=fold, attempt=attempt, worker=f"tcp://w{fold}", epoch=number,
                 epochs=10, epoch_seconds=seconds, **values)  # fmt: skip


def started(fold: int, attempt: int = 1, from_epoch: int = 0, worker: str = "") -> dict:
    return event("started", fold=fold, attempt=attempt, worker=worker or f"tcp://w{fold}",
                 from_epoch=from_epoch, epochs=10)  # fmt: skip


def folds_of(monitor: TrainMonitor) -> dict[int, dict]:
    return {row["fold"]: row for row in monitor.snapshot()["training"]["folds"]}


def test_fold_states_and_etas_follow_the_events() -> None:
    clock = FakeClock()
    monitor = TrainMonitor(TOKEN, "tr1", "/models/Dataset042", FOLDS, clock=clock)
    send = monitor.log_event
    send(TRAIN_TOPIC, event("stage", stage="preprocess", done=2, total=5))
    training = monitor.snapshot()["training"]
    assert training["stage"] == {"stage": "preprocess", "done": 2, "total": 5}
    assert training["counts"] == {"queued": 3, "training": 0, "retrying": 0, "done": 0,
                                  "failed": 0}  # fmt: skip
    assert training["eta_s"] is None  # no epoch time known yet
    assert (training["status"], training["run_id"]) == ("running", "tr1")

    send(TRAIN_TOPIC, started(0))
    send(TRAIN_TOPIC, started(1))
    for number, seconds in enumerate((10.0, 12.0, 11.0, 30.0), start=1):
        send(TRAIN_TOPIC, epoch(0, number, seconds))
    for number, seconds in enumerate((20.0, 22.0), start=1):
        send(TRAIN_TOPIC, epoch(1, number, seconds))
    # Not this training's: another token, another topic, garbage.
    send(TRAIN_TOPIC, epoch(0, 9, 1.0) | {"token": "other"})
    send(plugin.TOPIC, epoch(0, 9, 1.0))
    send(TRAIN_TOPIC, "not a dict")
    send(TRAIN_TOPIC, event("epoch", fold="zero", epoch=1))  # malformed: logged, ignored
    send(TRAIN_TOPIC, epoch(7, 1, 1.0))  # a fold not in the plan

    folds = folds_of(monitor)
    zero = folds[0]
    assert (zero["state"], zero["epoch"], zero["worker"], zero["attempts"]) == (
        "training", 4, "tcp://w0", 1)  # fmt: skip
    assert zero["epoch_seconds"] == pytest.approx(11.5)  # median of 10, 11, 12, 30
    assert zero["eta_s"] == pytest.approx(6 * 11.5)
    assert zero["train_loss"] == pytest.approx(0.25) and zero["ema_pseudo_dice"] == 0.02
    assert zero["data_wait_share"] == 0.25 and zero["checkpoint_epoch"] == 4
    assert folds[1]["eta_s"] == pytest.approx(8 * 21.0)
    # A queued fold: all 10 epochs at the median over all folds (10 11 12 20 22 30 -> 16).
    assert folds[2]["state"] == "queued" and folds[2]["eta_s"] == pytest.approx(10 * 16.0)
    # The longest running fold, plus the queued one shared between the two running ones.
    assert monitor.snapshot()["training"]["eta_s"] == pytest.approx(168.0 + 160.0 / 2)

    # Fold 1's worker dies: the driver retries it; it resumes from its checkpoint (2).
    send(TRAIN_TOPIC, event("fold-ended", fold=1, attempt=1, status="retry", message="lost"))
    send(TRAIN_TOPIC, epoch(1, 3, 99.0))  # a cancelled attempt's thread goes on: ignored
    folds = folds_of(monitor)
    assert (folds[1]["state"], folds[1]["epoch"], folds[1]["message"]) == (
        "retrying", 2, "lost")  # fmt: skip
    assert folds[1]["eta_s"] == pytest.approx(8 * 16.0)
    assert monitor.snapshot()["training"]["eta_s"] == pytest.approx(69.0 + 128.0 + 160.0)

    send(TRAIN_TOPIC, started(1, attempt=2, from_epoch=2, worker="tcp://w9"))
    send(TRAIN_TOPIC, epoch(1, 3, 5.0, attempt=1))  # the old attempt, late: ignored
    send(TRAIN_TOPIC, epoch(1, 3, 40.0, attempt=2) | {"worker": "tcp://w9"})
    one = folds_of(monitor)[1]
    assert (one["state"], one["attempt"], one["attempts"], one["from_epoch"]) == (
        "training", 2, 2, 2)  # fmt: skip
    assert (one["epoch"], one["worker"]) == (3, "tcp://w9")
    assert one["epoch_seconds"] == pytest.approx(22.0)  # 20, 22, 40
    assert one["eta_s"] == pytest.approx(7 * 22.0)
    assert [point[0] for point in one["history"]] == [1, 2, 3]

    for number in range(5, 11):
        send(TRAIN_TOPIC, epoch(0, number, 10.0, train_loss=float("nan")))
    send(TRAIN_TOPIC, event("fold-ended", fold=0, attempt=1, status="ok", message=None))
    send(TRAIN_TOPIC, event("fold-ended", fold=2, attempt=1, status="failed", message="OOM"))
    folds = folds_of(monitor)
    assert (folds[0]["state"], folds[0]["eta_s"], folds[0]["epoch"]) == ("done", 0.0, 10)
    assert folds[0]["train_loss"] is None  # NaN: JSON has none
    assert (folds[2]["state"], folds[2]["eta_s"], folds[2]["message"]) == ("failed", None, "OOM")
    training = monitor.snapshot()["training"]
    assert training["counts"] == {"queued": 0, "training": 1, "retrying": 0, "done": 1,
                                  "failed": 1}  # fmt: skip
    assert training["eta_s"] == pytest.approx(7 * 22.0)  # a failed fold waits for nothing
    json.loads(json.dumps(monitor.snapshot(), allow_nan=False))  # JSON-ready, no NaN

    clock.now += 100.0
    assert monitor.snapshot()["training"]["elapsed_s"] == pytest.approx(100.0)
    send(TRAIN_TOPIC, event("ended", status="interrupted"))
    clock.now += 50.0
    training = monitor.snapshot()["training"]
    assert (training["status"], training["elapsed_s"], training["eta_s"]) == (
        "interrupted", pytest.approx(100.0), None)  # fmt: skip


def test_a_long_fold_keeps_a_thinned_history_and_forgets_epochs_run_again() -> None:
    monitor = TrainMonitor(TOKEN, "long", "/m", [FOLDS[0] | {"epochs": 1000}], clock=FakeClock())
    monitor.log_event(TRAIN_TOPIC, started(0))
    for number in range(1, 1001):
        monitor.log_event(TRAIN_TOPIC, epoch(0, number, 1.0) | {"epochs": 1000})
    history = folds_of(monitor)[0]["history"]
    assert HISTORY_POINTS / 2 <= len(history) <= HISTORY_POINTS + 1
    epochs = [point[0] for point in history]
    assert epochs == sorted(set(epochs)) and epochs[0] == 1
    assert history[-1] == [1000, pytest.approx(1 / 1000), pytest.approx(10.0)]
    gaps = {b - a for a, b in itertools.pairwise(epochs[:-1])}  # the last: the latest epoch
    assert gaps == {8}, gaps  # evenly thinned: 1000 epochs / 8 = 125 points
    # The worker is lost; the next attempt resumes from the checkpoint at epoch 500.
    monitor.log_event(TRAIN_TOPIC, started(0, attempt=2, from_epoch=500))
    history = folds_of(monitor)[0]["history"]
    assert history[-1][0] <= 500 and folds_of(monitor)[0]["epoch"] == 500
    monitor.log_event(TRAIN_TOPIC, epoch(0, 501, 1.0, attempt=2) | {"epochs": 1000})
    assert folds_of(monitor)[0]["history"][-1][0] == 501


def metrics_text(*monitors) -> str:
    registry = CollectorRegistry()
    collector = prometheus.MetricsCollector()
    collector.monitors.extend(monitors)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_metrics_text_has_the_train_families() -> None:
    clock = FakeClock()
    monitor = TrainMonitor(TOKEN, "tr2", "/m", FOLDS, clock=clock)
    for fold in (0, 1):
        monitor.log_event(TRAIN_TOPIC, started(fold))
    figures = {"train_loss": 0.5, "ema_pseudo_dice": 0.7, "iterations_per_second": 12.5,
               "data_wait_share": 0.1}  # fmt: skip
    monitor.log_event(TRAIN_TOPIC, epoch(0, 4, 10.0, **figures))
    monitor.log_event(TRAIN_TOPIC, epoch(1, 2, 20.0, ema_pseudo_dice=None, pseudo_dice=0.4))
    monitor.log_event(TRAIN_TOPIC, event("fold-ended", fold=1, attempt=1, status="retry"))
    monitor.log_event(TRAIN_TOPIC, started(1, attempt=2, from_epoch=2))
    run = plugin.RunMonitor("scan", "runA", total=2, window_seconds=60.0, clock=clock)
    text = metrics_text(run, monitor)
    lines = set(text.splitlines())
    for line in (
        'pingu_train_fold_epoch{fold="0",run="tr2"} 4.0',
        'pingu_train_fold_epochs{fold="0",run="tr2"} 10.0',
        'pingu_train_loss{fold="0",run="tr2"} 0.5',
        'pingu_train_pseudo_dice{fold="0",run="tr2"} 0.7',  # the EMA
        'pingu_train_pseudo_dice{fold="1",run="tr2"} 0.4',  # no EMA: the last value
        'pingu_train_iterations_per_second{fold="0",run="tr2"} 12.5',
        'pingu_train_data_wait_ratio{fold="0",run="tr2"} 0.1',
        'pingu_train_fold_attempts_total{fold="1",run="tr2"} 2.0',
        'pingu_train_fold_attempts_total{fold="2",run="tr2"} 0.0',
        'pingu_train_fold_epoch{fold="2",run="tr2"} 0.0',
        'pingu_train_folds{run="tr2",state="training"} 2.0',
        'pingu_train_folds{run="tr2",state="queued"} 1.0',
        'pingu_train_folds{run="tr2",state="done"} 0.0',
        'pingu_scans_done_total{run="runA"} 0.0',  # the scan run's families are still there
    ):
        assert line in lines, line
    assert re.search(r"^# TYPE pingu_train_fold_attempts(_total)? counter$", text, re.M)
    # Unknown figures have no sample: fold 2 has no loss; fold 1's rate went with its
    # lost worker.
    assert 'pingu_train_loss{fold="2"' not in text
    assert 'pingu_train_iterations_per_second{fold="1"' not in text
    # fold 0: 6 x 10 s; fold 1 (its times survive the retry): 8 x 20 s; fold 2 queued:
    # 10 x the median of (10, 20) over the two running folds.
    assert 'pingu_train_eta_seconds{run="tr2"} 235.0' in lines
    # Fold 2 starts: without an epoch time of its own the ETA is unknown, and has no sample.
    monitor.log_event(TRAIN_TOPIC, started(2))
    assert "pingu_train_eta_seconds{" not in metrics_text(monitor)
    monitor.log_event(TRAIN_TOPIC, epoch(2, 1, 30.0))
    eta = re.search(r'pingu_train_eta_seconds\{run="tr2"\} (\S+)', metrics_text(monitor))
    assert eta is not None and float(eta.group(1)) == pytest.approx(9 * 30.0)
    assert "pingu_train_" not in metrics_text(run)  # no training: no such families


def test_the_collector_shows_the_monitors_registered_on_the_scheduler() -> None:
    class Scheduler:  # what the collector reads of a scheduler: its plugins by name
        def __init__(self) -> None:
            self.plugins: dict = {}

    scheduler = Scheduler()
    collector = prometheus.MetricsCollector()
    collector.registered = True  # not into the default registry
    collector.watch(scheduler)
    run = plugin.RunMonitor("scan", "runA", total=1, window_seconds=60.0)
    first, second = (TrainMonitor(t, t, "/m", FOLDS) for t in ("one", "two"))
    scheduler.plugins = {plugin.PLUGIN_NAME: run, TRAIN_PLUGIN_NAME: first, "other": object()}
    assert collector.current() == [run, first]
    scheduler.plugins[TRAIN_PLUGIN_NAME] = second  # a new training replaces the last only
    assert collector.current() == [run, second]
    del scheduler.plugins[TRAIN_PLUGIN_NAME]  # unregistered (or the scheduler closed)
    assert collector.current() == [run]


def test_status_json_holds_the_run_the_training_or_both() -> None:
    scheduler = SimpleNamespace(plugins={})  # what http reads of a scheduler
    assert http.status(scheduler) is None  # the handler answers 404
    run = plugin.RunMonitor("scan", "runA", total=3, window_seconds=60.0)
    scheduler.plugins = {plugin.PLUGIN_NAME: run}
    assert "training" not in http.status(scheduler) and http.status(scheduler)["run"]
    training = TrainMonitor(TOKEN, "tr3", "/m", FOLDS)
    scheduler.plugins[TRAIN_PLUGIN_NAME] = training
    both = http.status(scheduler)
    assert both["run"]["run_id"] == "runA" and both["counts"]["queued"] == 3
    assert both["training"]["run_id"] == "tr3" and len(both["training"]["folds"]) == 3
    del scheduler.plugins[plugin.PLUGIN_NAME]
    assert set(http.status(scheduler)) == {"training"}


# -- a real scheduler ------------------------------------------------------------------------


def report_from_worker(token: str) -> str:
    """A fold's task, as far as the monitor sees it: started, then two epochs."""
    worker = get_worker()
    start = {"token": token, "event": "started", "fold": 1, "attempt": 1,
             "worker": worker.address, "from_epoch": 0, "epochs": 4}  # fmt: skip
    worker.log_event(TRAIN_TOPIC, start)
    for number, seconds in ((1, 3.0), (2, 5.0)):
        figures = {"train_loss": -0.25 * number, "val_loss": -0.2 * number,
                   "pseudo_dice": 0.3 * number, "ema_pseudo_dice": 0.2 * number,
                   "epoch_seconds": seconds, "iterations_per_second": 7.5,
                   "data_wait_share": 0.125, "checkpoint_epoch": None}  # fmt: skip
        worker.log_event(TRAIN_TOPIC, {"token": token, "event": "epoch", "fold": 1,
                                       "attempt": 1, "worker": worker.address,
                                       "epoch": number, "epochs": 4, **figures})  # fmt: skip
    return worker.address


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def poll_status(url: str, ready, seconds: float = 30.0) -> dict:
    """status.json once `ready(status)` holds (worker events travel on the worker's
    batched stream), or the last one read."""
    deadline = time.monotonic() + seconds
    while True:
        status = json.loads(get(url))
        if ready(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


@pytest.fixture
def scheduler_page():
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                     dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        # In-process workers: the link names the inproc address's host; the web server
        # listens on 127.0.0.1.
        port = urlparse(client.dashboard_link).port
        yield client, http.page_link(f"http://127.0.0.1:{port}/status")


def test_events_from_driver_and_worker_reach_the_page_and_metrics(scheduler_page) -> None:
    client, page = scheduler_page
    with pytest.raises(urllib.error.HTTPError) as nothing:
        get(page + "/status.json")
    assert nothing.value.code == 404  # neither a run nor a training yet

    earlier = TrainFeed(client, TrainMonitor("old", "earlier", "/m", FOLDS[:1]))
    monitor = TrainMonitor(TOKEN, "live", "/models/live", FOLDS[:2])
    feed = TrainFeed(client, monitor)  # replaces the earlier training's monitor
    assert earlier.active and feed.active
    assert client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins)).count(
        TRAIN_PLUGIN_NAME) == 1  # fmt: skip
    earlier.send(event="stage", stage="plan", done=9, total=9)  # the old token: ignored
    feed.send(event="stage", stage="train", done=0, total=2)
    feed.send(event="started", fold=0, attempt=1, worker="tcp://driver-said", from_epoch=3,
              epochs=10)  # fmt: skip
    feed.send(event="fold-ended", fold=0, attempt=1, status="failed", message="CUDA error")
    address = client.submit(report_from_worker, TOKEN, pure=False).result()

    url = page + "/status.json"
    status = poll_status(url, lambda s: s["training"]["folds"][1]["epoch"] == 2)
    assert set(status) == {"training"}  # no scan run on this scheduler
    training = status["training"]
    assert (training["run_id"], training["model_dir"], training["status"]) == (
        "live", "/models/live", "running")  # fmt: skip
    assert training["stage"] == {"stage": "train", "done": 0, "total": 2}
    zero, one = training["folds"]
    assert (zero["state"], zero["from_epoch"], zero["message"]) == ("failed", 3, "CUDA error")
    assert (one["state"], one["worker"], one["epoch"], one["epochs"]) == (
        "training", address, 2, 4)  # fmt: skip
    assert (one["train_loss"], one["ema_pseudo_dice"], one["iterations_per_second"]) == (
        -0.5, 0.4, 7.5)  # fmt: skip
    assert one["epoch_seconds"] == 4.0 and one["eta_s"] == pytest.approx(2 * 4.0)
    assert one["history"] == [[1, -0.25, 0.3], [2, -0.5, 0.6]]
    assert training["counts"]["failed"] == 1 and training["counts"]["training"] == 1
    assert training["eta_s"] == pytest.approx(8.0)

    metrics = get(page.removesuffix("/pingu") + "/metrics").decode()
    lines = set(metrics.splitlines())
    for line in (
        'pingu_train_fold_epoch{fold="1",run="live"} 2.0',
        'pingu_train_loss{fold="1",run="live"} -0.5',
        'pingu_train_pseudo_dice{fold="1",run="live"} 0.4',
        'pingu_train_data_wait_ratio{fold="1",run="live"} 0.125',
        'pingu_train_fold_attempts_total{fold="0",run="live"} 1.0',
        'pingu_train_folds{run="live",state="failed"} 1.0',
        'pingu_train_eta_seconds{run="live"} 8.0',
    ):
        assert line in lines, line
    assert 'run="earlier"' not in metrics  # the replaced monitor was detached

    feed.ended("finished")
    assert poll_status(url, lambda s: True)["training"]["status"] == "finished"


@pytest.mark.slow
def test_the_page_renders_a_training_alone(scheduler_page) -> None:
    """Headless Chromium: the training panel filled in, the scan panels hidden, no
    script errors (console messages go to stderr)."""
    client, page = scheduler_page
    monitor = TrainMonitor(TOKEN, "rendered", "/models/r", FOLDS)
    feed = TrainFeed(client, monitor)
    feed.send(event="stage", stage="train", done=1, total=3)
    for fold in (0, 1):
        feed.send(**started(fold))
        for number in range(1, 6):
            feed.send(**epoch(fold, number, 2.0 + fold))
    feed.send(event="fold-ended", fold=0, attempt=1, status="ok", message=None)
    result = headless(page, "--dump-dom")
    dom = result.stdout
    assert "Uncaught" not in result.stderr, result.stderr[-2000:]
    assert shown(dom, "run-id") == "rendered" and shown(dom, "run-status") == "running"
    assert shown(dom, "train-count-done") == "1" and shown(dom, "train-count-queued") == "1"
    assert shown(dom, "train-stage") == "train 1 / 3"
    assert re.search(r'<div id="scan-panels" hidden', dom)
    assert not re.search(r'<div id="training-panel" hidden', dom)
    body = re.search(r'id="folds-body">(.*?)</tbody>', dom, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
    assert len(rows) == 3 and ">done<" in rows[0] and ">training<" in rows[1]
    assert ">5 / 10<" in rows[1]
    plot = re.search(r'<svg id="dice-plot"[^>]*>(.*?)</svg>', dom, re.S).group(1)
    assert plot.count("<polyline") == 2  # fold 2 has no epoch yet
    assert shown(dom, "train-count-training") == "1"
