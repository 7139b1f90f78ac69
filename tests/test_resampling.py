"""The torch resampling equals nnU-Net's own `resample_data_or_seg_to_shape`.

Compared on random volumes (the hardest case for a spline: every voxel differs from its
neighbours) for the cases a PVS cohort meets: isotropic up- and downsampling of images
(cubic spline) and logits (linear), anisotropic scans whose slow axis nnU-Net resamples
on its own (3 mm slices onto a 0.8 mm model and back), several channels, and an axis
that keeps its size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from pingu_dask.nnunet.resampling import resample, separate_slow_axis

CASES = {
    # name: (input shape (C, X, Y, Z), output shape, current spacing, new spacing, order)
    "image 1 mm -> 0.8 mm": ((1, 30, 36, 31), (38, 45, 39), (1, 1, 1), (0.8, 0.8, 0.8), 3),
    "image 0.5 mm -> 0.8 mm": ((1, 40, 47, 43), (25, 29, 27), (0.5, 0.5, 0.5), (0.8, 0.8, 0.8), 3),
    "image, one axis kept": ((2, 30, 36, 31), (30, 45, 39), (1, 1, 1), (1, 0.8, 0.8), 3),
    "logits 0.8 mm -> 1 mm": ((2, 38, 45, 39), (30, 36, 31), (0.8, 0.8, 0.8), (1, 1, 1), 1),
    "image 3 mm slices -> 0.8 mm": ((1, 12, 40, 41), (45, 45, 46), (3, 0.9, 0.9), (0.8,) * 3, 3),
    "logits 0.8 mm -> 3 mm slices": ((2, 45, 45, 46), (12, 40, 41), (0.8,) * 3, (3, 0.9, 0.9), 1),
    "image, slow last axis": ((1, 40, 41, 12), (45, 46, 45), (0.9, 0.9, 3), (0.8,) * 3, 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_nnunets_resampling(name: str) -> None:
    shape, new_shape, current, new, order = CASES[name]
    data = np.random.default_rng(3).normal(100, 30, size=shape).astype(np.float32)
    expected = resample_data_or_seg_to_shape(
        data, new_shape, current, new, is_seg=False, order=order, order_z=0, force_separate_z=None
    )
    ours = resample(torch.from_numpy(data), new_shape, current, new, order, 0, None).numpy()
    assert ours.shape == expected.shape == (shape[0], *new_shape)
    # float32 vs nnU-Net's float64: relative differences of a few 1e-7 of the range.
    assert np.abs(ours - expected).max() <= 1e-5 * np.ptp(data)


def test_anisotropic_scans_resample_their_slow_axis_separately() -> None:
    assert separate_slow_axis((3, 0.9, 0.9), (0.8, 0.8, 0.8), None) == 0
    assert separate_slow_axis((0.8, 0.8, 0.8), (0.9, 0.9, 3), None) == 2
    assert separate_slow_axis((1, 1, 1), (0.8, 0.8, 0.8), None) is None


def test_same_shape_is_returned_unchanged() -> None:
    data = torch.rand(1, 8, 9, 10)
    assert resample(data, (8, 9, 10), (1, 1, 1), (1, 1, 1)) is data
