"""Dask clusters to run on: local worker processes, SLURM or PBS jobs (dask-jobqueue).

Every worker offers one `GPU` resource: the inference slot. `predict` tasks ask for it,
so each worker runs one prediction at a time (also on CPU-only machines, where the
slot stands for "the cores torch is using"), while its other threads preprocess the
next scan and finish the last one.

Batch-system workers start through `python -m pingu_dask.run.worker`, which gives them
the same tuned environment as local workers (see tuned_environment). Every jobqueue
setting falls back to Dask's own `jobqueue.<system>` config (jobqueue.yaml), so a
lab's existing file keeps working; our options only override it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask.config
from distributed import LocalCluster

from pingu_dask.config import INFERENCE_RESOURCE, available_cores, setting

DEFAULT_THREADS_PER_WORKER = 3  # one predict + one preprocess + one finish in flight
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def tuned_environment(threads: int) -> None:
    """Set this process's Dask config so that the workers its nannies spawn suit torch.

    - OMP/MKL/OpenBLAS threads = `threads` instead of the nanny's 1;
    - no MALLOC_TRIM_THRESHOLD_: Dask sets it to 64 KiB to return memory to the OS, but
      setting any glibc malloc tunable turns off the dynamic mmap threshold, so every
      large torch buffer is mmapped and page-faulted afresh. Measured on the demo model
      (one 1 mm scan, 2 threads): 18.9 s per prediction with it, 8.7 s without;
    - DASK_PINGU__WORKER_THREADS = `threads`, so that the worker sizes torch from its
      own share of its machine or job (config.worker_threads), not from the driver's;
    - distributed.scheduler.allowed-failures from our config, for a scheduler started in
      this process (see scheduler_settings).

    Nannies read the environment when they are created; it is set in this process's
    config (not in a context) because LocalCluster and `dask worker` create them later.
    """
    environment = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    environment.pop("MALLOC_TRIM_THRESHOLD_", None)
    environment.update({name: str(threads) for name in THREAD_VARIABLES})
    environment["DASK_PINGU__WORKER_THREADS"] = str(threads)
    dask.config.set({"distributed.nanny.pre-spawn-environ": environment, **scheduler_settings()})


def scheduler_settings() -> dict:
    """Dask config for every scheduler pingu-dask starts (local or batch).

    allowed-failures 0 (our config): a worker lost while running a scan's task (killed,
    pre-empted, `scancel`) fails that task at once, so the driver sees it, writes it in
    the ledger and retries it itself; Dask would otherwise rerun it up to 3 times behind
    the ledger's back. Workers that leave gracefully (their --lifetime) hand their
    tasks back without a failure.
    """
    return {"distributed.scheduler.allowed-failures": int(setting("allowed-failures"))}


@dataclass(frozen=True)
class LocalLayout:
    """How a machine's cores are shared among local worker processes.

    Each inference worker holds one slot (a GPU, or on a CPU-only machine the cores
    torch predicts with). On a CPU machine the network takes the cores, so a worker has
    3 threads (one predicting, one preprocessing, one finishing) and torch the cores.
    On a GPU machine the CPU stages decide throughput, so they get the cores: either
    as threads of the inference worker (its share of the cores + 1, so that predict
    always finds a thread, and at least 4: three scans in CPU stages at once, so that a
    slow 0.5 mm head does not starve the slot), or, with `cpu_workers`, as processes
    beside it (no slot, no GIL shared with the predicting thread), the inference worker
    keeping 2 threads.
    """

    inference_workers: int
    threads_per_inference_worker: int
    torch_threads: int
    cpu_workers: int = 0
    threads_per_cpu_worker: int = 1

    @classmethod
    def for_machine(
        cls,
        inference_workers: int,
        gpu: bool,
        cpu_workers: int = 0,
        torch_threads: int | None = None,
        cores: int | None = None,
    ) -> LocalLayout:
        cores = cores or available_cores()
        share = max(1, cores // inference_workers)
        if not gpu:
            return cls(inference_workers, DEFAULT_THREADS_PER_WORKER, torch_threads or share)
        if not cpu_workers:
            threads = max(4, share + 1)
            return cls(inference_workers, threads, torch_threads or share)
        left = max(cpu_workers, cores - inference_workers)
        return cls(
            inference_workers, 2, torch_threads or 1, cpu_workers, max(1, left // cpu_workers)
        )

    @property
    def threads_per_slot(self) -> int:
        """Every thread a slot's scans can run on (the runner caps its window by it)."""
        cpu = self.cpu_workers * self.threads_per_cpu_worker
        return self.threads_per_inference_worker + cpu // self.inference_workers


def local_cluster(
    n_workers: int = 1,
    threads_per_worker: int = DEFAULT_THREADS_PER_WORKER,
    torch_threads: int | None = None,
    memory_limit: str | float = "auto",
    dashboard_address: str | None = None,
    layout: LocalLayout | None = None,
) -> LocalCluster:
    """Worker processes on this machine, each with one inference slot (and, in a
    `layout` with CPU workers, worker processes without one beside them).

    Nannies read the tuned environment while they start (after LocalCluster() returns),
    so it is set in the driver's config, not in a context that would end too early.
    The scheduler's web server (Dask dashboard, /pingu, /metrics) binds to
    `dashboard_address`, by default config pingu.dashboard-address (localhost: reach it
    from elsewhere through an SSH tunnel); port 0 picks a free port.
    """
    if layout is None:
        threads = torch_threads or max(1, available_cores() // n_workers)
        layout = LocalLayout(n_workers, threads_per_worker, threads)
    tuned_environment(layout.torch_threads)
    cluster = LocalCluster(
        n_workers=layout.inference_workers,
        threads_per_worker=layout.threads_per_inference_worker,
        processes=True,
        resources={INFERENCE_RESOURCE: 1},
        memory_limit=memory_limit,
        dashboard_address=dashboard_address or setting("dashboard-address"),
        # Scan errors are recorded in the ledger with their reasons; the workers'
        # tracebacks would only bury the progress bar.
        silence_logs=logging.CRITICAL,
    )
    if layout.cpu_workers:
        _add_cpu_workers(cluster, layout)
    return cluster


def _add_cpu_workers(cluster: LocalCluster, layout: LocalLayout) -> None:
    """Worker processes without an inference slot: they take preprocess and finish only.

    LocalCluster makes alike workers; these are added to its spec (SpecCluster's way
    of describing workers) with their own threads and one torch thread each.
    """
    import copy

    template = next(iter(cluster.new_worker_spec().values()))
    for index in range(layout.cpu_workers):
        spec = copy.deepcopy(template)
        options = spec["options"]
        options["nthreads"] = layout.threads_per_cpu_worker
        options["resources"] = {}
        threads = str(layout.threads_per_cpu_worker)
        options["env"] = {name: threads for name in THREAD_VARIABLES}
        options["env"]["DASK_PINGU__WORKER_THREADS"] = threads
        cluster.worker_spec[f"cpu-{index}"] = spec
    cluster.sync(cluster._correct_state)  # start the workers now in the spec


# --- how many workers to plan for --------------------------------------------------
