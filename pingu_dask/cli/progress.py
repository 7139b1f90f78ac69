"""What a run shows while it goes and when it ends; `status` prints the same from the ledger.

Everything here stays a few lines long at any cohort size: failures are shown as their
most common reasons with counts (failure_reasons), not one line per scan; every failed
scan is one line of `pingu-dask status OUT --all`, and every attempt a ledger row.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import pandas as pd
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pingu_dask.cli.common import console, print_evaluation, print_region_sources
from pingu_dask.output import layout, ledger, parts, tables
from pingu_dask.output.lock import LOCK_NAME, read_lock
from pingu_dask.output.scans import SCANS, read_scans
from pingu_dask.records import ScanResult, Status
from pingu_dask.run.loop import Progress as RunProgress
from pingu_dask.run.settings import lock_times

PER_SCAN_LINES_UP_TO = 30  # print a line per finished scan in runs up to this size
LIVE_FAILURE_LINES = 20  # failed attempts printed one by one while a run goes
FAILURE_REASONS = 10  # most common failure reasons printed by run and status
REASON_CHARACTERS = 200  # a normalised reason longer than this is cut


class ProgressBar:
    """A rich progress bar: ok / failed / in flight, ok scans per minute and ETA.

    Only ok scans count as throughput: an input check that fails a scan in a second
    would otherwise make a cohort of bad rows look fast. start() once the number of
    scans to do is known; stop() may be called any number of times (on success, on
    Ctrl-C, on an error). The first LIVE_FAILURE_LINES failed attempts are printed as
    they come, then one line says where the rest are (`out`: the run's output folder).
    """

    def __init__(self, out: Path | None = None) -> None:
        self.total = 0
        self.out = out
        self.failure_lines = 0
        self.bar = Progress(
            TextColumn("[bold]segmenting"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} ok"),
            TextColumn("[red]{task.fields[failed]} failed[/red]"),
            TextColumn("{task.fields[in_flight]} in flight"),
            TextColumn("{task.fields[rate]} ok scans/min"),
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
        elapsed = time.monotonic() - progress.started
        rate = ok_per_minute(progress.done, elapsed)
        left = progress.total - progress.done - progress.failed
        eta = f"{left / rate:.0f} min" if rate else "-"
        self.bar.update(
            self.task,
            completed=progress.done,
            failed=progress.failed,
            in_flight=progress.in_flight,
            rate=f"{rate:.1f}" if rate else "-",
            eta=eta,
        )
        last = progress.last
        if last is None:
            return
        if not last.ok:
            self._print_failure(last)
        elif self.total <= PER_SCAN_LINES_UP_TO:
            self.bar.console.print(
                f"  {escape(last.scan_id)}: {last.n_clusters} PVS clusters, "
                f"{last.volume_mm3:.0f} mm³"
            )

    def _print_failure(self, last: ScanResult) -> None:
        self.failure_lines += 1
        if self.failure_lines > LIVE_FAILURE_LINES + 1:
            return
        if self.failure_lines == LIVE_FAILURE_LINES + 1:
            where = f"pingu-dask status {self.out}" if self.out else "pingu-dask status OUT"
            self.bar.console.print(
                f"  [red]{LIVE_FAILURE_LINES} failed attempts so far[/red]; further ones are "
                f"not printed one by one: the summary at the end counts them by reason "
                f"(meanwhile: `{escape(where)}`)",
                soft_wrap=True,
            )
            return
        verb = "will retry" if last.status is Status.RETRY else "failed"
        self.bar.console.print(
            f"  [red]{escape(last.scan_id)} {verb}[/red] (attempt {last.attempt}, "
            f"{escape(str(last.error_type))}): {escape(str(last.message))}",
            soft_wrap=True,
        )


def ok_per_minute(ok: int, seconds: float) -> float:
    """Throughput: ok scans per minute (failed scans are not throughput)."""
    return ok / seconds * 60 if seconds > 0 and ok else 0.0


def print_run_line(ok: int, failed: int, seconds: float, done_before: int = 0) -> None:
    """The end of a run: '12 ok, 3 failed of 15 scans in 54.2 s (13.3 ok scans/min)'."""
    rate = ok_per_minute(ok, seconds)
    console.print(
        f"this run: {ok:,} ok, {failed:,} failed of {ok + failed:,} scans in {seconds:.1f} s "
        f"({rate:.1f} ok scans/min)"
        + (f"; {done_before:,} were done before" if done_before else "")
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


# --- failures, grouped by reason -------------------------------------------------------

# What varies between scans that failed for the same reason, replaced in this order.
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s,;'\"()\[\]]+", re.IGNORECASE)
# A quoted path starts like one (so "scan 'x' (/p): the parcellation's" is not a path).
_QUOTED_PATH = re.compile(r"(['\"])(?:[A-Za-z]:)?[/\\~.][^'\"\n]*\1")
_PATH = re.compile(r"(?<![\w<])(?:[A-Za-z]:)?(?:~|\.{1,2})?(?:[\w.@%+=~-]*[/\\])+[\w.@%+=~-]*")
_HEX = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{8,}\b")
_NUMBER = re.compile(
    r"(?<!Errno )(?<![0-9A-Za-wyz_.])\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![0-9A-Za-wyz]|\.\d)"
)


def normalise_message(message: str, scan_id: str | None = None) -> str:
    """A failure message with what differs between scans replaced: the scan's id by
    <scan>, file paths by <path>, addresses by <address>, fingerprints by <hex>, numbers
    by <n>, so that 10,000 "file not found: /data/sub-123/..." are one reason. What
    names the kind of problem stays: `[Errno 28]` codes, units and words glued to a
    number ("2D", "float32", "T1w")."""
    text = " ".join(str(message).split())
    text = _URL.sub("<address>", text)
    text = _QUOTED_PATH.sub(lambda m: f"{m.group(1)}<path>{m.group(1)}", text)
    text = _PATH.sub(lambda m: "<path>" if _looks_like_path(m.group(0)) else m.group(0), text)
    if scan_id:
        text = _replace_scan_id(text, scan_id)
    text = _HEX.sub("<hex>", text)
    text = _NUMBER.sub("<n>", text)
    if len(text) > REASON_CHARACTERS:
        text = text[: REASON_CHARACTERS - 1].rstrip() + "…"
    return text


def _replace_scan_id(text: str, scan_id: str) -> str:
    """The scan id as <scan>: quoted anywhere; bare only where it stands alone and is not
    a plain word (an id such as 'empty' must not turn "image is empty" into "image is
    <scan>")."""
    for quote in ("'", '"'):
        text = text.replace(f"{quote}{scan_id}{quote}", f"{quote}<scan>{quote}")
    if scan_id.isalpha():
        return text
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(scan_id)}(?![A-Za-z0-9])", "<scan>", text)


def _looks_like_path(token: str) -> bool:
    """'/data/x.nii.gz', 'sub-1/anat/x', 'C:\\x': yes; '1/2', 'and/or', 'mm/s': no."""
    if token.startswith(("/", "~", "./", "../", "\\")) or re.match(r"[A-Za-z]:[/\\]", token):
        return True
    return token.count("/") + token.count("\\") >= 2 or "." in token.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class FailureReason:
    """Failed scans that share an error type and a normalised message."""

    count: int
    error_type: str
    reason: str  # normalise_message's
    example: str  # one of the scans, to look up in full


def failure_reasons(failures: pd.DataFrame) -> list[FailureReason]:
    """Group failed scans (rows with scan_id, error_type, message: the ledger's latest
    attempts) by error type and normalised message; the most common reason first, ties
    by error type and reason, so that the order is the same on every call."""
    counted: dict[tuple[str, str], list[str]] = {}
    for scan_id, error_type, message in zip(
        failures["scan_id"], failures["error_type"], failures["message"], strict=True
    ):
        kind = str(error_type) if pd.notna(error_type) else "unknown error"
        text = str(message) if pd.notna(message) else ""
        key = (kind, normalise_message(text, str(scan_id)))
        counted.setdefault(key, []).append(str(scan_id))
    reasons = [
        FailureReason(len(ids), kind, reason, min(ids)) for (kind, reason), ids in counted.items()
    ]
    return sorted(reasons, key=lambda r: (-r.count, r.error_type, r.reason))


def print_failure_reasons(out: Path, failures: pd.DataFrame, where: bool = True) -> None:
    """At most FAILURE_REASONS lines of reasons with counts, then (`where`) where the
    full list is."""
    reasons = failure_reasons(failures)
    if not reasons:
        return
    console.print("failures by reason (latest attempt per scan; most common first):")
    for reason in reasons[:FAILURE_REASONS]:
        example = "" if reason.count == 1 else "e.g. "
        console.print(
            f"  {reason.count:,} x {escape(reason.error_type)}: {escape(reason.reason)} "
            f"({example}{escape(reason.example)})",
            soft_wrap=True,
        )
    rest = reasons[FAILURE_REASONS:]
    if rest:
        console.print(f"  and {_more(rest)}", soft_wrap=True)
    if where:
        console.print(
            f"every failed scan, one per line: `pingu-dask status {escape(str(out))} --all`; "
            f"every attempt: the ledger table {escape(str(out / parts.TABLES / parts.LEDGER))}",
            soft_wrap=True,
        )


def _more(rest: list[FailureReason], types: int = 5) -> str:
    """'2 more reasons (3 scans: 2 RegionError, 1 ModelError)': no error type goes unseen."""
    by_type: dict[str, int] = {}
    for reason in rest:
        by_type[reason.error_type] = by_type.get(reason.error_type, 0) + reason.count
    counted = sorted(by_type.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{count:,} {escape(kind)}" for kind, count in counted[:types])
    shown += ", ..." if len(counted) > types else ""
    scans = sum(by_type.values())
    return (
        f"{len(rest):,} more {'reason' if len(rest) == 1 else 'reasons'} "
        f"({scans:,} {'scan' if scans == 1 else 'scans'}: {shown})"
    )


def print_every_failure(failures: pd.DataFrame) -> None:
    """`status --all`: one line per failed scan (latest attempt), message in full."""
    for row in failures.itertuples():
        console.print(
            f"  {escape(str(row.scan_id))} ({row.status}, {escape(str(row.error_type))}): "
            f"{escape(str(row.message))}",
            soft_wrap=True,
        )


# --- status ------------------------------------------------------------------------------


def print_status(out: Path, evaluation: bool = True, every_failure: bool = False) -> bool:
    """Counts, the most common failure reasons (every failure with `every_failure`),
    throughput and outputs, from OUT's ledger.

    Returns True when every scan of the run's manifest is done and none failed.
    """
    run = layout.read_run_json(out) or {}
    summary = ledger.summarise_ledger(out)
    holder = read_lock(out, lock_times())
    expected = run.get("n_scans")
    ok = summary.counts.get(ledger.OK, 0)
    failed = summary.counts.get(ledger.FAILED, 0)
    invalid = summary.counts.get(ledger.INVALID, 0)
    line = f"{out}: {ok:,} done, {failed:,} failed, {invalid:,} invalid manifest rows"
    if expected is not None:
        pending = max(0, expected - ok - failed)
        line += f", {pending:,} not done yet (of {expected:,} scans)"
    if summary.other_scans:
        line += f"; {summary.other_scans:,} scans of earlier manifests not counted"
    console.print(line)
    print_region_sources(run)
    if holder and not holder["stale"]:
        console.print(
            f"running now: pid {holder['pid']} on {holder['host']} since {holder['started']}"
        )
    elif holder:
        console.print(f"[yellow]a run stopped without finishing (pid {holder['pid']})[/yellow]")
    rate = f"{summary.scans_per_minute:.1f} ok scans/min" if summary.scans_per_minute else "-"
    console.print(
        f"attempts: {summary.attempts:,} ({summary.retried:,} retries); "
        f"throughput of the latest run: {rate}"
    )
    if len(summary.failures):
        print_failure_reasons(out, summary.failures, where=not every_failure)
        if every_failure:
            console.print("every failed scan (latest attempt):")
            print_every_failure(summary.failures)
    if evaluation:
        frame = tables.read_table(out, "evaluation")
        if len(frame):
            print_evaluation(frame, f"Evaluation against the reference masks ({out})")
    print_flags(out)
    written = [name for name in tables.SCHEMAS if parts.parts(out, name)]
    console.print(
        f"outputs: masks {out / layout.MASKS}, tables {out / parts.TABLES} "
        f"({', '.join(written) or 'none yet'}), provenance {out / layout.RUN_JSON}; "
        f"for R, SPSS or Excel: pingu-dask export {out}"
    )
    complete = expected is None or ok == expected
    return complete and failed == 0 and invalid == 0


def print_flags(out: Path) -> None:
    """How many scans ran with pre-flight flags, by check (the scans table's `flags`):
    they have figures, but a person should look at them (or rerun with --strict)."""
    scans = read_scans(out)
    if not len(scans) or "flags" not in scans:
        return
    flags = scans["flags"].fillna("")
    flagged = scans[(scans["status"] == Status.OK.value) & flags.ne("")]
    if not len(flagged):
        return
    checks = Counter(name for text in flags[flagged.index] for name in text.split(";") if name)
    console.print(
        f"[yellow]{len(flagged)} scan(s) ran with pre-flight flags[/yellow] ("
        + ", ".join(f"{name}: {count}" for name, count in checks.most_common())
        + f"): their figures are kept; see the scans table ({out / parts.TABLES / SCANS}, "
        "column flags) and the masks' JSON sidecars; --strict fails such scans instead",
        soft_wrap=True,
    )


NOT_AN_OUTPUT_EXIT_CODE = 2  # as click's wrong usage: OUT is not what `status` reads


def not_an_output(out: Path) -> str | None:
    """Why OUT is not a pingu-dask output folder, or None when it is one (a run wrote
    run.json or the ledger there, or one holds its lock while it starts)."""
    if not out.exists():
        return f"{out} does not exist: not a pingu-dask output folder"
    if not out.is_dir():
        return f"{out} is a file, not a pingu-dask output folder"
    marks = (out / layout.RUN_JSON, out / parts.TABLES / parts.LEDGER, out / LOCK_NAME)
    if not any(mark.exists() for mark in marks):
        return f"{out} is not a pingu-dask output folder (no {layout.RUN_JSON})"
    return None


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--all",
    "every_failure",
    is_flag=True,
    help="Also print every failed scan, one per line with its full message (latest "
    "attempt; every attempt is in OUT/tables/ledger).",
)
def status(out: Path, every_failure: bool) -> None:
    """Where a run in OUT stands, from its ledger (also while it is running).

    Failures are shown as their most common reasons with counts; --all lists each.
    Exit code 0 when every scan of the manifest is done, 1 otherwise, 2 when OUT is
    not a pingu-dask output folder.
    """
    problem = not_an_output(out)
    if problem:
        click.echo(problem, err=True)
        raise SystemExit(NOT_AN_OUTPUT_EXIT_CODE)
    raise SystemExit(0 if print_status(out, every_failure=every_failure) else 1)
