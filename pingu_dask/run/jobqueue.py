"""dask-jobqueue's classes, imported without its side effect on Ctrl-C.

Importing dask_jobqueue runs its runner module (dask_jobqueue/runner.py), which replaces
the process's SIGINT handler with `sys.exit()`, meant for its runner processes. In the
driver that turned Ctrl-C into a silent exit 0: no "interrupted" line, no exit code 130,
and run/signals.py no longer recognised Python's own handler. The handler that was there
before the import is put back (in the main thread, where handlers can be set).
"""

from __future__ import annotations

import signal
import threading

_SIGINT_BEFORE = signal.getsignal(signal.SIGINT)

from dask_jobqueue import PBSCluster, SLURMCluster  # noqa: E402
from dask_jobqueue.pbs import PBSJob  # noqa: E402
from dask_jobqueue.slurm import SLURMJob  # noqa: E402

if _SIGINT_BEFORE is not None and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _SIGINT_BEFORE)

__all__ = ["PBSCluster", "PBSJob", "SLURMCluster", "SLURMJob"]
