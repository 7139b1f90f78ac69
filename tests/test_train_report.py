"""The HTML report of a training (`pingu-dask report MODEL_DIR`), on hand-made MODEL_DIRs.

No training runs here: training.json, cases.csv, two ledger rows, a fold's progress
lines and the evaluation tables are written as `train` writes them, and the page is
checked for the values they hold, escaped, with its learning curves embedded.
"""

from __future__ import annotations

import base64
import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pingu_dask.cli import main
from pingu_dask.output.training import write_ledger_rows
from pingu_dask.report.build import ReportError
from pingu_dask.report.training import build_training_report, epoch_curves

MODEL_FOLDER = "nnUNet_results/Dataset001_pingu/PinguTrainer__nnUNetPlans__3d_fullres"
BAD_ID = "<b>x</b>"


def training_record(**extra) -> dict:
    """training.json as `train` first writes it (before plans, splits and folds)."""
    return {
        "tool": "pingu-dask",
        "version": "9.9.9",
        "created": "2025-01-02T03:04:05+0000",
        "settings": {"split": {"kind": "kfold", "k": 2, "site": None, "seed": 1}},
        "manifest": {"path": "/data/cohort.csv", "sha256": "abcdef0123456789" * 4},
        "split": {
            "kind": "kfold",
            "k": 2,
            "site": None,
            "seed": 1,
            "description": "2-fold cross-validation stratified by site (seed 1)",
        },
        "schedule": {
            "epochs": 3,
            "iterations_per_epoch": 10,
            "val_iterations_per_epoch": 2,
            "checkpoint_every": 1,
            "optimizer": "adamw",
            "initial_lr": None,
            "oversample_foreground": None,
            "seed": 7,
        },
        "seeds": {"split": 1, "trainer": 7},
        "device": "cpu",
        "orientation": "RAS",
        "scoring": {"inference": {"tta": False}, "clusters": {"filter_reference": False}},
        "versions": {"pingu-dask": "9.9.9", "python": "3.11.9", "nnunetv2": "2.5.1"},
        "host": "node-17",
        "runs": [
            {
                "run_id": "run0001",
                "started": "2025-01-02T03:04:05+0000",
                "finished": None,
                "command": ["pingu-dask", "train", "cohort.csv", "--out", "model dir"],
            }
        ],
        **extra,
    }


def trained_record() -> dict:
    return training_record(
        plans={
            "name": "nnUNetPlans",
            "configuration": "3d_fullres",
            "source": "init: demo",
            "preset": None,
            "spacing": [1.0, 1.0, 1.0],
            "patch_size": [48, 64, 56],
            "batch_size": 2,
            "features_per_stage": [8, 16, 32],
        },
        cases={"included": 4, "left_out": 1},
        splits=[
            {"fold": 0, "name": "fold 0", "train": ["a2", "b2"], "val": ["a1", "b1"]},
            {"fold": 1, "name": "site B", "train": ["a1", "b1"], "val": ["a2", "b2"]},
        ],
        model_folder=MODEL_FOLDER,
        evaluation={
            "out_of_fold": "evaluation/out_of_fold.parquet",
            "summary": "evaluation/summary.csv",
            "agreement": "evaluation/agreement.csv",
        },
    )


def write_record(model_dir: Path, record: dict) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "training.json").write_text(json.dumps(record))


def moment(minute: int) -> datetime:
    return datetime(2025, 1, 2, 3, minute, tzinfo=UTC)


def ledger_row(fold: int, attempt: int, status: str, **values) -> dict:
    return {
        "run_id": "run0001",
        "fold": fold,
        "attempt": attempt,
        "status": status,
        "from_epoch": 0,
        "epochs_reached": 3,
        "checkpoint_epoch": 3,
        "epochs": 3,
        "worker": "tcp://10.0.0.5:4001",
        "error_type": None,
        "message": "",
        "iterations_per_second": None,
        "data_wait_share": None,
        "started": moment(10),
        "finished": moment(20),
        **values,
    }


def epoch_line(epoch: int, dice: float, loss: float, **values) -> dict:
    return {
        "event": "epoch",
        "epoch": epoch,
        "epochs": 3,
        "train_loss": loss,
        "val_loss": loss + 0.1,
        "pseudo_dice": dice,
        "ema_pseudo_dice": dice - 0.05,
        "epoch_seconds": 2.0,
        "iterations_per_second": 5.0,
        "data_wait_share": 0.1,
        "checkpoint_epoch": epoch,
        "time": 1735787000.0 + epoch,
        **values,
    }


def summary_rows() -> pd.DataFrame:
    """summary.csv: the initial model's rows and the trained folds', per site and all."""
    rows = []
    for region in ("white_matter", "basal_ganglia", "whole_brain"):
        for site in ("A", "B", "all"):
            n = 4 if site == "all" else 2
            rows.append(("initial", site, region, n, 0.412, 0.051, 0.333, 0.02))
            rows.append(("trained", site, region, n, 0.687, 0.043, 0.555, 0.031))
    columns = ["model", "site", "region", "n_scans", "voxel_dice_mean", "voxel_dice_sd",
               "cluster_f1_mean", "cluster_f1_sd"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def agreement_table() -> pd.DataFrame:
    rows = []
    for model, ccc in (("initial", 0.111), ("trained", 0.876)):
        rows.append(
            {
                "site": "all",
                "region": "whole_brain",
                "measure": "clusters",
                "n": 4,
                "mean_predicted": 12.25,
                "mean_reference": 13.5,
                "ccc": ccc,
                "pearson_r": 0.93,
                "bias": -1.25,
                "sd_difference": 1.5,
                "loa_lower": -4.19,
                "loa_upper": 1.69,
                "note": "",
                "model": model,
            }
        )
    return pd.DataFrame(rows)


def out_of_fold() -> pd.DataFrame:
    rows = []
    for model in ("trained", "initial"):
        for fold, scans in ((0, ("a1", "b1")), (1, ("a2", "b2"))):
            for scan in scans:
                rows.append(
                    {
                        "scan_id": scan,
                        "subject": scan,
                        "session": None,
                        "site": scan[0].upper(),
                        "region": "whole_brain",
                        "voxel_dice": (0.6 if fold == 0 else 0.8) if model == "trained" else 0.4,
                        "cluster_f1": 0.5,
                        "n_predicted_clusters": 10,
                        "n_reference_clusters": 12,
                        "predicted_voxels": 100,
                        "reference_voxels": 120,
                        "predicted_volume_mm3": 100.0,
                        "reference_volume_mm3": 120.0,
                        "reference_filtered": False,
                        "model": model,
                        "fold": fold,
                        "fold_name": f"fold {fold}",
                    }
                )
    return pd.DataFrame(rows)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A finished fine-tuning of 2 folds: fold 0 retried once (from epoch 1), both ok."""
    model_dir = tmp_path / "model"
    write_record(model_dir, trained_record())
    cases = [
        {"scan_id": s, "site": s[0].upper(), "status": "included", "reason": ""}
        for s in ("a1", "a2", "b1", "b2")
    ]
    cases.append(
        {"scan_id": BAD_ID, "site": "B", "status": "left out", "reason": "no reference mask"}
    )
    pd.DataFrame(cases).to_csv(model_dir / "cases.csv", index=False)
    write_ledger_rows(
        model_dir,
        [
            ledger_row(
                0,
                1,
                "retried",
                epochs_reached=1,
                checkpoint_epoch=1,
                error_type="KilledWorker",
                message="worker <lost> at epoch 1",
                finished=moment(12),
            ),
            ledger_row(
                0, 2, "ok", from_epoch=1, iterations_per_second=4.321, data_wait_share=0.257
            ),
        ],
    )
    fold0 = model_dir / MODEL_FOLDER / "fold_0"
    fold0.mkdir(parents=True)
    lines = [
        {"event": "started", "from_epoch": 0, "epochs": 3, "time": 1735787000.0},
        epoch_line(1, 0.20, 0.90),
        epoch_line(2, 0.25, 0.85),  # lost: the worker left before a checkpoint
        {"event": "started", "from_epoch": 1, "epochs": 3, "time": 1735787100.0},
        epoch_line(2, 0.30, 0.80),
        epoch_line(3, 0.40, 0.70),
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"event": "ep'  # half a line
    (fold0 / "progress.jsonl").write_text(text)
    evaluation = model_dir / "evaluation"
    evaluation.mkdir()
    summary_rows().to_csv(evaluation / "summary.csv", index=False)
    agreement_table().to_csv(evaluation / "agreement.csv", index=False)
    out_of_fold().to_parquet(evaluation / "out_of_fold.parquet", index=False)
    return model_dir


def cells(page: str, table_id: str) -> list[list[str]]:
    """The text of each body row's cells of the table with this id (unescaped)."""
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', page, re.S)
    assert table, f"no table {table_id}"
    body = table.group(0).split("<tbody>")[1]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    return [
        [
            html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)
        ]
        for r in rows
    ]


def test_the_training_report_shows_cases_folds_curves_and_before_after(model_dir: Path) -> None:
    path = build_training_report(model_dir)
    assert path == model_dir / "evaluation" / "report.html"
    page = path.read_text()

    # What was trained.
    assert "/data/cohort.csv" in page and "abcdef012345" in page
    assert "abcdef0123456789abcdef" not in page  # the sha256, shortened
    assert "2-fold cross-validation stratified by site (seed 1)" in page
    assert "fold 0: 2 train / 2 val" in page and "fold 1 (site B): 2 train / 2 val" in page
    assert "patch size: 48 x 64 x 56" in page and "features per stage: 8-16-32" in page
    assert "source: init: demo" in page and "epochs=3" in page and "optimizer=adamw" in page

    # Cases: the left-out row with its reason; its id escaped, never markup.
    assert cells(page, "left-out-table") == [[BAD_ID, "B", "no reference mask"]]
    assert html.escape(BAD_ID) in page and BAD_ID not in page
    assert cells(page, "cases-per-site") == [["A", "2", "0"], ["B", "2", "1"]]
    assert re.search(r'id="n-included">4<', page) and re.search(r'id="n-left-out">1<', page)

    # Folds: the ledger's latest attempt of fold 0; fold 1 never started.
    fold0, fold1 = cells(page, "fold-table")
    assert fold0[:6] == ["0", "fold 0", "2 / 2", "2", "ok", "3 / 3"]
    assert fold0[6:11] == ["1", "3", "4.32", "26 %", "tcp://10.0.0.5:4001"]
    assert fold0[11] == "0.60 (0.00)"  # its validation scans' whole-brain Dice
    assert fold0[12] == "attempt 1: KilledWorker: worker <lost> at epoch 1"  # escaped in the page
    assert "worker &lt;lost&gt; at epoch 1" in page
    assert fold1[:6] == ["1", "site B", "2 / 2", "0", "not started", "0 / 3"]
    assert re.search(r'id="n-folds-done">1 / 2<', page)

    # The learning curves: an embedded PNG, with the resumed epoch's last value.
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1 and base64.b64decode(images[0]).startswith(b"\x89PNG")
    curves = epoch_curves(model_dir / MODEL_FOLDER)
    assert list(curves.epoch) == [1, 2, 3] and list(curves.pseudo_dice) == [0.2, 0.3, 0.4]

    # Out-of-fold evaluation: before (initial) and after (trained) side by side.
    whole = cells(page, "evaluation-table-whole_brain")
    assert [row[0] for row in whole] == ["A", "B", "all"]
    assert whole[2] == ["all", "4", "0.41 (0.05)", "0.69 (0.04)", "+0.28",
                        "0.33 (0.02)", "0.56 (0.03)", "+0.22"]  # fmt: skip
    assert "evaluation-table-white_matter" in page and "evaluation-table-basal_ganglia" in page
    assert "reference masks as given" in page
    assert "internal cross-validation" in page
    # Count agreement: the trained model's row only.
    trained = ["all", "whole brain", "PVS count", "4", "12.2", "13.5", "0.88", "0.93", "-1.2"]
    assert cells(page, "agreement-table") == [[*trained, "-4.2 to 1.7"]]

    # Provenance at the bottom, the command quoted as a shell would need it.
    assert "pingu-dask train cohort.csv --out &#39;model dir&#39;" in page
    assert "nnunetv2=2.5.1" in page and "node-17" in page
    # Offline: no external resource.
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_a_fold_under_way_and_a_model_folder_not_recorded_yet(tmp_path: Path) -> None:
    """During a training, training.json has no model_folder yet and a fold that is
    training has progress lines but no ledger row: both are found."""
    model_dir = tmp_path / "model"
    record = trained_record()
    del record["model_folder"], record["evaluation"]
    write_record(model_dir, record)
    fold1 = model_dir / MODEL_FOLDER / "fold_1"
    fold1.mkdir(parents=True)
    lines = [
        {"event": "started", "from_epoch": 0, "epochs": 3, "time": 1735787000.0},
        epoch_line(1, 0.2, 0.9, iterations_per_second=3.0, data_wait_share=0.5),
        epoch_line(2, 0.3, 0.8, iterations_per_second=5.0, data_wait_share=0.3),
    ]
    (fold1 / "progress.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # Fold 0's first attempt failed for a while; its second started after that.
    write_ledger_rows(
        model_dir,
        [ledger_row(0, 1, "retried", epochs_reached=1, error_type="OSError", finished=moment(12))],
    )
    fold0_folder = model_dir / MODEL_FOLDER / "fold_0"
    fold0_folder.mkdir()
    started = {"event": "started", "from_epoch": 1, "epochs": 3, "time": moment(13).timestamp()}
    (fold0_folder / "progress.jsonl").write_text(json.dumps(started) + "\n")
    page = build_training_report(model_dir).read_text()
    fold0, fold1_row = cells(page, "fold-table")
    assert fold0[3:5] == ["1", "retried; then attempt 2: training, or stopped without a word"]
    assert fold1_row[4] == "training, or stopped without a word (no attempt ended yet)"
    assert fold1_row[5] == "2 / 3" and fold1_row[8] == "4.00" and fold1_row[9] == "40 %"
    assert "data:image/png;base64," in page
    assert "No out-of-fold evaluation yet" in page


def test_a_prepared_model_dir_with_only_training_json_renders(tmp_path: Path) -> None:
    model_dir = tmp_path / "prepared"
    write_record(model_dir, training_record())
    page = build_training_report(model_dir).read_text()
    assert "pingu-dask training report" in page
    assert "No folds yet" in page and "No epoch has been recorded yet" in page
    assert "No out-of-fold evaluation yet" in page
    assert "data:image/png" not in page
    assert re.search(r'id="n-folds-done">0 / 0<', page)
    assert "2-fold cross-validation stratified by site (seed 1)" in page


def test_a_folder_without_training_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no training"):
        build_training_report(tmp_path)
    assert not (tmp_path / "evaluation").exists()


def test_the_report_command_builds_a_training_report_for_a_model_dir(model_dir: Path) -> None:
    result = CliRunner(env={"COLUMNS": "300"}).invoke(main, ["report", str(model_dir)])
    assert result.exit_code == 0, result.output
    page = model_dir / "evaluation" / "report.html"
    assert page.exists() and str(page.resolve()) in result.output
    assert "no reference mask" in page.read_text()
    assert not (model_dir / "report").exists()  # not the run report


def test_the_report_command_still_refuses_a_folder_that_is_neither(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert "holds no run" in result.output
