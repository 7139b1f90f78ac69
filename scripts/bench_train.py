"""Benchmark: `pingu-dask train` against nnU-Net's own commands, and a synthetic replica of
the PINGU paper's experiment.

Parts (--parts, comma-separated):

preprocess  The dataset a training needs, made from N synthetic scans of 3 sites:
            `pingu-dask train --prepare-only` (one Dask task per case on 2 local workers:
            read, checks, reorientation, the raw dataset, nnU-Net's fingerprint of each
            case; nnU-Net's planner; nnU-Net's preprocessing, one task per case) against
            `nnUNetv2_plan_and_preprocess -np 2` (fingerprint, plans, preprocessing in
            nnU-Net's own process pools) on the raw dataset pingu-dask wrote. Same default
            planner, same target spacing (1 mm). Wall seconds of the whole commands,
            alternated A B A B, median of --repeats.
iterations  Training speed on the same plans (the `tiny` preset's), the same
            preprocessed data and the same fold: `pingu-dask train` (its fold trainer, a
            child process of a Dask worker) against nnU-Net's training entry point
            (nnunetv2.run.run_training.run_training, which `nnUNetv2_train` calls; its
            trainer lookup by name is replaced by nnUNetTrainer_1epoch, because the lookup
            imports torchvision, which does not import beside this CPU torch). One epoch of
            nnU-Net's 250 training and 50 validation iterations each, SGD, the same
            augmentation processes (nnUNet_n_proc_DA) and torch threads; figure: training
            iterations per second of epoch time (as nnU-Net logs "Epoch time"). Then the
            share of epoch time the trainer waited for augmented batches, with 0, 1 and 2
            augmentation processes (0: augmentation in the trainer's own process, which is
            what a fold inside a daemonic Dask worker would be limited to).
replica     The paper's experiment in small, on synthetic data (NOT real MRI): 3 sites x
            --replica-scans scans, the `demo` preset network with a shorter schedule
            (--replica-epochs x 40 iterations). Multi-site model: internal cross-validation
            (kfold, 2 folds stratified by site: in-site figures) and leave-one-site-out
            (unseen-site figures). Single-site model (trained on --replica-site only):
            cross-validation within that site (in-site) and the other sites (unseen).
            Voxel Dice and cluster F1 of the whole brain, WM and BG, out-of-fold.

Run:  .venv/bin/python scripts/bench_train.py [--parts preprocess,iterations] [--scans 12]
      [--repeats 2] ; --parts replica takes ~2 h on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from benchkit.benchdoc import git_revision, machine, write_section

from pingu_dask.nnunet.planning import folders_in
from pingu_dask.nnunet.trainer_process import read_progress
from pingu_dask.synth.cohort import generate_cohort

SITES = ("iso1mm", "iso08mm", "axial3mm")
PINGU = [sys.executable, "-m", "pingu_dask.cli"]
QUIET = ["--dashboard-address", "127.0.0.1:0", "--device", "cpu"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="preprocess,iterations")
    parser.add_argument("--scans", type=int, default=12, help="cohort of the first two parts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=250, help="training iterations")
    parser.add_argument("--val-iterations", type=int, default=50)
    parser.add_argument("--wait-iterations", type=int, default=60, help="data-wait runs")
    parser.add_argument(
        "--wait-processes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[0, 1, 2],
        help="augmentation processes of the data-wait runs, comma-separated",
    )
    parser.add_argument("--replica-scans", type=int, default=4, help="scans per site")
    parser.add_argument("--replica-epochs", type=int, default=12)
    parser.add_argument("--replica-iterations", type=int, default=40)
    parser.add_argument("--replica-site", default="iso1mm")
    parser.add_argument("--work", type=Path, default=None)
    return parser.parse_args()


def run(command: list[str], env: dict | None = None, log: Path | None = None) -> float:
    """Wall seconds of a command that must succeed (its output to `log`)."""
    started = time.perf_counter()
    with open(log or os.devnull, "ab") as output:
        result = subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}; see {log}")
    return time.perf_counter() - started


def nnunet_env(model_dir: Path, preprocessed: Path | None = None, results: Path | None = None,
               augmentation: int = 1, threads: int | None = None) -> dict:  # fmt: skip
    folders = folders_in(model_dir)
    env = dict(os.environ)
    env.update(
        nnUNet_raw=folders.raw,
        nnUNet_preprocessed=str(preprocessed or folders.preprocessed),
        nnUNet_results=str(results or Path(folders.results) / "peer"),
        nnUNet_n_proc_DA=str(augmentation),
        nnUNet_def_n_proc="2",
        nnUNet_compile="false",
    )
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def cohort(work: Path, n_scans: int, seed: int) -> Path:
    root = work / f"cohort_{n_scans}_{seed}"
    if not (root / "manifest.csv").exists():
        generate_cohort(root, n_scans, sites=SITES, seed=seed, jobs=2)
    return root / "manifest.csv"


# --- preprocessing ---------------------------------------------------------------------


def bench_preprocess(args: argparse.Namespace, work: Path) -> str:
    manifest = cohort(work, args.scans, seed=31)
    log = work / "preprocess.log"
    ours, peers = [], []
    for repeat in range(args.repeats):
        model_dir = work / f"prep_{repeat}"
        ours.append(run([*PINGU, "train", str(manifest), "--out", str(model_dir), "--force",
                         "--prepare-only", "--workers", "2", "--target-spacing", "1",
                         "--split", "site", *QUIET], log=log))  # fmt: skip
        peer = work / f"peer_pp_{repeat}"
        env = nnunet_env(model_dir, preprocessed=peer)
        peers.append(run([sys.executable, "-c", PLAN_AND_PREPROCESS], env=env, log=log))
        ours_cases = len(list((folders_in(model_dir).preprocessed_dataset).rglob("*.b2nd")))
        peer_cases = len(list(peer.rglob("*.b2nd")))
        assert ours_cases == peer_cases == 2 * args.scans, (ours_cases, peer_cases)
    a, b = statistics.median(ours), statistics.median(peers)
    return "\n".join([
        f"{args.scans} synthetic scans (3 sites: 1 mm RAS, 0.8 mm LAS, 0.9 x 0.9 x 3 mm LPS), "
        "nnU-Net's default planner at 1 mm; wall seconds of the whole command, median of "
        f"{args.repeats} (A B alternated).",
        "",
        "| | wall s | per scan | runs |",
        "|---|---:|---:|---|",
        f"| `pingu-dask train --prepare-only --workers 2` | {a:.1f} | {a / args.scans:.2f} | "
        f"{', '.join(f'{x:.1f}' for x in ours)} |",
        f"| `nnUNetv2_plan_and_preprocess -np 2` | {b:.1f} | {b / args.scans:.2f} | "
        f"{', '.join(f'{x:.1f}' for x in peers)} |",
        "",
        f"Ratio nnU-Net / pingu-dask: **{b / a:.2f}x** (above 1: pingu-dask faster). "
        "pingu-dask's figure includes what nnU-Net's does not do: every image read in full "
        "and put through the pre-flight checks, the reference binarised onto the image grid, "
        "LAS/LPS-stored scans written turned to RAS; and a Dask cluster started. nnU-Net "
        "starts from the raw dataset pingu-dask wrote.",
    ])  # fmt: skip


# nnUNetv2_plan_and_preprocess's entry point, as the command runs it (default planner,
# 3d_fullres only, 2 processes, 1 mm target spacing as given to pingu-dask).
PLAN_AND_PREPROCESS = """
import sys
sys.argv = ['nnUNetv2_plan_and_preprocess', '-d', '1', '-c', '3d_fullres', '-np', '2',
            '-npfp', '2', '-overwrite_target_spacing', '1', '1', '1', '--no_pbar']
from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry
if __name__ == '__main__':
    plan_and_preprocess_entry()
"""

# --- training speed ----------------------------------------------------------------------

# nnU-Net's training entry point with its trainer found without the name lookup (which
# imports every trainer module, one of them torchvision).
PEER_TRAIN = """
import sys
import nnunetv2.run.run_training as entry
from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import (
    nnUNetTrainer_1epoch)
class Peer(nnUNetTrainer_1epoch):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = {iterations}
        self.num_val_iterations_per_epoch = {val_iterations}
        self.oversample_foreground_percent = 0.66  # the tiny preset's
    def perform_actual_validation(self, save_probabilities=False):
        pass  # predicting the validation cases: not part of the training speed
entry.recursive_find_trainer_class_by_name = lambda name: Peer
if __name__ == '__main__':
    import torch
    cpu = torch.device('cpu')
    entry.run_training('Dataset001_pingu', '3d_fullres', 0, 'Peer', {plans!r}, device=cpu)
"""


def peer_epoch_seconds(results: Path) -> float:
    """Epoch time nnU-Net logged ("Epoch time: X s") in its training log."""
    logs = sorted(results.rglob("training_log_*.txt"))
    for line in logs[-1].read_text().splitlines():
        if "Epoch time:" in line:
            return float(line.split("Epoch time:")[1].split()[0])
    raise SystemExit(f"no epoch time in {logs[-1]}")


def bench_iterations(args: argparse.Namespace, work: Path) -> str:
    manifest = cohort(work, args.scans, seed=31)
    model_dir = work / "iterations"
    log = work / "iterations.log"
    split = ["--split", "train-site:iso1mm", "--preset", "tiny", "--optimizer", "sgd",
             "--learning-rate", "0.01", "--epochs", "1", "--iterations-per-epoch",
             str(args.iterations), "--val-iterations", str(args.val_iterations)]  # fmt: skip
    run([*PINGU, "train", str(manifest), "--out", str(model_dir), "--force", "--prepare-only",
         *split, *QUIET], log=log)  # fmt: skip
    plans = "nnUNetPlans_tiny"
    threads = os.cpu_count() or 1
    ours, peers = [], []
    for repeat in range(args.repeats):
        fold = folders_in(model_dir).results_dataset / f"PinguTrainer__{plans}__3d_fullres"
        subprocess.run(["rm", "-rf", str(fold), str(model_dir / "ledger")], check=True)
        command = [*PINGU, "train", str(manifest), "--out", str(model_dir), *split, *QUIET]
        run([*command, "--augmentation-processes", "1", "--no-evaluate", "--workers", "1"], log=log)
        lines = [x for x in read_progress(fold / "fold_0") if x.get("event") == "epoch"]
        ours.append(args.iterations / lines[-1]["epoch_seconds"])
        results = work / f"peer_results_{repeat}"
        code = PEER_TRAIN.format(
            iterations=args.iterations, val_iterations=args.val_iterations, plans=plans
        )
        env = nnunet_env(model_dir, results=results, augmentation=1, threads=threads)
        run([sys.executable, "-c", code], env=env, log=log)
        peers.append(args.iterations / peer_epoch_seconds(results))
    a, b = statistics.median(ours), statistics.median(peers)
    waits = data_wait(args, model_dir, manifest, split, log)
    rows = "\n".join(
        f"| {n} | {it:.2f} | {100 * share:.0f} % |" for n, (it, share) in waits.items()
    )
    return "\n".join([
        f"Plans of the `tiny` preset (2.5 mm, 48^3 patch, 4 stages of 4-32 features, batch 2), "
        f"its preprocessed data, fold 0 of `train-site:iso1mm` ({args.scans // 3} training "
        f"cases); one epoch of {args.iterations} training and {args.val_iterations} "
        f"validation iterations, SGD, 1 augmentation process, {threads} torch threads. "
        f"Training iterations per second of epoch time, median of {args.repeats}:",
        "",
        "| | it/s | runs |",
        "|---|---:|---|",
        f"| `pingu-dask train` (fold trainer in a worker's child process) | {a:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in ours)} |",
        f"| nnU-Net's `run_training` (what `nnUNetv2_train` runs) | {b:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in peers)} |",
        "",
        f"Ratio pingu-dask / nnU-Net: **{a / b:.2f}x** (goal >= 0.95x).",
        "",
        f"Waiting for augmented batches ({args.wait_iterations} iterations, `tiny`, "
        f"{threads} torch threads): the share of epoch time the trainer spent in "
        "`next(dataloader)`. With 0 processes the augmentation runs in the trainer's own "
        "process, all that a fold inside a daemonic Dask worker could have; on a GPU that "
        "share is time the GPU idles.",
        "",
        "| augmentation processes | it/s | data wait |",
        "|---:|---:|---:|",
        rows,
    ])  # fmt: skip


def data_wait(args, model_dir: Path, manifest: Path, split: list[str], log: Path) -> dict:
    found = {}
    fold = folders_in(model_dir).results_dataset / "PinguTrainer__nnUNetPlans_tiny__3d_fullres"
    schedule = ["--iterations-per-epoch", str(args.wait_iterations), "--val-iterations", "5"]
    for processes in args.wait_processes:
        run([*PINGU, "train", str(manifest), "--out", str(model_dir), *split, *schedule,
             *QUIET, "--force", "--augmentation-processes", str(processes), "--no-evaluate",
             "--workers", "1"], log=log)  # fmt: skip
        line = [x for x in read_progress(fold / "fold_0") if x.get("event") == "epoch"][-1]
        found[processes] = (line["iterations_per_second"], line["data_wait_share"])
    return found


# --- the paper's experiment, synthetic -----------------------------------------------------


def bench_replica(args: argparse.Namespace, work: Path) -> str:
    manifest = cohort(work, 3 * args.replica_scans, seed=41)
    log = work / "replica.log"
    table = pd.read_csv(manifest)
    single = manifest.with_name("single_site.csv")
    table[table.site == args.replica_site].to_csv(single, index=False)
    schedule = ["--preset", "demo", "--epochs", str(args.replica_epochs),
                "--iterations-per-epoch", str(args.replica_iterations), "--workers", "2",
                "--no-tta", "--step-size", "0.5", *QUIET]  # fmt: skip
    experiments = {
        "multi-site, internal (kfold 2)": (manifest, ["--split", "kfold", "--folds", "2"]),
        "multi-site, unseen site (leave one out)": (manifest, ["--split", "site"]),
        f"single-site ({args.replica_site}), internal (kfold 2)": (
            single, ["--split", "kfold", "--folds", "2"]),
        f"single-site ({args.replica_site}), other sites": (
            manifest, ["--split", f"train-site:{args.replica_site}"]),
    }  # fmt: skip
    rows = []
    for name, (source, split) in experiments.items():
        model_dir = work / ("replica_" + "".join(c if c.isalnum() else "_" for c in name))
        started = time.perf_counter()
        run([*PINGU, "train", str(source), "--out", str(model_dir), *split, *schedule], log=log)
        minutes = (time.perf_counter() - started) / 60
        summary = pd.read_csv(model_dir / "evaluation" / "summary.csv")
        for row in summary[summary.model == "trained"].itertuples():
            rows.append({"experiment": name, "minutes": minutes, **row._asdict()})
    frame = pd.DataFrame(rows)
    lines = [
        f"Synthetic, not real MRI: 3 sites x {args.replica_scans} scans from `pingu-dask "
        f"synth` (seed 41), the `demo` preset network with {args.replica_epochs} x "
        f"{args.replica_iterations} iterations per fold, AdamW; out-of-fold voxel Dice / "
        "cluster F1, mean over scans (no test-time mirroring). `internal`: cross-validation "
        "within the training sites; `unseen`: sites the fold never saw.",
        "",
        "| experiment | site | scans | WM voxel / cluster | BG voxel / cluster | "
        "whole brain voxel / cluster | minutes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (name, site), group in frame.groupby(["experiment", "site"], sort=False):
        if site == "all" and frame[frame.experiment == name].site.nunique() == 2:
            continue  # one site: its `all` row repeats it
        cells = {}
        for row in group.itertuples():
            cells[row.region] = f"{row.voxel_dice_mean:.2f} / {row.cluster_f1_mean:.2f}"
        lines.append(
            f"| {name} | {site} | {int(group.n_scans.max())} | "
            f"{cells.get('white_matter', '-')} | {cells.get('basal_ganglia', '-')} | "
            f"{cells.get('whole_brain', '-')} | {group.minutes.iloc[0]:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    header = (f"Machine: {machine()}. Commit {git_revision()}. Command: "
              f"`.venv/bin/python scripts/bench_train.py {' '.join(sys.argv[1:])}`.")  # fmt: skip
    if "preprocess" in parts or "iterations" in parts:
        body = [header, ""]
        if "preprocess" in parts:
            body += ["### Preprocessing fan-out", "", bench_preprocess(args, work), ""]
        if "iterations" in parts:
            body += ["### Training speed and waiting for augmentation", "",
                     bench_iterations(args, work)]  # fmt: skip
        doc = write_section("bench_train", "## Training (scripts/bench_train.py)\n\n"
                            + "\n".join(body))  # fmt: skip
        print(json.dumps({"written": str(doc)}))
    if "replica" in parts:
        body = [header, "", bench_replica(args, work)]
        doc = write_section(
            "bench_train_replica",
            "## The paper's experiment on synthetic data (scripts/bench_train.py --parts "
            "replica)\n\n" + "\n".join(body),
        )
        print(json.dumps({"written": str(doc)}))


if __name__ == "__main__":
    main()
