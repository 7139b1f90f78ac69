"""The paper's tables from a training: out-of-fold predictions through the normal inference path.

Every validation case is predicted by the one fold that never saw it, by `run`'s own
code (orchestrate.run_cohort on the training's cluster: the same checks, orientation,
clusters and evaluation a user's run gets), into MODEL_DIR/validation/fold_N, a normal
OUT that resumes like any run. With `--init`, the initial model predicts the same
cases into validation/initial, so "before" and "after" are scored on the same scans by
the same code. The evaluation rows (voxel Dice, cluster F1, counts and volumes per
scan and region) are then gathered with their fold and model, and summarised per site
(evaluate.summarise: mean and SD, as the PINGU paper reports them) and for count
agreement (Lin's CCC, Bland-Altman).

What the figures stand for follows from the split: internal cross-validation (kfold),
unseen sites (site: each site scored by the fold that never saw it), one site's model
against the others (train-site).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pingu_dask.analysis.evaluate import count_agreement
from pingu_dask.analysis.regions import HEADLINE_REGIONS, RegionTable
from pingu_dask.config import InferenceSettings, PvsClusterRules
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.manifest import ManifestReport, Scan
from pingu_dask.nnunet.engine import NnUNetModel
from pingu_dask.nnunet.model import Model
from pingu_dask.output import tables
from pingu_dask.output.training import EVALUATION, INITIAL, validation_out
from pingu_dask.run.clusters import ClusterRequest
from pingu_dask.run.loop import Progress
from pingu_dask.run.orchestrate import RunOutcome, RunRefused, RunRequest, run_cohort
from pingu_dask.run.settings import RunSettings
from pingu_dask.run.stages import Pipeline
from pingu_dask.train.splits import Fold

TRAINED = "trained"  # the model column of the fine-tuned / trained folds' rows


@dataclass(frozen=True)
class Scoring:
    """How validation cases are predicted and scored (what `run` would be given)."""

    inference: InferenceSettings
    pvs_rules: PvsClusterRules
    regions: RegionTable
    checks: CheckThresholds
    # retries, time limits, flushes: run's settings (from the config when built)
    settings: RunSettings = field(default_factory=RunSettings.from_config)


def predict(
    model: Model,
    scans: Sequence[Scan],
    out: Path,
    manifest: Path,
    scoring: Scoring,
    scheduler: ClusterRequest,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    """`run` of `scans` with `model` into `out`, on the running scheduler `scheduler`.

    An OUT left by other settings (e.g. another --tta) is started afresh: it holds
    nothing but this training's validation predictions."""
    report = ManifestReport(
        path=manifest,
        n_rows=len(scans),
        channels=model.channels,
        scans=tuple(scans),
        problems=(),
    )
    pipeline = Pipeline(
        NnUNetModel(model),
        scoring.inference,
        out,
        scoring.pvs_rules,
        scoring.regions,
        write_nifti=False,
        checks=scoring.checks,
    )
    request = RunRequest(
        report=report,
        pipeline=pipeline,
        cluster=scheduler,
        settings=scoring.settings,
    )
    try:
        return run_cohort(request, on_progress=on_progress)
    except RunRefused:
        request.force = True
        return run_cohort(request, on_progress=on_progress)


def fold_scans(folds: Sequence[Fold], scans: dict[str, Scan]) -> dict[int, list[Scan]]:
    """Each fold's validation scans (in manifest order)."""
    return {fold.index: [scans[case] for case in fold.val] for fold in folds}


def gather(model_dir: Path, folds: Sequence[Fold], with_initial: bool) -> pd.DataFrame:
    """Every evaluation row of the validation OUTs, with `model` and `fold` columns."""
    frames = []
    for fold in folds:
        rows = _evaluation_of(validation_out(model_dir, fold.index))
        frames.append(rows.assign(model=TRAINED, fold=fold.index, fold_name=fold.name))
    if with_initial:
        fold_of = {case: fold for fold in folds for case in fold.val}
        rows = _evaluation_of(validation_out(model_dir, INITIAL))
        rows = rows[rows.scan_id.isin(fold_of)]
        frames.append(
            rows.assign(
                model=INITIAL,
                fold=rows.scan_id.map(lambda s: fold_of[s].index),
                fold_name=rows.scan_id.map(lambda s: fold_of[s].name),
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _evaluation_of(out: Path) -> pd.DataFrame:
    try:
        return tables.read_table(out, "evaluation")
    except FileNotFoundError:
        return pd.DataFrame(columns=tables.SCHEMAS["evaluation"].names)


def summary(evaluation: pd.DataFrame, regions: Sequence[str] = HEADLINE_REGIONS) -> pd.DataFrame:
    """Long table: model x site (and `all`) x region: scans, voxel Dice and cluster F1
    (mean, SD) over scans, as the paper reports them."""
    if evaluation.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    frame = evaluation[evaluation.region.isin(regions)].assign(site=evaluation.site.fillna("-"))
    every = frame.assign(site="all")
    both = pd.concat([frame, every], ignore_index=True)
    grouped = both.groupby(["model", "site", "region"], sort=False)
    table = grouped.agg(
        n_scans=("scan_id", "nunique"),
        voxel_dice_mean=("voxel_dice", "mean"),
        voxel_dice_sd=("voxel_dice", "std"),
        cluster_f1_mean=("cluster_f1", "mean"),
        cluster_f1_sd=("cluster_f1", "std"),
    ).reset_index()
    order = {region: i for i, region in enumerate(regions)}
    sites = sorted(s for s in table.site.unique() if s != "all")
    site_order = {site: i for i, site in enumerate([*sites, "all"])}
    models = {TRAINED: 1, INITIAL: 0}
    table = table.sort_values(
        ["site", "region", "model"],
        key=lambda c: c.map(
            site_order if c.name == "site" else order if c.name == "region" else models
        ),
    )
    return table[SUMMARY_COLUMNS].reset_index(drop=True)


SUMMARY_COLUMNS = [
    "model",
    "site",
    "region",
    "n_scans",
    "voxel_dice_mean",
    "voxel_dice_sd",
    "cluster_f1_mean",
    "cluster_f1_sd",
]


def agreement(evaluation: pd.DataFrame, regions: Sequence[str] = HEADLINE_REGIONS) -> pd.DataFrame:
    """Count and volume agreement with the references, per model, site and region."""
    frames = [
        count_agreement(rows, tuple(r for r in regions if r in set(rows.region))).assign(model=m)
        for m, rows in evaluation.groupby("model", sort=False)
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write(model_dir: Path, evaluation: pd.DataFrame) -> dict[str, Path]:
    """MODEL_DIR/evaluation: the rows (Parquet), the summary and agreement (CSV)."""
    folder = Path(model_dir) / EVALUATION
    folder.mkdir(parents=True, exist_ok=True)
    written = {
        "out_of_fold": folder / "out_of_fold.parquet",
        "summary": folder / "summary.csv",
        "agreement": folder / "agreement.csv",
    }
    evaluation.to_parquet(written["out_of_fold"], index=False)
    summary(evaluation).to_csv(written["summary"], index=False, float_format="%.6g")
    agreement(evaluation).to_csv(written["agreement"], index=False, float_format="%.6g")
    return written
