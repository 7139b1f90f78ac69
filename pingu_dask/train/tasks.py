"""One task per item on a client, transient failures retried: the case steps of `train`.

Cases are few next to scans (tens to thousands) and each step is a barrier (the plans
need every case's fingerprint, the folds every preprocessed case), so a plain
submit-all-and-wait serves; the scan runner's bounded window (run/loop.py) is for
cohorts of 100,000.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from distributed import Client, Future, wait

from pingu_dask.errors import describe
from pingu_dask.inputs.manifest import Scan
from pingu_dask.nnunet import planning
from pingu_dask.nnunet.planning import CONFIGURATION


def preprocess_task(case: str, arguments: tuple) -> str:
    folders, plans_name, n_channels = arguments
    planning.preprocess_case(folders, plans_name, CONFIGURATION, case, n_channels)
    return case


def map_tasks(
    client: Client,
    function: Callable,
    items: Sequence[Any],
    shared: Any,
    retries: int,
    name: str,
    on_done: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """One task per item (a Scan or a case id) with `shared`; transient failures retried
    up to `retries` times. ({id: result}, {id: failure message})."""
    token = uuid.uuid4().hex[:8]

    def identity(item: Any) -> str:
        return item.scan_id if isinstance(item, Scan) else str(item)

    def submit(index: int, attempt: int) -> Future:
        return client.submit(
            function, items[index], shared, key=(f"{name}-{token}", index, attempt), pure=False
        )

    pending = {submit(i, 1): (i, 1) for i in range(len(items))}
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    while pending:
        finished, _ = wait(list(pending), return_when="FIRST_COMPLETED")
        for future in finished:
            index, attempt = pending.pop(future)
            try:
                results[identity(items[index])] = future.result()
            except Exception as error:
                report = describe(error)
                if report.retryable and attempt <= retries:
                    pending[submit(index, attempt + 1)] = (index, attempt + 1)
                    continue
                failures[identity(items[index])] = report.message
            future.release()
            if on_done:
                on_done(len(results) + len(failures))
    return results, failures
