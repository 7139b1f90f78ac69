"""Batch-system signals stop a run the way Ctrl-C does.

SLURM sends SIGTERM at the walltime and on `scancel`, PBS on `qdel`; a closed terminal
sends SIGHUP. Python would die on them without running any clean-up, leaving the
in-flight scans running and OUT/.lock behind, so that a resubmitted driver is refused.
Inside `stop_on_signals()` they raise Stopped, a KeyboardInterrupt: the runner cancels
what is in flight, the table writer flushes, the lock is released, and the CLI exits
128 + the signal number (143 for SIGTERM, 129 for SIGHUP; Ctrl-C stays 130). A repeated
signal during that clean-up is ignored, so it is not cut short half-way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """The run was asked to stop by a signal (`signum`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into Stopped for the duration of the block (main thread
    only: Python delivers signals there; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handle(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return  # already cleaning up: let it finish
        stopping = True
        raise Stopped(signum)

    previous = {number: signal.signal(number, handle) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
