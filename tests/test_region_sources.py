"""No silent loss of inputs: what a run records and says about scans without a parcellation.

run.json's `region_sources` (run/provenance.py) counts, for the current manifest, the
scans with and without a parcellation and those the brain rule ran for; `status` and the
report say "N scans without a parcellation: whole-brain figures only" from it, and a
resume with a changed manifest is not mistaken for changed settings. Fast tier: the
real stages around the stand-in model (scripts/benchkit/standins.py) on a real
LocalCluster, a tiny real label image as the parcellation, real ledger, tables and
run.json; and a small hand-made BIDS tree for the `manifest` command.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from benchkit import standins
from click.testing import CliRunner
from distributed import Client
from helpers import shown

from pingu_dask.cli import main
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs import bids
from pingu_dask.inputs.manifest import (
    ManifestReport,
    Scan,
    region_source,
    region_sources_note,
    whole_brain_only_note,
)
from pingu_dask.output import layout, tables
from pingu_dask.output.files import save_nifti
from pingu_dask.output.scans import read_scans
from pingu_dask.report.build import build_report
from pingu_dask.run import orchestrate
from pingu_dask.run.capacity import FixedCapacity
from pingu_dask.run.orchestrate import RunRequest, run_cohort
from pingu_dask.run.provenance import region_sources
from pingu_dask.run.stages import Pipeline


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with standins.client_for_stand_ins(1, 2) as client:
        yield client


@pytest.fixture
def stand_in_runs(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_cohort as `pingu-dask run` calls it, on the module's cluster: its own
    segment_scans runs the real stages around the pipeline's stand-in model."""

    @contextmanager
    def given_cluster(request: RunRequest, scans_left: int) -> Iterator[tuple[Client, object]]:
        yield client, FixedCapacity(1, 1)

    monkeypatch.setattr(orchestrate, "_client", given_cluster)


def write_dseg(path: Path) -> Path:
    """A tiny SynthSeg-numbered parcellation on the stand-in scans' grid: left and right
    cerebral white matter (2, 41), a left putamen (12) in the middle; the rest 0."""
    labels = np.zeros(standins.SHAPE, np.int16)
    half = standins.SHAPE[0] // 2
    labels[1:half, 1:-1, 1:-1] = 2
    labels[half:-1, 1:-1, 1:-1] = 41
    labels[half - 2 : half, 4:8, 4:8] = 12
    return save_nifti(path, labels, standins.AFFINE, intent="label")


def scans_in(folder: Path, n: int, parcellated: Sequence[int]) -> list[Scan]:
    """`n` stand-in scans; those at the indices `parcellated` name a real parcellation."""
    dseg = folder / "dseg.nii.gz"
    if not dseg.exists():
        write_dseg(dseg)
    return [
        dataclasses.replace(scan, parcellation=dseg if index in parcellated else None)
        for index, scan in enumerate(standins.make_scans(n, folder))
    ]


def pipeline_in(folder: Path, rules: PvsClusterRules | None = None) -> Pipeline:
    """The stand-in model's pipeline (the model does not matter here) with `rules`."""
    return standins.pipeline_in(folder, pvs_rules=rules or PvsClusterRules.from_config())


def run_scans(folder: Path, scans: list[Scan], pipeline: Pipeline) -> dict:
    """One run of `scans` into pipeline.out (a manifest file as run.json fingerprints it);
    the run.json it leaves."""
    manifest = folder / "manifest.csv"
    manifest.write_text("scan_id,t1w\n" + "".join(f"{s.scan_id},x\n" for s in scans))
    report = ManifestReport(manifest, len(scans), ("t1w",), tuple(scans), ())
    outcome = run_cohort(RunRequest(report=report, pipeline=pipeline))
    assert outcome.ok and len(outcome.results) == len(scans)
    run_info = layout.read_run_json(pipeline.out)
    assert run_info is not None
    return run_info


def test_region_source_per_scan_and_the_counts_of_a_manifest(tmp_path: Path) -> None:
    scans = scans_in(tmp_path, 5, parcellated=(0, 2, 4))
    assert [region_source(s, "synthseg") for s in scans] == [
        "synthseg", "none", "synthseg", "none", "synthseg"
    ]  # fmt: skip
    record = region_sources(scans, pipeline_in(tmp_path))
    assert record == {
        "table": "synthseg",
        "scans_with_parcellation": 3,
        "scans_with_atlas": 0,
        "scans_without_parcellation": 2,
        "scans_whole_brain_only": 2,
        "per_source": {"none": 2, "synthseg": 3},
        "brain_rule": {"max_outside_brain": 0.25, "on": True, "scans_with": 3, "scans_without": 2},
    }
    none = region_sources(scans_in(tmp_path, 2, parcellated=()), pipeline_in(tmp_path))
    assert none["table"] is None  # no scan used the table: run.json does not claim one
    assert none["brain_rule"]["scans_with"] == 0 and none["per_source"] == {"none": 2}
    off = region_sources(scans, pipeline_in(tmp_path, PvsClusterRules.from_config(
        max_outside_brain=1.0)))  # fmt: skip
    assert off["brain_rule"] == {
        "max_outside_brain": 1.0, "on": False, "scans_with": 0, "scans_without": 5
    }  # fmt: skip


def test_the_note_says_it_once_in_one_wording() -> None:
    assert whole_brain_only_note(1) == "1 scan without a parcellation: whole-brain figures only"
    assert whole_brain_only_note(3, 0.25) == (
        "3 scans without a parcellation: whole-brain figures only, and no brain rule "
        "(max-outside-brain 0.25 needs a parcellation)"
    )
    assert region_sources_note(None) is None  # a run.json from before the record
    assert region_sources_note({"scans_without_parcellation": 0}) is None
    rule_off = {"scans_without_parcellation": 2, "brain_rule": {"on": False}}
    assert region_sources_note(rule_off) == whole_brain_only_note(2)


def test_run_json_records_what_was_used_and_status_and_report_say_it(
    stand_in_runs: None, tmp_path: Path
) -> None:
    pipeline = pipeline_in(tmp_path)
    run_info = run_scans(tmp_path, scans_in(tmp_path, 5, parcellated=(0, 1, 2)), pipeline)
    sources = run_info["region_sources"]
    assert sources["scans_with_parcellation"] == 3 and sources["scans_without_parcellation"] == 2
    assert sources["brain_rule"] == {
        "max_outside_brain": 0.25, "on": True, "scans_with": 3, "scans_without": 2
    }  # fmt: skip
    assert run_info["regions"]["table"] == "synthseg"  # the setting, compared on resume
    # The real stages read the parcellation: region rows per parcellated scan, its
    # tissue volumes from the label image (8 mm3 voxels); whole-brain rows for the others.
    regions = tables.read_table(pipeline.out, "regions").set_index(["scan_id", "region"])
    assert sorted(set(regions.index.get_level_values(0))) == [f"sub-{i:03d}" for i in range(5)]
    for scan_id in ("sub-000", "sub-001", "sub-002"):
        rows = regions.loc[scan_id]
        assert set(rows.region_source) == {"synthseg"}
        assert rows.tissue_volume_mm3["white_matter"] == pytest.approx((1000 - 32) * 8.0)
        assert rows.tissue_volume_mm3["basal_ganglia"] == pytest.approx(32 * 8.0)
    for scan_id in ("sub-003", "sub-004"):
        rows = regions.loc[scan_id]
        assert rows.index.tolist() == ["whole_brain"] and set(rows.region_source) == {"none"}

    status = CliRunner().invoke(main, ["status", str(pipeline.out)])
    assert status.exit_code == 0, status.output
    text = " ".join(status.output.split())
    assert (
        "2 scans without a parcellation: whole-brain figures only, and no brain rule "
        "(max-outside-brain 0.25 needs a parcellation)"
    ) in text
    assert text.index("5 done") < text.index("without a parcellation")  # after the counts

    page = build_report(pipeline.out).read_text()  # of a model without nnU-Net's folds
    assert shown(page, "whole-brain-only") == (
        "2 scans without a parcellation: whole-brain figures only, and no brain rule "
        "(max-outside-brain 0.25 needs a parcellation)."
    )
    assert shown(page, "n-no-parcellation") == "2"
    assert shown(page, "region-sources") == (
        "none: 2 scan(s), synthseg: 3 scan(s); brain rule (max_outside_brain=0.25) ran for "
        "3, not for 2"
    )


def test_a_changed_manifest_updates_the_record_and_is_not_a_settings_change(
    stand_in_runs: None, tmp_path: Path
) -> None:
    pipeline = pipeline_in(tmp_path)
    first = run_scans(tmp_path, scans_in(tmp_path, 4, parcellated=()), pipeline)
    assert first["region_sources"]["table"] is None
    assert first["region_sources"]["scans_without_parcellation"] == 4
    # The same OUT, the parcellations found since: a resume (not refused), recorded anew.
    second = run_scans(tmp_path, scans_in(tmp_path, 4, parcellated=(0, 1, 2, 3)), pipeline)
    assert len(second["runs"]) == 2
    assert second["region_sources"]["table"] == "synthseg"
    assert second["region_sources"]["scans_without_parcellation"] == 0
    assert second["regions"] == first["regions"]
    # Their inputs changed, so each scan was redone: the scans table counts both runs'
    # attempts (attempt numbers start at 1 in every run).
    scans = read_scans(pipeline.out)
    assert len(scans) == 4 and set(scans.status) == {"ok"}
    assert set(scans.attempts) == {2}
    status = CliRunner().invoke(main, ["status", str(pipeline.out)])
    assert status.exit_code == 0, status.output
    assert "without a parcellation" not in status.output


def test_status_of_a_run_json_without_the_record_says_nothing_about_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    layout.prepare_output(out)
    layout.write_json(out / layout.RUN_JSON, {"n_scans": 0, "regions": {"table": "synthseg"}})
    status = CliRunner().invoke(main, ["status", str(out)])
    assert "without a parcellation" not in status.output, status.output


# -- BIDS ---------------------------------------------------------------------------


@pytest.fixture
def small_bids(tmp_path: Path) -> Path:
    """sub-01 and sub-02 with a SynthSeg dseg, sub-03 without (images are tiny)."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9"}))
    image = np.zeros((4, 4, 4), np.int16)
    for subject in ("01", "02", "03"):
        save_nifti(root / f"sub-{subject}/anat/sub-{subject}_T1w.nii.gz", image, np.eye(4))
    for subject in ("01", "02"):
        dseg = f"derivatives/synthseg/sub-{subject}/anat/sub-{subject}_desc-synthseg_dseg.nii.gz"
        save_nifti(root / dseg, image.astype(np.uint8), np.eye(4))
    return root


def test_bids_scans_without_a_dseg_are_counted_and_said(small_bids: Path, tmp_path: Path) -> None:
    found = bids.discover(small_bids)
    assert len(found.rows) == 3 and found.without_parcellation == 1
    target = tmp_path / "m.csv"
    result = CliRunner().invoke(main, ["manifest", str(small_bids), "--out", str(target)])
    assert result.exit_code == 0, result.output  # not a problem: the scan still runs
    text = " ".join(result.output.split())
    assert "1 of 3 scans have no parcellation (no *_dseg found): whole-brain figures only" in text
    validated = CliRunner().invoke(main, ["validate", str(target)])
    assert validated.exit_code == 0, validated.output
    assert "1 scan without a parcellation: whole-brain figures only" in validated.output
