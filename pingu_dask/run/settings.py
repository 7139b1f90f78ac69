"""How a run is driven (not what it computes), from Dask's `pingu` config, resolved once.

The command line builds one RunSettings when it builds the run's request
(orchestrate.RunRequest); from there the loop, the table writer, compaction, the lock
and the run's page get plain values. Nothing below reads the config again, so a
setting means the same thing for the whole run, and a 0 given on the command line is
a 0 (never "the default").
"""

from __future__ import annotations

from dataclasses import dataclass

from pingu_dask.config import setting
from pingu_dask.output.lock import LockTimes
from pingu_dask.output.tables import FlushEvery


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The driver's settings of one run (from_config: from the `pingu` config)."""

    retries: int  # transient failures retried per scan
    scan_timeout: float | None  # seconds per attempt; None: no limit
    breaker_scans: int  # first attempts failing alike in a row that stop the run
    max_scans_per_slot: int  # the window's bound per inference slot
    flush: FlushEvery  # how often the driver writes table parts
    compact_above_parts: int | None  # a table's parts before compaction; None: never
    throughput_window_seconds: float  # the run page's scans-per-hour window
    lock: LockTimes  # OUT/.lock's heartbeat and stale times

    @classmethod
    def from_config(
        cls, *, retries: int | None = None, scan_timeout: float | None = None
    ) -> RunSettings:
        """Every value from the `pingu` config (pingu.yaml, a lab's own file or
        DASK_PINGU__* variables); `retries` and `scan_timeout` from the command line
        win when given (a scan_timeout of 0 turns the limit off)."""
        timeout = setting("scan-timeout") if scan_timeout is None else scan_timeout
        compact = setting("compact-above-parts")
        return cls(
            retries=int(setting("retries")) if retries is None else retries,
            scan_timeout=float(timeout) if timeout else None,
            breaker_scans=int(setting("circuit-breaker-scans")),
            max_scans_per_slot=int(setting("max-scans-per-slot")),
            flush=FlushEvery(
                scans=int(setting("flush-every-scans")),
                seconds=float(setting("flush-every-seconds")),
            ),
            compact_above_parts=None if compact is None else int(compact),
            throughput_window_seconds=float(setting("throughput-window-seconds")),
            lock=lock_times(),
        )


def lock_times() -> LockTimes:
    """OUT/.lock's times from the config (a run's, and what `status` judges a lock by)."""
    return LockTimes(
        heartbeat_seconds=float(setting("lock-heartbeat-seconds")),
        stale_seconds=float(setting("lock-stale-seconds")),
    )
