"""nnU-Net v2 models on disk: find or unpack one, read what it expects, fingerprint it.

A model is a trained-model folder (`Trainer__Plans__configuration/` with dataset.json,
plans.json and fold_N/checkpoint) or a zip made by `nnUNetv2_export_model_to_zip`,
unpacked once into the cache. Nothing here loads weights (checkpoints.py reads them,
predictor.py builds the network) or imports nnunetv2: a `Model` is small and picklable,
and travels with every task.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pingu_dask.config import DEFAULTS, cache_dir
from pingu_dask.errors import ModelError
from pingu_dask.records import column_name

DEMO_NAME = "demo"
DEFAULT_CHECKPOINT = DEFAULTS["pingu"]["checkpoint"]
CHECKPOINT_SUFFIX = ".pth"
ZIP_TOOL = "nnUNetv2_export_model_to_zip"
DAMAGED = "truncated or corrupt"


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
        return tuple(column_name(name) for name in self.channel_names)

    @property
    def name(self) -> str:
        return self.folder.name

    def facts(self) -> dict[str, object]:
        """What names this model in outputs (run.json, GeneratedBy, mask sidecars): plain
        values, so that layers which do not know nnU-Net can write them."""
        return {
            "name": self.name,
            "folds": list(self.folds),
            "checkpoint": self.checkpoint,
            "configuration": self.configuration,
            "fingerprint": self.fingerprint,
        }


def demo_model_folder() -> Path:
    """The small model bundled with the package (trained on synthetic data only)."""
    root = Path(str(resources.files("pingu_dask.nnunet") / DEMO_NAME))
    folders = [p for p in root.iterdir() if (p / "plans.json").exists()] if root.exists() else []
    if len(folders) != 1:
        raise ModelError(f"the bundled demo model is missing from {root}")
    return folders[0]


def resolve_model(
    spec: str | Path,
    folds: tuple[str, ...] | None = None,
    checkpoint: str = DEFAULT_CHECKPOINT,
) -> Model:
    """Find the model named by `spec` ('demo', a model folder, a parent folder, or a zip)."""
    if str(spec) == DEMO_NAME:
        folder = demo_model_folder()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(f"model not found: {path}")
        folder = _model_in_zip(path) if path.is_file() else find_model_folder(path)
    return _describe(folder, folds, checkpoint)


def _model_in_zip(zip_path: Path) -> Path:
    """The model folder inside a zip, unpacked (once) into the cache."""
    folder = unpack_zip(zip_path)
    try:
        return find_model_folder(folder)
    except ModelError as error:  # a whole zip, but not laid out as a model
        raise ModelError(f"{zip_path} is not a zip made by {ZIP_TOOL}: {error}") from error


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


def unpack_zip(zip_path: Path, expected: str = f"a zip made by {ZIP_TOOL}") -> Path:
    """Unpack a model zip into the cache once (keyed by its hash) and return the folder.

    The zip is unpacked into a staging folder of this process and renamed into place
    only when every member has been read whole (CRC checked), so a cache folder is
    never half a model; a zip cut short or damaged is a ModelError that says so.
    `expected` says what the file should have been, for the message on a file that is
    not a zip at all.
    """
    if not zipfile.is_zipfile(zip_path):
        if _starts_like_a_zip(zip_path):
            raise ModelError(
                f"{zip_path}: {DAMAGED} zip (it starts as a zip, but the directory a whole "
                "zip ends with is missing: a download or copy cut short?)"
            )
        raise ModelError(f"{zip_path} is a file but not {expected}")
    digest = sha256_of_files([zip_path])[:16]
    target = cache_dir() / "models" / digest
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{digest}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for member in archive.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise ModelError(f"{zip_path}: unsafe path in zip: {member!r}")
                archive.extractall(staging)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise ModelError(f"{zip_path}: {DAMAGED} zip ({error})") from error
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():
                raise
            # another process unpacked the same zip first: use its folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # never leave half a model behind
    return target


def _starts_like_a_zip(path: Path) -> bool:
    """Whether the file begins as a zip does (a local file header, the bytes "PK" 3 4):
    a zip whose end, where its directory is, is gone still begins like one."""
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


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
        labels = exported_labels(dataset)
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


def exported_labels(dataset: dict) -> tuple[tuple[str, int], ...]:
    """dataset.json's labels as (name, value in the exported label map).

    A region-based model (labels given as lists of classes) writes region i of its
    foreground as `regions_class_order[i]`, as nnU-Net's label manager does.
    """
    labels = dataset["labels"]
    if not any(isinstance(value, list | tuple) for value in labels.values()):
        return tuple((str(name), int(value)) for name, value in labels.items())
    foreground = [name for name, value in labels.items() if value not in (0, [0])]
    order = dataset["regions_class_order"]
    if len(order) != len(foreground):
        raise ValueError("regions_class_order does not have one value per region")
    return (("background", 0), *((str(n), int(v)) for n, v in zip(foreground, order, strict=True)))


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
