"""Dask clusters to run on. Today: a LocalCluster of separate worker processes.

Every worker offers one `GPU` resource: the inference slot. `predict` tasks ask for it,
so each worker runs one prediction at a time (also on CPU-only machines, where the
slot stands for "the cores torch is using"), while its other threads preprocess the
next scan and finish the last one.
"""

from __future__ import annotations

import logging

import dask.config
from distributed import LocalCluster

from pingu_dask.config import available_cores, setting

INFERENCE_RESOURCE = "GPU"
DEFAULT_THREADS_PER_WORKER = 3  # one predict + one preprocess + one finish in flight
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def local_cluster(
    n_workers: int = 1,
    threads_per_worker: int = DEFAULT_THREADS_PER_WORKER,
    torch_threads: int | None = None,
    memory_limit: str | float = "auto",
    dashboard_address: str = "127.0.0.1:0",
) -> LocalCluster:
    """Worker processes on this machine, each with one inference slot.

    Worker processes get an environment tuned for torch inference, set *pre-spawn*
    (read by libraries as they load):
    - OMP/MKL/OpenBLAS threads = `torch_threads` (default cores / workers) instead of
      the nanny's 1;
    - no MALLOC_TRIM_THRESHOLD_: Dask sets it to 64 KiB to return memory to the OS, but
      setting any glibc malloc tunable turns off the dynamic mmap threshold, so every
      large torch buffer is mmapped and page-faulted afresh. Measured on the demo model
      (one 1 mm scan, 2 threads): 18.9 s per prediction with it, 8.7 s without.
    Nannies read the setting while they start (after LocalCluster() returns), so it is
    set for the driver process, not in a context that would end too early.
    The dashboard binds to localhost (reach it from elsewhere through an SSH tunnel);
    port 0 picks a free port.
    """
    threads = torch_threads or max(1, available_cores() // n_workers)
    environment = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    environment.pop("MALLOC_TRIM_THRESHOLD_", None)
    environment.update({name: str(threads) for name in THREAD_VARIABLES})
    dask.config.set(
        {
            "distributed.nanny.pre-spawn-environ": environment,
            # A worker death fails the scan's task at once (KilledWorker), so that the
            # runner retries it and the ledger shows the attempt; Dask's default (3)
            # would resubmit silently, and a scan that kills every worker it lands on
            # (out of memory) would take three workers down before anyone heard of it.
            "distributed.scheduler.allowed-failures": int(setting("allowed-failures")),
        }
    )
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        resources={INFERENCE_RESOURCE: 1},
        memory_limit=memory_limit,
        dashboard_address=dashboard_address,
        # Scan errors are recorded in the ledger with their reasons; the workers'
        # tracebacks would only bury the progress bar.
        silence_logs=logging.CRITICAL,
    )
