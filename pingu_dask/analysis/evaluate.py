"""Agreement between a predicted PVS mask and a reference: voxel Dice and cluster F1.

Cluster-level detection uses the symmetric definition: recall is the share of reference
clusters touched by any predicted voxel, precision the share of predicted clusters
touched by any reference voxel, F1 their harmonic mean. (SHiVAi takes the precision
count from the reference side, a known quirk; we do not.) Both empty -> 1, one empty -> 0.

Count agreement (count_agreement) is what clinical users ask for beside Dice: does the
model count as many PVS, and as much PVS volume, as the rater, scan by scan? Lin's
concordance correlation coefficient, Pearson r and Bland-Altman bias with 95 % limits
of agreement, per site and region, across scans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from pingu_dask.analysis.clusters import label_clusters
from pingu_dask.analysis.regions import RESERVED, WHOLE_BRAIN


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
    voxel_volume_mm3: float = 1.0,
) -> list[dict]:
    """Voxel Dice and cluster precision / recall / F1 per region and for the whole brain.

    Both masks are restricted to the region first (as in the PINGU paper), so a
    cluster that crosses a border is judged in each region by its part there.
    `region_codes` (0 = outside, i = names[i]) is None without a parcellation; then
    only the whole brain is evaluated. The masks are used as given: filtering either
    one (the pipeline's size filter, exclusions) is the caller's choice. Volumes in mm³
    (`voxel_volume_mm3` per voxel) make count agreement comparable across sites.
    """
    p, r = prediction > 0, reference > 0
    areas: list[tuple[str, int | None]] = [(WHOLE_BRAIN, None)]
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
                "predicted_volume_mm3": float(p_in.sum()) * voxel_volume_mm3,
                "reference_volume_mm3": float(r_in.sum()) * voxel_volume_mm3,
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


# --- count agreement ------------------------------------------------------------------
LOA_Z = 1.96  # Bland-Altman: 95 % of differences lie within bias ± 1.96 SD (normal)
# measure -> (predicted column, reference column) of the evaluation table
AGREEMENT_MEASURES = {
    "clusters": ("n_predicted_clusters", "n_reference_clusters"),
    "volume_mm3": ("predicted_volume_mm3", "reference_volume_mm3"),
}


@dataclass(frozen=True)
class Agreement:
    """How well one quantity (e.g. PVS count) agrees between prediction and reference.

    `bias` is the mean of predicted - reference (positive: the model finds more);
    `sd_difference` is the sample SD (ddof 1) of those differences, as Bland and Altman
    use it. NaN where a figure is undefined; `note` then says why.
    """

    n: int
    mean_predicted: float
    mean_reference: float
    ccc: float
    pearson_r: float
    bias: float
    sd_difference: float
    note: str = ""

    @property
    def loa_lower(self) -> float:
        return self.bias - LOA_Z * self.sd_difference

    @property
    def loa_upper(self) -> float:
        return self.bias + LOA_Z * self.sd_difference


def lin_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient, with population moments (1/n), as
    Lin (1989) defines it: 2 cov(x, y) / (var x + var y + (mean x - mean y)²).

    Unlike Pearson r it drops when y is shifted or scaled from x: it measures
    agreement with the identity line, not just a linear relation. NaN when it is 0/0
    (no pairs, or every value on both sides one and the same).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx**2).mean() + (dy**2).mean() + (x.mean() - y.mean()) ** 2
    if denominator == 0:
        return math.nan
    return float(2 * (dx * dy).mean() / denominator)


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r (scipy.stats.pearsonr); NaN with fewer than 2 pairs or no spread,
    where r is undefined (scipy would warn and return NaN anyway)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.pearsonr(x, y).statistic)


def agreement(predicted: np.ndarray, reference: np.ndarray) -> Agreement:
    """CCC, Pearson r and Bland-Altman bias / SD of predicted vs reference values.

    With fewer than 2 scans only the bias (and means) exist; with no spread on a side
    Pearson r is undefined and, when both sides are one and the same constant, CCC too.
    """
    p, r = np.asarray(predicted, float), np.asarray(reference, float)
    if len(p) == 0:
        nan = math.nan
        return Agreement(0, nan, nan, nan, nan, nan, nan, note="no scans")
    difference = p - r
    common: dict[str, Any] = {
        "n": len(p),
        "mean_predicted": float(p.mean()),
        "mean_reference": float(r.mean()),
    }
    if len(p) < 2:
        return Agreement(
            **common,
            ccc=math.nan,
            pearson_r=math.nan,
            bias=float(difference.mean()),
            sd_difference=math.nan,
            note="n < 2: CCC, r and limits undefined",
        )
    ccc, r_value = lin_ccc(p, r), pearson_r(p, r)
    undefined = [name for name, value in (("CCC", ccc), ("r", r_value)) if math.isnan(value)]
    notes = [f"{name} undefined (no spread)" for name in undefined]
    return Agreement(
        **common,
        ccc=ccc,
        pearson_r=r_value,
        bias=float(difference.mean()),
        sd_difference=float(difference.std(ddof=1)),
        note="; ".join(notes),
    )


AGREEMENT_COLUMNS = [
    "site",
    "region",
    "measure",
    "n",
    "mean_predicted",
    "mean_reference",
    "ccc",
    "pearson_r",
    "bias",
    "sd_difference",
    "loa_lower",
    "loa_upper",
    "note",
]


def count_agreement(evaluation: pd.DataFrame, regions: tuple[str, ...] = ()) -> pd.DataFrame:
    """Agreement of PVS count and volume across scans, per site and region, and over
    all sites (site `all`): one row per (site, region, measure), AGREEMENT_COLUMNS.

    Counts are those of the evaluation table (both masks restricted to the region,
    so a cluster crossing a border counts in each region). Rows without the measure
    (tables written before volumes were recorded) are left out of `n`.
    """
    frame = evaluation.assign(site=evaluation["site"].fillna("-"))
    chosen = list(regions) or list(dict.fromkeys(frame["region"]))
    frame = frame[frame["region"].isin(chosen)]
    rows = []
    for site in [*sorted(set(frame["site"])), "all"]:
        at_site = frame if site == "all" else frame[frame["site"] == site]
        for region in chosen:
            in_region = at_site[at_site["region"] == region]
            for measure, columns in AGREEMENT_MEASURES.items():
                result = agreement(*_pairs(in_region, *columns))
                rows.append({"site": site, "region": region, "measure": measure, **_as_row(result)})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def _pairs(frame: pd.DataFrame, p_column: str, r_column: str) -> tuple[np.ndarray, np.ndarray]:
    """The (predicted, reference) values of the rows that have both."""
    if p_column not in frame or r_column not in frame:
        return np.array([]), np.array([])
    pairs = frame[[p_column, r_column]].astype(float).dropna()
    return pairs[p_column].to_numpy(), pairs[r_column].to_numpy()


def _as_row(result: Agreement) -> dict:
    row = {name: getattr(result, name) for name in AGREEMENT_COLUMNS[3:-1]}
    return {**row, "note": result.note}


def reference_handling(evaluation: pd.DataFrame) -> str:
    """How the table's reference masks were treated, in words, for captions: whether
    Dice was taken against ground truth as given or against a filtered reference."""
    column = evaluation.get("reference_filtered", pd.Series([None] * len(evaluation)))
    seen = {None if pd.isna(v) else bool(v) for v in column}
    if not seen:
        return ""
    words = {
        False: "reference masks as given",
        True: "reference masks filtered like the prediction (--filter-reference; inflates Dice)",
        None: "reference masks filtered like the prediction (a table from before this was "
        "recorded)",
    }
    if len(seen) == 1:
        return words[seen.pop()]
    return "reference masks treated differently across scans: " + "; ".join(
        words[v] for v in (False, True, None) if v in seen
    )
