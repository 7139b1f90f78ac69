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

import functools
import logging
import math
import re
import time
from dataclasses import dataclass

import dask.config
from distributed import Adaptive, LocalCluster

from pingu_dask.config import available_cores, setting

INFERENCE_RESOURCE = "GPU"
DEFAULT_THREADS_PER_WORKER = 3  # one predict + one preprocess + one finish in flight
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
BATCH_SYSTEMS = ("slurm", "pbs")


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


@dataclass
class JobOptions:
    """Batch-system job settings; None falls back to Dask's jobqueue.<system> config."""

    config_name: str | None = None  # a section of jobqueue.yaml, e.g. "slurm-gpu"
    cores: int | None = None
    memory: str | None = None
    processes: int | None = None  # worker processes per job: one per GPU
    gpus_per_job: int | None = None  # default: one per worker process; 0 for CPU jobs
    walltime: str | None = None  # HH:MM:SS
    queue: str | None = None
    account: str | None = None
    prologue: tuple[str, ...] = ()  # e.g. "module load cuda", "source venv/bin/activate"
    log_directory: str | None = None
    job_extra: tuple[str, ...] = ()
    min_jobs: int = 0
    max_jobs: int = 4
    python: str | None = None  # default: this interpreter


def parse_walltime(text: str) -> int:
    """'HH:MM:SS', 'MM:SS', 'D-HH:MM:SS' or minutes -> seconds."""
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        seconds = parts[0] * 60
    else:
        while len(parts) < 3:
            parts.insert(0, 0)
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return days * 86400 + seconds


def lifetime_arguments(walltime: str) -> list[str]:
    """Worker --lifetime below the walltime, with a stagger, so workers leave (and hand
    their work back) before the batch system kills them: margin 10 % (at least 5 min,
    or a quarter of very short walltimes), stagger 5 % (at most 5 min)."""
    total = parse_walltime(walltime)
    margin = min(max(300, total // 10), total // 4)
    stagger = min(300, total // 20)
    lifetime = max(60, total - margin - stagger)
    return ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{stagger}s"]


def _option(kind: str, options: JobOptions, key: str):
    section = options.config_name or kind
    return dask.config.get(f"jobqueue.{section}.{key}", default=None)


def jobqueue_cluster(kind: str, options: JobOptions, dashboard_address: str | None = None):
    """A SLURMCluster or PBSCluster whose workers each hold one inference slot.

    No job is asked for yet: scale_from_work does that. The scheduler runs here, in
    the driver, with scheduler_settings(); its web server binds as local_cluster's does.
    """
    import sys

    if kind not in BATCH_SYSTEMS:
        raise ValueError(f"unknown batch system {kind!r}; choose one of {BATCH_SYSTEMS}")
    from dask_jobqueue import PBSCluster, SLURMCluster

    if options.config_name and options.config_name != kind:
        # A named section (e.g. slurm-a100) states only what differs from `slurm`;
        # dask-jobqueue wants every key, so fill in the rest from the base section.
        base = dask.config.get(f"jobqueue.{kind}")
        named = dask.config.get(f"jobqueue.{options.config_name}", default=None)
        if named is None:
            raise ValueError(f"no section jobqueue.{options.config_name} in Dask's config")
        dask.config.set({f"jobqueue.{options.config_name}": {**base, **named}})
    processes = options.processes or _option(kind, options, "processes") or 1
    gpus = processes if options.gpus_per_job is None else options.gpus_per_job
    walltime = options.walltime or _option(kind, options, "walltime") or "01:00:00"
    cores = options.cores or _option(kind, options, "cores") or DEFAULT_THREADS_PER_WORKER
    memory = options.memory or _option(kind, options, "memory") or "16GB"
    threads = max(1, cores // processes)
    worker_arguments = ["--resources", f"{INFERENCE_RESOURCE}=1", *lifetime_arguments(walltime)]
    if processes > 1:
        # dask-jobqueue adds --nworkers only for its own worker command, not for ours.
        worker_arguments += ["--nworkers", str(processes)]
    configured = _option(kind, options, "worker-extra-args") or []
    directives = list(options.job_extra or _option(kind, options, "job-extra-directives") or [])
    arguments = dict(
        cores=cores,
        memory=memory,
        processes=processes,
        walltime=walltime,
        worker_command="pingu_dask.run.worker",
        worker_extra_args=[*configured, *worker_arguments],
        job_script_prologue=[
            *(_option(kind, options, "job-script-prologue") or []),
            *options.prologue,
            f"export DASK_PINGU__WORKER_THREADS={threads}",
        ],
        python=options.python or _option(kind, options, "python") or sys.executable,
        scheduler_options={"dashboard_address": dashboard_address or setting("dashboard-address")},
        # None: dask-jobqueue takes the value from its config section.
        config_name=options.config_name,
        queue=options.queue,
        account=options.account,
        log_directory=options.log_directory,
    )
    with dask.config.set(scheduler_settings()):  # read when the scheduler starts
        if kind == "slurm":
            if gpus:
                directives.append(f"--gres=gpu:{gpus}")
            return SLURMCluster(job_extra_directives=directives, **arguments)
        if gpus:
            mem = re.sub(r"\s+", "", str(memory))
            arguments["resource_spec"] = f"select=1:ncpus={cores}:mem={mem}:ngpus={gpus}"
        return PBSCluster(job_extra_directives=directives, **arguments)


# --- how many workers to plan for --------------------------------------------------


class Capacity:
    """How many workers (inference slots) the runner's window of scans plans for.

    The runner calls workers(scans_left) before it submits: with a fixed cluster that
    is its size; with batch jobs it is also what the driver asks the batch system for.
    `threads_per_slot` (None: unknown) is every worker thread a slot's scans can use;
    the runner keeps no more scans in flight per slot than that, so that a predict
    task never waits for a thread held by a CPU stage.
    """

    threads_per_slot: int | None = None

    def workers(self, scans_left: int) -> int:
        raise NotImplementedError


@dataclass
class FixedCapacity(Capacity):
    """A cluster of known size (local worker processes)."""

    size: int
    threads_per_slot: int | None = None

    def workers(self, scans_left: int) -> int:
        return self.size


class PresentWorkers(Capacity):
    """A scheduler someone else runs (tcp://): plan for the slots it has now.

    Slots are the workers that offer the inference resource (workers without it only
    preprocess and finish); threads per slot count every worker's threads. Asked of
    the scheduler at most once per `every` seconds (the runner asks before each
    submission; a full scheduler_info() per scan would dominate a fast run).
    """

    def __init__(self, client, every: float = 2.0) -> None:
        self.client = client
        self.every = every
        self._count = 1
        self._asked = -math.inf

    def workers(self, scans_left: int) -> int:
        now = time.monotonic()
        if now - self._asked >= self.every:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {}).values()
            slots = sum(1 for w in workers if w.get("resources", {}).get(INFERENCE_RESOURCE))
            self._count = max(1, slots)
            threads = sum(int(w.get("nthreads", 1)) for w in workers)
            self.threads_per_slot = max(1, threads // self._count) if workers else None
            self._asked = now
        return self._count


class JobCapacity(Capacity):
    """Batch jobs sized from the work left, not from the workers present.

    Dask's own adaptive target counts runnable tasks per worker thread; the runner
    keeps only a few scans per worker in flight, so that target never grows past the
    workers already there (issue 15: one job for a whole run). Here the target is
    what the scans left can use, one inference slot each: min(max, scans left), never
    below min. The adaptive loop (ScaleFromWork, in the scheduler's event loop) reads
    `wanted`; jobs are released (gracefully: workers_to_close picks idle workers) as
    the queue drains.

    The runner's window follows the workers that have arrived (`present`, asked at most
    once a second), capped by `wanted`. Measured on the SLURM testbed: a window sized
    for all the jobs asked for put every scan on the first worker to register (its 8
    threads took every preprocess task, and predict followed the data), while the
    second job sat idle; sized by the workers present, a job that starts gets scans
    at the runner's next tick (<= 1 s) and the scheduler places them on it, the
    least busy worker.
    """

    def __init__(
        self,
        minimum_workers: int,
        maximum_workers: int,
        present: Capacity | None = None,
        threads_per_slot: int | None = None,
    ) -> None:
        self.minimum = minimum_workers
        self.maximum = max(1, maximum_workers)
        self.wanted = self.maximum
        self.present = present
        self.threads_per_slot = threads_per_slot

    def workers(self, scans_left: int) -> int:
        self.wanted = max(self.minimum, min(self.maximum, scans_left))
        arrived = self.present.workers(scans_left) if self.present else self.wanted
        return max(1, min(self.wanted, arrived))


class ScaleFromWork(Adaptive):
    """Dask's adaptive scaler with the target taken from a JobCapacity."""

    def __init__(self, *args, capacity: JobCapacity, **kwargs) -> None:
        self.capacity = capacity
        super().__init__(*args, **kwargs)

    async def target(self) -> int:
        return self.capacity.wanted


def scale_from_work(cluster, client, options: JobOptions, scans_left: int) -> JobCapacity:
    """Start asking for jobs for `scans_left` scans, between min_jobs and max_jobs."""
    job = cluster._dummy_job
    processes = job.worker_processes  # worker processes per job
    capacity = JobCapacity(
        options.min_jobs * processes,
        options.max_jobs * processes,
        present=PresentWorkers(client, every=1.0),
        threads_per_slot=job.worker_process_threads,
    )
    capacity.workers(scans_left)
    cluster.adapt(
        Adaptive=functools.partial(ScaleFromWork, capacity=capacity),
        minimum_jobs=options.min_jobs,
        maximum_jobs=options.max_jobs,
        interval=setting("scale-interval"),
    )
    return capacity
