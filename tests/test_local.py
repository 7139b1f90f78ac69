"""Local worker processes: the environment they get, and Dask's config left alone."""

from __future__ import annotations

import copy
import os

import dask.config
from distributed import Client

from pingu_dask.config import INFERENCE_RESOURCE
from pingu_dask.run.local import LocalLayout, local_cluster


def worker_view() -> dict:
    """What a worker process sees: its thread variables, malloc tunable and threads."""
    from pingu_dask.config import worker_threads

    return {
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "worker_threads": worker_threads(),
    }


def tuned_sections() -> dict:
    """The parts of Dask's config that tuned_config() and scheduler_options() are about
    (a whole-config comparison would see other tests' clients come and go)."""
    return copy.deepcopy(
        {
            "nanny": dask.config.get("distributed.nanny"),
            "scheduler": dask.config.get("distributed.scheduler"),
            "pingu": dask.config.get("pingu"),
        }
    )


def test_workers_are_tuned_and_dasks_config_is_left_as_it_was() -> None:
    """An inference worker and a CPU worker beside it: both there when local_cluster
    returns (no waiting), each with its own torch threads (whatever earlier clusters of
    this process left in its environment) and without Dask's malloc tunable; the
    scheduler with allowed-failures from our config (read while it started); and the
    driver's Dask config as it was before (the tuned values were set around the
    nannies' creation only)."""
    layout = LocalLayout(1, 2, 1, cpu_workers=1, threads_per_cpu_worker=2)
    with dask.config.set({"pingu.allowed-failures": 1}):
        before = tuned_sections()
        cluster = local_cluster(layout=layout, dashboard_address="127.0.0.1:0")
        assert tuned_sections() == before
    with cluster, Client(cluster) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 2  # the CPU worker too, before anyone waited for it
        seen = client.run(worker_view)
        slots = {a: w["resources"].get(INFERENCE_RESOURCE) for a, w in workers.items()}
        for address, view in seen.items():
            threads = 1 if slots[address] else 2
            assert view == {"omp": str(threads), "malloc_trim": None, "worker_threads": threads}
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 1
