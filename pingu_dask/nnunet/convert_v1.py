"""nnU-Net v1 trained models (e.g. the published PINGU-All_v0.zip) -> nnU-Net v2 model
folders that the pipeline runs.

A v1 model is `nnUNet/<configuration>/<Task>/<Trainer>__<Plans>/` with plans.pkl and
fold_N/model_final_checkpoint.model (+ .model.pkl). Its network is v1's Generic_UNet,
which is layer for layer v2's PlainConvUNet:

    v1                                             v2 (dynamic_network_architectures)
    conv_blocks_context.d.blocks.k                 encoder.stages.d.0.convs.k
    conv_blocks_context.<last>.{0,1}.blocks.k      encoder.stages.<last>.0.convs.k (in order)
    conv_blocks_localization.u.{0,1}.blocks.k      decoder.stages.u.convs.k (in order)
    tu.u (no bias)                                 decoder.transpconvs.u (bias set to 0)
    seg_outputs.u (no bias)                        decoder.seg_layers.u (bias set to 0)
    .conv / .instnorm                              .conv / .norm

The architecture (stages, features, kernel sizes, convolutions per stage, input and
output channels) is read from the weights themselves and checked against the plans;
strides are the plans' pooling kernels. Preprocessing settings are translated: spacing,
patch size, transpose, normalisation (v1 'CT' -> CTNormalization with the intensity
properties, 'noNorm' -> NoNormalization, anything else -> ZScoreNormalization, which is
what v1 does with it), masks for normalisation, and the export resampling.

What v2 (or this pipeline) cannot express is refused with a reason: another trainer
than nnUNetTrainerV2 (its network may differ), cascade or 2D configurations, v1's 'CT2'
normalisation, non-empty post-processing (postprocessing.json), and weights that do not
have the Generic_UNet layout.

Security: plans.pkl, .model.pkl and .model are Python pickles, i.e. code. Import only
models from a source you trust.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pingu_dask.errors import ModelError
from pingu_dask.nnunet.checkpoints import load_checkpoint
from pingu_dask.nnunet.model import sha256_of_files, unpack_zip
from pingu_dask.nnunet.v1_network import (
    Architecture,
    arch_kwargs,
    copy_weights,
    read_architecture,
    v2_network,
)
from pingu_dask.records import timestamp
from pingu_dask.version import __version__

SUPPORTED_TRAINERS = ("nnUNetTrainerV2",)
SUPPORTED_CONFIGURATIONS = ("3d_fullres", "3d_lowres")
V1_CHECKPOINT = "model_final_checkpoint.model"
V2_CHECKPOINT = "checkpoint_final.pth"
V2_TRAINER = "nnUNetTrainer"
#: v1 modality names -> v2 channel names (the manifest column is the lower-cased name)
CHANNEL_NAMES = {"T1": "T1w", "T2": "T2w", "FLAIR": "FLAIR", "T1W": "T1w", "T2W": "T2w"}
INTENSITY_KEYS = {"mx": "max", "mean": "mean", "median": "median", "mn": "min",
                  "percentile_00_5": "percentile_00_5", "percentile_99_5": "percentile_99_5",
                  "sd": "std"}  # fmt: skip


@dataclass(frozen=True)
class V1Model:
    """A located v1 trained-model folder."""

    folder: Path  # .../<configuration>/<Task>/<Trainer>__<Plans>
    configuration: str
    task: str
    trainer: str
    plans_identifier: str
    folds: tuple[str, ...]


def find_v1_model(path: Path) -> V1Model:
    """The single v1 trained-model folder at or below `path`."""
    candidates = sorted(
        p.parent for p in path.rglob("plans.pkl") if any(p.parent.glob(f"fold_*/{V1_CHECKPOINT}"))
    )
    if not candidates:
        raise ModelError(
            f"{path} holds no nnU-Net v1 model: expected <Trainer>__<Plans>/ with plans.pkl and "
            f"fold_N/{V1_CHECKPOINT}, here or below"
        )
    if len(candidates) > 1:
        listing = "\n  ".join(str(c) for c in candidates)
        raise ModelError(f"{path} holds several v1 models; pass one of:\n  {listing}")
    folder = candidates[0]
    trainer, _, plans_identifier = folder.name.partition("__")
    folds = tuple(
        sorted(p.parent.name.removeprefix("fold_") for p in folder.glob(f"fold_*/{V1_CHECKPOINT}"))
    )
    return V1Model(folder, folder.parent.parent.name, folder.parent.name, trainer,
                   plans_identifier, folds)  # fmt: skip


def import_v1_model(source: Path, out: Path, channel_names: tuple[str, ...] | None = None) -> Path:
    """Convert the v1 model at `source` (folder or zip) into a v2 model folder under
    `out`; return that folder (pass it to `run --model`)."""
    source = Path(source)
    if source.is_file():
        source = unpack_zip(source, expected="a zip")
    v1 = find_v1_model(source)
    _check_supported(v1)
    plans = _load_pickle(v1.folder / "plans.pkl")
    stage = _stage(plans, v1.configuration)
    target = Path(out) / f"{V2_TRAINER}__{v1.plans_identifier}__{v1.configuration}"
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _convert(v1, plans, stage, staging, source, channel_names)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never leave half a model behind
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _convert(v1, plans, stage, staging: Path, source: Path, channel_names) -> None:
    """Write the v2 model into `staging`: weights per fold, plans, dataset, provenance."""
    architecture = None
    for fold in v1.folds:
        checkpoint = load_checkpoint(v1.folder / f"fold_{fold}" / V1_CHECKPOINT, ("state_dict",))
        info = _load_pickle(v1.folder / f"fold_{fold}" / f"{V1_CHECKPOINT}.pkl")
        _check_trainer(info.get("name"), f"fold_{fold}")
        weights = checkpoint["state_dict"]
        found = read_architecture(weights, stage)
        if architecture is not None and found != architecture:
            raise ModelError(f"fold_{fold} has another architecture than the first fold")
        architecture = found
        network = v2_network(architecture)
        copy_weights(weights, network, architecture)
        fold_dir = staging / f"fold_{fold}"
        fold_dir.mkdir()
        _save_v2_checkpoint(fold_dir / V2_CHECKPOINT, network, checkpoint, architecture)
    assert architecture is not None
    v2_plans = translate_plans(plans, stage, v1, architecture)
    (staging / "plans.json").write_text(json.dumps(v2_plans, indent=1))
    dataset = dataset_json(plans, architecture, channel_names)
    (staging / "dataset.json").write_text(json.dumps(dataset, indent=1))
    (staging / "imported_from_v1.json").write_text(json.dumps(_provenance(source, v1), indent=1))


def _check_trainer(name: str | None, where: str) -> None:
    if name not in SUPPORTED_TRAINERS:
        raise ModelError(
            f"{where}: trainer {name!r} is not supported (only "
            f"{', '.join(SUPPORTED_TRAINERS)}: other trainers may build another network)"
        )


def _check_supported(v1: V1Model) -> None:
    _check_trainer(v1.trainer, str(v1.folder))
    if v1.configuration not in SUPPORTED_CONFIGURATIONS:
        raise ModelError(
            f"{v1.folder}: configuration {v1.configuration!r} is not supported (only "
            f"{', '.join(SUPPORTED_CONFIGURATIONS)}; a cascade needs the low-resolution "
            "model's predictions as input, which v2 model folders cannot carry over)"
        )
    postprocessing = v1.folder / "postprocessing.json"
    if postprocessing.is_file():
        classes, _ = read_postprocessing(postprocessing)
        if classes:
            raise ModelError(
                f"{postprocessing} asks for post-processing (keep the largest component of "
                f"{classes}), which this pipeline does not apply: "
                "results would differ from v1's; remove the file if that is intended"
            )


def read_postprocessing(path: Path) -> tuple[list, dict | None]:
    """(for_which_classes, min_valid_object_sizes) as v1's load_postprocessing reads them.

    v1's determine_postprocessing stores the sizes as the *string* of a Python literal
    ("None" when nothing is post-processed, or "{1: 12.0}"), so the raw value is never
    empty; only the classes say whether anything is removed: v1 applies the sizes only
    to the classes listed.
    """
    settings = json.loads(path.read_text())
    sizes = settings.get("min_valid_object_sizes")
    if isinstance(sizes, str):
        try:
            sizes = ast.literal_eval(sizes)
        except (ValueError, SyntaxError) as error:
            raise ModelError(f"{path}: min_valid_object_sizes {sizes!r} is unreadable") from error
    classes = settings.get("for_which_classes") or []
    return list(classes), sizes


def _stage(plans: dict, configuration: str) -> dict:
    stages = plans["plans_per_stage"]
    keys = sorted(stages)
    return stages[keys[0]] if configuration == "3d_lowres" else stages[keys[-1]]


def translate_plans(plans: dict, stage: dict, v1: V1Model, architecture: Architecture) -> dict:
    """v1 plans (one stage) -> v2 plans.json with one configuration."""
    channels = range(architecture.in_channels)
    schemes = plans.get("normalization_schemes") or {}
    normalisations = []
    for c in channels:
        scheme = schemes.get(c, "nonCT")
        if scheme == "CT2":
            raise ModelError("v1 normalisation 'CT2' has no nnU-Net v2 equivalent")
        normalisations.append(
            {"CT": "CTNormalization", "noNorm": "NoNormalization"}.get(
                scheme, "ZScoreNormalization"
            )
        )
    use_mask = plans.get("use_mask_for_norm") or {}
    intensities = (plans.get("dataset_properties") or {}).get("intensityproperties") or {}
    if "CTNormalization" in normalisations and not intensities:
        raise ModelError("v1 'CT' normalisation without intensity properties in plans.pkl")
    export = plans.get("segmentation_export_params") or {}
    probabilities = {
        "is_seg": False,
        "order": int(export.get("interpolation_order", 1)),
        "order_z": int(export.get("interpolation_order_z", 0)),
        "force_separate_z": export.get("force_separate_z"),
    }
    spacing = [float(x) for x in stage["current_spacing"]]
    transpose_forward = [int(x) for x in plans.get("transpose_forward", range(3))]
    configuration = {
        "data_identifier": f"{v1.plans_identifier}_{v1.configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(stage.get("batch_size", 2)),
        "patch_size": [int(x) for x in stage["patch_size"]],
        "median_image_size_in_voxels": [float(x) for x in stage["median_patient_size_in_voxels"]],
        "spacing": spacing,
        "normalization_schemes": normalisations,
        "use_mask_for_norm": [bool(use_mask.get(c, False)) for c in channels],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                      "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                     "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": probabilities,
        "architecture": arch_kwargs(architecture),
        "batch_dice": bool(plans.get("batch_dice", False)),
    }  # fmt: skip
    return {
        "dataset_name": _dataset_name(v1.task),
        "plans_name": v1.plans_identifier,
        "original_median_spacing_after_transp": [float(x) for x in stage["original_spacing"]],
        "original_median_shape_after_transp": [
            round(float(x)) for x in stage["median_patient_size_in_voxels"]
        ],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose_forward,
        "transpose_backward": [int(x) for x in plans.get("transpose_backward", range(3))],
        "configurations": {v1.configuration: configuration},
        "experiment_planner_used": f"imported from nnU-Net v1 ({v1.plans_identifier})",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): _intensities(intensities.get(c)) for c in channels
        },
    }


def _intensities(properties: dict | None) -> dict:
    """v1 intensity properties in v2's names. v1 collects them for CT data only; v2's
    preprocessor looks them up for every channel but only CT normalisation uses them,
    so MRI channels get neutral values (0, std 1) that nothing reads."""
    if not properties:
        return {name: 0.0 for name in INTENSITY_KEYS.values()} | {"std": 1.0}
    return {INTENSITY_KEYS[k]: float(v) for k, v in properties.items() if k in INTENSITY_KEYS}


def dataset_json(plans: dict, architecture: Architecture, names: tuple[str, ...] | None) -> dict:
    """dataset.json: channel names (v1 modalities, 'T1' -> 'T1w'; or as given) and labels."""
    modalities = plans.get("modalities") or {}
    if names is None:
        names = tuple(
            CHANNEL_NAMES.get(str(modalities.get(c, f"channel{c}")).upper(), str(modalities.get(c)))
            for c in range(architecture.in_channels)
        )
    if len(names) != architecture.in_channels:
        raise ModelError(
            f"{len(names)} channel names given for a model with {architecture.in_channels} inputs"
        )
    classes = [int(c) for c in plans.get("all_classes") or range(1, architecture.n_classes)]
    labels = {"background": 0, **{f"label_{c}": c for c in classes}}
    if len(labels) != architecture.n_classes:
        raise ModelError(
            f"plans.pkl lists classes {classes}, but the network has "
            f"{architecture.n_classes} outputs"
        )
    return {
        "channel_names": {str(i): name for i, name in enumerate(names)},
        "labels": labels,
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }


def _save_v2_checkpoint(path: Path, network, v1_checkpoint: dict, architecture) -> None:
    import torch

    mirror_axes = tuple(range(architecture.dimensions))
    torch.save(
        {
            "network_weights": network.state_dict(),
            "trainer_name": V2_TRAINER,
            "inference_allowed_mirroring_axes": mirror_axes,
            "current_epoch": v1_checkpoint.get("epoch"),
            "init_args": {"imported_from": "nnU-Net v1"},
        },
        path,
    )


def _provenance(source: Path, v1: V1Model) -> dict:
    checkpoints = [v1.folder / f"fold_{fold}" / V1_CHECKPOINT for fold in v1.folds]
    return {
        "imported_by": f"pingu-dask {__version__}",
        "imported": timestamp(),
        "source": str(Path(source).resolve()),
        "v1_folder": str(v1.folder),
        "v1_trainer": v1.trainer,
        "v1_plans": v1.plans_identifier,
        "task": v1.task,
        "folds": list(v1.folds),
        "v1_checkpoints_sha256": sha256_of_files(checkpoints),
    }


def _dataset_name(task: str) -> str:
    match = re.fullmatch(r"Task(\d+)_(.+)", task)
    return f"Dataset{int(match[1]):03d}_{match[2]}" if match else task


def _load_pickle(path: Path) -> dict:
    with path.open("rb") as handle:
        return pickle.load(handle)  # code: trusted models only (module docstring)
