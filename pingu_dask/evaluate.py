"""Agreement between a predicted PVS mask and a reference: voxel Dice and cluster F1.

Cluster-level detection uses the symmetric definition: recall is the share of reference
clusters touched by any predicted voxel, precision the share of predicted clusters
touched by any reference voxel, F1 their harmonic mean. (SHiVAi takes the precision
count from the reference side, a known quirk; we do not.) Both empty -> 1, one empty -> 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pingu_dask.postprocess import label_clusters
from pingu_dask.regions import RESERVED, WHOLE_BRAIN


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


def evaluate_by_region(
    prediction: np.ndarray,
    reference: np.ndarray,
    region_codes: np.ndarray | None,
    names: tuple[str, ...],
    connectivity: int = 26,
) -> list[dict]:
    """Voxel Dice and cluster precision / recall / F1 per region and for the whole brain.

    Both masks are restricted to the region first (as in the PINGU paper), so a
    cluster that crosses a border is judged in each region by its part there.
    `region_codes` (0 = outside, i = names[i]) is None without a parcellation; then
    only the whole brain is evaluated. Pass masks that went through the pipeline's
    clean_mask, so the size filter and exclusions are shared.
    """
    p, r = prediction > 0, reference > 0
    areas = [(WHOLE_BRAIN, None)]
    if region_codes is not None:
        areas = [(name, code) for code, name in enumerate(names) if name not in RESERVED] + areas
    rows = []
    for name, code in areas:
        inside = np.ones(p.shape, bool) if code is None else region_codes == code
        p_in, r_in = p & inside, r & inside
        clusters = cluster_agreement(p_in, r_in, connectivity)
        rows.append(
            {
                "region": name,
                "voxel_dice": voxel_dice(p_in, r_in),
                "cluster_precision": clusters.precision,
                "cluster_recall": clusters.recall,
                "cluster_f1": clusters.f1,
                "n_predicted_clusters": clusters.n_predicted,
                "n_reference_clusters": clusters.n_reference,
                "predicted_voxels": int(p_in.sum()),
                "reference_voxels": int(r_in.sum()),
            }
        )
    return rows


def summarise(evaluation: pd.DataFrame, regions: tuple[str, ...] = ()) -> pd.DataFrame:
    """Mean and SD of voxel Dice and cluster F1 per site and overall, by region (wide).

    Rows: each site, then `all`; columns: (region, measure, mean|sd), as the PINGU
    paper reports them. `regions` picks and orders the regions (default: all present).
    """
    frame = evaluation.copy()
    frame["site"] = frame["site"].fillna("-")
    chosen = list(regions) or list(dict.fromkeys(frame["region"]))
    frame = frame[frame["region"].isin(chosen)]
    measures = ["voxel_dice", "cluster_f1"]
    per_site = frame.groupby(["site", "region"])[measures].agg(["mean", "std"])
    overall = frame.groupby("region")[measures].agg(["mean", "std"])
    overall.index = pd.MultiIndex.from_product([["all"], overall.index], names=["site", "region"])
    table = pd.concat([per_site, overall])
    counts = pd.concat(
        [frame.groupby("site")["scan_id"].nunique(), pd.Series({"all": frame["scan_id"].nunique()})]
    )
    wide = table.unstack("region")
    sites = sorted(s for s in wide.index if s != "all")
    wide = wide.reindex([*sites, "all"])
    wide.columns = wide.columns.reorder_levels([2, 0, 1])
    wide = wide.reindex(columns=pd.MultiIndex.from_product([chosen, measures, ["mean", "std"]]))
    wide.insert(0, ("n_scans", "", ""), counts.reindex(wide.index).astype(int))
    return wide
