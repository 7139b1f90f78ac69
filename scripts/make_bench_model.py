"""Make a PINGU-sized nnU-Net v2 model with RANDOM weights, for speed figures only.

PINGU itself is not reachable from here, so benchmarks need a network of its size.
nnU-Net's own planner (ExperimentPlanner, 8 GB VRAM target) plans a dataset whose
fingerprint is brain-sized, whole-head T1w, mixed 1 mm and 0.8 mm scans, with the target
spacing PINGU's plans name (trgSp 0.8 mm): what it gives is what we use (stages,
features, patch). The weights are nnU-Net's He initialisation, one seed per fold; the
last layer's bias is then set so that about `--foreground` of a real head's voxels
come out as "PVS" (a random network gives ~50 %, which would make the cluster stage
far costlier than with a real model). **The masks mean nothing**: this model is for
throughput, memory and agreement-between-implementations figures, never for science.

    .venv/bin/python scripts/make_bench_model.py OUT [--folds 1] [--size pingu|tiny]
        [--reader SimpleITKIO|NibabelIO] [--calibrate-on SCAN.nii.gz] [--labels A,B,C]

writes OUT/Dataset902_PinguSizedRandom/nnUNetTrainer__nnUNetPlansPinguSized__3d_fullres/
(dataset.json, plans.json, fold_N/checkpoint_final.pth, model_card.json) and prints the
model card: parameters, FLOPs of one forward pass over one patch, patch, spacing.
`--size tiny` shrinks the planned network (4 stages, 4-32 features, 64^3 patch, 2.5 mm)
so that the GPU benchmark's CPU path can run in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

DATASET_ID = 902
DATASET = f"Dataset{DATASET_ID:03d}_PinguSizedRandom"
PLANS = "nnUNetPlansPinguSized"
CONFIGURATION = "3d_fullres"
TARGET_SPACING = (0.8, 0.8, 0.8)  # PINGU's plans: nnUNetPlansv2.1_trgSp_8x8x8
#: A brain-sized fingerprint (nnU-Net axis order, whole-head T1w, nonzero-cropped):
#: 20 scans at 1 mm (Colin27-like heads, 176-193 x 214-236 x 170-190) and 20 at 0.8 mm.
N_CASES = 40
#: T1w intensities inside the head (uint8-like scale); z-score normalisation ignores
#: them, but the planner and plans.json need them.
INTENSITIES = {
    "max": 255.0,
    "mean": 95.0,
    "median": 92.0,
    "min": 0.0,
    "percentile_00_5": 4.0,
    "percentile_99_5": 210.0,
    "std": 48.0,
}
#: The tiny variant: coarse enough that a head is a few tiles (small convolutions are
#: slow per FLOP on a CPU: 48^3 tiles at 1.6 mm took 17 s for a 1 mm head).
TINY = {
    "n_stages": 4,
    "features_per_stage": [4, 8, 16, 32],
    "patch_size": [64, 64, 64],
    "spacing": [2.5, 2.5, 2.5],
}


def fingerprint(rng: np.random.Generator) -> dict:
    """dataset_fingerprint.json of a made-up but brain-sized whole-head cohort."""
    spacings, shapes = [], []
    for index in range(N_CASES):
        spacing = 1.0 if index % 2 == 0 else 0.8
        extent_mm = rng.uniform((176, 214, 170), (193, 236, 190))
        spacings.append([spacing] * 3)
        shapes.append([round(float(e) / spacing) for e in extent_mm])
    return {
        "foreground_intensity_properties_per_channel": {"0": INTENSITIES},
        "median_relative_size_after_cropping": 0.95,  # whole head: no mask for norm
        "shapes_after_crop": shapes,
        "spacings": spacings,
    }


def write_raw_dataset(raw: Path, reader: str, labels: tuple[str, ...] = ("PVS",)) -> None:
    """dataset.json and one tiny image and label pair (the planner lists the files)."""
    import nibabel as nib

    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    dataset = {
        "channel_names": {"0": "T1w"},
        "labels": {"background": 0, **{name: value for value, name in enumerate(labels, 1)}},
        "numTraining": N_CASES,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": reader,
        "name": "PINGU-sized network with RANDOM weights (benchmark stand-in, not a model)",
        "description": "Made by scripts/make_bench_model.py: nnU-Net's planner on a "
        "brain-sized fingerprint at 0.8 mm, He-initialised weights. Its masks mean nothing.",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    image = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    nib.save(image, folder / "imagesTr" / "case_000_0000.nii.gz")
    nib.save(
        nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)),
        folder / "labelsTr" / "case_000.nii.gz",
    )


def plan(work: Path, reader: str, labels: tuple[str, ...] = ("PVS",)) -> tuple[dict, dict]:
    """nnU-Net's ExperimentPlanner on the fingerprint: (plans, dataset.json)."""
    for name in ("raw", "preprocessed", "results"):
        (work / name).mkdir(parents=True, exist_ok=True)
    # nnU-Net reads these at import time: set them before importing it.
    os.environ["nnUNet_raw"] = str(work / "raw")
    os.environ["nnUNet_preprocessed"] = str(work / "preprocessed")
    os.environ["nnUNet_results"] = str(work / "results")
    write_raw_dataset(work / "raw", reader, labels)
    preprocessed = work / "preprocessed" / DATASET
    preprocessed.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(902)
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps(fingerprint(rng)))
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    planner = ExperimentPlanner(
        DATASET, plans_name=PLANS, overwrite_target_spacing=list(TARGET_SPACING)
    )
    planner.plan_experiment()
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    dataset = json.loads((work / "raw" / DATASET / "dataset.json").read_text())
    dataset.pop("overwrite_image_reader_writer")
    return plans, dataset


def shrink(plans: dict) -> dict:
    """The tiny variant: same plans, a network small enough for a CPU test."""
    config = plans["configurations"][CONFIGURATION]
    n = TINY["n_stages"]
    config["architecture"]["arch_kwargs"].update(
        n_stages=n,
        features_per_stage=TINY["features_per_stage"],
        kernel_sizes=[[3, 3, 3]] * n,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n,
        n_conv_per_stage_decoder=[1] * (n - 1),
    )
    config.update(patch_size=TINY["patch_size"], spacing=TINY["spacing"])
    return plans


def build_network(plans: dict, allow_init: bool = True, n_outputs: int = 2):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"][CONFIGURATION]["architecture"]
    return get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        1,
        n_outputs,
        allow_init=allow_init,
        deep_supervision=False,
    )


def flops_per_patch(plans: dict) -> float:
    """FLOPs of one forward pass over one patch (convolutions, 2 per multiply-add),
    counted by torch's FlopCounterMode on meta tensors (nothing is computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    patch = plans["configurations"][CONFIGURATION]["patch_size"]
    with torch.device("meta"):
        network = build_network(plans, allow_init=False)
        sample = torch.empty(1, 1, *patch)
    with FlopCounterMode(display=False) as counter:
        network(sample)
    return float(counter.get_total_flops())


def foreground_bias(network, plans: dict, scan: Path | None, share: float) -> np.ndarray:
    """The shift of each foreground output that leaves about `share` of one patch's
    voxels as foreground, shared equally between the foreground outputs.

    The patch is the middle of `scan` preprocessed as nnU-Net would (z-scored); without
    a scan, standard normal noise.
    """
    import torch

    patch = plans["configurations"][CONFIGURATION]["patch_size"]
    if scan is not None:
        import nibabel as nib

        image = nib.load(scan)
        data = np.asarray(image.dataobj, dtype=np.float32).T  # nnU-Net's axis order
        middle = [max(0, (n - p) // 2) for n, p in zip(data.shape, patch, strict=True)]
        crop = data[tuple(slice(m, m + p) for m, p in zip(middle, patch, strict=True))]
        crop = (crop - crop.mean()) / max(float(crop.std()), 1e-8)
        padded = np.zeros(patch, np.float32)
        padded[tuple(slice(0, n) for n in crop.shape)] = crop
        sample = torch.from_numpy(padded)[None, None]
    else:
        sample = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = network.eval()(sample)[0]
    shifts = []
    for output in range(1, logits.shape[0]):  # each foreground output its share
        margin = (logits[output] - logits[0]).flatten().numpy()
        shifts.append(-float(np.quantile(margin, 1.0 - share / (logits.shape[0] - 1))))
    return np.asarray(shifts, dtype=np.float32)


def save_folds(folder: Path, plans: dict, dataset: dict, args: argparse.Namespace) -> dict:
    import torch

    for fold in range(args.folds):
        torch.manual_seed(fold)
        network = build_network(plans, n_outputs=len(dataset["labels"]))
        shift = foreground_bias(network, plans, args.calibrate_on, args.foreground)
        last = network.decoder.seg_layers[-1]
        with torch.no_grad():
            last.bias[1:] += torch.from_numpy(shift)
        checkpoint = {
            "network_weights": network.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
            "init_args": {
                "plans": plans,
                "configuration": CONFIGURATION,
                "fold": str(fold),
                "dataset_json": dataset,
            },
            "current_epoch": 0,
            "note": "RANDOM weights (scripts/make_bench_model.py): not a trained model",
        }
        (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return {"parameters": sum(p.numel() for p in network.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--folds", type=int, default=1, help="1 for speed, 5 for the ensemble")
    parser.add_argument("--size", choices=("pingu", "tiny"), default="pingu")
    parser.add_argument("--reader", default="SimpleITKIO", help="plans' image reader")
    parser.add_argument("--calibrate-on", type=Path, help="a T1w scan for the output bias")
    parser.add_argument("--foreground", type=float, default=0.002, help="share of PVS voxels")
    parser.add_argument(
        "--labels",
        default="PVS",
        help="foreground label names, comma-separated, e.g. WM-PVS,BG-PVS,WMH (a multi-class "
        "model: its outputs share the foreground in ways that mean nothing)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        labels = tuple(name.strip() for name in args.labels.split(",") if name.strip())
        plans, dataset = plan(Path(scratch), args.reader, labels)
    plans["plans_name"] = PLANS
    if args.size == "tiny":
        plans = shrink(plans)
    folder = args.out / DATASET / f"nnUNetTrainer__{PLANS}__{CONFIGURATION}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    card = save_folds(folder, plans, dataset, args)
    config = plans["configurations"][CONFIGURATION]
    arch = config["architecture"]["arch_kwargs"]
    card.update(
        name=folder.name,
        size=args.size,
        random_weights=True,
        folds=args.folds,
        flops_per_patch=flops_per_patch(plans),
        patch_size=config["patch_size"],
        spacing=config["spacing"],
        n_stages=arch["n_stages"],
        features_per_stage=arch["features_per_stage"],
        reader=plans["image_reader_writer"],
        foreground_share=args.foreground,
    )
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    print(json.dumps(card, indent=2))
    print(folder)


if __name__ == "__main__":
    sys.exit(main())
