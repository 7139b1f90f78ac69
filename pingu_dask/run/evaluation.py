"""`pingu-dask evaluate`'s task on a worker: one stored mask against its reference."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pingu_dask.analysis.regions import RegionTable
from pingu_dask.analysis.scan import evaluate_against_reference, pipeline_filter, scan_regions
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.imaging import load_volume
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output import masks, tables


def evaluate_stored(
    source: Path, scan: Scan, settings: PvsClusterRules, table: RegionTable
) -> pa.Table:
    """Evaluate an existing mask: group `scan_id` of OUT/masks.zarr, or a NIfTI file.

    The pipeline's filter is applied to the mask again (a no-op for masks this tool
    wrote with the same settings), so masks from other tools are judged by the same
    rules. Returns the scan's evaluation rows as a table.
    """
    if Path(source).is_dir():
        mask, affine = masks.read_mask(source, scan.scan_id)
    else:
        mask, affine = load_volume(source)
    regions = scan_regions(scan, mask.shape, affine, table, settings)
    cleaned = pipeline_filter(mask > 0, affine, regions, settings)
    rows = evaluate_against_reference(cleaned, affine, scan, regions, settings, table)
    return tables.to_table("evaluation", rows)
