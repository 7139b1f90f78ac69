"""nnU-Net v2 models: find or unpack one, fingerprint it, and build its predictor.

This is the one seam to nnU-Net (see DESIGN.md). A model is a trained-model folder
(`Trainer__Plans__configuration/` with dataset.json, plans.json and fold_N/checkpoint)
or a zip made by `nnUNetv2_export_model_to_zip`, unpacked once into the cache.

The network is built from plans.json, not by looking the trainer class up by name:
nnU-Net's lookup imports every trainer module it ships, and one broken optional import
(torchvision, timm) or a custom trainer the user does not have installed then stops
inference that does not need the trainer at all. Only when the plans do not describe the
saved weights do we fall back to nnU-Net's own lookup.

Security: a checkpoint is a torch pickle, i.e. code. Loading a model runs it. Only use
models from a source you trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pingu_dask.config import InferenceSettings, cache_dir
from pingu_dask.errors import ModelError

DEMO_NAME = "demo"
CHECKPOINT_SUFFIX = ".pth"


@dataclass(frozen=True)
class Model:
    """A located, fingerprinted nnU-Net v2 model. Small and picklable: it travels with tasks."""

    folder: Path
    folds: tuple[str, ...]
    checkpoint: str
    channel_names: tuple[str, ...]  # as in dataset.json, in input order, e.g. ("T1w",)
    labels: tuple[tuple[str, int], ...]
    fingerprint: str
    configuration: str = "3d_fullres"  # from the folder name Trainer__Plans__configuration

    @property
    def channels(self) -> tuple[str, ...]:
        """Manifest column names for the input channels: dataset.json names, lower-cased."""
        return tuple(manifest_column(name) for name in self.channel_names)

    @property
    def name(self) -> str:
        return self.folder.name


def manifest_column(channel_name: str) -> str:
    """dataset.json channel name -> manifest column: 'T1w' -> 't1w', 'T2 FLAIR' -> 't2_flair'."""
    return re.sub(r"[^0-9a-z]+", "_", channel_name.strip().lower()).strip("_")


def demo_model_folder() -> Path:
    """The small model bundled with the package (trained on synthetic data only)."""
    root = Path(str(resources.files("pingu_dask") / "models" / DEMO_NAME))
    folders = [p for p in root.iterdir() if (p / "plans.json").exists()] if root.exists() else []
    if len(folders) != 1:
        raise ModelError(f"the bundled demo model is missing from {root}")
    return folders[0]


def resolve_model(
    spec: str | Path, folds: tuple[str, ...] | None = None, checkpoint: str = "checkpoint_final.pth"
) -> Model:
    """Find the model named by `spec` ('demo', a model folder, a parent folder, or a zip)."""
    if str(spec) == DEMO_NAME:
        folder = demo_model_folder()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(f"model not found: {path}")
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise ModelError(
                    f"{path} is a file but not a zip made by nnUNetv2_export_model_to_zip"
                )
            path = unpack_zip(path)
        folder = find_model_folder(path)
    return _describe(folder, folds, checkpoint)


def find_model_folder(path: Path) -> Path:
    """`path` itself if it is a trained-model folder, else the single one below it."""
    if _is_model_folder(path):
        return path
    found = sorted(p.parent for p in path.rglob("plans.json") if _is_model_folder(p.parent))
    if not found:
        raise ModelError(
            f"{path} is not an nnU-Net v2 model folder: expected dataset.json, plans.json and "
            "fold_N/ folders (a Trainer__Plans__configuration folder), here or below"
        )
    if len(found) > 1:
        listing = "\n  ".join(str(p) for p in found)
        raise ModelError(f"{path} holds several models; pass one of:\n  {listing}")
    return found[0]


def _is_model_folder(path: Path) -> bool:
    return (
        (path / "plans.json").is_file()
        and (path / "dataset.json").is_file()
        and any(p.is_dir() and p.name.startswith("fold_") for p in path.iterdir())
    )


def unpack_zip(zip_path: Path) -> Path:
    """Unpack a model zip into the cache once (keyed by its hash) and return the folder."""
    digest = sha256_of_files([zip_path])[:16]
    target = cache_dir() / "models" / digest
    if target.exists():
        return target
    staging = target.with_name(f".{digest}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.namelist():
            if member.startswith("/") or ".." in Path(member).parts:
                raise ModelError(f"{zip_path}: unsafe path in zip: {member!r}")
        archive.extractall(staging)
    staging.rename(target)
    return target


def _describe(folder: Path, folds: tuple[str, ...] | None, checkpoint: str) -> Model:
    available = sorted(p.name.removeprefix("fold_") for p in folder.glob("fold_*") if p.is_dir())
    with_checkpoint = [f for f in available if (folder / f"fold_{f}" / checkpoint).is_file()]
    if folds is None:
        if not with_checkpoint:
            raise ModelError(f"{folder}: no fold has {checkpoint} (folds found: {available})")
        folds = tuple(with_checkpoint)
    folds = tuple(str(f) for f in folds)
    for fold in folds:
        if fold not in available:
            raise ModelError(f"{folder}: fold {fold} not found; available folds: {available}")
        if fold not in with_checkpoint:
            raise ModelError(f"{folder}/fold_{fold} has no {checkpoint}")
    try:
        dataset = json.loads((folder / "dataset.json").read_text())
        channel_map = dataset.get("channel_names") or dataset["modality"]
        channel_names = tuple(channel_map[k] for k in sorted(channel_map, key=int))
        labels = tuple((str(k), int(v)) for k, v in dataset["labels"].items())
        json.loads((folder / "plans.json").read_text())
    except (KeyError, ValueError, TypeError) as error:
        raise ModelError(f"{folder}: dataset.json or plans.json is not valid: {error}") from error
    files = [folder / "plans.json", folder / "dataset.json"]
    files += [folder / f"fold_{f}" / checkpoint for f in folds]
    return Model(
        folder=folder,
        folds=folds,
        checkpoint=checkpoint,
        channel_names=channel_names,
        labels=labels,
        fingerprint=sha256_of_files(files),
        configuration=_configuration_of(folder),
    )


def _configuration_of(folder: Path) -> str:
    """The configuration (e.g. 3d_fullres) named by a Trainer__Plans__configuration folder."""
    parts = folder.name.split("__")
    return parts[2] if len(parts) == 3 else "3d_fullres"


def sha256_of_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str, slot: int = 0) -> str:
    """'auto' -> a CUDA GPU when one is visible to this process, else 'cpu'.

    `slot` is the worker's index among the worker processes sharing a machine or a
    job; with several visible GPUs each slot gets its own (see pick_cuda_device).
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    if device.startswith("cuda"):
        return pick_cuda_device(device, slot, torch.cuda.device_count())
    return device


def pick_cuda_device(device: str, slot: int, n_gpus: int) -> str:
    """'cuda' -> 'cuda:<slot mod n_gpus>'; an explicit 'cuda:N' is kept.

    A batch job with two GPUs runs two worker processes; without this both would use
    cuda:0 and the second GPU would idle.
    """
    if device != "cuda" or n_gpus <= 1:
        return device
    return f"cuda:{slot % n_gpus}"


def worker_slot(name: object) -> int:
    """A worker's index within its machine or job, from its Dask name.

    LocalCluster names workers 0, 1, ...; `dask worker --nworkers N` (batch jobs)
    names them <job name>-0, <job name>-1, ...; anything else counts as slot 0.
    """
    if isinstance(name, int):
        return name
    match = re.search(r"-(\d+)$", str(name))
    return int(match[1]) if match else 0


def _load_checkpoint(path: Path) -> dict:
    """One fold's checkpoint (a torch pickle: code; see the README's warning).

    A file that torch cannot read (truncated, not a checkpoint, from an incompatible
    torch) is a ModelError, which repeats on every worker and every scan, so the runner
    does not retry it and its circuit breaker can stop the run. An OSError (a network
    file system hiccup) stays what it is: transient, worth another attempt.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, MemoryError):
        raise
    except Exception as error:
        raise ModelError(f"cannot load the checkpoint {path}: {error}") from error


def load_predictor(model: Model, settings: InferenceSettings, slot: int = 0):
    """An initialised nnUNetPredictor for `model` (weights of every fold, network built)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    device = torch.device(resolve_device(settings.device, slot))
    checkpoints = [
        _load_checkpoint(model.folder / f"fold_{fold}" / model.checkpoint) for fold in model.folds
    ]
    first = checkpoints[0]
    plans_manager = PlansManager(json.loads((model.folder / "plans.json").read_text()))
    dataset_json = json.loads((model.folder / "dataset.json").read_text())
    configuration = plans_manager.get_configuration(model.configuration)
    n_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
    n_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    weights = [c["network_weights"] for c in checkpoints]
    network = _build_network(
        first["trainer_name"], plans_manager, configuration, n_inputs, n_outputs, weights[0]
    )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice for CPU devices
        predictor = nnUNetPredictor(
            tile_step_size=settings.step_size,
            use_gaussian=True,
            use_mirroring=settings.tta,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration,
        weights,
        dataset_json,
        first["trainer_name"],
        first.get("inference_allowed_mirroring_axes"),
    )
    return predictor


def _build_network(trainer_name, plans_manager, configuration, n_inputs, n_outputs, weights):
    """The network described by plans.json, with the checkpoint's weights loaded.

    Falls back to the trainer's own builder (nnU-Net's class lookup) only when the plans
    do not describe the saved weights, e.g. a trainer that changes the architecture.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    try:
        network = get_network_from_plans(
            configuration.network_arch_class_name,
            configuration.network_arch_init_kwargs,
            configuration.network_arch_init_kwargs_req_import,
            n_inputs,
            n_outputs,
            allow_init=False,
            deep_supervision=False,
        )
        network.load_state_dict(weights)
        return network
    except Exception as plans_error:
        try:
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

            trainer = recursive_find_trainer_class_by_name(trainer_name)
            network = trainer.build_network_architecture(
                plans_manager, configuration, n_inputs, n_outputs, enable_deep_supervision=False
            )
            network.load_state_dict(weights)
            return network
        except Exception as trainer_error:
            raise ModelError(
                f"cannot build the network: plans.json does not describe the saved weights "
                f"({plans_error}), and trainer {trainer_name!r} is not usable here "
                f"({type(trainer_error).__name__}: {trainer_error})"
            ) from trainer_error
