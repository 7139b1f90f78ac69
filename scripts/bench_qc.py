"""QC pictures and the report: seconds per scan and per report, sizes.

QC: a synthetic cohort's reference masks stand in for predictions (no model needed:
the picture costs the same), timed as `preprocess` and `finish` pay for it: windowing
and reorienting the T1w, then region map, montage and PNG. Report: `build_report` on a
10,000-scan output directory written directly (tables, tiny pictures). Run:

    .venv/bin/python scripts/bench_qc.py [--scans 9] [--report-scans 10000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from benchkit.benchdoc import git_revision, machine, write_section
from PIL import Image

from pingu_dask.analysis.regions import ASEG
from pingu_dask.analysis.scan import analyse_mask, scan_regions
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.imaging import check_image_data, load_volume
from pingu_dask.inputs.manifest import load_manifest
from pingu_dask.output import layout, ledger, tables
from pingu_dask.report import build as report
from pingu_dask.report import qc
from pingu_dask.synth.cohort import generate_cohort


def time_pictures(root: Path, n_scans: int) -> list[tuple[str, str, float, float, int]]:
    """(scan, site, seconds in preprocess, seconds in finish, PNG bytes) per scan."""
    generate_cohort(root / "cohort", n_scans, seed=5, jobs=2)
    scans = load_manifest(root / "cohort" / "manifest.csv", ("t1w",)).scans
    settings = PvsClusterRules()
    results = []
    for scan in scans:
        info, data = check_image_data(scan.channel("t1w"))
        started = time.perf_counter()
        picture_source = qc.qc_image(data, info.affine)
        in_preprocess = time.perf_counter() - started
        regions = scan_regions(scan, info.shape, info.affine, ASEG, settings)
        mask, _ = load_volume(scan.reference)
        analysis = analyse_mask(mask, info.affine, scan, regions, settings, ASEG)
        started = time.perf_counter()
        sheet = qc.scan_montage(scan, analysis, picture_source, regions.codes, ASEG.names)
        path = qc.write_png(root / "out", scan.scan_id, sheet)
        in_finish = time.perf_counter() - started
        results.append((scan.scan_id, scan.site, in_preprocess, in_finish, path.stat().st_size))
    return results


def time_report(root: Path, n: int) -> tuple[float, int, int]:
    """Seconds to build the report of `n` scans, index.html bytes, gallery pages."""
    out = root / "big"
    layout.prepare_output(out)
    ids = [f"sub-{i:06d}" for i in range(n)]
    sites = [f"site{i % 8}" for i in range(n)]
    rng = np.random.default_rng(1)
    rows = []
    for region, share in (("white_matter", 0.7), ("basal_ganglia", 0.2), ("whole_brain", 1.0)):
        counts = rng.poisson(30 * share, n)
        rows += [
            {"scan_id": i, "subject": i, "session": None, "site": s, "region": region,
             "n_clusters": int(c), "n_voxels": int(c) * 25, "total_volume_mm3": c * 25.0}
            for i, s, c in zip(ids, sites, counts, strict=True)
        ]  # fmt: skip
    tables.write_part(out, "regions", tables.to_table("regions", rows), "made")
    now = ledger.now()
    pairs = zip(ids, sites, strict=True)
    attempts = [ledger.attempt_row(i, s, "ok", 1, "r", now) for i, s in pairs]
    tables.write_part(out, "ledger", tables.to_table("ledger", attempts), "made")
    run = {
        "tool": "pingu-dask", "version": "-", "python": "-", "host": "-", "libraries": {},
        "model": {"folder": "-", "name": "-", "folds": [], "checkpoint": "-", "fingerprint": "-"},
        "inference": {}, "clusters": {}, "regions": {"table": "synthseg", "regions": {}},
        "pipeline_fingerprint": "-", "manifest": None, "n_scans": n, "runs": [],
    }  # fmt: skip
    layout.write_json(out / layout.RUN_JSON, json.loads(json.dumps(run)))
    (out / layout.QC).mkdir()
    tiny = Image.new("P", (8, 8))
    for scan_id in ids:
        tiny.save(out / layout.QC / f"{scan_id}.png")
    started = time.perf_counter()
    index = report.build_report(out)
    seconds = time.perf_counter() - started
    pages = len(list(index.parent.glob("gallery-*.html")))
    return seconds, index.stat().st_size, pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=9)
    parser.add_argument("--report-scans", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        pictures = time_pictures(scratch, args.scans)
        report_seconds, index_bytes, pages = time_report(scratch, args.report_scans)
    lines = [
        f"| {scan} | {site} | {pre * 1000:.0f} | {fin * 1000:.0f} | {size / 1024:.0f} |"
        for scan, site, pre, fin, size in pictures
    ]
    mean_total = np.mean([pre + fin for _, _, pre, fin, _ in pictures])
    command = f"scripts/bench_qc.py --scans {args.scans} --report-scans {args.report_scans}"
    body = f"""## QC pictures and the report (scripts/bench_qc.py)

Machine: {machine()}; revision {git_revision()}.
Command: `.venv/bin/python {command}`

QC picture per scan (synthetic scans; reference masks stand in for predictions):

| scan | site | ms in preprocess (window, reorient) | ms in finish (montage, PNG) | PNG KiB |
|---|---|---:|---:|---:|
{chr(10).join(lines)}

Mean {mean_total * 1000:.0f} ms per scan in all (goal: well under a second).

Report of {args.report_scans:,} scans (8 sites, 3 regions, a tiny picture each):
{report_seconds:.1f} s to build; index.html {index_bytes / 1024:.0f} KiB; {pages} gallery pages.
"""
    write_section("bench_qc", body)
    print(body)


if __name__ == "__main__":
    main()
