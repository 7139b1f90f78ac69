"""One fold's nnU-Net training as a child process of a Dask worker: start it, watch it.

A Dask worker is a daemonic process, and nnU-Net's trainer starts data-augmentation
processes, which a daemonic process may not have. So a fold's training runs in a
process the worker starts (`python -m pingu_dask.nnunet.trainer SPEC.json`), whose
children are then allowed; the worker's task waits for it and passes on what it
reports. This module is the worker's side and imports neither nnunetv2 nor torch:

- `TrainerSpec`: everything the child needs, written as a JSON file beside the fold
  (the child reads nothing else, except nnU-Net's own environment variables, which
  `environment` sets for it: nnU-Net reads its folders from them);
- `FoldProcess`: starts the child, reads the progress lines it appends to
  fold_N/progress.jsonl (one per epoch) as they come, and reports how it ended from
  fold_N/outcome.json.

The child keeps its own fold alive across the worker's death: it checkpoints at a
stated interval, on SIGTERM, and when its parent (this worker) disappears, then exits;
a lock on the fold (a POSIX record lock, released by the kernel when the child
exits, never inherited by its augmentation processes) makes a retried attempt on
another worker wait until the old child has saved and gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: The child's exit code when it stopped early and saved a checkpoint (SIGTERM, its
#: worker gone): sysexits' EX_TEMPFAIL, "try again later". Another attempt resumes.
STOPPED_EXIT_CODE = 75
PROGRESS_FILE = "progress.jsonl"
OUTCOME_FILE = "outcome.json"
SPEC_FILE = "trainer_spec.json"
LOCK_FILE = ".fold.lock"
LATEST_CHECKPOINT = "checkpoint_latest.pth"
FINAL_CHECKPOINT = "checkpoint_final.pth"


@dataclass(frozen=True, kw_only=True)
class NnunetFolders:
    """nnU-Net's three folders (raw, preprocessed, results) for one dataset.

    pingu-dask keeps them inside MODEL_DIR, so that nnU-Net's own commands work on a
    training of ours with these three environment variables set."""

    raw: str
    preprocessed: str
    results: str
    dataset: str  # e.g. Dataset001_pingu

    def environment(self) -> dict[str, str]:
        return {
            "nnUNet_raw": self.raw,
            "nnUNet_preprocessed": self.preprocessed,
            "nnUNet_results": self.results,
        }

    @property
    def raw_dataset(self) -> Path:
        return Path(self.raw) / self.dataset

    @property
    def preprocessed_dataset(self) -> Path:
        return Path(self.preprocessed) / self.dataset

    @property
    def results_dataset(self) -> Path:
        return Path(self.results) / self.dataset


@dataclass(frozen=True, kw_only=True)
class TrainerSettings:
    """How a fold trains: nnU-Net's schedule, made explicit (its defaults are 1000
    epochs of 250 iterations, SGD, a checkpoint every 50 epochs)."""

    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    checkpoint_every: int  # epochs between checkpoints (and on SIGTERM / a lost worker)
    optimizer: str = "sgd"  # sgd (nnU-Net's) | adamw (short schedules: see the demo model)
    initial_lr: float | None = None  # None: nnU-Net's 1e-2 (sgd) / 3e-3 (adamw)
    oversample_foreground: float | None = None  # None: nnU-Net's 0.33
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint interval must be at least 1 epoch")


@dataclass(frozen=True, kw_only=True)
class TrainerSpec:
    """What one fold's child process is told (written to fold_N/trainer_spec.json)."""

    folders: NnunetFolders
    plans: str  # plans identifier, e.g. nnUNetPlans
    configuration: str  # e.g. 3d_fullres
    trainer_folder: str  # the model folder the fold writes into (Trainer__Plans__configuration)
    fold: int
    settings: TrainerSettings
    device: str = "cpu"  # cpu | cuda (the child sees only its own GPU)
    threads: int = 1  # torch threads of the child
    augmentation_processes: int = 1  # nnU-Net's nnUNet_n_proc_DA (0: in the main process)
    init_weights: str | None = None  # a checkpoint to start from (fine-tuning), once
    # ...with its segmentation heads too (the same labels: binary PVS), or without them
    # (nnU-Net's load_pretrained_weights: other labels get freshly initialised heads)
    init_heads: bool = False
    parent_pid: int = 0  # the worker: when it is gone, the child saves and exits
    visible_gpu: str | None = None  # CUDA_VISIBLE_DEVICES for the child

    @property
    def fold_folder(self) -> Path:
        return Path(self.trainer_folder) / f"fold_{self.fold}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerSpec:
        document = json.loads(text)
        return cls(
            **{
                **document,
                "folders": NnunetFolders(**document["folders"]),
                "settings": TrainerSettings(**document["settings"]),
            }
        )

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The child's environment: nnU-Net's folders and processes, and the threads."""
        environment = dict(os.environ if base is None else base)
        environment.update(self.folders.environment())
        environment["nnUNet_n_proc_DA"] = str(self.augmentation_processes)
        environment["nnUNet_def_n_proc"] = "1"
        threads = str(self.threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            environment[name] = threads
        if self.visible_gpu is not None:
            environment["CUDA_VISIBLE_DEVICES"] = self.visible_gpu
        if self.device == "cpu":
            environment["nnUNet_compile"] = "false"
        return environment


def child_device(device: str, slot: int) -> tuple[str, str | None]:
    """(device, CUDA_VISIBLE_DEVICES) for a fold's child on the worker of `slot`: the
    slot's own GPU only (nnU-Net's trainer always takes the first GPU it sees)."""
    from pingu_dask.nnunet.predictor import resolve_device

    resolved = resolve_device(device, slot)
    if not resolved.startswith("cuda"):
        return "cpu", None
    index = int(resolved.partition(":")[2] or 0)
    visible = [
        v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()
    ]
    return "cuda", visible[index] if index < len(visible) else str(index)


def checkpoint_epoch(fold_folder: Path) -> int | None:
    """The epochs a fold's latest checkpoint holds (from its progress lines), or None."""
    saved = None
    for line in read_progress(fold_folder):
        if line.get("checkpoint_epoch") is not None:
            saved = int(line["checkpoint_epoch"])
    return saved


def read_progress(fold_folder: Path) -> list[dict]:
    """Every whole progress line the fold's children wrote (all attempts)."""
    path = Path(fold_folder) / PROGRESS_FILE
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue  # a line being written
    return lines


@dataclass
class FoldExit:
    """How a fold's child ended: its exit code and what it wrote in outcome.json."""

    returncode: int
    outcome: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.outcome.get("status") == "ok"

    @property
    def stopped(self) -> bool:
        """Stopped early with a checkpoint (SIGTERM, worker gone), or killed by a signal."""
        return self.returncode == STOPPED_EXIT_CODE or self.returncode < 0

    def describe(self) -> tuple[str, str]:
        """(error type, message) of a child that did not finish."""
        if self.outcome.get("status") == "error":
            return str(self.outcome.get("error_type")), str(self.outcome.get("message"))
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:  # real-time signals have no name
                name = f"signal {-self.returncode}"
            return "TrainerKilled", f"the trainer process was killed by {name}"
        if self.returncode == STOPPED_EXIT_CODE:
            return "TrainerStopped", str(self.outcome.get("message") or "stopped early")
        return "TrainerFailed", f"the trainer process exited with code {self.returncode}"


class FoldProcess:
    """One fold's child process, started by a worker's task and watched until it ends."""

    def __init__(self, spec: TrainerSpec, log_name: str = "trainer.log") -> None:
        self.spec = spec
        self.folder = spec.fold_folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder / log_name
        self.process: subprocess.Popen | None = None
        self._read = 0  # progress lines already passed on

    def start(self) -> None:
        spec_path = self.folder / SPEC_FILE
        spec_path.write_text(self.spec.to_json())
        (self.folder / OUTCOME_FILE).unlink(missing_ok=True)
        self._read = len(read_progress(self.folder))  # earlier attempts' lines
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pingu_dask.nnunet.trainer", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.spec.environment(),
                start_new_session=True,  # its own process group: signals reach its children
            )
        _running[self.process.pid] = self

    def new_progress(self) -> list[dict]:
        """Progress lines written since the last call."""
        lines = read_progress(self.folder)
        fresh, self._read = lines[self._read :], len(lines)
        return fresh

    def watch(self, on_progress: Callable[[dict], None], every: float = 1.0) -> FoldExit:
        """Wait for the child, passing each new progress line to `on_progress`."""
        assert self.process is not None, "start() first"
        try:
            while self.process.poll() is None:
                for line in self.new_progress():
                    on_progress(line)
                time.sleep(every)
        finally:
            _running.pop(self.process.pid, None)
        for line in self.new_progress():
            on_progress(line)
        return FoldExit(self.process.returncode, read_outcome(self.folder))

    def stop(self) -> None:
        """Ask the child to save a checkpoint and exit (SIGTERM to it alone)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def read_outcome(fold_folder: Path) -> dict:
    try:
        return json.loads((Path(fold_folder) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return {}


#: This process's fold children by pid, so that a stop request can reach them.
_running: dict[int, FoldProcess] = {}
_lock = threading.Lock()


def stop_all() -> int:
    """SIGTERM every fold child of this process (they checkpoint and exit); how many."""
    with _lock:
        children = list(_running.values())
    for child in children:
        child.stop()
    return len(children)


def running() -> Iterator[FoldProcess]:
    yield from list(_running.values())
