"""Dask clusters to run on. Today: a LocalCluster of separate worker processes.

Every worker offers one `GPU` resource: the inference slot. `predict` tasks ask for it,
so each worker runs one prediction at a time (also on CPU-only machines, where the
slot stands for "the cores torch is using"), while its other threads preprocess the
next scan and finish the last one.
"""

from __future__ import annotations

import logging

from distributed import LocalCluster

INFERENCE_RESOURCE = "GPU"
DEFAULT_THREADS_PER_WORKER = 3  # one predict + one preprocess + one finish in flight


def local_cluster(
    n_workers: int = 1,
    threads_per_worker: int = DEFAULT_THREADS_PER_WORKER,
    memory_limit: str | float = "auto",
    dashboard_address: str = "127.0.0.1:0",
) -> LocalCluster:
    """Worker processes on this machine, each with one inference slot.

    The dashboard binds to localhost (reach it from elsewhere through an SSH tunnel);
    port 0 picks a free port.
    """
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        resources={INFERENCE_RESOURCE: 1},
        memory_limit=memory_limit,
        dashboard_address=dashboard_address,
        silence_logs=logging.ERROR,
    )
