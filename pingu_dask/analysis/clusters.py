"""From a predicted PVS mask to clusters: exclusion, size filter, connected components (cc3d).

The same functions serve the pipeline and the evaluation, so that a reference mask is
judged with exactly the clusters the pipeline would report.
"""

from __future__ import annotations

import cc3d
import numpy as np

from pingu_dask.config import PvsClusterRules

CONNECTIVITIES = (6, 18, 26)


def label_clusters(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask: (labels uint32, number of clusters).

    26-connectivity (voxels touching by a face, edge or corner) is the common choice
    for PVS (SHiVAi, scikit-image's 3D default); 6 and 18 appear in Frangi pipelines.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    labels, count = cc3d.connected_components(  # type: ignore[call-overload]  # stubs
        np.ascontiguousarray(mask, dtype=bool), connectivity=connectivity, return_N=True
    )
    return labels, int(count)


def clean_mask(
    mask: np.ndarray,
    voxel_volume_mm3: float,
    settings: PvsClusterRules,
    excluded: np.ndarray | None = None,
) -> np.ndarray:
    """The PVS mask a study reports: excluded voxels removed, then small clusters dropped.

    Exclusion comes first, so a cluster that leaks into a ventricle is judged by the
    part that remains. `excluded` marks the voxels of `settings.exclude_labels` on the
    mask's grid (see regions.excluded_voxels); None when there is no parcellation.
    """
    cleaned = np.ascontiguousarray(mask > 0)
    if excluded is not None:
        cleaned &= ~excluded
    threshold = settings.min_voxels_for(voxel_volume_mm3)
    if threshold > 1:
        # cc3d.dust removes components with fewer than `threshold` voxels.
        cleaned = cc3d.dust(  # type: ignore[call-overload]  # cc3d's stubs: literal arguments
            cleaned, threshold=threshold, connectivity=settings.connectivity
        )
    return cleaned


def find_clusters(
    mask: np.ndarray,
    voxel_volume_mm3: float,
    settings: PvsClusterRules,
    excluded: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """clean_mask, then label it: (cleaned bool mask, cluster labels, number of clusters)."""
    cleaned = clean_mask(mask, voxel_volume_mm3, settings, excluded)
    labels, count = label_clusters(cleaned, settings.connectivity)
    return cleaned, labels, count
