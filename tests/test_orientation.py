"""Orientation invariance: a scan's figures do not depend on how its file is stored.

The unit tests check inputs/orientation.py against nibabel's own geometry (world
positions of voxels); the slow test stores one synthetic scan in 8 axis orders and
flips with the same world geometry (nibabel's `as_reoriented`) and runs all of them
through the real pipeline (tiny random-weight nnU-Net model: a random network is the
most orientation-sensitive there is), expecting identical masks in world space and
identical table rows.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from distributed import Client

from pingu_dask.config import InferenceSettings, check_orientation
from pingu_dask.inputs.manifest import load_manifest
from pingu_dask.inputs.orientation import Reorientation, orientation_code
from pingu_dask.nnunet.engine import nnunet_model
from pingu_dask.output import tables
from pingu_dask.output.scans import read_scans
from pingu_dask.run.local import local_cluster
from pingu_dask.run.loop import Segmentation, segment_scans
from pingu_dask.run.orchestrate import _write_scans_table
from pingu_dask.run.stages import Pipeline

ALL_ORIENTATIONS = [
    "".join(codes)
    for axes in itertools.permutations(("LR", "PA", "IS"))
    for codes in itertools.product(*axes)
]
# The 8 the slow test stores one scan in: axial, sagittal and coronal axis orders, flips.
STORED = ("RAS", "LPS", "ILP", "LAS", "PIL", "SAR", "ASL", "RPI")


def _affine_for(codes: str, spacing=(1.0, 1.5, 2.0), oblique: float = 0.0) -> np.ndarray:
    """An affine whose array axes point as `codes` say (optionally a little oblique)."""
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    linear = np.zeros((3, 3))
    for axis, (world, flip) in enumerate(ornt):
        linear[int(world), axis] = flip * spacing[axis]
    angle = np.deg2rad(oblique)
    tilt = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = tilt @ linear
    affine[:3, 3] = (-10.0, 20.0, -5.0)
    return affine


@pytest.mark.parametrize("stored", ALL_ORIENTATIONS)
@pytest.mark.parametrize("target", ["RAS", "LPS"])
def test_every_orientation_goes_there_and_back_exactly(stored: str, target: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32)
    affine = _affine_for(stored, oblique=7.0)
    turn = Reorientation.for_image(affine, data.shape, target)
    moved = turn.to_target(data)
    new_affine = turn.target_affine(affine)
    assert turn.stored == stored == orientation_code(affine)
    assert orientation_code(new_affine) == target
    assert moved.shape == turn.target_shape
    assert np.array_equal(turn.to_stored(moved), data)
    assert turn.is_identity == (stored == target)
    # Every voxel keeps its world position and value.
    index = np.argwhere(np.ones(data.shape, bool))
    world = nib.affines.apply_affine(affine, index)
    there = np.rint(nib.affines.apply_affine(np.linalg.inv(new_affine), world)).astype(int)
    assert np.array_equal(moved[tuple(there.T)], data[tuple(index.T)])
    spacing = nib.affines.voxel_sizes(affine)
    assert np.allclose(turn.target_spacing(tuple(spacing)), nib.affines.voxel_sizes(new_affine))


def test_stored_turns_reorienting_off() -> None:
    affine = _affine_for("ILP")
    turn = Reorientation.for_image(affine, (4, 5, 6), check_orientation("stored"))
    assert turn.is_identity and turn.target == "ILP"


@pytest.mark.parametrize("bad", ["RRS", "RA", "XYZ", "RASL", ""])
def test_an_orientation_that_is_not_three_axis_codes_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="axis codes"):
        check_orientation(bad)
    assert check_orientation("lps") == "LPS"


def _restore(source: Path, target: Path, codes: str) -> None:
    """The same image stored in another axis order (nibabel's as_reoriented)."""
    image = nib.load(source)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(tuple(codes))
    )
    moved = image.as_reoriented(ornt)
    nib.save(nib.Nifti1Image(np.asanyarray(moved.dataobj), moved.affine), target)


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.load(path))
    return np.asanyarray(image.dataobj), image.affine


@pytest.mark.slow
def test_one_scan_stored_in_eight_orientations_gives_the_same_figures(
    cohort: Path, tiny_model: Path, tmp_path: Path
) -> None:
    anat = cohort / "sub-001" / "anat"
    files = {
        "t1w": anat / "sub-001_T1w.nii.gz",
        "parcellation": next(cohort.glob("derivatives/**/sub-001*dseg.nii.gz")),
        "reference": next(cohort.glob("derivatives/**/sub-001*pvs*mask.nii.gz")),
    }
    rows = []
    for codes in STORED:
        folder = tmp_path / "inputs" / codes
        folder.mkdir(parents=True)
        paths = {}
        for column, path in files.items():
            paths[column] = folder / f"{column}.nii.gz"
            _restore(path, paths[column], codes)
        assert orientation_code(nib.load(paths["t1w"]).affine) == codes
        rows.append({"scan_id": f"sub-001-{codes}", **paths})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    report = load_manifest(manifest)
    assert report.ok, report.problems
    out = tmp_path / "out"
    settings = InferenceSettings(tta=False, step_size=1.0, device="cpu", torch_threads=1)
    pipeline = Pipeline(nnunet_model(tiny_model), settings, out)
    with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
        results = segment_scans(
            client, Segmentation(scans=report.scans, pipeline=pipeline, watch=False)
        )
    assert [r.status.value for r in results] == ["ok"] * len(STORED)
    _write_scans_table(out, report)

    masks = {}
    for codes in STORED:
        found = list((out / "nifti").rglob(f"*{codes}*desc-pvs_mask.nii.gz"))
        assert len(found) == 1, found
        stored = nib.load(found[0])
        assert orientation_code(stored.affine) == codes  # written on the stored grid
        masks[codes] = _canonical(found[0])
    reference_mask, reference_affine = masks["RAS"]
    assert reference_mask.sum() > 0  # the test is about something
    for codes, (mask, affine) in masks.items():
        assert np.allclose(affine, reference_affine, atol=1e-4), codes
        assert np.array_equal(mask, reference_mask), codes

    def without_id(name: str) -> pd.DataFrame:
        table = tables.read_table(out, name).drop(columns=["scan_id"])
        table["stored"] = tables.read_table(out, name)["scan_id"].str.rsplit("-", n=1).str[-1]
        return table

    regions = without_id("regions")
    assert regions.groupby("stored").size().nunique() == 1
    first = regions[regions.stored == "RAS"].drop(columns="stored").reset_index(drop=True)
    assert first.n_clusters.sum() > 0
    for codes in STORED:
        other = regions[regions.stored == codes].drop(columns="stored").reset_index(drop=True)
        pd.testing.assert_frame_equal(other, first, check_exact=False, rtol=1e-9)
    clusters = without_id("clusters")
    first = clusters[clusters.stored == "RAS"].drop(columns="stored").reset_index(drop=True)
    for codes in STORED:
        other = clusters[clusters.stored == codes].drop(columns="stored").reset_index(drop=True)
        pd.testing.assert_frame_equal(other, first, check_exact=False, atol=1e-6)
    evaluation = without_id("evaluation")
    dice = evaluation[evaluation.region == "whole_brain"].set_index("stored")["voxel_dice"]
    assert dice.nunique() == 1 and len(dice) == len(STORED)

    scans = read_scans(out).set_index("scan_id")
    assert sorted(scans.stored_orientation) == sorted(STORED)
    assert (scans.status == "ok").all()
