"""`pingu-dask report OUT`: the run's HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from pingu_dask.cli.common import console


@click.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(out: Path) -> None:
    """Write OUT/report/index.html: provenance, totals and failures, PVS distributions
    per region and site with outliers flagged, evaluation, throughput and the QC
    pictures (runs with --qc), outliers first. Opens without the internet."""
    print_report_path(out)


def print_report_path(out: Path) -> Path:
    """Build the report and say where it is (also the end of `pingu-dask demo`)."""
    from pingu_dask.report.build import ReportError, build_report

    try:
        index = build_report(out)
    except ReportError as error:
        console.print(f"[red]{error}[/red]")
        raise SystemExit(1) from error
    console.print(f"report: {index.resolve()}", soft_wrap=True)
    return index
