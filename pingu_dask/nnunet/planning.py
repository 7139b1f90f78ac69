"""A training's nnU-Net dataset: its folders, fingerprint, plans and preprocessed cases.

The steps of `nnUNetv2_plan_and_preprocess`, taken apart so that the per-case ones can
be Dask tasks (nnU-Net runs them in a process pool, which a daemonic Dask worker cannot
start): `analyze_case` per case (nnU-Net's own fingerprint function), `write_fingerprint`
once (nnU-Net's reduction of the cases' figures), `plan_default` or `transfer_plans`
once, `preprocess_case` per case (nnU-Net's DefaultPreprocessor). Planning reads nnU-Net's
folder variables, so it runs inside `nnunet_environment` (set and restored here, on the
driver, where nothing else runs nnU-Net at the same time).

Presets shrink the planned network for machines without a GPU: `tiny` (tests, seconds
per epoch on a CPU, masks that mean nothing) and `demo` (the bundled demo model's
network and schedule, which learns synthetic PVS in ~1,200 iterations).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pingu_dask.errors import ModelError
from pingu_dask.nnunet.trainer_process import NnunetFolders, TrainerSettings

DATASET = "Dataset001_pingu"  # the name nnU-Net's folders give the training's dataset
CONFIGURATION = "3d_fullres"
DEFAULT_PLANS = "nnUNetPlans"
READER = "NibabelIO"  # the raw dataset is NIfTI in the model's orientation (see cases)
FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "PVS": 1}
#: nnU-Net samples 10^8 foreground voxels over the whole dataset for its intensity
#: statistics (DatasetFingerprintExtractor.num_foreground_voxels_for_intensitystats).
FOREGROUND_SAMPLES = 10e7


@dataclass(frozen=True)
class Preset:
    """A shrunk network and a schedule for machines without a GPU (None: nnU-Net's)."""

    name: str
    spacing: tuple[float, float, float]
    patch: tuple[int, int, int]
    batch_size: int
    features: tuple[int, ...]
    convolutions_per_stage: int
    schedule: TrainerSettings
    notes: str = ""

    def shrink(self, plans: dict) -> dict:
        """The 3d_fullres configuration of `plans` with this network, patch and spacing."""
        config = plans["configurations"][CONFIGURATION]
        stages = len(self.features)
        config["architecture"]["arch_kwargs"].update(
            n_stages=stages,
            features_per_stage=list(self.features),
            kernel_sizes=[[3, 3, 3]] * stages,
            strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
            n_conv_per_stage=[self.convolutions_per_stage] * stages,
            n_conv_per_stage_decoder=[1] * (stages - 1),
        )
        config.update(patch_size=list(self.patch), batch_size=self.batch_size)
        config.update(spacing=list(self.spacing))
        plans["configurations"] = {CONFIGURATION: config}
        return plans


PRESETS = {
    "tiny": Preset(
        "tiny",
        spacing=(2.5, 2.5, 2.5),
        patch=(48, 48, 48),
        batch_size=2,
        features=(4, 8, 16, 32),
        convolutions_per_stage=1,
        schedule=TrainerSettings(
            epochs=3,
            iterations_per_epoch=6,
            val_iterations_per_epoch=2,
            checkpoint_every=1,
            optimizer="adamw",
            oversample_foreground=0.66,
        ),
        notes="for tests and trying the command: seconds per epoch on a CPU; at 2.5 mm "
        "PVS are barely visible, so its masks mean nothing",
    ),
    "demo": Preset(
        "demo",
        spacing=(1.0, 1.0, 1.0),
        patch=(64, 64, 64),
        batch_size=2,
        features=(12, 24, 48, 96),
        convolutions_per_stage=2,
        schedule=TrainerSettings(
            epochs=30,
            iterations_per_epoch=40,
            val_iterations_per_epoch=5,
            checkpoint_every=5,
            optimizer="adamw",
            oversample_foreground=0.66,
        ),
        notes="the bundled demo model's network and schedule (AdamW: nnU-Net's SGD "
        "learnt nothing in such a short schedule); ~40 min per fold on 2 CPU cores",
    ),
}
#: nnU-Net's own schedule (nnUNetTrainer), with checkpoints every 5 epochs instead of 50.
NNUNET_SCHEDULE = TrainerSettings(
    epochs=1000, iterations_per_epoch=250, val_iterations_per_epoch=50, checkpoint_every=5
)


def folders_in(model_dir: Path) -> NnunetFolders:
    """nnU-Net's three folders inside MODEL_DIR."""
    model_dir = Path(model_dir).resolve()
    return NnunetFolders(
        raw=str(model_dir / "nnUNet_raw"),
        preprocessed=str(model_dir / "nnUNet_preprocessed"),
        results=str(model_dir / "nnUNet_results"),
        dataset=DATASET,
    )


@contextlib.contextmanager
def nnunet_environment(folders: NnunetFolders) -> Iterator[None]:
    """nnU-Net's folder variables set for the block (nnunetv2.paths reads them when a
    path is used), and restored after."""
    before = {name: os.environ.get(name) for name in folders.environment()}
    os.environ.update(folders.environment())
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def write_dataset_json(
    folders: NnunetFolders, channel_names: Sequence[str], n_cases: int, cases: Sequence[str] = ()
) -> dict:
    """The raw dataset's dataset.json (binary PVS labels, NIfTI read by NibabelIO).

    With `cases` (the cases written), it lists their files under "dataset", as nnU-Net
    allows: its planner then reads that list instead of listing imagesTr through a
    forked multiprocessing Pool, which can deadlock in a driver that runs threads (a
    forked child stuck on a lock another thread held: seen as a hung `train`).
    """
    document: dict = {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": dict(LABELS),
        "numTraining": n_cases,
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": READER,
        "name": "pingu-dask training",
        "description": "Made by `pingu-dask train`: the manifest's scans in the model's "
        "orientation, their reference masks binarised onto the image grid.",
    }
    folder = folders.raw_dataset
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if cases:
        listed = {}
        for case in cases:
            images, label = case_files(folders, case, len(channel_names))
            listed[case] = {
                "images": [str(path.relative_to(folder)) for path in images],
                "label": str(label.relative_to(folder)),
            }
        document["dataset"] = listed
    (folder / "dataset.json").write_text(json.dumps(document, indent=2))
    return document


def case_files(folders: NnunetFolders, case: str, n_channels: int) -> tuple[list[Path], Path]:
    """(image per channel, label) of one raw case, named as nnU-Net expects."""
    folder = folders.raw_dataset
    images = [folder / "imagesTr" / f"{case}_{i:04d}{FILE_ENDING}" for i in range(n_channels)]
    return images, folder / "labelsTr" / f"{case}{FILE_ENDING}"


@dataclass
class CaseFingerprint:
    """nnU-Net's fingerprint figures of one case (DatasetFingerprintExtractor.analyze_case)."""

    shape_after_crop: list[int]
    spacing: list[float]
    foreground_intensities: list[np.ndarray]  # per channel, sampled
    relative_size_after_cropping: float
    extra: dict = field(default_factory=dict)


def analyze_case(images: Sequence[Path], label: Path, n_cases: int) -> CaseFingerprint:
    """One case's fingerprint, by nnU-Net's own function (no process pool)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO

    samples = int(FOREGROUND_SAMPLES // max(1, n_cases))
    shape, spacing, intensities, _, relative = DatasetFingerprintExtractor.analyze_case(
        [str(p) for p in images], str(label), NibabelIO, samples
    )
    return CaseFingerprint(
        [int(n) for n in shape], [float(s) for s in spacing], list(intensities), float(relative)
    )


def write_fingerprint(folders: NnunetFolders, cases: Sequence[CaseFingerprint]) -> Path:
    """dataset_fingerprint.json from the cases' figures: nnU-Net's reduction
    (DatasetFingerprintExtractor.run), over the results of the per-case tasks."""
    channels = len(cases[0].foreground_intensities)
    statistics = {}
    for channel in range(channels):
        values = np.concatenate([case.foreground_intensities[channel] for case in cases])
        low, median, high = np.percentile(values, (0.5, 50.0, 99.5))
        statistics[channel] = {
            "mean": float(np.mean(values)),
            "median": float(median),
            "std": float(np.std(values)),
            "min": float(np.min(values)),
            "max": float(np.max(values)),
            "percentile_99_5": float(high),
            "percentile_00_5": float(low),
        }
    fingerprint = {
        "spacings": [case.spacing for case in cases],
        "shapes_after_crop": [case.shape_after_crop for case in cases],
        "foreground_intensity_properties_per_channel": statistics,
        "median_relative_size_after_cropping": float(
            np.median([case.relative_size_after_cropping for case in cases])
        ),
    }
    folder = folders.preprocessed_dataset
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset_fingerprint.json"
    path.write_text(json.dumps(fingerprint, indent=2))
    return path


def plan_default(
    folders: NnunetFolders, target_spacing: Sequence[float] | None, preset: Preset | None
) -> str:
    """nnU-Net's ExperimentPlanner on the fingerprint (3d_fullres), optionally at a given
    spacing and shrunk by a preset; the plans identifier written."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    spacing = list(target_spacing) if target_spacing else None
    if spacing is None and preset is not None:
        spacing = list(preset.spacing)
    name = DEFAULT_PLANS if preset is None else f"{DEFAULT_PLANS}_{preset.name}"
    with nnunet_environment(folders), contextlib.redirect_stdout(io.StringIO()):
        planner = ExperimentPlanner(
            folders.dataset,
            plans_name=name,
            overwrite_target_spacing=[float(s) for s in spacing] if spacing else None,
        )
        plans = planner.plan_experiment()
    plans = json.loads((folders.preprocessed_dataset / f"{name}.json").read_text())
    plans["configurations"] = {CONFIGURATION: plans["configurations"][CONFIGURATION]}
    if preset is not None:
        plans = preset.shrink(plans)
        if target_spacing:
            plans["configurations"][CONFIGURATION]["spacing"] = [float(s) for s in target_spacing]
    plans["configurations"][CONFIGURATION]["data_identifier"] = f"{name}_{CONFIGURATION}"
    _save_plans(folders, name, plans)
    return name


def transfer_plans(folders: NnunetFolders, model_folder: Path, configuration: str) -> str:
    """A trained model's plans moved onto this dataset, as nnU-Net's
    move_plans_between_datasets does (dataset name, data identifier, the reader of
    this dataset's files), so that its weights fit the network trained here."""
    plans = json.loads((Path(model_folder) / "plans.json").read_text())
    if configuration not in plans.get("configurations", {}):
        raise ModelError(f"{model_folder}: its plans have no configuration {configuration!r}")
    name = str(plans.get("plans_name") or DEFAULT_PLANS)
    config = plans["configurations"][configuration]
    if config.get("previous_stage") or config.get("inherits_from"):
        raise ModelError(
            f"{model_folder}: a cascade or inheriting configuration cannot be fine-tuned here"
        )
    config["data_identifier"] = f"{name}_{configuration}"
    plans["configurations"] = {configuration: config}
    plans["dataset_name"] = folders.dataset
    plans["image_reader_writer"] = READER
    _save_plans(folders, name, plans)
    return name


def _save_plans(folders: NnunetFolders, name: str, plans: dict) -> None:
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    recursive_fix_for_json_export(plans)
    folder = folders.preprocessed_dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(plans, indent=2))
    shutil.copyfile(folders.raw_dataset / "dataset.json", folder / "dataset.json")


def preprocessed_folder(folders: NnunetFolders, plans_name: str, configuration: str) -> Path:
    plans = json.loads((folders.preprocessed_dataset / f"{plans_name}.json").read_text())
    identifier = plans["configurations"][configuration]["data_identifier"]
    return folders.preprocessed_dataset / identifier


def is_preprocessed(folder: Path, case: str) -> bool:
    """Whether nnU-Net's preprocessed files of `case` are all there (blosc2 format)."""
    return all((folder / f"{case}{suffix}").exists() for suffix in (".b2nd", "_seg.b2nd", ".pkl"))


def preprocess_case(
    folders: NnunetFolders, plans_name: str, configuration: str, case: str, n_channels: int
) -> Path:
    """nnU-Net's DefaultPreprocessor on one case, written where its trainer reads it.

    Written under a temporary name first: a retried or killed task never leaves a case
    half written (nnU-Net writes three files per case)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((folders.preprocessed_dataset / f"{plans_name}.json").read_text())
    dataset_json = json.loads((folders.preprocessed_dataset / "dataset.json").read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    target = folders.preprocessed_dataset / config.data_identifier
    target.mkdir(parents=True, exist_ok=True)
    images, label = case_files(folders, case, n_channels)
    staging = target / f".{case}.{os.getpid()}.partial"
    staging.mkdir(exist_ok=True)
    try:
        DefaultPreprocessor(verbose=False).run_case_save(
            str(staging / case),
            [str(p) for p in images],
            str(label),
            manager,
            config,
            dataset_json,
        )
        for written in staging.iterdir():  # the pickle last: it marks a whole case
            if written.suffix != ".pkl":
                os.replace(written, target / written.name)
        for written in staging.iterdir():
            os.replace(written, target / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
