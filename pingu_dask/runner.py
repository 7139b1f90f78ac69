"""Feed a cohort's scans through the three stages on a Dask client.

A bounded window of scans is in flight at once (a few per worker), never the whole
manifest as one graph: the scheduler stays small at 100,000 scans, and tasks that ask
for a resource (predict) bypass the scheduler's own queuing, so the client throttles.
Task keys are tuples (stage-token, index): a bare scan id as a key could collide with a
string argument and be substituted by Dask.
"""

from __future__ import annotations

import hashlib
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from distributed import Client, as_completed

from pingu_dask import __version__, stages, store
from pingu_dask.cluster import INFERENCE_RESOURCE
from pingu_dask.manifest import Scan

SCANS_IN_FLIGHT_PER_WORKER = 3  #: one preprocessing, one predicting, one finishing


def segment_cohort(
    client: Client,
    scans: Sequence[Scan],
    pipeline: stages.Pipeline,
    window: int | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Segment every scan and write its outputs; return one small record per scan.

    Masks are written by the workers; the scans' table rows come back in the records
    and are written here, in Parquet parts (store.TableWriter).
    """
    store.prepare_output(pipeline.out)
    names = store.nifti_names(scans) if pipeline.write_nifti else {}
    with store.TableWriter(pipeline.out) as writer:
        return _run(client, scans, pipeline, names, writer, window, on_record)


def _run(
    client: Client,
    scans: Sequence[Scan],
    pipeline: stages.Pipeline,
    names: dict[str, str],
    writer: store.TableWriter,
    window: int | None,
    on_record: Callable[[dict], None] | None,
) -> list[dict]:
    n_workers = max(1, len(client.scheduler_info()["workers"]))
    window = window or SCANS_IN_FLIGHT_PER_WORKER * n_workers
    token = uuid.uuid4().hex[:8]
    pending = iter(enumerate(scans))
    in_flight = as_completed()
    scan_of: dict = {}

    def submit_next() -> bool:
        try:
            index, scan = next(pending)
        except StopIteration:
            return False
        prepared = client.submit(
            stages.preprocess, scan, pipeline, key=(f"preprocess-{token}", index)
        )
        predicted = client.submit(
            stages.predict,
            prepared,
            pipeline,
            key=(f"predict-{token}", index),
            resources={INFERENCE_RESOURCE: 1},
        )
        finished = client.submit(
            stages.finish,
            predicted,
            scan,
            pipeline,
            names.get(scan.scan_id),
            key=(f"finish-{token}", index),
        )
        scan_of[finished.key] = scan
        in_flight.add(finished)
        return True

    for _ in range(window):
        if not submit_next():
            break
    records = []
    for future in in_flight:
        scan = scan_of.pop(future.key)
        try:
            record = future.result()
        except Exception as error:
            record = {
                "scan_id": scan.scan_id,
                "status": "failed",
                "error_type": type(error).__name__,
                "message": str(error),
            }
        future.release()
        writer.add(record.pop("tables", {}))
        records.append(record)
        if on_record:
            on_record(record)
        submit_next()
    return records


def provenance(pipeline: stages.Pipeline, manifest: Path | None, n_scans: int) -> dict:
    """What run.json records: tool and library versions, model, settings, manifest."""
    versions = {}
    for package in ("nnunetv2", "torch", "dask", "distributed", "zarr", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    manifest_info = None
    if manifest is not None:
        manifest_info = {
            "path": str(Path(manifest).resolve()),
            "sha256": hashlib.sha256(Path(manifest).read_bytes()).hexdigest(),
        }
    return {
        "tool": "pingu-dask",
        "version": __version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "libraries": versions,
        "model": {
            "folder": str(pipeline.model.folder),
            "name": pipeline.model.name,
            "folds": list(pipeline.model.folds),
            "checkpoint": pipeline.model.checkpoint,
            "fingerprint": pipeline.model.fingerprint,
        },
        "inference": asdict(pipeline.inference),
        "clusters": asdict(pipeline.clusters),
        "regions": {"table": pipeline.regions.name, "regions": dict(pipeline.regions.regions)},
        "pipeline_fingerprint": pipeline.fingerprint(),
        "manifest": manifest_info,
        "n_scans": n_scans,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished": None,
    }
