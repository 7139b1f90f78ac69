"""The `pingu-dask` command line.

Each sub-command is a thin layer: it parses options, calls one library function and
prints the outcome with rich. Exit codes: 0 success, 1 the work found problems (an
invalid manifest, failed scans), 2 wrong usage (click's own convention).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from pingu_dask import __version__
from pingu_dask.config import InferenceSettings, available_cores
from pingu_dask.manifest import DEFAULT_CHANNELS, ManifestReport, load_manifest
from pingu_dask.model import ModelError, resolve_model
from pingu_dask.synth import DEFAULT_SITES, SITES, ScanRecord, generate_cohort

console = Console(highlight=False)


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pingu-dask")
def main() -> None:
    """Segment perivascular spaces in whole MRI cohorts with nnU-Net on Dask."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--n-scans",
    "-n",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Number of scans (one subject each).",
)
@click.option(
    "--sites",
    default=",".join(DEFAULT_SITES),
    show_default=True,
    help=f"Comma-separated site presets, used in turn. Known: {', '.join(SITES)}.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option("--t2w", is_flag=True, help="Also write a T2-weighted image per scan.")
@click.option(
    "--jobs",
    "-j",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Processes to generate scans in parallel.",
)
def synth(out: Path, n_scans: int, sites: str, seed: int, t2w: bool, jobs: int) -> None:
    """Write a synthetic multi-site cohort with ground-truth PVS masks to OUT."""
    started = time.perf_counter()
    try:
        records = generate_cohort(out, n_scans, sites=_split(sites), seed=seed, t2w=t2w, jobs=jobs)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    _print_cohort(out, records, time.perf_counter() - started)


def _print_cohort(out: Path, records: list[ScanRecord], seconds: float) -> None:
    table = Table(title=f"Synthetic cohort in {out}")
    for heading in ("site", "scans", "voxel size (mm)", "grid", "visible PVS (WM / BG, mean)"):
        table.add_column(heading)
    for site, group in _group_by_site(records).items():
        first = group[0]
        table.add_row(
            site,
            str(len(group)),
            " x ".join(f"{s:g}" for s in first.spacing),
            " x ".join(map(str, first.shape)),
            f"{sum(r.n_pvs_wm for r in group) / len(group):.0f} / "
            f"{sum(r.n_pvs_bg for r in group) / len(group):.0f}",
        )
    console.print(table)
    console.print(
        f"{len(records)} scans written in {seconds:.1f} s; manifest: {Path(out) / 'manifest.csv'}"
    )


def _group_by_site(records: list[ScanRecord]) -> dict[str, list[ScanRecord]]:
    groups: dict[str, list[ScanRecord]] = {}
    for record in records:
        groups.setdefault(record.site, []).append(record)
    return groups


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--channels",
    default=",".join(DEFAULT_CHANNELS),
    show_default=True,
    help="Comma-separated input channel columns the model needs, in order.",
)
@click.option(
    "--check-files/--no-check-files",
    default=True,
    show_default=True,
    help="Open every referenced image header (exists, readable NIfTI, 3D).",
)
@click.option(
    "--jobs",
    "-j",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Files checked in parallel (helps on network file systems).",
)
def validate(manifest: Path, channels: str, check_files: bool, jobs: int) -> None:
    """Check a manifest (CSV, TSV or Parquet) and report every problem with its row."""
    try:
        report = load_manifest(manifest, _split(channels), check_files=check_files, jobs=jobs)
    except (OSError, ValueError) as error:
        console.print(f"[red]cannot read manifest:[/red] {error}")
        raise SystemExit(1) from error
    print_report(report)
    raise SystemExit(0 if report.ok else 1)


def print_report(report: ManifestReport) -> None:
    """Summary line, notes and a table of problems for a validated manifest."""
    sites = Counter(scan.site or "-" for scan in report.scans)
    console.print(
        f"{report.path}: {report.n_rows} rows, {len(report.scans)} valid scans, "
        f"{len(report.problems)} problem(s); channels: {', '.join(report.channels)}"
    )
    if report.scans and any(site != "-" for site in sites):
        console.print("sites: " + ", ".join(f"{s} ({n})" for s, n in sorted(sites.items())))
    for note in report.notes:
        console.print(f"note: {note}")
    if report.ok:
        console.print("[green]all rows valid[/green]")
        return
    # One plain line per problem: readable, and easy to grep or paste into an issue.
    for problem in report.problems:
        console.print(f"[red]problem[/red] {problem}", soft_wrap=True)


MODEL_CHOICES = (
    "choose a model with --model: a trained nnU-Net v2 model folder "
    "(Trainer__Plans__configuration/ with dataset.json, plans.json, fold_N/), a zip made by "
    "nnUNetv2_export_model_to_zip, or 'demo' (the bundled demo model: it was trained on "
    "synthetic data and is for trying the tool, not for real scans)"
)


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
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
    "--tta/--no-tta",
    default=None,
    help="Mirroring test-time augmentation (nnU-Net default: on; ~8x slower).",
)
@click.option(
    "--step-size",
    type=click.FloatRange(0.05, 1.0),
    default=None,
    help="Sliding-window step as a fraction of the patch (nnU-Net default 0.5).",
)
@click.option("--device", default=None, help="auto (default), cpu, cuda or cuda:N.")
@click.option(
    "--workers",
    "-w",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Local worker processes (one inference slot each).",
)
@click.option(
    "--torch-threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads per worker (default: cores / workers).",
)
@click.option(
    "--skip-invalid", is_flag=True, help="Run the valid rows of a manifest with problems."
)
def run(
    manifest: Path,
    out: Path,
    model_spec: str | None,
    folds: str | None,
    checkpoint: str | None,
    tta: bool | None,
    step_size: float | None,
    device: str | None,
    workers: int,
    torch_threads: int | None,
    skip_invalid: bool,
) -> None:
    """Segment every scan of MANIFEST with an nnU-Net model on a local Dask cluster."""
    if model_spec is None:
        raise click.UsageError(MODEL_CHOICES)
    settings = InferenceSettings.from_config(
        folds=_split(folds) if folds else None,
        checkpoint=checkpoint,
        tta=tta,
        step_size=step_size,
        device=device,
        torch_threads=torch_threads or max(1, available_cores() // workers),
    )
    records = run_cohort(manifest, out, model_spec, settings, workers, skip_invalid)
    raise SystemExit(0 if all(r["status"] == "ok" for r in records) else 1)


def run_cohort(
    manifest: Path,
    out: Path,
    model_spec: str,
    settings: InferenceSettings,
    workers: int,
    skip_invalid: bool = False,
) -> list[dict]:
    """Resolve the model, validate the manifest against its channels, run, print a summary."""
    from distributed import Client

    from pingu_dask.cluster import local_cluster
    from pingu_dask.runner import segment_cohort

    try:
        model = resolve_model(model_spec, settings.folds, settings.checkpoint)
    except ModelError as error:
        raise click.UsageError(str(error)) from error
    console.print(
        f"model {model.folder} (folds {', '.join(model.folds)}, "
        f"channels {', '.join(model.channels)}, fingerprint {model.fingerprint[:12]})"
    )
    report = load_manifest(manifest, model.channels)
    print_report(report)
    if not report.ok and not skip_invalid:
        console.print("[red]fix the manifest, or pass --skip-invalid to run the valid rows[/red]")
        raise SystemExit(1)
    started = time.perf_counter()
    cluster = local_cluster(n_workers=workers, torch_threads=settings.torch_threads)
    with cluster, Client(cluster) as client:
        console.print(f"{workers} worker(s); Dask dashboard: {client.dashboard_link}")
        records = segment_cohort(
            client, report.scans, model, settings, out, on_record=_print_progress
        )
    _print_results(records, time.perf_counter() - started, out)
    return records


def _print_progress(record: dict) -> None:
    if record["status"] == "ok":
        console.print(
            f"  {record['scan_id']}: {record['n_clusters']} PVS clusters, "
            f"{record['volume_mm3']:.0f} mm³"
        )
    else:
        console.print(
            f"  [red]{record['scan_id']} failed[/red] ({record['error_type']}): "
            f"{record['message']}",
            soft_wrap=True,
        )


def _print_results(records: list[dict], seconds: float, out: Path) -> None:
    done = [r for r in records if r["status"] == "ok"]
    table = Table(
        title="Segmented scans",
        caption="PVS: clusters (26-connected) in the mask; mm³: PVS volume; s: seconds per "
        "stage; truth / Dice / cluster F1: against the manifest's reference mask",
    )
    with_reference = any("voxel_dice" in r for r in done)
    headings = ["scan", "PVS", "mm³", "s: pre/pred/fin"]
    if with_reference:
        headings += ["truth PVS", "Dice", "cluster F1"]
    for heading in headings:
        table.add_column(heading)
    for r in sorted(done, key=lambda r: r["scan_id"]):
        s = r["seconds"]
        row = [
            r["scan_id"],
            str(r["n_clusters"]),
            f"{r['volume_mm3']:.0f}",
            f"{s['preprocess']:.1f} / {s['predict']:.1f} / {s['finish']:.1f}",
        ]
        if with_reference:
            row += [
                str(r.get("reference_clusters", "")),
                f"{r.get('voxel_dice', float('nan')):.3f}",
                f"{r.get('cluster_f1', float('nan')):.3f}",
            ]
        table.add_row(*row)
    console.print(table)
    rate = len(done) / seconds * 60 if seconds else 0.0
    console.print(
        f"{len(done)} of {len(records)} scans segmented in {seconds:.1f} s "
        f"({rate:.1f} scans/min); masks in {out / 'nifti'}"
    )


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default="demo_out")
@click.option("--n-scans", "-n", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=12345, show_default=True, type=int)
@click.option("--workers", "-w", default=1, show_default=True, type=click.IntRange(min=1))
def demo(out: Path, n_scans: int, seed: int, workers: int) -> None:
    """Make a small synthetic cohort in OUT/cohort and segment it with the demo model."""
    started = time.perf_counter()
    cohort = out / "cohort"
    records = generate_cohort(cohort, n_scans, seed=seed)
    _print_cohort(cohort, records, time.perf_counter() - started)
    settings = InferenceSettings.from_config(
        tta=False, torch_threads=max(1, available_cores() // workers)
    )
    console.print("demo model, test-time augmentation off (CPU-friendly)")
    results = run_cohort(cohort / "manifest.csv", out, "demo", settings, workers)
    if not all(r["status"] == "ok" for r in results):
        raise SystemExit(1)
