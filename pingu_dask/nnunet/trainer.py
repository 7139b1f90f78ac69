"""`python -m pingu_dask.nnunet.trainer SPEC.json`: one fold's nnU-Net training (the child).

Started by a Dask worker's task (trainer_process.FoldProcess), never by hand. It is
nnU-Net's own trainer (nnUNetTrainer: its network, loss, data loading, augmentation
processes, poly learning rate, checkpoint format), in a subclass that changes only what
a batch system needs:

- **the schedule** from the spec (epochs, iterations, validation iterations; AdamW
  for short schedules, as the bundled demo model was trained), instead of attributes
  edited in a trainer subclass per experiment;
- **checkpoints** every `checkpoint_every` epochs (nnU-Net: 50), written to a temporary
  name and renamed (a kill in the middle never leaves a truncated checkpoint_latest),
  and also when asked to stop: on SIGTERM (SLURM's walltime or scancel, PBS's qdel, a
  Ctrl-C of the driver) and when the worker that started it is gone. Such a stop comes
  between two iterations; the checkpoint then says the interrupted epoch starts again,
  with the weights as trained so far. The child exits with STOPPED_EXIT_CODE;
- **progress**: one JSON line per epoch (loss, pseudo-Dice, seconds, the share of time
  spent waiting for augmented batches: a GPU starves when that share is high);
- **resume**: from checkpoint_latest when there is one; from `init_weights` (nnU-Net's
  load_pretrained_weights: every layer but the segmentation heads) when starting afresh.

The final (and best) checkpoints name the plain `nnUNetTrainer` as their trainer: this
subclass changes nothing of the network or of inference, so nnUNetv2_predict and
nnU-Net's trainer lookup find a class they know.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from pingu_dask.nnunet.trainer_process import (
    FINAL_CHECKPOINT,
    LATEST_CHECKPOINT,
    LOCK_FILE,
    OUTCOME_FILE,
    PROGRESS_FILE,
    STOPPED_EXIT_CODE,
    TrainerSettings,
    TrainerSpec,
)

#: The trainer that the final checkpoints name (see the module docstring).
EXPORTED_TRAINER = "nnUNetTrainer"
ADAMW_LR = 3e-3
STOP_DEADLINE_SECONDS = 120.0  # a stop not honoured by then (a hung batch) exits hard
LOCK_WAIT_SECONDS = 900.0  # an earlier attempt's child still saving: wait this long


class StopRequested(Exception):
    """Raised between iterations after SIGTERM or the loss of the parent worker."""


class _Stop:
    """Why the fold must stop, set from a signal handler or the watchdog thread."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.since: float | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason, self.since = reason, time.monotonic()


STOP = _Stop()


class PinguTrainer(nnUNetTrainer):
    """nnUNetTrainer with the schedule, checkpoints and progress of a batch system."""

    settings: TrainerSettings  # set on the class by main() before it is built
    progress_path: Path

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = self.settings
        self.num_epochs = settings.epochs
        self.num_iterations_per_epoch = settings.iterations_per_epoch
        self.num_val_iterations_per_epoch = settings.val_iterations_per_epoch
        self.save_every = settings.checkpoint_every
        if settings.oversample_foreground is not None:
            self.oversample_foreground_percent = settings.oversample_foreground
        if settings.initial_lr is not None:
            self.initial_lr = settings.initial_lr
        elif settings.optimizer == "adamw":
            self.initial_lr = ADAMW_LR
        self.checkpoint_epoch: int | None = None  # epochs held by the latest checkpoint
        self.data_wait = 0.0  # seconds of this epoch spent waiting for batches

    def configure_optimizers(self):
        if self.settings.optimizer != "adamw":
            return super().configure_optimizers()
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        optimizer = torch.optim.AdamW(
            self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written under a temporary name and renamed into place
        (a kill in the middle of torch.save leaves the previous checkpoint whole)."""
        path = Path(filename)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
        super().save_checkpoint(str(temporary))
        if not temporary.exists():  # checkpointing disabled
            return
        os.replace(temporary, path)
        if path.name == LATEST_CHECKPOINT:
            self.checkpoint_epoch = self.current_epoch + 1  # what save_checkpoint stored

    def run_training(self) -> None:
        """nnU-Net's loop, with a stop check and the data-wait time per iteration."""
        self.on_train_start()
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            self.data_wait = 0.0
            for _ in range(self.num_iterations_per_epoch):
                self._stop_if_asked()
                waited = time.perf_counter()
                batch = next(self.dataloader_train)
                self.data_wait += time.perf_counter() - waited
                outputs.append(self.train_step(batch))
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                validation = []
                for _ in range(self.num_val_iterations_per_epoch):
                    self._stop_if_asked()
                    validation.append(self.validation_step(next(self.dataloader_val)))
                self.on_validation_epoch_end(validation)
            self.on_epoch_end()
            self._report_epoch()
        self.on_train_end()

    def _stop_if_asked(self) -> None:
        if STOP.reason is not None:
            raise StopRequested(STOP.reason)

    def save_interrupted(self) -> int:
        """Save the weights as trained so far; the interrupted epoch starts again on
        resume (its partial log entries are dropped). Returns the epochs saved."""
        logging = self.logger.get_checkpoint()
        for values in logging.values():
            del values[self.current_epoch :]
        self.current_epoch -= 1  # save_checkpoint stores current_epoch + 1
        try:
            self.save_checkpoint(str(Path(self.output_folder) / LATEST_CHECKPOINT))
        finally:
            self.current_epoch += 1
        return self.current_epoch

    def _report_epoch(self) -> None:
        epoch = self.current_epoch - 1  # on_epoch_end has moved on
        value = self.logger.get_value

        def number(key: str) -> float | None:
            item = value(key, step=epoch)
            result = float(np.mean(item)) if isinstance(item, list | tuple) else float(item)
            return result if np.isfinite(result) else None

        seconds = value("epoch_end_timestamps", step=epoch) - value(
            "epoch_start_timestamps", step=epoch
        )
        iterations = self.num_iterations_per_epoch
        append_progress(
            self.progress_path,
            {
                "event": "epoch",
                "epoch": epoch + 1,  # epochs completed
                "epochs": self.num_epochs,
                "train_loss": number("train_losses"),
                "val_loss": number("val_losses"),
                "pseudo_dice": number("mean_fg_dice"),
                "ema_pseudo_dice": number("ema_fg_dice"),
                "epoch_seconds": seconds,
                "iterations_per_second": iterations / seconds if seconds > 0 else None,
                "data_wait_share": min(1.0, self.data_wait / seconds) if seconds > 0 else None,
                "checkpoint_epoch": self.checkpoint_epoch,
                "time": time.time(),
            },
        )


def append_progress(path: Path, line: dict) -> None:
    """One JSON line, written with one write() so that a reader never sees half of it."""
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")


def _watch_parent(parent_pid: int) -> None:
    """Ask the fold to stop when the worker that started it is gone; exit hard if a
    stop is not honoured in time (a batch that never comes)."""
    while True:
        time.sleep(1.0)
        if parent_pid and os.getppid() != parent_pid:
            STOP.request("its worker is gone")
        if STOP.since is not None and time.monotonic() - STOP.since > STOP_DEADLINE_SECONDS:
            os._exit(STOPPED_EXIT_CODE)


def _lock_fold(folder: Path, parent_pid: int) -> int:
    """Hold the fold's lock (a POSIX record lock: per process, not inherited by the
    augmentation processes, released by the kernel when this process ends), waiting
    while an earlier attempt's child still saves."""
    handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError:
            if time.monotonic() > deadline or (parent_pid and os.getppid() != parent_pid):
                raise TimeoutError(f"{folder} is still held by an earlier attempt") from None
            time.sleep(1.0)


def _seed(seed: int | None) -> None:
    """Seed the trainer's own sampling. nnU-Net's augmentation processes draw their own
    seeds, so a training is reproducible in its splits, plans and schedule, not to the
    bit (nnU-Net's trainer is not deterministic either)."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_outcome(folder: Path, outcome: dict) -> None:
    temporary = folder / f".{OUTCOME_FILE}.partial"
    temporary.write_text(json.dumps(outcome, indent=2))
    os.replace(temporary, folder / OUTCOME_FILE)


def train(spec: TrainerSpec) -> dict:
    """Train (or resume) the fold; the outcome that outcome.json records."""
    folder = spec.fold_folder
    final = folder / FINAL_CHECKPOINT
    if final.exists():
        return {"status": "ok", "already_done": True, **_summary(folder)}
    plans_path = spec.folders.preprocessed_dataset / f"{spec.plans}.json"
    plans = json.loads(plans_path.read_text())
    dataset_json = json.loads((spec.folders.preprocessed_dataset / "dataset.json").read_text())
    latest = folder / LATEST_CHECKPOINT
    plans["continue_training"] = latest.exists()
    PinguTrainer.settings = spec.settings
    PinguTrainer.progress_path = folder / PROGRESS_FILE
    device = torch.device("cuda" if spec.device.startswith("cuda") else spec.device)
    trainer = PinguTrainer(plans, spec.configuration, spec.fold, dataset_json, device)
    if Path(trainer.output_folder) != folder:
        raise RuntimeError(f"nnU-Net would write fold {spec.fold} to {trainer.output_folder}")
    resumed_from = 0
    if latest.exists():
        trainer.load_checkpoint(str(latest))
        resumed_from = trainer.current_epoch
        trainer.checkpoint_epoch = resumed_from
    elif spec.init_weights:
        trainer.initialize()
        load_initial_weights(trainer, spec.init_weights, spec.init_heads)
    append_progress(
        PinguTrainer.progress_path,
        {
            "event": "started",
            "from_epoch": resumed_from,
            "epochs": spec.settings.epochs,
            "time": time.time(),
        },
    )
    started = time.perf_counter()
    try:
        trainer.run_training()
    except StopRequested as stop:
        saved = trainer.save_interrupted()
        _finish_loaders(trainer)
        return {
            "status": "stopped",
            "message": f"stopped at epoch {saved} ({stop}); checkpoint saved",
            "checkpoint_epoch": saved,
            "resumed_from": resumed_from,
        }
    name_the_plain_trainer(folder)
    return {
        "status": "ok",
        "resumed_from": resumed_from,
        "seconds": time.perf_counter() - started,
        **_summary(folder),
    }


def load_initial_weights(trainer: nnUNetTrainer, path: str, heads: bool) -> None:
    """Start from a trained model's weights (fine-tuning).

    nnU-Net's load_pretrained_weights transfers every layer but the segmentation heads,
    which it leaves freshly initialised, since the labels usually differ. A PVS model
    fine-tuned on PVS masks has the same labels, and starting its heads from scratch
    throws away what it knew (measured here: after 3 iterations the demo model's voxel
    Dice fell from 0.83 to 0); so with `heads` every weight is loaded, and the shapes
    must all match.
    """
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    with contextlib.redirect_stdout(sys.stderr):
        load_pretrained_weights(trainer.network, path, verbose=False)
    if not heads:
        return
    weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    network = trainer.network
    mine = network.state_dict()
    mismatched = [k for k, v in weights.items() if k in mine and mine[k].shape != v.shape]
    if mismatched or set(mine) - set(weights):
        raise RuntimeError(
            f"{path}: its segmentation heads do not fit this network ({len(mismatched)} "
            "layers of another shape): fine-tune with other labels, without its heads"
        )
    network.load_state_dict({k: weights[k] for k in mine})


def name_the_plain_trainer(folder: Path) -> None:
    """Make the fold's final and best checkpoints name nnUNetTrainer (module docstring)."""
    for name in (FINAL_CHECKPOINT, "checkpoint_best.pth"):
        path = folder / name
        if not path.exists():
            continue
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint["trainer_name"] = EXPORTED_TRAINER
        temporary = path.with_name(f".{name}.{os.getpid()}.partial")
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)


def _summary(folder: Path) -> dict:
    """Figures of the whole fold, from its progress lines."""
    epochs = [line for line in _progress(folder / PROGRESS_FILE) if line.get("event") == "epoch"]
    if not epochs:
        return {}
    last = epochs[-1]
    rates = [line["iterations_per_second"] for line in epochs if line.get("iterations_per_second")]
    waits = [line["data_wait_share"] for line in epochs if line.get("data_wait_share") is not None]
    return {
        "epochs": last["epoch"],
        "final_pseudo_dice": last.get("pseudo_dice"),
        "final_ema_pseudo_dice": last.get("ema_pseudo_dice"),
        "iterations_per_second": float(np.median(rates)) if rates else None,
        "data_wait_share": float(np.median(waits)) if waits else None,
    }


def _progress(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(text) for text in path.read_text().splitlines() if text.strip()]


def _finish_loaders(trainer: nnUNetTrainer) -> None:
    """Stop nnU-Net's augmentation processes before exiting."""
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            with contextlib.suppress(Exception):
                finish()


def main(spec_path: str) -> int:
    spec = TrainerSpec.from_json(Path(spec_path).read_text())
    folder = spec.fold_folder
    folder.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: STOP.request("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: STOP.request("SIGINT"))
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), daemon=True).start()
    torch.set_num_threads(spec.threads)
    seed = spec.settings.seed
    _seed(None if seed is None else seed + spec.fold)  # each fold its own, every attempt
    try:
        _lock_fold(folder, spec.parent_pid)
        outcome = train(spec)
    except Exception as error:
        traceback.print_exc()
        outcome = {
            "status": "error",
            "error_type": type(error).__name__,
            "message": str(error) or type(error).__name__,
        }
    _write_outcome(folder, outcome)
    if outcome["status"] == "stopped":
        return STOPPED_EXIT_CODE
    return 0 if outcome["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
