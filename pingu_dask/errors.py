"""What can go wrong with a scan, and whether trying again can help.

Input errors (a corrupt or truncated file, NaN voxels, an empty image, a parcellation
that misses the image, ...) fail a scan at once: the same input gives the same error.
Everything else (a worker that died, out of memory, an I/O hiccup on a network file
system) is worth another attempt. Stages wrap what they raise in a StageFailure that
carries the stage, the worker and this verdict, so the driver's ledger can say where
and why without guessing from a traceback.
"""

from __future__ import annotations

from pingu_dask.imaging import ImageError
from pingu_dask.regions import RegionError


class InputError(ValueError):
    """A scan's input cannot be used; the message names the file and the problem."""


INPUT_ERRORS: tuple[type[BaseException], ...] = (ImageError, RegionError, InputError)


class StageFailure(Exception):
    """An error inside a stage, with where it happened and whether to retry."""

    def __init__(
        self, stage: str, worker: str, error_type: str, message: str, retryable: bool
    ) -> None:
        super().__init__(stage, worker, error_type, message, retryable)
        self.stage = stage
        self.worker = worker
        self.error_type = error_type
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.error_type} in {self.stage}: {self.message}"


def describe(error: BaseException) -> tuple[str, str, bool, str | None]:
    """(error type, message, retryable, worker) for any error a scan's future raised."""
    if isinstance(error, StageFailure):
        return error.error_type, f"{error.stage}: {error.message}", error.retryable, error.worker
    name = type(error).__name__
    if name == "KilledWorker":
        message = (
            "the worker process died while working on this scan (killed, or out of memory); "
            f"Dask says: {error}"
        )
        return name, message, True, None
    return name, str(error) or name, not isinstance(error, INPUT_ERRORS), None
