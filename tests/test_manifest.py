"""Manifest reading and validation: formats, every kind of problem, Scan records, CLI."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pingu_dask.cli import main
from pingu_dask.inputs.manifest import (
    ManifestError,
    load_manifest,
    require_valid,
    unsafe_id_reason,
)
from pingu_dask.output.files import save_nifti


def write(table: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)
    return path


@pytest.fixture
def cohort_table(cohort: Path) -> pd.DataFrame:
    return pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_valid_manifest_in_every_format(
    cohort: Path, cohort_table: pd.DataFrame, suffix: str
) -> None:
    path = write(cohort_table, cohort / f"copy{suffix}")
    report = load_manifest(path)
    assert report.ok and report.n_rows == 3
    assert [s.scan_id for s in report.scans] == ["sub-001", "sub-002", "sub-003"]
    scan = report.scans[1]
    assert scan.channel("t1w") == cohort / "sub-002/anat/sub-002_T1w.nii.gz"
    assert scan.site == "iso08mm" and scan.subject == "002" and scan.session is None
    assert scan.parcellation == cohort / "derivatives/synthseg/sub-002/anat/sub-002_dseg.nii.gz"
    assert scan.row == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        scan.scan_id = "other"  # type: ignore[misc]


def test_model_channels_decide_the_required_columns(cohort: Path) -> None:
    report = load_manifest(cohort / "manifest.csv", channels=["t1w", "t2w"])
    assert report.ok
    assert [name for name, _ in report.scans[0].channels] == ["t1w", "t2w"]
    missing = load_manifest(cohort / "manifest.csv", channels=["t1w", "flair"])
    assert not missing.ok and not missing.scans
    assert "missing required column 'flair'" in str(missing.problems[0])


def test_relative_paths_resolve_against_the_manifest_folder(cohort: Path, tmp_path: Path) -> None:
    table = pd.DataFrame({"scan_id": ["a"], "t1w": ["../img.nii.gz"]})
    shutil.copy(cohort / "sub-001/anat/sub-001_T1w.nii.gz", tmp_path / "img.nii.gz")
    (tmp_path / "lists").mkdir()
    report = load_manifest(write(table, tmp_path / "lists" / "m.csv"))
    assert report.ok
    assert report.scans[0].channel("t1w") == tmp_path / "img.nii.gz"


@pytest.mark.parametrize(
    ("scan_id", "reason"),
    [
        ("../x", "'..'"),
        ("..", "'..'"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        (".hidden", "starts with a dot"),
        ("bad\x07id", "control characters"),
        ("tab\tid", "control characters"),
        ("with space", "only letters"),
        ("", "empty"),
        ("x" * 200, "longer than"),
    ],
)
def test_unsafe_scan_ids_are_named(scan_id: str, reason: str) -> None:
    assert reason in unsafe_id_reason(scan_id)


@pytest.mark.parametrize("scan_id", ["sub-01", "sub-01_ses-02", "P001.v2", "7"])
def test_ordinary_ids_are_safe(scan_id: str) -> None:
    assert unsafe_id_reason(scan_id) is None


def test_every_problem_is_reported_at_once_with_its_row(cohort: Path, tmp_path: Path) -> None:
    t1 = str(cohort / "sub-001/anat/sub-001_T1w.nii.gz")
    save_nifti(tmp_path / "flat.nii.gz", np.zeros((20, 20), dtype=np.int16), np.eye(4))
    save_nifti(tmp_path / "series.nii.gz", np.zeros((8, 8, 8, 3), dtype=np.int16), np.eye(4))
    (tmp_path / "corrupt.nii.gz").write_bytes(b"this is not an image")
    (tmp_path / "notes.txt").write_text("hello")
    table = pd.DataFrame(
        {
            "scan_id": [
                "ok-1",
                "ok-1",
                "../x",
                "",
                "missing",
                "flat",
                "series",
                "corrupt",
                "text",
                "nopath",
            ],
            "t1w": [
                t1,
                t1,
                t1,
                t1,
                "nowhere/none.nii.gz",
                "flat.nii.gz",
                "series.nii.gz",
                "corrupt.nii.gz",
                "notes.txt",
                "",
            ],
        }
    )
    report = load_manifest(write(table, tmp_path / "m.csv"))
    found = {(p.row, p.column): p.message for p in report.problems}
    assert [s.scan_id for s in report.scans] == ["ok-1"]
    assert "duplicate scan_id (first used in row 1)" in found[(2, "scan_id")]
    assert "'..'" in found[(3, "scan_id")]
    assert "empty scan_id" in found[(4, "scan_id")]
    assert "file not found" in found[(5, "t1w")]
    assert "not a 3D image (shape (20, 20))" in found[(6, "t1w")]
    assert "not a 3D image (shape (8, 8, 8, 3))" in found[(7, "t1w")]
    assert "cannot read NIfTI header" in found[(8, "t1w")]
    assert "not a NIfTI file" in found[(9, "t1w")]
    assert "no image path for channel 't1w'" in found[(10, "t1w")]
    assert len(report.problems) == 9
    with pytest.raises(ManifestError, match="9 problem"):
        require_valid(report)


def test_channels_on_different_grids_are_rejected(cohort: Path, tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "scan_id": ["mixed"],
            "t1w": [str(cohort / "sub-001/anat/sub-001_T1w.nii.gz")],
            "t2w": [str(cohort / "sub-002/anat/sub-002_T2w.nii.gz")],
        }
    )
    report = load_manifest(write(table, tmp_path / "m.csv"), channels=("t1w", "t2w"))
    assert not report.scans
    assert "channels have different shapes" in report.problems[0].message


def test_optional_files_are_checked_too(cohort: Path, cohort_table: pd.DataFrame) -> None:
    table = cohort_table.copy()
    table.loc[0, "parcellation"] = "missing_dseg.nii.gz"
    report = load_manifest(write(table, cohort / "bad_parc.csv"))
    assert [s.scan_id for s in report.scans] == ["sub-002", "sub-003"]
    assert report.problems[0].column == "parcellation" and report.problems[0].row == 1


def test_file_checks_can_be_turned_off(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {"scan_id": ["a", "b"], "t1w": ["a.nii.gz", "b.nii.gz"], "notes": ["", ""]}
    )
    report = load_manifest(write(table, tmp_path / "m.csv"), check_files=False)
    assert report.ok and len(report.scans) == 2
    assert report.notes == ("columns ignored: notes",)


def test_header_names_are_case_insensitive(tmp_path: Path) -> None:
    table = pd.DataFrame({"Scan_ID": ["a"], "T1w": ["a.nii.gz"], "Site": ["x"]})
    report = load_manifest(write(table, tmp_path / "m.tsv"), check_files=False)
    assert report.ok and report.scans[0].site == "x"


def test_large_manifest_without_file_checks(tmp_path: Path) -> None:
    n = 100_000
    ids = [f"sub-{i:06d}" for i in range(n)]
    ids[50_000] = ids[10]
    table = pd.DataFrame(
        {"scan_id": ids, "t1w": [f"{i}/t1.nii.gz" for i in ids], "site": ["a", "b"] * (n // 2)}
    )
    report = load_manifest(write(table, tmp_path / "big.parquet"), check_files=False)
    assert report.n_rows == n and len(report.scans) == n - 1
    assert [(p.row, p.scan_id) for p in report.problems] == [(50_001, "sub-000010")]


def test_unsupported_format_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"use \.csv, \.tsv or \.parquet"):
        load_manifest(tmp_path / "m.xlsx")


def test_cli_validate_reports_the_four_classic_mistakes(cohort: Path, tmp_path: Path) -> None:
    t1 = str(cohort / "sub-001/anat/sub-001_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((10, 10), dtype=np.int16), np.eye(4)), tmp_path / "2d.nii.gz")
    table = pd.DataFrame(
        {
            "scan_id": ["a", "a", "../x", "gone", "flat"],
            "t1w": [t1, t1, t1, "gone.nii.gz", "2d.nii.gz"],
        }
    )
    result = CliRunner().invoke(main, ["validate", str(write(table, tmp_path / "m.csv"))])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "5 rows, 1 valid scans, 4 problem(s)" in text
    assert "duplicate scan_id" in text and "'..'" in text
    assert "file not found" in text and "not a 3D image" in text


def test_cli_synth_then_validate(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["synth", str(tmp_path / "c"), "-n", "2", "--sites", "axial3mm"])
    assert result.exit_code == 0, result.output
    assert "2 scans written" in result.output
    result = runner.invoke(main, ["validate", str(tmp_path / "c" / "manifest.csv")])
    assert result.exit_code == 0, result.output
    assert "2 valid scans, 0 problem(s)" in result.output and "all rows valid" in result.output
    result = runner.invoke(main, ["synth", str(tmp_path / "d"), "--sites", "venus"])
    assert result.exit_code == 2 and "unknown site" in result.output


# -- no silent loss of inputs: misspelt columns ------------------------------------------


@pytest.mark.parametrize(
    ("spelled", "meant"),
    [("parcelation", "parcellation"), ("refrence", "reference"), ("sesion", "session")],
)
def test_a_misspelt_optional_column_fails_validation(
    cohort: Path, cohort_table: pd.DataFrame, spelled: str, meant: str
) -> None:
    path = write(cohort_table.rename(columns={meant: spelled}), cohort / f"typo_{spelled}.csv")
    report = load_manifest(path, check_files=False)
    assert not report.ok
    assert [str(p) for p in report.problems] == [
        f"unknown column {spelled!r}: did you mean {meant!r}? As spelled it is ignored; "
        "rename it, or allow unknown columns (--allow-unknown-columns) to go on without it"
    ]
    assert report.table_problems == report.problems  # a column, not a row
    assert not any(spelled in note for note in report.notes)  # a problem, not a note
    with pytest.raises(ManifestError, match=f"did you mean {meant!r}"):
        require_valid(report)


def test_allowing_unknown_columns_lets_a_misspelt_one_through_with_a_note(
    cohort: Path, cohort_table: pd.DataFrame
) -> None:
    table = cohort_table.rename(columns={"parcellation": "parcelation"}).assign(visit="1")
    report = load_manifest(write(table, cohort / "typo_allowed.csv"), allow_unknown_columns=True)
    assert report.ok and len(report.scans) == 3
    assert all(scan.parcellation is None for scan in report.scans)  # the column was not used
    assert report.notes == (
        "column 'parcelation' ignored (unknown columns allowed): it looks like "
        "'parcellation', which this manifest does not have",
        "columns ignored: t2w, visit",  # the cohort's t2w: another model's channel
    )


def test_a_far_off_or_deliberate_extra_column_is_only_a_note(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "scan_id": ["a"],
            "t1w": ["a.nii.gz"],
            "site": ["x"],
            "visit": ["1"],  # 0.67 against `site`: below the cutoff
            "site_id": ["7"],  # close to `site`, but `site` is there: nothing is lost
            "t2w": ["a_T2w.nii.gz"],  # another model's channel, not a typo of t1w
        }
    )
    report = load_manifest(write(table, tmp_path / "m.csv"), check_files=False)
    assert report.ok, report.problems
    assert report.notes == ("columns ignored: visit, site_id, t2w",)


def test_a_misspelt_required_column_is_named_with_its_likely_meaning(tmp_path: Path) -> None:
    table = pd.DataFrame({"scan_id": ["a"], "t1": ["a.nii.gz"], "subject_id": ["a"]})
    report = load_manifest(write(table, tmp_path / "m.csv"), check_files=False)
    messages = [str(p) for p in report.problems]
    assert not report.scans
    assert messages[0] == "missing required column 't1w' (columns found: scan_id, t1, subject_id)"
    assert "unknown column 't1': did you mean 't1w'?" in messages[1]
    assert "unknown column 'subject_id': did you mean 'subject'?" in messages[2]
    allowed = load_manifest(tmp_path / "m.csv", check_files=False, allow_unknown_columns=True)
    assert [str(p) for p in allowed.problems] == messages[:1]  # the required one still fails


def test_cli_validate_fails_on_a_misspelt_column_unless_allowed(
    cohort: Path, cohort_table: pd.DataFrame
) -> None:
    path = write(cohort_table.rename(columns={"parcellation": "parcelation"}), cohort / "v.csv")
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "3 valid scans, 1 problem(s)" in text
    assert "unknown column 'parcelation': did you mean 'parcellation'?" in text
    assert "all rows valid" not in text
    result = runner.invoke(main, ["validate", str(path), "--allow-unknown-columns"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note: column 'parcelation' ignored" in text and "all rows valid" in text
    assert "3 scans without a parcellation: whole-brain figures only" in text


def test_validate_says_how_many_scans_have_no_parcellation(
    cohort: Path, cohort_table: pd.DataFrame
) -> None:
    table = cohort_table.copy()
    table.loc[1, "parcellation"] = ""
    result = CliRunner().invoke(main, ["validate", str(write(table, cohort / "one_without.csv"))])
    assert result.exit_code == 0, result.output
    assert "1 scan without a parcellation: whole-brain figures only" in result.output
    full = CliRunner().invoke(main, ["validate", str(cohort / "manifest.csv")])
    assert full.exit_code == 0 and "without a parcellation" not in full.output


@pytest.mark.parametrize("extra", [[], ["--skip-invalid"]])
def test_cli_run_stops_on_a_misspelt_column_before_any_model_runs(
    cohort: Path, cohort_table: pd.DataFrame, tmp_path: Path, extra: list[str]
) -> None:
    path = write(cohort_table.rename(columns={"parcellation": "parcelation"}), tmp_path / "m.csv")
    out = tmp_path / "out"
    arguments = ["run", str(path), "--out", str(out), "--model", "demo", *extra]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "did you mean 'parcellation'?" in text and "--allow-unknown-columns" in text
    assert not (out / "tables").exists() and not (out / "run.json").exists()
    assert not (out / "masks.zarr").exists()
