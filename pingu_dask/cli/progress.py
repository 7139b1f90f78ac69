"""What a run shows while it goes and when it ends; `status` prints the same from the ledger."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pingu_dask.cli.common import console, print_evaluation
from pingu_dask.output import layout, ledger, parts, tables
from pingu_dask.output.lock import read_lock
from pingu_dask.records import ScanResult, Status
from pingu_dask.run.loop import Progress as RunProgress

PER_SCAN_LINES_UP_TO = 30  # print a line per finished scan in runs up to this size
FAILURE_LINES = 20  # failed scans listed one per line by `status`


class ProgressBar:
    """A rich progress bar: done / failed / in flight, scans per minute and ETA.

    start() once the number of scans to do is known; stop() may be called any number
    of times (on success, on Ctrl-C, on an error).
    """

    def __init__(self) -> None:
        self.total = 0
        self.bar = Progress(
            TextColumn("[bold]segmenting"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} finished"),
            TextColumn("[red]{task.fields[failed]} failed[/red]"),
            TextColumn("{task.fields[in_flight]} in flight"),
            TextColumn("{task.fields[rate]} scans/min"),
            TextColumn("ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("run", total=0, failed=0, in_flight=0, rate="-", eta="-")

    def start(self, total: int) -> None:
        self.total = total
        self.bar.update(self.task, total=total)
        self.bar.start()

    def stop(self) -> None:
        self.bar.stop()

    def update(self, progress: RunProgress) -> None:
        import time

        elapsed = time.monotonic() - progress.started
        finished = progress.done + progress.failed
        rate = finished / elapsed * 60 if elapsed > 0 and finished else 0.0
        left = progress.total - finished
        eta = f"{left / rate:.0f} min" if rate else "-"
        self.bar.update(
            self.task,
            completed=finished,
            failed=progress.failed,
            in_flight=progress.in_flight,
            rate=f"{rate:.1f}",
            eta=eta,
        )
        last = progress.last
        if last is None:
            return
        if not last.ok:
            verb = "will retry" if last.status is Status.RETRY else "failed"
            self.bar.console.print(
                f"  [red]{last.scan_id} {verb}[/red] (attempt {last.attempt}, "
                f"{last.error_type}): {last.message}",
                soft_wrap=True,
            )
        elif self.total <= PER_SCAN_LINES_UP_TO:
            self.bar.console.print(
                f"  {last.scan_id}: {last.n_clusters} PVS clusters, {last.volume_mm3:.0f} mm³"
            )


def print_scan_table(results: list[ScanResult]) -> None:
    """Per-scan counts, timings and agreement with the reference (small runs)."""
    done = [r for r in results if r.ok]
    if not done:
        return
    table = Table(
        title="Segmented scans",
        caption="PVS: clusters after the size filter; mm³: PVS volume; s: seconds per "
        "stage; truth / Dice / cluster F1: against the manifest's reference mask",
    )
    with_reference = any(r.voxel_dice is not None for r in done)
    headings = ["scan", "PVS", "mm³", "s: pre/pred/fin"]
    if with_reference:
        headings += ["truth PVS", "Dice", "cluster F1"]
    for heading in headings:
        table.add_column(heading)
    nan = float("nan")
    for r in sorted(done, key=lambda r: r.scan_id):
        s = r.seconds
        row = [
            r.scan_id,
            str(r.n_clusters),
            f"{r.volume_mm3:.0f}",
            f"{s['preprocess']:.1f} / {s['predict']:.1f} / {s['finish']:.1f}",
        ]
        if with_reference:
            row += [
                "" if r.reference_clusters is None else str(r.reference_clusters),
                f"{nan if r.voxel_dice is None else r.voxel_dice:.3f}",
                f"{nan if r.cluster_f1 is None else r.cluster_f1:.3f}",
            ]
        table.add_row(*row)
    console.print(table)


def print_status(out: Path, evaluation: bool = True) -> bool:
    """Counts, failures by error type, throughput and outputs, from OUT's ledger.

    Returns True when every scan of the run's manifest is done and none failed.
    """
    run = layout.read_run_json(out) or {}
    summary = ledger.summarise_ledger(out)
    holder = read_lock(out)
    expected = run.get("n_scans")
    ok = summary.counts.get(ledger.OK, 0)
    failed = summary.counts.get(ledger.FAILED, 0)
    invalid = summary.counts.get(ledger.INVALID, 0)
    line = f"{out}: {ok} done, {failed} failed, {invalid} invalid manifest rows"
    if expected is not None:
        pending = max(0, expected - ok - failed)
        line += f", {pending} not done yet (of {expected} scans)"
    if summary.other_scans:
        line += f"; {summary.other_scans} scans of earlier manifests not counted"
    console.print(line)
    if holder and not holder["stale"]:
        console.print(
            f"running now: pid {holder['pid']} on {holder['host']} since {holder['started']}"
        )
    elif holder:
        console.print(f"[yellow]a run stopped without finishing (pid {holder['pid']})[/yellow]")
    rate = f"{summary.scans_per_minute:.1f} scans/min" if summary.scans_per_minute else "-"
    console.print(
        f"attempts: {summary.attempts} ({summary.retried} retries); "
        f"throughput of the latest run: {rate}"
    )
    if len(summary.failures):
        table = Table(title="Failures by error type (latest attempt per scan)")
        for heading in ("error type", "scans", "example", "message"):
            table.add_column(heading, overflow="fold")
        for error_type, group in summary.failures.groupby("error_type", sort=True):
            first = group.iloc[0]
            table.add_row(str(error_type), str(len(group)), first.scan_id, first.message)
        console.print(table)
        for row in summary.failures.itertuples():
            console.print(
                f"  {row.scan_id} ({row.status}, {row.error_type}): {row.message}", soft_wrap=True
            )
    if evaluation:
        frame = tables.read_table(out, "evaluation")
        if len(frame):
            print_evaluation(frame, f"Evaluation against the reference masks ({out})")
    console.print(
        f"outputs: masks {out / layout.MASKS}, tables {out / parts.TABLES} "
        "(regions, clusters, evaluation, ledger), provenance "
        f"{out / layout.RUN_JSON}"
    )
    complete = expected is None or ok == expected
    return complete and failed == 0 and invalid == 0


@click.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def status(out: Path) -> None:
    """Where a run in OUT stands, from its ledger (also while it is running).

    Exit code 0 when every scan of the manifest is done, 1 otherwise.
    """
    raise SystemExit(0 if print_status(out) else 1)
