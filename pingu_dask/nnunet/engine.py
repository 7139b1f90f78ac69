"""nnU-Net behind the model seam (records.SegmentationModel).

The stages ask a model to prepare a scan, predict its label map and restore the map
onto the image grid; this is nnU-Net's way of doing each: its preprocessing from the
voxels already read (case.py), this worker's cached predictor with the export on the
same device (predictor.py), and the label map back into the input's array order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pingu_dask.config import InferenceSettings
from pingu_dask.nnunet.case import PreparedCase, predict_case, prepare_case, to_image_order
from pingu_dask.nnunet.checkpoints import check_checkpoints
from pingu_dask.nnunet.model import DEFAULT_CHECKPOINT, Model, resolve_model
from pingu_dask.nnunet.plans import model_plan
from pingu_dask.nnunet.predictor import cached_predictor, uses_gpu
from pingu_dask.records import ScanImages


@dataclass(frozen=True)
class NnUNetModel:
    """An nnU-Net v2 model (a located, fingerprinted Model) as the stages use it."""

    model: Model

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def folder(self) -> Path:
        return self.model.folder

    @property
    def channels(self) -> tuple[str, ...]:
        return self.model.channels

    @property
    def labels(self) -> tuple[tuple[str, int], ...]:
        return self.model.labels

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def facts(self) -> dict[str, object]:
        return self.model.facts()

    def check(self) -> None:
        """Every fold's checkpoint read once (a broken one stops the run before any scan)."""
        check_checkpoints(self.model)

    def prepare(self, scan: ScanImages, inference: InferenceSettings) -> PreparedCase:
        """nnU-Net's preprocessing; on a GPU run the resampling is left to the device."""
        return prepare_case(
            model_plan(self.model),
            scan.images,
            scan.spacing,
            scan.paths,
            resample_now=not uses_gpu(inference.device),
        )

    def predict(self, prepared: Any, inference: InferenceSettings, slot: int) -> np.ndarray:
        predictor = cached_predictor(self.model, inference, slot)
        return predict_case(predictor, model_plan(self.model), prepared)

    def restore(self, labels: np.ndarray, geometry: Any, shape: tuple[int, ...]) -> np.ndarray:
        return to_image_order(model_plan(self.model), labels, geometry, shape)


def nnunet_model(
    spec: str | Path, folds: tuple[str, ...] | None = None, checkpoint: str = DEFAULT_CHECKPOINT
) -> NnUNetModel:
    """resolve_model (a folder, a zip, `demo`) behind the seam."""
    return NnUNetModel(resolve_model(spec, folds, checkpoint))
