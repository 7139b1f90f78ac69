"""Agreement between a predicted PVS mask and a reference: voxel Dice and cluster F1.

Cluster-level detection uses the symmetric definition: recall is the share of reference
clusters touched by any predicted voxel, precision the share of predicted clusters
touched by any reference voxel, F1 their harmonic mean. (SHiVAi takes the precision
count from the reference side, a known quirk; we do not.) Both empty -> 1, one empty -> 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pingu_dask.postprocess import label_clusters


def voxel_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2|P∩R| / (|P| + |R|); 1.0 when both masks are empty."""
    p, r = prediction > 0, reference > 0
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int((p & r).sum()) / total


@dataclass(frozen=True)
class ClusterAgreement:
    n_predicted: int
    n_reference: int
    precision: float
    recall: float

    @property
    def f1(self) -> float:
        if self.precision + self.recall == 0:
            return 0.0
        return 2 * self.precision * self.recall / (self.precision + self.recall)


def cluster_agreement(
    prediction: np.ndarray, reference: np.ndarray, connectivity: int = 26
) -> ClusterAgreement:
    """Cluster-level precision / recall (detection), symmetric definition."""
    p, r = prediction > 0, reference > 0
    p_labels, n_p = label_clusters(p, connectivity)
    r_labels, n_r = label_clusters(r, connectivity)
    if n_p == 0 and n_r == 0:
        return ClusterAgreement(0, 0, 1.0, 1.0)
    detected = len(np.setdiff1d(np.unique(r_labels[p]), [0]))
    confirmed = len(np.setdiff1d(np.unique(p_labels[r]), [0]))
    recall = detected / n_r if n_r else 0.0
    precision = confirmed / n_p if n_p else 0.0
    return ClusterAgreement(n_p, n_r, precision, recall)
