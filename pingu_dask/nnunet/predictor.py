"""A model's predictor: the device it runs on, its weights, its network; one per process.

The network is built from plans.json, not by looking the trainer class up by name:
nnU-Net's lookup imports every trainer module it ships, and one broken optional import
(torchvision, timm) or a custom trainer the user does not have installed then stops
inference that does not need the trainer at all. Only when the plans do not describe the
saved weights do we fall back to nnU-Net's own lookup.

Each worker process keeps its predictors (cached_predictor), so a model is loaded once
per worker, not once per scan.

Security: a checkpoint is a torch pickle, i.e. code. Loading a model runs it. Only use
models from a source you trust.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from collections import Counter
from typing import Any

from pingu_dask.config import InferenceSettings
from pingu_dask.errors import ModelError
from pingu_dask.nnunet.checkpoints import load_checkpoint
from pingu_dask.nnunet.model import Model
from pingu_dask.nnunet.plans import model_plan

_lock = threading.Lock()
_predictors: dict[tuple[str, InferenceSettings, int], Any] = {}
_load_counts: Counter[str] = Counter()


def cached_predictor(model: Model, settings: InferenceSettings, slot: int = 0):
    """This process's predictor for (model, settings), loaded on first use only.

    `slot` is the worker's index on its machine (worker_slot), which picks its GPU.
    """
    key = (model.fingerprint, settings, slot)
    with _lock:
        if key not in _predictors:
            _predictors[key] = load_predictor(model, settings, slot)
            _load_counts[model.fingerprint] += 1
        return _predictors[key]


def load_counts() -> dict[str, int]:
    """How many times this process loaded each model (by fingerprint). For tests and QA."""
    with _lock:
        return dict(_load_counts)


def uses_gpu(device: str) -> bool:
    """Whether a predictor for `device` ('auto', 'cpu', 'cuda', 'cuda:N') in this
    process runs on a GPU. Preprocess asks it to leave the resampling to the device."""
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


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


def load_predictor(model: Model, settings: InferenceSettings, slot: int = 0):
    """An initialised nnUNetPredictor for `model` (weights of every fold, network built)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    device = torch.device(resolve_device(settings.device, slot))
    checkpoints = [
        load_checkpoint(model.folder / f"fold_{fold}" / model.checkpoint) for fold in model.folds
    ]
    first = checkpoints[0]
    plan = model_plan(model)
    plans_manager, configuration, dataset_json = (
        plan.plans_manager,
        plan.configuration,
        plan.dataset_json,
    )
    n_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
    n_outputs = plan.label_manager.num_segmentation_heads
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
