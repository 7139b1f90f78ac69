"""The report's plots (matplotlib, headless), as PNG data URIs to embed in the page.

Embedded, so that the report opens anywhere without a server or the internet; PNG
rather than SVG, so that a plot of 10,000 scans weighs what a plot of 10 does.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd

REGION_TITLES = {
    "white_matter": "white matter",
    "basal_ganglia": "basal ganglia",
    "whole_brain": "whole brain",
}
MEASURE_TITLES = {"n_clusters": "PVS count", "total_volume_mm3": "PVS volume (mm³)"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def data_uri(figure) -> str:
    """A matplotlib figure as a data:image/png URI (the figure is closed)."""
    plt = pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def distributions(
    regions: pd.DataFrame, region_names: list[str], outliers: pd.DataFrame
) -> str | None:
    """Box plots of PVS count and volume per site (columns: regions), outliers in red."""
    if regions.empty or not region_names:
        return None
    plt = pyplot()
    measures = list(MEASURE_TITLES)
    figure, axes = plt.subplots(
        len(measures),
        len(region_names),
        figsize=(3.6 * len(region_names), 3.0 * len(measures)),
        squeeze=False,
    )
    flagged = set(zip(outliers.get("scan_id", []), outliers.get("region", []), strict=False))
    frame = regions.assign(site=regions["site"].fillna("-"))
    frame["outlier"] = [pair in flagged for pair in zip(frame.scan_id, frame.region, strict=True)]
    sites = sorted(frame["site"].unique())
    for row, measure in enumerate(measures):
        for column, region in enumerate(region_names):
            axis = axes[row][column]
            groups = dict(tuple(frame[frame["region"] == region].groupby("site")))
            per_site = [groups.get(site, frame.iloc[:0]) for site in sites]
            values = [group[measure].to_numpy() for group in per_site]
            axis.boxplot(values, showfliers=False, widths=0.6)
            for position, (group, data) in enumerate(zip(per_site, values, strict=True), start=1):
                jitter = np.random.default_rng(position).uniform(-0.15, 0.15, len(data))
                red = group["outlier"].to_numpy(dtype=bool)
                axis.scatter(position + jitter[~red], data[~red], s=14, alpha=0.6, color="#444")
                axis.scatter(position + jitter[red], data[red], s=30, color="#cf222e", zorder=3)
            axis.set_xticks(range(1, len(sites) + 1), sites, rotation=30, ha="right")
            if row == 0:
                axis.set_title(REGION_TITLES.get(region, region.replace("_", " ")))
            if column == 0:
                axis.set_ylabel(MEASURE_TITLES[measure])
    figure.tight_layout()
    return data_uri(figure)


def throughput(ledger: pd.DataFrame) -> str | None:
    """Scans finished over time (cumulative) per run, from the ledger's ok attempts."""
    ok = ledger[ledger["status"] == "ok"].dropna(subset=["finished"])
    if ok.empty:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 2.8))
    for run_id, rows in ok.groupby("run_id", sort=False):
        times = rows["finished"].sort_values()
        start = rows["started"].min()
        minutes = (times - start).dt.total_seconds().to_numpy() / 60
        axis.step(minutes, np.arange(1, len(minutes) + 1), where="post", label=f"run {run_id}")
    axis.set_xlabel("minutes since the run's first scan started")
    axis.set_ylabel("scans done")
    axis.grid(alpha=0.3)
    if ok["run_id"].nunique() > 1:
        axis.legend(fontsize=8)
    figure.tight_layout()
    return data_uri(figure)
