"""A whole `pingu-dask run`: lock, provenance, resume plan, cluster, runner, run.json.

The CLI builds one RunRequest (every setting resolved then) and calls run_cohort;
tests, notebooks and `train`'s scoring do the same. Printing is left to the caller's
callbacks.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pingu_dask.errors import RunError
from pingu_dask.inputs.manifest import ManifestReport
from pingu_dask.monitor.http import page_link
from pingu_dask.output import compaction, layout, ledger, masks, parts, scans, tables
from pingu_dask.output.lock import OutputLock
from pingu_dask.records import ScanResult, timestamp
from pingu_dask.run.clusters import ClusterRequest, open_client
from pingu_dask.run.loop import Progress, RunStopped, Segmentation, segment_scans
from pingu_dask.run.provenance import (
    REGION_SOURCES,
    manifest_info,
    package_versions,
    provenance,
    region_sources,
)
from pingu_dask.run.settings import RunSettings
from pingu_dask.run.stages import Pipeline
from pingu_dask.version import __version__

logger = logging.getLogger(__name__)

KEEP_DETAILS_UP_TO = 1000  # scans; beyond, ok results shrink to id + status


class RunRefused(RunError):
    """The run cannot start as asked (another run, or different settings in OUT)."""


@dataclass(kw_only=True)
class RunRequest:
    """One `pingu-dask run`, as the command line (or a notebook, or `train`'s scoring)
    asks for it: every option and setting resolved when it is built, nothing looked
    up later."""

    report: ManifestReport  # the validated manifest
    pipeline: Pipeline  # the model and what decides each scan's outputs
    cluster: ClusterRequest = field(default_factory=ClusterRequest)  # where it runs
    # How the driver runs it (retries, limits, flushes, lock); from the config when built.
    settings: RunSettings = field(default_factory=RunSettings.from_config)
    force: bool = False  # delete OUT's results of other settings and start afresh
    allow_version_change: bool = False  # resume OUT made with other tool/library versions


@dataclass
class RunOutcome:
    run_id: str
    results: list[ScanResult] = field(default_factory=list)
    done_before: int = 0
    redone: int = 0
    invalid: int = 0
    seconds: float = 0.0
    dashboard: str | None = None  # Dask's dashboard
    stopped: str | None = None  # why the circuit breaker stopped the run, if it did
    took_over_lock: dict | None = None  # the holder of a stale OUT/.lock replaced, if any

    @property
    def page(self) -> str | None:
        """This run's page (/pingu), beside Dask's dashboard."""
        return page_link(self.dashboard)

    @property
    def ok(self) -> bool:
        return not self.stopped and self.invalid == 0 and all(r.ok for r in self.results)


# The versions whose change can change a mask: a resumed OUT would mix their outputs.
VERSIONED = ("pingu-dask", "nnunetv2", "torch")


def check_settings(
    out: Path, pipeline: Pipeline, force: bool, allow_version_change: bool = False
) -> None:
    """Refuse to mix outputs of different models, settings or versions in one OUT
    (unless forced, or, for versions only, allowed)."""
    previous = layout.read_run_json(out)
    if previous is None:
        return
    if force:
        layout.reset_output(out)
        return
    changed = version_changes(previous, current_versions())
    if changed and not allow_version_change:
        raise RunRefused(
            f"{out} was written with other versions ({'; '.join(changed)}): resuming "
            "would mix masks made by both. Use --allow-version-change to resume anyway "
            "(each run's versions are kept in run.json), another --out, or --force."
        )
    if previous.get("pipeline_fingerprint") != pipeline.fingerprint():
        mine = provenance(pipeline, None, 0)
        differences = [
            key
            for key in ("model", "inference", "clusters", "regions", "labels", "atlas")
            if _comparable(previous.get(key), key) != _comparable(mine[key], key)
        ]
        raise RunRefused(
            f"{out} holds results of another model or other settings "
            f"(different: {', '.join(differences) or 'pipeline fingerprint'}). "
            "Use another --out, or --force to delete those results and start afresh."
        )


def current_versions() -> dict[str, str | None]:
    """pingu-dask's, nnunetv2's and torch's versions in this process."""
    return {"pingu-dask": __version__, **package_versions(VERSIONED[1:])}


def version_changes(previous_run: dict, now: dict[str, str | None]) -> list[str]:
    """'torch 2.13.0 -> 2.14.1' for each versioned package that differs from the
    latest run recorded in run.json (its `runs[-1].versions`, else the first run's)."""
    runs = previous_run.get("runs") or [{}]
    before = runs[-1].get("versions") or {
        "pingu-dask": previous_run.get("version"),
        **{k: (previous_run.get("libraries") or {}).get(k) for k in VERSIONED[1:]},
    }
    return [
        f"{name} {before.get(name)} -> {now.get(name)}"
        for name in VERSIONED
        if name in before and before.get(name) != now.get(name)
    ]


def _comparable(section, key: str):
    section = json.loads(json.dumps(section))  # tuples -> lists, as run.json holds them
    if key == "model" and section:
        return section.get("fingerprint")
    if key == "inference" and section:
        return {k: v for k, v in section.items() if k not in ("device", "torch_threads")}
    return section


def run_cohort(
    request: RunRequest,
    on_start: Callable[[RunOutcome, ledger.ResumePlan], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    """Run (or resume) a cohort into request.pipeline.out; see the module docstring."""
    pipeline = request.pipeline
    out = Path(pipeline.out)
    out.mkdir(parents=True, exist_ok=True)
    outcome = RunOutcome(run_id=uuid.uuid4().hex[:12])
    with OutputLock(out, request.settings.lock) as lock:
        outcome.took_over_lock = lock.took_over
        # A broken model stops here, before any scan is sent (and before --force deletes).
        pipeline.model.check()
        check_settings(out, pipeline, request.force, request.allow_version_change)
        parts.remove_orphan_parts(out)
        masks.remove_partial_masks(out)
        plan = ledger.plan_resume(out, request.report.scans, pipeline.fingerprint())
        tables.drop_scans(out, plan.redo)
        compact_above = request.settings.compact_above_parts
        compaction.compact_if_fragmented(out, compact_above)  # few files before adding
        outcome.done_before, outcome.redone = len(plan.done), len(plan.redo)
        invalid = ledger.invalid_rows(request.report.problems, outcome.run_id)
        outcome.invalid = len(invalid)
        run_info = layout.read_run_json(out) or provenance(
            pipeline, request.report.path, len(request.report.scans)
        )
        run_info["n_scans"] = len(request.report.scans)
        run_info["manifest"] = manifest_info(request.report.path)
        run_info[REGION_SOURCES] = region_sources(request.report.scans, pipeline)
        run_info.setdefault("runs", []).append(
            {
                "run_id": outcome.run_id,
                "started": timestamp(),
                "finished": None,
                "to_do": len(plan.todo),
                "versions": current_versions(),
                # Which scans run (not what their figures are): kept per run, as a
                # resumed OUT may have been run with other bounds or --strict.
                "checks": {"strict": pipeline.strict, **asdict(pipeline.checks)},
            }
        )
        ledger.write_manifest_scans(out, [scan.scan_id for scan in request.report.scans])
        layout.write_json(out / layout.RUN_JSON, run_info)
        started = time.perf_counter()
        try:
            with _client(request, len(plan.todo)) as (client, capacity):
                outcome.dashboard = client.dashboard_link
                if on_start:
                    on_start(outcome, plan)
                try:
                    job = Segmentation(
                        scans=plan.todo,
                        pipeline=pipeline,
                        settings=request.settings,
                        run_id=outcome.run_id,
                        on_progress=on_progress,
                        extra_ledger_rows=invalid,
                        keep_details=len(plan.todo) <= KEEP_DETAILS_UP_TO,
                        done_before=len(plan.done),
                        capacity=capacity,
                    )
                    outcome.results = segment_scans(client, job)
                except RunStopped as stopped:
                    outcome.results, outcome.stopped = stopped.results, str(stopped)
            compaction.compact_if_fragmented(out, compact_above)  # not after Ctrl-C/an error
        finally:
            outcome.seconds = time.perf_counter() - started
            run_info["runs"][-1]["finished"] = timestamp()
            run_info["finished"] = timestamp()
            layout.write_json(out / layout.RUN_JSON, run_info)
            _write_scans_table(out, request.report)
    return outcome


def _write_scans_table(out: Path, report: ManifestReport) -> None:
    """OUT/tables/scans from the ledger, also after Ctrl-C or an error (its scans not
    run show as not_run); a failure here (e.g. a full disk) must not hide the run's own
    outcome, and the next run writes it again."""
    try:
        scans.write_scans_table(out, report.scans, report.problems)
    except OSError as error:
        logger.warning("could not write %s/tables/scans: %s", out, error)


def _client(request: RunRequest, scans_left: int):
    """A client on the cluster the request names, and how many workers to plan for."""
    inference = request.pipeline.inference
    return open_client(request.cluster, scans_left, inference.device, inference.torch_threads)
