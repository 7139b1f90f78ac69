"""Stand-in stages for the runner's tests and benchmarks: **not a model**.

They do no imaging: `preprocess` and `predict` pass the scan id on, `finish` returns a
real record with a real regions row (as the nnU-Net stages do), so the runner's window,
retries, time limits, circuit breaker and Parquet flushes run for real, on a real
LocalCluster, in seconds. Behaviour is steered by files in the folder above the
pipeline's OUT (the test or benchmark writes them), so the stand-ins stay plain
picklable functions. `STAGES` is what Segmentation.stages takes. The one set of
stand-ins: tests (pytest's pythonpath has scripts/) and benchmarks (bench_scale,
bench_dashboard) import this module; tests ship it to the workers by value
(cloudpickle.register_pickle_by_value).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import cloudpickle
import numpy as np
from distributed import Client

from pingu_dask.config import InferenceSettings
from pingu_dask.errors import ModelError
from pingu_dask.inputs.manifest import Scan, input_fingerprint, scan_columns
from pingu_dask.nnunet.engine import nnunet_model
from pingu_dask.output import masks, tables
from pingu_dask.records import ScanCounts, ScanResult
from pingu_dask.run.local import local_cluster
from pingu_dask.run.loop import StageFunctions
from pingu_dask.run.stages import Pipeline, stage


def _control(pipeline: Pipeline, name: str) -> Path:
    return Path(pipeline.out).parent / name


def _listed(pipeline: Pipeline, name: str, scan_id: str) -> bool:
    path = _control(pipeline, name)
    return path.exists() and scan_id in path.read_text().split()


def _first_attempt(pipeline: Pipeline, what: str, scan_id: str) -> bool:
    """True once per (what, scan): the marker is made atomically (O_EXCL)."""
    marker = _control(pipeline, f".{what}-{scan_id}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _worker() -> str:
    from distributed import get_worker

    return get_worker().address


def _sleep(pipeline: Pipeline, name: str) -> None:
    if _control(pipeline, name).exists():
        time.sleep(float(_control(pipeline, name).read_text()))


@stage("preprocess")
def preprocess(scan: Scan, pipeline: Pipeline) -> dict:
    """`preprocess-sleep`: seconds per scan."""
    started = time.perf_counter()
    _sleep(pipeline, "preprocess-sleep")
    return {"scan_id": scan.scan_id, "seconds": time.perf_counter() - started, "worker": _worker()}


@stage("predict")
def predict(item: dict, pipeline: Pipeline) -> dict:
    """Steered by control files: `sleep` (seconds per scan), `broken-model` (every scan
    fails as a checkpoint that cannot load would), `io-once` (listed scans fail their
    first attempt with an I/O error), `type-error` (listed scans: a programming error),
    `hang-once` (listed scans hang on their first attempt: a stand-in for a stuck read)."""
    started = time.perf_counter()
    scan_id = item["scan_id"]
    if _control(pipeline, "broken-model").exists():
        raise ModelError("cannot load the checkpoint fold_0/checkpoint_final.pth: bad zip")
    if _listed(pipeline, "io-once", scan_id) and _first_attempt(pipeline, "io", scan_id):
        raise OSError(f"injected I/O error reading {scan_id}")
    if _listed(pipeline, "type-error", scan_id):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
    if _listed(pipeline, "hang-once", scan_id) and _first_attempt(pipeline, "hang", scan_id):
        time.sleep(300)
    _sleep(pipeline, "sleep")
    seconds = {"preprocess": item["seconds"], "predict": time.perf_counter() - started}
    workers = {"preprocess": item["worker"], "predict": _worker()}
    return {"scan_id": scan_id, "seconds": seconds, "workers": workers}


@stage("finish")
def finish(predicted: dict, scan: Scan, pipeline: Pipeline, nifti_name: str | None) -> ScanResult:
    """`hold`: listed scans wait (up to 60 s) until the file `release` exists;
    `finish-sleep`: seconds per scan; `masks`: write a tiny mask group with the
    fingerprints a resume checks (the scan's input file must exist)."""
    started = time.perf_counter()
    _sleep(pipeline, "finish-sleep")
    if _listed(pipeline, "hold", scan.scan_id):
        deadline = time.monotonic() + 60
        while not _control(pipeline, "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    fingerprint = None
    if _control(pipeline, "masks").exists():  # a real (tiny) mask, as resume checks for
        fingerprint = input_fingerprint(scan)
        attrs = {"pipeline_fingerprint": pipeline.fingerprint(), "input_fingerprint": fingerprint}
        masks.write_mask(
            pipeline.out, scan.scan_id, np.zeros((4, 4, 4), np.uint8), np.eye(4), attrs
        )
    row = {**scan_columns(scan), "region": "whole_brain", "n_clusters": 0, "n_voxels": 0}
    return ScanResult.counted(
        scan.scan_id,
        ScanCounts(n_clusters=0, n_voxels=0, volume_mm3=0.0),
        seconds={**predicted["seconds"], "finish": time.perf_counter() - started},
        workers={**predicted["workers"], "finish": _worker()},
        input_fingerprint=fingerprint,
        tables={"regions": tables.to_table("regions", [row])},
    )


#: The three stand-in stages, as Segmentation.stages takes them.
STAGES = StageFunctions(preprocess, predict, finish)


def make_scans(n: int, folder: Path) -> list[Scan]:
    """`n` scans for the stand-ins (their image is never read)."""
    image = folder / "unused_T1w.nii.gz"
    return [Scan(f"sub-{i:03d}", (("t1w", image),), site="site-a") for i in range(n)]


def pipeline_in(folder: Path) -> Pipeline:
    """A pipeline writing to folder/out (the stand-ins' control files go in folder)."""
    settings = InferenceSettings(tta=False, device="cpu")
    return Pipeline(nnunet_model("demo"), settings, folder / "out", write_nifti=False)


@contextmanager
def client_for_stand_ins(
    n_workers: int, threads_per_worker: int, *by_value: ModuleType
) -> Iterator[Client]:
    """A client on a LocalCluster of separate worker processes that can run these
    stages (this module, and any test module in `by_value`, pickled by value: the
    workers cannot import test modules)."""
    for module in (sys.modules[__name__], *by_value):
        cloudpickle.register_pickle_by_value(module)
    with (
        local_cluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                      torch_threads=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        yield client
