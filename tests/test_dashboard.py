"""The run page (/pingu), its JSON (/pingu/status.json) and the pingu_* metrics.

First the monitor's arithmetic on made-up transitions with a fake clock (exact values),
then a real run: the bundled demo model on a LocalCluster of worker processes, with one
known bad scan (NaN voxels) and one injected transient I/O error (a test-only subclass of
the real model whose preparation fails one scan's first attempt). While it runs,
headless Chromium renders the page; afterwards the JSON and /metrics are checked
against the ledger.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import cloudpickle
import pytest
from benchkit import standins
from distributed import Client
from helpers import absolute_manifest, headless, shown, with_nan_scan
from prometheus_client import CollectorRegistry, generate_latest

from pingu_dask.analysis.regions import ASEG
from pingu_dask.config import InferenceSettings, PvsClusterRules
from pingu_dask.inputs.manifest import load_manifest
from pingu_dask.monitor import http, plugin, prometheus
from pingu_dask.nnunet.case import PreparedCase
from pingu_dask.nnunet.engine import NnUNetModel
from pingu_dask.nnunet.model import resolve_model
from pingu_dask.output import tables
from pingu_dask.records import ScanImages
from pingu_dask.run import stages
from pingu_dask.run.jobs import JobOptions, jobqueue_cluster
from pingu_dask.run.local import local_cluster
from pingu_dask.run.loop import Segmentation, segment_scans
from pingu_dask.synth.cohort import generate_cohort

FAST = InferenceSettings(tta=False, step_size=1.0, device="cpu", torch_threads=1)
TOKEN = "t0k3n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(stage: str, index: int, attempt: int = 1) -> tuple:
    return (f"{stage}-{TOKEN}", index, attempt)


def run_stage(monitor, stage: str, index: int, seconds: float, worker: str, clock) -> None:
    """The transitions the scheduler reports for one task that runs and ends."""
    monitor.transition(key(stage, index), "waiting", "processing", stimulus_id="s")
    start = clock.now
    clock.now += seconds
    startstops = ({"action": "compute", "start": start, "stop": clock.now},)
    monitor.transition(
        key(stage, index),
        "processing",
        "memory",
        stimulus_id="s",
        worker=worker,
        startstops=startstops,
    )


def test_monitor_counts_states_times_throughput_and_workers() -> None:
    clock = FakeClock()
    monitor = plugin.RunMonitor(TOKEN, "run1", total=5, done_before=3, window_seconds=60.0,
                                   clock=clock)  # fmt: skip
    monitor.transition("some-other-key", "waiting", "processing", stimulus_id="s")
    monitor.transition(("predict-othertoken", 0, 1), "waiting", "processing", stimulus_id="s")
    assert monitor.snapshot()["counts"]["queued"] == 5

    run_stage(monitor, "preprocess", 0, 2.0, "tcp://w1", clock)
    monitor.transition(key("predict", 0), "waiting", "processing", stimulus_id="s")
    monitor.transition(key("preprocess", 1), "waiting", "processing", stimulus_id="s")
    counts = monitor.snapshot()["counts"]
    assert (counts["predicting"], counts["preprocessing"], counts["queued"]) == (1, 1, 3)
    assert counts["in_flight"] == 2
    clock.now += 3.0
    monitor.transition(
        key("predict", 0), "processing", "memory", stimulus_id="s", worker="tcp://w1",
        startstops=({"action": "compute", "start": clock.now - 3.0, "stop": clock.now},),
    )  # fmt: skip
    run_stage(monitor, "finish", 0, 1.0, "tcp://w2", clock)
    # scan 1: its preprocess fails (erred) and the driver retries it, then fails it for good
    monitor.transition(key("preprocess", 1), "processing", "erred", stimulus_id="s")
    assert monitor.snapshot()["counts"]["queued"] == 4
    failure = {"scan_id": "sub-b", "error_type": "OSError", "message": "x", "attempt": 1}
    monitor.log_event("pingu", {"token": TOKEN, "event": "retry", "index": 1, **failure})
    monitor.log_event("pingu", {"token": "another", "event": "failed", "index": 1, **failure})
    failure["attempt"] = 2
    monitor.log_event("pingu", {"token": TOKEN, "event": "failed", "index": 1, **failure})
    # a late transition of a scan that has ended changes nothing
    monitor.transition(key("preprocess", 1, 2), "waiting", "processing", stimulus_id="s")
    for index in (2, 3):
        for stage, seconds in (("preprocess", 1.0), ("predict", 5.0), ("finish", 0.5)):
            run_stage(monitor, stage, index, seconds, "tcp://w1", clock)

    snapshot = monitor.snapshot()
    counts = snapshot["counts"]
    assert {k: counts[k] for k in ("done", "failed", "retried", "queued", "in_flight")} == {
        "done": 3,
        "failed": 1,
        "retried": 1,
        "queued": 1,
        "in_flight": 0,
    }
    assert counts["remaining"] == 1
    assert snapshot["run"]["done_before"] == 3
    assert snapshot["stages"]["predict"] == {"count": 3, "mean_s": pytest.approx(13 / 3),
                                             "max_s": 5.0}  # fmt: skip
    assert snapshot["stages"]["preprocess"]["count"] == 3
    # 4 scans ended within the 60 s window, 19 s after the start: 4 / 19 s = 12.6/min
    elapsed = clock.now - 1000.0
    assert elapsed == pytest.approx(19.0)
    assert snapshot["throughput"]["scans_per_minute"] == pytest.approx(4 / elapsed * 60)
    assert snapshot["throughput"]["eta_s"] == pytest.approx(1 / (4 / elapsed))
    workers = {row["worker"]: row for row in snapshot["workers"]}
    assert workers["tcp://w1"]["predicted"] == 3 and workers["tcp://w2"]["finished"] == 1
    assert workers["tcp://w1"]["busy"] == pytest.approx(13.0 / elapsed)
    assert [f["final"] for f in snapshot["failures"]] == [True, False]
    assert snapshot["failures"][0]["attempt"] == 2
    json.dumps(snapshot)  # JSON-ready

    # The window slides: two minutes later nothing ended recently.
    clock.now += 120.0
    later = monitor.snapshot()
    assert later["throughput"]["scans_per_minute"] == 0.0 and later["throughput"]["eta_s"] is None
    assert later["workers"][0]["busy"] == 0.0
    monitor.log_event("pingu", {"token": TOKEN, "event": "ended", "status": "finished"})
    assert monitor.snapshot()["run"]["status"] == "finished"


def test_a_predict_waiting_for_its_workers_slot_is_not_counted_as_predicting() -> None:
    # The scheduler hands resource-bound tasks to a worker at once; the worker holds
    # them until its one inference slot is free.
    clock = FakeClock()
    monitor = plugin.RunMonitor(TOKEN, "run2", total=2, window_seconds=60.0, clock=clock)
    for index in (0, 1):
        run_stage(monitor, "preprocess", index, 1.0, "tcp://w1", clock)
        monitor.transition(key("predict", index), "waiting", "processing", stimulus_id="s")
    counts = monitor.snapshot()["counts"]
    assert (counts["predicting"], counts["waiting"], counts["in_flight"]) == (1, 1, 2)
    monitor.transition(key("predict", 0), "processing", "memory", stimulus_id="s")
    counts = monitor.snapshot()["counts"]
    assert (counts["predicting"], counts["waiting"], counts["finishing"]) == (1, 0, 1)


def test_metrics_text_has_counters_gauges_and_stage_histograms() -> None:
    clock = FakeClock()
    monitor = plugin.RunMonitor(TOKEN, "runA", total=2, window_seconds=60.0, clock=clock)
    for index, predict_seconds in ((0, 0.3), (1, 7.0)):
        for stage, seconds in (("preprocess", 1.0), ("predict", predict_seconds), ("finish", 2.0)):
            run_stage(monitor, stage, index, seconds, "tcp://w1", clock)
    registry = CollectorRegistry()
    collector = prometheus.MetricsCollector()
    collector.monitors.append(monitor)
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'pingu_scans_done_total{run="runA"} 2.0' in text
    assert 'pingu_scans_failed_total{run="runA"} 0.0' in text
    assert 'pingu_scans_in_flight{run="runA"} 0.0' in text
    assert 'pingu_scans{run="runA",state="done"} 2.0' in text
    assert 'pingu_stage_duration_seconds_bucket{le="0.5",run="runA",stage="predict"} 1.0' in text
    assert 'pingu_stage_duration_seconds_bucket{le="5.0",run="runA",stage="predict"} 1.0' in text
    assert 'pingu_stage_duration_seconds_bucket{le="10.0",run="runA",stage="predict"} 2.0' in text
    assert 'pingu_stage_duration_seconds_count{run="runA",stage="predict"} 2.0' in text
    total = re.search(r'pingu_stage_duration_seconds_sum\{run="runA",stage="predict"\} (\S+)', text)
    assert float(total.group(1)) == pytest.approx(7.3)
    assert 'pingu_worker_scans_predicted_total{run="runA",worker="tcp://w1"} 2.0' in text
    assert 'pingu_eta_seconds{run="runA"} 0.0' in text


def test_history_is_thinned_not_grown_without_bound() -> None:
    clock = FakeClock()
    total = plugin.HISTORY_POINTS * 3
    monitor = plugin.RunMonitor(TOKEN, "long", total=total, window_seconds=60.0, clock=clock)
    for index in range(total):
        clock.now += plugin.HISTORY_FIRST_INTERVAL
        monitor.log_event("pingu", {"token": TOKEN, "event": "failed", "index": index})
    history = monitor.snapshot()["history"]
    assert len(history) <= plugin.HISTORY_POINTS + 1
    assert monitor.history_interval >= 4 * plugin.HISTORY_FIRST_INTERVAL
    times = [t for t, *_ in history]
    assert times == sorted(times) and history[-1][2] == total


def test_the_web_server_binds_to_localhost_by_default() -> None:
    with local_cluster(n_workers=1, threads_per_worker=1) as cluster, Client(cluster) as client:
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
    slurm = jobqueue_cluster("slurm", JobOptions())
    try:
        assert slurm.scheduler_spec["options"]["dashboard_address"] == "127.0.0.1:8787"
    finally:
        slurm.close()


# -- a real run, watched -------------------------------------------------------------------


@dataclass(frozen=True)
class FailingOnceModel(NnUNetModel):
    """Test-only fault injection behind the model seam: the real model, but preparing the
    scan whose image is `flaky` fails its first attempt with an I/O error (in the real
    preprocess stage, after its reads and checks). The first attempt makes `marker`
    (atomically, O_EXCL), so only one attempt fails whichever worker runs the retry."""

    flaky: Path = Path()
    marker: Path = Path()

    def prepare(self, scan: ScanImages, inference: InferenceSettings) -> PreparedCase:
        if Path(scan.paths[0]) == self.flaky and standins.first_time(self.marker):
            raise OSError(f"injected I/O error reading {self.flaky.name}")
        return super().prepare(scan, inference)


class PagePoller(threading.Thread):
    """Renders the page again and again while the run goes on."""

    def __init__(self, url: str, screenshot: Path) -> None:
        super().__init__(daemon=True)
        self.url, self.screenshot = url, screenshot
        self.doms: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            dom = headless(self.url, "--dump-dom").stdout
            self.doms.append(dom)
            done = shown(dom, "count-done")
            if not self.screenshot.exists() and done and done.isdigit() and int(done) >= 3:
                headless(self.url, f"--screenshot={self.screenshot}", "--window-size=1280,1100")
            time.sleep(0.5)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("watched")
    generate_cohort(root / "cohort", n_scans=7, seed=21, jobs=2)
    manifest = absolute_manifest(root / "cohort", root / "good.csv")
    with_nan_scan(manifest, "nan_voxels", root, at=1).to_csv(root / "manifest.csv", index=False)
    scans = load_manifest(root / "manifest.csv", ("t1w",)).scans
    flaky = scans[0].channel("t1w")
    model = FailingOnceModel(resolve_model("demo"), flaky=flaky, marker=root / "flaky-attempted")
    pipeline = stages.Pipeline(model, FAST, root / "out", PvsClusterRules(), ASEG,
                               write_nifti=False)  # fmt: skip
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the model's class
    cloudpickle.register_pickle_by_value(standins)  # first_time, which the model calls
    screenshot = root / "pingu-dashboard.png"
    with (
        local_cluster(n_workers=2, threads_per_worker=2, torch_threads=1,
                      dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        page = http.page_link(client.dashboard_link)
        poller = PagePoller(page, screenshot)
        poller.start()
        try:
            records = segment_scans(
                client,
                Segmentation(
                    scans=scans,
                    pipeline=pipeline,
                    run_id="watched",
                    done_before=0,
                    window=3,
                ),
            )
        finally:
            poller.stop.set()
            poller.join()
        final_dom = headless(page, "--dump-dom").stdout
        final_png = root / "pingu-dashboard-final.png"
        headless(page, f"--screenshot={final_png}", "--window-size=1280,1100")
        status = json.loads(get(page + "/status.json"))
        metrics = get(page.removesuffix("/pingu") + "/metrics").decode()
    yield {
        "root": root,
        "scans": scans,
        "records": records,
        "doms": poller.doms,
        "final_dom": final_dom,
        "status": status,
        "metrics": metrics,
        "screenshot": screenshot,
        "ledger": tables.read_table(pipeline.out, "ledger"),
    }


@pytest.mark.slow
def test_status_json_at_the_end_matches_the_ledger(watched_run) -> None:
    status, ledger = watched_run["status"], watched_run["ledger"]
    assert sum(r.ok for r in watched_run["records"]) == 7
    assert (ledger.status == "ok").sum() == 7 and (ledger.status == "failed").sum() == 2
    counts = status["counts"]
    assert {k: counts[k] for k in ("done", "failed", "retried", "in_flight", "queued")} == {
        "done": 7,
        "failed": 1,
        "retried": 1,
        "in_flight": 0,
        "queued": 0,
    }
    assert status["run"] | {"started": None, "elapsed_s": None} == {
        "run_id": "watched",
        "out": str(watched_run["root"] / "out"),
        "model": resolve_model("demo").name,
        "to_do": 8,
        "done_before": 0,
        "started": None,
        "elapsed_s": None,
        "status": "finished",
    }
    for stage in plugin.STAGES:
        assert status["stages"][stage]["count"] == 7  # the failed attempts never finished
    ledger_predict = ledger.query("status == 'ok'").seconds_predict
    assert status["stages"]["predict"]["max_s"] >= ledger_predict.max() * 0.9
    assert sum(w["predicted"] for w in status["workers"]) == 7
    assert len(status["workers"]) == 2
    failures = {(f["scan_id"], f["final"]): f for f in status["failures"]}
    flaky = watched_run["scans"][0].scan_id
    assert set(failures) == {("nan_voxels", True), (flaky, False)}
    assert "NaN" in failures[("nan_voxels", True)]["message"]
    assert failures[(flaky, False)]["error_type"] == "OSError"
    assert status["throughput"]["eta_s"] == 0.0 and status["throughput"]["scans_per_minute"] > 0


@pytest.mark.slow
def test_metrics_at_the_end_match(watched_run) -> None:
    lines = set(watched_run["metrics"].splitlines())
    for line in (
        'pingu_scans_done_total{run="watched"} 7.0',
        'pingu_scans_failed_total{run="watched"} 1.0',
        'pingu_scans_retried_total{run="watched"} 1.0',
        'pingu_scans_in_flight{run="watched"} 0.0',
        'pingu_scans_remaining{run="watched"} 0.0',
        'pingu_stage_duration_seconds_count{run="watched",stage="predict"} 7.0',
        'pingu_stage_duration_seconds_bucket{le="+Inf",run="watched",stage="finish"} 7.0',
    ):
        assert line in lines, line
    predicted = [
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith('pingu_worker_scans_predicted_total{run="watched"')
    ]
    assert sum(predicted) == 7.0 and len(predicted) == 2
    assert "dask_scheduler_workers" in watched_run["metrics"]  # Dask's own are still there


@pytest.mark.slow
def test_the_rendered_page_shows_the_done_count_rising_and_the_bad_scan(watched_run) -> None:
    during = []
    for dom in watched_run["doms"]:
        done, state = shown(dom, "count-done"), shown(dom, "run-status")
        if state == "running" and done and done.isdigit():
            during.append(int(done))
    assert during == sorted(during), during
    predicting = [int(shown(dom, "count-predicting") or 0) for dom in watched_run["doms"]]
    assert max(predicting) <= 2, "more predicting than the 2 workers' inference slots"
    assert len(set(during)) >= 2, f"the page showed no progress while running: {during}"
    final = watched_run["final_dom"]
    assert shown(final, "count-done") == "7" and shown(final, "count-failed") == "1"
    assert shown(final, "count-retried") == "1" and shown(final, "run-status") == "finished"
    failures = re.search(r'id="failures-body">(.*?)</tbody>', final, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", failures, re.S)
    bad = [row for row in rows if "<td>nan_voxels</td>" in row]
    assert len(bad) == 1 and "NaN" in bad[0] and ">failed<" in bad[0]
    workers = re.search(r'id="workers-body">(.*?)</tbody>', final, re.S).group(1)
    assert workers.count("<tr>") == 2
    screenshot = watched_run["screenshot"]
    assert screenshot.exists() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
