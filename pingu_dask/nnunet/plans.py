"""The light part of a model (no weights): what preprocessing and export need.

plans.json and dataset.json are parsed into nnU-Net's PlansManager, configuration and
label manager once per process and model (model_plan), and shared by the predictor,
preprocessing and export.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from pingu_dask.nnunet.model import Model

#: Readers whose arrays are the NIfTI array with its axes reversed (SimpleITK order):
#: for these, pingu-dask hands nnU-Net the voxels it has already read and checked.
TRANSPOSING_READERS = frozenset({"SimpleITKIO", "NibabelIO"})

_lock = threading.Lock()
_plans: dict[str, ModelPlan] = {}


@dataclass(frozen=True)
class ModelPlan:
    """nnU-Net's view of a model's plans: one per process and model."""

    plans_manager: Any  # nnunetv2 PlansManager
    configuration: Any  # its ConfigurationManager for the model's configuration
    dataset_json: dict
    label_manager: Any  # nnunetv2 LabelManager

    @property
    def reader_name(self) -> str:
        return self.plans_manager.image_reader_writer_class.__name__

    @property
    def reads_nifti_as_is(self) -> bool:
        """Whether the model's reader gives the NIfTI voxels, axes reversed, unchanged."""
        return self.reader_name in TRANSPOSING_READERS


def model_plan(model: Model) -> ModelPlan:
    """This process's ModelPlan for `model`."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with _lock:
        if model.fingerprint not in _plans:
            plans_manager = PlansManager(json.loads((model.folder / "plans.json").read_text()))
            dataset_json = json.loads((model.folder / "dataset.json").read_text())
            _plans[model.fingerprint] = ModelPlan(
                plans_manager,
                plans_manager.get_configuration(model.configuration),
                dataset_json,
                plans_manager.get_label_manager(dataset_json),
            )
        return _plans[model.fingerprint]
