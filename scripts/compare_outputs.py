"""Whether two output folders hold the same results: every table's rows and every mask.

Used to show that a refactor changed no output (docs/benchmarks.md, "Outputs before and
after"): run the same demo or cohort with two versions, then

    python scripts/compare_outputs.py OUT_BEFORE OUT_AFTER

Columns that differ by run and not by result (run id, times, workers, seconds per
stage, the fingerprints of input files, which include their paths and mtimes) are left
out; everything else must be equal, and every mask voxel. Exits 1 on the first
difference, naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

RUN_SPECIFIC = {
    "run_id",
    "started",
    "finished",
    "worker",
    "seconds_preprocess",
    "seconds_predict",
    "seconds_finish",
    "input_fingerprint",
}
TABLES = ("regions", "clusters", "evaluation", "ledger")


def table(out: Path, name: str) -> pd.DataFrame:
    frame = pq.read_table(out / "tables" / name).to_pandas()
    frame = frame.drop(columns=[c for c in frame.columns if c in RUN_SPECIFIC])
    keys = [c for c in ("scan_id", "region", "cluster") if c in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)


def mask(group: zarr.Group, scan_id: str) -> np.ndarray:
    scan = group[scan_id]
    [name] = list(scan.array_keys())  # one array per scan group
    return np.asarray(scan[name])


def main() -> None:
    before, after = Path(sys.argv[1]), Path(sys.argv[2])
    for name in TABLES:
        old, new = table(before, name), table(after, name)
        pd.testing.assert_frame_equal(old, new[old.columns], check_dtype=False)
        print(f"{name}: {len(old)} rows x {old.shape[1]} columns: identical")
    old_masks = zarr.open_group(before / "masks.zarr", mode="r")
    new_masks = zarr.open_group(after / "masks.zarr", mode="r")
    scan_ids = sorted(old_masks.group_keys())
    if scan_ids != sorted(new_masks.group_keys()):
        sys.exit(f"different scans: {scan_ids} vs {sorted(new_masks.group_keys())}")
    voxels = 0
    for scan_id in scan_ids:
        old_mask, new_mask = mask(old_masks, scan_id), mask(new_masks, scan_id)
        if not np.array_equal(old_mask, new_mask):
            sys.exit(f"{scan_id}: masks differ in {int((old_mask != new_mask).sum())} voxels")
        voxels += old_mask.size
    print(f"masks: {len(scan_ids)} scans, {voxels:,} voxels: identical")


if __name__ == "__main__":
    main()
