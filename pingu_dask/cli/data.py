"""Commands about input data: `synth` (synthetic cohorts), `validate` (manifests) and
`manifest` (a BIDS dataset as a manifest)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich.table import Table

from pingu_dask.cli.common import allow_unknown_columns_option, console, print_report, split
from pingu_dask.inputs import bids
from pingu_dask.inputs.manifest import DEFAULT_CHANNELS, load_manifest
from pingu_dask.synth.cohort import DEFAULT_SITES, SITES, ScanRecord, generate_cohort


@click.command()
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
        records = generate_cohort(out, n_scans, sites=split(sites), seed=seed, t2w=t2w, jobs=jobs)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    print_cohort(out, records, time.perf_counter() - started)


def print_cohort(out: Path, records: list[ScanRecord], seconds: float) -> None:
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


@click.command()
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
@allow_unknown_columns_option
def validate(
    manifest: Path, channels: str, check_files: bool, jobs: int, allow_unknown_columns: bool
) -> None:
    """Check a manifest (CSV, TSV or Parquet) and report every problem with its row."""
    try:
        report = load_manifest(
            manifest,
            split(channels),
            check_files=check_files,
            jobs=jobs,
            allow_unknown_columns=allow_unknown_columns,
        )
    except (OSError, ValueError) as error:
        console.print(f"[red]cannot read manifest:[/red] {error}")
        raise SystemExit(1) from error
    print_report(report)
    raise SystemExit(0 if report.ok else 1)


@click.command()
@click.argument("bids_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--channels",
    default=",".join(DEFAULT_CHANNELS),
    show_default=True,
    help=f"Comma-separated channels the model needs, in order (known: {', '.join(bids.SUFFIXES)}).",
)
@click.option(
    "--out",
    "-o",
    "target",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the manifest here (CSV) instead of to standard output.",
)
def manifest(bids_dir: Path, channels: str, target: Path | None) -> None:
    """Write a manifest for the BIDS dataset BIDS_DIR: one scan per T1w image (every
    session and run), the other channels, SynthSeg/FreeSurfer parcellations from
    derivatives/ and sites from participants.tsv. What cannot be used is listed on
    standard error (exit code 1 if anything), the rest is written."""
    found = discover_bids(bids_dir, tuple(split(channels)))
    table = found.manifest(tuple(split(channels)))
    if target is None:
        table.to_csv(sys.stdout, index=False)
    else:
        table.to_csv(target, index=False)
        console.print(f"{len(table)} scans written to {target}")
    raise SystemExit(1 if found.problems else 0)


def discover_bids(bids_dir: Path, channels: tuple[str, ...]) -> bids.Discovery:
    """bids.discover, with its problems printed to standard error (none is fatal)."""
    try:
        found = bids.discover(bids_dir, channels)
    except bids.BidsError as error:
        raise click.UsageError(str(error)) from error
    for problem in found.problems:
        click.echo(f"not used: {problem}", err=True)
    summary = f"{bids_dir}: {len(found.rows)} scans found, {len(found.problems)} problem(s)"
    click.echo(summary, err=True)
    if found.without_parcellation:
        click.echo(
            f"{found.without_parcellation} of {len(found.rows)} scans have no parcellation "
            "(no *_dseg found): whole-brain figures only",
            err=True,
        )
    return found
