"""What PVS studies report, per cluster and per scan x region, in physical units.

Everything is measured in millimetres in scanner space through the image affine, so
anisotropic and oblique voxels count right: a 4-voxel tube across 3 mm slices is 12 mm
long. Per cluster:
- volume_mm3: voxels x voxel volume;
- centroid: mean of the voxel centres in scanner coordinates;
- length_mm: extent along the principal axis (first eigenvector of the voxel centres'
  covariance), from the outer faces of the end voxels, so one voxel has its own size;
- width_mm: mean width as the diameter of the circle with the cluster's mean
  cross-section (volume / length), the width of a tube of the same volume and length.
Per scan x region: cluster count, total and mean / median / SD (sample, n-1) /
min / max cluster volume, voxel count. Statistics of no clusters (or SD of one) are NaN.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from pingu_dask.analysis.regions import WHOLE_BRAIN
from pingu_dask.inputs import imaging

CLUSTER_COLUMNS = (
    "cluster",
    "region",
    "n_voxels",
    "volume_mm3",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
    "length_mm",
    "width_mm",
)


def cluster_measures(
    labels: np.ndarray, n_clusters: int, affine: np.ndarray, regions: list[str]
) -> dict[str, Any]:
    """Columns of CLUSTER_COLUMNS for clusters 1..n of `labels` (`regions` by cluster)."""
    flat = np.flatnonzero(labels)
    ids = labels.ravel()[flat].astype(np.int64)
    order = np.argsort(ids, kind="stable")
    flat, ids = flat[order], ids[order] - 1
    ijk = np.column_stack(np.unravel_index(flat, labels.shape)).astype(np.float64)
    xyz = nib.affines.apply_affine(affine, ijk)

    n_voxels = np.bincount(ids, minlength=n_clusters).astype(np.int64)
    safe = np.maximum(n_voxels, 1)[:, None]
    centroid = np.stack([np.bincount(ids, xyz[:, a], n_clusters) for a in range(3)], 1) / safe
    centred = xyz - centroid[ids]
    covariance = np.empty((n_clusters, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            moment = np.bincount(ids, centred[:, a] * centred[:, b], n_clusters) / safe[:, 0]
            covariance[:, a, b] = covariance[:, b, a] = moment
    _, vectors = np.linalg.eigh(covariance)
    axis = vectors[:, :, -1]  # eigenvector of the largest eigenvalue, per cluster
    projection = np.einsum("ij,ij->i", centred, axis[ids])
    starts = np.searchsorted(ids, np.arange(n_clusters))
    spread = np.zeros(n_clusters)
    if len(ids):
        spread = np.maximum.reduceat(projection, starts) - np.minimum.reduceat(projection, starts)
    # Size of one voxel along the axis: |edge vectors . axis| summed over the 3 edges.
    voxel_extent = np.abs(axis @ np.asarray(affine, dtype=np.float64)[:3, :3]).sum(axis=1)
    length = spread + voxel_extent
    volume = n_voxels * imaging.voxel_volume(affine)
    width = 2.0 * np.sqrt(volume / (np.pi * length)) if n_clusters else np.zeros(0)
    return {
        "cluster": np.arange(1, n_clusters + 1, dtype=np.int64),
        "region": list(regions),
        "n_voxels": n_voxels,
        "volume_mm3": volume,
        "centroid_x_mm": centroid[:, 0],
        "centroid_y_mm": centroid[:, 1],
        "centroid_z_mm": centroid[:, 2],
        "length_mm": length,
        "width_mm": width,
    }


def region_summary(
    volumes: np.ndarray, n_voxels: np.ndarray, regions: list[str], names: tuple[str, ...]
) -> list[dict]:
    """One row per region in `names` (plus whole_brain when absent) from per-cluster values."""
    volumes, n_voxels = np.asarray(volumes, float), np.asarray(n_voxels, np.int64)
    regions_array = np.asarray(regions, dtype=object)
    rows = []
    for name in (*[n for n in names if n != WHOLE_BRAIN], WHOLE_BRAIN):
        chosen = np.ones(len(volumes), bool) if name == WHOLE_BRAIN else regions_array == name
        rows.append({"region": name, **_volume_statistics(volumes[chosen], n_voxels[chosen])})
    return rows


def _volume_statistics(volumes: np.ndarray, n_voxels: np.ndarray) -> dict:
    count = len(volumes)
    nan = float("nan")
    return {
        "n_clusters": count,
        "n_voxels": int(n_voxels.sum()),
        "total_volume_mm3": float(volumes.sum()),
        "mean_volume_mm3": float(volumes.mean()) if count else nan,
        "median_volume_mm3": float(np.median(volumes)) if count else nan,
        "sd_volume_mm3": float(volumes.std(ddof=1)) if count > 1 else nan,
        "min_volume_mm3": float(volumes.min()) if count else nan,
        "max_volume_mm3": float(volumes.max()) if count else nan,
    }
