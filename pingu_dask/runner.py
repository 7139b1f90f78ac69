"""Feed a cohort's scans through the three stages on a Dask client.

A bounded window of scans is in flight at once (a few per worker), never the whole
manifest as one graph: the scheduler stays small at 100,000 scans, and tasks that ask
for a resource (predict) bypass the scheduler's own queuing, so the client throttles.
Task keys are tuples (stage-token, index): a bare scan id as a key could collide with a
string argument and be substituted by Dask.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from distributed import Client, as_completed

from pingu_dask import stages
from pingu_dask.cluster import INFERENCE_RESOURCE
from pingu_dask.config import InferenceSettings
from pingu_dask.manifest import Scan
from pingu_dask.model import Model

SCANS_IN_FLIGHT_PER_WORKER = 3  #: one preprocessing, one predicting, one finishing


def segment_cohort(
    client: Client,
    scans: Iterable[Scan],
    model: Model,
    settings: InferenceSettings,
    out: str | Path,
    window: int | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Segment every scan; return one small record per scan (status ok or failed)."""
    out = Path(out)
    (out / "nifti").mkdir(parents=True, exist_ok=True)
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
        prepared = client.submit(stages.preprocess, scan, model, key=(f"preprocess-{token}", index))
        predicted = client.submit(
            stages.predict,
            prepared,
            model,
            settings,
            key=(f"predict-{token}", index),
            resources={INFERENCE_RESOURCE: 1},
        )
        finished = client.submit(
            stages.finish, predicted, scan, model, settings, out, key=(f"finish-{token}", index)
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
        records.append(record)
        if on_record:
            on_record(record)
        submit_next()
    return records
