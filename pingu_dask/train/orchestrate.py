"""A whole `pingu-dask train`: cases, splits, plans, preprocessing, folds, out-of-fold tables.

    manifest rows with a reference -> [cpu] one task per case: checked, turned, written
    driver: splits_final.json, fingerprint, plans (nnU-Net's planner, or --init's moved over)
    [cpu] one task per case: nnU-Net's preprocessing
    [gpu] one long task per fold (folds.py), retried from its checkpoint
    [run] every validation case predicted by the fold that never saw it (evaluation.py)
    driver: evaluation tables, training.json

Every step skips what an earlier `train` on the same MODEL_DIR finished (cases,
plans, preprocessed cases, folds with their final checkpoint, scans predicted), so the
same command resumes; a MODEL_DIR made from another manifest or with other settings is
refused unless --force. One `train` at a time per MODEL_DIR (output/lock.py, as `run`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client

from pingu_dask.errors import RunError
from pingu_dask.inputs.manifest import Scan
from pingu_dask.monitor.feed import TrainFeed
from pingu_dask.monitor.training import TrainMonitor
from pingu_dask.nnunet import planning
from pingu_dask.nnunet.model import Model, resolve_model
from pingu_dask.nnunet.planning import CONFIGURATION
from pingu_dask.nnunet.trainer_process import (
    FINAL_CHECKPOINT,
    NnunetFolders,
    TrainerSpec,
)
from pingu_dask.output import training as layout
from pingu_dask.output.lock import OutputLock
from pingu_dask.records import timestamp
from pingu_dask.run.capacity import Capacity
from pingu_dask.run.clusters import ClusterRequest, open_client
from pingu_dask.run.loop import Progress
from pingu_dask.train import evaluation
from pingu_dask.train.cases import (
    CaseJob,
    LeftOut,
    PreparedCase,
    case_changes,
    case_rows,
    invalid_rows,
    missing_reference,
    prepare_case,
)
from pingu_dask.train.folds import FoldJob, FoldLoop, FoldResult
from pingu_dask.train.request import TrainRefused, TrainRequest, check_previous
from pingu_dask.train.splits import Fold, make_splits, splits_final
from pingu_dask.train.tasks import map_tasks, preprocess_task

logger = logging.getLogger(__name__)

TRAINER = "PinguTrainer"  # nnunet/trainer.py's class: the model folder is named after it


@dataclass
class TrainOutcome:
    run_id: str
    model_folder: Path | None = None
    included: list[PreparedCase] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    trained: dict[int, FoldResult] = field(default_factory=dict)
    skipped_folds: list[int] = field(default_factory=list)  # finished by an earlier train
    failed_folds: dict[int, str] = field(default_factory=dict)
    evaluation: Any = None  # pandas DataFrame of out-of-fold rows, when scored
    written: dict[str, Path | None] = field(default_factory=dict)
    seconds: float = 0.0
    dashboard: str | None = None
    prepared_only: bool = False  # --prepare-only: stopped after preprocessing

    @property
    def ok(self) -> bool:
        return not self.failed_folds and (self.model_folder is not None or self.prepared_only)


@dataclass
class Watch:
    """What the caller is told while it runs (all optional): a line per step, every
    fold event, the validation runs' progress."""

    say: Callable[[str], None] = lambda line: None
    on_event: Callable[[dict], None] | None = None
    on_scans: Callable[[Progress], None] | None = None
    on_start: Callable[[TrainOutcome], None] | None = None
    on_splits: Callable[[list[Fold]], None] | None = None


def train_model(request: TrainRequest, watch: Watch | None = None) -> TrainOutcome:
    """Train (or resume) a model into request.model_dir; see the module docstring."""
    watch = watch or Watch()
    model_dir = Path(request.model_dir).resolve()
    model_dir.mkdir(parents=True, exist_ok=True)
    outcome = TrainOutcome(run_id=uuid.uuid4().hex[:12])
    started = time.perf_counter()
    with OutputLock(model_dir, request.scoring.settings.lock):
        record = check_previous(model_dir, request)
        record.setdefault("runs", []).append(
            {
                "run_id": outcome.run_id,
                "started": timestamp(),
                "finished": None,
                "command": list(request.command),
            }
        )
        layout.write_json(model_dir / layout.TRAINING_JSON, record)
        folders = planning.folders_in(model_dir)
        candidates = [s for s in request.report.scans if missing_reference(s) is None]
        outcome.left_out = [r for s in request.report.scans if (r := missing_reference(s))]
        outcome.left_out += invalid_rows(request.report)
        try:
            with open_client(request.cluster, len(candidates), request.device) as (
                client,
                capacity,
            ):
                outcome.dashboard = client.dashboard_link
                steps = _Steps(request, model_dir, folders, client, capacity, watch, outcome)
                if watch.on_start:
                    watch.on_start(outcome)
                steps.run(candidates, record)
            layout.write_json(model_dir / layout.TRAINING_JSON, record)
            outcome.written["report"] = _report(model_dir)
        finally:
            outcome.seconds = time.perf_counter() - started
            record["runs"][-1]["finished"] = timestamp()
            layout.write_json(model_dir / layout.TRAINING_JSON, record)
    return outcome


@dataclass
class _Steps:
    """The steps of one train, on one client (see the module docstring)."""

    request: TrainRequest
    model_dir: Path
    folders: NnunetFolders
    client: Client
    capacity: Capacity
    watch: Watch
    outcome: TrainOutcome

    def __post_init__(self) -> None:
        self.token = uuid.uuid4().hex[:8]  # this training's events
        self.feed: TrainFeed | None = None  # registered once the folds are known

    def run(self, candidates: list[Scan], record: dict) -> None:
        request, outcome, say = self.request, self.outcome, self.watch.say
        # Splits that cannot be made even from every candidate fail before any case is read.
        make_splits([(scan.scan_id, scan.site) for scan in candidates], request.split)
        included = self.prepare_cases(candidates)
        outcome.included = included
        earlier = layout.read_cases_table(self.model_dir)
        if earlier is not None and (changes := case_changes(earlier, included)):
            raise TrainRefused(
                f"the training cases changed since {self.model_dir} was begun ("
                + "; ".join(changes[:5])
                + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
                + "): its plans, preprocessed data and folds are of the old ones. Use "
                "--force to start afresh, or another --out"
            )
        layout.write_cases_table(self.model_dir, case_rows(included, outcome.left_out))
        say(f"{len(included)} training cases, {len(outcome.left_out)} rows left out")
        if len(included) < 2:
            raise TrainRefused(
                f"{len(included)} usable training case(s): at least 2 are needed "
                f"(see {self.model_dir / layout.CASES_CSV} for why rows were left out)"
            )
        folds = make_splits([(c.scan_id, c.site) for c in included], request.split)
        outcome.folds = folds
        self._write_splits(folds)
        if self.watch.on_splits:
            self.watch.on_splits(folds)
        self.feed = TrainFeed(
            self.client,
            TrainMonitor(
                self.token,
                outcome.run_id,
                str(self.model_dir),
                [
                    {
                        "fold": f.index,
                        "name": f.name,
                        "train": len(f.train),
                        "val": len(f.val),
                        "epochs": request.schedule.epochs,
                    }
                    for f in folds
                ],
            ),
        )
        say(
            f"splits: {request.split.describe()}: "
            + "; ".join(f"{f.name}: {len(f.train)} train / {len(f.val)} val" for f in folds)
        )
        plans_name = self.plan(included)
        record["plans"] = self._plans_record(plans_name)
        record["cases"] = {"included": len(included), "left_out": len(outcome.left_out)}
        record["splits"] = [
            {"fold": f.index, "name": f.name, "train": list(f.train), "val": list(f.val)}
            for f in folds
        ]
        layout.write_json(self.model_dir / layout.TRAINING_JSON, record)
        self.preprocess(included, plans_name)
        if request.prepare_only:
            outcome.prepared_only = True
            say("prepared (--prepare-only): the same command without it trains the folds")
            return
        model_folder = self.folders.results_dataset / f"{TRAINER}__{plans_name}__{CONFIGURATION}"
        record["model_folder"] = str(model_folder.relative_to(self.model_dir))
        layout.write_json(self.model_dir / layout.TRAINING_JSON, record)
        self.train_folds(folds, plans_name, model_folder)
        if outcome.failed_folds:
            return
        outcome.model_folder = model_folder
        if request.evaluate:
            self.score(folds, model_folder, {s.scan_id: s for s in request.report.scans})
            record["evaluation"] = {
                k: str(v.relative_to(self.model_dir)) for k, v in outcome.written.items() if v
            }

    # --- cases ------------------------------------------------------------------------

    def prepare_cases(self, candidates: list[Scan]) -> list[PreparedCase]:
        request = self.request
        planning.write_dataset_json(self.folders, request.channel_names, len(candidates))
        job = CaseJob(
            folders=self.folders,
            channels=request.report.channels,
            orientation=request.scoring.inference.orientation,
            checks=request.checks,
            strict=request.strict,
            n_cases=len(candidates),
        )
        self._stage("cases", 0, len(candidates))
        results, failures = map_tasks(
            self.client,
            prepare_case,
            candidates,
            job,
            request.scoring.settings.retries,
            "prepare",
            lambda done: self._stage("cases", done, len(candidates)),
        )
        by_id = {scan.scan_id: scan for scan in candidates}
        for scan_id, message in failures.items():
            self.outcome.left_out.append(LeftOut(scan_id, by_id[scan_id].site, message))
            images, label = planning.case_files(self.folders, scan_id, len(job.channels))
            for path in (*images, label):
                path.unlink(missing_ok=True)
        included = sorted(results.values(), key=lambda case: case.scan_id)
        planning.write_dataset_json(
            self.folders,
            request.channel_names,
            len(included),
            cases=[case.scan_id for case in included],
        )
        return included

    # --- splits and plans -------------------------------------------------------------

    def _write_splits(self, folds: Sequence[Fold]) -> None:
        document = splits_final(folds)
        layout.write_json(self.model_dir / layout.SPLITS_JSON, {"folds": document})
        target = self.folders.preprocessed_dataset / layout.SPLITS_JSON
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=2))

    def plan(self, included: Sequence[PreparedCase]) -> str:
        """The fingerprint (from the case tasks), then nnU-Net's plans or --init's."""
        request = self.request
        planning.write_fingerprint(self.folders, [case.fingerprint for case in included])
        self._stage("plan", 0, 1)
        if request.init is not None:
            name = planning.transfer_plans(
                self.folders, request.init.folder, request.init.configuration
            )
            self.watch.say(f"plans: {request.init.name}'s, moved onto this dataset")
        else:
            name = planning.plan_default(self.folders, request.target_spacing, request.preset)
            self.watch.say(f"plans: nnU-Net's planner ({name})")
        self._stage("plan", 1, 1)
        return name

    def _plans_record(self, plans_name: str) -> dict:
        plans = json.loads((self.folders.preprocessed_dataset / f"{plans_name}.json").read_text())
        config = plans["configurations"][CONFIGURATION]
        arch = config["architecture"]["arch_kwargs"]
        request = self.request
        return {
            "name": plans_name,
            "configuration": CONFIGURATION,
            "source": f"init: {request.init.name}" if request.init else "nnU-Net's planner",
            "init_model": request.init.facts() if request.init else None,
            "preset": request.preset.name if request.preset else None,
            "target_spacing": list(request.target_spacing) if request.target_spacing else None,
            "spacing": config["spacing"],
            "patch_size": config["patch_size"],
            "batch_size": config["batch_size"],
            "features_per_stage": arch.get("features_per_stage"),
            "file": str(
                (self.folders.preprocessed_dataset / f"{plans_name}.json").relative_to(
                    self.model_dir
                )
            ),
        }

    # --- preprocessing ----------------------------------------------------------------

    def preprocess(self, included: Sequence[PreparedCase], plans_name: str) -> None:
        folder = planning.preprocessed_folder(self.folders, plans_name, CONFIGURATION)
        todo = [c.scan_id for c in included if not planning.is_preprocessed(folder, c.scan_id)]
        total = len(included)
        self._stage("preprocess", total - len(todo), total)
        results, failures = map_tasks(
            self.client,
            preprocess_task,
            todo,
            (self.folders, plans_name, len(self.request.channel_names)),
            self.request.scoring.settings.retries,
            "preprocess",
            lambda done: self._stage("preprocess", total - len(todo) + done, total),
        )
        if failures:
            listing = "; ".join(f"{case}: {message}" for case, message in failures.items())
            raise RunError(f"nnU-Net's preprocessing failed: {listing}")
        self.watch.say(f"preprocessed {len(results)} cases ({total - len(todo)} done before)")

    # --- folds ------------------------------------------------------------------------

    def train_folds(self, folds: Sequence[Fold], plans_name: str, model_folder: Path) -> None:
        request, outcome = self.request, self.outcome
        finished = layout.finished_folds(self.model_dir)
        done = [
            f.index
            for f in folds
            if f.index in finished
            and (model_folder / f"fold_{f.index}" / FINAL_CHECKPOINT).exists()
        ]
        outcome.skipped_folds = done
        if done:
            self.watch.say(f"folds {', '.join(map(str, done))} finished earlier: skipped")
        init_weights = None
        if request.init is not None:
            init_weights = str(
                request.init.folder / f"fold_{request.init.folds[0]}" / request.init.checkpoint
            )
        jobs = [
            FoldJob(
                spec=TrainerSpec(
                    folders=self.folders,
                    plans=plans_name,
                    configuration=CONFIGURATION,
                    trainer_folder=str(model_folder),
                    fold=fold.index,
                    settings=request.schedule,
                    init_weights=init_weights,
                    init_heads=init_weights is not None and same_labels(request.init),
                ),
                attempt=1,
                token=self.token,
                device=request.device,
                augmentation_processes=request.augmentation_processes,
            )
            for fold in folds
            if fold.index not in done
        ]
        loop = FoldLoop(
            client=self.client,
            model_dir=self.model_dir,
            run_id=outcome.run_id,
            retries=request.scoring.settings.retries,
            capacity=self.capacity if request.cluster.is_batch else None,
            feed=self.feed,
            on_event=self.watch.on_event,
            token=self.token,
        )
        self._stage("train", len(done), len(folds))
        outcome.trained = loop.run(jobs)
        outcome.failed_folds = {fold: report.message for fold, report in loop.failures.items()}
        self._stage("train", len(done) + len(outcome.trained), len(folds))
        if self.feed is not None:
            self.feed.send(event="ended", status="failed" if outcome.failed_folds else "trained")

    # --- out-of-fold tables -----------------------------------------------------------

    def score(self, folds: Sequence[Fold], model_folder: Path, scans: dict[str, Scan]) -> None:
        request, say = self.request, self.watch.say
        # This training's own scheduler, reached with this client's credentials (TLS).
        scheduler = ClusterRequest(self.client.scheduler.address, security=self.client.security)
        per_fold = evaluation.fold_scans(folds, scans)
        total = sum(len(v) for v in per_fold.values())
        if request.cluster.is_batch:
            self.capacity.workers(total)  # jobs for the predictions (they left with the folds)
        self._stage("evaluate", 0, len(folds) + bool(request.init))
        for index, fold in enumerate(folds):
            model = resolve_model(model_folder, folds=(str(fold.index),))
            out = layout.validation_out(self.model_dir, fold.index)
            say(
                f"out-of-fold: {fold.name}: {len(per_fold[fold.index])} scans by fold "
                f"{fold.index} -> {out.relative_to(self.model_dir)}"
            )
            evaluation.predict(
                model,
                per_fold[fold.index],
                out,
                request.report.path,
                request.scoring,
                scheduler,
                self.watch.on_scans,
            )
            self._stage("evaluate", index + 1, len(folds) + bool(request.init))
        if request.init is not None:
            out = layout.validation_out(self.model_dir, layout.INITIAL)
            every = [scan for scans_of in per_fold.values() for scan in scans_of]
            say(
                f"initial model {request.init.name} on the same {len(every)} scans -> "
                f"{out.relative_to(self.model_dir)}"
            )
            evaluation.predict(
                request.init,
                every,
                out,
                request.report.path,
                request.scoring,
                scheduler,
                self.watch.on_scans,
            )
            self._stage("evaluate", len(folds) + 1, len(folds) + 1)
        table = evaluation.gather(self.model_dir, folds, with_initial=request.init is not None)
        self.outcome.evaluation = table
        self.outcome.written.update(evaluation.write(self.model_dir, table))

    def _stage(self, stage: str, done: int, total: int) -> None:
        if self.feed is not None:
            self.feed.send(event="stage", stage=stage, done=done, total=total)


def same_labels(model: Model | None) -> bool:
    """Whether a model's labels are this training's (background 0, PVS 1): then its
    segmentation heads are fine-tuned too, not started afresh."""
    return model is not None and dict(model.labels) == planning.LABELS


def _report(model_dir: Path) -> Path | None:
    """MODEL_DIR/evaluation/report.html; a failure here must not fail the training."""
    from pingu_dask.report.training import build_training_report

    try:
        return build_training_report(model_dir)
    except Exception as error:
        logger.warning("could not write the training report: %s", error)
        return None
