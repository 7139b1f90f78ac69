"""Tables a statistician opens: one row per manifest scan (wide) or per scan x region (long).

The Parquet parts under OUT/tables are the record; SPSS, Stata, Excel and many R users
cannot read Parquet, and the parts hold no row at all for a scan that failed, so a
cohort's denominator is lost. `pingu-dask export` writes one file from them:

- wide: one row per scan of the latest run's manifest, failed, invalid and never
  attempted ones included: scan_id, subject, session, site, status, reason, flags,
  the scan facts OUT records (SCAN_FACTS: region source, brain rule, ICV, voxel size),
  then `<region>_<measure>`, and for a model with non-PVS labels (e.g. WMH) their
  volumes, `<label>_volume_mm3`.
- long: one row per scan x region, the same scan columns, `region`, the measures. A
  scan without a result (failed, invalid, not run) gets one row per region with empty
  measures, so the long table is the complete scan x region grid: dplyr's
  group_by(region) counts every scan in every region, empty means "not measured", and
  tidyr::pivot_wider() of it gives the wide table back.

Empty cells mean "not measured", never zero: counts are nullable integers (pandas
Int64), so a failed scan's n_clusters is empty, not 0 or 0.0. Numbers are rounded to a
stated precision (VOLUME_DECIMALS decimals for mm³, FRACTION_DIGITS significant digits
for volume fractions and voxel sizes), through their decimal text, so a CSV shows
389.632, never the float noise 389.63201400372355.

Where the status comes from: OUT/tables/scans (output/scans.py; one row per manifest
scan with status, reason and the scan's facts), which the run rewrites at its end.
Where it is missing (an OUT written before it existed) or stale (a run going on, a
driver killed outright), the same rows are made from the ledger: the latest attempt
per scan of the latest manifest (ledger.write_manifest_scans), not_run without one,
and that run's invalid manifest rows; subject and session of scans without results
then come from the run's manifest, if it is still the file run.json fingerprinted.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from pingu_dask.errors import PinguError
from pingu_dask.inputs.manifest import read_manifest_file
from pingu_dask.output import layout, ledger, parts, tables
from pingu_dask.output.files import atomic_path
from pingu_dask.output.parts import LEDGER
from pingu_dask.output.scans import NOT_RUN, SCANS
from pingu_dask.records import Status, column_name

VOLUME_DECIMALS = 3  # mm³: 0.001 mm³ is far below one voxel (0.5 mm voxels are 0.125 mm³)
FRACTION_DIGITS = 6  # significant digits of a volume fraction (often ~1e-3)
NOT_RUN_REASON = "no attempt recorded: the run stopped before it (the same command resumes)"
STATUSES = (Status.OK.value, Status.FAILED.value, Status.INVALID.value, NOT_RUN)

IDENTITY = ("scan_id", "subject", "session", "site")
SCAN_COLUMNS = (*IDENTITY, "status", "reason", "flags")
#: What the run learnt of each scan, exported where OUT records it (scans table, ledger).
SCAN_FACTS = (
    "region_source",
    "brain_rule",
    "icv_mm3",
    "voxel_size_x_mm",
    "voxel_size_y_mm",
    "voxel_size_z_mm",
)
MEASURES = (
    "n_clusters",
    "total_volume_mm3",
    "mean_volume_mm3",
    "median_volume_mm3",
    "sd_volume_mm3",
    "min_volume_mm3",
    "max_volume_mm3",
)
OPTIONAL_MEASURES = ("tissue_volume_mm3", "pvs_volume_fraction")  # when the regions have them
COUNTS = ("n_clusters",)
FRACTIONS = ("pvs_volume_fraction",)  # to FRACTION_DIGITS significant digits, as are
VOXEL_SIZES = ("voxel_size_x_mm", "voxel_size_y_mm", "voxel_size_z_mm")  # (float32 headers)

LAYOUTS = ("wide", "long")
FORMATS = {"csv": ",", "tsv": "\t", "parquet": None}
STDOUT = "-"

PRECISION = (
    f"volumes (mm³) to {VOLUME_DECIMALS} decimals, volume fractions and voxel sizes to "
    f"{FRACTION_DIGITS} significant digits, counts as integers; empty cells: not measured "
    "(never 0)"
)

_LINE_BREAKS = re.compile(r"[\r\n\t]+")


class ExportError(PinguError):
    """OUT cannot be exported (not a pingu-dask output, nothing recorded, a bad choice)."""


# --- the tables ----------------------------------------------------------------------


def wide_table(out: Path) -> pd.DataFrame:
    """One row per manifest scan: scan columns, then `<region>_<measure>` columns
    (regions in the region table's order, `other` and `whole_brain` last)."""
    scans, measures, regions, names = _parts(out)
    grid = pd.MultiIndex.from_product([regions, names])
    spread = measures.pivot(index="scan_id", columns="region", values=names)
    spread = spread.swaplevel(axis=1).reindex(columns=grid)
    spread.columns = [f"{region}_{measure}" for region, measure in grid]
    wide = scans.merge(spread, how="left", left_on="scan_id", right_index=True)
    structures = structure_volumes(out)
    wide = wide.merge(structures, how="left", left_on="scan_id", right_index=True)
    return _typed(_unmeasured(wide, [*spread.columns, *structures.columns]))


def structure_volumes(out: Path) -> pd.DataFrame:
    """`<label>_volume_mm3` per scan (index) for the model's non-PVS labels (e.g.
    wmh_volume_mm3): studies put WMH volume beside PVS counts. No columns for a model
    that labels PVS only."""
    structures = tables.read_table(out, "structures")
    if structures.empty:
        return pd.DataFrame(index=pd.Index([], name="scan_id"))
    structures = structures.drop_duplicates(["scan_id", "label"], keep="last")
    column = structures.label.map(lambda name: f"{column_name(name) or 'label'}_volume_mm3")
    spread = structures.assign(column=column).pivot(
        index="scan_id", columns="column", values="volume_mm3"
    )
    spread.columns = list(spread.columns)
    return spread


def long_table(out: Path) -> pd.DataFrame:
    """One row per manifest scan x region (every region for every scan, see the module
    docstring): scan columns, `region`, then the measures."""
    scans, measures, regions, names = _parts(out)
    grid = scans.merge(pd.DataFrame({"region": regions}), how="cross")
    long = grid.merge(measures, how="left", on=["scan_id", "region"])
    return _typed(_unmeasured(long, names))


def _unmeasured(frame: pd.DataFrame, measures: list[str]) -> pd.DataFrame:
    """Measures only on ok rows: an invalid manifest row that repeats a good scan's id
    (a duplicate row) must not show that scan's figures."""
    frame = frame.reset_index(drop=True)
    frame.loc[frame.status != Status.OK.value, measures] = None
    return frame


def export_table(out: Path, layout_name: str) -> pd.DataFrame:
    """wide_table or long_table by name."""
    if layout_name not in LAYOUTS:
        raise ExportError(f"layout {layout_name!r}: choose one of {', '.join(LAYOUTS)}")
    return wide_table(out) if layout_name == "wide" else long_table(out)


def _parts(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str]]:
    """(scan rows, rounded regions rows, region order, measure names) of OUT."""
    out = Path(out)
    if not (out / parts.TABLES).is_dir():
        raise ExportError(f"{out} is not a pingu-dask output directory (no tables folder)")
    regions = tables.read_table(out, "regions")
    scans = scan_rows(out, regions)
    if scans.empty:
        raise ExportError(f"{out}: no scans recorded (no ledger rows, no scans table)")
    regions = regions[regions.scan_id.isin(set(scans.scan_id))]
    names = [*MEASURES, *(m for m in OPTIONAL_MEASURES if _has_values(regions, m))]
    measures = rounded(
        regions[["scan_id", "region", *names]].drop_duplicates(["scan_id", "region"])
    )
    order = region_order(layout.read_run_json(out), regions["region"])
    return scans, measures, order, names


def region_order(run: dict | None, present: Iterable[str]) -> list[str]:
    """The regions the tables hold, in the run's region table order, `other` then
    `whole_brain` last, any other region after them; whole_brain alone when none."""
    present = list(dict.fromkeys(present))
    known = [*((run or {}).get("regions", {}).get("regions", {}) or {}), "other", "whole_brain"]
    order = [r for r in known if r in present] + [r for r in present if r not in known]
    return order or ["whole_brain"]


def scan_rows(out: Path, regions: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per scan of the latest manifest: SCAN_COLUMNS, then those of
    SCAN_FACTS that OUT records; from OUT/tables/scans, or from the ledger where that
    table is missing or stale (see _scans_table).

    A scan whose status says ok but which has no regions rows (they were removed for a
    redo that has not happened yet) is reported as not run: its old figures are gone.
    """
    out = Path(out)
    regions = tables.read_table(out, "regions") if regions is None else regions
    attempts = tables.read_table(out, LEDGER)
    scans = _scans_table(out, attempts)
    if scans is None:
        scans = _from_ledger(out, attempts, regions)
    measured = set(regions.scan_id)
    lost = (scans.status == Status.OK.value) & ~scans.scan_id.isin(measured)
    scans.loc[lost, "status"] = NOT_RUN
    scans.loc[lost, "reason"] = (
        "ok in the ledger but no rows in OUT/tables/regions (removed to be redone): "
        "the same run command redoes it"
    )
    waiting = (scans.status == NOT_RUN) & scans.reason.isna()
    scans.loc[waiting, "reason"] = NOT_RUN_REASON
    for column in ("reason", "flags"):
        scans[column] = [
            None if pd.isna(v) else _LINE_BREAKS.sub(" ", str(v)).strip() or None
            for v in scans[column]
        ]
    facts = [c for c in SCAN_FACTS if c in scans and scans[c].notna().any()]
    if "brain_rule" in facts:  # 1/0: every statistics package reads it as a number
        scans["brain_rule"] = (
            scans["brain_rule"].map(lambda v: pd.NA if pd.isna(v) else int(bool(v))).astype("Int64")
        )
    return scans[[*SCAN_COLUMNS, *facts]].reset_index(drop=True)


def _scans_table(out: Path, attempts: pd.DataFrame) -> pd.DataFrame | None:
    """OUT/tables/scans, or None where the run wrote none or it is stale.

    The run rewrites it at its end (also after Ctrl-C), so while a run goes, or after
    a driver was killed outright, it can be behind: stale when the latest manifest's
    scans are not its scans, or when the ledger holds an attempt that finished after
    every attempt it knows. The ledger has the same facts, so nothing is lost then.
    """
    if SCANS not in tables.SCHEMAS or not parts.parts(out, SCANS):
        return None
    table = tables.read_table(out, SCANS).drop_duplicates("scan_id", keep="last")
    valid = table[table.status != Status.INVALID.value]
    current = _manifest_scan_ids(out)
    if current is not None and set(valid.scan_id) != set(current):
        return None
    tried = attempts.loc[attempts.status != Status.INVALID.value, "finished"].max()
    known = valid["finished"].max() if "finished" in valid else pd.NaT
    if pd.notna(tried) and (pd.isna(known) or tried > known):
        return None
    table = table.copy()
    table["flags"] = [_joined(v) for v in table["flags"]] if "flags" in table else None
    return table


def _joined(value: object) -> str | None:
    """Flags as one ';'-joined string (a list of flags or one already joined)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    if isinstance(value, str):
        return value or None
    return ";".join(str(flag) for flag in value) or None  # type: ignore[attr-defined]


def _from_ledger(out: Path, attempts: pd.DataFrame, regions: pd.DataFrame) -> pd.DataFrame:
    """Scan rows from the ledger: the latest attempt of each manifest scan (not_run
    without one), with the facts its row carries, then the latest run's invalid
    manifest rows. Reasons read as the scans table's: 'ErrorType: message'."""
    latest = ledger.latest_attempts(out, attempts).set_index("scan_id")
    current = _manifest_scan_ids(out)
    # An OUT from before manifest scans were kept: the scans of its ledger.
    ids = sorted(latest.index) if current is None else current
    facts = [c for c in ("flags", *SCAN_FACTS) if c in latest]
    rows = []
    for scan_id in ids:
        row: dict = {"scan_id": scan_id, "status": NOT_RUN}
        if scan_id in latest.index:
            attempt = latest.loc[scan_id]
            row.update({c: attempt[c] for c in ("site", "status", *facts)})
            if attempt["status"] != Status.OK.value:
                row["reason"] = f"{attempt['error_type']}: {attempt['message']}"
        rows.append(row)
    latest_run = attempts.sort_values("finished")["run_id"].iloc[-1] if len(attempts) else None
    invalid = attempts[(attempts.status == Status.INVALID.value) & (attempts.run_id == latest_run)]
    for entry in invalid.itertuples():
        reason = f"{entry.error_type}: {entry.message}"
        rows.append({"scan_id": entry.scan_id, "status": entry.status, "reason": reason})
    scans = pd.DataFrame(rows, columns=["scan_id", "site", "status", "reason", *facts])
    scans = scans.astype({"site": object, "reason": object})
    identity = _identity(out, regions)
    for column in ("subject", "session", "site"):
        here = (
            scans[column] if column in scans else pd.Series(None, index=scans.index, dtype=object)
        )
        scans[column] = here.where(here.notna(), scans["scan_id"].map(identity[column]))
    if "flags" not in scans:
        scans["flags"] = None
    return scans


def _manifest_scan_ids(out: Path) -> list[str] | None:
    """ledger.manifest_scans in the manifest's order (it gives a set)."""
    path = Path(out) / ledger.MANIFEST_SCANS
    if not path.exists():
        return None
    return list(dict.fromkeys(pq.read_table(path)["scan_id"].to_pylist()))


def _identity(out: Path, regions: pd.DataFrame) -> pd.DataFrame:
    """subject, session and site by scan id: the regions rows (scans with results),
    else the manifest run.json names, when it is still the file that run read."""
    known = regions.drop_duplicates("scan_id").set_index("scan_id")[["subject", "session", "site"]]
    manifest = _manifest_identity(out)
    if manifest is not None:
        known = known.combine_first(manifest)
    return known


def _manifest_identity(out: Path) -> pd.DataFrame | None:
    info = (layout.read_run_json(out) or {}).get("manifest") or {}
    path = Path(info.get("path") or "")
    if not info.get("path") or not path.is_file():
        return None
    if hashlib.sha256(path.read_bytes()).hexdigest() != info.get("sha256"):
        return None  # the manifest changed since: its rows may not be that run's
    try:
        manifest = read_manifest_file(path)
    except (OSError, ValueError):
        return None
    if "scan_id" not in manifest:
        return None
    manifest = manifest.drop_duplicates("scan_id").set_index("scan_id")
    columns = {c: manifest.get(c) for c in ("subject", "session", "site")}
    frame = pd.DataFrame(columns, index=manifest.index)
    return frame.replace("", None)


def _has_values(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and bool(frame[column].notna().any())


# --- rounding and types --------------------------------------------------------------


def round_decimals(values: pd.Series, decimals: int = VOLUME_DECIMALS) -> pd.Series:
    """Rounded through the decimal text (exact: 389.632, never 389.63200000000001)."""
    return values.map(lambda v: v if pd.isna(v) else float(f"{v:.{decimals}f}")).astype(float)


def round_significant(values: pd.Series, digits: int = FRACTION_DIGITS) -> pd.Series:
    """To `digits` significant digits, through the decimal text."""
    return values.map(lambda v: v if pd.isna(v) else float(f"{v:.{digits}g}")).astype(float)


def rounded(frame: pd.DataFrame) -> pd.DataFrame:
    """Volumes (columns ending in _mm3) to VOLUME_DECIMALS, fractions to FRACTION_DIGITS
    significant digits, counts as nullable integers."""
    frame = frame.copy()
    for column in frame.columns:
        if column.endswith("_mm3"):
            frame[column] = round_decimals(frame[column].astype(float))
        elif column.endswith(FRACTIONS) or column in VOXEL_SIZES:
            frame[column] = round_significant(frame[column].astype(float))
        elif column.endswith(COUNTS):
            frame[column] = frame[column].astype("Int64")
    return frame


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns as pandas strings, counts as Int64, numbers rounded (the merges
    make missing counts float)."""
    frame = rounded(frame)
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].astype("string")
    return frame


# --- files ---------------------------------------------------------------------------


def default_path(out: Path, layout_name: str, fmt: str) -> Path:
    """OUT/export/pvs_<layout>.<format>: beside the run's other outputs."""
    return Path(out) / layout.EXPORT / f"pvs_{layout_name}.{fmt}"


def format_of(path: str | Path | None, fmt: str | None) -> str:
    """The format asked for, else the one --out's extension names, else csv."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(str(path)).suffix.lower().lstrip(".") if path and path != STDOUT else ""
    return suffix if suffix in FORMATS else "csv"


def write_export(frame: pd.DataFrame, path: str | Path, fmt: str) -> Path | None:
    """Write the table as csv, tsv (UTF-8, header row, empty cells for missing values)
    or parquet; atomically into place; "-" writes csv/tsv to standard output.

    Returns the path written (None for standard output)."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if str(path) == STDOUT:
        if fmt == "parquet":
            raise ExportError("parquet cannot go to standard output: give --out FILE")
        frame.to_csv(sys.stdout, sep=FORMATS[fmt], index=False, lineterminator="\n")
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        if fmt == "parquet":
            frame.to_parquet(temporary, index=False)
        else:
            frame.to_csv(
                temporary, sep=FORMATS[fmt], index=False, lineterminator="\n", encoding="utf-8"
            )
    return path
