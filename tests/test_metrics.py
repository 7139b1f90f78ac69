"""Clusters, regions, metrics and evaluation on hand-made volumes with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pingu_dask.analysis.clusters import clean_mask, find_clusters
from pingu_dask.analysis.evaluate import (
    cluster_agreement,
    evaluate_by_region,
    summarise,
    voxel_dice,
)
from pingu_dask.analysis.metrics import cluster_measures
from pingu_dask.analysis.regions import (
    ASEG,
    RegionError,
    assign_clusters,
    load_region_table,
    parcellation_on_grid,
    region_names,
)
from pingu_dask.analysis.scan import Regions, analyse_mask
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output import tables
from pingu_dask.output.files import save_nifti

WM, BG = 2, 11


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A 40³ mask with known tubes and a parcellation: x < 20 white matter, x >= 20 BG."""
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[5:15, 10, 10] = 1  # A: WM, 10 voxels along axis 0
    mask[5, 30, 5:13] = 1  # B: WM, 8 voxels along axis 2
    mask[30, 10:17, 30] = 1  # C: BG, 7 voxels
    mask[15:25, 25, 25] = 1  # D: 5 WM + 5 BG voxels: a tie -> other
    mask[12:22, 35, 35] = 1  # E: 8 WM + 2 BG voxels -> WM
    mask[35, 35, 2:5] = 1  # F: 3 voxels, below the default size filter
    parcellation = np.full(mask.shape, BG, np.int32)
    parcellation[:20] = WM
    return mask, parcellation


KEEP_ALL = PvsClusterRules(min_voxels=1)


def analyse(mask, parcellation, affine=None, settings=None, reference=None):
    settings = settings or PvsClusterRules()
    affine = np.eye(4) if affine is None else affine
    regions = Regions(ASEG.index_map(parcellation), None) if parcellation is not None else None
    scan = Scan("s1", (("t1w", Path("t1.nii.gz")),), site="siteA", reference=reference)
    analysis = analyse_mask(mask, affine, scan, regions, settings, ASEG)
    # the counts and the Arrow tables the driver writes, by name, as a record
    return analysis.mask, {**vars(analysis.counts), "tables": tables.scan_tables(analysis.rows)}


def by_region(record: dict) -> dict[str, dict]:
    return {row["region"]: row for row in record["tables"]["regions"].to_pylist()}


def test_metrics_per_region_on_known_tubes() -> None:
    mask, parcellation = phantom()
    cleaned, record = analyse(mask, parcellation)
    regions = by_region(record)
    wm, bg, other, whole = (
        regions[n] for n in ("white_matter", "basal_ganglia", "other", "whole_brain")
    )
    assert (wm["n_clusters"], wm["total_volume_mm3"], wm["n_voxels"]) == (3, 28.0, 28)
    assert wm["mean_volume_mm3"] == pytest.approx(28 / 3)
    assert wm["median_volume_mm3"] == 10.0
    assert wm["sd_volume_mm3"] == pytest.approx(np.std([10, 8, 10], ddof=1))
    assert (wm["min_volume_mm3"], wm["max_volume_mm3"]) == (8.0, 10.0)
    assert (bg["n_clusters"], bg["total_volume_mm3"]) == (1, 7.0)
    assert math.isnan(bg["sd_volume_mm3"])  # SD of a single cluster
    assert (other["n_clusters"], other["total_volume_mm3"]) == (1, 10.0)
    assert (whole["n_clusters"], whole["total_volume_mm3"]) == (5, 45.0)
    assert [r["region"] for r in record["tables"]["regions"].to_pylist()] == [
        *ASEG.names,
        "other",
        "whole_brain",
    ]
    assert int(cleaned.sum()) == 45 and cleaned[35, 35, 2:5].sum() == 0  # F dropped
    clusters = record["tables"]["clusters"].to_pandas()
    assert sorted(clusters["n_voxels"]) == [7, 8, 10, 10, 10]
    assert set(clusters["scan_id"]) == {"s1"}


def test_cluster_geometry_in_millimetres() -> None:
    mask, parcellation = phantom()
    _, record = analyse(mask, parcellation)
    clusters = record["tables"]["clusters"].to_pandas().set_index("n_voxels")
    tube_b = clusters.loc[8]
    assert tube_b["length_mm"] == pytest.approx(8.0)
    assert tube_b["width_mm"] == pytest.approx(2 * math.sqrt(8 / (math.pi * 8)))
    assert (tube_b[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]] == [5, 30, 8.5]).all()
    assert tube_b["region"] == "white_matter"


def test_anisotropic_and_rotated_voxels() -> None:
    affine = np.diag([1.0, 1.0, 3.0, 1.0])  # 3 mm slices along the third axis
    mask = np.zeros((20, 20, 10), np.uint8)
    mask[5, 5, 2:6] = 1  # 4 voxels across slices: 12 mm long, 12 mm³
    mask[2:8, 15, 5] = 1  # 6 voxels in-plane: 6 mm long, 18 mm³
    _, record = analyse(mask, None, affine, KEEP_ALL)
    clusters = record["tables"]["clusters"].to_pandas().sort_values("n_voxels")
    assert clusters["length_mm"].tolist() == pytest.approx([12.0, 6.0])
    assert clusters["volume_mm3"].tolist() == pytest.approx([12.0, 18.0])
    assert clusters["centroid_z_mm"].tolist() == pytest.approx([3.5 * 3, 15.0])
    assert set(clusters["region"]) == {"whole_brain"}
    assert [r["region"] for r in record["tables"]["regions"].to_pylist()] == ["whole_brain"]

    # The same tube under a 90° rotation (array axis 0 along scanner y) and a shift.
    rotated = np.array([[0, -1, 0, 10], [1, 0, 0, -5], [0, 0, 3, 2], [0, 0, 0, 1]], float)
    _, turned = analyse(mask, None, rotated, KEEP_ALL)
    turned_clusters = turned["tables"]["clusters"].to_pandas().sort_values("n_voxels")
    assert turned_clusters["length_mm"].tolist() == pytest.approx([12.0, 6.0])
    assert turned_clusters["centroid_y_mm"].tolist() == pytest.approx([5 - 5, 4.5 - 5])


def test_size_filter_in_voxels_or_cubic_millimetres() -> None:
    mask = np.zeros((20, 20, 10), np.uint8)
    mask[2, 2, 1:4] = 1  # 3 voxels = 9 mm³
    mask[10, 10, 1:5] = 1  # 4 voxels = 12 mm³ (3 mm³ voxels)
    by_volume = PvsClusterRules(min_voxels=1, min_volume_mm3=10.0)
    assert by_volume.min_voxels_for(3.0) == 4
    _, _, n = find_clusters(mask, 3.0, by_volume)
    assert n == 1
    assert find_clusters(mask, 3.0, PvsClusterRules(min_voxels=1))[2] == 2
    assert find_clusters(mask, 3.0, PvsClusterRules())[2] == 0  # both <= 5 voxels


def test_connectivity_decides_what_is_one_cluster() -> None:
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:5, 2, 2] = 1
    mask[5, 3, 3] = 1  # touches the line by a corner only
    kept = PvsClusterRules(min_voxels=1)
    assert find_clusters(mask, 1.0, kept)[2] == 1
    assert find_clusters(mask, 1.0, PvsClusterRules(connectivity=18, min_voxels=1))[2] == 2
    assert find_clusters(mask, 1.0, PvsClusterRules(connectivity=6, min_voxels=1))[2] == 2


def test_excluded_labels_are_removed_before_clustering() -> None:
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:12, 5, 5] = 1  # 10 voxels, of which 6 lie in a "ventricle"
    ventricle = np.zeros(mask.shape, bool)
    ventricle[6:12] = True
    cleaned = clean_mask(mask, 1.0, PvsClusterRules(exclude_labels=(4,)), ventricle)
    assert cleaned.sum() == 0  # 4 voxels remain, then fail the size filter
    cleaned = clean_mask(mask, 1.0, PvsClusterRules(min_voxels=1, exclude_labels=(4,)), ventricle)
    assert cleaned.sum() == 4


def test_empty_mask_gives_zero_counts() -> None:
    mask, parcellation = phantom()
    _, record = analyse(np.zeros_like(mask), parcellation)
    for row in record["tables"]["regions"].to_pylist():
        assert (row["n_clusters"], row["total_volume_mm3"], row["n_voxels"]) == (0, 0.0, 0)
        assert math.isnan(row["mean_volume_mm3"]) and math.isnan(row["max_volume_mm3"])
    assert record["tables"]["clusters"].num_rows == 0
    columns = cluster_measures(np.zeros((3, 3, 3), np.uint32), 0, np.eye(4), [])
    assert all(len(values) == 0 for values in columns.values())


def test_majority_vote_with_ties_and_outside_voxels() -> None:
    labels = np.zeros((1, 1, 9), np.uint32)
    labels[0, 0, :4] = 1  # 3 in region 1, 1 in region 2 -> region 1
    labels[0, 0, 4:6] = 2  # 1 in region 1, 1 in region 2 -> tie -> other
    labels[0, 0, 6:9] = 3  # 2 outside, 1 in region 2 -> other
    codes = np.array([[[1, 1, 1, 2, 1, 2, 0, 0, 2]]], np.uint8)
    assert assign_clusters(labels, 3, codes, 2).tolist() == [1, 0, 0]
    assert region_names(None) == ("whole_brain",)


def test_parcellation_is_resampled_through_the_affines(tmp_path: Path) -> None:
    # Parcellation on a 2 mm grid with a flipped first axis and another origin;
    # its labels depend on the scanner x coordinate: x < 0 WM, x >= 0 BG.
    parc_affine = np.array([[-2, 0, 0, 40], [0, 2, 0, -40], [0, 0, 2, -40], [0, 0, 0, 1]], float)
    i = np.arange(40)
    x = parc_affine[0, 0] * i + parc_affine[0, 3]
    labels = np.broadcast_to(np.where(x < 0, WM, BG)[:, None, None], (40, 40, 40)).astype(np.int16)
    path = save_nifti(tmp_path / "dseg.nii.gz", labels, parc_affine)
    image_affine = np.array([[1, 0, 0, -30], [0, 1, 0, -20], [0, 0, 1, -20], [0, 0, 0, 1]], float)
    on_grid = parcellation_on_grid(path, (60, 40, 40), image_affine)
    image_x = np.arange(60) - 30.0
    expected = np.where(image_x < 0, WM, BG)
    clear = np.abs(image_x) > 2  # away from the border, where nearest neighbour may go either way
    assert (on_grid[clear, 20, 20] == expected[clear]).all()
    assert on_grid.dtype == np.int32 and on_grid.shape == (60, 40, 40)

    far_away = image_affine.copy()
    far_away[:3, 3] += 1000.0
    with pytest.raises(RegionError, match="does not overlap the image"):
        parcellation_on_grid(path, (60, 40, 40), far_away)


def test_a_non_label_parcellation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "probabilities.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), path)
    with pytest.raises(RegionError, match="non-integer values"):
        parcellation_on_grid(path, (4, 4, 4), np.eye(4))


def test_region_tables_built_in_and_from_json(tmp_path: Path) -> None:
    assert load_region_table("aseg") is ASEG
    assert dict(ASEG.regions)["white_matter"] == (2, 41, 77, 251, 252, 253, 254, 255)
    assert dict(ASEG.regions)["basal_ganglia"] == (11, 12, 13, 26, 50, 51, 52, 58)
    assert {"thalamus", "hippocampus", "brainstem", "cerebellum"} <= set(ASEG.names)
    path = tmp_path / "shivai.json"
    path.write_text(
        json.dumps({"name": "shivai", "regions": {"bg": [11, "12", "49-50"], "wm": [2]}})
    )
    table = load_region_table(path)
    assert table.name == "shivai" and dict(table.regions) == {"bg": (11, 12, 49, 50), "wm": (2,)}
    assert table.index_map(np.array([0, 2, 12, 50, 3, 9999])).tolist() == [0, 2, 1, 1, 0, 0]

    path.write_text(json.dumps({"a": [2], "b": [2]}))
    with pytest.raises(RegionError, match="label 2 is in both 'a' and 'b'"):
        load_region_table(path)
    path.write_text(json.dumps({"other": [2]}))
    with pytest.raises(RegionError, match="region name 'other'"):
        load_region_table(path)
    path.write_text(json.dumps({"wm": ["two"]}))
    with pytest.raises(RegionError, match="'two' is not a label"):
        load_region_table(path)
    with pytest.raises(RegionError, match="neither a JSON file"):
        load_region_table("nonsense")


def test_dice_edge_cases() -> None:
    empty = np.zeros((5, 5, 5), np.uint8)
    one = empty.copy()
    one[2, 2, 2] = 1
    assert voxel_dice(empty, empty) == 1.0
    assert voxel_dice(one, empty) == 0.0 and voxel_dice(empty, one) == 0.0
    assert cluster_agreement(empty, empty).f1 == 1.0
    assert cluster_agreement(one, empty).f1 == 0.0 and cluster_agreement(empty, one).f1 == 0.0


def test_evaluation_per_region() -> None:
    mask, parcellation = phantom()
    settings = PvsClusterRules()
    reference = clean_mask(mask, 1.0, settings)
    prediction = reference.copy()
    prediction[30, 10:17, 30] = 0  # the BG tube is missed
    prediction[2:10, 2, 2] = 1  # a false WM cluster
    codes = ASEG.index_map(parcellation)
    rows = {
        r["region"]: r for r in evaluate_by_region(prediction, reference, codes, region_names(ASEG))
    }
    assert set(rows) == {*ASEG.names, "whole_brain"}
    wm = rows["white_matter"]
    # WM reference: A, B, E (8 voxels inside) and D's 5 WM voxels; prediction adds 8 voxels.
    assert (wm["n_reference_clusters"], wm["n_predicted_clusters"]) == (4, 5)
    assert (wm["cluster_recall"], wm["cluster_precision"]) == (1.0, 0.8)
    assert wm["voxel_dice"] == pytest.approx(2 * 31 / (31 + 39))
    bg = rows["basal_ganglia"]
    # BG reference: C, D's and E's BG parts (3 clusters, 14 voxels); C is missed.
    assert bg["voxel_dice"] == pytest.approx(2 * 7 / (14 + 7))
    assert (bg["cluster_recall"], bg["cluster_precision"]) == (pytest.approx(2 / 3), 1.0)
    assert bg["cluster_f1"] == pytest.approx(0.8)
    assert rows["thalamus"]["voxel_dice"] == 1.0  # both empty
    whole = rows["whole_brain"]
    assert (whole["n_reference_clusters"], whole["n_predicted_clusters"]) == (5, 5)
    assert (whole["cluster_recall"], whole["cluster_precision"]) == (0.8, 0.8)


def test_summary_per_site_and_overall() -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "scan_id": ["a", "a", "b", "b", "c", "c"],
            "site": ["s1", "s1", "s1", "s1", "s2", "s2"],
            "region": ["white_matter", "whole_brain"] * 3,
            "voxel_dice": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            "cluster_f1": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        }
    )
    summary = summarise(frame, ("white_matter", "whole_brain"))
    assert summary.index.tolist() == ["s1", "s2", "all"]
    assert summary.loc["s1", ("white_matter", "voxel_dice", "mean")] == pytest.approx(0.6)
    assert summary.loc["all", ("white_matter", "voxel_dice", "mean")] == pytest.approx(0.7)
    assert summary.loc["all", ("whole_brain", "cluster_f1", "std")] == pytest.approx(0.2)
    assert summary.loc["all", ("n_scans", "", "")] == 3
