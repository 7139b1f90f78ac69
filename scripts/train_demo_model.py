"""Train the small bundled demo model: a real nnU-Net v2 on a synthetic cohort.

Recipe (all in one process, CPU by default, ~45 min on 2 cores):
1. `pingu-dask synth` cohort (default 30 scans over the three default sites) -> an
   nnU-Net raw dataset (imagesTr/<id>_0000.nii.gz, labelsTr/<id>.nii.gz, dataset.json).
2. nnU-Net fingerprint + default ExperimentPlanner, then the 3d_fullres plan is shrunk
   (4 stages, 12-96 features, 1 mm target spacing, 64^3 patch) and saved as plans
   `nnUNetPlansDemo`; nnU-Net's DefaultPreprocessor preprocesses with it.
3. Training with a subclass of nnUNetTrainer that changes only the schedule (epochs,
   iterations per epoch, AdamW instead of SGD, more foreground patches) and skips
   nnU-Net's own validation export; fold `all`. Data, loss, augmentation and network
   code are nnU-Net's.
4. Export: dataset.json, plans.json and fold_all/checkpoint_final.pth (optimizer state
   dropped, trainer name set to the plain `nnUNetTrainer`, whose inference is
   identical) to pingu_dask/nnunet/demo/nnUNetTrainer__nnUNetPlansDemo__3d_fullres.
5. Evaluation on a fresh synthetic cohort (another seed): voxel Dice and cluster F1,
   written to the model's README.

nnU-Net reads its folders from environment variables; this script (not the package)
sets them, pointing into --work.

    .venv/bin/python scripts/train_demo_model.py [--epochs 30] [--iterations 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

DATASET_ID = 901
DATASET_NAME = f"Dataset{DATASET_ID}_PinguDemo"
PLANS_NAME = "nnUNetPlansDemo"
CONFIGURATION = "3d_fullres"
REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = (
    REPO / "pingu_dask" / "nnunet" / "demo" / f"nnUNetTrainer__{PLANS_NAME}__{CONFIGURATION}"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "demo_model")
    parser.add_argument("--train-scans", type=int, default=30)
    parser.add_argument("--eval-scans", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per epoch")
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--features", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=1000, help="seed of the training cohort")
    parser.add_argument("--skip-training", action="store_true", help="only export + evaluate")
    return parser.parse_args()


def set_nnunet_environment(work: Path) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(work / name)
    os.environ["nnUNet_def_n_proc"] = "1"  # 2-core machine: more processes only thrash
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ["nnUNet_compile"] = "false"


def make_raw_dataset(work: Path, n_scans: int, seed: int) -> None:
    from pingu_dask.synth.cohort import generate_cohort

    raw = work / "nnUNet_raw" / DATASET_NAME
    if (raw / "dataset.json").exists():
        return
    cohort = work / "train_cohort"
    records = generate_cohort(cohort, n_scans, seed=seed, jobs=2)
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for record in records:
        shutil.copy(cohort / record.t1w, raw / "imagesTr" / f"{record.scan_id}_0000.nii.gz")
        shutil.copy(cohort / record.reference, raw / "labelsTr" / f"{record.scan_id}.nii.gz")
    dataset = {
        "channel_names": {"0": "T1w"},
        "labels": {"background": 0, "PVS": 1},
        "numTraining": len(records),
        "file_ending": ".nii.gz",
        "name": "pingu-dask demo (synthetic PVS)",
        "description": "Synthetic multi-site T1w phantoms from `pingu-dask synth`; not real MRI.",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))


def plan_and_preprocess(patch: tuple[int, int, int], batch_size: int, features: list[int]) -> None:
    """Default nnU-Net planning, shrunk to a CPU-sized network; preprocess once."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    default_plans = preprocessed / "nnUNetPlans.json"
    if not default_plans.exists():
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, show_progress_bar=False)
        plan_experiment_dataset(DATASET_ID, overwrite_target_spacing=(1.0, 1.0, 1.0))
    plans = json.loads(default_plans.read_text())
    config = plans["configurations"][CONFIGURATION]
    n_stages = len(features)
    config["architecture"]["arch_kwargs"].update(
        n_stages=n_stages,
        features_per_stage=features,
        kernel_sizes=[[3, 3, 3]] * n_stages,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
        n_conv_per_stage=[2] * n_stages,
        n_conv_per_stage_decoder=[1] * (n_stages - 1),
    )
    config.update(
        patch_size=list(patch),
        batch_size=batch_size,
        spacing=[1.0, 1.0, 1.0],
        data_identifier=f"{PLANS_NAME}_{CONFIGURATION}",
    )
    plans["plans_name"] = PLANS_NAME
    plans["configurations"] = {CONFIGURATION: config}
    (preprocessed / f"{PLANS_NAME}.json").write_text(json.dumps(plans, indent=2))
    if not (preprocessed / f"{PLANS_NAME}_{CONFIGURATION}").exists():
        preprocess_dataset(DATASET_ID, PLANS_NAME, (CONFIGURATION,), [1], show_progress_bar=False)


def train(args: argparse.Namespace) -> Path:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    CPU = torch.device("cpu")

    class nnUNetTrainerDemo(nnUNetTrainer):
        """Short schedule for a CPU-sized demo; everything else is plain nnUNetTrainer."""

        def __init__(self, plans, configuration, fold, dataset_json, device=CPU):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = args.epochs
            self.num_iterations_per_epoch = args.iterations
            self.num_val_iterations_per_epoch = 5
            self.save_every = 5
            self.oversample_foreground_percent = 0.66  # PVS are < 0.1 % of voxels
            self.initial_lr = args.lr

        def configure_optimizers(self):
            """AdamW instead of SGD: the short schedule needs fast early progress."""
            from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

            optimizer = torch.optim.AdamW(
                self.network.parameters(), self.initial_lr, weight_decay=3e-5
            )
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

        def perform_actual_validation(self, save_probabilities: bool = False) -> None:
            """Skipped: the script evaluates on a fresh cohort instead (step 5)."""

    torch.set_num_threads(args.threads)
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    plans = load_json(preprocessed / f"{PLANS_NAME}.json")
    plans["continue_training"] = False  # nnU-Net 2.8's run_training sets this before the trainer
    dataset_json = load_json(preprocessed / "dataset.json")
    trainer = nnUNetTrainerDemo(
        plans, CONFIGURATION, "all", dataset_json, torch.device(args.device)
    )
    started = time.perf_counter()
    trainer.run_training()
    print(f"training took {time.perf_counter() - started:.0f} s")
    return Path(trainer.output_folder)


def export(trained_folder: Path) -> None:
    import torch

    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained_folder.parent / "dataset.json", MODEL_DIR / "dataset.json")
    shutil.copy(trained_folder.parent / "plans.json", MODEL_DIR / "plans.json")
    checkpoint = torch.load(
        trained_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    checkpoint["optimizer_state"] = None
    checkpoint["grad_scaler_state"] = None
    checkpoint["trainer_name"] = "nnUNetTrainer"
    (MODEL_DIR / "fold_all").mkdir(exist_ok=True)
    torch.save(checkpoint, MODEL_DIR / "fold_all" / "checkpoint_final.pth")
    print(f"model written to {MODEL_DIR}")


def evaluate(work: Path, n_scans: int, train_args: argparse.Namespace) -> str:
    """Segment a fresh cohort (another seed) with the exported model; Markdown summary."""
    import numpy as np

    from pingu_dask.config import InferenceSettings
    from pingu_dask.inputs.manifest import load_manifest
    from pingu_dask.nnunet.model import resolve_model
    from pingu_dask.run import stages
    from pingu_dask.synth.cohort import generate_cohort

    cohort = work / "eval_cohort"
    shutil.rmtree(cohort, ignore_errors=True)
    generate_cohort(cohort, n_scans, seed=2000, jobs=2)
    model = resolve_model(MODEL_DIR)
    settings = InferenceSettings(tta=False, device="cpu")
    records = []
    for scan in load_manifest(cohort / "manifest.csv").scans:
        prepared = stages.preprocess(scan, model)
        predicted = stages.predict(prepared, model, settings)
        record = stages.finish(predicted, scan, model, settings, work / "eval_out")
        records.append((scan.site, record))
    lines = [
        "| site | scans | voxel Dice (mean ± SD) | cluster F1 (mean ± SD) |",
        "|---|---:|---:|---:|",
    ]
    for site in [*sorted({s for s, _ in records}), "all"]:
        chosen = [r for s, r in records if site in ("all", s)]
        dice = np.array([r.voxel_dice for r in chosen])
        f1 = np.array([r.cluster_f1 for r in chosen])
        lines.append(
            f"| {site} | {len(chosen)} | {dice.mean():.3f} ± {dice.std():.3f} | "
            f"{f1.mean():.3f} ± {f1.std():.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    readme = MODEL_DIR.parent / "README.md"
    readme.write_text(
        README.format_map(
            vars(train_args)
            | {"eval_scans": n_scans, "table": table, "fingerprint": model.fingerprint}
        )
    )
    return table


README = """# The bundled demo model

**For trying pingu-dask on synthetic data only. It has never seen a real MRI and must
not be used on real scans.** Select it with `--model demo`.

A real nnU-Net v2 model (`nnUNetTrainer__nnUNetPlansDemo__3d_fullres`, fold `all`,
one input channel `T1w`, labels background/PVS), made by `scripts/train_demo_model.py`:

- data: {train_scans} synthetic scans from `pingu-dask synth` (seed {seed}, sites iso1mm,
  iso08mm, axial3mm in turn);
- plans: nnU-Net's default ExperimentPlanner, then shrunk: 1 mm target spacing, patch
  {patch}, PlainConvUNet with features {features}, 2 convolutions per encoder stage;
- training: nnU-Net's trainer, data loading, augmentation and Dice+CE loss, with a short
  schedule ({epochs} epochs x {iterations} iterations, batch 2, AdamW lr {lr} with poly
  decay, 66 % foreground patches) on the CPU;
- export: dataset.json, plans.json and fold_all/checkpoint_final.pth with the optimizer
  state removed and the trainer name set to `nnUNetTrainer` (the training subclass
  changed only the schedule and the optimizer; inference is the plain trainer's).

Evaluation on a fresh synthetic cohort ({eval_scans} scans, seed 2000, same sites), no
test-time augmentation, voxel Dice and symmetric cluster F1 (26-connectivity) against the
ground truth:

{table}

Fingerprint (sha256 of plans, dataset.json and checkpoint): `{fingerprint}`.

Reproduce: `.venv/bin/python scripts/train_demo_model.py` (training took 38 min on 2 CPU cores).
A checkpoint is a torch pickle, i.e. code: only load models from a source you trust.
"""


def main() -> None:
    args = parse_args()
    set_nnunet_environment(args.work)
    make_raw_dataset(args.work, args.train_scans, args.seed)
    plan_and_preprocess(tuple(args.patch), args.batch_size, args.features)
    results = Path(os.environ["nnUNet_results"]) / DATASET_NAME
    trained = results / f"nnUNetTrainerDemo__{PLANS_NAME}__{CONFIGURATION}" / "fold_all"
    if not args.skip_training:
        trained = train(args)
    export(trained)
    evaluate(args.work, args.eval_scans, args)


if __name__ == "__main__":
    main()
