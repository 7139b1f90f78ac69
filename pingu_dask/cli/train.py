"""`pingu-dask train`: an nnU-Net model from a manifest's reference masks, folds on Dask."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import pandas as pd
from rich.markup import escape
from rich.table import Table

from pingu_dask.cli.common import (
    SHORT_REGION_NAMES,
    allow_unknown_columns_option,
    cluster_option,
    console,
    dashboard_option,
    device_option,
    print_count_agreement,
    print_report,
    pvs_cluster_options,
    pvs_cluster_rules,
    region_table,
    retries_option,
    split,
    step_size_option,
    tta_option,
    workers_option,
)
from pingu_dask.cli.hpc import job_options, jobqueue_options
from pingu_dask.cli.run import orientation_option
from pingu_dask.config import InferenceSettings, setting
from pingu_dask.errors import InputError, ModelError
from pingu_dask.inputs.bids import SUFFIXES as KNOWN_CHANNELS
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.manifest import load_manifest
from pingu_dask.nnunet.model import resolve_model
from pingu_dask.nnunet.planning import NNUNET_SCHEDULE, PRESETS
from pingu_dask.output.lock import LockedError
from pingu_dask.run.clusters import ClusterRequest
from pingu_dask.run.loop import Progress
from pingu_dask.run.settings import RunSettings
from pingu_dask.run.signals import Stopped, exit_code, stop_on_signals
from pingu_dask.train import evaluation
from pingu_dask.train.orchestrate import TrainOutcome, Watch, train_model
from pingu_dask.train.request import TrainRefused, TrainRequest
from pingu_dask.train.splits import SplitSpec


@click.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="MODEL_DIR: the training's folder (the model ends up inside it; `run --model "
    "MODEL_DIR` takes it as is).",
)
@click.option(
    "--split",
    "split_text",
    default=None,
    help="kfold (K folds stratified by site: internal cross-validation), site (leave one "
    "site out: a fold per site, validated on the site it never saw) or train-site:SITE "
    f"(trained on SITE, validated on every other site). Default {setting('train-split')}.",
)
@click.option(
    "--folds",
    "k",
    type=click.IntRange(min=2),
    default=None,
    help=f"Folds of --split kfold (default {setting('train-folds')}).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help=f"Seed of the splits and the trainer (default {setting('train-seed')}): the same "
    "seed gives the same splits.",
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help="A shrunk network and schedule for a CPU: tiny (tests: seconds per epoch, masks "
    "that mean nothing), demo (the bundled demo model's: ~40 min per fold on 2 cores). "
    "Default: nnU-Net's planner and schedule (1000 x 250 iterations: a GPU's work).",
)
@click.option(
    "--target-spacing",
    default=None,
    help="Target spacing of nnU-Net's planner in mm, one value or three (e.g. 0.8, as "
    "PINGU's plans name trgSp_8x8x8 suggests). Default: nnU-Net's choice from the data.",
)
@click.option(
    "--init",
    "init_spec",
    default=None,
    help="Fine-tune from a model (a v2 model folder or zip, an imported PINGU v1 model, "
    "or 'demo'): its plans are moved onto this dataset and its weights loaded (all but "
    "the segmentation heads), as nnU-Net's -pretrained_weights; it is scored on the same "
    "validation cases, before and after.",
)
@click.option(
    "--channels",
    default=None,
    help="Manifest columns of the input channels, in order (default: --init's channels, else t1w).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per fold.")
@click.option(
    "--iterations-per-epoch",
    type=click.IntRange(min=1),
    default=None,
    help="Training iterations per epoch (nnU-Net: 250).",
)
@click.option(
    "--val-iterations",
    type=click.IntRange(min=1),
    default=None,
    help="Validation iterations per epoch, for the pseudo-Dice (nnU-Net: 50).",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    help="Epochs between checkpoints (default "
    f"{setting('train-checkpoint-every')}; nnU-Net: 50); a fold also checkpoints on SIGTERM "
    "and when its worker is lost, and a retried fold goes on from there.",
)
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adamw"]),
    default=None,
    help="sgd (nnU-Net's) or adamw (the presets': short schedules).",
)
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option(
    "--augmentation-processes",
    type=click.IntRange(min=0),
    default=None,
    help="nnU-Net's data-augmentation processes per fold (default: the worker's cores - 1; "
    "nnU-Net asks ~12 per GPU). 0: in the trainer's own process.",
)
@device_option
@cluster_option
@workers_option("Local worker processes: folds trained at once (one inference slot each).")
@retries_option
@dashboard_option
@click.option("--strict", is_flag=True, default=None, help="Pre-flight flags leave a case out.")
@click.option(
    "--orientation",
    default=None,
    callback=lambda _context, _option, value: orientation_option(value),
    help=f"The orientation images are trained in (default {setting('orientation')}): the one "
    "`run` brings scans to before this model.",
)
@click.option(
    "--evaluate/--no-evaluate",
    default=True,
    show_default=True,
    help="Predict every validation case with the fold that never saw it and score it.",
)
@tta_option
@step_size_option
@click.option(
    "--prepare-only",
    is_flag=True,
    help="Stop after the cases, plans and nnU-Net's preprocessing (e.g. on a CPU node); "
    "the same command without it then trains the folds.",
)
@click.option("--force", is_flag=True, help="Delete an earlier training in MODEL_DIR first.")
@allow_unknown_columns_option
@pvs_cluster_options
@jobqueue_options
def train(
    manifest: Path,
    model_dir: Path,
    split_text: str | None,
    k: int | None,
    seed: int | None,
    preset: str | None,
    target_spacing: str | None,
    init_spec: str | None,
    channels: str | None,
    epochs: int | None,
    iterations_per_epoch: int | None,
    val_iterations: int | None,
    checkpoint_every: int | None,
    optimizer: str | None,
    learning_rate: float | None,
    augmentation_processes: int | None,
    device: str | None,
    cluster: str,
    workers: int,
    retries: int | None,
    dashboard_address: str | None,
    strict: bool | None,
    orientation: str | None,
    evaluate: bool,
    tta: bool | None,
    step_size: float | None,
    prepare_only: bool,
    force: bool,
    allow_unknown_columns: bool,
    regions_spec: str | None,
    connectivity: str | None,
    min_cluster_voxels: int | None,
    min_cluster_mm3: float | None,
    exclude: str | None,
    max_outside_brain: float | None,
    dry_run: bool,
    **job_values,
) -> None:
    """Train (or fine-tune) an nnU-Net model on MANIFEST's scans and reference masks.

    Every row with a `reference` becomes a training case (checked as `run` checks a
    scan; a bad row is left out with its reason, in MODEL_DIR/cases.csv). The folds
    (--split) train as one Dask task each, in parallel across workers or batch jobs;
    a lost fold goes on from its latest checkpoint. Then every validation case is
    predicted by the fold that never saw it and scored per site and region
    (MODEL_DIR/evaluation). The same command resumes an unfinished training.
    Exit code 0 when every fold trained, 1 otherwise.
    """
    del dry_run
    seed = int(setting("train-seed")) if seed is None else seed
    try:
        spec = SplitSpec.parse(
            split_text or str(setting("train-split")), k or int(setting("train-folds")), seed
        )
        init = resolve_model(init_spec) if init_spec else None
    except (InputError, ModelError) as error:
        raise click.UsageError(str(error)) from error
    columns = tuple(split(channels)) if channels else init.channels if init else ("t1w",)
    names = init.channel_names if init else tuple(KNOWN_CHANNELS.get(c, c) for c in columns)
    if init and columns != init.channels:
        raise click.UsageError(f"--init {init.name} takes channels {', '.join(init.channels)}")
    report = load_manifest(manifest, columns, allow_unknown_columns=allow_unknown_columns)
    print_report(report)
    if report.table_problems:
        console.print("[red]fix the manifest's columns[/red]")
        raise SystemExit(1)
    chosen = PRESETS[preset] if preset else None
    base = chosen.schedule if chosen else NNUNET_SCHEDULE
    changes: dict[str, Any] = {
        key: value
        for key, value in {
            "epochs": epochs,
            "iterations_per_epoch": iterations_per_epoch,
            "val_iterations_per_epoch": val_iterations,
            "checkpoint_every": checkpoint_every
            or (None if chosen else int(setting("train-checkpoint-every"))),
            "optimizer": optimizer,
            "initial_lr": learning_rate,
            "seed": seed,
        }.items()
        if value is not None
    }
    schedule = replace(base, **changes)
    inference = InferenceSettings.from_config(
        tta=tta, step_size=step_size, device=device, orientation=orientation
    )
    request = TrainRequest(
        report=report,
        model_dir=model_dir,
        split=spec,
        channel_names=names,
        schedule=schedule,
        scoring=evaluation.Scoring(
            inference=inference,
            pvs_rules=pvs_cluster_rules(
                connectivity,
                min_cluster_voxels,
                min_cluster_mm3,
                exclude,
                max_outside_brain=max_outside_brain,
            ),
            regions=region_table(regions_spec),
            checks=CheckThresholds.from_config(),
            settings=RunSettings.from_config(retries=retries),
        ),
        preset=chosen,
        target_spacing=_spacing(target_spacing),
        init=init,
        cluster=ClusterRequest(cluster, workers, 0, job_options(job_values), dashboard_address),
        device=inference.device,
        checks=CheckThresholds.from_config(),
        strict=bool(setting("strict")) if strict is None else strict,
        augmentation_processes=augmentation_processes
        if augmentation_processes is not None
        else setting("train-augmentation-processes"),
        evaluate=evaluate,
        prepare_only=prepare_only,
        force=force,
        command=tuple(sys.argv),
    )
    outcome = run_training(request)
    raise SystemExit(0 if outcome.ok else 1)


def _spacing(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        values = [float(v) for v in split(text.replace("x", ","))]
    except ValueError as error:
        raise click.BadParameter(f"--target-spacing {text!r}: numbers in mm") from error
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) <= 0:
        raise click.BadParameter(f"--target-spacing {text!r}: one or three positive values")
    return tuple(values)


def run_training(request: TrainRequest) -> TrainOutcome:
    """Train with progress on the terminal; the summary and tables at the end."""
    names: dict[int, str] = {}

    def on_start(outcome: TrainOutcome) -> None:
        console.print(f"Dask dashboard: {outcome.dashboard} (training: /pingu, metrics: /metrics)")

    def on_event(message: dict) -> None:
        fold = message.get("fold")
        label = names.get(int(fold), f"fold {fold}") if fold is not None else ""
        print_fold_event(label, message)

    def on_scans(progress: Progress) -> None:
        """The out-of-fold predictions: a line at every tenth of a fold's scans."""
        settled = progress.done + progress.failed
        step = max(1, progress.total // 10)
        if settled % step == 0 or settled == progress.total:
            failed = f", {progress.failed} failed" if progress.failed else ""
            console.print(f"  predicted {settled}/{progress.total}{failed}")

    watch = Watch(
        say=lambda line: console.print(line, soft_wrap=True),
        on_event=on_event,
        on_start=on_start,
        on_scans=on_scans,
    )
    watch.on_splits = lambda folds: names.update({fold.index: fold.name for fold in folds})
    try:
        with stop_on_signals():
            outcome = train_model(request, watch)
    except (LockedError, TrainRefused, ModelError, InputError) as error:
        console.print(f"[red]{escape(str(error))}[/red]", soft_wrap=True)
        raise SystemExit(1) from error
    except KeyboardInterrupt as interrupt:
        by = f" by {interrupt.name}" if isinstance(interrupt, Stopped) else ""
        console.print(
            f"[yellow]interrupted{by}: folds saved their checkpoints; run the same command "
            "again to go on from them[/yellow]"
        )
        raise SystemExit(exit_code(interrupt)) from None
    print_outcome(request, outcome)
    return outcome


def print_fold_event(label: str, message: dict) -> None:
    """One line per fold event: started, each epoch, ended."""
    kind = message.get("event")
    if kind == "started":
        start = message.get("from_epoch") or 0
        resume = f" from its checkpoint at epoch {start}" if start else ""
        console.print(
            f"{label}: attempt {message.get('attempt')} started on {message.get('worker')}{resume}",
            soft_wrap=True,
        )
    elif kind == "epoch":
        epoch, epochs = message.get("epoch") or 0, message.get("epochs") or 0
        seconds = message.get("epoch_seconds")
        eta = _duration((epochs - epoch) * seconds) if seconds else "?"
        parts = [
            f"{label}: epoch {epoch}/{epochs}",
            f"loss {_figure(message.get('train_loss'), 3)}",
            f"pseudo-Dice {_figure(message.get('pseudo_dice'), 3)}",
            f"{_figure(message.get('iterations_per_second'), 1)} it/s",
            f"data wait {_percent(message.get('data_wait_share'))}",
            f"ETA {eta}",
        ]
        console.print("  ".join(parts), soft_wrap=True)
    elif kind == "fold-ended":
        status = str(message.get("status"))
        colour = {"ok": "green", "retry": "yellow"}.get(status, "red")
        note = f": {escape(str(message.get('message')))}" if message.get("message") else ""
        said = {"ok": "finished", "retry": "failed, retried"}.get(status, status)
        console.print(
            f"[{colour}]{label}: attempt {message.get('attempt')} {said}{note}[/]", soft_wrap=True
        )


def print_outcome(request: TrainRequest, outcome: TrainOutcome) -> None:
    for row in outcome.left_out:
        console.print(
            f"[yellow]left out[/yellow] {row.scan_id}: {escape(row.reason)}", soft_wrap=True
        )
    for fold, message in outcome.failed_folds.items():
        console.print(f"[red]fold {fold} failed: {escape(message)}[/red]", soft_wrap=True)
    if outcome.evaluation is not None and len(outcome.evaluation):
        print_comparison(evaluation.summary(outcome.evaluation), request)
        agreement = evaluation.agreement(outcome.evaluation)
        print_count_agreement(agreement[agreement.model == evaluation.TRAINED])
    if outcome.written.get("report"):
        console.print(f"report: {outcome.written['report']}", soft_wrap=True)
    if outcome.model_folder is not None:
        console.print(f"model: {outcome.model_folder}", soft_wrap=True)
        console.print(f"run it: pingu-dask run MANIFEST --out OUT --model {request.model_dir}")
    console.print(f"training took {_duration(outcome.seconds)}")


def print_comparison(summary: pd.DataFrame, request: TrainRequest) -> None:
    """Voxel Dice and cluster F1 per site and region: out-of-fold, and with --init the
    initial model on the same cases beside it."""
    with_initial = evaluation.INITIAL in set(summary.model)
    what = {
        "kfold": "internal cross-validation",
        "site": "each site predicted by the fold that never saw it (unseen site)",
        "train-site": f"a model trained on {request.split.site}, on the other sites",
    }[request.split.kind]
    table = Table(
        title=f"Out-of-fold evaluation: {what}",
        caption="voxel Dice and cluster F1 (detection, symmetric): mean (SD) over scans; "
        "reference masks as given"
        + ("; before: the --init model on the same scans" if with_initial else ""),
    )
    for heading in ("site", "region", "scans"):
        table.add_column(heading, justify="right" if heading == "scans" else "left")
    measures = (("voxel_dice", "voxel Dice"), ("cluster_f1", "cluster F1"))
    for _, title in measures:
        if with_initial:
            table.add_column(f"{title}\nbefore", justify="right")
        table.add_column(f"{title}\n{'after' if with_initial else ''}".strip(), justify="right")
    trained = summary[summary.model == evaluation.TRAINED]
    initial = summary[summary.model == evaluation.INITIAL].set_index(["site", "region"])
    for row in trained.itertuples():
        cells = [str(row.site), SHORT_REGION_NAMES.get(row.region, row.region), str(row.n_scans)]
        for measure, _ in measures:
            if with_initial:
                before = (
                    initial.loc[(row.site, row.region)]
                    if (row.site, row.region) in initial.index
                    else None
                )
                cells.append(_mean_sd(before, measure))
            cells.append(_mean_sd(row, measure))
        table.add_row(*cells)
    console.print(table)


def _mean_sd(row, measure: str) -> str:
    if row is None:
        return "-"
    mean, sd = getattr(row, f"{measure}_mean"), getattr(row, f"{measure}_sd")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.2f}" + ("" if sd is None or math.isnan(sd) else f" ({sd:.2f})")


def _figure(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
