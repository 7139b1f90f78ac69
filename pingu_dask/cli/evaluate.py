"""`pingu-dask evaluate`: voxel Dice and cluster F1 of stored masks against references."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click
import pyarrow as pa

from pingu_dask.analysis.regions import RegionTable
from pingu_dask.cli.common import (
    console,
    print_evaluation,
    print_report,
    pvs_cluster_options,
    pvs_cluster_rules,
    region_table,
)
from pingu_dask.inputs.manifest import Scan, load_manifest
from pingu_dask.output import layout, masks, parts, tables
from pingu_dask.output.lock import LockedError, OutputLock
from pingu_dask.run.settings import lock_times
from pingu_dask.run.signals import Stopped, exit_code, stop_on_signals


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--manifest",
    "-m",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Manifest with a `reference` column (and `parcellation` for regions).",
)
@click.option(
    "--workers", "-w", default=2, show_default=True, type=click.IntRange(min=1), help="Processes."
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the per scan x region table to this Parquet file.",
)
@click.option(
    "--filter-reference/--reference-as-given",
    default=None,
    help="Put the reference masks through the size filter and exclusions too (inflates "
    "Dice: the rater's small PVS no longer count). Default: as given (pingu.filter-reference"
    " in Dask's config; for a run's OUT, the run's own choice).",
)
@pvs_cluster_options
def evaluate(
    source: Path,
    manifest: Path,
    workers: int,
    save: Path | None,
    filter_reference: bool | None,
    regions_spec: str | None,
    connectivity: str | None,
    min_cluster_voxels: int | None,
    min_cluster_mm3: float | None,
    exclude: str | None,
    max_outside_brain: float | None,
) -> None:
    """Evaluate the masks in SOURCE against the manifest's reference masks.

    SOURCE is a run's output directory (masks from masks.zarr; results replace
    OUT/tables/evaluation; the run's cluster settings are the default) or a folder of
    NIfTI masks named <scan_id>_desc-pvs_mask.nii.gz, sub-X[_ses-Y]_desc-pvs_mask.nii.gz
    or <scan_id>.nii.gz (nnUNetv2_predict's names). One row per scan x region: voxel Dice
    and cluster precision / recall / F1. The masks go through the size filter and
    exclusions; the references are compared as given unless --filter-reference. Printed:
    the per-site summary, and the agreement of PVS counts and volumes per scan (Lin's
    CCC, Pearson r, Bland-Altman bias and limits) per site and region.
    """
    is_run = (source / layout.MASKS).is_dir()
    with _writing_into(source, is_run):
        run_info = layout.read_run_json(source) if is_run else None
        base = dict(run_info["clusters"]) if run_info else None
        settings = pvs_cluster_rules(
            connectivity,
            min_cluster_voxels,
            min_cluster_mm3,
            exclude,
            base,
            max_outside_brain=max_outside_brain,
            filter_reference=filter_reference,
        )
        if run_info and regions_spec is None:  # the run's own table
            table = RegionTable.from_mapping(
                run_info["regions"]["table"], run_info["regions"]["regions"]
            )
        else:
            table = region_table(regions_spec)
        report = load_manifest(manifest, channels=())
        if not report.ok:
            print_report(report)
        scans = [scan for scan in report.scans if scan.reference is not None]
        if not scans:
            raise click.UsageError(
                f"{manifest}: no scan has a `reference` mask to evaluate against"
            )
        sources, missing = _mask_sources(source, is_run, scans)
        for scan_id in missing:
            console.print(f"[yellow]no mask for scan {scan_id!r} in {source}[/yellow]")
        rows, failures = _evaluate_on_dask(sources, settings, table, workers)
        for scan_id, message in failures:
            console.print(f"[red]scan {scan_id!r}:[/red] {message}", soft_wrap=True)
        if not rows:
            raise SystemExit(1)
        evaluation = pa.concat_tables(rows)
        if is_run:
            tables.replace_table(source, "evaluation", evaluation)
            console.print(f"evaluation table: {source / parts.TABLES / 'evaluation'}")
        if save:
            import pyarrow.parquet as pq

            pq.write_table(evaluation, save)
            console.print(f"evaluation table: {save}")
        print_evaluation(
            evaluation.to_pandas(), f"Evaluation of {source} ({len(rows)} scans)", agreement=True
        )
        raise SystemExit(0 if not failures and not missing else 1)


@contextmanager
def _writing_into(source: Path, is_run: bool) -> Iterator[None]:
    """Hold a run's OUT/.lock while evaluating it, since the result replaces
    OUT/tables/evaluation: a run writing there meanwhile would lose its parts. Exits 1
    saying who holds it; SIGTERM / SIGHUP / Ctrl-C release it and exit 128 + signum."""
    with ExitStack() as held:
        if is_run:
            try:
                held.enter_context(OutputLock(source, lock_times()))
            except LockedError as error:
                console.print(f"[red]cannot evaluate now: {error}[/red]", soft_wrap=True)
                raise SystemExit(1) from error
        try:
            with stop_on_signals():
                yield
        except KeyboardInterrupt as interrupt:
            by = f" by {interrupt.name}" if isinstance(interrupt, Stopped) else ""
            console.print(f"[yellow]interrupted{by}: the evaluation was stopped[/yellow]")
            raise SystemExit(exit_code(interrupt)) from None


def _mask_sources(
    source: Path, is_run: bool, scans: list[Scan]
) -> tuple[list[tuple[Scan, Path]], list[str]]:
    """(scan, where its mask is) for every scan that has one; the ids of those without."""
    found, missing = [], []
    stored = set(masks.stored_scan_ids(source)) if is_run else set()
    names = layout.nifti_names(scans)
    for scan in scans:
        if is_run:
            if scan.scan_id in stored:
                found.append((scan, source))
            else:
                missing.append(scan.scan_id)
            continue
        candidates = [
            source / f"{scan.scan_id}_desc-pvs_mask.nii.gz",
            source / names[scan.scan_id],  # BIDS-derivatives layout (sub-X/[ses-Y/]anat/)
            source / Path(names[scan.scan_id]).name,  # the same names, all in one folder
            source / f"{scan.scan_id}.nii.gz",
        ]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(scan.scan_id)
        else:
            found.append((scan, path))
    return found, missing


def _evaluate_on_dask(sources, settings, table, workers: int):
    """Evaluate each (scan, mask) on a LocalCluster, a bounded window at a time."""
    from distributed import Client, as_completed

    from pingu_dask.run.evaluation import evaluate_stored
    from pingu_dask.run.local import local_cluster

    rows: list[pa.Table] = []
    failures: list[tuple[str, str]] = []
    window = 4 * workers
    pending = iter(enumerate(sources))
    cluster = local_cluster(n_workers=workers, threads_per_worker=1)
    with cluster, Client(cluster) as client:
        in_flight = as_completed()
        scan_of = {}

        def submit_next() -> None:
            for index, (scan, path) in pending:
                future = client.submit(
                    evaluate_stored, path, scan, settings, table, key=("evaluate", index)
                )
                scan_of[future.key] = scan
                in_flight.add(future)
                return

        for _ in range(window):
            submit_next()
        for future in in_flight:
            scan = scan_of.pop(future.key)
            try:
                rows.append(future.result())
            except Exception as error:
                failures.append((scan.scan_id, f"{type(error).__name__}: {error}"))
            future.release()
            submit_next()
    return rows, failures
