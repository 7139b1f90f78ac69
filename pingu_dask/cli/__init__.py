"""The `pingu-dask` command line.

Each sub-command is a thin layer: it parses options, calls library functions and
prints the outcome with rich. Exit codes: 0 success, 1 the work found problems (an
invalid manifest, failed scans), 2 wrong usage (click's own convention).

    data.py      synth, validate, manifest (BIDS)
    run.py       run
    train.py     train (nnU-Net training and fine-tuning, folds on Dask)
    demo.py      demo
    progress.py  status; the progress bar, per-scan table and status summary
    evaluate.py  evaluate
    report.py    report
    export.py    export (CSV, TSV, Parquet for R, SPSS, Stata, Excel)
    model.py     model import (nnU-Net v1 -> v2)
    common.py    the console, shared options and printing helpers
"""

from __future__ import annotations

import click

from pingu_dask.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pingu-dask")
def main() -> None:
    """Segment perivascular spaces in whole MRI cohorts with nnU-Net on Dask."""


def _register() -> None:
    from pingu_dask.cli import (
        data,
        demo,
        evaluate,
        export,
        model,
        progress,
        report,
        run,
        train,
    )

    commands = (
        data.synth,
        data.validate,
        data.manifest,
        run.run,
        train.train,
        progress.status,
        evaluate.evaluate,
        report.report,
        export.export,
        model.model,
        demo.demo,
    )
    for command in commands:
        main.add_command(command)


_register()
