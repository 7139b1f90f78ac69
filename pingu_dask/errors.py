"""What can go wrong with a scan, and whether trying again can help.

Every error a scan's attempt raises gets one of three verdicts:

- **input**: the scan's own files cannot be used (a corrupt or truncated file, NaN
  voxels, an empty image, a parcellation that misses the image, ...). The same input
  gives the same error, so the scan fails at once; other scans are not affected.
- **transient**: the attempt was unlucky: its worker was lost (killed, pre-empted, out
  of memory), an I/O call on a network file system failed, memory ran out, or the
  attempt passed the per-scan time limit. Another attempt, maybe on another worker,
  can succeed, so the driver retries it (up to `--retries`).
- **repeats**: everything else: a model that cannot be loaded, a shape mismatch, a
  programming error (TypeError, KeyError, ...). Retrying would give the same error on
  every worker, so the scan fails at once with the message kept; when the first
  attempts of many scans fail like this, the runner's circuit breaker stops the run.

Stages wrap what they raise in a StageFailure that carries the stage, the worker and
the verdict, so that the driver's ledger can say where and why without guessing from
a traceback.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from enum import StrEnum


class PinguError(Exception):
    """Root of pingu-dask's own errors; each layer derives its own from these."""


class InputError(PinguError, ValueError):
    """A scan's input cannot be used; the message names the file and the problem.

    The input layer's errors (an unreadable image, an unusable parcellation, a bad
    manifest) derive from it, so a stage's verdict needs no list of them.
    """


class ModelError(PinguError, ValueError):
    """A model that cannot be used; the message says what is wrong and what to pass."""


class RunError(PinguError, RuntimeError):
    """A run that cannot start or go on as asked (another run holds OUT, other
    settings in OUT, the circuit breaker stopped it)."""


class Verdict(StrEnum):
    """Whether another attempt at a scan can help (see the module docstring)."""

    INPUT = "input"
    TRANSIENT = "transient"
    REPEATS = "repeats"


def _transient_types() -> tuple[type[BaseException], ...]:
    """Errors another attempt can get past. OSError covers I/O, broken connections
    (distributed's CommClosedError) and TimeoutError; torch's OutOfMemoryError is a
    RuntimeError and is recognised by name, so that torch is not imported here."""
    from distributed.scheduler import KilledWorker

    return (OSError, MemoryError, KilledWorker)


def verdict_of(error: BaseException) -> Verdict:
    """The verdict for an error raised by a scan's attempt (or by Dask about it)."""
    if isinstance(error, StageFailure):
        return error.verdict
    if isinstance(error, InputError):
        return Verdict.INPUT
    if isinstance(error, _transient_types()):
        return Verdict.TRANSIENT
    if type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower():
        return Verdict.TRANSIENT  # torch.OutOfMemoryError, "CUDA error: out of memory"
    return Verdict.REPEATS


#: The longest message a StageFailure carries. Dask replaces an exception whose text
#: passes distributed.admin.max-error-length (10,000) with a generic "Long error
#: message" one, losing its type and verdict (torch's state-dict mismatches run to
#: 40,000 characters); the ledger wants a readable reason anyway.
MAX_MESSAGE_LENGTH = 2000


def shortened(message: str, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """`message` cut to `limit` characters, saying how much was left out."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]} ... ({len(message) - limit:,} more characters)"


class StageFailure(Exception):
    """An error inside a stage, with where it happened and the verdict on retrying."""

    def __init__(
        self, stage: str, worker: str, error_type: str, message: str, verdict: Verdict
    ) -> None:
        message = shortened(message)
        super().__init__(stage, worker, error_type, message, verdict)
        self.stage = stage
        self.worker = worker
        self.error_type = error_type
        self.message = message
        self.verdict = Verdict(verdict)

    @property
    def retryable(self) -> bool:
        return self.verdict is Verdict.TRANSIENT

    def __str__(self) -> str:
        return f"{self.error_type} in {self.stage}: {self.message}"


@dataclass(frozen=True, kw_only=True)
class ErrorReport:
    """What the ledger records about a failed attempt."""

    error_type: str
    message: str
    worker: str | None = None
    verdict: Verdict = Verdict.REPEATS

    @property
    def retryable(self) -> bool:
        return self.verdict is Verdict.TRANSIENT


class OutOfSpace(RunError):
    """The output's file system is full or over its quota: every further write would
    fail the same way, and no scan is to blame, so the run stops (see is_out_of_space)."""


# How a full disk (ENOSPC, 28) or quota (EDQUOT, 122 on Linux) reads once the error has
# become text: a worker's StageFailure crosses to the driver as its message only.
_OUT_OF_SPACE_TEXT = (
    f"[errno {errno.ENOSPC}]",
    f"[errno {errno.EDQUOT}]",
    os.strerror(errno.ENOSPC).lower(),  # "no space left on device"
    os.strerror(errno.EDQUOT).lower(),  # "disk quota exceeded"
)


def is_out_of_space(failure: BaseException | ErrorReport) -> bool:
    """Whether an error (or what the ledger would record of it) is a full file system
    or quota: then no scan can be written until space is freed, so retrying, or
    failing scan after scan, would only lose work. Looks at the error, its causes and
    context (an OSError wrapped by Zarr, or raised again while cleaning up), and at the
    message of a worker's StageFailure or an ErrorReport."""
    if isinstance(failure, ErrorReport):
        return _names_out_of_space(f"{failure.error_type}: {failure.message}")
    seen: set[int] = set()
    error: BaseException | None = failure
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OutOfSpace):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, StageFailure) and _names_out_of_space(error.message):
            return True
        error = error.__cause__ or error.__context__
    return False


def _names_out_of_space(text: str) -> bool:
    text = text.lower()
    return any(phrase in text for phrase in _OUT_OF_SPACE_TEXT)


def describe(error: BaseException) -> ErrorReport:
    """The report for any error a scan's future raised."""
    if isinstance(error, StageFailure):
        message = f"{error.stage}: {error.message}"
        return ErrorReport(
            error_type=error.error_type, message=message, worker=error.worker, verdict=error.verdict
        )
    verdict = verdict_of(error)
    name = type(error).__name__
    if name == "KilledWorker":
        last = getattr(error, "last_worker", None)
        message = (
            "the worker process died while working on this scan (killed, pre-empted, "
            f"or out of memory); Dask says: {error}"
        )
        worker = getattr(last, "address", None)
        return ErrorReport(error_type=name, message=message, worker=worker, verdict=verdict)
    return ErrorReport(error_type=name, message=str(error) or name, verdict=verdict)
