"""`pingu-dask demo`: a small synthetic cohort segmented with the bundled model, then the report."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pingu_dask.cli.common import console
from pingu_dask.cli.data import print_cohort
from pingu_dask.cli.report import print_report_path
from pingu_dask.cli.run import run
from pingu_dask.synth.cohort import generate_cohort


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default="demo_out")
@click.option("--n-scans", "-n", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=12345, show_default=True, type=int)
@click.option("--workers", "-w", default=1, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def demo(context: click.Context, out: Path, n_scans: int, seed: int, workers: int) -> None:
    """Make a small synthetic cohort in OUT/cohort, segment it with the demo model and
    write the report (OUT/report/index.html)."""
    started = time.perf_counter()
    cohort = out / "cohort"
    records = generate_cohort(cohort, n_scans, seed=seed)
    print_cohort(cohort, records, time.perf_counter() - started)
    console.print("demo model, test-time augmentation off (CPU-friendly), QC pictures on")
    try:  # `run` itself, its other options at their defaults; it ends with its exit code
        context.invoke(
            run,
            manifest=cohort / "manifest.csv",
            out=out,
            model_spec="demo",
            tta=False,
            workers=workers,
            qc=True,
        )
        code: int | str | None = 0
    except SystemExit as finished:
        code = finished.code
    print_report_path(out)
    if code:
        raise SystemExit(code)
