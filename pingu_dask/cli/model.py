"""`pingu-dask model import`: an nnU-Net v1 model (e.g. PINGU-All_v0.zip) -> a v2 folder."""

from __future__ import annotations

from pathlib import Path

import click

from pingu_dask.cli.common import console, split


@click.group()
def model() -> None:
    """Prepare models for `pingu-dask run`."""


@model.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the nnU-Net v2 model folder into.",
)
@click.option(
    "--channel-names",
    default=None,
    help="Comma-separated channel names, in input order (default: v1's modalities, "
    "T1 -> T1w); they name the manifest columns (T1w -> t1w).",
)
def import_model(source: Path, out: Path, channel_names: str | None) -> None:
    """Convert the nnU-Net v1 model in SOURCE (a folder or zip, e.g. PINGU-All_v0.zip)
    into an nnU-Net v2 model folder under OUT, for `run --model`. A checkpoint is code
    (Python pickles): import only models from a source you trust."""
    from pingu_dask.errors import ModelError
    from pingu_dask.nnunet.convert_v1 import import_v1_model
    from pingu_dask.nnunet.model import resolve_model

    names = tuple(split(channel_names)) if channel_names else None
    try:
        folder = import_v1_model(source, out, names)
        converted = resolve_model(folder)
    except ModelError as error:
        console.print(f"[red]{error}[/red]", soft_wrap=True)
        raise SystemExit(1) from error
    console.print(
        f"v2 model written to {folder} (folds {', '.join(converted.folds)}, channels "
        f"{', '.join(converted.channels)}, fingerprint {converted.fingerprint[:12]})",
        soft_wrap=True,
    )
    usage = f"run it with: pingu-dask run MANIFEST --out OUT --model {folder}"
    console.print(usage, soft_wrap=True)
