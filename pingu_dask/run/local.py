"""Local worker processes, and what every pingu-dask worker and scheduler gets.

Every worker offers one `GPU` resource: the inference slot. `predict` tasks ask for it,
so each worker runs one prediction at a time (also on CPU-only machines, where the
slot stands for "the cores torch is using"), while its other threads preprocess the
next scan and finish the last one.

Batch-system workers (run/jobs.py) start through `python -m pingu_dask.run.worker`,
which gives them the same tuned environment as local workers (tuned_config), and
their scheduler the same scheduler_options().
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask.config
from distributed import LocalCluster

from pingu_dask.config import INFERENCE_RESOURCE, available_cores, setting

DEFAULT_THREADS_PER_WORKER = 3  # one predict + one preprocess + one finish in flight
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def tuned_config(threads: int) -> dict:
    """Dask config under which nannies spawn workers that suit torch.

    - OMP/MKL/OpenBLAS threads = `threads` instead of the nanny's 1;
    - no MALLOC_TRIM_THRESHOLD_: Dask sets it to 64 KiB to return memory to the OS, but
      setting any glibc malloc tunable turns off the dynamic mmap threshold, so every
      large torch buffer is mmapped and page-faulted afresh. Measured on the demo model
      (one 1 mm scan, 2 threads): 18.9 s per prediction with it, 8.7 s without;
    - pingu.worker-threads = `threads` (and DASK_PINGU__WORKER_THREADS in the
      environment), so that the worker sizes torch from its own share of its machine
      or job (config.worker_threads), not from the driver's.

    A nanny reads this when it is created and keeps it for every restart of its worker,
    so it is set in a context around the creation only (local_cluster, run/worker.py),
    never in the process's global config.
    """
    environment = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    environment.pop("MALLOC_TRIM_THRESHOLD_", None)
    environment.update(thread_environment(threads))
    return {"distributed.nanny.pre-spawn-environ": environment, "pingu.worker-threads": threads}


def thread_environment(threads: int) -> dict[str, str]:
    """The thread variables of a worker process with `threads` threads.

    Also given to a local nanny as its `env` (set in the worker process as it starts):
    Dask takes a pre-spawn variable from the driver's own environment when that has
    it, and every nanny's start writes its pre-spawn variables there, so a second
    cluster in the same process (or a shell's OMP_NUM_THREADS) would otherwise win.
    """
    values = {name: str(threads) for name in THREAD_VARIABLES}
    return {**values, "DASK_PINGU__WORKER_THREADS": str(threads)}


def scheduler_options() -> dict:
    """Scheduler keyword arguments for every scheduler pingu-dask starts (local or batch).

    allowed_failures 0 (config pingu.allowed-failures): a worker lost while running a
    scan's task (killed, pre-empted, `scancel`) fails that task at once, so the driver
    sees it, writes it in the ledger and retries it itself; Dask would otherwise rerun
    it up to 3 times behind the ledger's back. Workers that leave gracefully (their
    --lifetime) hand their tasks back without a failure.
    """
    return {"allowed_failures": int(setting("allowed-failures"))}


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

    Every worker has started when this returns: its nanny was created under
    tuned_config(), which it keeps. The scheduler's web server (Dask dashboard, /pingu,
    /metrics) binds to `dashboard_address`, by default config pingu.dashboard-address
    (localhost: reach it from elsewhere through an SSH tunnel); port 0 picks a free port.
    """
    if layout is None:
        threads = torch_threads or max(1, available_cores() // n_workers)
        layout = LocalLayout(n_workers, threads_per_worker, threads)
    with dask.config.set(tuned_config(layout.torch_threads)):
        cluster = LocalCluster(
            n_workers=layout.inference_workers,
            threads_per_worker=layout.threads_per_inference_worker,
            processes=True,
            resources={INFERENCE_RESOURCE: 1},
            env=thread_environment(layout.torch_threads),
            memory_limit=memory_limit,
            dashboard_address=dashboard_address or setting("dashboard-address"),
            scheduler_kwargs=scheduler_options(),
            # Scan errors are recorded in the ledger with their reasons; the workers'
            # tracebacks would only bury the progress bar.
            silence_logs=logging.CRITICAL,
        )
        if layout.cpu_workers:
            _add_cpu_workers(cluster, layout)
    return cluster


CPU_WORKERS_START_TIMEOUT = 120.0  # seconds


def _add_cpu_workers(cluster: LocalCluster, layout: LocalLayout) -> None:
    """Worker processes without an inference slot: they take preprocess and finish only.

    LocalCluster makes alike workers; these are added to its spec (SpecCluster's way of
    describing workers, its public `worker_spec`) with their own threads and one torch
    thread each. `scale` to the spec's own size starts what the spec has and the
    cluster has not, and this waits until they have all arrived (the nannies must be
    created while the caller's tuned_config() context holds).
    """
    import copy

    template = next(iter(cluster.new_worker_spec().values()))
    for index in range(layout.cpu_workers):
        spec = copy.deepcopy(template)
        options = spec["options"]
        options["nthreads"] = layout.threads_per_cpu_worker
        options["resources"] = {}
        options["env"] = thread_environment(layout.threads_per_cpu_worker)
        options["config"] = {"pingu": {"worker-threads": layout.threads_per_cpu_worker}}
        cluster.worker_spec[f"cpu-{index}"] = spec
    cluster.scale(len(cluster.worker_spec))
    cluster.wait_for_workers(len(cluster.worker_spec), timeout=CPU_WORKERS_START_TIMEOUT)
