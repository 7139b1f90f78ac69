"""`pingu-dask run` (a cohort through the model), `demo` (on synthetic data), `status`."""

from __future__ import annotations

from pathlib import Path

import click

from pingu_dask.analysis.atlas import AtlasSettings
from pingu_dask.analysis.labels import LabelError, ModelLabels, resolve_labels
from pingu_dask.cli.common import (
    allow_unknown_columns_option,
    cluster_option,
    console,
    dashboard_option,
    device_option,
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
from pingu_dask.cli.data import discover_bids
from pingu_dask.cli.hpc import job_options, jobqueue_options
from pingu_dask.cli.progress import (
    PER_SCAN_LINES_UP_TO,
    ProgressBar,
    print_run_line,
    print_scan_table,
    print_status,
)
from pingu_dask.config import InferenceSettings, check_orientation, setting
from pingu_dask.errors import ModelError, is_out_of_space
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.manifest import ManifestReport, load_manifest
from pingu_dask.nnunet.engine import NnUNetModel
from pingu_dask.nnunet.model import Model, resolve_model
from pingu_dask.output import ledger
from pingu_dask.output.ledger import ResumePlan
from pingu_dask.output.lock import LockedError
from pingu_dask.run import orchestrate
from pingu_dask.run.clusters import ClusterRequest
from pingu_dask.run.jobs import BATCH_SYSTEMS, JobOptions, jobqueue_cluster
from pingu_dask.run.orchestrate import RunOutcome, RunRefused, RunRequest
from pingu_dask.run.settings import RunSettings
from pingu_dask.run.signals import Stopped, exit_code, stop_on_signals
from pingu_dask.run.stages import ATLAS_CHANNEL, Pipeline

STOPPED_EXIT_CODE = 3  # the circuit breaker stopped the run (1: some scans failed)
OUT_OF_SPACE_EXIT_CODE = 4  # OUT's file system is full or over quota: free space, resume
BIDS_MANIFEST = "manifest_bids.csv"  # in OUT, for a BIDS dataset given as MANIFEST
MODEL_CHOICES = (
    "choose a model with --model: a trained nnU-Net v2 model folder "
    "(Trainer__Plans__configuration/ with dataset.json, plans.json, fold_N/), a zip made by "
    "nnUNetv2_export_model_to_zip, or 'demo' (the bundled demo model: it was trained on "
    "synthetic data and is for trying the tool, not for real scans)"
)


def orientation_option(value: str | None) -> str | None:
    """--orientation, checked where it is given (axis codes such as RAS, or 'stored')."""
    try:
        return None if value is None else check_orientation(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory.",
)
@click.option(
    "--model", "-m", "model_spec", default=None, help="Model folder, model zip, or 'demo'."
)
@click.option("--folds", default=None, help="Comma-separated folds (default: all in the model).")
@click.option("--checkpoint", default=None, help="Checkpoint file name in each fold folder.")
@click.option(
    "--atlas-fallback/--no-atlas-fallback",
    default=None,
    help="Scans without a parcellation get regions from the atlas (the MNI152 template's WM "
    "and basal ganglia labels registered to the T1w; region_source = atlas) instead of "
    f"whole-brain figures only (default {'on' if setting('atlas-fallback') else 'off'}; "
    "pingu.atlas-fallback). `--regions atlas` uses the atlas for every scan.",
)
@click.option(
    "--pvs-labels",
    default=None,
    help="The model's labels that are PVS, as names or values, comma-separated (default: "
    "every label named like PVS, or a model's only label). Its other labels (e.g. WMH) are "
    "kept as their own structures, never counted as PVS.",
)
@click.option(
    "--label-regions",
    default=None,
    help="Regions of region-specific PVS labels, as LABEL=region pairs, comma-separated, "
    "e.g. 'WM-PVS=white_matter,BG-PVS=basal_ganglia' (default: read from the label names); "
    "'none': no regions from the model. Used for scans without a parcellation.",
)
@tta_option
@step_size_option
@device_option
@cluster_option
@workers_option("Local worker processes (one inference slot each).")
@click.option(
    "--cpu-workers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="On a GPU machine: local worker processes without an inference slot that only "
    "preprocess and finish, beside the GPU workers (0: the GPU workers run those stages "
    "on threads, one per core).",
)
@click.option(
    "--orientation",
    default=None,
    callback=lambda _context, _option, value: orientation_option(value),
    help="The orientation scans are brought to before the network, by exact axis "
    "permutations and flips (the prediction goes back the same way): the one the model "
    f"was trained in, as axis codes (default {setting('orientation')}; nnU-Net's reorienting "
    "reader's and the demo model's), or 'stored' to give the network the array as stored, "
    "as nnUNetv2_predict does (figures then depend on how a file is stored).",
)
@click.option(
    "--strict",
    is_flag=True,
    default=None,
    help="Pre-flight checks: a flagged scan fails (not run) instead of running with its "
    f"flag (default {'on' if setting('strict') else 'off'}; pingu.strict).",
)
@click.option(
    "--torch-threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads per worker (default: the worker's cores: this machine's / --workers "
    "locally, its job's / --processes in batch jobs).",
)
@click.option(
    "--scan-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds one attempt at a scan may take once a worker has started on it (default "
    f"{setting('scan-timeout'):g}); past it the attempt is cancelled, its worker restarted, "
    "and the scan retried. 0: no limit.",
)
@retries_option
@dashboard_option
@click.option("--force", is_flag=True, help="Delete earlier results in OUT and start afresh.")
@click.option(
    "--filter-reference/--reference-as-given",
    default=None,
    help="Evaluate scans with a `reference` against the reference after the pipeline's "
    "own filter (inflates Dice) instead of as given (default; pingu.filter-reference).",
)
@click.option(
    "--allow-version-change",
    is_flag=True,
    help="Resume OUT although it was written with another pingu-dask, nnunetv2 or torch "
    "version (refused otherwise: masks made by both would be mixed).",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Run the valid rows of a manifest with problems (the others get ledger rows).",
)
@allow_unknown_columns_option
@pvs_cluster_options
@click.option(
    "--nifti/--no-nifti",
    default=True,
    show_default=True,
    help="Also write each mask as NIfTI in OUT/nifti (BIDS-derivatives names).",
)
@click.option(
    "--qc/--no-qc",
    default=False,
    show_default=True,
    help="Write a QC picture per scan (OUT/qc/<scan_id>.png: the mask over the T1w); "
    "`pingu-dask report OUT` shows them.",
)
@jobqueue_options
def run(
    manifest: Path,
    out: Path,
    model_spec: str | None,
    folds: str | None,
    checkpoint: str | None,
    atlas_fallback: bool | None,
    pvs_labels: str | None,
    label_regions: str | None,
    tta: bool | None,
    step_size: float | None,
    device: str | None,
    cluster: str,
    workers: int,
    cpu_workers: int,
    torch_threads: int | None,
    orientation: str | None,
    strict: bool | None,
    retries: int | None,
    scan_timeout: float | None,
    dashboard_address: str | None,
    force: bool,
    allow_version_change: bool,
    filter_reference: bool | None,
    skip_invalid: bool,
    allow_unknown_columns: bool,
    regions_spec: str | None,
    connectivity: str | None,
    min_cluster_voxels: int | None,
    min_cluster_mm3: float | None,
    exclude: str | None,
    max_outside_brain: float | None,
    nifti: bool,
    qc: bool,
    dry_run: bool,
    **job_values,
) -> None:
    """Segment every scan of MANIFEST with an nnU-Net model on a Dask cluster.

    MANIFEST is a CSV/TSV/Parquet manifest or a BIDS dataset folder (its manifest is
    written to OUT/manifest_bids.csv; see `pingu-dask manifest`).

    Writes OUT/masks.zarr, OUT/tables/{regions,clusters,evaluation,ledger} (Parquet),
    OUT/run.json and, unless --no-nifti, OUT/nifti. Running the same command again
    resumes: finished scans are skipped, failed and unfinished ones are redone.
    Exit code 0 when every scan is done, 1 when any failed or was invalid, 3 when the
    circuit breaker stopped the run, 4 when OUT's file system was full (free space and
    run the same command again).
    """
    jobs = job_options(job_values)
    if dry_run:
        print_job_script(cluster, jobs)
        return
    if model_spec is None:
        raise click.UsageError(MODEL_CHOICES)
    inference = InferenceSettings.from_config(
        folds=split(folds) if folds else None,
        checkpoint=checkpoint,
        tta=tta,
        step_size=step_size,
        device=device,
        torch_threads=torch_threads,
        orientation=orientation,
    )
    model = located_model(model_spec, inference)
    labels = model_labels(model, pvs_labels, label_regions)
    atlas = atlas_for(regions_spec, atlas_fallback)
    if atlas != "none" and ATLAS_CHANNEL not in model.channels:
        raise click.UsageError(
            f"atlas regions are registered to a T1w; model {model.name} takes "
            f"{', '.join(model.channels)}"
        )
    report = checked_manifest(manifest, out, model, atlas, skip_invalid, allow_unknown_columns)
    request = RunRequest(
        report=report,
        pipeline=Pipeline(
            NnUNetModel(model),
            inference,
            Path(out),
            pvs_cluster_rules(
                connectivity,
                min_cluster_voxels,
                min_cluster_mm3,
                exclude,
                max_outside_brain=max_outside_brain,
                filter_reference=filter_reference,
            ),
            region_table(None if regions_spec == ATLAS else regions_spec),
            write_nifti=nifti,
            qc=qc,
            checks=CheckThresholds.from_config(),
            strict=bool(setting("strict")) if strict is None else strict,
            labels=labels,
            atlas_for=atlas,
            atlas=AtlasSettings(
                method=str(setting("atlas-method")),
                resolution_mm=float(setting("atlas-resolution-mm")),
            ),
        ),
        cluster=ClusterRequest(cluster, workers, cpu_workers, jobs, dashboard_address),
        settings=RunSettings.from_config(retries=retries, scan_timeout=scan_timeout),
        force=force,
        allow_version_change=allow_version_change,
    )
    outcome = run_request(request)
    raise SystemExit(0 if outcome.ok else 1)


def located_model(model_spec: str, inference: InferenceSettings) -> Model:
    """--model found and fingerprinted (a usage error names what is wrong), and said."""
    try:
        model = resolve_model(model_spec, inference.folds, inference.checkpoint)
    except ModelError as error:
        raise click.UsageError(str(error)) from error
    console.print(
        f"model {model.folder} (folds {', '.join(model.folds)}, "
        f"channels {', '.join(model.channels)}, fingerprint {model.fingerprint[:12]})"
    )
    return model


def model_labels(model: Model, pvs_labels: str | None, label_regions: str | None) -> ModelLabels:
    """Which of the model's labels are PVS, and their regions; said before any scan runs."""
    try:
        labels = resolve_labels(model.name, model.labels, pvs_labels, label_regions)
    except LabelError as error:
        raise click.UsageError(str(error)) from error
    console.print(labels_line(labels))
    return labels


def checked_manifest(
    manifest: Path,
    out: Path,
    model: Model,
    atlas: str,
    skip_invalid: bool,
    allow_unknown_columns: bool,
) -> ManifestReport:
    """MANIFEST (or a BIDS folder's manifest, written to OUT) validated for the model's
    channels and reported; exits 1 when it cannot run as it is."""
    if Path(manifest).is_dir():
        found = discover_bids(Path(manifest), model.channels)
        Path(out).mkdir(parents=True, exist_ok=True)
        manifest = Path(out) / BIDS_MANIFEST
        found.manifest(model.channels).to_csv(manifest, index=False)
    report = load_manifest(manifest, model.channels, allow_unknown_columns=allow_unknown_columns)
    print_report(report, atlas)
    if report.table_problems:  # its columns: every row is concerned, --skip-invalid cannot help
        console.print(
            "[red]fix the manifest's columns (--skip-invalid skips bad rows only; "
            "--allow-unknown-columns goes on without a column that looks misspelt)[/red]"
        )
        raise SystemExit(1)
    if not report.ok and not skip_invalid:
        console.print("[red]fix the manifest, or pass --skip-invalid to run the valid rows[/red]")
        raise SystemExit(1)
    return report


def run_request(request: RunRequest) -> RunOutcome:
    """Run (or resume) the request, with progress, signals and the summary printed."""
    out = request.pipeline.out
    where = request.cluster
    bar = ProgressBar(Path(out))

    def on_start(outcome: RunOutcome, plan: ResumePlan) -> None:
        console.print(f"{cluster_line(where)}; Dask dashboard: {outcome.dashboard}")
        if outcome.page:
            console.print(f"this run's page: {outcome.page} (metrics: /metrics)")
        if outcome.took_over_lock:
            gone = outcome.took_over_lock
            console.print(
                f"[yellow]took over a stale lock of pid {gone.get('pid')} on {gone.get('host')} "
                f"(started {gone.get('started')}): that run is gone[/yellow]",
                soft_wrap=True,
            )
        if plan.done or plan.redo:
            console.print(
                f"resuming: {len(plan.done)} scans done earlier are skipped, "
                f"{len(plan.todo)} to do ({len(plan.redo)} of them changed since)"
            )
        bar.start(len(plan.todo))

    try:
        with stop_on_signals():  # SIGTERM (scancel, walltime), SIGHUP: as Ctrl-C
            outcome = orchestrate.run_cohort(request, on_start=on_start, on_progress=bar.update)
    except (LockedError, RunRefused, ModelError) as error:  # ModelError: the model check
        console.print(f"[red]{error}[/red]", soft_wrap=True)
        raise SystemExit(1) from error
    except KeyboardInterrupt as interrupt:
        bar.stop()  # before the message, so that the bar does not redraw over it
        by = f" by {interrupt.name}" if isinstance(interrupt, Stopped) else ""
        console.print(
            f"[yellow]interrupted{by}: in-flight scans cancelled, finished ones saved; "
            "run the same command again to resume[/yellow]"
        )
        raise SystemExit(exit_code(interrupt)) from None
    except Exception as error:
        if not is_out_of_space(error):
            raise
        bar.stop()
        line = out_of_space_line(Path(out), len(request.report.scans), str(error))
        console.print(f"[red]{line}[/red]", soft_wrap=True)
        raise SystemExit(OUT_OF_SPACE_EXIT_CODE) from None
    finally:
        bar.stop()
    if len(outcome.results) <= PER_SCAN_LINES_UP_TO:
        print_scan_table(outcome.results)
    done = sum(r.ok for r in outcome.results)
    print_run_line(done, len(outcome.results) - done, outcome.seconds, outcome.done_before)
    print_status(Path(out))
    if outcome.stopped:
        console.print(f"[red]{outcome.stopped}[/red]", soft_wrap=True)
        console.print(
            "[red]the run was stopped: fix the cause, then run the same command again to "
            "resume (finished scans are kept)[/red]"
        )
        raise SystemExit(STOPPED_EXIT_CODE)
    return outcome


ATLAS = "atlas"  # --regions atlas: every scan's regions from the atlas


def atlas_for(regions_spec: str | None, fallback: bool | None) -> str:
    """Which scans get atlas regions: all (--regions atlas), the ones without a
    parcellation (--atlas-fallback or pingu.atlas-fallback), or none."""
    if regions_spec == ATLAS:
        return "all"
    on = bool(setting("atlas-fallback")) if fallback is None else fallback
    return "missing" if on else "none"


def cluster_line(where: ClusterRequest) -> str:
    """Where the run's workers are, in words."""
    if where.cluster == "local":
        line = f"{where.workers} local worker(s)"
        if where.cpu_workers:
            line += f" and {where.cpu_workers} CPU-only worker(s)"
        return line
    if where.is_batch:
        return f"{where.cluster} worker jobs (adaptive)"
    return f"scheduler {where.cluster}"


def labels_line(labels: ModelLabels) -> str:
    """What the run counts as PVS, which regions the model's labels give, and what it
    keeps apart: said before any scan runs, so a surprise costs nothing."""
    regions = dict(labels.regions)
    pvs = ", ".join(
        f"{name}" + (f" -> {regions[value]}" if value in regions else "")
        for name, value in labels.labels
        if value in labels.pvs
    )
    line = f"PVS labels: {pvs}"
    if labels.others:
        others = ", ".join(name for name, _ in labels.others)
        line += f"; other structures (kept apart, not PVS): {others}"
    return line


def out_of_space_line(out: Path, n_scans: int, failed_write: str = "") -> str:
    """The one line a full disk or quota ends a run with: what is kept, what to free,
    how to go on (the ledger is read, which needs no space). `failed_write` is the
    error (its stage and path), since a worker's own scratch space can be what filled."""
    kept = ledger.summarise_ledger(out).counts.get(ledger.OK, 0)
    return (
        f"stopped: no space left in {out} (its file system is full or over quota); "
        f"{kept:,} of {n_scans:,} scans are finished and kept; free space there "
        f"(`df -h {out}`), then run the same command again to resume"
        + (f" (the write that failed: {failed_write})" if failed_write else "")
    )


def print_job_script(kind: str, jobs: JobOptions) -> None:
    """--dry-run: the job script a worker job would run (nothing is submitted)."""
    if kind not in BATCH_SYSTEMS:
        raise click.UsageError("--dry-run shows a batch job script: use --cluster slurm or pbs")
    cluster = jobqueue_cluster(kind, jobs)
    try:
        click.echo(cluster.job_script())
    finally:
        cluster.close()
