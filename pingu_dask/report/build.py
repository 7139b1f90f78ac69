"""`pingu-dask report OUT`: one HTML page about a run, OUT/report/index.html.

Read from the output directory only (run.json, the ledger, the regions and evaluation
tables, the QC pictures), so it can be made at any time, also while a run goes on, and
again after a resume. The page embeds its plots and opens without the internet; the QC
pictures are linked (../qc/), never copied. At 10,000 scans it stays small: tables of
failures and outliers are capped, the gallery shows the outliers first and the rest on
numbered pages of GALLERY_PAGE pictures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from pingu_dask.analysis.evaluate import count_agreement, reference_handling, summarise
from pingu_dask.analysis.regions import HEADLINE_REGIONS
from pingu_dask.errors import PinguError
from pingu_dask.inputs.manifest import region_sources_note
from pingu_dask.output import layout, ledger, tables
from pingu_dask.output.files import atomic_path
from pingu_dask.report import figures
from pingu_dask.version import __version__

MEASURES = ("n_clusters", "total_volume_mm3")
OUTLIER_MADS = 3.0  # robust z beyond which a scan is flagged, per site
MIN_SCANS_FOR_OUTLIERS = 5  # per site: fewer make the median and MAD meaningless
FAILURES_SHOWN = 20  # per error type
OUTLIERS_SHOWN = 200
GALLERY_FIRST = 48  # pictures on the report page itself
GALLERY_PAGE = 100  # pictures per further gallery page


class ReportError(PinguError, RuntimeError):
    """OUT holds no run to report on."""


def robust_outliers(regions: pd.DataFrame, threshold: float = OUTLIER_MADS) -> pd.DataFrame:
    """Scans whose PVS count or volume lies beyond `threshold` MADs of their site's
    median, per region. MAD is scaled by 1.4826 (the SD for normal data); a site with
    fewer than MIN_SCANS_FOR_OUTLIERS scans, or no spread at all, flags nothing."""
    rows = []
    frame = regions.assign(site=regions["site"].fillna("-"))
    for (site, region), group in frame.groupby(["site", "region"]):
        if len(group) < MIN_SCANS_FOR_OUTLIERS:
            continue
        for measure in MEASURES:
            values = group[measure].astype(float)
            median = values.median()
            spread = 1.4826 * (values - median).abs().median()
            if spread == 0:
                continue
            z = (values - median) / spread
            for index in np.flatnonzero(z.abs().to_numpy() > threshold):
                rows.append(
                    {
                        "scan_id": group["scan_id"].iloc[index],
                        "site": site,
                        "region": region,
                        "measure": measure,
                        "value": values.iloc[index],
                        "site_median": median,
                        "robust_z": z.iloc[index],
                    }
                )
    columns = ["scan_id", "site", "region", "measure", "value", "site_median", "robust_z"]
    outliers = pd.DataFrame(rows, columns=columns)
    order = outliers["robust_z"].abs().sort_values(ascending=False).index
    return outliers.loc[order].reset_index(drop=True)


@dataclass
class GalleryItem:
    scan_id: str
    site: str
    src: str  # relative to the report folder
    flags: str  # why it is an outlier, or ""


def gallery(out: Path, regions: pd.DataFrame, outliers: pd.DataFrame) -> list[GalleryItem]:
    """Every QC picture in OUT/qc, outliers first (most extreme first), then by id."""
    folder = Path(out) / layout.QC
    pictures = {p.stem: p for p in folder.glob("*.png")} if folder.is_dir() else {}
    sites = regions.drop_duplicates("scan_id").set_index("scan_id")["site"].to_dict()
    flags: dict[str, list[str]] = {}
    for row in outliers.itertuples():
        text = f"{row.region.replace('_', ' ')} {figures.MEASURE_TITLES[row.measure]}"
        flags.setdefault(row.scan_id, []).append(f"{text} z={row.robust_z:+.1f}")
    order = [s for s in dict.fromkeys(outliers["scan_id"]) if s in pictures]
    order += sorted(s for s in pictures if s not in flags)
    return [
        GalleryItem(s, sites.get(s) or "-", f"../{layout.QC}/{s}.png", "; ".join(flags.get(s, [])))
        for s in order
    ]


def site_summary(regions: pd.DataFrame, region_names: list[str]) -> pd.DataFrame:
    """Median [IQR] of PVS count and volume per site and region, and over all sites."""
    frame = regions[regions["region"].isin(region_names)].assign(site=regions["site"].fillna("-"))
    everyone = frame.assign(site="all")

    def describe(values: pd.Series) -> str:
        q1, median, q3 = values.quantile([0.25, 0.5, 0.75])
        return f"{median:.1f} [{q1:.1f}-{q3:.1f}]"

    rows = []
    for (site, region), group in pd.concat([frame, everyone]).groupby(["site", "region"]):
        rows.append(
            {
                "site": site,
                "region": region,
                "scans": group["scan_id"].nunique(),
                "PVS count": describe(group["n_clusters"]),
                "PVS volume mm³": describe(group["total_volume_mm3"]),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["order"] = table["site"].eq("all")
    return table.sort_values(["order", "site", "region"]).drop(columns="order")


def templates() -> jinja2.Environment:
    """The reports' templates (escaped, and a missing value is an error, not a blank)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("pingu_dask.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def build_report(out: Path) -> Path:
    """Write OUT/report/index.html (and gallery pages); return the index's path."""
    out = Path(out)
    run_info = layout.read_run_json(out)
    if run_info is None:
        raise ReportError(f"{out} holds no run (no {layout.RUN_JSON})")
    ledger_rows = tables.read_table(out, "ledger")
    summary = ledger.summarise_ledger(out, ledger_rows)
    regions = tables.read_table(out, "regions")
    evaluation = tables.read_table(out, "evaluation")
    # Only scans whose latest attempt is ok count (a redone scan's old rows are gone).
    region_names = [r for r in HEADLINE_REGIONS if r in set(regions.get("region", []))]
    outliers = robust_outliers(regions[regions["region"].isin(region_names)])
    items = gallery(out, regions, outliers)
    folder = out / layout.REPORT
    folder.mkdir(parents=True, exist_ok=True)
    rest = items[GALLERY_FIRST:]
    pages = [rest[i : i + GALLERY_PAGE] for i in range(0, len(rest), GALLERY_PAGE)]
    environment = templates()
    context = {
        "out": str(out.resolve()),
        "generated": generated(),
        "version": __version__,
        "run": run_info,
        "counts": summary.counts,
        "n_scans": run_info.get("n_scans"),
        # run.json's record of the manifest's region sources (run/provenance.py)
        "region_sources": run_info.get("region_sources"),
        "whole_brain_only": region_sources_note(run_info.get("region_sources")),
        "attempts": summary.attempts,
        "retried": summary.retried,
        "rate": summary.scans_per_minute,
        "failures": failure_groups(summary.failures),
        "site_summary": site_summary(regions, region_names).to_dict("records"),
        "distributions": figures.distributions(regions, region_names, outliers),
        "outliers": outliers.head(OUTLIERS_SHOWN).to_dict("records"),
        "n_outliers": len(outliers),
        "n_outlier_scans": outliers["scan_id"].nunique(),
        "evaluation": evaluation_rows(evaluation, region_names),
        "agreement": agreement_rows(evaluation, region_names),
        "reference_handling": reference_handling(evaluation) if not evaluation.empty else "",
        "throughput": figures.throughput(ledger_rows),
        "stage_seconds": stage_seconds(ledger_rows),
        "gallery": items[:GALLERY_FIRST],
        "n_pictures": len(items),
        "pages": [f"gallery-{n}.html" for n in range(1, len(pages) + 1)],
    }
    for number, page in enumerate(pages, start=1):
        html = environment.get_template("gallery.html.j2").render(
            context, gallery=page, page=number, first=GALLERY_FIRST + (number - 1) * GALLERY_PAGE
        )
        write_page(folder / f"gallery-{number}.html", html)
    for stale in folder.glob("gallery-*.html"):
        if stale.name not in context["pages"]:
            stale.unlink()
    index = folder / "index.html"
    write_page(index, environment.get_template("report.html.j2").render(context))
    return index


def failure_groups(failures: pd.DataFrame) -> list[dict]:
    """Failed and invalid scans grouped by error type, largest group first."""
    groups = []
    for error_type, group in failures.groupby(failures["error_type"].fillna("unknown")):
        rows = group[["scan_id", "site", "status", "message"]].head(FAILURES_SHOWN)
        groups.append(
            {"error_type": error_type, "count": len(group), "rows": rows.to_dict("records")}
        )
    return sorted(groups, key=lambda g: -g["count"])


def evaluation_rows(evaluation: pd.DataFrame, region_names: list[str]) -> list[dict] | None:
    """Per-site mean (SD) of voxel Dice and cluster F1, when references were given."""
    if evaluation.empty:
        return None
    wide = summarise(evaluation, tuple(region_names))
    rows = []
    for site, values in wide.iterrows():
        row = {"site": site, "scans": int(values[("n_scans", "", "")])}
        for region in region_names:
            for measure in ("voxel_dice", "cluster_f1"):
                mean, sd = values[(region, measure, "mean")], values[(region, measure, "std")]
                row[f"{region} {measure}"] = (
                    "-" if pd.isna(mean) else f"{mean:.2f} ({0 if pd.isna(sd) else sd:.2f})"
                )
        rows.append(row)
    return rows


def agreement_rows(evaluation: pd.DataFrame, region_names: list[str]) -> list[dict] | None:
    """Per site and region: PVS count and volume per scan, predicted against reference
    (means, Lin's CCC, Pearson r, Bland-Altman bias and 95 % limits), when references
    were given. Dice alone hides a model that finds half the PVS it should."""
    if evaluation.empty:
        return None
    table = count_agreement(evaluation, tuple(region_names))
    rows = []
    for row in table.itertuples():
        digits = 0 if row.measure == "volume_mm3" else 1
        rows.append(
            {
                "site": row.site,
                "region": row.region.replace("_", " "),
                "measure": "PVS volume mm³" if row.measure == "volume_mm3" else "PVS count",
                "scans": row.n,
                "predicted": _figure(row.mean_predicted, digits),
                "reference": _figure(row.mean_reference, digits),
                "CCC": _figure(row.ccc, 2),
                "r": _figure(row.pearson_r, 2),
                "bias": _figure(row.bias, digits),
                "95% limits": "-"
                if pd.isna(row.loa_lower)
                else f"{row.loa_lower:.{digits}f} to {row.loa_upper:.{digits}f}",
            }
        )
    return rows


def _figure(value: float, digits: int) -> str:
    return "-" if pd.isna(value) else f"{value:.{digits}f}"


def stage_seconds(ledger_rows: pd.DataFrame) -> list[dict]:
    """Median and 90th percentile of each stage's seconds over the ok attempts."""
    ok = ledger_rows[ledger_rows["status"] == "ok"]
    rows = []
    for stage in ("preprocess", "predict", "finish"):
        values = ok[f"seconds_{stage}"].dropna()
        if len(values):
            rows.append(
                {
                    "stage": stage,
                    "median": values.median(),
                    "p90": values.quantile(0.9),
                    "scans": len(values),
                }
            )
    return rows


def generated() -> str:
    """When a report page was made, as its footer says it."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def write_page(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
