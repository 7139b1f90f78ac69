"""OUT/nifti as a BIDS-derivatives dataset that says where it came from (fast tier).

- write_nifti_outputs on a hand-made mask analysed for real (analyse_mask): the
  labelled cluster image's voxels are the clusters table's rows (cluster k has the
  n_voxels and centroid of row k), nibabel reads it with the mask's affine (an oblique
  one), the dtype follows the number of clusters, the sidecars hold what was given
  plus Sources and the cluster image's name, and inputs that do not fit are refused.
- dataset_description.json: GeneratedBy names the tool and the model; the same
  model again leaves the file alone; another version is added, not swapped in; and a
  real segment_scans (the real stages around the stand-in model, on a LocalCluster)
  writes each scan's derivatives and the model's facts.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pingu_dask import __version__
from pingu_dask.analysis.regions import ASEG
from pingu_dask.analysis.scan import Regions, analyse_mask
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output import derivatives, layout

WM, BG = 2, 11  # FreeSurfer labels: cerebral white matter, caudate
NAME = "sub-01/ses-1/anat/sub-01_ses-1_desc-pvs_mask.nii.gz"
#: Oblique (15 degrees about z), anisotropic, shifted: a writer that dropped or rounded
#: the affine would show.
ANGLE = np.deg2rad(15)
AFFINE = np.array(
    [
        [0.9 * np.cos(ANGLE), -0.9 * np.sin(ANGLE), 0.0, -20.5],
        [0.9 * np.sin(ANGLE), 0.9 * np.cos(ANGLE), 0.0, 13.25],
        [0.0, 0.0, 1.2, -7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def analysed():
    """A hand-made scan with three PVS tubes (two in white matter, one in the basal
    ganglia) and one voxel too small to count: analyse_mask's result."""
    shape = (30, 32, 36)
    parcellation = np.zeros(shape, np.int32)
    parcellation[3:27, 3:29, 16:34] = WM
    parcellation[8:22, 10:22, 4:14] = BG
    mask = np.zeros(shape, np.uint8)
    mask[6:16, 20, 24] = 1  # white matter, along x: 10 voxels
    mask[20, 8:14, 28] = 1  # white matter, along y: 6 voxels
    mask[15, 15, 5:12] = 1  # basal ganglia, along z: 7 voxels
    mask[25, 5, 30] = 1  # a lone voxel: below min_voxels, not a cluster
    scan = Scan("s1", (("t1w", Path("t1.nii.gz")),))
    regions = Regions(ASEG.index_map(parcellation), None)
    return analyse_mask(mask, AFFINE, scan, regions, PvsClusterRules(min_voxels=2), ASEG)


def test_the_cluster_image_holds_the_clusters_table_rows(tmp_path: Path) -> None:
    analysis = analysed()
    columns = analysis.rows.clusters  # the clusters table's rows, by column
    rows = zip(*columns.values(), strict=True)
    clusters = [dict(zip(columns, values, strict=True)) for values in rows]
    assert [int(row["cluster"]) for row in clusters] == [1, 2, 3]
    written = derivatives.write_nifti_outputs(
        tmp_path, NAME, analysis.mask, analysis.labels, AFFINE, {"ScanId": "s1"}
    )
    folder = tmp_path / "nifti" / "sub-01" / "ses-1" / "anat"
    assert written == {
        "mask": str(folder / "sub-01_ses-1_desc-pvs_mask.nii.gz"),
        "clusters": str(folder / "sub-01_ses-1_desc-pvsclusters_dseg.nii.gz"),
        "sidecar": str(folder / "sub-01_ses-1_desc-pvs_mask.json"),
        "clusters_sidecar": str(folder / "sub-01_ses-1_desc-pvsclusters_dseg.json"),
    }
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        Path(p).name for p in written.values()
    )
    image = nib.load(written["clusters"])
    mask = nib.load(written["mask"])
    for loaded in (image, mask):
        np.testing.assert_allclose(loaded.affine, AFFINE, atol=1e-6)
        assert int(loaded.header["sform_code"]) == 1 and int(loaded.header["qform_code"]) == 1
    assert image.get_data_dtype() == np.uint16
    assert image.header.get_intent()[0] == "label"
    values = np.asanyarray(image.dataobj)
    np.testing.assert_array_equal(values, analysis.labels)
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), analysis.mask)
    assert np.array_equal(values > 0, analysis.mask > 0)  # the lone voxel is in neither
    assert analysis.mask[25, 5, 30] == 0 and values[25, 5, 30] == 0
    # Row k of the clusters table is the voxels valued k: same count, same centroid (mm).
    for row in clusters:
        voxels = np.argwhere(values == row["cluster"])
        assert len(voxels) == row["n_voxels"]
        centroid = nib.affines.apply_affine(AFFINE, voxels.mean(axis=0))
        measured = [row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]]
        np.testing.assert_allclose(centroid, measured, atol=1e-3)
    assert sorted(row["n_voxels"] for row in clusters) == [6, 7, 10]


def test_the_sidecars_say_where_the_mask_came_from(tmp_path: Path) -> None:
    analysis = analysed()
    sidecar = {
        "Model": {"Name": "Dataset001_PVS", "Folds": ("0", "1"), "Fingerprint": "ab12"},
        "Settings": {"min_voxels": np.int64(2), "threshold": np.float32(0.5)},
        "RegionSource": "synthseg",
        "Flags": ["low_contrast"],
        "Orientation": {"stored": "LPS", "network": "RAS"},
        "Unmeasured": float("nan"),
        "Sources": "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
    }
    written = derivatives.write_nifti_outputs(
        tmp_path, NAME, analysis.mask, analysis.labels, AFFINE, sidecar,
        sources=["/data/sub-01_ses-1_T2w.nii.gz"],
    )  # fmt: skip
    document = json.loads(Path(written["sidecar"]).read_text())
    assert document == {
        "Description": derivatives.MASK_DESCRIPTION,
        "Model": {"Name": "Dataset001_PVS", "Folds": ["0", "1"], "Fingerprint": "ab12"},
        "Settings": {"min_voxels": 2, "threshold": 0.5},
        "RegionSource": "synthseg",
        "Flags": ["low_contrast"],
        "Orientation": {"stored": "LPS", "network": "RAS"},
        "Unmeasured": None,
        "Sources": [
            "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
            "/data/sub-01_ses-1_T2w.nii.gz",
        ],
        "ClusterImage": "sub-01_ses-1_desc-pvsclusters_dseg.nii.gz",
    }
    assert (Path(written["sidecar"]).parent / document["ClusterImage"]).is_file()
    of_clusters = json.loads(Path(written["clusters_sidecar"]).read_text())
    assert of_clusters["Sources"] == [f"bids::{NAME}"]
    assert of_clusters["NumberOfClusters"] == 3
    assert "`cluster` column" in of_clusters["Description"]
    # A retried attempt writes the same names again, and leaves no temporary files.
    derivatives.write_nifti_outputs(tmp_path, NAME, analysis.mask, analysis.labels, AFFINE, {})
    folder = Path(written["mask"]).parent
    assert len(list(folder.iterdir())) == 4
    assert json.loads(Path(written["sidecar"]).read_text())["Sources"] == []


def test_a_mask_at_the_top_and_a_bool_mask(tmp_path: Path) -> None:
    labels = np.zeros((4, 5, 6), np.int32)
    labels[1, 1, 1:3] = 1
    written = derivatives.write_nifti_outputs(
        tmp_path, "s-7_desc-pvs_mask.nii.gz", labels > 0, labels, np.eye(4), {}
    )
    assert Path(written["clusters"]) == tmp_path / "nifti" / "s-7_desc-pvsclusters_dseg.nii.gz"
    assert nib.load(written["mask"]).get_data_dtype() == np.uint8
    assert np.asanyarray(nib.load(written["mask"]).dataobj).sum() == 2


def test_the_label_type_follows_the_number_of_clusters(tmp_path: Path) -> None:
    assert derivatives.label_dtype(0) is np.uint16
    assert derivatives.label_dtype(65534) is np.uint16
    assert derivatives.label_dtype(65535) is np.uint32
    # 65,535 one-voxel clusters (every other voxel): the largest label needs uint32.
    labels = np.zeros((8, 256, 64), np.int64)  # NIfTI-1 dims are int16: < 32768 each
    labels.reshape(-1)[: 2 * 65535 : 2] = np.arange(1, 65536)
    written = derivatives.write_nifti_outputs(
        tmp_path, "big_desc-pvs_mask.nii.gz", labels > 0, labels, np.eye(4), {}
    )
    image = nib.load(written["clusters"])
    assert image.get_data_dtype() == np.uint32
    values = np.asanyarray(image.dataobj)
    assert values.max() == 65535
    np.testing.assert_array_equal(values, labels)


@pytest.mark.parametrize(
    ("name", "mask", "labels", "message"),
    [
        ("../x_desc-pvs_mask.nii.gz", None, None, "not a mask name"),
        ("/abs/x_desc-pvs_mask.nii.gz", None, None, "not a mask name"),
        ("x_T1w.nii.gz", None, None, "not a mask name"),
        ("x_desc-pvs_mask.nii.gz", np.ones((3, 3, 3)), np.ones((3, 3, 4), int), "same shape"),
        ("x_desc-pvs_mask.nii.gz", np.ones((3, 3, 3)), np.zeros((3, 3, 3), int), "differ at 27"),
        ("x_desc-pvs_mask.nii.gz", np.ones((3, 3, 3)), np.full((3, 3, 3), 2), "missing: [1]"),
        ("x_desc-pvs_mask.nii.gz", np.ones((3, 3, 3)), np.ones((3, 3, 3)), "integers"),
    ],
)
def test_what_does_not_fit_is_refused_naming_the_file(
    tmp_path: Path, name: str, mask, labels, message: str
) -> None:
    if mask is None:
        mask, labels = np.ones((2, 2, 2), np.uint8), np.ones((2, 2, 2), np.int32)
    with pytest.raises(ValueError) as raised:
        derivatives.write_nifti_outputs(tmp_path, name, mask, labels, np.eye(4), {})
    assert Path(name).name in str(raised.value) and message in str(raised.value)
    assert not list(tmp_path.rglob("*.nii.gz")) and not list(tmp_path.rglob("*.json"))


MODEL = {
    "name": "Dataset001_PVS__nnUNetPlans__3d_fullres",
    "folds": ["0", "1", "2", "3", "4"],
    "fingerprint": "3f5e",
    "configuration": "3d_fullres",
    "checkpoint": "checkpoint_final.pth",
}


def test_generated_by_names_the_tool_and_the_model(tmp_path: Path, monkeypatch) -> None:
    layout.describe_nifti_dataset(tmp_path, MODEL)
    path = tmp_path / "nifti" / "dataset_description.json"
    description = json.loads(path.read_text())
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"] == "1.9.0"
    [entry] = description["GeneratedBy"]
    assert entry["Name"] == "pingu-dask" and entry["Version"] == __version__
    assert "Model" in entry["Description"]
    assert entry["Model"] == {
        "Name": "Dataset001_PVS__nnUNetPlans__3d_fullres",
        "Folds": ["0", "1", "2", "3", "4"],
        "Fingerprint": "3f5e",
        "Configuration": "3d_fullres",
        "Checkpoint": "checkpoint_final.pth",
    }
    # A resumed run with the same model leaves the file as it is (not even rewritten).
    before = path.stat()
    layout.describe_nifti_dataset(tmp_path, dict(MODEL))
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # A run allowed across versions adds its entry after the first one.
    monkeypatch.setattr(layout, "__version__", "9.9.9")
    layout.describe_nifti_dataset(tmp_path, MODEL)
    entries = json.loads(path.read_text())["GeneratedBy"]
    assert [e["Version"] for e in entries] == [__version__, "9.9.9"]
    assert entries[0] == entry and entries[1]["Model"] == entry["Model"]
    # Another model (e.g. PINGU-ADNI beside PINGU-AF) would be told apart.
    layout.describe_nifti_dataset(tmp_path, {**MODEL, "fingerprint": "77aa"})
    fingerprints = [e["Model"]["Fingerprint"] for e in json.loads(path.read_text())["GeneratedBy"]]
    assert fingerprints == ["3f5e", "3f5e", "77aa"]
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporaries


def test_a_run_writes_its_derivatives_and_names_its_model(tmp_path: Path) -> None:
    """segment_scans with write_nifti on a real LocalCluster: the real stages around the
    stand-in model (test-only: an empty label map, tiny real images) write each scan's
    mask, cluster image and sidecars on the input's grid, and the description carries
    the pipeline's own model facts; the same run again rewrites the scans' files under
    the same names and leaves the description untouched."""
    from benchkit import standins

    from pingu_dask.run.loop import Segmentation, segment_scans

    scans = standins.make_scans(2, tmp_path)
    pipeline = standins.pipeline_in(tmp_path, write_nifti=True)
    nifti = tmp_path / "out" / "nifti"
    path = nifti / "dataset_description.json"
    with standins.client_for_stand_ins(1, 2) as client:
        records = segment_scans(client, Segmentation(scans=scans, pipeline=pipeline, watch=False))
        assert [r.status for r in records] == ["ok", "ok"]
        before = path.stat()
        again = segment_scans(client, Segmentation(scans=scans, pipeline=pipeline, watch=False))
        assert [r.status for r in again] == ["ok", "ok"]
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    [entry] = json.loads(path.read_text())["GeneratedBy"]
    assert entry["Model"] == {"Name": "stand-in", "Fingerprint": "stand-in-0001", "StandIn": True}
    # Each scan's four files, at the top (no BIDS subject), and nothing else (no temporaries).
    assert sorted(p.name for p in nifti.iterdir()) == sorted(
        [path.name]
        + [f"{s.scan_id}_desc-pvs{kind}" for s in scans for kind in (
            "_mask.nii.gz", "_mask.json", "clusters_dseg.nii.gz", "clusters_dseg.json")]
    )  # fmt: skip
    written = {r.scan_id: r.nifti for r in again}
    for scan in scans:
        mask_path = nifti / f"{scan.scan_id}_desc-pvs_mask.nii.gz"
        assert written[scan.scan_id] == str(mask_path)
        mask = nib.Nifti1Image.from_filename(mask_path)
        clusters = nib.Nifti1Image.from_filename(
            nifti / f"{scan.scan_id}_desc-pvsclusters_dseg.nii.gz"
        )
        for image in (mask, clusters):  # the input's grid, as stored
            assert image.shape == standins.SHAPE
            np.testing.assert_allclose(image.affine, standins.AFFINE)
        assert not np.asanyarray(mask.dataobj).any()  # the stand-in's empty label map
        assert not np.asanyarray(clusters.dataobj).any()
        sidecar = json.loads((nifti / f"{scan.scan_id}_desc-pvs_mask.json").read_text())
        assert sidecar["Model"] == pipeline.model.facts()
        assert sidecar["PipelineFingerprint"] == pipeline.fingerprint()
        assert sidecar["RegionSource"] == "none" and sidecar["Flags"] == []
        assert sidecar["Sources"] == [str(scan.channel("t1w"))]
        assert sidecar["ClusterImage"] == f"{scan.scan_id}_desc-pvsclusters_dseg.nii.gz"
        of_clusters = json.loads((nifti / f"{scan.scan_id}_desc-pvsclusters_dseg.json").read_text())
        assert of_clusters["NumberOfClusters"] == 0
