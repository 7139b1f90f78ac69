"""A BIDS dataset as input: discovery (sessions, runs, channels, derivatives, sites,
subjects without a T1w) and a real run on it (demo model) whose masks land in a
BIDS-derivatives folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pingu_dask.cli import main
from pingu_dask.inputs import bids
from pingu_dask.output import tables
from pingu_dask.synth.cohort import generate_cohort


def copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@pytest.fixture(scope="module")
def bids_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic scans arranged as a BIDS dataset:

    sub-01  ses-1: T1w run-1 and run-2 (+ T2w of each run), SynthSeg dseg per run
            ses-2: T1w + T2w, FreeSurfer aseg.mgz
    sub-02  no session: T1w + T2w, no parcellation; site from participants.tsv
    sub-03  anat holds a T2w only (no T1w)
    sub-04  no anat folder at all
    """
    synthetic = tmp_path_factory.mktemp("synthetic")
    generate_cohort(synthetic, n_scans=3, sites=("iso1mm", "axial3mm"), seed=4, t2w=True)
    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "test", "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    )
    pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "site": ["siteA", "siteB"]}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )

    def scan(number: int, kind: str) -> Path:
        name = f"sub-00{number}"
        if kind == "dseg":
            return synthetic / "derivatives/synthseg" / name / "anat" / f"{name}_dseg.nii.gz"
        return synthetic / name / "anat" / f"{name}_{kind}.nii.gz"

    for run, source in (("1", 1), ("2", 2)):
        stem = f"sub-01_ses-1_run-{run}"
        for kind in ("T1w", "T2w"):
            copy(scan(source, kind), root / f"sub-01/ses-1/anat/{stem}_{kind}.nii.gz")
        copy(
            scan(source, "dseg"),
            root / f"derivatives/synthseg/sub-01/ses-1/anat/{stem}_desc-synthseg_dseg.nii.gz",
        )
    for kind in ("T1w", "T2w"):
        copy(scan(3, kind), root / f"sub-01/ses-2/anat/sub-01_ses-2_{kind}.nii.gz")
    parcellation = nib.load(scan(3, "dseg"))
    aseg = nib.MGHImage(np.asarray(parcellation.dataobj, np.int32), parcellation.affine)
    (root / "derivatives/freesurfer/sub-01_ses-2/mri").mkdir(parents=True)
    nib.save(aseg, root / "derivatives/freesurfer/sub-01_ses-2/mri/aseg.mgz")
    for kind in ("T1w", "T2w"):
        copy(scan(1, kind), root / f"sub-02/anat/sub-02_{kind}.nii.gz")
    copy(scan(2, "T2w"), root / "sub-03/anat/sub-03_T2w.nii.gz")
    (root / "sub-04" / "func").mkdir(parents=True)
    return root


def test_discovery_finds_sessions_runs_channels_derivatives_and_sites(bids_tree: Path) -> None:
    found = bids.discover(bids_tree, ("t1w", "t2w"))
    table = found.manifest(("t1w", "t2w")).set_index("scan_id")
    assert sorted(table.index) == [
        "sub-01_ses-1_run-1",
        "sub-01_ses-1_run-2",
        "sub-01_ses-2",
        "sub-02",
    ]
    run2 = table.loc["sub-01_ses-1_run-2"]
    assert (run2.subject, run2.session, run2.site) == ("01", "1", "siteA")
    assert run2.t1w.endswith("sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz")
    assert run2.t2w.endswith("sub-01/ses-1/anat/sub-01_ses-1_run-2_T2w.nii.gz")
    assert run2.parcellation.endswith("sub-01_ses-1_run-2_desc-synthseg_dseg.nii.gz")
    assert table.loc["sub-01_ses-2"].parcellation.endswith("freesurfer/sub-01_ses-2/mri/aseg.mgz")
    assert table.loc["sub-02"].site == "siteB" and table.loc["sub-02"].parcellation == ""
    assert pd.isna(table.loc["sub-02"].session)
    assert len(found.problems) == 2
    assert found.problems[0].startswith("sub-03: no T1w image")
    assert found.problems[1].startswith("sub-04: no T1w image")


def test_discovery_reports_what_it_cannot_use(bids_tree: Path, tmp_path: Path) -> None:
    found = bids.discover(bids_tree, ("t1w", "flair"))
    assert found.rows == []
    assert sum("no FLAIR image for channel 'flair'" in p for p in found.problems) == 4
    with pytest.raises(bids.BidsError, match="no BIDS suffix known for channel"):
        bids.discover(bids_tree, ("t1w", "dwi"))
    with pytest.raises(bids.BidsError, match="not a BIDS dataset"):
        bids.discover(tmp_path)
    assert bids.parse_name(Path("sub-01_ses-1_run-2_T1w.nii.gz")).name == "sub-01_ses-1_run-2"
    assert bids.parse_name(Path("notes_T1w.nii.gz")) is None
    assert bids.parse_name(Path("sub-01_T1w.json")) is None


def test_manifest_command_writes_a_manifest_that_validates(bids_tree: Path, tmp_path: Path):
    target = tmp_path / "m.csv"
    result = CliRunner().invoke(main, ["manifest", str(bids_tree), "--out", str(target)])
    assert result.exit_code == 1  # two subjects without a T1w are reported
    assert "not used: sub-03: no T1w image" in result.output
    assert "4 scans found, 2 problem(s)" in result.output
    validated = CliRunner().invoke(main, ["validate", str(target)])
    assert validated.exit_code == 0, validated.output


@pytest.mark.slow
def test_a_run_on_a_bids_dataset_writes_bids_derivatives(bids_tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    arguments = ["run", str(bids_tree), "--out", str(out), "--model", "demo", "--no-tta"]
    arguments += ["--step-size", "1.0", "--device", "cpu"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert (out / "manifest_bids.csv").is_file()
    derivatives = out / "nifti"
    description = json.loads((derivatives / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    masks = sorted(p.relative_to(derivatives).as_posix() for p in derivatives.rglob("*mask.nii.gz"))
    assert masks == [
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_desc-pvs_mask.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-2_desc-pvs_mask.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_desc-pvs_mask.nii.gz",
        "sub-02/anat/sub-02_desc-pvs_mask.nii.gz",
    ]
    # Beside each mask its labelled clusters and its sidecar, named alike.
    clusters = sorted(p.as_posix() for p in derivatives.rglob("*_desc-pvsclusters_dseg.nii.gz"))
    assert [c.replace("pvsclusters_dseg", "pvs_mask") for c in clusters] == [
        (derivatives / m).as_posix() for m in masks
    ]
    assert all((derivatives / m.replace(".nii.gz", ".json")).is_file() for m in masks)
    regions = tables.read_table(out, "regions")
    by_scan = regions.groupby("scan_id")["region"].apply(set)
    assert "basal_ganglia" in by_scan["sub-01_ses-2"]  # from FreeSurfer's aseg.mgz
    assert "basal_ganglia" in by_scan["sub-01_ses-1_run-2"]  # from SynthSeg
    assert by_scan["sub-02"] == {"whole_brain"}  # no parcellation
    sites = regions.drop_duplicates("scan_id").set_index("scan_id").site
    assert sites["sub-02"] == "siteB"
