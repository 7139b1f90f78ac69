"""Benchmark: does the CPU side keep an inference slot busy? (GPU stand-in)

No GPU here, so the network is replaced by a **GPU stand-in (a sleep, not a model)**:
SleepingModel, a real nnU-Net model behind the model seam whose predict holds the
inference slot for `--predict-seconds` and returns a fixed label map (2x2x2 blobs on a
16-voxel lattice of the head, ~1,000 clusters) instead of running the network. The
three stages are the real ones, on real heads (Colin27 and MNI152 on the grids of
benchkit.anatomy, in turn), and so are the model's preparation (nnU-Net's
preprocessing) and restore, with a real model's plans (default: the PINGU-sized model,
0.8 mm, so every scan is resampled; on a GPU machine preprocess would leave that to the
device, so the CPU side here is heavier than there). Real LocalClusters, laid out for
a GPU machine (cluster.LocalLayout): the CPU stages on threads of the slot's worker,
or on CPU-only workers beside it.

Figures per run: scans/min; the slots' occupancy (predict seconds / (slots x time))
over the whole run and between the first predict task's start and the last one's end
(Dask's task stream; the fill and drain of the pipeline left out); the workers' CPU
use; and which side limits: the slots (slots / predict seconds scans/s) or the CPU
(cores / core-seconds per scan).
Run:

    .venv/bin/python scripts/bench_feed.py [--scans 16] [--workers 1 2]
        [--predict-seconds 4 0.3] [--modes threads cpu-workers]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from benchkit.anatomy import KINDS, real_scans
from benchkit.benchdoc import git_revision, machine, write_section

from pingu_dask.config import InferenceSettings, available_cores
from pingu_dask.inputs.manifest import Scan
from pingu_dask.nnunet.engine import NnUNetModel
from pingu_dask.nnunet.model import resolve_model
from pingu_dask.run.stages import Pipeline

SCRIPTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class SleepingModel(NnUNetModel):
    """GPU stand-in, not a model: nnU-Net's prepare and restore (the CPU side), but
    predict holds the slot `seconds` and returns fixed blobs instead of the network's
    label map (no checkpoint is loaded)."""

    seconds: float = 0.0

    def predict(self, prepared: Any, inference: InferenceSettings, slot: int) -> np.ndarray:
        time.sleep(self.seconds)
        labels = np.zeros(prepared.geometry.cropped_shape, dtype=np.uint8)
        for offset in range(2):
            labels[offset::16, offset::16, offset::16] = 1
            labels[offset::16, offset::16, 1 - offset :: 16] = 1
        return labels


def predict_span(task_stream: list[dict]) -> tuple[float, float]:
    """The first predict task's start and the last one's end (Dask's task stream: task
    keys are (f"{stage}-{token}", index, attempt))."""
    spans = [
        (startstop["start"], startstop["stop"])
        for task in task_stream
        if isinstance(task["key"], tuple) and str(task["key"][0]).startswith("predict-")
        for startstop in task["startstops"]
        if startstop["action"] == "compute"
    ]
    return min(start for start, _ in spans), max(stop for _, stop in spans)


def worker_cpu_seconds(client) -> float:
    """User + system seconds of every worker process so far."""
    import os

    def cpu() -> float:
        times = os.times()
        return times.user + times.system

    return float(sum(client.run(cpu).values()))


def run_once(scans: list[Scan], model, workers: int, mode: str, seconds: float, out: Path):
    import cloudpickle
    from distributed import Client, get_task_stream

    from pingu_dask.run.capacity import FixedCapacity
    from pingu_dask.run.local import LocalLayout, local_cluster
    from pingu_dask.run.loop import Segmentation, segment_scans

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cpu_workers = workers if mode == "cpu-workers" else 0
    layout = LocalLayout.for_machine(workers, gpu=True, cpu_workers=cpu_workers)
    settings = InferenceSettings(tta=False, device="cpu")
    pipeline = Pipeline(SleepingModel(model, seconds), settings, out, write_nifti=False)
    capacity = FixedCapacity(workers, layout.threads_per_slot)
    with (
        local_cluster(layout=layout, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers + cpu_workers)
        cpu_before, started = worker_cpu_seconds(client), time.perf_counter()
        job = Segmentation(scans=scans, pipeline=pipeline, watch=False, capacity=capacity)
        with get_task_stream(client) as stream:
            records = segment_scans(client, job)
        wall = time.perf_counter() - started
        cpu = worker_cpu_seconds(client) - cpu_before
    assert all(r.status == "ok" for r in records), records
    busy = sum(r.seconds["predict"] for r in records)
    first, last = predict_span(stream.data)
    return {
        "layout": layout,
        "scans_per_min": len(scans) / wall * 60,
        "busy_run": busy / (workers * wall),
        "busy_steady": busy / (workers * (last - first)),
        "cpu_busy": cpu / (wall * available_cores()),
        "core_s_per_scan": cpu / len(scans),
        "preprocess": float(np.median([r.seconds["preprocess"] for r in records])),
        "finish": float(np.median([r.seconds["finish"] for r in records])),
    }


def limiting_side(result: dict, workers: int, seconds: float) -> str:
    slots = workers / seconds
    cpu = available_cores() / max(result["core_s_per_scan"], 1e-9)
    side = "CPU" if cpu < slots else "slots (GPU stand-in)"
    return f"{side}: slots {slots * 60:.1f}, CPU {cpu * 60:.1f} scans/min"


def model_for(name: str, cache: Path, scans: dict[str, Path]):
    if name == "demo":
        return resolve_model("demo")
    folders = sorted((cache / "models").glob("Dataset902_*/*__3d_fullres"))
    if not folders:
        command = [sys.executable, str(SCRIPTS / "make_bench_model.py"), str(cache / "models"),
                   "--calibrate-on", str(next(iter(scans.values())))]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        folders = sorted((cache / "models").glob("Dataset902_*/*__3d_fullres"))
    return resolve_model(folders[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--predict-seconds", type=float, nargs="+", default=[4.0, 0.3])
    parser.add_argument("--modes", nargs="+", default=["threads", "cpu-workers"])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--model", default="pingu", help="pingu (0.8 mm plans) or demo")
    args = parser.parse_args()

    cache = Path.home() / ".cache" / "pingu-dask" / "bench"
    files = real_scans(cache / "scans", args.kinds.split(","))
    model = model_for(args.model, cache, files)
    kinds = list(files)
    scans = [
        Scan(f"{kinds[i % len(kinds)]}-{i:03d}", (("t1w", files[kinds[i % len(kinds)]]),))
        for i in range(args.scans)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for workers in args.workers:
            for mode in args.modes:
                for seconds in args.predict_seconds:
                    out = Path(scratch) / f"{workers}-{mode}-{seconds}"
                    result = run_once(scans, model, workers, mode, seconds, out)
                    rows.append((workers, mode, seconds, result))
                    print(workers, mode, seconds, {k: v for k, v in result.items()})
    lines = [
        "## Feeding the inference slot: GPU stand-in (scripts/bench_feed.py)",
        "",
        f"Machine: {machine()}. Commit {git_revision()}.",
        f"Command: `.venv/bin/python scripts/bench_feed.py --scans {args.scans} --workers "
        f"{' '.join(map(str, args.workers))} --predict-seconds "
        f"{' '.join(map(str, args.predict_seconds))} --modes {' '.join(args.modes)} "
        f"--model {args.model}`.",
        "The network is a **GPU stand-in (a sleep, not a model)** behind the real stages: "
        "predict holds the slot, then returns fixed blobs; the real preprocess and finish, "
        f"with nnU-Net's preparation and restore, on {args.scans} real heads "
        f"({', '.join(kinds)} in turn), model plans `{model.name}`; each scan resampled on "
        "the CPU in preprocess (a GPU worker leaves that to the device). `threads`: the CPU "
        "stages on the slot worker's threads (a thread per core + 1); `cpu-workers`: one "
        "CPU-only worker per slot beside it.",
        "",
        "| slots | CPU stages on | stand-in s | layout (threads; CPU workers x threads) | "
        "scans/min | slots busy (run) | slots busy (first to last predict) | CPU busy | "
        "core-s per scan | median preprocess / finish s | limiting side |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for workers, mode, seconds, r in rows:
        layout = r["layout"]
        shape = f"{layout.threads_per_inference_worker}; {layout.cpu_workers} x "
        shape += f"{layout.threads_per_cpu_worker}" if layout.cpu_workers else "-"
        lines.append(
            f"| {workers} | {mode} | {seconds:g} | {shape} | {r['scans_per_min']:.1f} | "
            f"{r['busy_run']:.0%} | **{r['busy_steady']:.0%}** | {r['cpu_busy']:.0%} | "
            f"{r['core_s_per_scan']:.2f} | {r['preprocess']:.2f} / {r['finish']:.2f} | "
            f"{limiting_side(r, workers, seconds)} |"
        )
    text = "\n".join(lines)
    print(text)
    print(f"written to {write_section('bench_feed', text)}")


if __name__ == "__main__":
    main()
