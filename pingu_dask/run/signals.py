"""Batch-system signals stop a run the way Ctrl-C does.

SLURM sends SIGTERM at the walltime and on `scancel`, PBS on `qdel`; a closed terminal
sends SIGHUP. Python would die on them without running any clean-up, leaving the
in-flight scans running and OUT/.lock behind, so that a resubmitted driver is refused.
Inside `stop_on_signals()` they raise Stopped, a KeyboardInterrupt: the runner cancels
what is in flight, the table writer flushes, the lock is released, and the CLI exits
128 + the signal number (143 for SIGTERM, 129 for SIGHUP; Ctrl-C stays 130).

Once stopping, a repeated signal (the same or another of these, Ctrl-C included) is
ignored, so the clean-up is not cut short half-way; a note says it is under way. The
clean-up still cannot hang forever: if it has not finished `pingu.stop-grace-seconds`
after the first signal, the process exits at once with the same code. OUT/.lock is
then left, but as its process is gone (and its heartbeat stops) it is stale.
A signal this process was told to ignore (SIGHUP under `nohup`) stays ignored. A process
forked while the block runs gets the signal's default action, not Stopped.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from pingu_dask.config import setting

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


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal number: 143 SIGTERM, 129 SIGHUP, 130 Ctrl-C (SIGINT)."""
    return interrupt.exit_code if isinstance(interrupt, Stopped) else 128 + signal.SIGINT


class _Stopping:
    """What the handlers share: the first signal, and the hard exit it arms."""

    def __init__(self, grace: float | None) -> None:
        self.grace = grace
        self.signum: int | None = None
        self.timer: threading.Timer | None = None

    def begin(self, signum: int) -> None:
        self.signum = signum
        if self.grace:
            self.timer = threading.Timer(self.grace, self._hard_exit)
            self.timer.daemon = True
            self.timer.start()

    def again(self, signum: int) -> None:
        first = signal.Signals(self.signum).name if self.signum is not None else "a signal"
        within = f"; it ends within {self.grace:.0f} s of the first signal" if self.grace else ""
        _say(f"{signal.Signals(signum).name} ignored: still cleaning up after {first}{within}")

    def _hard_exit(self) -> None:
        signum = self.signum or signal.SIGTERM
        _say(f"clean-up still not finished {self.grace:.0f} s after the signal: exiting now")
        os._exit(128 + signum)

    def done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _say(message: str) -> None:
    """To stderr with one write: safe inside a signal handler, past any progress bar."""
    with suppress(OSError):
        os.write(2, f"\npingu-dask: {message}\n".encode())


def _ours(number: int) -> bool:
    """Whether to handle this signal: not if it is ignored (nohup, a parent's choice),
    and SIGINT only while it has Python's own handler (KeyboardInterrupt)."""
    current = signal.getsignal(number)
    if number == signal.SIGINT:
        return current is signal.default_int_handler
    return current is not signal.SIG_IGN


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into Stopped for the duration of the block (main thread
    only: Python delivers signals there; elsewhere this does nothing); see the module
    docstring for repeats and the grace time."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    grace = setting("stop-grace-seconds")
    stopping = _Stopping(float(grace) if grace else None)
    owner = os.getpid()

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            # A child forked while the block ran (a library's process pool, e.g. nnU-Net's
            # planner listing files) inherits this handler: it must die of the signal as
            # it would have, not raise Stopped where its pool cannot see it (which left
            # such a pool waiting forever for a worker stuck on its queue's lock).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stopping.signum is not None:
            stopping.again(signum)
            return  # already cleaning up: let it finish
        stopping.begin(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(signum)

    numbers = [n for n in (*STOP_SIGNALS, signal.SIGINT) if _ours(n)]
    previous = {number: signal.signal(number, handle) for number in numbers}
    try:
        yield
    finally:
        stopping.done()
        for number, handler in previous.items():
            signal.signal(number, handler)
