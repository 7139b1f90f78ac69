"""Synthetic cohorts: files, geometry, labels, PVS placement, partial volume, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pingu_dask.synth.cohort import SITES, generate_cohort, make_scan, parse_sites
from pingu_dask.synth.phantom import BASAL_GANGLIA, WHITE_MATTER, Tube, rasterise_tubes

REQUIRED_LABELS = {2, 41, 3, 42, 4, 43, 10, 49, 11, 50, 12, 51, 13, 52, 26, 58}


def manifest_rows(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def load(root: Path, relative: str) -> nib.Nifti1Image:
    return nib.load(root / relative)


def test_manifest_lists_every_scan_with_its_files(cohort: Path) -> None:
    rows = manifest_rows(cohort)
    assert [r["scan_id"] for r in rows] == ["sub-001", "sub-002", "sub-003"]
    assert [r["site"] for r in rows] == ["iso1mm", "iso08mm", "axial3mm"]
    for row in rows:
        for column in ("t1w", "t2w", "parcellation", "reference"):
            assert (cohort / row[column]).is_file(), row[column]
    assert json.loads((cohort / "cohort.json").read_text())["seed"] == 7


def test_images_share_a_grid_that_matches_the_site(cohort: Path) -> None:
    for row in manifest_rows(cohort):
        site = SITES[row["site"]]
        images = [load(cohort, row[c]) for c in ("t1w", "t2w", "parcellation", "reference")]
        for image in images:
            assert image.shape == images[0].shape
            assert np.allclose(image.affine, images[0].affine)
            assert image.header["qform_code"] == 1 and image.header["sform_code"] == 1
        assert np.allclose(images[0].header.get_zooms(), site.spacing, atol=1e-4)
        assert nib.aff2axcodes(images[0].affine) == tuple(site.axcodes)
        assert len(images[0].shape) == 3


def test_sites_really_differ_in_voxel_size(cohort: Path) -> None:
    spacings = {load(cohort, r["t1w"]).header.get_zooms() for r in manifest_rows(cohort)}
    assert len(spacings) == 3
    assert max(max(z) / min(z) for z in spacings) == pytest.approx(3.0 / 0.9, rel=1e-3)


def world_centroid(image: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(image.affine, np.argwhere(mask)).mean(axis=0)


def test_parcellation_has_freesurfer_labels_on_the_correct_side(cohort: Path) -> None:
    for row in manifest_rows(cohort):
        image = load(cohort, row["parcellation"])
        labels = np.asarray(image.dataobj)
        assert set(np.unique(labels).tolist()) >= REQUIRED_LABELS
        # RAS+: the left hemisphere (FreeSurfer 2, 11, ...) lies at negative x,
        # whatever the orientation of the stored array.
        midline = world_centroid(image, labels > 0)[0]
        for left, right in ((2, 41), (11, 50), (12, 51), (10, 49)):
            assert world_centroid(image, labels == left)[0] < midline - 3.0
            assert world_centroid(image, labels == right)[0] > midline + 3.0
        # the putamen lies lateral to the pallidum, the caudate above the putamen
        putamen_x = world_centroid(image, labels == 12)[0]
        assert abs(putamen_x - midline) > abs(world_centroid(image, labels == 13)[0] - midline)
        assert world_centroid(image, labels == 11)[2] > world_centroid(image, labels == 12)[2]


def test_reference_pvs_lie_in_white_matter_and_basal_ganglia(cohort: Path) -> None:
    for row in manifest_rows(cohort):
        reference = np.asarray(load(cohort, row["reference"]).dataobj)
        labels = np.asarray(load(cohort, row["parcellation"]).dataobj)
        under = labels[reference > 0]
        assert reference.sum() > 50
        assert set(np.unique(reference).tolist()) == {0, 1}
        inside = np.isin(under, list(WHITE_MATTER | BASAL_GANGLIA)).mean()
        assert inside > 0.97, f"{row['scan_id']}: only {inside:.1%} of PVS voxels in WM/BG"
        assert np.isin(under, list(WHITE_MATTER)).sum() > 0
        assert np.isin(under, list(BASAL_GANGLIA)).sum() > 0


def test_pvs_are_dark_on_t1w_and_bright_on_t2w(cohort: Path) -> None:
    for row in manifest_rows(cohort):
        reference = np.asarray(load(cohort, row["reference"]).dataobj) > 0
        labels = np.asarray(load(cohort, row["parcellation"]).dataobj)
        white = np.isin(labels, list(WHITE_MATTER)) & ~reference
        t1 = np.asarray(load(cohort, row["t1w"]).dataobj, dtype=float)
        t2 = np.asarray(load(cohort, row["t2w"]).dataobj, dtype=float)
        assert np.median(t1[reference]) < 0.8 * np.median(t1[white])
        assert np.median(t2[reference]) > 1.5 * np.median(t2[white])


def test_background_carries_rician_noise(cohort: Path) -> None:
    row = manifest_rows(cohort)[0]
    t1 = np.asarray(load(cohort, row["t1w"]).dataobj, dtype=float)
    corner = t1[:8, :8, :8]
    sigma = SITES[row["site"]].noise * 1000
    # magnitude of complex Gaussian noise around zero: Rayleigh, mean sigma * sqrt(pi / 2)
    assert corner.min() >= 0
    assert corner.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.25)


def test_truth_tubes_have_pvs_shapes_and_directions(cohort: Path) -> None:
    tubes = pd.read_csv(cohort / "truth_tubes.csv")
    assert set(tubes["region"]) == {"wm", "bg"}
    assert tubes["width_mm"].between(0.5, 3.0).all()
    assert tubes["length_mm"].between(2.0, 15.0 + 1e-9).all()
    assert (tubes["length_mm"] > tubes["width_mm"]).all()
    axis = tubes[["x1", "y1", "z1"]].to_numpy() - tubes[["x0", "y0", "z0"]].to_numpy()
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    middle = (tubes[["x1", "y1", "z1"]].to_numpy() + tubes[["x0", "y0", "z0"]].to_numpy()) / 2
    radial = middle / np.linalg.norm(middle, axis=1, keepdims=True)
    wm = (tubes["region"] == "wm").to_numpy()
    # WM PVS point away from the brain centre, BG PVS run up and down
    assert np.median(np.abs((axis * radial).sum(axis=1))[wm]) > 0.8
    assert np.median(np.abs(axis[~wm, 2])) > 0.8


def test_partial_volume_of_a_tube_adds_up_to_its_volume() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -20.0
    tube = Tube("wm", np.array([-5.0, 0.3, 0.2]), np.array([5.0, 0.3, 0.2]), width_mm=2.0)
    fraction, counts = rasterise_tubes([tube], affine, (40, 40, 40))
    radius, axis_length = 1.0, 10.0
    capsule_volume = np.pi * radius**2 * axis_length + 4 / 3 * np.pi * radius**3
    assert fraction.sum() == pytest.approx(capsule_volume, rel=0.03)
    assert fraction.max() == 1.0 and 0.0 < fraction[fraction > 0].min() < 0.5
    assert counts == [int((fraction >= 0.5).sum())]
    assert tube.length_mm == pytest.approx(12.0)


def test_partial_volume_follows_anisotropic_voxels() -> None:
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = [-20.0, -20.0, -30.0]
    tube = Tube("bg", np.array([0.0, 0.0, -6.0]), np.array([0.0, 0.0, 6.0]), width_mm=1.5)
    fraction, _ = rasterise_tubes([tube], affine, (40, 40, 20))
    volume_mm3 = fraction.sum() * 3.0
    expected = np.pi * 0.75**2 * 12 + 4 / 3 * np.pi * 0.75**3
    assert volume_mm3 == pytest.approx(expected, rel=0.05)


@pytest.mark.slow
def test_scans_are_deterministic_and_independent_of_cohort_size(tmp_path: Path) -> None:
    first, rows_a = make_scan(tmp_path / "a", 1, "sub-002", SITES["axial3mm"], seed=3, t2w=False)
    again, rows_b = make_scan(tmp_path / "b", 1, "sub-002", SITES["axial3mm"], seed=3, t2w=False)
    other, _ = make_scan(tmp_path / "c", 1, "sub-002", SITES["axial3mm"], seed=4, t2w=False)
    assert first == again and rows_a == rows_b
    for column in ("t1w", "parcellation", "reference"):
        a = np.asarray(nib.load(tmp_path / "a" / getattr(first, column)).dataobj)
        b = np.asarray(nib.load(tmp_path / "b" / getattr(again, column)).dataobj)
        assert np.array_equal(a, b)
    t1_a = np.asarray(nib.load(tmp_path / "a" / first.t1w).dataobj)
    t1_c = np.asarray(nib.load(tmp_path / "c" / other.t1w).dataobj)
    assert not np.array_equal(t1_a, t1_c)


def test_generate_cohort_cycles_sites_and_rejects_unknown_ones(tmp_path: Path) -> None:
    records = generate_cohort(tmp_path, n_scans=2, sites="axial3mm,sag12mm", seed=1)
    assert [r.site for r in records] == ["axial3mm", "sag12mm"]
    assert [r.scan_id for r in records] == ["sub-001", "sub-002"]
    assert all(r.truth_voxels > 0 for r in records)
    with pytest.raises(ValueError, match="unknown site"):
        parse_sites("iso1mm,mars")
