"""One `train`'s request, and what MODEL_DIR/training.json says of it.

`TrainRequest` is everything a training is told, resolved once (by the CLI from its
options and Dask's config, or by a test); nothing below it reads a setting again.
`check_previous` decides what a second `train` on the same MODEL_DIR does: go on (the
same manifest and settings), refuse (others, naming them), or start afresh (--force).
"""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pingu_dask.errors import RunError
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.manifest import ManifestReport
from pingu_dask.nnunet.model import Model
from pingu_dask.nnunet.planning import Preset
from pingu_dask.nnunet.trainer_process import TrainerSettings
from pingu_dask.output import training as layout
from pingu_dask.records import timestamp
from pingu_dask.run.clusters import ClusterRequest
from pingu_dask.run.provenance import manifest_info, package_versions
from pingu_dask.train import evaluation
from pingu_dask.train.splits import SplitSpec
from pingu_dask.version import __version__


class TrainRefused(RunError):
    """The training cannot start as asked (another manifest or settings in MODEL_DIR)."""


@dataclass(kw_only=True)
class TrainRequest:
    """Everything one `train` is told, resolved once (by the CLI, or a test)."""

    report: ManifestReport  # the validated manifest; its bad rows are left out
    model_dir: Path
    split: SplitSpec
    channel_names: tuple[str, ...]  # dataset.json names, in order (e.g. ("T1w",))
    schedule: TrainerSettings
    scoring: evaluation.Scoring  # how validation cases are predicted and scored
    preset: Preset | None = None
    target_spacing: tuple[float, ...] | None = None
    init: Model | None = None  # fine-tune from this model (its plans and weights)
    cluster: ClusterRequest = field(default_factory=ClusterRequest)
    device: str = "auto"
    checks: CheckThresholds = field(default_factory=CheckThresholds)
    strict: bool = False
    augmentation_processes: int | None = None
    evaluate: bool = True
    prepare_only: bool = False  # stop after preprocessing (e.g. on a CPU node)
    force: bool = False
    command: tuple[str, ...] = ()


def settings_record(request: TrainRequest) -> dict:
    """What decides the model (compared when a MODEL_DIR is trained again)."""
    return {
        "manifest_sha256": (manifest_info(request.report.path) or {}).get("sha256"),
        "split": asdict(request.split),
        "channels": list(request.channel_names),
        "preset": request.preset.name if request.preset else None,
        "target_spacing": list(request.target_spacing) if request.target_spacing else None,
        "init": request.init.fingerprint if request.init else None,
        "schedule": asdict(request.schedule),
        "orientation": request.scoring.inference.orientation,
    }


def check_previous(model_dir: Path, request: TrainRequest) -> dict:
    """training.json for this run: a new one, or the earlier one if it was made from the
    same manifest and settings (else refused, or started afresh with --force)."""
    previous = layout.read_training_json(model_dir)
    mine = settings_record(request)
    if previous is not None and request.force:
        reset(model_dir)
        previous = None
    if previous is not None and previous.get("settings") != mine:
        changed = [k for k, v in mine.items() if (previous.get("settings") or {}).get(k) != v]
        raise TrainRefused(
            f"{model_dir} holds a training from another manifest or other settings "
            f"(different: {', '.join(changed) or 'settings'}). Use another --out, or "
            "--force to delete it and start afresh."
        )
    if previous is not None:
        return previous
    return {
        "tool": "pingu-dask",
        "version": __version__,
        "created": timestamp(),
        "settings": mine,
        "manifest": manifest_info(request.report.path),
        "split": {**asdict(request.split), "description": request.split.describe()},
        "schedule": asdict(request.schedule),
        "seeds": {"split": request.split.seed, "trainer": request.schedule.seed},
        "device": request.device,
        "orientation": request.scoring.inference.orientation,
        "scoring": {
            "inference": asdict(request.scoring.inference),
            "clusters": asdict(request.scoring.pvs_rules),
            "regions": request.scoring.regions.name,
        },
        "versions": {
            "pingu-dask": __version__,
            "python": platform.python_version(),
            **package_versions(("nnunetv2", "torch", "dask", "distributed", "numpy")),
        },
        "host": platform.node(),
        "python_executable": sys.executable,
    }


def reset(model_dir: Path) -> None:
    """Delete a training's outputs (not the lock)."""
    for child in model_dir.iterdir():
        if child.name == ".lock":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
