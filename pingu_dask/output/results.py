"""Reading a run's outputs: `pingu_dask.open_results(OUT)`.

The public face of the output directory, in the spirit of xarray.open_dataset: users
get a Dataset of metrics (scan x region), pandas tables and masks as DataArrays with
millimetre coordinates, and never deal with Parquet parts or Zarr groups themselves.
The tables are plain Parquet too: pandas.read_parquet('OUT/tables/regions') and
DuckDB's read_parquet('OUT/tables/regions/*.parquet') read them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr

from pingu_dask.output import layout, masks, parts, tables

SCANNER_AXES = ("x", "y", "z")  # RAS+ scanner axes, millimetres


@dataclass
class Results:
    """The outputs of one run directory, loaded on demand."""

    out: Path
    run: dict | None = field(default=None)

    @cached_property
    def regions(self) -> xr.Dataset:
        """Per scan x region metrics; site, subject and session as scan coordinates."""
        table = tables.read_table(self.out, "regions")
        identity = ["subject", "session", "site"]
        scans = table.drop_duplicates("scan_id").set_index("scan_id")[identity]
        measures = table.drop(columns=identity).set_index(["scan_id", "region"])
        dataset = measures.to_xarray()
        for name in identity:
            values = scans[name].reindex(dataset.scan_id.values)
            dataset = dataset.assign_coords({name: ("scan_id", values.to_numpy())})
        return dataset

    @cached_property
    def clusters(self) -> pd.DataFrame:
        return tables.read_table(self.out, "clusters")

    @cached_property
    def evaluation(self) -> pd.DataFrame:
        return tables.read_table(self.out, "evaluation")

    @property
    def scan_ids(self) -> list[str]:
        """Scans with a complete mask."""
        return [
            s
            for s in masks.stored_scan_ids(self.out)
            if (masks.mask_attrs(self.out, s) or {}).get("complete")
        ]

    def mask(self, scan_id: str) -> xr.DataArray:
        """One scan's mask (lazy, dask-backed) with scanner coordinates in millimetres.

        Each array axis is named after the scanner axis it runs along (x, y or z, RAS+)
        and its coordinate is that scanner coordinate through the volume's centre.
        This is exact for axis-aligned images; for oblique ones the attribute
        `oblique_degrees` says by how much it is not, and `affine` is always exact.
        """
        import dask.array
        import zarr

        attrs = masks.mask_attrs(self.out, scan_id)
        if not attrs or not attrs.get("complete"):
            raise KeyError(f"no complete mask for scan {scan_id!r} in {self.out / layout.MASKS}")
        array = zarr.open_array(self.out / layout.MASKS / scan_id / masks.MASK_ARRAY, mode="r")
        data = dask.array.from_zarr(array)
        affine = np.asarray(attrs["affine"], dtype=float)
        dims, coords, oblique = _scanner_coordinates(affine, data.shape)
        return xr.DataArray(
            data,
            dims=dims,
            coords=coords,
            name="pvs",
            attrs={**attrs, "units": "mm", "oblique_degrees": oblique},
        )


def _scanner_coordinates(
    affine: np.ndarray, shape: tuple[int, ...]
) -> tuple[tuple[str, ...], dict[str, np.ndarray], float]:
    linear = affine[:3, :3]
    spacing = nib.affines.voxel_sizes(affine)
    dominant = np.argmax(np.abs(linear), axis=0)  # scanner axis each array axis runs along
    if len(set(dominant.tolist())) < 3:
        dominant = np.arange(3)  # degenerate; name axes x, y, z in array order
    cosine = np.abs(linear[dominant, np.arange(3)]) / spacing
    oblique = float(np.degrees(np.arccos(np.clip(cosine.min(), -1.0, 1.0))))
    centre = (np.asarray(shape, dtype=float) - 1) / 2
    dims, coords = [], {}
    for axis in range(3):
        name = SCANNER_AXES[dominant[axis]]
        index = np.tile(centre, (shape[axis], 1))
        index[:, axis] = np.arange(shape[axis])
        world = index @ linear.T + affine[:3, 3]
        dims.append(name)
        coords[name] = world[:, dominant[axis]]
    return tuple(dims), coords, round(oblique, 3)


def open_results(out: str | Path) -> Results:
    """Open a pingu-dask output directory for reading."""
    out = Path(out)
    if not (out / layout.MASKS).exists() and not (out / parts.TABLES).exists():
        raise FileNotFoundError(f"{out} is not a pingu-dask output directory (no masks, no tables)")
    return Results(out, layout.read_run_json(out))
