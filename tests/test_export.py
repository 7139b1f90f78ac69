"""`pingu-dask export`: wide and long tables in CSV, TSV and Parquet that pandas and DuckDB read.

The OUT is made by a real run (segment_scans on a real LocalCluster) of the real stages
around a stand-in model (scripts/benchkit/standins.py, test-only: no network). Each
scan has a tiny real image and, but for one, a real aseg-numbered parcellation, so the
real analysis writes the regions rows; the stand-in model here (PvsStandIn) puts a few
PVS into white matter, basal ganglia and cortex (`other`), seeded by the scan id, on
0.8 mm voxels stored as float32 (so volumes carry float noise, as real ones do). One
scan fails in predict, one manifest scan is never attempted, one manifest row is
invalid; run.json holds what run_cohort writes there (region table, manifest path and
SHA-256). What is checked: one wide row per manifest scan, failed ones with their
status and empty measures, the measures equal to the regions table's rounded as
stated, the long table as the complete scan x region grid, and the files as read back
by pandas and DuckDB. A slow test exports the demo's OUT after a failing scan is added.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from benchkit import standins
from click.testing import CliRunner

from pingu_dask.analysis.regions import ASEG
from pingu_dask.cli import main
from pingu_dask.config import InferenceSettings
from pingu_dask.errors import ErrorReport, Verdict
from pingu_dask.inputs.manifest import Problem, Scan, scan_columns
from pingu_dask.output import export, layout, ledger, tables
from pingu_dask.output import scans as scans_table
from pingu_dask.output.files import save_nifti
from pingu_dask.records import Status
from pingu_dask.run.loop import Segmentation, segment_scans

REGIONS = ASEG.names  # the run's region table: the pipeline's default (aseg numbers)
FAILING = "sub-03"  # fails in predict (a programming error: not retried)
NOT_RUN = "sub-05"  # in the manifest, never given to the runner
WHOLE_BRAIN_ONLY = "sub-04"  # no parcellation: its regions rows are whole_brain only
INVALID_ID = "sub-bad"  # an invalid manifest row
RUN_ID = "exporttest01"
MEASURES = [*export.MEASURES]

#: The scans' grid: the stand-ins' shape on 0.8 mm voxels (float32 in the header, so a
#: voxel is 0.5120000229 mm³ and every volume has float noise to round away).
AFFINE = np.diag([0.8, 0.8, 0.8, 1.0])
# The parcellation (aseg/SynthSeg numbers), by y row: 0 on the grid's border; inside,
# y 1-5 cerebral white matter (2 left of x 6, 41 right), y 6-8 putamen (12, 51), y 9-10
# cortex (3, 42: in no region of the table, so its clusters are counted as `other`).
LAYERS = {"white_matter": (1, 6, 2, 41), "basal_ganglia": (6, 9, 12, 51), "other": (9, 11, 3, 42)}
# Where PVS may lie: lines along z at these (x, y), a gap between any two (26-connected
# clusters stay apart), each wholly inside one layer.
PVS_SITES = {
    "white_matter": [(x, y) for y in (2, 4) for x in (2, 4, 6, 8)],
    "basal_ganglia": [(x, 7) for x in (2, 4, 6, 8)],
    "other": [(x, 10) for x in (2, 5, 8)],
}


def parcellation() -> np.ndarray:
    labels = np.zeros(standins.SHAPE, np.int16)
    for first, end, left, right in LAYERS.values():
        labels[1:6, first:end, 1:-1] = left
        labels[6:-1, first:end, 1:-1] = right
    return labels


@dataclass(frozen=True)
class PvsStandIn(standins.StandInModel):
    """The stand-in model (its control files still steer it), with PVS: in each layer a
    few lines along z of 6 to 8 voxels (min-cluster-voxels is 6), as many and as long
    as a generator seeded by the scan id says."""

    def predict(self, prepared: Any, inference: InferenceSettings, slot: int) -> np.ndarray:
        labels = super().predict(prepared, inference, slot)  # its failures, or all 0
        rng = np.random.default_rng(int(prepared.scan_id.removeprefix("sub-")))
        for region, sites in PVS_SITES.items():
            count = int(rng.integers(1, 4 if region == "other" else 5))
            for i in rng.choice(len(sites), size=count, replace=False):
                x, y = sites[i]
                labels[x, y, 2 : 2 + int(rng.integers(6, 9))] = 1
        return labels


def manifest_scans(folder: Path) -> list[Scan]:
    """sub-01 to sub-05 with their own noise image and (but WHOLE_BRAIN_ONLY) the
    parcellation, on AFFINE, written into folder/images."""
    images, sites = folder / "images", ("site-a", "site-b")
    scans = []
    for i in range(1, 6):
        scan_id = f"sub-{i:02d}"
        image = images / f"{scan_id}_T1w.nii.gz"
        parcels = None if scan_id == WHOLE_BRAIN_ONLY else images / f"{scan_id}_aseg.nii.gz"
        if not image.exists():
            noise = np.random.default_rng(i).uniform(10, 100, standins.SHAPE)
            save_nifti(image, noise.astype(np.float32), AFFINE)
            if parcels is not None:
                save_nifti(parcels, parcellation(), AFFINE, intent="label")
        channels = (("t1w", image),)
        scans.append(Scan(scan_id, channels, f"{i:02d}", "baseline", sites[i % 2], parcels))
    return scans


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OUT written by a real run on the stand-in model (see the module docstring)."""
    root = tmp_path_factory.mktemp("export")
    scans = manifest_scans(root)
    pipeline = standins.pipeline_in(root, model=PvsStandIn(root))
    (root / "type-error").write_text(FAILING)
    manifest = root / "manifest.csv"
    rows = [
        {**scan_columns(s), "t1w": str(s.channels[0][1]), "parcellation": s.parcellation or ""}
        for s in scans
    ]
    rows.append({"scan_id": INVALID_ID, "subject": "bad", "session": "", "site": "", "t1w": ""})
    pd.DataFrame(rows).to_csv(manifest, index=False)
    problem = Problem("no image path for channel 't1w'", 6, INVALID_ID, "t1w")
    invalid = ledger.invalid_rows([problem], RUN_ID)
    with standins.client_for_stand_ins(1, 2, sys.modules[__name__]) as client:
        results = segment_scans(
            client,
            Segmentation(
                scans=[s for s in scans if s.scan_id != NOT_RUN],
                pipeline=pipeline,
                watch=False,
                run_id=RUN_ID,
                extra_ledger_rows=invalid,
            ),
        )
    assert {r.scan_id: r.status for r in results} == {
        **{s.scan_id: "ok" for s in scans if s.scan_id != NOT_RUN}, FAILING: "failed"
    }  # fmt: skip
    # What run_cohort records beside the tables: the manifest's scan ids, run.json.
    ledger.write_manifest_scans(pipeline.out, [s.scan_id for s in scans])
    sha256 = hashlib.sha256(manifest.read_bytes()).hexdigest()
    run = {
        "regions": {"table": pipeline.regions.name, "regions": dict(pipeline.regions.regions)},
        "manifest": {"path": str(manifest), "sha256": sha256},
    }
    layout.write_json(pipeline.out / layout.RUN_JSON, run)
    return pipeline.out


def measures_of(out: Path) -> list[str]:
    regions = tables.read_table(out, "regions")
    optional = [m for m in export.OPTIONAL_MEASURES if m in regions and regions[m].notna().any()]
    return [*MEASURES, *optional]


def expected_value(measure: str, value: float) -> float:
    if measure in export.FRACTIONS:
        return float(f"{value:.6g}")
    return round(value, 3) if measure.endswith("_mm3") else value


def test_the_wide_table_has_one_row_per_manifest_scan_with_its_status(out: Path) -> None:
    wide = export.wide_table(out)
    expected = {f"sub-{i:02d}": "ok" for i in range(1, 6)}
    expected |= {FAILING: "failed", NOT_RUN: "not_run", INVALID_ID: "invalid"}
    assert dict(zip(wide.scan_id, wide.status, strict=True)) == expected
    assert len(wide) == len(expected)  # one row each
    assert list(wide.columns[:7]) == list(export.SCAN_COLUMNS)
    rows = wide.set_index("scan_id")
    # Identity for scans without results comes from the run's manifest.
    assert rows.loc[FAILING, ["subject", "session", "site"]].tolist() == [
        "03",
        "baseline",
        "site-b",
    ]
    assert rows.loc[NOT_RUN, "subject"] == "05"
    assert "unsupported operand" in rows.loc[FAILING, "reason"]
    assert "no image path for channel 't1w'" in rows.loc[INVALID_ID, "reason"]
    assert "the run stopped before it" in rows.loc[NOT_RUN, "reason"]
    assert pd.isna(rows.loc["sub-01", "reason"])
    # The facts the real stages report, after the scan columns: from the ledger.
    facts = ["region_source", "brain_rule", "voxel_size_x_mm", "voxel_size_y_mm",
             "voxel_size_z_mm"]  # fmt: skip
    assert list(wide.columns[7:12]) == facts
    assert rows.loc[["sub-01", "sub-02", WHOLE_BRAIN_ONLY], "region_source"].tolist() == [
        ASEG.name, ASEG.name, "none"
    ]  # fmt: skip
    assert rows.loc[["sub-01", "sub-02", WHOLE_BRAIN_ONLY], "brain_rule"].tolist() == [1, 1, 0]
    assert rows.loc["sub-01", "voxel_size_x_mm"] == 0.8  # float32 0.8, rounded
    assert rows.loc[[FAILING, NOT_RUN, INVALID_ID], facts].isna().all().all()
    measure_columns = [c for c in wide.columns if c not in (*export.SCAN_COLUMNS, *facts)]
    regions_order = [*REGIONS, "other", "whole_brain"]
    names = measures_of(out)
    assert measure_columns == [f"{r}_{m}" for r in regions_order for m in names]
    for scan_id in (FAILING, NOT_RUN, INVALID_ID):  # empty, not zero
        assert rows.loc[scan_id, measure_columns].isna().all(), scan_id
    # A scan without a parcellation: whole-brain figures, the rest empty.
    assert rows.loc[WHOLE_BRAIN_ONLY, "whole_brain_n_clusters"] >= 1
    assert rows.loc[WHOLE_BRAIN_ONLY, "white_matter_n_clusters"] is pd.NA
    assert str(wide["white_matter_n_clusters"].dtype) == "Int64"
    # Every measure equals the regions table's, rounded as stated.
    regions = tables.read_table(out, "regions").set_index(["scan_id", "region"])
    # sub-01, sub-02: the table's regions, other, whole_brain; sub-04: whole_brain
    assert len(regions) == 2 * (len(REGIONS) + 2) + 1
    # PVS where the model put them: so many clusters in WM, BG, other (seeded, see
    # PvsStandIn) and the sum in whole_brain.
    assert regions.loc[("sub-01", "white_matter"), "n_clusters"] >= 1
    assert regions.loc[("sub-02", "thalamus"), "n_clusters"] == 0
    for scan_id in ("sub-01", "sub-02"):
        counts = regions.loc[scan_id, "n_clusters"]
        assert counts["whole_brain"] == counts.drop("whole_brain").sum() >= 3
    volumes = regions.total_volume_mm3  # real float32 voxel volumes: float noise to round
    assert (volumes != volumes.round(3)).any()
    compared = 0
    for (scan_id, region), row in regions.iterrows():
        for measure in names:
            got, value = rows.loc[scan_id, f"{region}_{measure}"], row[measure]
            if pd.isna(value):
                assert pd.isna(got)
                continue
            assert got == expected_value(measure, value), (scan_id, region, measure)
            compared += 1
    assert compared >= 9 * 6


def test_the_long_table_is_the_scan_by_region_grid(out: Path) -> None:
    long, wide = export.long_table(out), export.wide_table(out)
    regions = [*REGIONS, "other", "whole_brain"]
    assert len(long) == len(wide) * len(regions)
    assert (long.groupby("scan_id").region.apply(list) == [regions] * len(wide)).all()
    assert str(long.n_clusters.dtype) == "Int64"
    failed = long[long.scan_id == FAILING]
    assert set(failed.status) == {"failed"} and failed[measures_of(out)].isna().all().all()
    # Spread back out, it is the wide table (what tidyr::pivot_wider gives).
    spread = long.pivot(index="scan_id", columns="region", values=measures_of(out))
    spread.columns = [f"{region}_{measure}" for measure, region in spread.columns]
    indexed = wide.set_index("scan_id")
    spread = spread.reindex(indexed.index)
    for column in spread.columns:
        pd.testing.assert_series_equal(
            spread[column].astype("Float64"), indexed[column].astype("Float64"),
            check_names=False, check_index=False,
        )  # fmt: skip


def query(sql: str) -> duckdb.DuckDBPyRelation:
    relation = duckdb.sql(sql)
    assert relation is not None
    return relation


def read_back(path: Path, fmt: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The file as pandas and as DuckDB read it (DuckDB: its own readers)."""
    if fmt == "parquet":
        return pd.read_parquet(path), query(f"SELECT * FROM read_parquet('{path}')").df()
    sep = export.FORMATS[fmt]
    frame = pd.read_csv(path, sep=sep, dtype={"subject": str})
    database = query(f"SELECT * FROM read_csv('{path}', delim='{sep}', header=true)").df()
    return frame, database


@pytest.mark.parametrize("layout_name", ["wide", "long"])
@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_export_files_read_in_pandas_and_duckdb(out: Path, layout_name: str, fmt: str) -> None:
    result = CliRunner().invoke(
        main, ["export", str(out), "--layout", layout_name, "--format", fmt]
    )
    assert result.exit_code == 0, result.output
    path = out / "export" / f"pvs_{layout_name}.{fmt}"
    assert path.is_file() and str(path.resolve()) in result.output.replace("\n", "")
    expected = export.export_table(out, layout_name)
    summary = f"{len(expected)} rows, 6 scans (3 ok, 1 failed, 1 invalid, 1 not_run)"
    assert summary in " ".join(result.output.split())
    for frame in read_back(path, fmt):
        assert list(frame.columns) == list(expected.columns)
        assert len(frame) == len(expected)
        failed = frame[frame.scan_id == FAILING]
        assert set(failed.status) == {"failed"}
        assert failed.filter(like="n_clusters").isna().all().all()  # empty, not 0
        ok = frame[frame.status == "ok"]
        count = "whole_brain_n_clusters" if layout_name == "wide" else "n_clusters"
        assert len(ok[count].dropna()) and ok[count].dropna().map(lambda v: v == int(v)).all()
        for column in [c for c in frame.columns if c.endswith("_mm3")]:
            got = frame[column].astype(float).to_numpy()
            want = expected[column].astype(float).to_numpy()
            np.testing.assert_array_equal(got, want)  # NaN where expected is empty
    if fmt == "parquet":
        count = "whole_brain_n_clusters" if layout_name == "wide" else "n_clusters"
        assert str(pd.read_parquet(path)[count].dtype) == "Int64"
    else:
        cells = pd.read_csv(path, sep=export.FORMATS[fmt], dtype=str, keep_default_na=False)
        volumes = cells[[c for c in cells.columns if c.endswith("_mm3")]].to_numpy().ravel()
        assert len(volumes) and all(re.fullmatch(r"-?\d+(\.\d{1,3})?|", v) for v in volumes)
        assert not (cells.to_numpy() == "nan").any()  # missing values are empty cells
        types = query(
            f"SELECT typeof(COLUMNS('n_clusters$')) FROM read_csv('{path}', "
            f"delim='{export.FORMATS[fmt]}') LIMIT 1"
        ).fetchall()
        assert set(types[0]) == {"BIGINT"}  # counts stay integers


def test_a_file_or_standard_output_can_be_chosen(out: Path, tmp_path: Path) -> None:
    target = tmp_path / "mine" / "pvs.tsv"
    result = CliRunner().invoke(main, ["export", str(out), "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(target, sep="\t").shape[0] == len(export.wide_table(out))  # tsv by name
    result = CliRunner().invoke(main, ["export", str(out), "--layout", "long", "--out", "-"])
    assert result.exit_code == 0, result.output
    printed = pd.read_csv(io.StringIO(result.stdout))
    assert len(printed) == len(export.long_table(out)) and "region" in printed
    refused = CliRunner().invoke(main, ["export", str(out), "--format", "parquet", "--out", "-"])
    assert refused.exit_code == 1 and "standard output" in refused.output


def test_a_folder_that_is_not_an_output_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["export", str(tmp_path)])
    assert result.exit_code == 1
    assert "is not a pingu-dask output directory" in result.output


def scans_table_in(out: Path, tmp_path: Path) -> Path:
    """A copy of OUT with the scans table the run writes at its end (output/scans.py),
    given facts that the stand-in run does not report (flags: the checks are off; ICV:
    the parcellation has no CSF label)."""
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    problem = Problem("no image path for channel 't1w'", 6, INVALID_ID, "t1w")
    scans_table.write_scans_table(copy, manifest_scans(out.parent), [problem])
    table = tables.read_table(copy, "scans")
    table["flags"] = ["low_contrast;thick_slices" if s == "sub-02" else "" for s in table.scan_id]
    table["icv_mm3"] = 1.4e6 + np.arange(len(table)) / 3
    table.loc[table.scan_id == FAILING, "reason"] = "TypeError: line one\nline two"
    schema = tables.SCHEMAS["scans"]
    tables.replace_table(copy, "scans", pa.Table.from_pandas(table, schema, preserve_index=False))
    return copy


def test_the_scans_table_is_used_when_the_run_wrote_one(out: Path, tmp_path: Path) -> None:
    copy = scans_table_in(out, tmp_path)
    wide = export.wide_table(copy)
    assert wide.scan_id.tolist() == export.wide_table(out).scan_id.tolist()
    again = wide.set_index("scan_id")
    assert again.loc["sub-02", "flags"] == "low_contrast;thick_slices"
    assert pd.isna(again.loc["sub-01", "flags"])
    assert again.loc[FAILING, "reason"] == "TypeError: line one line two"  # one line per row
    assert again.loc["sub-02", "icv_mm3"] == round(1.4e6 + 1 / 3, 3)
    assert again.loc["sub-02", "voxel_size_x_mm"] == 0.8  # float32 0.8 in the header
    ran = ["sub-01", "sub-02", WHOLE_BRAIN_ONLY]
    assert again.loc[ran, "brain_rule"].tolist() == [1, 1, 0]  # 1/0, as the run found
    assert again.loc[ran, "region_source"].tolist() == [ASEG.name, ASEG.name, "none"]
    facts = ["region_source", "brain_rule", "icv_mm3", "voxel_size_x_mm"]
    assert list(again.columns[6:10]) == facts  # after flags, before the measures
    assert (
        again.loc[NOT_RUN, "status"] == "not_run" and again.loc[INVALID_ID, "status"] == "invalid"
    )
    long = export.long_table(copy)
    assert "icv_mm3" in long and long.groupby("scan_id").icv_mm3.nunique().eq(1).all()


def test_a_stale_scans_table_gives_way_to_the_ledger(out: Path, tmp_path: Path) -> None:
    """A run going on (or killed outright) has attempts the scans table does not know."""
    copy = scans_table_in(out, tmp_path)
    newer = ledger.attempt_row(
        "sub-02", "site-a", Status.FAILED, 2, "laterrun0001", ledger.now(),
        error=ErrorReport(error_type="OSError", message="disk gone", verdict=Verdict.TRANSIENT),
    )  # fmt: skip
    tables.write_part(copy, "ledger", tables.to_table("ledger", [newer]), "20990101T0-cccc")
    rows = export.wide_table(copy).set_index("scan_id")
    assert rows.loc["sub-02", "status"] == "failed"
    assert rows.loc["sub-02", "reason"] == "OSError: disk gone"
    assert rows.loc["sub-02"].filter(like="_mm3").isna().all()
    assert rows.loc["sub-01", "status"] == "ok" and "flags" in rows


def test_an_ok_scan_whose_rows_were_removed_for_a_redo_is_not_run(
    out: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    regions = tables.read_table(copy, "regions").query("scan_id == 'sub-02'")
    clusters = tables.read_table(copy, "clusters").query("scan_id == 'sub-02'")
    assert len(regions) == len(REGIONS) + 2  # the table's regions, other, whole_brain
    assert len(clusters) == regions.set_index("region").n_clusters["whole_brain"] >= 1
    # What a resume does before redoing it: every data-table row of the scan goes.
    assert tables.drop_scans(copy, ["sub-02"]) == len(regions) + len(clusters)
    rows = export.wide_table(copy).set_index("scan_id")
    assert rows.loc["sub-02", "status"] == "not_run" and "redo" in rows.loc["sub-02", "reason"]
    assert rows.loc["sub-02"].filter(like="_mm3").isna().all()


def test_a_duplicate_manifest_row_does_not_show_the_first_rows_figures(
    out: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    duplicate = Problem("duplicate scan_id (first used in row 1)", 7, "sub-01", "scan_id")
    rows = tables.to_table("ledger", ledger.invalid_rows([duplicate], RUN_ID))
    tables.write_part(copy, "ledger", rows, "20990101T000000-bbbbbbbbbbbb")
    wide = export.wide_table(copy)
    both = wide[wide.scan_id == "sub-01"].set_index("status")
    assert sorted(both.index) == ["invalid", "ok"]
    assert both.loc["invalid"].filter(like="_mm3").isna().all()
    assert both.loc["ok"].filter(like="_mm3").notna().any()
    long = export.long_table(copy)
    assert long[(long.scan_id == "sub-01") & (long.status == "invalid")].n_clusters.isna().all()


def test_a_run_whose_every_scan_failed_still_exports_every_scan(tmp_path: Path) -> None:
    """No regions rows at all (an OUT written before the scans table: ledger only)."""
    error = ErrorReport(
        error_type="ModelError", message="truncated or corrupt", verdict=Verdict.INPUT
    )
    rows = [
        ledger.attempt_row(
            f"sub-{i}", "site-a", Status.FAILED, 1, "run1", ledger.now(), error=error
        )
        for i in (1, 2)
    ]
    tables.write_part(tmp_path, "ledger", tables.to_table("ledger", rows), "20250101T0-dddd")
    ledger.write_manifest_scans(tmp_path, ["sub-1", "sub-2", "sub-3"])
    wide, long = export.wide_table(tmp_path), export.long_table(tmp_path)
    assert wide.status.tolist() == ["failed", "failed", "not_run"]
    assert wide.reason.iloc[0] == "ModelError: truncated or corrupt"
    assert wide.columns[-len(export.MEASURES) :].tolist() == [
        f"whole_brain_{m}" for m in export.MEASURES
    ]  # fmt: skip
    assert wide.filter(like="whole_brain").isna().all().all()
    assert len(long) == 3 and set(long.region) == {"whole_brain"}


def test_rounding_is_exact_and_leaves_empty_cells_empty() -> None:
    volumes = pd.Series([389.63201400372355, 0.0005, 2.0004999999, float("nan")])
    assert export.round_decimals(volumes).iloc[:3].tolist() == [389.632, 0.001, 2.0]
    assert pd.isna(export.round_decimals(volumes).iloc[3])
    fractions = pd.Series([0.0012345678901, 0.33333333333, 1.0])
    assert export.round_significant(fractions).tolist() == [0.00123457, 0.333333, 1.0]
    frame = export.rounded(pd.DataFrame({"n_clusters": [3, None], "x_mm3": [1 / 3, None]}))
    assert str(frame.n_clusters.dtype) == "Int64" and frame.x_mm3.iloc[0] == 0.333


@pytest.mark.slow
def test_export_of_the_demo_with_a_failed_scan(tmp_path: Path) -> None:
    """`pingu-dask demo` (2 scans), then the same OUT resumed with a manifest that adds
    a scan with NaN voxels (it fails in preprocess): both layouts as CSV."""
    from helpers import absolute_manifest, with_nan_scan

    demo_out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", str(demo_out), "--n-scans", "2"])
    assert result.exit_code == 0, result.output
    manifest = absolute_manifest(demo_out / "cohort", tmp_path / "demo.csv")
    mixed = with_nan_scan(manifest, "sub-nan", tmp_path, at=1)
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    run = ["run", str(tmp_path / "mixed.csv"), "--out", str(demo_out), "--model", "demo"]
    result = CliRunner().invoke(main, [*run, "--no-tta", "--device", "cpu"])
    assert result.exit_code == 1, result.output  # the NaN scan failed
    for layout_name in ("wide", "long"):
        result = CliRunner().invoke(main, ["export", str(demo_out), "--layout", layout_name])
        assert result.exit_code == 0, result.output
        path = demo_out / "export" / f"pvs_{layout_name}.csv"
        frame = pd.read_csv(path)
        database = query(f"SELECT scan_id, status FROM read_csv('{path}')").df()
        assert sorted(set(frame.scan_id)) == sorted(mixed.scan_id)
        assert dict(database.drop_duplicates().values.tolist()) == {
            **{s: "ok" for s in manifest.scan_id}, "sub-nan": "failed"
        }  # fmt: skip
        if layout_name == "wide":
            assert len(frame) == len(mixed)  # one row per manifest scan
            failed = frame.set_index("scan_id").loc["sub-nan"]
            assert failed.filter(like="_mm3").isna().all() and "NaN" in failed.reason
            regions = tables.read_table(demo_out, "regions").set_index(["scan_id", "region"])
            rows = frame.set_index("scan_id")
            for (scan_id, region), row in regions.iterrows():
                got = rows.loc[scan_id, f"{region}_total_volume_mm3"]
                assert got == round(row.total_volume_mm3, 3)
