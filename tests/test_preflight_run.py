"""Bad inputs get their verdict before any GPU time, and good scans beside them finish.

A run of `pingu-dask run` (a subprocess, the tiny random-weight model) over two good
synthetic scans and three broken ones, each made from a good scan the way they occur
in a cohort: its parcellation given as the T1w (a label map), the T1w's header turned
90 degrees against its own parcellation (the voxels untouched), an all-zero image.
Each broken scan fails with its reason in the ledger and the scans table and is not
retried; the good ones are ok; the run exits 1 and says how many failed and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pingu_dask.output import tables
from pingu_dask.output.scans import read_scans

pytestmark = pytest.mark.slow

TURN_90_ABOUT_Z = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def turned_header(source: Path, target: Path) -> None:
    """The same voxels with an affine turned 90 degrees about the scanner's z axis
    around the image centre (the head stays where it was, its axes do not)."""
    image = nib.load(source)
    affine = image.affine.copy()
    centre = (np.asarray(image.shape[:3]) - 1) / 2.0
    world_centre = nib.affines.apply_affine(affine, centre)
    affine[:3, :3] = TURN_90_ABOUT_Z @ affine[:3, :3]
    affine[:3, 3] = world_centre - affine[:3, :3] @ centre
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), target)


def test_broken_inputs_fail_with_their_reason_and_good_scans_finish(
    cohort: Path, tiny_model: Path, tmp_path: Path
) -> None:
    manifest = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    for column in ("t1w", "t2w", "parcellation", "reference"):
        manifest[column] = [str(cohort / p) if p else p for p in manifest[column]]
    manifest = manifest.drop(columns=["t2w"])
    good = manifest.iloc[:2]
    template = manifest.iloc[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    turned_header(Path(template.t1w), broken / "turned_T1w.nii.gz")
    source = nib.load(template.t1w)
    nib.save(
        nib.Nifti1Image(np.zeros(source.shape, np.float32), source.affine), broken / "zero.nii.gz"
    )
    bad = pd.DataFrame(
        [
            {**template, "scan_id": "labelmap", "t1w": template.parcellation},
            {**template, "scan_id": "turned", "t1w": str(broken / "turned_T1w.nii.gz")},
            {**template, "scan_id": "zero", "t1w": str(broken / "zero.nii.gz")},
        ]
    )
    path = tmp_path / "manifest.csv"
    pd.concat([good, bad]).to_csv(path, index=False)
    out = tmp_path / "out"
    command = [
        str(Path(sys.executable).parent / "pingu-dask"), "run", str(path), "--out", str(out),
        "--model", str(tiny_model), "--no-tta", "--step-size", "1.0", "--device", "cpu",
        "--no-nifti",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output

    ledger = tables.read_table(out, "ledger").set_index("scan_id")
    assert set(ledger.index) == {*good.scan_id, "labelmap", "turned", "zero"}
    assert ledger.index.is_unique  # input errors are never retried
    for scan_id in good.scan_id:
        assert ledger.loc[scan_id, "status"] == "ok"
    expected = {
        "labelmap": "label_map",
        "turned": "alignment|orientation",
        "zero": "empty",
    }
    for scan_id, reason in expected.items():
        row = ledger.loc[scan_id]
        assert row.status == "failed", scan_id
        assert not bool(row.retryable), scan_id
        assert pd.Series([row.message]).str.contains(reason).all(), (scan_id, row.message)
        assert pd.isna(row.seconds_predict), scan_id  # no inference slot was spent on it
    scans = read_scans(out).set_index("scan_id")
    assert list(scans.index) == [*good.scan_id, "labelmap", "turned", "zero"]
    assert (scans.loc[list(good.scan_id), "status"] == "ok").all()
    assert (scans.loc[["labelmap", "turned", "zero"], "status"] == "failed").all()
    assert (
        scans.loc["turned", "stored_orientation"]
        != scans.loc[good.scan_id.iloc[0], "stored_orientation"]
    )
    regions = tables.read_table(out, "regions")
    assert set(regions.scan_id) == set(good.scan_id)
    assert "3 failed" in output or "failed: 3" in output, output[-3000:]


def test_a_flag_is_kept_and_shown_and_strict_fails_the_scan(
    cohort: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A voxel-size flag bound set (by config) under 1 mm: the 1 mm scan runs with its
    flag kept in the scans table and its sidecar and said at the end; with --strict the
    same scan fails with that reason and the other one still finishes."""
    manifest = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False).iloc[:2]
    for column in ("t1w", "parcellation", "reference"):
        manifest[column] = [str(cohort / p) for p in manifest[column]]
    path = tmp_path / "manifest.csv"
    manifest.drop(columns=["t2w"]).to_csv(path, index=False)
    spacing = {
        row.scan_id: nib.load(row.t1w).header.get_zooms()[:3] for row in manifest.itertuples()
    }
    flagged = sorted(scan_id for scan_id, zooms in spacing.items() if max(zooms) > 0.95)
    assert len(flagged) == 1, spacing  # one 1 mm scan, one 0.8 mm scan
    env = {**os.environ, "DASK_PINGU__CHECK_VOXEL_MM_FLAG": "[0.3, 0.95]"}
    outcomes = {}
    for strict in (False, True):
        out = tmp_path / ("strict" if strict else "lenient")
        command = [
            str(Path(sys.executable).parent / "pingu-dask"), "run", str(path), "--out", str(out),
            "--model", str(tiny_model), "--no-tta", "--step-size", "1.0", "--device", "cpu",
            *(["--strict"] if strict else []),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        outcomes[strict] = (out, result.returncode, result.stdout + result.stderr)
    out, code, output = outcomes[False]
    assert code == 0, output[-3000:]
    assert "1 scan(s) ran with pre-flight flags (voxel_size: 1)" in output.replace("\n", " ")
    scans = read_scans(out).set_index("scan_id")
    assert (scans.status == "ok").all()
    assert scans.loc[flagged[0], "flags"] == "voxel_size"
    assert set(scans["flags"].drop(flagged[0])) == {""}
    sidecar = json.loads(next((out / "nifti").rglob(f"{flagged[0]}*_mask.json")).read_text())
    assert any(flag.startswith("voxel_size:") for flag in sidecar["Flags"]), sidecar["Flags"]
    out, code, output = outcomes[True]
    assert code == 1, output[-3000:]
    recorded = json.loads((out / "run.json").read_text())["runs"][-1]["checks"]
    assert recorded["strict"] is True and recorded["voxel_mm_flag"] == [0.3, 0.95]
    scans = read_scans(out).set_index("scan_id")
    assert scans.loc[flagged[0], "status"] == "failed"
    assert "voxel_size" in scans.loc[flagged[0], "reason"]
    assert (scans.drop(flagged[0]).status == "ok").all()
