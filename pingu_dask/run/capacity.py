"""How many inference slots (workers) the runner's window of scans plans for, and how many
threads each slot's scans can use: a fixed local cluster, a scheduler someone else runs,
or batch jobs asked for from the work left (jobs.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from pingu_dask.config import INFERENCE_RESOURCE


class Capacity:
    """How many workers (inference slots) the runner's window of scans plans for.

    The runner calls workers(scans_left) before it submits: with a fixed cluster that
    is its size; with batch jobs it is also what the driver asks the batch system for.
    `threads_per_slot` (None: unknown) is every worker thread a slot's scans can use;
    the runner keeps no more scans in flight per slot than that, so that a predict
    task never waits for a thread held by a CPU stage.
    """

    threads_per_slot: int | None = None

    def workers(self, scans_left: int) -> int:
        raise NotImplementedError


@dataclass
class FixedCapacity(Capacity):
    """A cluster of known size (local worker processes)."""

    size: int
    threads_per_slot: int | None = None

    def workers(self, scans_left: int) -> int:
        return self.size


class PresentWorkers(Capacity):
    """A scheduler someone else runs (tcp://): plan for the slots it has now.

    Slots are the workers that offer the inference resource (workers without it only
    preprocess and finish); threads per slot count every worker's threads. Asked of
    the scheduler at most once per `every` seconds (the runner asks before each
    submission; a full scheduler_info() per scan would dominate a fast run).
    """

    def __init__(self, client, every: float = 2.0) -> None:
        self.client = client
        self.every = every
        self._count = 1
        self._asked = -math.inf

    def workers(self, scans_left: int) -> int:
        now = time.monotonic()
        if now - self._asked >= self.every:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {}).values()
            slots = sum(1 for w in workers if w.get("resources", {}).get(INFERENCE_RESOURCE))
            self._count = max(1, slots)
            threads = sum(int(w.get("nthreads", 1)) for w in workers)
            self.threads_per_slot = max(1, threads // self._count) if workers else None
            self._asked = now
        return self._count
