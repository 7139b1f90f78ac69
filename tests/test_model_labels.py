"""A model's labels: which are PVS, which regions they give, what is kept apart.

- resolve_labels' rules on label sets like the public models' (Monash T1w+FLAIR:
  PVS + WMH; region-specific WM-PVS / BG-PVS), and their refusals.
- analyse_mask on a hand-made label map: WMH voxels never reach the PVS tables, two
  PVS labels give two regions, a parcellation's regions and the model's labels are
  both kept, --pvs-labels moves a label from PVS to the structures.
- A tiny multi-class nnU-Net model (built with nnU-Net's own planner and network,
  RANDOM weights, labels WM-PVS / BG-PVS / WMH) through `pingu-dask run`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pingu_dask.analysis.labels import (
    LabelError,
    majority_labels,
    region_of_name,
    resolve_labels,
)
from pingu_dask.analysis.regions import ASEG, RegionTable
from pingu_dask.analysis.scan import analyse_mask, regions_from_labels
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.manifest import Scan

MONASH = (("background", 0), ("PVS", 1), ("WMH", 2))
REGIONAL = (("background", 0), ("WM-PVS", 1), ("BG-PVS", 2), ("WMH", 3))
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_pvs_is_what_the_names_say_and_wmh_is_kept_apart() -> None:
    labels = resolve_labels("monash", MONASH)
    assert labels.pvs == (1,)
    assert labels.others == (("WMH", 2),)
    assert labels.regions == ()
    assert not labels.is_binary


def test_region_specific_labels_give_their_regions() -> None:
    labels = resolve_labels("regional", REGIONAL)
    assert labels.pvs == (1, 2)
    assert dict(labels.regions) == {1: "white_matter", 2: "basal_ganglia"}
    table = labels.region_table()
    assert table is not None and dict(table.regions) == {
        "white_matter": (1,),
        "basal_ganglia": (2,),
    }


@pytest.mark.parametrize(
    ("name", "region"),
    [
        ("WM-PVS", "white_matter"),
        ("BasalGanglia_PVS", "basal_ganglia"),
        ("hippocampus PVS", "hippocampus"),
        ("PVS", None),
        ("WM_BG_PVS", None),  # names two regions: none is guessed
    ],
)
def test_region_of_a_label_name(name: str, region: str | None) -> None:
    assert region_of_name(name) == region


def test_a_single_label_counts_as_pvs_whatever_its_name() -> None:
    labels = resolve_labels("v1", (("background", 0), ("label_1", 1)))
    assert labels.pvs == (1,) and labels.is_binary


def test_several_labels_none_named_pvs_are_refused_not_guessed() -> None:
    with pytest.raises(LabelError, match=r"label_1 \(1\), label_2 \(2\).*--pvs-labels"):
        resolve_labels("m", (("background", 0), ("label_1", 1), ("label_2", 2)))


def test_pvs_labels_by_name_or_value_and_unknown_ones_named() -> None:
    assert resolve_labels("m", REGIONAL, "wm-pvs").pvs == (1,)
    assert resolve_labels("m", REGIONAL, "1,3").pvs == (1, 3)
    with pytest.raises(LabelError, match="'CSO-PVS' is not one of its labels"):
        resolve_labels("m", REGIONAL, "CSO-PVS")


def test_label_regions_override_and_none() -> None:
    labels = resolve_labels("m", REGIONAL, None, "WM-PVS=deep_white_matter")
    assert labels.regions == ((1, "deep_white_matter"),)
    assert resolve_labels("m", REGIONAL, None, "none").regions == ()
    with pytest.raises(LabelError, match="not a PVS label"):
        resolve_labels("m", REGIONAL, None, "WMH=white_matter")
    with pytest.raises(LabelError, match="LABEL=region"):
        resolve_labels("m", REGIONAL, None, "WM-PVS")


def test_a_cluster_takes_the_label_of_most_of_its_voxels_lower_on_ties() -> None:
    clusters = np.array([1, 1, 1, 2, 2, 0])
    label_map = np.array([1, 2, 2, 1, 2, 3])
    assert majority_labels(clusters, 2, label_map, (1, 2)).tolist() == [2, 1]


def _label_map() -> tuple[np.ndarray, np.ndarray]:
    """A 40^3 label map with tubes of WM-PVS (1), BG-PVS (2) and a WMH blob (3), and a
    parcellation: WM (2) in x < 20, putamen (12) in x >= 20."""
    label_map = np.zeros((40, 40, 40), np.uint8)
    label_map[5, 5, 5:15] = 1  # WM-PVS, 10 voxels, in WM
    label_map[10, 10, 5:12] = 1  # WM-PVS, 7 voxels, in WM
    label_map[30, 30, 5:15] = 2  # BG-PVS, 10 voxels, in the putamen
    label_map[8:14, 25:31, 25:31] = 3  # WMH, 216 voxels
    parcellation = np.full(label_map.shape, 2, np.int32)
    parcellation[20:] = 12
    return label_map, parcellation


SCAN = Scan(scan_id="s1", channels=(), subject="1", session=None, site="a")
RULES = PvsClusterRules(min_voxels=3)


def test_wmh_voxels_never_reach_the_pvs_tables() -> None:
    label_map, _ = _label_map()
    labels = resolve_labels("regional", REGIONAL)
    analysis = analyse_mask(label_map, np.eye(4), SCAN, None, RULES, ASEG, labels, "model")
    clusters = pd.DataFrame(analysis.rows.clusters)
    assert len(clusters) == 3 and clusters.n_voxels.sum() == 27
    assert set(clusters.label) == {"WM-PVS", "BG-PVS"}
    assert not np.any(analysis.mask[label_map == 3])  # the stored PVS mask
    assert np.array_equal(analysis.mask, np.where(label_map < 3, label_map, 0))
    assert analysis.structures is not None
    assert np.array_equal(analysis.structures > 0, label_map == 3)
    assert analysis.rows.structures == [
        {**SCAN_COLUMNS, "label": "WMH", "label_value": 3,
         "n_voxels": 216, "volume_mm3": 216.0}
    ]  # fmt: skip
    regions = {row["region"]: row for row in analysis.rows.regions}
    assert regions["white_matter"]["n_clusters"] == 2
    assert regions["white_matter"]["n_voxels"] == 17
    assert regions["basal_ganglia"]["n_clusters"] == 1
    assert regions["whole_brain"]["n_voxels"] == 27
    assert {row["region_source"] for row in analysis.rows.regions} == {"model"}


SCAN_COLUMNS = {"scan_id": "s1", "subject": "1", "session": None, "site": "a"}


def test_with_a_parcellation_both_region_and_model_label_are_kept() -> None:
    label_map, parcellation = _label_map()
    label_map[5, 5, 5:15] = 2  # a "BG-PVS" tube lying in the parcellation's WM
    labels = resolve_labels("regional", REGIONAL)
    regions = regions_from_labels(parcellation, ASEG, RULES)
    analysis = analyse_mask(label_map, np.eye(4), SCAN, regions, RULES, ASEG, labels, "synthseg")
    clusters = pd.DataFrame(analysis.rows.clusters).sort_values("n_voxels")
    assert clusters[["region", "label"]].values.tolist() == [
        ["white_matter", "WM-PVS"],
        ["white_matter", "BG-PVS"],  # the parcellation's region, the model's label
        ["basal_ganglia", "BG-PVS"],
    ]


def test_pvs_labels_moves_a_label_to_the_structures() -> None:
    label_map, _ = _label_map()
    labels = resolve_labels("regional", REGIONAL, "WM-PVS")
    analysis = analyse_mask(label_map, np.eye(4), SCAN, None, RULES, ASEG, labels, "model")
    clusters = pd.DataFrame(analysis.rows.clusters)
    assert set(clusters.label) == {"WM-PVS"} and clusters.n_voxels.sum() == 17
    assert [row["label"] for row in analysis.rows.structures] == ["BG-PVS", "WMH"]
    assert [row["n_voxels"] for row in analysis.rows.structures] == [10, 216]
    assert [row["region"] for row in analysis.rows.regions] == [
        "white_matter",
        "other",
        "whole_brain",
    ]


def test_a_pvs_only_model_writes_what_it_always_wrote() -> None:
    label_map, _ = _label_map()
    binary = (label_map > 0).astype(np.uint8)
    labels = resolve_labels("demo", (("background", 0), ("PVS", 1)))
    table = RegionTable("t", (("a", (1,)),))
    analysis = analyse_mask(binary, np.eye(4), SCAN, None, RULES, table, labels)
    assert analysis.structures is None and analysis.rows.structures == []
    assert set(np.unique(analysis.mask)) == {0, 1}
    assert [row["region"] for row in analysis.rows.regions] == ["whole_brain"]


# --- a real multi-class nnU-Net model through `pingu-dask run` ---------------------


@pytest.fixture(scope="module")
def regional_model(tmp_path_factory: pytest.TempPathFactory, cohort: Path) -> Path:
    """scripts/make_bench_model.py --size tiny --labels WM-PVS,BG-PVS,WMH: nnU-Net's
    planner and network, RANDOM weights, each output biased to ~2 % of a head."""
    out = tmp_path_factory.mktemp("regional_model")
    scan = cohort / "sub-001" / "anat" / "sub-001_T1w.nii.gz"
    command = [sys.executable, str(SCRIPTS / "make_bench_model.py"), str(out), "--size", "tiny",
               "--calibrate-on", str(scan), "--foreground", "0.06",
               "--labels", "WM-PVS,BG-PVS,WMH"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(result.stdout.strip().splitlines()[-1])


def _run(model: Path, manifest: Path, out: Path, *options: str) -> None:
    from click.testing import CliRunner

    from pingu_dask.cli import main

    arguments = ["run", str(manifest), "--out", str(out), "--model", str(model), "-w", "1",
                 "--device", "cpu", "--no-tta", "--no-nifti", *options]  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    return None


def _manifest(cohort: Path, folder: Path, parcellation: bool) -> Path:
    table = pd.read_csv(cohort / "manifest.csv").head(2)
    columns = ["t1w", "parcellation"] if parcellation else ["t1w"]
    for column in columns:
        table[column] = [str(cohort / p) for p in table[column]]
    keep = ["scan_id", "subject", "session", "site", *columns]
    path = folder / ("with_parcellation.csv" if parcellation else "t1w_only.csv")
    table[keep].to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_a_multi_class_model_runs_and_keeps_its_labels_apart(
    regional_model: Path, cohort: Path, tmp_path: Path
) -> None:
    import zarr

    from pingu_dask.output import tables

    out = tmp_path / "own_regions"
    _run(regional_model, _manifest(cohort, tmp_path, parcellation=False), out)
    clusters = tables.read_table(out, "clusters")
    structures = tables.read_table(out, "structures")
    regions = tables.read_table(out, "regions")
    assert set(clusters.label) == {"WM-PVS", "BG-PVS"}
    assert set(structures.label) == {"WMH"} and len(structures) == 2
    # Two PVS labels, two regions: each cluster counted in its label's region.
    assert set(clusters.region) == {"white_matter", "basal_ganglia"}
    expected = {"WM-PVS": "white_matter", "BG-PVS": "basal_ganglia"}
    assert (clusters.region == clusters.label.map(expected)).all()
    assert set(regions.region_source) == {"model"}
    for scan_id in ("sub-001", "sub-002"):
        group = zarr.open_group(out / "masks.zarr" / scan_id, mode="r")
        pvs, other = np.asarray(group["pvs"][...]), np.asarray(group["structures"][...])
        assert set(np.unique(pvs)) <= {0, 1, 2} and set(np.unique(other)) == {0, 3}
        assert not np.any((pvs > 0) & (other > 0))  # WMH voxels are never PVS voxels
        mine = clusters[clusters.scan_id == scan_id]
        assert mine.n_voxels.sum() == np.count_nonzero(pvs) > 0
        for label, value in (("WM-PVS", 1), ("BG-PVS", 2)):
            assert mine[mine.label == label].n_voxels.sum() > 0
            assert np.count_nonzero(pvs == value) > 0
        wmh = structures[structures.scan_id == scan_id]
        assert wmh.n_voxels.tolist() == [np.count_nonzero(other == 3)]
        assert group.attrs["labels"]["other_structures"] == ["WMH"]
    from pingu_dask.output.export import wide_table

    wide = wide_table(out).set_index("scan_id")  # WMH volume beside the PVS figures
    by_scan = structures.set_index("scan_id").volume_mm3.round(3)
    assert wide.wmh_volume_mm3.astype(float).to_dict() == by_scan.to_dict()
    assert "wmh_n_clusters" not in wide and "whole_brain_n_clusters" in wide
    run = json.loads((out / "run.json").read_text())
    assert run["labels"]["pvs"] == ["WM-PVS", "BG-PVS"]
    assert run["labels"]["label_regions"] == {"WM-PVS": "white_matter", "BG-PVS": "basal_ganglia"}

    # --pvs-labels: only WM-PVS counts; BG-PVS joins the structures.
    only_wm = tmp_path / "only_wm"
    _run(regional_model, _manifest(cohort, tmp_path, parcellation=False), only_wm,
         "--pvs-labels", "WM-PVS")  # fmt: skip
    wm_clusters = tables.read_table(only_wm, "clusters")
    assert set(wm_clusters.label) == {"WM-PVS"}
    assert set(tables.read_table(only_wm, "structures").label) == {"BG-PVS", "WMH"}
    assert 0 < wm_clusters.n_voxels.sum() < clusters.n_voxels.sum()

    # With a parcellation the regions are its own, and each cluster keeps its label.
    parcellated = tmp_path / "parcellated"
    _run(regional_model, _manifest(cohort, tmp_path, parcellation=True), parcellated)
    both = tables.read_table(parcellated, "clusters")
    assert set(both.region_source) == {"synthseg"}
    assert set(both.label) == {"WM-PVS", "BG-PVS"}
    assert set(both.region) <= {*ASEG.names, "other"}
    by_label = both.label.map(expected)
    assert (both.region != by_label).any()  # the parcellation decides, not the label


def test_the_structures_get_their_own_nifti_beside_the_pvs_mask(tmp_path: Path) -> None:
    import nibabel as nib

    from pingu_dask.output.derivatives import write_nifti_outputs

    label_map, _ = _label_map()
    labels = resolve_labels("regional", REGIONAL)
    analysis = analyse_mask(label_map, np.eye(4), SCAN, None, RULES, ASEG, labels, "model")
    assert analysis.structures is not None
    written = write_nifti_outputs(
        tmp_path, "s1_desc-pvs_mask.nii.gz", analysis.mask, analysis.labels, np.eye(4),
        {"Labels": labels.record()}, structures=analysis.structures,
        structure_labels=dict(labels.others),
    )  # fmt: skip
    image = np.asarray(nib.load(written["structures"]).dataobj)
    assert np.array_equal(image, np.where(label_map == 3, 3, 0))
    assert set(np.unique(np.asarray(nib.load(written["mask"]).dataobj))) == {0, 1, 2}
    sidecar = json.loads(Path(written["structures"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["Labels"] == {"3": "WMH"}
    mask_sidecar = json.loads(Path(written["sidecar"]).read_text())
    assert mask_sidecar["StructuresImage"] == "s1_desc-structures_dseg.nii.gz"
    assert mask_sidecar["Labels"]["pvs"] == ["WM-PVS", "BG-PVS"]
