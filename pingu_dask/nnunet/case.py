"""One scan through nnU-Net: preprocessing, prediction and export, on plain arrays.

    prepare_case       (CPU stage)  the voxels already read and checked -> nnU-Net's
                                    preprocessing: transpose, crop to the head,
                                    normalise, and (on CPU) resample to the model's grid
    predict_case       (inference)  resample on the device if not done yet, sliding-window
                                    logits, then the export on the same device: logits
                                    back onto the scan's grid, argmax, a uint8 label map
    to_image_order     (CPU stage)  that label map, uncropped, in the input file's order

Only a uint8 label map of the cropped head leaves `predict_case`: no float logits cross
a process, and on a GPU the CPU never resamples anything. This reproduces nnU-Net's
`DefaultPreprocessor.run_case_npy` and `convert_predicted_logits_to_segmentation_with_
correct_shape` step by step with nnU-Net's own pieces (cropping rule, normalisers, shape
rule, label manager); only the resampling is ours (resampling.py: the same maps, in
torch, on any device), and two things nnU-Net computes and inference never uses are
skipped (the resampled nonzero mask; the hole-filled mask when no channel normalises
inside it). Models this does not cover (another preprocessor class, another resampling
function, a reader that is not a plain NIfTI reader) go through nnU-Net's own functions
unchanged. tests/test_nnunet_case.py checks both paths against nnU-Net's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pingu_dask.nnunet.plans import ModelPlan
from pingu_dask.nnunet.resampling import NNUNET_DEFAULT, resample


@dataclass(frozen=True)
class CaseGeometry:
    """Where the network's grid lies in the scan (nnU-Net's `properties`, in short).

    Axes are nnU-Net's: the NIfTI axes reversed, then the plans' transpose_forward.
    """

    shape_before_cropping: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]  # half-open [start, end) per axis
    spacing: tuple[float, ...]  # the scan's
    network_spacing: tuple[float, ...]  # the model's (the configuration's spacing)
    network_shape: tuple[int, ...]  # the cropped head on the model's grid
    # nnU-Net's own properties: only for models whose reader we leave to nnU-Net.
    properties: dict | None = field(default=None, compare=False)

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(end - start for start, end in self.bbox)


@dataclass
class PreparedCase:
    """A scan ready for the network: normalised, cropped, maybe not yet resampled."""

    data: np.ndarray  # (C, X, Y, Z) float32
    geometry: CaseGeometry

    @property
    def on_network_grid(self) -> bool:
        return tuple(self.data.shape[1:]) == self.geometry.network_shape


def handled_here(plan: ModelPlan) -> bool:
    """Whether prepare_case/predict_case run nnU-Net's steps themselves for this model
    (the default preprocessor, resampling and a plain NIfTI reader), or hand the
    scan to nnU-Net's own functions."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    configuration = plan.configuration.configuration
    return (
        plan.reads_nifti_as_is
        and plan.configuration.preprocessor_class is DefaultPreprocessor
        and configuration["resampling_fn_data"] == NNUNET_DEFAULT
        and configuration["resampling_fn_probabilities"] == NNUNET_DEFAULT
        and len(plan.configuration.spacing) == 3
    )


def prepare_case(
    plan: ModelPlan,
    images: Sequence[np.ndarray],
    zooms: Sequence[float],
    files: Sequence[str | Path],
    resample_now: bool = True,
) -> PreparedCase:
    """nnU-Net's preprocessing of one scan, from the voxels already read.

    `images` are the channels as nibabel reads them (NIfTI array order, float32),
    `zooms` the voxel sizes from the header (what nnU-Net's NIfTI readers take as
    spacing). With `resample_now` False the data stay on the scan's grid (cropped and
    normalised), to be resampled on the device by predict_case. `files` are read again
    by nnU-Net itself only for models handled_here() does not cover.
    """
    if not handled_here(plan):
        return _prepare_with_nnunet(plan, files)
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    forward = list(plan.plans_manager.transpose_forward)
    # SimpleITK order (reversed axes), then the plans' transpose: nnU-Net's view.
    data = np.stack([np.asarray(image, dtype=np.float32).T for image in images])
    data = np.ascontiguousarray(data.transpose([0, *[a + 1 for a in forward]]))
    spacing = tuple(float(z) for z in zooms[::-1])
    spacing = tuple(spacing[a] for a in forward)
    shape_before_cropping = tuple(int(n) for n in data.shape[1:])
    bbox = _nonzero_bbox(data)
    data = data[(slice(None), *(slice(start, end) for start, end in bbox))]
    network_spacing = tuple(float(s) for s in plan.configuration.spacing)
    new_shape = compute_new_shape(data.shape[1:], spacing, network_spacing)
    network_shape = tuple(int(n) for n in new_shape)
    data = _normalise(plan, np.ascontiguousarray(data))
    geometry = CaseGeometry(shape_before_cropping, bbox, spacing, network_spacing, network_shape)
    case = PreparedCase(data, geometry)
    if resample_now:
        case.data = resample_to_network(plan, case, device="cpu").numpy()
    return case


def _nonzero_bbox(data: np.ndarray) -> tuple[tuple[int, int], ...]:
    """nnU-Net's crop box: the bounding box of voxels non-zero in any channel.

    nnU-Net fills holes in that mask first; holes lie inside the box, so the box is
    the same without it (and a fill of the whole volume is the costliest part of
    cropping a 0.5 mm head).
    """
    nonzero = np.any(data != 0, axis=0)
    box = []
    for axis in range(nonzero.ndim):
        others = tuple(a for a in range(nonzero.ndim) if a != axis)
        present = np.flatnonzero(np.any(nonzero, axis=others))
        box.append((int(present[0]), int(present[-1]) + 1) if present.size else (0, 0))
    return tuple(box)


def _normalise(plan: ModelPlan, data: np.ndarray) -> np.ndarray:
    """nnU-Net's normalisation per channel (its own normaliser classes), in place.

    A normaliser sees nnU-Net's nonzero mask (hole-filled, -1 outside) only where the
    plans normalise inside it (use_mask_for_norm); no normaliser reads it otherwise.
    """
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    configuration = plan.configuration
    if any(configuration.use_mask_for_norm):
        from scipy.ndimage import binary_fill_holes

        inside = binary_fill_holes(np.any(data != 0, axis=0))
        mask = np.where(inside, np.int8(0), np.int8(-1))[None]
    else:
        mask = np.zeros((1, *data.shape[1:]), dtype=np.int8)
    intensities = plan.plans_manager.foreground_intensity_properties_per_channel
    return DefaultPreprocessor(verbose=False)._normalize(data, mask, configuration, intensities)


def _prepare_with_nnunet(plan: ModelPlan, files: Sequence[str | Path]) -> PreparedCase:
    """nnU-Net's own reader and preprocessor (models handled_here() does not cover)."""
    preprocessor = plan.configuration.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case(
        [str(f) for f in files], None, plan.plans_manager, plan.configuration, plan.dataset_json
    )
    forward = plan.plans_manager.transpose_forward
    spacing = tuple(float(properties["spacing"][a]) for a in forward)
    network_spacing = tuple(float(s) for s in plan.configuration.spacing)
    if len(network_spacing) < len(spacing):  # 2D configurations keep the slice spacing
        network_spacing = (spacing[0], *network_spacing)
    geometry = CaseGeometry(
        shape_before_cropping=tuple(int(n) for n in properties["shape_before_cropping"]),
        bbox=tuple((int(a), int(b)) for a, b in properties["bbox_used_for_cropping"]),
        spacing=spacing,
        network_spacing=network_spacing,
        network_shape=tuple(int(n) for n in data.shape[1:]),
        properties=properties,
    )
    return PreparedCase(np.ascontiguousarray(data, dtype=np.float32), geometry)


def resample_to_network(plan: ModelPlan, case: PreparedCase, device: Any):
    """The case's data on the model's grid, as a float32 tensor on `device`."""
    import torch

    data = torch.from_numpy(case.data).to(device)
    if case.on_network_grid:
        return data
    geometry = case.geometry
    kwargs = _resampling_kwargs(plan, "resampling_fn_data_kwargs")
    with torch.inference_mode():
        return resample(
            data, geometry.network_shape, geometry.spacing, geometry.network_spacing, **kwargs
        )


def _resampling_kwargs(plan: ModelPlan, key: str) -> dict:
    """The plans' keyword arguments for nnU-Net's default resampling function."""
    kwargs = dict(plan.configuration.configuration[key])
    kwargs.pop("is_seg", None)
    return kwargs


def predict_case(predictor: Any, plan: ModelPlan, case: PreparedCase) -> np.ndarray:
    """The label map of the cropped head (nnU-Net's axes), from logits on the device.

    Everything from the resampling of the input to the argmax runs on the predictor's
    device (a GPU, or the CPU with torch's threads). Returns uint8 (uint16 for models
    with 255 labels or more).
    """
    import torch

    device = predictor.device
    data = resample_to_network(plan, case, device)
    logits = _ensemble_logits(predictor, data)
    del data
    try:
        return _export(plan, logits, case.geometry)
    except torch.OutOfMemoryError:  # a very large scan on a small GPU: finish on the CPU
        return _export(plan, logits.cpu(), case.geometry)


def _ensemble_logits(predictor: Any, data: Any):
    """nnU-Net's sliding-window logits averaged over the model's folds, left where
    nnU-Net leaves them (on the GPU when it has the memory; nnU-Net's own loop moves
    every fold's logits to the CPU).

    A single-fold predictor already holds its weights (predictor.py loads them into
    the network), so they are not copied again for every scan.
    """
    folds = predictor.list_of_parameters
    total = None
    for params in folds:
        if len(folds) > 1:
            predictor.network.load_state_dict(params)
        logits = predictor.predict_sliding_window_return_logits(data)
        total = logits if total is None else total + logits.to(total.device)
    assert total is not None, "a model has at least one fold"
    if len(folds) > 1:
        total /= len(folds)
    return total


def _export(plan: ModelPlan, logits: Any, geometry: CaseGeometry) -> np.ndarray:
    """Logits on the model's grid -> label map of the cropped head on the scan's grid."""
    import torch

    with torch.inference_mode():
        if handled_here(plan):
            kwargs = _resampling_kwargs(plan, "resampling_fn_probabilities_kwargs")
            scores = resample(
                logits, geometry.cropped_shape, geometry.network_spacing, geometry.spacing, **kwargs
            )
        else:
            resampled = plan.configuration.resampling_fn_probabilities(
                logits.cpu(), geometry.cropped_shape, geometry.network_spacing, geometry.spacing
            )
            scores = torch.as_tensor(resampled)
        labels = _labels(plan, scores)
    dtype = np.uint8 if len(plan.label_manager.foreground_labels) < 255 else np.uint16
    return labels.cpu().numpy().astype(dtype, copy=False)


def _labels(plan: ModelPlan, scores: Any):
    """Argmax over classes, first class on ties as numpy's (nnU-Net's) argmax; region
    models through nnU-Net's label manager (sigmoid, thresholds, class order).

    Written as a running comparison: torch's argmax over the leading axis of a large
    CPU tensor took 0.9 s for two classes of a 1 mm head, this takes a few ms.
    """
    import torch

    if plan.label_manager.has_regions:
        return plan.label_manager.convert_logits_to_segmentation(scores)
    scores = scores.float()  # exact for float16: its ties stay ties
    labels = torch.zeros(scores.shape[1:], dtype=torch.int16, device=scores.device)
    best = scores[0]
    for index in range(1, scores.shape[0]):
        better = scores[index] > best
        labels[better] = index
        best = torch.maximum(best, scores[index])
    return labels


def to_image_order(
    plan: ModelPlan, labels: np.ndarray, geometry: CaseGeometry, shape: tuple[int, ...]
) -> np.ndarray:
    """The label map of the cropped head -> the whole image, in the input file's order.

    SimpleITKIO and NibabelIO hand nnU-Net the NIfTI array with its axes reversed, so
    reversing them back is exact. Any other reader (e.g. one that reorients) writes the
    map with its own writer to a temporary file, which is then read back.
    """
    full = np.zeros(geometry.shape_before_cropping, dtype=labels.dtype)
    full[tuple(slice(start, end) for start, end in geometry.bbox)] = labels
    full = full.transpose(plan.plans_manager.transpose_backward)
    if plan.reads_nifti_as_is:
        mask = full.T
    else:
        import nibabel as nib

        with tempfile.TemporaryDirectory() as scratch:
            path = str(Path(scratch) / "mask.nii.gz")
            plan.plans_manager.image_reader_writer_class().write_seg(
                full, path, geometry.properties
            )
            image: Any = nib.load(path)
            mask = np.asarray(image.dataobj)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask shape {mask.shape} does not match the image {tuple(shape)}")
    return mask
