"""The Dask cluster a command runs on, and how many workers it plans for.

`run` and `train` both take `--cluster` (local worker processes, SLURM or PBS jobs,
or the address of a running scheduler) and the same worker and job options; this is
the one place that turns them into a client and a Capacity (capacity.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from distributed import Client
from distributed.security import Security

from pingu_dask.nnunet.predictor import uses_gpu
from pingu_dask.run.capacity import Capacity, FixedCapacity, PresentWorkers
from pingu_dask.run.jobs import BATCH_SYSTEMS, JobOptions, jobqueue_cluster, scale_from_work
from pingu_dask.run.local import LocalLayout, local_cluster


@dataclass(frozen=True)
class ClusterRequest:
    """Where the work runs: what `--cluster`, `--workers`, `--cpu-workers`, the job
    options and `--dashboard-address` said."""

    cluster: str = "local"  # local, slurm, pbs, or the address of a running scheduler
    workers: int = 1  # local inference workers (one slot each)
    cpu_workers: int = 0  # local workers without a slot, beside GPU workers
    jobs: JobOptions = field(default_factory=JobOptions)  # for cluster slurm / pbs
    dashboard_address: str | None = None  # None: config pingu.dashboard-address
    # For the address of a running TLS scheduler: its credentials (e.g. the client's
    # that opened it, Client.security).
    security: Security | None = None

    @property
    def is_batch(self) -> bool:
        return self.cluster in BATCH_SYSTEMS


@contextmanager
def open_client(
    request: ClusterRequest, work_left: int, device: str, torch_threads: int | None = None
) -> Iterator[tuple[Client, Capacity]]:
    """A client on the cluster the request names, and how many workers to plan for.

    `work_left` (scans, or folds) sizes batch jobs: they are asked for from it
    (scale_from_work) and released as the work drains; closing the cluster cancels
    the jobs still there. `device` decides a local machine's layout (GPU or CPU).

    A batch cluster's scheduler speaks TLS unless the job options say otherwise
    (jobs.batch_security): Client(cluster) takes its credentials; another client on
    its address needs them given (request.security: `train` passes its client's when it
    scores its folds through run_cohort); any other client is refused.
    """
    if request.is_batch:
        cluster = jobqueue_cluster(request.cluster, request.jobs, request.dashboard_address)
        with cluster, Client(cluster) as client:
            yield client, scale_from_work(cluster, client, request.jobs, work_left)
        return
    if request.cluster != "local":
        with Client(request.cluster, security=request.security) as client:
            yield client, PresentWorkers(client)
        return
    machine = LocalLayout.for_machine(
        request.workers,
        gpu=uses_gpu(device),
        cpu_workers=request.cpu_workers,
        torch_threads=torch_threads,
    )
    cluster = local_cluster(layout=machine, dashboard_address=request.dashboard_address)
    with cluster, Client(cluster) as client:
        yield client, FixedCapacity(request.workers, machine.threads_per_slot)
