"""`python -m pingu_dask.run.worker SCHEDULER [dask worker options]`: a Dask worker for pingu-dask.

Batch-system jobs (run/jobs.py) start workers this way (their dask-jobqueue
worker_command) instead of `dask worker`, so that the worker processes get the
environment torch inference needs (local.tuned_config) before their nannies spawn
them: the same as local workers. The job script sets DASK_PINGU__WORKER_THREADS (the
cores of one worker process), which reaches us as the `pingu.worker-threads` config
value. TLS options (--tls-ca-file, --tls-cert, --tls-key) are `dask worker`'s own.
"""

from __future__ import annotations

import sys


def main() -> None:
    import dask.config
    from distributed.cli.dask_worker import main as dask_worker

    from pingu_dask.config import worker_threads
    from pingu_dask.run.local import tuned_config

    # The job script is the one place that knows the cores per worker process: it sets
    # pingu.worker-threads, and each worker sizes torch from it (not the driver's cores).
    # The nannies are created inside dask_worker(), which runs until the worker ends.
    sys.argv[0] = "dask-worker"
    with dask.config.set(tuned_config(worker_threads())):
        dask_worker()


if __name__ == "__main__":
    main()
