"""Fold checkpoints: read one the same way everywhere, and check a whole model before a run.

A checkpoint that cannot be read fails every scan on every worker in the same way. Found
by the scans, it costs a model load per worker and a dozen failed scans before the
runner's circuit breaker stops the run, and the ledger then holds failures that are not
the scans' fault. `check_checkpoints` reads every fold once on the driver, before any scan
is sent, so that such a model stops the run at once with one message naming the file.

Security: a checkpoint is a torch pickle, i.e. code. Loading one runs it; see the
README's warning (only models from a source you trust).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

from pingu_dask.errors import ModelError
from pingu_dask.nnunet.model import DAMAGED, Model

#: What the predictor reads from an nnU-Net v2 checkpoint (predictor.load_predictor).
V2_KEYS = ("network_weights", "trainer_name")


def load_checkpoint(path: Path, required: tuple[str, ...] = V2_KEYS) -> dict:
    """One checkpoint as a dict holding the `required` keys (v2 by default; v1's
    importer asks for 'state_dict').

    A file torch cannot read (truncated, not a checkpoint, from an incompatible torch)
    is a ModelError: it repeats on every worker and every scan, so the runner does not
    retry it and its circuit breaker can stop the run. An OSError (a network file system
    hiccup) stays what it is: transient, worth another attempt.
    """
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, MemoryError):
        raise
    except Exception as error:
        raise ModelError(
            f"cannot load the checkpoint {path}: {DAMAGED} "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ModelError(
            f"{path} is not a model checkpoint: it holds a {type(checkpoint).__name__}, not a dict"
        )
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise ModelError(
            f"{path} is not a checkpoint of the kind expected: no {', '.join(map(repr, missing))} "
            f"(it has {', '.join(map(repr, sorted(map(str, checkpoint))))})"
        )
    return checkpoint


def check_checkpoints(model: Model) -> None:
    """Read every fold's checkpoint of `model` once, one at a time, and drop it.

    Raises ModelError naming the file when one is truncated or corrupt (torch cannot
    read it, or a member's CRC does not match: torch itself does not check those, so
    flipped bytes inside the weights would otherwise load silently), cannot be read at
    all, or lacks what the predictor needs. Costs one read of each file; the weights are
    not moved to a device and no network is built.
    """
    for fold in model.folds:
        path = model.folder / f"fold_{fold}" / model.checkpoint
        try:
            _check_crc(path)
            checkpoint = load_checkpoint(path)
        except OSError as error:
            raise ModelError(f"cannot read the checkpoint {path}: {error}") from error
        weights = checkpoint["network_weights"]
        if not isinstance(weights, Mapping) or not weights:
            raise ModelError(
                f"{path}: 'network_weights' is not a non-empty state dict "
                f"({type(weights).__name__}): {DAMAGED}, or not an nnU-Net v2 checkpoint"
            )
        del checkpoint, weights  # one fold in memory at a time


def _check_crc(path: Path) -> None:
    """Check the CRC of every member of a zip-format checkpoint (torch >= 1.6 writes
    checkpoints as zips); a legacy pickle checkpoint is left to torch.load."""
    if not zipfile.is_zipfile(path):
        return  # a legacy pickle, or a zip cut short: torch.load will say which
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as error:
        raise ModelError(f"cannot load the checkpoint {path}: {DAMAGED} ({error})") from error
    if bad is not None:
        raise ModelError(
            f"cannot load the checkpoint {path}: {DAMAGED} (CRC mismatch in its member {bad})"
        )


def _first_line(error: BaseException) -> str:
    """torch's miniz errors go on for lines; the first says what happened."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return line.split(". ")[0] if len(line) > 160 else line
