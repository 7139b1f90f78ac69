"""`pingu-dask report MODEL_DIR`: one HTML page about a training, MODEL_DIR/evaluation/report.html.

Read from MODEL_DIR's files only (training.json, cases.csv, the fold ledger, each
fold's progress.jsonl, the evaluation tables; output/training.py describes them), never
from a driver, so it can be made while a training goes on, after a crash and after a
resume; a MODEL_DIR that was only prepared still gets a page. The learning curves are
embedded as a PNG and the page opens without the internet, like the run's report.

The layers allow no import of train or nnunet here: the few file formats those write
(progress lines, the summary and agreement tables) are read directly.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pingu_dask.analysis.evaluate import reference_handling
from pingu_dask.analysis.regions import HEADLINE_REGIONS
from pingu_dask.output import training as layout
from pingu_dask.report import figures
from pingu_dask.report.build import (
    ReportError,
    generated,
    templates,
    write_page,
)
from pingu_dask.version import __version__

REPORT_HTML = "report.html"  # in MODEL_DIR/evaluation
PROGRESS_FILE = "progress.jsonl"  # nnunet/trainer_process.py: one JSON object per line
TRAINED, INITIAL = "trained", layout.INITIAL  # train/evaluation.py's model column
LEFT_OUT_SHOWN = 500
CURVE_COLUMNS = (
    "fold",
    "epoch",
    "train_loss",
    "val_loss",
    "pseudo_dice",
    "ema_pseudo_dice",
    "iterations_per_second",
    "data_wait_share",
    "checkpoint_epoch",
)
SPLIT_MEANINGS = {
    "kfold": "internal cross-validation: every scan is scored by the one fold that did not "
    "train on it, but its site was seen in training, so these figures do not stand for a "
    "new site",
    "site": "unseen sites: each site is scored by the fold that never saw it (leave one site out)",
    "train-site": "one site's model on the others: a model trained on one site only, "
    "scored on every other site",
}


def build_training_report(model_dir: Path) -> Path:
    """Write MODEL_DIR/evaluation/report.html; return its path. ReportError when
    MODEL_DIR holds no training (no training.json)."""
    model_dir = Path(model_dir)
    try:
        record = layout.read_training_json(model_dir)
    except (OSError, ValueError) as error:
        raise ReportError(f"{model_dir / layout.TRAINING_JSON} cannot be read: {error}") from error
    if not isinstance(record, dict):
        raise ReportError(f"{model_dir} holds no training (no {layout.TRAINING_JSON})")
    cases = read_cases(model_dir)
    ledger = layout.read_ledger(model_dir)
    model_folder = find_model_folder(model_dir, record)
    curves = epoch_curves(model_folder)
    folder = model_dir / layout.EVALUATION
    summary = _read_csv(folder / "summary.csv", text=("model", "site", "region"))
    agreement = _read_csv(folder / "agreement.csv", text=("model", "site", "region", "measure"))
    out_of_fold = _read_parquet(folder / "out_of_fold.parquet")
    folds = fold_rows(record, ledger, curves, model_folder, out_of_fold)
    split = record.get("split") or {}
    environment = templates()
    context = {
        "model_dir": str(model_dir.resolve()),
        "generated": generated(),
        "version": __version__,
        "trained": what_was_trained(record),
        "split_meaning": SPLIT_MEANINGS.get(split.get("kind", ""), ""),
        "cases": case_summary(cases, record),
        "left_out": left_out_rows(cases),
        "left_out_shown": LEFT_OUT_SHOWN,
        "folds": folds,
        "n_folds_done": sum(1 for row in folds if row["status"] == "ok"),
        "model_folder": _relative(model_folder, model_dir) if model_folder else None,
        "curves": learning_curves(curves, {row["fold"]: row["name"] for row in folds}),
        "evaluation": evaluation_tables(summary),
        "has_initial": bool(len(summary)) and INITIAL in set(summary["model"]),
        "agreement": agreement_rows(agreement),
        "reference_handling": _reference_words(out_of_fold, record),
        "n_evaluated": _evaluated_scans(out_of_fold),
        "provenance": provenance(record),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_HTML
    write_page(path, environment.get_template("training.html.j2").render(context))
    return path


# --- what was trained ---------------------------------------------------------------


def what_was_trained(record: dict) -> dict:
    """The manifest, split, folds, plans and schedule of training.json, as words."""
    manifest = record.get("manifest") or {}
    split = record.get("split") or {}
    plans = record.get("plans") or {}
    schedule = record.get("schedule") or {}
    sha = str(manifest.get("sha256") or "")
    init = plans.get("init_model") or {}
    plan_items = {
        "name": _join_name(plans.get("name"), plans.get("configuration")),
        "source": plans.get("source"),
        "initial model": _init_name(init, plans.get("source")),
        "preset": plans.get("preset"),
        "spacing mm": _numbers(plans.get("spacing")),
        "target spacing mm": _numbers(plans.get("target_spacing")),
        "patch size": _numbers(plans.get("patch_size")),
        "batch size": plans.get("batch_size"),
        "features per stage": _numbers(plans.get("features_per_stage"), "-"),
    }
    return {
        "manifest": manifest.get("path") or "-",
        "sha256": sha[:12] or "-",
        "split": split.get("description") or split.get("kind") or "-",
        "split_kind": split.get("kind") or "-",
        "splits": [
            {
                "fold": each.get("fold"),
                "name": each.get("name", ""),
                "train": len(each.get("train") or []),
                "val": len(each.get("val") or []),
            }
            for each in record.get("splits") or []
        ],
        "plans": {k: v for k, v in plan_items.items() if v not in (None, "", "-")},
        "schedule": {k.replace("_", " "): v for k, v in schedule.items() if v is not None},
    }


def _init_name(init: Any, source: Any) -> str | None:
    """The --init model's name, unless the plans' source already says it."""
    name = init.get("name") if isinstance(init, dict) else init
    return None if not name or str(name) in str(source or "") else str(name)


def _join_name(name: Any, configuration: Any) -> str | None:
    return " / ".join(str(v) for v in (name, configuration) if v) or None


def _numbers(values: Any, separator: str = " x ") -> str | None:
    if values is None:
        return None
    if isinstance(values, list | tuple):
        return separator.join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return str(values)


# --- cases --------------------------------------------------------------------------


def read_cases(model_dir: Path) -> pd.DataFrame:
    """cases.csv as text (ids like 007 stay as they are); empty if not written yet."""
    path = Path(model_dir) / layout.CASES_CSV
    columns = ["scan_id", "site", "status", "reason"]
    if not path.exists():
        return pd.DataFrame(columns=columns)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=columns)
    for column in columns:
        if column not in frame:
            frame[column] = ""
    return frame


def case_summary(cases: pd.DataFrame, record: dict) -> dict:
    """Included and left-out counts, in all and per site."""
    counted = record.get("cases") or {}
    if cases.empty:
        return {
            "included": counted.get("included"),
            "left_out": counted.get("left_out"),
            "per_site": [],
        }
    frame = cases.assign(site=cases["site"].replace("", "-"))
    per_site = [
        {
            "site": site,
            "included": int((group["status"] == "included").sum()),
            "left_out": int((group["status"] != "included").sum()),
        }
        for site, group in frame.groupby("site", sort=True)
    ]
    return {
        "included": int((cases["status"] == "included").sum()),
        "left_out": int((cases["status"] != "included").sum()),
        "per_site": per_site,
    }


def left_out_rows(cases: pd.DataFrame) -> list[dict]:
    """The rows left out of the training, with why (every one, up to LEFT_OUT_SHOWN)."""
    rows = cases[cases["status"] != "included"]
    return [
        {"scan_id": r.scan_id, "site": r.site or "-", "reason": r.reason or "-"}
        for r in rows.head(LEFT_OUT_SHOWN).itertuples()
    ]


# --- folds --------------------------------------------------------------------------


def find_model_folder(model_dir: Path, record: dict) -> Path | None:
    """The nnU-Net model folder: training.json's, or (a training under way, whose
    training.json records it only when the run ends) the one nnU-Net's results hold."""
    recorded = record.get("model_folder")
    if recorded:
        return Path(model_dir) / recorded
    results = Path(model_dir) / "nnUNet_results"
    plans = record.get("plans") or {}
    pattern = "*__*__*"
    if plans.get("name") and plans.get("configuration"):
        pattern = f"*__{plans['name']}__{plans['configuration']}"
    found = sorted(p for p in results.glob(f"*/{pattern}") if p.is_dir())
    return found[0] if found else None


def read_progress_lines(fold_folder: Path) -> list[dict]:
    """Every whole line of a fold's progress.jsonl (all attempts, in order)."""
    path = Path(fold_folder) / PROGRESS_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue  # a line being written
        if isinstance(line, dict):
            lines.append(line)
    return lines


def epoch_curves(model_folder: Path | None) -> pd.DataFrame:
    """One row per fold and epoch (CURVE_COLUMNS), from the folds' progress lines. An
    epoch trained again after a resume from an earlier checkpoint keeps its last line."""
    rows = []
    folders = sorted(model_folder.glob("fold_*")) if model_folder else []
    for folder in folders:
        suffix = folder.name.removeprefix("fold_")
        if not suffix.isdigit():
            continue
        for line in read_progress_lines(folder):
            if line.get("event") == "epoch" and line.get("epoch") is not None:
                rows.append({"fold": int(suffix), **{k: line.get(k) for k in CURVE_COLUMNS[1:]}})
    frame = pd.DataFrame(rows, columns=list(CURVE_COLUMNS))
    for column in CURVE_COLUMNS[2:]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame = frame.drop_duplicates(["fold", "epoch"], keep="last")
    return frame.sort_values(["fold", "epoch"]).reset_index(drop=True)


def fold_rows(
    record: dict,
    ledger: pd.DataFrame,
    curves: pd.DataFrame,
    model_folder: Path | None,
    out_of_fold: pd.DataFrame,
) -> list[dict]:
    """One row per fold: its split, attempts, how the latest ended, epochs reached,
    speed, worker and message (the ledger's latest row; the progress lines for a fold
    still training), and its out-of-fold whole-brain Dice."""
    splits = {int(s["fold"]): s for s in record.get("splits") or [] if s.get("fold") is not None}
    indices = sorted({*splits, *map(int, ledger["fold"].dropna()), *map(int, curves["fold"])})
    epochs = (record.get("schedule") or {}).get("epochs")
    dice = _fold_dice(out_of_fold)
    rows = []
    for index in indices:
        split = splits.get(index, {})
        attempts = ledger[ledger["fold"] == index]
        latest = attempts.iloc[-1] if len(attempts) else None
        lines = read_progress_lines(model_folder / f"fold_{index}") if model_folder else []
        current = _current_attempt(lines)
        reached = current[-1].get("epoch") if current else None
        if latest is not None and (reached is None or latest["status"] == "ok"):
            reached = _int(latest["epochs_reached"])
        speed = _number(latest["iterations_per_second"]) if latest is not None else None
        wait = _number(latest["data_wait_share"]) if latest is not None else None
        if latest is None:
            speed = _median(current, "iterations_per_second")
            wait = _median(current, "data_wait_share")
        resumed = [] if latest is None else [_int(v) for v in attempts["from_epoch"]]
        rows.append(
            {
                "fold": index,
                "name": split.get("name", f"fold {index}"),
                "train": len(split.get("train") or []),
                "val": len(split.get("val") or []),
                "attempts": len(attempts),
                "status": _fold_status(latest, lines, len(attempts)),
                "epochs": f"{_text(reached, '0')} / {_text(epochs if epochs else None, '?')}",
                "resumed_from": ", ".join(str(v) for v in resumed if v),
                "checkpoint": _text(_checkpoint(lines, latest)),
                "it_s": "-" if speed is None else f"{speed:.2f}",
                "data_wait": "-" if wait is None else f"{100 * wait:.0f} %",
                "worker": _text(None if latest is None else latest["worker"]),
                **_last_message(attempts),
                "dice": _text(dice.get(index)),
            }
        )
    return rows


def _last_message(attempts: pd.DataFrame) -> dict[str, str]:
    """The latest attempt's error type and message, or (an ok attempt says nothing) the
    latest earlier one's, named by its attempt."""
    for position in range(len(attempts) - 1, -1, -1):
        row = attempts.iloc[position]
        message, error_type = _text(row["message"], ""), _text(row["error_type"], "")
        if message or error_type:
            later = position < len(attempts) - 1
            prefix = f"attempt {_text(_int(row['attempt']))}: " if later else ""
            return {"error_type": error_type, "message": message, "prefix": prefix}
    return {"error_type": "", "message": "", "prefix": ""}


def _current_attempt(lines: list[dict]) -> list[dict]:
    """The epoch lines since the latest `started` line."""
    starts = [i for i, line in enumerate(lines) if line.get("event") == "started"]
    since = lines[starts[-1] + 1 :] if starts else lines
    return [line for line in since if line.get("event") == "epoch"]


def _fold_status(latest: pd.Series | None, lines: list[dict], attempts: int) -> str:
    """The latest attempt's ledger status; a later attempt that started (its progress
    line is newer than that row) and has not ended yet is under way, or was stopped
    without a word (a killed driver)."""
    starts = [line for line in lines if line.get("event") == "started"]
    under_way = "training, or stopped without a word"
    if latest is None:
        return f"{under_way} (no attempt ended yet)" if starts else "not started"
    status = str(latest["status"])
    started = _number(starts[-1].get("time")) if starts else None
    finished = latest["finished"]
    later = started is not None and not pd.isna(finished)
    if status != "ok" and later and started > pd.Timestamp(finished).timestamp():
        return f"{status}; then attempt {attempts + 1}: {under_way}"
    return status


def _checkpoint(lines: list[dict], latest: pd.Series | None) -> int | None:
    saved = [line["checkpoint_epoch"] for line in lines if line.get("checkpoint_epoch") is not None]
    if saved:
        return int(saved[-1])
    return None if latest is None else _int(latest["checkpoint_epoch"])


def _median(lines: list[dict], key: str) -> float | None:
    values = [float(v) for line in lines if (v := line.get(key)) is not None]
    values = [v for v in values if np.isfinite(v)]
    return float(np.median(values)) if values else None


def _fold_dice(out_of_fold: pd.DataFrame) -> dict[int, str]:
    """Mean (SD) whole-brain voxel Dice of each fold's validation scans (trained model)."""
    needed = {"fold", "region", "voxel_dice"}
    if out_of_fold.empty or not needed <= set(out_of_fold.columns):
        return {}
    rows = out_of_fold[out_of_fold["region"] == "whole_brain"]
    if "model" in rows:
        rows = rows[rows["model"] == TRAINED]
    return {
        int(fold): _mean_sd(group["voxel_dice"].mean(), group["voxel_dice"].std())
        for fold, group in rows.groupby("fold")
    }


def learning_curves(curves: pd.DataFrame, names: dict[int, str]) -> str | None:
    """Pseudo-Dice (its EMA dashed) and losses (train solid, validation dotted) per
    epoch, one colour per fold."""
    if curves.empty:
        return None
    plt = figures.pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, (dice_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 3.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (fold, rows) in enumerate(curves.groupby("fold", sort=True)):
        colour = colours[number % len(colours)]
        name = names.get(int(fold)) or ""
        label = f"fold {fold}" if name in ("", f"fold {fold}") else f"fold {fold}: {name}"
        epochs = rows["epoch"].to_numpy(dtype=float)
        dice_axis.plot(epochs, rows["pseudo_dice"], color=colour, label=label, marker=".")
        if rows["ema_pseudo_dice"].notna().any():
            dice_axis.plot(epochs, rows["ema_pseudo_dice"], color=colour, linestyle="--")
        loss_axis.plot(epochs, rows["train_loss"], color=colour, label=label, marker=".")
        if rows["val_loss"].notna().any():
            loss_axis.plot(epochs, rows["val_loss"], color=colour, linestyle=":")
    dice_axis.set_title("pseudo-Dice (dashed: EMA)")
    loss_axis.set_title("loss (solid: train, dotted: validation)")
    for axis in (dice_axis, loss_axis):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlim(0.5, float(curves["epoch"].max()) + 0.5)
        axis.grid(alpha=0.3)
    dice_axis.legend(fontsize=8)
    figure.tight_layout()
    return figures.data_uri(figure)


# --- evaluation ---------------------------------------------------------------------


def evaluation_tables(summary: pd.DataFrame) -> list[dict]:
    """One table per region (HEADLINE_REGIONS first), one row per site (`all` last):
    scans, voxel Dice and cluster F1 as mean (SD); with the initial model's rows, its
    values ("before") beside the trained model's ("after") and the change of the mean."""
    needed = {"model", "site", "region", "n_scans", "voxel_dice_mean", "cluster_f1_mean"}
    if summary.empty or not needed <= set(summary.columns):
        return []
    frame = summary.copy()
    for column in ("voxel_dice_sd", "cluster_f1_sd"):
        if column not in frame:
            frame[column] = np.nan
    present = list(dict.fromkeys(frame["region"]))
    regions = [r for r in HEADLINE_REGIONS if r in present] + [
        r for r in present if r not in HEADLINE_REGIONS
    ]
    sites = list(dict.fromkeys(s for s in frame["site"] if s != "all"))
    sites = sorted(sites) + (["all"] if "all" in set(frame["site"]) else [])
    tables = []
    for region in regions:
        rows = []
        for site in sites:
            here = frame[(frame["region"] == region) & (frame["site"] == site)]
            if here.empty:
                continue
            after = _model_row(here, TRAINED)
            before = _model_row(here, INITIAL)
            if after is None and before is None:
                continue
            n_after = None if after is None else _int(after["n_scans"])
            n_before = None if before is None else _int(before["n_scans"])
            row = {
                "site": site,
                "scans": _text(n_after if n_after is not None else n_before),
                "scans_before": _text(n_before) if n_before != n_after else "",
            }
            for measure in ("voxel_dice", "cluster_f1"):
                row[f"{measure}_before"] = _summary_value(before, measure)
                row[f"{measure}_after"] = _summary_value(after, measure)
                row[f"{measure}_change"] = _change(before, after, measure)
            rows.append(row)
        if rows:
            tables.append(
                {"region": region, "title": figures.REGION_TITLES.get(region, region), "rows": rows}
            )
    return tables


def _model_row(rows: pd.DataFrame, model: str) -> pd.Series | None:
    chosen = rows[rows["model"] == model]
    return chosen.iloc[0] if len(chosen) else None


def _summary_value(row: pd.Series | None, measure: str) -> str:
    if row is None:
        return "-"
    return _mean_sd(row[f"{measure}_mean"], row[f"{measure}_sd"])


def _change(before: pd.Series | None, after: pd.Series | None, measure: str) -> str:
    if before is None or after is None:
        return "-"
    values = _number(before[f"{measure}_mean"]), _number(after[f"{measure}_mean"])
    if values[0] is None or values[1] is None:
        return "-"
    return f"{values[1] - values[0]:+.2f}"


def agreement_rows(agreement: pd.DataFrame) -> list[dict]:
    """The trained model's count and volume agreement per site and region (Lin's CCC,
    Pearson r, Bland-Altman bias and 95 % limits), formatted."""
    needed = {"site", "region", "measure", "n", "mean_predicted", "mean_reference"}
    if agreement.empty or not needed <= set(agreement.columns):
        return []
    rows = agreement if "model" not in agreement else agreement[agreement["model"] == TRAINED]
    formatted = []
    for row in rows.to_dict("records"):
        volume = row["measure"] == "volume_mm3"
        digits = 0 if volume else 1
        lower, upper = _number(row.get("loa_lower")), _number(row.get("loa_upper"))
        formatted.append(
            {
                "site": row["site"],
                "region": figures.REGION_TITLES.get(row["region"], row["region"]),
                "measure": "PVS volume mm³" if volume else "PVS count",
                "scans": _text(_int(row["n"])),
                "predicted": _fixed(row.get("mean_predicted"), digits),
                "reference": _fixed(row.get("mean_reference"), digits),
                "CCC": _fixed(row.get("ccc"), 2),
                "r": _fixed(row.get("pearson_r"), 2),
                "bias": _fixed(row.get("bias"), digits),
                "95% limits": "-"
                if lower is None or upper is None
                else f"{lower:.{digits}f} to {upper:.{digits}f}",
            }
        )
    return formatted


def _reference_words(out_of_fold: pd.DataFrame, record: dict) -> str:
    """How the reference masks were compared: the evaluation rows', else the settings'."""
    if not out_of_fold.empty:
        words = reference_handling(out_of_fold)
        if words:
            return words
    clusters = (record.get("scoring") or {}).get("clusters") or {}
    if "filter_reference" not in clusters:
        return "reference masks as given"
    if clusters["filter_reference"]:
        return "reference masks filtered like the prediction (--filter-reference; inflates Dice)"
    return "reference masks as given"


def _evaluated_scans(out_of_fold: pd.DataFrame) -> int | None:
    if out_of_fold.empty or "scan_id" not in out_of_fold:
        return None
    rows = out_of_fold
    if "model" in rows:
        rows = rows[rows["model"] == TRAINED]
    return int(rows["scan_id"].nunique())


# --- provenance ---------------------------------------------------------------------


def provenance(record: dict) -> dict:
    """Versions, host, seeds, settings and the command of every run."""
    scoring = record.get("scoring") or {}
    return {
        "tool": f"{record.get('tool', 'pingu-dask')} {record.get('version', '')}".strip(),
        "created": record.get("created") or "-",
        "host": record.get("host") or "-",
        "device": record.get("device") or "-",
        "orientation": record.get("orientation") or "-",
        "seeds": _pairs(record.get("seeds")),
        "inference": _pairs(scoring.get("inference")),
        "clusters": _pairs(scoring.get("clusters")),
        "regions": scoring.get("regions") or "-",
        "versions": _pairs(record.get("versions")),
        "runs": [
            {
                "run_id": run.get("run_id") or "-",
                "started": run.get("started") or "-",
                "finished": run.get("finished") or "(running, or ended without a word)",
                "command": shlex.join(str(v) for v in run.get("command") or []) or "-",
            }
            for run in record.get("runs") or []
            if isinstance(run, dict)
        ],
    }


def _pairs(mapping: Any) -> str:
    if not isinstance(mapping, dict) or not mapping:
        return "-"
    return ", ".join(f"{key}={_text(value)}" for key, value in mapping.items())


# --- small helpers ------------------------------------------------------------------


def _read_csv(path: Path, text: Sequence[str]) -> pd.DataFrame:
    """A CSV whose `text` columns stay text (a site named NA stays NA); empty if absent."""
    if not path.is_file():
        return pd.DataFrame()
    try:
        header = pd.read_csv(path, nrows=0).columns
        return pd.read_csv(
            path,
            dtype={c: str for c in text if c in header},
            keep_default_na=False,
            na_values={c: ["", "nan", "NaN"] for c in header if c not in text},
        )
    except (pd.errors.EmptyDataError, ValueError):
        return pd.DataFrame()


def _read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError):
        return pd.DataFrame()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _fixed(value: Any, digits: int) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.{digits}f}"


def _mean_sd(mean: Any, sd: Any) -> str:
    mean_value, sd_value = _number(mean), _number(sd)
    if mean_value is None:
        return "-"
    return f"{mean_value:.2f} ({0.0 if sd_value is None else sd_value:.2f})"


def _text(value: Any, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return missing
    if value is pd.NA or value is pd.NaT:
        return missing
    return str(value)
