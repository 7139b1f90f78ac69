"""`pingu-dask report PATH`: the HTML report of a run (OUT) or of a training (MODEL_DIR)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from pingu_dask.cli.common import console


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(path: Path) -> None:
    """Write the HTML report of PATH. Opens without the internet.

    A run's OUT: OUT/report/index.html: provenance, totals and failures, PVS
    distributions per region and site with outliers flagged, evaluation, throughput
    and the QC pictures (runs with --qc), outliers first.

    A training's MODEL_DIR (it holds training.json): MODEL_DIR/evaluation/report.html:
    what was trained, the cases left out and why, each fold's attempts and learning
    curves, and the out-of-fold evaluation (before and after, with --init)."""
    from pingu_dask.output.training import TRAINING_JSON

    if (path / TRAINING_JSON).is_file():
        print_training_report_path(path)
    else:
        print_report_path(path)


def print_report_path(out: Path) -> Path:
    """Build the run's report and say where it is (also the end of `pingu-dask demo`)."""
    from pingu_dask.report.build import build_report

    return _built(build_report, out, "report")


def print_training_report_path(model_dir: Path) -> Path:
    """Build a training's report (MODEL_DIR/evaluation/report.html) and say where it is."""
    from pingu_dask.report.training import build_training_report

    return _built(build_training_report, model_dir, "training report")


def _built(build: Callable[[Path], Path], path: Path, what: str) -> Path:
    from pingu_dask.report.build import ReportError

    try:
        page = build(path)
    except ReportError as error:
        console.print(f"[red]{error}[/red]")
        raise SystemExit(1) from error
    console.print(f"{what}: {page.resolve()}", soft_wrap=True)
    return page
