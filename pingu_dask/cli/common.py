"""What the sub-commands share: the console, option groups, printing helpers."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import click
import pandas as pd
from rich.console import Console
from rich.table import Table

from pingu_dask.config import ClusterSettings
from pingu_dask.evaluate import summarise
from pingu_dask.manifest import ManifestReport
from pingu_dask.regions import (
    LABEL_GROUPS,
    RegionError,
    RegionTable,
    load_region_table,
    parse_labels,
)

console = Console(highlight=False)
SUMMARY_REGIONS = ("white_matter", "basal_ganglia", "whole_brain")
SHORT_REGION_NAMES = {"white_matter": "WM", "basal_ganglia": "BG", "whole_brain": "whole brain"}


def split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def option_group(*options: Callable) -> Callable[[Callable], Callable]:
    """A decorator applying several click options in the order given (shared option sets)."""

    def apply(function: Callable) -> Callable:
        for option in reversed(options):
            function = option(function)
        return function

    return apply


# --regions, --connectivity, --min-cluster-voxels, --min-cluster-mm3, --exclude
cluster_options = option_group(
    click.option(
        "--regions",
        "regions_spec",
        default=None,
        help="Region table: synthseg (default), aseg, or a JSON file "
        '({"regions": {"white_matter": [2, 41, "251-255"], ...}}).',
    ),
    click.option(
        "--connectivity",
        type=click.Choice(["6", "18", "26"]),
        default=None,
        help="Voxel connectivity of clusters (default 26).",
    ),
    click.option(
        "--min-cluster-voxels",
        type=click.IntRange(min=1),
        default=None,
        help="Drop clusters smaller than this (default 6: drop clusters of <= 5 voxels).",
    ),
    click.option(
        "--min-cluster-mm3",
        type=click.FloatRange(min=0),
        default=None,
        help="Also drop clusters below this volume in mm³ (default 0: off).",
    ),
    click.option(
        "--exclude",
        default=None,
        help=f"Parcellation labels removed from masks, e.g. '4,43' or {', '.join(LABEL_GROUPS)}.",
    ),
)


def cluster_settings(
    connectivity: str | None,
    min_cluster_voxels: int | None,
    min_cluster_mm3: float | None,
    exclude: str | None,
    base: dict | None = None,
) -> ClusterSettings:
    """ClusterSettings from the options, over `base` (e.g. a run's run.json) or the config."""
    overrides = dict(base or {})
    given = {
        "connectivity": int(connectivity) if connectivity else None,
        "min_voxels": min_cluster_voxels,
        "min_volume_mm3": min_cluster_mm3,
        "exclude_labels": parse_labels(split(exclude), "--exclude") if exclude else None,
    }
    overrides.update({k: v for k, v in given.items() if v is not None})
    try:
        return ClusterSettings.from_config(**overrides)
    except (RegionError, ValueError) as error:
        raise click.UsageError(str(error)) from error


def region_table(spec: str | None, default: str = "synthseg") -> RegionTable:
    try:
        return load_region_table(spec or default)
    except RegionError as error:
        raise click.UsageError(str(error)) from error


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


def print_evaluation(evaluation: pd.DataFrame, title: str) -> None:
    """The per-site summary of an evaluation table, for WM, BG and the whole brain."""
    present = set(evaluation["region"])
    print_evaluation_summary(
        summarise(evaluation, tuple(r for r in SUMMARY_REGIONS if r in present)), title
    )


def print_evaluation_summary(summary: pd.DataFrame, title: str) -> None:
    """The per-site table of evaluate.summarise: voxel Dice and cluster F1, mean (SD)."""
    regions = list(dict.fromkeys(summary.columns.get_level_values(0)[1:]))
    table = Table(
        title=title,
        caption="voxel Dice and cluster F1 (detection, symmetric): mean (SD) over scans; "
        "WM white matter, BG basal ganglia",
    )
    table.add_column("site", no_wrap=True)
    table.add_column("scans", justify="right")
    for region in regions:
        short = SHORT_REGION_NAMES.get(region, region)
        table.add_column(f"{short}\nvoxel", justify="right")
        table.add_column(f"{short}\ncluster", justify="right")
    for site, row in summary.iterrows():
        cells = [str(site), str(int(row[("n_scans", "", "")]))]
        for region in regions:
            for measure in ("voxel_dice", "cluster_f1"):
                mean, sd = row[(region, measure, "mean")], row[(region, measure, "std")]
                cells.append(_mean_sd(mean, sd))
        table.add_row(*cells, end_section=site == summary.index[-2] if len(summary) > 1 else False)
    console.print(table)


def _mean_sd(mean: float, sd: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.2f}" + ("" if sd is None or math.isnan(sd) else f" ({sd:.2f})")
