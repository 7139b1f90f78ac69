"""Feeding an inference slot: how many scans are in flight, and where CPU stages run.

The window of scans per slot follows the measured stage times (runner.FeedWindow), and
on a GPU machine the CPU stages get the machine's cores, as threads of the GPU worker
or as CPU-only workers beside it (cluster.LocalLayout). Checked with the real stages
around the stand-in model (scripts/benchkit/standins.py, test-only: tiny images, and
sleeps instead of inference) on real LocalClusters; the window is counted, not timed.
"""

from __future__ import annotations

import importlib
import math
import statistics
from pathlib import Path

import cloudpickle
import pytest
from benchkit import standins
from benchkit.standins import make_scans, pipeline_in
from distributed import Client

from pingu_dask.config import INFERENCE_RESOURCE
from pingu_dask.output import tables
from pingu_dask.run.capacity import FixedCapacity
from pingu_dask.run.local import LocalLayout, local_cluster
from pingu_dask.run.loop import Progress, Segmentation, segment_scans
from pingu_dask.run.policies import FeedWindow


def stage_seconds(preprocess: float, predict: float, finish: float) -> dict[str, float]:
    return {"preprocess": preprocess, "predict": predict, "finish": finish}


def test_the_window_per_slot_follows_the_stage_times() -> None:
    window = FeedWindow(maximum=16)
    assert window.per_slot() == 3  # nothing measured yet: one scan per stage
    for _ in range(5):  # a GPU: predict 1 s, a 0.5 mm head takes 4 s to preprocess
        window.observe(stage_seconds(4.0, 1.0, 2.0))
    assert window.per_slot() == 2 + 4 + 2
    assert window.per_slot(threads_per_slot=6) == 6  # no more scans than threads
    assert FeedWindow(maximum=5).per_slot() == 3
    cpu = FeedWindow(maximum=16)
    for _ in range(5):  # a CPU: the network dominates
        cpu.observe(stage_seconds(0.4, 7.0, 0.3))
    assert cpu.per_slot() == 3
    window.observe(None)  # a failed scan has no times
    window.observe({"predict": 1.0})
    assert len(window.recent) == 5


def test_the_window_follows_the_mean_of_recent_scans() -> None:
    window = FeedWindow(maximum=64)
    for _ in range(40):
        window.observe(stage_seconds(0.5, 1.0, 0.5))
    for _ in range(32):  # the cohort moves on to 0.5 mm scans
        window.observe(stage_seconds(6.0, 1.0, 3.0))
    assert window.per_slot() == 2 + 9
    for _ in range(8):  # a quarter of them at 1 mm again: mean + SD, not the median
        window.observe(stage_seconds(0.5, 1.0, 0.5))
    cpu = [9.0] * 24 + [1.0] * 8
    assert window.per_slot() == 2 + math.ceil(statistics.fmean(cpu) + statistics.pstdev(cpu))
    assert window.per_slot() == 13  # the median (9) would give 11, the mean alone 9


@pytest.mark.parametrize(
    ("gpu", "cpu_workers", "expected"),
    [
        (False, 0, LocalLayout(1, 3, 16)),  # CPU: 3 threads, the cores for torch
        (True, 0, LocalLayout(1, 17, 16)),  # GPU: a thread per core for the CPU stages + 1
        (True, 3, LocalLayout(1, 2, 1, 3, 5)),  # GPU + 3 CPU workers sharing 15 cores
    ],
)
def test_a_gpu_machine_gives_its_cores_to_the_cpu_stages(
    gpu: bool, cpu_workers: int, expected: LocalLayout
) -> None:
    layout = LocalLayout.for_machine(1, gpu=gpu, cpu_workers=cpu_workers, cores=16)
    assert layout == expected
    assert LocalLayout.for_machine(2, gpu=True, cores=16).threads_per_inference_worker == 9
    assert LocalLayout.for_machine(2, gpu=True, cores=2).threads_per_inference_worker == 4
    assert LocalLayout(1, 2, 1, 3, 5).threads_per_slot == 17


@pytest.mark.slow  # seconds of real processes: the full suite runs it
def test_slow_cpu_stages_get_more_scans_in_flight(tmp_path: Path) -> None:
    """Predict 0.1 s, preprocess 0.5 s: a window of 3 would leave the slot idle 4/5 of
    the time; the runner raises it to 2 + ceil((0.5 + finish) / 0.1) >= 7 once times
    are known (the real finish writes a mask: a few hundredths of a second more)."""
    cloudpickle.register_pickle_by_value(standins)
    (tmp_path / "sleep").write_text("0.1")
    (tmp_path / "preprocess-sleep").write_text("0.5")
    layout = LocalLayout.for_machine(1, gpu=True, cores=8)  # 9 threads (sleeps: no CPU)
    in_flight: list[int] = []

    def seen(progress: Progress) -> None:
        in_flight.append(progress.in_flight)

    with (
        local_cluster(layout=layout, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        # torch imported beforehand (the predict stage sets its threads): else the first
        # predict takes seconds, and the mean predict time of 20 scans, which the window
        # divides by, would keep the window below 7 all run.
        client.run(importlib.import_module, "torch")
        records = segment_scans(
            client,
            Segmentation(
                scans=make_scans(20, tmp_path),
                pipeline=pipeline_in(tmp_path),
                watch=False,
                on_progress=seen,
                capacity=FixedCapacity(1, layout.threads_per_slot),
            ),
        )
    assert len(records) == 20 and all(r.status == "ok" for r in records)
    # Sleeps measure a little longer than they are (0.5 / 0.1 may read 5.x), the real
    # finish adds its time: 7 to the slot's 9 threads.
    assert 7 <= max(in_flight) <= layout.threads_per_slot


@pytest.mark.slow  # seconds of real processes: the full suite runs it
def test_cpu_workers_beside_a_gpu_worker_take_only_cpu_stages(tmp_path: Path) -> None:
    cloudpickle.register_pickle_by_value(standins)
    (tmp_path / "preprocess-sleep").write_text("0.2")
    (tmp_path / "finish-sleep").write_text("0.2")
    layout = LocalLayout.for_machine(1, gpu=True, cpu_workers=2, cores=4)
    with (
        local_cluster(layout=layout, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(3)
        info = client.scheduler_info(n_workers=-1)["workers"]
        slotted = {a for a, w in info.items() if w["resources"].get(INFERENCE_RESOURCE)}
        assert len(info) == 3 and len(slotted) == 1
        pipeline = pipeline_in(tmp_path)
        records = segment_scans(
            client,
            Segmentation(
                scans=make_scans(12, tmp_path),
                pipeline=pipeline,
                watch=False,
                capacity=FixedCapacity(1, layout.threads_per_slot),
            ),
        )
    assert len(records) == 12
    assert {r.workers["predict"] for r in records} == slotted
    cpu_stage_workers = {r.workers[s] for r in records for s in ("preprocess", "finish")}
    assert cpu_stage_workers - slotted  # the CPU-only workers did take CPU stages
    assert set(tables.read_table(pipeline.out, "ledger").status) == {"ok"}
