"""Batch-system workers: SLURM or PBS jobs through dask-jobqueue, asked for from the work left.

dask-jobqueue's own extension points: GpuSLURMJob and GpuPBSJob subclass its SLURMJob
and PBSJob, and are the `job_cls` of GpuSLURMCluster / GpuPBSCluster (its SLURMCluster
and PBSCluster otherwise).
A job adds what a pingu-dask worker needs: the GPU request (`--gres=gpu:N`, or PBS's
`ngpus=N`), the worker command `python -m pingu_dask.run.worker` (the tuned
environment local workers get, see local.tuned_config), one inference slot per worker
process, a --lifetime below the walltime (so that its scans are handed back before
the batch system kills it) and the threads of one worker process. Every setting falls
back to Dask's own `jobqueue.<system>` config (jobqueue.yaml), so a lab's existing file
keeps working; our options only override it. Nothing here changes Dask's config.

Batch clusters use TLS unless told not to (pingu.batch-tls, --no-tls): the scheduler
listens on the cluster network, where anyone who can reach its port could otherwise
submit code that runs as the user and reads their data. The run makes its own
certificate (Dask's Security.temporary()); dask-jobqueue writes the worker's copy
(files only the user can read) to a folder the jobs see (pingu.batch-tls-directory)
and names it in the job script. The driver's Client(cluster) takes the same security.

JobCapacity and ScaleFromWork size the jobs from the scans left, not from Dask's task
counts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.config
from distributed import Adaptive
from distributed.security import Security

from pingu_dask.config import DEFAULTS, INFERENCE_RESOURCE, cache_dir, setting, setting_flag
from pingu_dask.run.capacity import Capacity, PresentWorkers
from pingu_dask.run.jobqueue import PBSCluster, PBSJob, SLURMCluster, SLURMJob
from pingu_dask.run.local import scheduler_options

BATCH_SYSTEMS = ("slurm", "pbs")
WORKER_MODULE = "pingu_dask.run.worker"  # the jobs' worker command: python -m WORKER_MODULE


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
    tls: bool | None = None  # None: config pingu.batch-tls (on)


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


def jobqueue_section(kind: str, config_name: str | None = None) -> dict[str, Any]:
    """Dask's jobqueue.<kind> config, with a named section (e.g. slurm-a100) over it.

    A named section states only what differs from `kind`'s; dask-jobqueue reads a
    section whole, so the named one's keys are passed as arguments (section_arguments)
    and the rest comes from `kind`'s. Read only: Dask's config is left as it is.
    """
    base = dict(dask.config.get(f"jobqueue.{kind}", default=None) or {})
    return {**base, **_named_section(kind, config_name)}


def section_arguments(kind: str, config_name: str | None) -> dict[str, Any]:
    """A named section's own settings as keyword arguments of a `kind` cluster and job
    (`name` is the job's `job_name`; keys that jobqueue.<kind> does not have are left
    out, as dask-jobqueue leaves them)."""
    base = jobqueue_section(kind)
    return {
        "job_name" if key == "name" else key.replace("-", "_"): value
        for key, value in _named_section(kind, config_name).items()
        if key in base
    }


def _named_section(kind: str, config_name: str | None) -> dict[str, Any]:
    """The named section's own keys ({} for none, or `kind` itself)."""
    if not config_name or config_name == kind:
        return {}
    named = dask.config.get(f"jobqueue.{config_name}", default=None)
    if named is None:
        raise ValueError(f"no section jobqueue.{config_name} in Dask's config")
    return dict(named)


@dataclass(frozen=True)
class JobShape:
    """What one worker job asks for and how it is shared among its worker processes."""

    cores: int
    memory: str
    processes: int  # worker processes: one inference slot each
    gpus: int
    walltime: str

    @property
    def threads(self) -> int:
        """Threads (and torch's cores) of one worker process."""
        return max(1, self.cores // self.processes)

    @classmethod
    def resolve(
        cls,
        section: Mapping[str, Any],
        cores: int | None = None,
        memory: str | None = None,
        processes: int | None = None,
        gpus: int | None = None,
        walltime: str | None = None,
    ) -> JobShape:
        """Given values, else the jobqueue section's, else pingu's job-* settings."""
        processes = int(processes or section.get("processes") or 1)
        return cls(
            cores=int(cores or section.get("cores") or setting("job-cores")),
            memory=str(memory or section.get("memory") or setting("job-memory")),
            processes=processes,
            gpus=processes if gpus is None else int(gpus),
            walltime=str(walltime or section.get("walltime") or setting("job-walltime")),
        )


def job_shape(kind: str, options: JobOptions) -> JobShape:
    """The shape of the jobs `options` ask for on batch system `kind`."""
    return JobShape.resolve(
        jobqueue_section(kind, options.config_name),
        options.cores,
        options.memory,
        options.processes,
        options.gpus_per_job,
        options.walltime,
    )


def worker_job_arguments(
    section_name: str, gpus: int | None, arguments: dict[str, Any]
) -> tuple[JobShape, dict[str, Any]]:
    """A dask-jobqueue job's keyword arguments with what a pingu-dask worker job adds:
    its resolved shape, the worker command, one inference slot per worker process, the
    --lifetime, --nworkers (dask-jobqueue adds it only for its own worker command) and
    the export of the threads per worker process after the prologue. Lists given are
    copied, not changed: every job of a cluster gets the same arguments."""
    section = jobqueue_section(section_name)
    shape = JobShape.resolve(
        section,
        arguments.pop("cores", None),
        arguments.pop("memory", None),
        arguments.pop("processes", None),
        gpus,
        arguments.pop("walltime", None),
    )

    def given(key: str, config_key: str) -> list:
        value = arguments.pop(key, None)
        return list((section.get(config_key) if value is None else value) or [])

    worker_arguments = ["--resources", f"{INFERENCE_RESOURCE}=1"]
    worker_arguments += lifetime_arguments(shape.walltime)
    if shape.processes > 1:
        worker_arguments += ["--nworkers", str(shape.processes)]
    threads = f"export DASK_PINGU__WORKER_THREADS={shape.threads}"
    return shape, {
        **arguments,
        "cores": shape.cores,
        "memory": shape.memory,
        "processes": shape.processes,
        "walltime": shape.walltime,
        "worker_command": WORKER_MODULE,
        "worker_extra_args": [*given("worker_extra_args", "worker-extra-args"), *worker_arguments],
        "job_script_prologue": [*given("job_script_prologue", "job-script-prologue"), threads],
        "job_extra_directives": given("job_extra_directives", "job-extra-directives"),
    }


class GpuSLURMJob(SLURMJob):
    """A SLURM job of pingu-dask workers: `#SBATCH --gres=gpu:N` (N: `gpus`, by default
    one per worker process; 0 for CPU jobs) and a pingu-dask worker (worker_job_arguments)."""

    def __init__(self, *args: Any, gpus: int | None = None, **kwargs: Any) -> None:
        section = kwargs.get("config_name") or self.default_config_name()
        shape, arguments = worker_job_arguments(section, gpus, kwargs)
        if shape.gpus:
            arguments["job_extra_directives"].append(f"--gres=gpu:{shape.gpus}")
        super().__init__(*args, **arguments)
        self.shape = shape


class GpuPBSJob(PBSJob):
    """A PBS job of pingu-dask workers: `#PBS -l select=1:ncpus=C:mem=M:ngpus=N` (N:
    `gpus`, by default one per worker process), unless a resource_spec is given or
    configured (a site that wants another form), and a pingu-dask worker."""

    def __init__(self, *args: Any, gpus: int | None = None, **kwargs: Any) -> None:
        section = kwargs.get("config_name") or self.default_config_name()
        shape, arguments = worker_job_arguments(section, gpus, kwargs)
        configured = jobqueue_section(section).get("resource-spec")
        if shape.gpus and arguments.get("resource_spec") is None and configured is None:
            memory = re.sub(r"\s+", "", shape.memory)
            arguments["resource_spec"] = (
                f"select=1:ncpus={shape.cores}:mem={memory}:ngpus={shape.gpus}"
            )
        super().__init__(*args, **arguments)
        self.shape = shape


class GpuSLURMCluster(SLURMCluster):
    """dask-jobqueue's SLURMCluster, its jobs GpuSLURMJobs (its `job_cls`)."""

    job_cls = GpuSLURMJob


class GpuPBSCluster(PBSCluster):
    """dask-jobqueue's PBSCluster, its jobs GpuPBSJobs (its `job_cls`)."""

    job_cls = GpuPBSJob


CLUSTER_CLASSES: dict[str, type[SLURMCluster] | type[PBSCluster]] = {
    "slurm": GpuSLURMCluster,
    "pbs": GpuPBSCluster,
}


def tls_directory(section: Mapping[str, Any]) -> Path:
    """Where a TLS run's worker key and certificate go for the jobs to read: config
    pingu.batch-tls-directory, else the jobqueue section's shared-temp-directory, else
    <cache dir>/tls. Created readable by the user only."""
    configured = setting("batch-tls-directory") or section.get("shared-temp-directory")
    directory = Path(configured).expanduser() if configured else cache_dir() / "tls"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory.resolve()


def batch_security(options: JobOptions) -> Security | None:
    """A certificate made for this run (Dask's Security.temporary(): every role, the
    scheduler included, must show it), or None for plain TCP (--no-tls)."""
    tls = setting_flag("batch-tls") if options.tls is None else options.tls
    if not tls:
        return None
    try:
        return Security.temporary()
    except ImportError as error:
        raise RuntimeError(
            "TLS for batch workers needs the `cryptography` package (pip install "
            "cryptography); or run with --no-tls (pingu.batch-tls: false) on a network "
            "that only you can reach"
        ) from error


def jobqueue_cluster(kind: str, options: JobOptions, dashboard_address: str | None = None):
    """A GpuSLURMCluster or GpuPBSCluster (dask-jobqueue's, with our jobs), each worker
    process holding one inference slot; with TLS unless options.tls or pingu.batch-tls
    says otherwise.

    No job is asked for yet: scale_from_work does that. The scheduler runs here, in
    the driver, with scheduler_options(); its web server binds as local_cluster's does.
    """
    if kind not in BATCH_SYSTEMS:
        raise ValueError(f"unknown batch system {kind!r}; choose one of {BATCH_SYSTEMS}")
    cluster_cls = CLUSTER_CLASSES[kind]
    section = jobqueue_section(kind, options.config_name)
    shape = job_shape(kind, options)
    arguments: dict[str, Any] = section_arguments(kind, options.config_name)
    arguments.update(
        cores=shape.cores,
        memory=shape.memory,
        processes=shape.processes,
        gpus=shape.gpus,
        walltime=shape.walltime,
        # A named section's scheduler options, with ours over them.
        scheduler_options={
            **(section.get("scheduler-options") or {}),
            "dashboard_address": dashboard_address or setting("dashboard-address"),
            **scheduler_options(),
        },
        config_name=kind,  # jobqueue.<kind> gives what neither the options nor `arguments` say
    )
    if options.prologue:
        configured = section.get("job-script-prologue") or []
        arguments["job_script_prologue"] = [*configured, *options.prologue]
    if options.job_extra:
        arguments["job_extra_directives"] = list(options.job_extra)
    given = {
        "queue": options.queue,
        "account": options.account,
        "log_directory": options.log_directory,
        "python": options.python,
    }
    arguments.update({key: value for key, value in given.items() if value is not None})
    security = batch_security(options)
    if security is not None:
        arguments.update(security=security, shared_temp_directory=str(tls_directory(section)))
    return cluster_cls(**arguments)


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
    """Start asking for jobs for `scans_left` scans, between min_jobs and max_jobs.

    `cluster` is a jobqueue_cluster(kind, options): its jobs' shape is options'."""
    shape = job_shape(cluster.job_cls.config_name, options)
    capacity = JobCapacity(
        options.min_jobs * shape.processes,
        options.max_jobs * shape.processes,
        present=PresentWorkers(client, every=1.0),
        threads_per_slot=shape.threads,
    )
    capacity.workers(scans_left)
    cluster.adapt(
        Adaptive=functools.partial(ScaleFromWork, capacity=capacity),
        minimum_jobs=options.min_jobs,
        maximum_jobs=options.max_jobs,
        interval=setting("scale-interval"),
    )
    return capacity
