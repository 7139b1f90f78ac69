"""Benchmark: does the CPU side keep an inference slot busy? (GPU stand-in)

No GPU here, so predict is replaced by a **GPU stand-in (a sleep, not a model)**: it
holds the inference slot for `--predict-seconds` and hands finish a fixed label map
(2x2x2 blobs on a 16-voxel lattice of the head, ~1,000 clusters). Preprocess and
finish are the real stages on real heads (Colin27 and MNI152 on the grids of
benchkit.anatomy, in turn), with a real model's plans (default: the PINGU-sized
model, 0.8 mm, so every scan is resampled; on a GPU machine preprocess would leave that
to the device, so the CPU side here is heavier than there). Real LocalClusters, laid
out for a GPU machine (cluster.LocalLayout): the CPU stages on threads of the slot's
worker, or on CPU-only workers beside it.

Figures per run: scans/min; the slots' occupancy (stand-in seconds / (slots x time))
over the whole run and between the first predict's start and the last one's end (the
fill and drain of the pipeline left out); the workers' CPU use; and which side limits:
the slots (slots / predict seconds scans/s) or the CPU (cores / core-seconds per scan).
Run:

    .venv/bin/python scripts/bench_feed.py [--scans 16] [--workers 1 2]
        [--predict-seconds 4 0.3] [--modes threads cpu-workers]
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchkit.anatomy import KINDS, real_scans
from benchkit.benchdoc import git_revision, machine, write_section

from pingu_dask.config import InferenceSettings, available_cores
from pingu_dask.inputs.manifest import Scan
from pingu_dask.nnunet.engine import NnUNetModel
from pingu_dask.nnunet.model import resolve_model
from pingu_dask.run.stages import Pipeline, Predicted, Preprocessed, stage

SCRIPTS = Path(__file__).resolve().parent


@stage("predict")
def sleeping_predict(item: Preprocessed, pipeline: Pipeline, seconds: float) -> Predicted:
    """GPU stand-in, not a model: holds the slot `seconds`, returns fixed blobs."""
    from distributed import get_worker

    started = time.time()
    time.sleep(seconds)
    geometry = item.case.geometry
    labels = np.zeros(geometry.cropped_shape, dtype=np.uint8)
    for offset in range(2):
        labels[offset::16, offset::16, offset::16] = 1
        labels[offset::16, offset::16, 1 - offset :: 16] = 1
    times = {"preprocess": item.seconds, "predict": time.time() - started}
    times.update(predict_started=started, predict_ended=time.time())
    workers = {"preprocess": item.worker, "predict": get_worker().address}
    return Predicted(item.scan_id, labels, geometry, item.source, times, workers)


def worker_cpu_seconds(client) -> float:
    """User + system seconds of every worker process so far."""
    import os

    def cpu() -> float:
        times = os.times()
        return times.user + times.system

    return float(sum(client.run(cpu).values()))


def run_once(scans: list[Scan], model, workers: int, mode: str, seconds: float, out: Path):
    import cloudpickle
    from distributed import Client

    from pingu_dask.run.capacity import FixedCapacity
    from pingu_dask.run.local import LocalLayout, local_cluster
    from pingu_dask.run.loop import Segmentation, StageFunctions, segment_scans
    from pingu_dask.run.stages import finish, preprocess

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cpu_workers = workers if mode == "cpu-workers" else 0
    layout = LocalLayout.for_machine(workers, gpu=True, cpu_workers=cpu_workers)
    functions = StageFunctions(
        preprocess, functools.partial(sleeping_predict, seconds=seconds), finish
    )
    settings = InferenceSettings(tta=False, device="cpu")
    pipeline = Pipeline(NnUNetModel(model), settings, out, write_nifti=False)
    capacity = FixedCapacity(workers, layout.threads_per_slot)
    with (
        local_cluster(layout=layout, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers + cpu_workers)
        cpu_before, started = worker_cpu_seconds(client), time.perf_counter()
        records = segment_scans(
            client,
            Segmentation(
                scans=scans, pipeline=pipeline, stages=functions, watch=False, capacity=capacity
            ),
        )
        wall = time.perf_counter() - started
        cpu = worker_cpu_seconds(client) - cpu_before
    assert all(r.status == "ok" for r in records), records
    busy = sum(r.seconds["predict"] for r in records)
    first = min(r.seconds["predict_started"] for r in records)
    last = max(r.seconds["predict_ended"] for r in records)
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
        f"Predict is a **GPU stand-in (a sleep, not a model)**; preprocess and finish are real,"
        f" on {args.scans} real heads ({', '.join(kinds)} in turn), model plans "
        f"`{model.name}`; each scan resampled on the CPU in preprocess (a GPU worker leaves "
        "that to the device). `threads`: the CPU stages on the slot worker's threads (a "
        "thread per core + 1); `cpu-workers`: one CPU-only worker per slot beside it.",
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
