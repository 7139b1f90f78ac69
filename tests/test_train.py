"""`pingu-dask train` end to end: real nnU-Net training (the `tiny` preset) on Dask workers.

Real parts: nnU-Net's fingerprint, planner, preprocessor and trainer (with its
augmentation processes, in a child process of each worker), a LocalCluster of separate
worker processes, the normal inference path for the out-of-fold predictions, real
files. The tiny preset trains in seconds per epoch on a CPU; its masks mean nothing,
so the tests check the method (splits, folds, checkpoints, retries, resume, the
tables), not Dice values.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from distributed import Client

from pingu_dask.analysis.regions import ASEG
from pingu_dask.config import InferenceSettings, PvsClusterRules
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.manifest import load_manifest
from pingu_dask.nnunet.planning import PRESETS
from pingu_dask.output import tables
from pingu_dask.output.training import read_ledger
from pingu_dask.run.clusters import ClusterRequest
from pingu_dask.run.local import local_cluster
from pingu_dask.synth.cohort import generate_cohort
from pingu_dask.train.evaluation import Scoring
from pingu_dask.train.orchestrate import Watch, train_model
from pingu_dask.train.request import TrainRequest
from pingu_dask.train.splits import SplitSpec

N_GOOD = 9  # 3 sites x 3 scans
SCHEDULE = replace(PRESETS["tiny"].schedule, epochs=4, iterations_per_epoch=3,
                   val_iterations_per_epoch=1)  # fmt: skip
FAST = InferenceSettings(tta=False, step_size=1.0, device="cpu", torch_threads=1)


@pytest.fixture(scope="module")
def training_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 synthetic scans from 3 sites with references, and 4 rows that cannot train:
    no reference, a missing reference file, an empty one, one off the image."""
    root = tmp_path_factory.mktemp("training")
    generate_cohort(root, n_scans=N_GOOD, seed=21, jobs=2)
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    first = manifest.iloc[0]
    reference = nib.load(root / first.reference)
    empty = root / "empty_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(reference.shape, np.uint8), reference.affine), empty)
    elsewhere = reference.affine.copy()
    elsewhere[:3, 3] += 1000.0  # a metre away from the head
    offgrid = root / "offgrid_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(reference.dataobj), elsewhere), offgrid)
    bad = {
        "bad-noref": "",
        "bad-missing": "derivatives/nowhere_mask.nii.gz",
        "bad-empty": empty.name,
        "bad-offgrid": offgrid.name,
    }
    rows = [{**first.to_dict(), "scan_id": scan_id, "subject": scan_id, "reference": path}
            for scan_id, path in bad.items()]  # fmt: skip
    pd.concat([manifest, pd.DataFrame(rows)]).to_csv(root / "train.csv", index=False)
    return root / "train.csv"


def request_for(manifest: Path, model_dir: Path, cluster: str, **changes) -> TrainRequest:
    report = load_manifest(manifest)
    request = TrainRequest(
        report=report,
        model_dir=model_dir,
        split=SplitSpec.parse("site"),
        channel_names=("T1w",),
        schedule=SCHEDULE,
        scoring=Scoring(FAST, PvsClusterRules(), ASEG, CheckThresholds()),
        preset=PRESETS["tiny"],
        cluster=ClusterRequest(cluster=cluster),
        device="cpu",
        augmentation_processes=1,
    )
    return replace(request, **changes)


@pytest.mark.slow
def test_site_split_trains_survives_a_killed_worker_resumes_and_runs(
    training_manifest: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    events: list[dict] = []
    killed: list[int] = []
    cluster = local_cluster(n_workers=2, threads_per_worker=2, torch_threads=1,
                            dashboard_address="127.0.0.1:0")  # fmt: skip
    with cluster, Client(cluster) as client:

        def on_event(message: dict) -> None:
            events.append(message)
            saved = message.get("checkpoint_epoch") or 0
            if (message.get("event") == "epoch" and message["fold"] == 0 and not killed
                    and message["attempt"] == 1 and saved >= 1):  # fmt: skip
                pid = client.run(os.getpid, workers=[message["worker"]])[message["worker"]]
                os.kill(pid, signal.SIGKILL)  # the worker training fold 0, mid-fold
                killed.append(saved)

        request = request_for(training_manifest, model_dir, cluster.scheduler_address)
        outcome = train_model(request, Watch(on_event=on_event))

        # Bad rows: reported with their reasons and left out.
        reasons = {row.scan_id: row.reason for row in outcome.left_out}
        assert set(reasons) == {"bad-noref", "bad-missing", "bad-empty", "bad-offgrid"}
        assert "no reference" in reasons["bad-noref"]
        assert "not found" in reasons["bad-missing"] or "missing" in reasons["bad-missing"]
        assert "empty" in reasons["bad-empty"]
        assert "does not overlap" in reasons["bad-offgrid"]
        cases = pd.read_csv(model_dir / "cases.csv")
        assert (cases.status == "included").sum() == N_GOOD
        assert set(cases.loc[cases.status == "left out", "scan_id"]) == set(reasons)
        assert not list((model_dir / "nnUNet_raw").rglob("bad-*"))

        # Splits: one fold per site, validated on that site only.
        sites = load_manifest(training_manifest).scans
        site_of = {scan.scan_id: scan.site for scan in sites}
        folds = json.loads((model_dir / "splits_final.json").read_text())["folds"]
        assert len(folds) == 3
        for fold in folds:
            val_sites = {site_of[c] for c in fold["val"]}
            assert len(val_sites) == 1 and len(fold["val"]) == 3
            assert not val_sites & {site_of[c] for c in fold["train"]}
        nnunet_splits = json.loads(
            (model_dir / "nnUNet_preprocessed/Dataset001_pingu/splits_final.json").read_text()
        )
        assert nnunet_splits == folds

        # The killed fold went on from a saved epoch, not from 0.
        assert killed, "fold 0 was never seen with a checkpoint"
        ledger = read_ledger(model_dir)
        fold0 = ledger[ledger.fold == 0].sort_values("attempt")
        assert list(fold0.status) == ["retried", "ok"], fold0.to_string()
        assert fold0.iloc[0].error_type == "KilledWorker"
        assert fold0.iloc[0].epochs_reached >= 1
        assert fold0.iloc[1].from_epoch >= 1
        assert set(ledger[ledger.status == "ok"].fold) == {0, 1, 2}
        resumed = [e for e in events if e.get("event") == "started" and e["fold"] == 0]
        assert [e["attempt"] for e in resumed] == [1, 2]
        assert resumed[1]["from_epoch"] >= 1

        # The model folder, and the out-of-fold evaluation by site.
        model = outcome.model_folder
        assert model is not None and model.name == "PinguTrainer__nnUNetPlans_tiny__3d_fullres"
        for fold in range(3):
            assert (model / f"fold_{fold}" / "checkpoint_final.pth").exists()
            assert not (model / f"fold_{fold}" / "checkpoint_latest.pth").exists()
        oof = pd.read_parquet(model_dir / "evaluation" / "out_of_fold.parquet")
        whole = oof[oof.region == "whole_brain"]
        assert sorted(whole.scan_id) == sorted(c for f in folds for c in f["val"])
        for fold_index, fold in enumerate(folds):
            assert set(whole[whole.fold == fold_index].scan_id) == set(fold["val"])
        summary = pd.read_csv(model_dir / "evaluation" / "summary.csv")
        assert set(summary.site) == {*set(site_of.values()), "all"}
        assert set(summary[summary.site == "all"].n_scans) == {N_GOOD}
        for fold in range(3):
            regions = tables.read_table(model_dir / "validation" / f"fold_{fold}", "regions")
            assert regions.scan_id.nunique() == 3

        record = json.loads((model_dir / "training.json").read_text())
        assert record["settings"]["split"]["kind"] == "site"
        assert record["plans"]["patch_size"] == [48, 48, 48]
        assert record["cases"] == {"included": N_GOOD, "left_out": 4}
        assert record["versions"]["nnunetv2"] and record["manifest"]["sha256"]
        assert len(record["splits"]) == 3

        # Again on the same MODEL_DIR: every fold is skipped, nothing is retrained.
        rows_before = len(ledger)
        again = train_model(request)
        assert again.skipped_folds == [0, 1, 2] and again.trained == {}
        assert len(read_ledger(model_dir)) == rows_before

    # The model runs through `pingu-dask run` as it is.
    two = training_manifest.parent / "two.csv"  # paths are relative to the manifest
    pd.read_csv(training_manifest).head(2).to_csv(two, index=False)
    command = [sys.executable, "-m", "pingu_dask.cli", "run", str(two), "--out",
               str(tmp_path / "out"), "--model", str(model_dir), "--no-tta", "--step-size",
               "1.0", "--device", "cpu", "--dashboard-address", "127.0.0.1:0"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            cwd=training_manifest.parent)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    regions = tables.read_table(tmp_path / "out", "regions")
    assert regions.scan_id.nunique() == 2


@pytest.mark.slow
def test_fine_tuning_the_demo_model_scores_it_before_and_after(
    training_manifest: Path, tmp_path: Path
) -> None:
    """`train --init demo` through the command line: the demo model's plans and weights
    (heads included: its labels are ours) start each fold; the demo model itself is
    scored on the same validation scans, beside the fine-tuned folds."""
    four = training_manifest.parent / "four.csv"  # iso1mm x 2, iso08mm, axial3mm
    pd.read_csv(training_manifest).head(4).to_csv(four, index=False)
    model_dir = tmp_path / "tuned"
    command = [sys.executable, "-m", "pingu_dask.cli", "train", str(four), "--out",
               str(model_dir), "--split", "train-site:iso1mm", "--init", "demo",
               "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1",
               "--workers", "2", "--no-tta", "--step-size", "1.0", "--device", "cpu",
               "--dashboard-address", "127.0.0.1:0"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "before" in result.stdout and "after" in result.stdout

    oof = pd.read_parquet(model_dir / "evaluation" / "out_of_fold.parquet")
    whole = oof[oof.region == "whole_brain"]
    by_model = {model: set(rows.scan_id) for model, rows in whole.groupby("model")}
    assert set(by_model) == {"initial", "trained"}
    assert by_model["initial"] == by_model["trained"] and len(by_model["trained"]) == 2
    # The demo model finds synthetic PVS (voxel Dice ~0.8); two fine-tuning iterations
    # that kept its segmentation heads do not undo that.
    dice = whole.groupby("model").voxel_dice.mean()
    assert dice["initial"] > 0.5 and dice["trained"] > 0.5, dice

    record = json.loads((model_dir / "training.json").read_text())
    assert record["plans"]["name"] == "nnUNetPlansDemo"
    assert record["plans"]["patch_size"] == [64, 64, 64]
    assert record["plans"]["init_model"]["name"] == "nnUNetTrainer__nnUNetPlansDemo__3d_fullres"
    summary = pd.read_csv(model_dir / "evaluation" / "summary.csv")
    assert set(summary.model) == {"initial", "trained"}
    assert len(summary[summary.model == "initial"]) == len(summary[summary.model == "trained"])
