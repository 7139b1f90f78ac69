"""`python -m pingu_dask.run.worker SCHEDULER [dask worker options]`: a Dask worker for pingu-dask.

Batch-system jobs start workers this way (dask-jobqueue's worker_command) instead of
`dask worker`, so that the worker processes get the environment torch inference needs
(cluster.tuned_environment) before their nannies spawn them: the same as local workers.
The job script sets DASK_PINGU__WORKER_THREADS (the cores of one worker process),
which reaches us as the `pingu.worker-threads` config value.
"""

from __future__ import annotations

import sys


def main() -> None:
    from distributed.cli.dask_worker import main as dask_worker

    from pingu_dask.config import worker_threads
    from pingu_dask.run.local import tuned_environment

    # The job script is the one place that knows the cores per worker process: it sets
    # pingu.worker-threads, and each worker sizes torch from it (not the driver's cores).
    tuned_environment(worker_threads())
    sys.argv[0] = "dask-worker"
    dask_worker()


if __name__ == "__main__":
    main()
