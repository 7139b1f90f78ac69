"""From a binary PVS mask to clusters (connected components, via cc3d)."""

from __future__ import annotations

import cc3d
import numpy as np

CONNECTIVITIES = (6, 18, 26)


def label_clusters(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask: (labels uint32, number of clusters).

    26-connectivity (voxels touching by a face, edge or corner) is the common choice
    for PVS (SHiVAi, scikit-image's 3D default); 6 and 18 appear in Frangi pipelines.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    labels, count = cc3d.connected_components(
        np.ascontiguousarray(mask, dtype=bool), connectivity=connectivity, return_N=True
    )
    return labels, int(count)
