"""`pingu-dask export OUT`: one CSV, TSV or Parquet file for R, SPSS, Stata and Excel."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from pingu_dask.cli.common import console
from pingu_dask.output import export as exporting

HELP = f"""Write OUT's results as one table a statistician opens.

Every scan of the latest run's manifest gets a row (wide) or rows (long), failed,
invalid and not yet run ones included, with status ({", ".join(exporting.STATUSES)}),
reason and flags. Rounded: {exporting.PRECISION}. UTF-8, a header row, comma (csv)
or tab (tsv) separated.
"""


@click.command(help=HELP)
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--layout",
    "layout_name",
    type=click.Choice(exporting.LAYOUTS),
    default="wide",
    show_default=True,
    help="wide: one row per manifest scan, columns <region>_<measure>; long: one row per "
    "scan x region (every region for every scan, empty measures where not measured).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(tuple(exporting.FORMATS)),
    default=None,
    help="csv, tsv or parquet (default: from --out's extension, else csv).",
)
@click.option(
    "--out",
    "target",
    default=None,
    metavar="FILE",
    help="Where to write (default OUT/export/pvs_<layout>.<format>); '-' writes csv or tsv "
    "to standard output.",
)
def export(out: Path, layout_name: str, fmt: str | None, target: str | None) -> None:
    """Write OUT's results as one CSV, TSV or Parquet file (help: HELP)."""
    try:
        fmt = exporting.format_of(target, fmt)
        table = exporting.export_table(out, layout_name)
        path = target or exporting.default_path(out, layout_name, fmt)
        written = exporting.write_export(table, path, fmt)
    except exporting.ExportError as error:
        Console(stderr=True, highlight=False).print(
            f"[red]{escape(str(error))}[/red]", soft_wrap=True
        )
        raise SystemExit(1) from error
    per_scan = table["region"].nunique() if "region" in table else 1  # long: every region
    statuses = table["status"].value_counts() // per_scan
    counts = ", ".join(f"{statuses[s]} {s}" for s in exporting.STATUSES if s in statuses)
    scans = int(statuses.sum())
    summary = f"{layout_name} table: {len(table)} rows, {scans} scans ({counts})"
    if written is None:  # the table went to standard output: say the rest on stderr
        Console(stderr=True, highlight=False).print(summary, soft_wrap=True)
        return
    console.print(f"{summary}\nwrote {escape(str(written.resolve()))}", soft_wrap=True)
