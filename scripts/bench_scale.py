"""Benchmark: the cohort runner at 100,000 scans, with a stand-in model (no network).

Targets (issue 5): manifest validation, planning, and the resume check of a fully done
run each < 60 s at 100,000 rows; driver + scheduler memory flat (< 1 GiB) over a run.

The model is the stand-in model the runner's tests use (benchkit/standins.py: **no
network**, an empty label map) behind the real stages: each scan is a tiny real image
(12³, standins.make_scans), read and checked, analysed, its mask group written to Zarr
with the fingerprints a resume checks and its table rows returned, so the Dask
traffic, the ledger, the Parquet flushes and the resume check are the real ones. Run:

    .venv/bin/python scripts/bench_scale.py [--rows 100000] [--run-scans 20000] [--workers 2]

`--run-scans` scans go through the runner (memory is sampled every second), flushing
the tables after every scan (FLUSH_EVERY_SCANS), as a run of slow scans does (one scan
per flush-every-seconds or less); the tables are then compacted (compaction.compact_tables,
as run_cohort does at the end of a run) and their files counted before and after. The
resume check then runs over all `--rows` scans, the missing ones made "done" by
writing their ledger rows and Zarr group metadata directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import dask.config
import numpy as np
import pandas as pd
import psutil
from benchkit import standins
from benchkit.benchdoc import git_revision, machine, write_section
from distributed import Client

from pingu_dask.inputs.manifest import Scan, input_fingerprint, load_manifest
from pingu_dask.output import compaction, layout, ledger, parts, tables
from pingu_dask.records import ScanResult, Status
from pingu_dask.run.local import local_cluster
from pingu_dask.run.loop import Segmentation, segment_scans
from pingu_dask.run.stages import Pipeline

FLUSH_EVERY_SCANS = 1  # the most parts a run can write: what slow scans lead to


class MemorySampler(threading.Thread):
    """RSS of this process (driver + in-process scheduler) once a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.process = psutil.Process()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - started, self.process.memory_info().rss))
            self.stop.wait(1.0)


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


@contextlib.contextmanager
def sampled(sampler: MemorySampler):
    """Sample memory while the block runs."""
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop.set()
        sampler.join()


def table_files(out: Path) -> str:
    """Files per table folder, as 'regions / clusters / evaluation / ledger': its parts,
    and in the ledger's, the commit file of the last compaction."""
    counts = []
    for name in tables.SCHEMAS:
        folder = out / parts.TABLES / name
        counts.append(sum(p.is_file() for p in folder.iterdir()) if folder.is_dir() else 0)
    return " / ".join(f"{count:,}" for count in counts)


def compaction_rows(out: Path, scans: int) -> list[tuple[str, str]]:
    """Files per table before and after compacting, its time and memory, and what it
    saves a reader (the ledger, which every resume check reads)."""
    names = " / ".join(tables.SCHEMAS)
    before = table_files(out)
    seconds_read_before, _ = timed(tables.read_table, out, "ledger")
    with sampled(MemorySampler()) as sampler:
        seconds, counts = timed(compaction.compact_tables, out)
    assert all(after <= max(1, scans // 1000) for _, after in counts.values()), counts
    seconds_read_after, _ = timed(tables.read_table, out, "ledger")
    rss = np.array([m for _, m in sampler.samples]) / 2**20
    return [
        (f"table files after that run ({names})", before),
        ("compact the tables (compaction.compact_tables)", f"{seconds:.1f} s"),
        (
            f"table files after compaction (goal: <= 1 per 1,000 scans, {max(1, scans // 1000)})",
            table_files(out),
        ),
        (
            "read the ledger: before / after compaction",
            f"{seconds_read_before:.2f} / {seconds_read_after:.2f} s",
        ),
        (
            "driver memory during compaction (RSS: at start / peak)",
            f"{rss[0]:.0f} / {rss.max():.0f} MiB",
        ),
    ]


def mark_done(out: Path, scans: list[Scan], pipeline: Pipeline) -> None:
    """Make scans 'done' without running them: Zarr group metadata plus ledger rows."""
    attrs_base = {"complete": True, "pipeline_fingerprint": pipeline.fingerprint()}
    rows = []
    now = ledger.now()
    for scan in scans:
        group = out / layout.MASKS / scan.scan_id
        group.mkdir(parents=True, exist_ok=True)
        attrs = {**attrs_base, "input_fingerprint": input_fingerprint(scan)}
        document = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        (group / "zarr.json").write_text(json.dumps(document))
        rows.append(
            ledger.attempt_row(
                scan.scan_id,
                scan.site,
                Status.OK,
                1,
                "filled",
                now,
                result=ScanResult(
                    scan_id=scan.scan_id,
                    status=Status.OK,
                    input_fingerprint=attrs["input_fingerprint"],
                ),
                pipeline_fingerprint=pipeline.fingerprint(),
            )
        )
    tables.write_part(out, "ledger", tables.to_table("ledger", rows), "filled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--run-scans", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    results: list[tuple[str, str]] = []
    load_at_start = os.getloadavg()[0]  # the figures mean little on a machine shared meanwhile

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # tiny real images, one link per scan (the stand-in model reads the scan's id
        # from its image's name)
        scans = standins.make_scans(args.rows, scratch)
        sites = ["a", "b", "c", "d"]
        manifest = pd.DataFrame(
            {
                "scan_id": [scan.scan_id for scan in scans],
                "t1w": [str(scan.channel("t1w")) for scan in scans],
                "site": [sites[i % 4] for i in range(len(scans))],
            }
        )
        manifest.to_csv(scratch / "manifest.csv", index=False)

        seconds, report = timed(load_manifest, scratch / "manifest.csv")
        assert report.ok and len(report.scans) == args.rows
        results.append((f"validate {args.rows:,} rows (file checks on)", f"{seconds:.1f} s"))

        out = scratch / "out"
        pipeline = standins.pipeline_in(scratch)  # writes to scratch/out
        assert pipeline.out == out
        layout.prepare_output(out)
        seconds, plan = timed(ledger.plan_resume, out, report.scans, pipeline.fingerprint())
        assert len(plan.todo) == args.rows
        seconds_names, _ = timed(layout.nifti_names, report.scans)
        results.append(
            (
                f"plan a fresh run of {args.rows:,} scans (resume check + names)",
                f"{seconds + seconds_names:.1f} s",
            )
        )

        run_scans = report.scans[: args.run_scans]
        sampler = MemorySampler()
        cluster = local_cluster(n_workers=args.workers, threads_per_worker=3)
        flushing = {"pingu.flush-every-scans": FLUSH_EVERY_SCANS}
        with dask.config.set(flushing):
            job = Segmentation(scans=run_scans, pipeline=pipeline, keep_details=False)
        with cluster, Client(cluster) as client, sampled(sampler):
            seconds, records = timed(segment_scans, client, job)
        assert sum(r.status == "ok" for r in records) == len(run_scans)
        rss = np.array([m for _, m in sampler.samples]) / 2**20
        tenth = max(1, len(rss) // 10)
        results.append(
            (
                f"run {len(run_scans):,} scans through the runner (stand-in model behind "
                f"the real stages, {args.workers} workers, tables flushed after every scan)",
                f"{seconds:.0f} s ({len(run_scans) / seconds:.0f} scans/s)",
            )
        )
        results.append(
            (
                "driver + scheduler memory during that run (RSS: first 10 % / last 10 % / peak)",
                f"{rss[:tenth].mean():.0f} / {rss[-tenth:].mean():.0f} / {rss.max():.0f} MiB",
            )
        )

        results.extend(compaction_rows(out, len(run_scans)))

        mark_done(out, report.scans[args.run_scans :], pipeline)
        seconds, plan = timed(ledger.plan_resume, out, report.scans, pipeline.fingerprint())
        assert len(plan.done) == args.rows and not plan.todo, (len(plan.done), len(plan.todo))
        step = f"resume check of a fully done run, {args.rows:,} scans"
        results.append((step, f"{seconds:.1f} s"))

    table = "\n".join(f"| {step} | {figure} |" for step, figure in results)
    load = f"{load_at_start:.1f} / {os.getloadavg()[0]:.1f}"
    command = (
        f"scripts/bench_scale.py --rows {args.rows} --run-scans {args.run_scans} "
        f"--workers {args.workers}"
    )
    body = f"""## Runner at scale (scripts/bench_scale.py)

Machine: {machine()}; revision {git_revision()}.
Command: `.venv/bin/python {command}`
Load average (1 min) at start / end: {load} ({os.cpu_count()} cores).

The model is the tests' stand-in model (**no network**: an empty label map) behind
the real stages: each scan is a tiny real image (12³, one link per manifest row, so
validation opens every row's file), read and checked, analysed, its mask group written
to Zarr; real Dask tasks (three per scan), real ledger and Parquet flushes. Goals: each
step < 60 s at 100,000 rows; memory flat, < 1 GiB; after compaction at most 1 file per
1,000 scans per table. The run flushes its tables after every scan
(pingu.flush-every-scans = {FLUSH_EVERY_SCANS}): the most files a run of slow scans can
leave (one part per table per flush). It is then compacted as run_cohort does at its
end. The empty label map gives regions rows only (no clusters, no evaluation).

| step | figure |
|---|---|
{table}

Table files are counted per folder: parts, plus in the ledger's folder the commit file
of the last compaction (`_compact-*.json`, which vouches for the compacted parts).
Compaction streams the small parts in flush order into parts of up to
{compaction.COMPACT_ROWS_PER_PART:,} rows, so its memory does not grow with the table.
"""
    write_section("bench_scale", body)
    print(body)


if __name__ == "__main__":
    main()
