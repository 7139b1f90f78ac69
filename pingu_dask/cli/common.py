"""What the sub-commands share: the console, option groups, printing helpers."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import click
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pingu_dask.analysis.evaluate import count_agreement, reference_handling, summarise
from pingu_dask.analysis.regions import (
    HEADLINE_REGIONS,
    LABEL_GROUPS,
    RegionError,
    RegionTable,
    load_region_table,
    parse_labels,
)
from pingu_dask.config import PvsClusterRules, setting
from pingu_dask.inputs.manifest import ManifestReport, region_sources_note, whole_brain_only_note

console = Console(highlight=False)
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


# --regions, --connectivity, --min-cluster-voxels, --min-cluster-mm3, --exclude,
# --max-outside-brain
pvs_cluster_options = option_group(
    click.option(
        "--regions",
        "regions_spec",
        default=None,
        help="Region table: synthseg (default; = aseg), pvs (the same labels per "
        "hemisphere, plus ventral DC; = synthseg-pvs, aseg-pvs), or a JSON file "
        '({"regions": {"white_matter": [2, 41, "251-255"], ...}}). `run` also takes '
        "atlas: every scan's regions from the MNI152 atlas registered to its T1w (the "
        "synthseg table on the atlas's labels; a parcellation column is not used).",
    ),
    click.option(
        "--connectivity",
        type=click.Choice(["6", "18", "26"]),
        default=None,
        help=f"Voxel connectivity of clusters (default {setting('connectivity')}).",
    ),
    click.option(
        "--min-cluster-voxels",
        type=click.IntRange(min=1),
        default=None,
        help=f"Drop clusters smaller than this (default {setting('min-cluster-voxels')}).",
    ),
    click.option(
        "--min-cluster-mm3",
        type=click.FloatRange(min=0),
        default=None,
        help=f"Also drop clusters below this volume in mm³ (default {setting('min-cluster-mm3')}"
        ", 0: off).",
    ),
    click.option(
        "--exclude",
        default=None,
        help=f"Parcellation labels removed from masks, e.g. '4,43' or {', '.join(LABEL_GROUPS)}.",
    ),
    click.option(
        "--max-outside-brain",
        type=click.FloatRange(min=0, max=1),
        default=None,
        help="With a parcellation, drop clusters with more than this share of their "
        f"voxels outside the brain (label 0); default {setting('max-outside-brain')} (SHiVAi's "
        "rule: 0.25), 1: off.",
    ),
)


# Options `run` and `train` (its evaluation) share: the inference settings, the cluster.
tta_option = click.option(
    "--tta/--no-tta",
    default=None,
    help=f"Mirroring test-time augmentation (default {'on' if setting('tta') else 'off'}, "
    "nnU-Net's: on; ~8x slower).",
)
step_size_option = click.option(
    "--step-size",
    type=click.FloatRange(0.05, 1.0),
    default=None,
    help=f"Sliding-window step as a fraction of the patch (default {setting('step-size')}, "
    "nnU-Net's).",
)
device_option = click.option(
    "--device", default=None, help=f"auto, cpu, cuda or cuda:N (default {setting('device')})."
)
cluster_option = click.option(
    "--cluster",
    default="local",
    show_default=True,
    help="local (worker processes on this machine), slurm or pbs (worker jobs through "
    "dask-jobqueue), or the address of a running scheduler, tcp://HOST:PORT.",
)
retries_option = click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=None,
    help=f"Retries after a worker death, out of memory or I/O error (default "
    f"{setting('retries')}). Input errors are never retried.",
)
dashboard_option = click.option(
    "--dashboard-address",
    default=None,
    help="Where the scheduler's web server (Dask dashboard, the run page /pingu, "
    f"/metrics) listens (default {setting('dashboard-address')}: this machine only; reach it "
    "through an SSH tunnel). ':8787' listens on every interface, without any authentication.",
)


def workers_option(what: str) -> Callable:
    """--workers: local worker processes, one inference slot each (`what` they do)."""
    return click.option(
        "--workers", "-w", default=1, show_default=True, type=click.IntRange(min=1), help=what
    )


allow_unknown_columns_option = click.option(
    "--allow-unknown-columns",
    is_flag=True,
    help="Go on when a manifest column looks like a misspelt known one (e.g. "
    "'parcelation'): it is ignored, with a note, instead of failing validation.",
)


def pvs_cluster_rules(
    connectivity: str | None,
    min_cluster_voxels: int | None,
    min_cluster_mm3: float | None,
    exclude: str | None,
    base: dict | None = None,
    max_outside_brain: float | None = None,
    filter_reference: bool | None = None,
) -> PvsClusterRules:
    """PvsClusterRules from the options, over `base` (e.g. a run's run.json) or the config."""
    overrides = dict(base or {})
    given = {
        "connectivity": int(connectivity) if connectivity else None,
        "min_voxels": min_cluster_voxels,
        "min_volume_mm3": min_cluster_mm3,
        "exclude_labels": parse_labels(split(exclude), "--exclude") if exclude else None,
        "max_outside_brain": max_outside_brain,
        "filter_reference": filter_reference,
    }
    overrides.update({k: v for k, v in given.items() if v is not None})
    try:
        return PvsClusterRules.from_config(**overrides)
    except (RegionError, ValueError) as error:
        raise click.UsageError(str(error)) from error


def region_table(spec: str | None, default: str = "synthseg") -> RegionTable:
    try:
        return load_region_table(spec or default)
    except RegionError as error:
        raise click.UsageError(str(error)) from error


def print_report(report: ManifestReport, atlas_for: str = "none") -> None:
    """Summary line, notes and a table of problems for a validated manifest.

    `atlas_for`: which scans the run gives atlas regions ("none", "missing", "all"),
    so that scans without a parcellation are not called whole-brain-only when the
    atlas serves them."""
    sites = Counter(scan.site or "-" for scan in report.scans)
    console.print(
        f"{report.path}: {report.n_rows} rows, {len(report.scans)} valid scans, "
        f"{len(report.problems)} problem(s); channels: {', '.join(report.channels)}"
    )
    if report.scans and any(site != "-" for site in sites):
        console.print("sites: " + ", ".join(f"{s} ({n})" for s, n in sorted(sites.items())))
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)
    without = sum(scan.parcellation is None for scan in report.scans)
    if without and atlas_for == "none":
        console.print(f"[yellow]{whole_brain_only_note(without)}[/yellow]")
    elif without and atlas_for == "missing":
        scans = "scan" if without == 1 else "scans"
        console.print(f"{without} {scans} without a parcellation: regions from the atlas")
    if report.ok:
        console.print("[green]all rows valid[/green]")
        return
    # One plain line per problem: readable, and easy to grep or paste into an issue.
    for problem in report.problems:
        console.print(f"[red]problem[/red] {problem}", soft_wrap=True)


def print_region_sources(run_info: dict | None) -> None:
    """`status`: how many scans of the run's manifest had no parcellation (from run.json)."""
    note = region_sources_note((run_info or {}).get("region_sources"))
    if note:
        console.print(f"[yellow]{note}[/yellow]", soft_wrap=True)


def print_evaluation(evaluation: pd.DataFrame, title: str, agreement: bool = False) -> None:
    """The per-site summary of an evaluation table, for WM, BG and the whole brain;
    with `agreement`, also how well PVS counts and volumes agree (count_agreement)."""
    present = set(evaluation["region"])
    regions = tuple(r for r in HEADLINE_REGIONS if r in present)
    handling = reference_handling(evaluation)
    print_evaluation_summary(summarise(evaluation, regions), title, handling)
    if agreement:
        print_count_agreement(count_agreement(evaluation, regions), handling)


def print_evaluation_summary(summary: pd.DataFrame, title: str, handling: str = "") -> None:
    """The per-site table of evaluate.summarise: voxel Dice and cluster F1, mean (SD).

    `handling` (evaluate.reference_handling) goes into the caption: a Dice against a
    filtered reference is not comparable with published figures.
    """
    regions = list(dict.fromkeys(summary.columns.get_level_values(0)[1:]))
    table = Table(
        title=title,
        caption="voxel Dice and cluster F1 (detection, symmetric): mean (SD) over scans; "
        "WM white matter, BG basal ganglia" + (f"; {handling}" if handling else ""),
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


AGREEMENT_TITLES = {"clusters": "PVS count", "volume_mm3": "PVS volume (mm³)"}


def print_count_agreement(agreement: pd.DataFrame, handling: str = "") -> None:
    """One table per measure (count, volume) of evaluate.count_agreement: per site and
    region, the means, Lin's CCC, Pearson r and Bland-Altman bias with 95 % limits."""
    for measure, rows in agreement.groupby("measure", sort=False):
        table = Table(
            title=f"Agreement of {AGREEMENT_TITLES.get(measure, measure)} per scan with the "
            "reference",
            caption=escape(
                "CCC: Lin's concordance (population moments); r: Pearson; bias: mean of "
                "predicted - reference; limits: bias ± 1.96 SD of the differences; "
                "-: undefined (fewer than 2 scans, or no spread)"
                + (f"; {handling}" if handling else "")
            ),
            pad_edge=False,
        )
        table.add_column("site", no_wrap=True)
        table.add_column("region", no_wrap=True)
        for name in ("n", "pred", "ref", "CCC", "r", "bias", "95% limits"):
            table.add_column(name, justify="right", no_wrap=True)
        sites = rows["site"].tolist()
        for index, row in enumerate(rows.itertuples()):
            first_of_site = index == 0 or sites[index - 1] != row.site
            last_of_site = index + 1 < len(sites) and sites[index + 1] != row.site
            cells = _agreement_cells(row)
            cells[0] = cells[0] if first_of_site else ""
            table.add_row(*cells, end_section=last_of_site)
        console.print(table)


def _agreement_cells(row) -> list[str]:
    """The printed cells of one count_agreement row (volumes to the mm³)."""
    digits = 0 if row.measure == "volume_mm3" else 1
    limits = (
        "-"
        if math.isnan(row.loa_lower)
        else f"{row.loa_lower:.{digits}f}, {row.loa_upper:.{digits}f}"
    )
    return [
        escape(str(row.site)),
        escape(SHORT_REGION_NAMES.get(row.region, row.region)),
        str(row.n),
        _number(row.mean_predicted, digits),
        _number(row.mean_reference, digits),
        _number(row.ccc, 2),
        _number(row.pearson_r, 2),
        _number(row.bias, digits),
        limits,
    ]


def _number(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
