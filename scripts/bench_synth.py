"""Benchmark: synthetic cohort generation and manifest validation.

Targets (issue 2): 20 scans of ~1 mm in < 60 s on one core; a 100,000-row manifest
parsed and column-validated in a few seconds. Run:

    .venv/bin/python scripts/bench_synth.py [--scans 20] [--rows 100000]

It pins itself to one CPU core for the synthesis figure and writes its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
from benchkit.benchdoc import git_revision, machine, write_section

from pingu_dask.inputs.manifest import load_manifest
from pingu_dask.synth.cohort import generate_cohort


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for sites in ("iso1mm", "iso1mm,iso08mm,axial3mm"):
            seconds, _ = timed(generate_cohort, scratch / sites, args.scans, sites=sites, seed=0)
            rows.append((f"synth {args.scans} scans, sites {sites}, 1 core", seconds))
        seconds, report = timed(load_manifest, scratch / "iso1mm" / "manifest.csv")
        assert report.ok
        rows.append((f"validate {args.scans}-scan manifest with file checks", seconds))

        ids = [f"sub-{i:06d}" for i in range(args.rows)]
        table = pd.DataFrame(
            {
                "scan_id": ids,
                "t1w": [f"{i}/anat/{i}_T1w.nii.gz" for i in ids],
                "site": ["a", "b", "c", "d"] * (args.rows // 4),
            }
        )
        for suffix in (".csv", ".parquet"):
            path = scratch / f"big{suffix}"
            table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
            seconds, report = timed(load_manifest, path, check_files=False)
            assert len(report.scans) == args.rows
            task = f"validate {args.rows:,}-row {suffix[1:]} manifest, no file checks"
            rows.append((task, seconds))

    lines = [
        "## Synthetic cohorts and manifest validation",
        "",
        f"Machine: {machine()}. Commit {git_revision()}.",
        "Command: `.venv/bin/python scripts/bench_synth.py`"
        f" (`--scans {args.scans} --rows {args.rows}`), pinned to one core.",
        "",
        "| task | seconds |",
        "|---|---:|",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in rows],
    ]
    print("\n".join(lines))
    print(f"written to {write_section('bench_synth', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
