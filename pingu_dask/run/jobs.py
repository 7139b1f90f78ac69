"""Batch-system workers: SLURM or PBS jobs through dask-jobqueue, asked for from the work left.

Every jobqueue setting falls back to Dask's own `jobqueue.<system>` config (jobqueue.yaml),
so a lab's existing file keeps working; our options only override it. Jobs start their
workers through `python -m pingu_dask.run.worker` (the tuned environment local workers
get, see clusters.tuned_environment), each with one inference slot, and leave before
the walltime (--lifetime) so their scans are handed back. JobCapacity and ScaleFromWork
size the jobs from the scans left, not from Dask's task counts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import dask.config
from distributed import Adaptive

from pingu_dask.config import DEFAULTS, INFERENCE_RESOURCE, setting
from pingu_dask.run.capacity import Capacity, PresentWorkers
from pingu_dask.run.local import scheduler_settings

BATCH_SYSTEMS = ("slurm", "pbs")


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
    min_jobs: int = DEFAULTS["pingu"]["min-jobs"]
    max_jobs: int = DEFAULTS["pingu"]["max-jobs"]
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
    walltime = options.walltime or _option(kind, options, "walltime") or setting("job-walltime")
    cores = options.cores or _option(kind, options, "cores") or int(setting("job-cores"))
    memory = options.memory or _option(kind, options, "memory") or setting("job-memory")
    threads = max(1, cores // processes)
    worker_arguments = ["--resources", f"{INFERENCE_RESOURCE}=1", *lifetime_arguments(walltime)]
    if processes > 1:
        # dask-jobqueue adds --nworkers only for its own worker command, not for ours.
        worker_arguments += ["--nworkers", str(processes)]
    configured = _option(kind, options, "worker-extra-args") or []
    directives = list(options.job_extra or _option(kind, options, "job-extra-directives") or [])
    arguments: dict[str, Any] = dict(
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
