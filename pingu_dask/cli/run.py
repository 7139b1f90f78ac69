"""`pingu-dask run` (a cohort through the model) and `pingu-dask demo` (on synthetic data)."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from pingu_dask import store
from pingu_dask.cli.common import (
    cluster_options,
    cluster_settings,
    console,
    print_evaluation,
    print_report,
    region_table,
    split,
)
from pingu_dask.cli.data import print_cohort
from pingu_dask.config import ClusterSettings, InferenceSettings, available_cores
from pingu_dask.manifest import load_manifest
from pingu_dask.model import ModelError, resolve_model
from pingu_dask.regions import RegionTable
from pingu_dask.synth import generate_cohort

MODEL_CHOICES = (
    "choose a model with --model: a trained nnU-Net v2 model folder "
    "(Trainer__Plans__configuration/ with dataset.json, plans.json, fold_N/), a zip made by "
    "nnUNetv2_export_model_to_zip, or 'demo' (the bundled demo model: it was trained on "
    "synthetic data and is for trying the tool, not for real scans)"
)


@click.command()
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
@cluster_options
@click.option(
    "--nifti/--no-nifti",
    default=True,
    show_default=True,
    help="Also write each mask as NIfTI in OUT/nifti (BIDS-derivatives names).",
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
    regions_spec: str | None,
    connectivity: str | None,
    min_cluster_voxels: int | None,
    min_cluster_mm3: float | None,
    exclude: str | None,
    nifti: bool,
) -> None:
    """Segment every scan of MANIFEST with an nnU-Net model on a local Dask cluster.

    Writes OUT/masks.zarr, OUT/tables/{regions,clusters,evaluation} (Parquet),
    OUT/run.json and, unless --no-nifti, OUT/nifti.
    """
    if model_spec is None:
        raise click.UsageError(MODEL_CHOICES)
    settings = InferenceSettings.from_config(
        folds=split(folds) if folds else None,
        checkpoint=checkpoint,
        tta=tta,
        step_size=step_size,
        device=device,
        torch_threads=torch_threads or max(1, available_cores() // workers),
    )
    clusters = cluster_settings(connectivity, min_cluster_voxels, min_cluster_mm3, exclude)
    records = run_cohort(
        manifest,
        out,
        model_spec,
        settings,
        workers,
        skip_invalid,
        clusters=clusters,
        regions=region_table(regions_spec),
        nifti=nifti,
    )
    raise SystemExit(0 if all(r["status"] == "ok" for r in records) else 1)


def run_cohort(
    manifest: Path,
    out: Path,
    model_spec: str,
    settings: InferenceSettings,
    workers: int,
    skip_invalid: bool = False,
    clusters: ClusterSettings | None = None,
    regions: RegionTable | None = None,
    nifti: bool = True,
) -> list[dict]:
    """Resolve the model, validate the manifest against its channels, run, print a summary."""
    from distributed import Client

    from pingu_dask.cluster import local_cluster
    from pingu_dask.runner import provenance, segment_cohort
    from pingu_dask.stages import Pipeline

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
    pipeline = Pipeline(
        model,
        settings,
        Path(out),
        clusters or ClusterSettings.from_config(),
        regions or region_table(None),
        write_nifti=nifti,
    )
    out.mkdir(parents=True, exist_ok=True)
    run_info = provenance(pipeline, manifest, len(report.scans))
    store.write_json(out / store.RUN_JSON, run_info)
    started = time.perf_counter()
    cluster = local_cluster(n_workers=workers, torch_threads=settings.torch_threads)
    with cluster, Client(cluster) as client:
        console.print(f"{workers} worker(s); Dask dashboard: {client.dashboard_link}")
        records = segment_cohort(client, report.scans, pipeline, on_record=_print_progress)
    run_info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_info["n_ok"] = sum(r["status"] == "ok" for r in records)
    store.write_json(out / store.RUN_JSON, run_info)
    _print_results(records, time.perf_counter() - started, out)
    evaluation = store.read_table(out, "evaluation")
    if len(evaluation):
        print_evaluation(evaluation, f"Evaluation against the reference masks ({out})")
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
        caption="PVS: clusters after the size filter; mm³: PVS volume; s: seconds per "
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
        f"{len(done)} of {len(records)} scans segmented in {seconds:.1f} s ({rate:.1f} scans/min)"
    )
    console.print(
        f"outputs: masks {out / store.MASKS}, tables {out / store.TABLES} "
        f"(regions, clusters, evaluation), provenance {out / store.RUN_JSON}"
    )


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default="demo_out")
@click.option("--n-scans", "-n", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=12345, show_default=True, type=int)
@click.option("--workers", "-w", default=1, show_default=True, type=click.IntRange(min=1))
def demo(out: Path, n_scans: int, seed: int, workers: int) -> None:
    """Make a small synthetic cohort in OUT/cohort and segment it with the demo model."""
    started = time.perf_counter()
    cohort = out / "cohort"
    records = generate_cohort(cohort, n_scans, seed=seed)
    print_cohort(cohort, records, time.perf_counter() - started)
    settings = InferenceSettings.from_config(
        tta=False, torch_threads=max(1, available_cores() // workers)
    )
    console.print("demo model, test-time augmentation off (CPU-friendly)")
    results = run_cohort(cohort / "manifest.csv", out, "demo", settings, workers)
    if not all(r["status"] == "ok" for r in results):
        raise SystemExit(1)
