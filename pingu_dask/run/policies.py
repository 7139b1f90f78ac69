"""What the driver's loop decides by: how many scans to keep in flight per inference slot
(FeedWindow), and when a run whose scans all fail the same way stops itself
(CircuitBreaker). Plain objects fed with stage times and error reports: tested alone.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from pingu_dask.errors import ErrorReport, Verdict

SCANS_IN_FLIGHT_PER_WORKER = 3  #: one per stage: before any stage time is known


STAGES = ("preprocess", "predict", "finish")


class CircuitBreaker:
    """Notices a run whose scans all fail the same way (a broken model, a broken image
    of the software, a missing GPU driver), which would otherwise fail 100,000 scans
    one by one.

    It trips when the first attempts of `threshold` different scans in a row fail with
    the same error type on at least 2 workers (or on every worker seen, when fewer have
    worked). Input errors neither count nor break the streak: they belong to one scan.
    A success, or a first attempt failing otherwise, starts the count again. Retries
    are not counted: they are the same scan again.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.streak: list[ErrorReport] = []
        self.workers_seen: set[str] = set()

    def succeeded(self, worker: str | None) -> None:
        if worker:
            self.workers_seen.add(worker)
        self.streak.clear()

    def failed(self, attempt: int, report: ErrorReport) -> str | None:
        """Record a failed attempt; the reason to stop, once the breaker trips."""
        if report.worker:
            self.workers_seen.add(report.worker)
        if attempt != 1 or report.verdict is Verdict.INPUT or self.threshold <= 0:
            return None
        if self.streak and self.streak[-1].error_type != report.error_type:
            self.streak.clear()
        self.streak.append(report)
        workers = {r.worker for r in self.streak if r.worker}
        needed = min(2, max(1, len(self.workers_seen)))
        if len(self.streak) >= self.threshold and len(workers) >= needed:
            return (
                f"stopped: the first attempts of {len(self.streak)} scans in a row failed "
                f"with {report.error_type} on {len(workers)} worker(s): {report.message}"
            )
        return None


class FeedWindow:
    """How many scans to keep in flight per inference slot, from the stage times seen.

    Enough that a preprocessed scan is waiting whenever predict frees: at one scan per
    predict time, a scan spends (preprocess + predict + finish) / predict predict-times
    in flight (Little's law), plus one waiting, i.e. 2 + ceil((preprocess + finish) /
    predict) per slot, with the CPU stages' time taken as its mean plus one standard
    deviation: a cohort mixing 1 mm and 0.5 mm heads needs a buffer for the slow ones
    (GPU stand-in, 2 slots on 2 cores: 89 % busy with the median, 98 % with this;
    docs/benchmarks.md, bench_feed). A GPU predicts in a second
    or two while a 0.5 mm head takes longer than that to read and preprocess, so a slot
    needs several scans in the CPU stages at once; on a CPU the network dominates and 3
    suffice. Never fewer than 3 (one per stage, the start), never more than the threads
    a slot has (beyond them the scans only queue, and predict could wait for a thread)
    or `maximum` (pingu.max-scans-per-slot: memory). Times are those of the last 32
    scans that succeeded, so a changing mix of scan sizes is followed.
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = max(SCANS_IN_FLIGHT_PER_WORKER, maximum)
        self.recent: deque[tuple[float, ...]] = deque(maxlen=32)

    def observe(self, seconds: dict[str, float] | None) -> None:
        """A finished scan's seconds per stage (its record's `seconds`)."""
        if seconds and all(stage in seconds for stage in STAGES):
            self.recent.append(tuple(seconds[stage] for stage in STAGES))

    def per_slot(self, threads_per_slot: int | None = None) -> int:
        if not self.recent:
            return SCANS_IN_FLIGHT_PER_WORKER
        cpu = [preprocess + finish for preprocess, _, finish in self.recent]
        predict = max(statistics.fmean(predict for _, predict, _ in self.recent), 1e-3)
        spread = statistics.pstdev(cpu) if len(cpu) > 1 else 0.0
        wanted = 2 + math.ceil((statistics.fmean(cpu) + spread) / predict)
        ceiling = min(self.maximum, threads_per_slot or self.maximum)
        return max(SCANS_IN_FLIGHT_PER_WORKER, min(wanted, ceiling))
