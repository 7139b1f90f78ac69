"""pingu_dask.nnunet.case against nnU-Net's own preprocessing and export.

prepare_case runs nnU-Net's preprocessing steps on the voxels pingu-dask has already
read, with torch resampling; predict_case does the export (resampling, argmax) on the
predictor's device. Both must give what nnU-Net's `run_case` and
`convert_predicted_logits_to_segmentation_with_correct_shape` give, for every grid of
the synthetic sites (1 mm RAS, 0.8 mm oblique LAS, 0.9 x 0.9 x 3 mm oblique LPS) onto
a 2.5 mm model (a spline resize each way, and nnU-Net's separate slow axis for 3 mm
slices), for both places the resampling can happen (preprocess on the CPU, or predict
on the device), and for a model whose reader pingu-dask leaves to nnU-Net. The model
is the tiny one the benchmarks make (random weights, its output bias set for ~0.2 %
foreground): the comparison is between implementations, and it predicts in a fraction
of a second where the demo model takes seconds (tests/test_inference.py compares the
demo model end to end with nnUNetv2_predict).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nnunetv2.inference.export_prediction import (
    convert_predicted_logits_to_segmentation_with_correct_shape,
    export_prediction_from_logits,
)

from pingu_dask.config import InferenceSettings
from pingu_dask.inputs.imaging import check_image_data
from pingu_dask.nnunet.case import handled_here, predict_case, prepare_case, to_image_order
from pingu_dask.nnunet.model import resolve_model
from pingu_dask.nnunet.plans import model_plan
from pingu_dask.nnunet.predictor import load_predictor

CPU = InferenceSettings(tta=False, device="cpu", torch_threads=2)


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    model = resolve_model(tiny_model)
    return model, model_plan(model), load_predictor(model, CPU)


NNUNETS_OWN: dict[Path, tuple[np.ndarray, np.ndarray]] = {}


def nnunets_own(plan, predictor, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's preprocessed volume and its mask (NIfTI array order) for one scan of
    the tiny model (computed once per scan)."""
    if path not in NNUNETS_OWN:
        NNUNETS_OWN[path] = _nnunets_own(plan, predictor, path)
    return NNUNETS_OWN[path]


def _nnunets_own(plan, predictor, path: Path) -> tuple[np.ndarray, np.ndarray]:
    preprocessor = plan.configuration.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case(
        [str(path)], None, plan.plans_manager, plan.configuration, plan.dataset_json
    )
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plan.plans_manager, plan.configuration, plan.label_manager, properties,
        num_threads_torch=2,
    )  # fmt: skip
    return data, np.asarray(segmentation).transpose(2, 1, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return (
        2 * float(np.logical_and(a, b).sum()) / float(a.astype(bool).sum() + b.astype(bool).sum())
    )


@pytest.mark.parametrize("index", [0, 1, 2], ids=["iso1mm", "iso08mm", "axial3mm"])
@pytest.mark.parametrize("on_device", [False, True], ids=["resample-in-preprocess", "in-predict"])
def test_the_same_volume_and_mask_as_nnunet(tiny, cohort: Path, index: int, on_device: bool):
    _, plan, predictor = tiny
    path = cohort / pd.read_csv(cohort / "manifest.csv").t1w[index]
    info, voxels = check_image_data(path)
    expected_data, expected_mask = nnunets_own(plan, predictor, path)
    assert handled_here(plan)
    case = prepare_case(plan, [voxels], info.spacing, [path], resample_now=not on_device)
    assert case.on_network_grid is not on_device
    if not on_device:  # float32 torch vs nnU-Net's float64 skimage: ~1e-6 of the range
        assert case.data.shape == expected_data.shape
        assert np.abs(case.data - expected_data).max() < 1e-4
    labels = predict_case(predictor, plan, case)
    assert labels.dtype == np.uint8 and labels.shape == case.geometry.cropped_shape
    mask = to_image_order(plan, labels, case.geometry, info.shape)
    assert mask.shape == info.shape
    assert expected_mask.sum() > 500  # there is something to compare
    assert (mask == expected_mask).mean() >= 0.99999
    assert dice(mask, expected_mask) >= 0.9999


def test_a_reader_left_to_nnunet_goes_through_nnunets_own_functions(
    tiny, cohort: Path, tmp_path: Path
) -> None:
    """A model whose plans name NibabelIOWithReorient (it reorients to RAS) is read and
    preprocessed by nnU-Net itself, and its mask written by that reader and read back."""
    model_folder = tmp_path / tiny[0].folder.name
    shutil.copytree(tiny[0].folder, model_folder)
    plans = json.loads((model_folder / "plans.json").read_text())
    plans["image_reader_writer"] = "NibabelIOWithReorient"
    (model_folder / "plans.json").write_text(json.dumps(plans))
    model = resolve_model(model_folder)
    plan, predictor = model_plan(model), load_predictor(model, CPU)
    assert not handled_here(plan)
    path = cohort / pd.read_csv(cohort / "manifest.csv").t1w[1]  # LAS: reoriented
    info, voxels = check_image_data(path)
    case = prepare_case(plan, [voxels], info.spacing, [path])
    assert case.geometry.properties is not None
    mask = to_image_order(plan, predict_case(predictor, plan, case), case.geometry, info.shape)
    # nnU-Net's own, written by the model's writer as nnUNetv2_predict does
    data, _, properties = plan.configuration.preprocessor_class(verbose=False).run_case(
        [str(path)], None, plan.plans_manager, plan.configuration, plan.dataset_json
    )
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    export_prediction_from_logits(logits, properties, plan.configuration, plan.plans_manager,
                                  plan.dataset_json, str(tmp_path / "theirs"))  # fmt: skip
    theirs = np.asarray(nib.load(tmp_path / "theirs.nii.gz").dataobj)
    assert mask.shape == theirs.shape == info.shape
    assert theirs.sum() > 500
    assert (mask == theirs).mean() >= 0.99999 and dice(mask, theirs) >= 0.9999
