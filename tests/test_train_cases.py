"""Training cases of `pingu-dask train` (train/cases.py): references and the raw dataset.

Fast tier. `reference_on_grid` and `missing_reference` on tiny hand-made NIfTI volumes
(known voxels on known grids); `prepare_case` called directly (not on Dask) on one
synthetic 1 mm scan, generated once for the module, and on copies of it stored in
another orientation or uncompressed: what lands in nnU-Net's raw dataset (links or
RAS copies, the binarised label on the image grid) and what the driver is told.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pingu_dask.analysis.regions import RegionError
from pingu_dask.errors import InputError, StageFailure, Verdict
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.manifest import Scan, load_manifest
from pingu_dask.nnunet import planning
from pingu_dask.synth.cohort import generate_cohort
from pingu_dask.train.cases import (
    CaseJob,
    LeftOut,
    ReferenceError,
    missing_reference,
    prepare_case,
    reference_on_grid,
)

# --- reference_on_grid on hand-made volumes -------------------------------------------

SHAPE = (20, 22, 24)
ORIGIN = np.array([-10.0, -11.0, -12.0])


def image_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = ORIGIN
    return affine


def write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def scan_with(reference: Path | None, folder: Path) -> Scan:
    """A scan whose image is never read here (reference_on_grid reads the reference)."""
    return Scan("sub-x", (("t1w", folder / "unused_T1w.nii.gz"),), site="A", reference=reference)


def test_a_reference_on_the_image_grid_is_binarised(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[3, 4, 5] = 1
    labels[10, 11, 12] = 2  # any label above 0 is PVS
    labels[19, 21, 23] = 7
    path = write(tmp_path / "ref.nii.gz", labels, image_affine())
    on_grid = reference_on_grid(scan_with(path, tmp_path), SHAPE, image_affine())
    assert on_grid.dtype == np.bool_ and on_grid.shape == SHAPE
    assert np.array_equal(np.argwhere(on_grid), [[3, 4, 5], [10, 11, 12], [19, 21, 23]])


def test_a_float_reference_with_whole_numbers_is_accepted(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, np.float32)
    labels[1, 2, 3] = 1.0
    path = write(tmp_path / "ref.nii.gz", labels, image_affine())
    assert np.argwhere(reference_on_grid(scan_with(path, tmp_path), SHAPE, image_affine())
                       ).tolist() == [[1, 2, 3]]  # fmt: skip


def test_a_reference_on_a_2mm_grid_comes_onto_the_image_grid_by_nearest_neighbour(
    tmp_path: Path,
) -> None:
    coarse = np.zeros((10, 11, 12), np.uint8)
    coarse[3, 4, 5] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    # Half a millimetre off the image grid, so that no image voxel lies half way
    # between two of the reference's: coarse voxel 3 covers image voxels 5 and 6.
    affine[:3, 3] = ORIGIN - 0.5
    path = write(tmp_path / "ref_2mm.nii.gz", coarse, affine)
    on_grid = reference_on_grid(scan_with(path, tmp_path), SHAPE, image_affine())
    expected = np.zeros(SHAPE, bool)
    expected[5:7, 7:9, 9:11] = True  # the 2 x 2 x 2 image voxels inside the coarse one
    assert on_grid.shape == SHAPE
    assert np.array_equal(on_grid, expected)


def test_a_reference_stored_flipped_lands_on_the_same_world_voxel(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2, 5, 7] = 2
    flipped = image_affine()
    flipped[0, 0] = -1.0  # array axis 0 points left: voxel i is at x = -10 + (19 - i)
    flipped[0, 3] = ORIGIN[0] + SHAPE[0] - 1
    path = write(tmp_path / "ref_flipped.nii.gz", labels, flipped)
    on_grid = reference_on_grid(scan_with(path, tmp_path), SHAPE, image_affine())
    assert np.argwhere(on_grid).tolist() == [[17, 5, 7]]


def test_an_empty_reference_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8), image_affine())
    with pytest.raises(ReferenceError) as raised:
        reference_on_grid(scan_with(path, tmp_path), SHAPE, image_affine())
    assert "empty" in str(raised.value) and str(path) in str(raised.value)
    assert isinstance(raised.value, InputError)  # an input verdict: never retried


def test_a_reference_a_metre_away_is_refused(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:10, 5:10, 5:10] = 1
    elsewhere = image_affine()
    elsewhere[:3, 3] += 1000.0
    path = write(tmp_path / "elsewhere.nii.gz", labels, elsewhere)
    with pytest.raises(ReferenceError) as raised:
        reference_on_grid(scan_with(path, tmp_path), SHAPE, image_affine())
    assert "does not overlap" in str(raised.value) and "affines" in str(raised.value)


def test_a_reference_with_fractions_is_not_a_label_map(tmp_path: Path) -> None:
    soft = np.zeros(SHAPE, np.float32)
    soft[4, 4, 4] = 0.5  # a probability map, not a mask
    soft[5, 5, 5] = 1.0
    path = write(tmp_path / "soft.nii.gz", soft, image_affine())
    with pytest.raises(InputError) as raised:
        reference_on_grid(scan_with(path, tmp_path), SHAPE, image_affine())
    assert isinstance(raised.value, RegionError)
    assert "reference mask" in str(raised.value) and "non-integer" in str(raised.value)


def test_a_scan_without_reference_is_left_out_before_any_file_is_read(tmp_path: Path) -> None:
    without = scan_with(None, tmp_path)
    assert missing_reference(without) == LeftOut(
        "sub-x", "A", "no reference mask (the `reference` column)"
    )
    assert missing_reference(scan_with(tmp_path / "not-read.nii.gz", tmp_path)) is None
    with pytest.raises(ReferenceError, match="has no reference mask"):
        reference_on_grid(without, SHAPE, image_affine())


# --- prepare_case on a synthetic scan -------------------------------------------------

N_CASES = 1000  # nnU-Net samples 10^8 / n_cases foreground intensities per case


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Scan:
    """One synthetic 1 mm scan stored RAS, with its parcellation and true PVS mask."""
    root = tmp_path_factory.mktemp("cases")
    generate_cohort(root, n_scans=1, sites=("iso1mm",), seed=5)
    report = load_manifest(root / "manifest.csv")
    assert report.ok, report.problems
    (scan,) = report.scans
    assert nib.aff2axcodes(nib.load(scan.channel("t1w")).affine) == ("R", "A", "S")
    return scan


@pytest.fixture(scope="module")
def turned_scan(scan: Scan, tmp_path_factory: pytest.TempPathFactory) -> Scan:
    """The same scan stored ILP (axes permuted and flipped), its parcellation too; its
    reference left as it was (RAS): it must be brought onto the image's grid."""
    folder = tmp_path_factory.mktemp("turned")

    def turned(source: Path, name: str) -> Path:
        image = nib.load(source)
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt("ILP")
        )
        path = folder / name
        nib.save(image.as_reoriented(ornt), path)
        return path

    assert scan.parcellation is not None
    return replace(
        scan,
        scan_id="sub-turned",
        channels=(("t1w", turned(scan.channel("t1w"), "turned_T1w.nii.gz")),),
        parcellation=turned(scan.parcellation, "turned_dseg.nii.gz"),
    )


def case_job(model_dir: Path, orientation: str = "RAS") -> CaseJob:
    folders = planning.folders_in(model_dir)
    planning.write_dataset_json(folders, ("T1w",), N_CASES)
    return CaseJob(folders, channels=("t1w",), orientation=orientation,
                   checks=CheckThresholds(), strict=False, n_cases=N_CASES)  # fmt: skip


def voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj, dtype=np.float32)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_fingerprint(case, image: np.ndarray, label: np.ndarray, spacing: float) -> None:
    """nnU-Net's figures of the case as written (NibabelIO: axes in reverse order)."""
    fingerprint = case.fingerprint
    assert len(fingerprint.shape_after_crop) == 3 and len(fingerprint.spacing) == 3
    assert fingerprint.spacing == pytest.approx([spacing] * 3)
    reversed_shape = image.shape[::-1]
    assert all(0 < n <= m for n, m in zip(fingerprint.shape_after_crop, reversed_shape,
                                          strict=True))  # fmt: skip
    assert fingerprint.relative_size_after_cropping == pytest.approx(
        np.prod(fingerprint.shape_after_crop) / np.prod(image.shape)
    )
    (samples,) = fingerprint.foreground_intensities  # one channel
    assert samples.shape == (int(planning.FOREGROUND_SAMPLES // N_CASES),)
    # Sampled from the image's voxels under the label (its foreground), nowhere else.
    assert set(np.unique(samples)) <= set(np.unique(image[label > 0]))


def test_a_scan_stored_in_the_models_orientation_is_linked(scan: Scan, tmp_path: Path) -> None:
    job = case_job(tmp_path / "model")
    source = scan.channel("t1w")
    before = sha256(source)
    case = prepare_case(scan, job)
    (image_path,), label_path = planning.case_files(job.folders, scan.scan_id, 1)
    assert image_path.name == f"{scan.scan_id}_0000.nii.gz" and label_path.name == "sub-001.nii.gz"
    assert image_path.is_symlink() and image_path.resolve() == source.resolve()
    assert case.linked

    stored = nib.load(source)
    truth = voxels(scan.reference) > 0
    label_image = nib.load(label_path)
    label = np.asanyarray(label_image.dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    assert label.shape == stored.shape
    assert np.allclose(label_image.affine, stored.affine, atol=1e-4)
    assert label_image.header.get_intent()[0] == "label"
    assert np.array_equal(label > 0, truth)
    assert case.reference_voxels == int(label.sum()) == int(truth.sum()) > 0

    assert (case.scan_id, case.site, case.stored_orientation) == ("sub-001", "iso1mm", "RAS")
    assert case.voxel_size_mm == pytest.approx((1.0, 1.0, 1.0))
    assert case.worker == "local" and case.seconds > 0
    assert len(case.input_fingerprint) > 8
    check_fingerprint(case, voxels(source), label, 1.0)

    again = prepare_case(scan, job)  # a retried task: the same files, the link kept
    assert image_path.is_symlink() and again.reference_voxels == case.reference_voxels
    assert sha256(source) == before


def test_a_scan_stored_otherwise_is_written_turned_onto_ras(
    scan: Scan, turned_scan: Scan, tmp_path: Path
) -> None:
    job = case_job(tmp_path / "model")
    source = turned_scan.channel("t1w")
    stored = nib.load(source)
    assert nib.aff2axcodes(stored.affine) == ("I", "L", "P")
    case = prepare_case(turned_scan, job)
    (image_path,), label_path = planning.case_files(job.folders, "sub-turned", 1)
    assert not image_path.is_symlink() and not case.linked
    assert case.stored_orientation == "ILP"

    written = nib.load(image_path)
    assert nib.aff2axcodes(written.affine) == ("R", "A", "S")
    canonical = nib.as_closest_canonical(stored)  # nibabel's own turn of the stored file
    assert np.allclose(written.affine, canonical.affine, atol=1e-4)
    assert np.array_equal(voxels(image_path), np.asanyarray(canonical.dataobj, np.float32))
    # ...which is the RAS scan it was made from, voxel for voxel, at the same place.
    assert np.array_equal(voxels(image_path), voxels(scan.channel("t1w")))
    assert np.allclose(written.affine, nib.load(scan.channel("t1w")).affine, atol=1e-4)

    label_image = nib.load(label_path)
    label = np.asanyarray(label_image.dataobj)
    assert label.dtype == np.uint8 and label.shape == written.shape
    assert np.allclose(label_image.affine, written.affine, atol=1e-6)
    # The RAS reference, brought onto the ILP image grid and turned back: unchanged.
    assert np.array_equal(label > 0, voxels(scan.reference) > 0)
    assert case.reference_voxels == int(label.sum())
    check_fingerprint(case, voxels(image_path), label, 1.0)


def test_an_uncompressed_nifti_is_copied_not_linked(scan: Scan, tmp_path: Path) -> None:
    """nnU-Net reads the raw dataset's files by their ending (.nii.gz): a .nii in the
    model's orientation is written, not linked."""
    plain = tmp_path / "plain_T1w.nii"
    nib.save(nib.load(scan.channel("t1w")), plain)
    job = case_job(tmp_path / "model")
    case = prepare_case(replace(scan, channels=(("t1w", plain),)), job)
    (image_path,), _ = planning.case_files(job.folders, scan.scan_id, 1)
    assert not case.linked and not image_path.is_symlink()
    assert image_path.name.endswith(".nii.gz")
    assert np.array_equal(voxels(image_path), voxels(plain))


def test_writing_over_a_linked_case_never_writes_into_the_users_file(
    scan: Scan, tmp_path: Path
) -> None:
    """A case linked once, then prepared for another orientation: the link is replaced
    by a file, the manifest's image is left as it was."""
    model_dir = tmp_path / "model"
    source = scan.channel("t1w")
    before = sha256(source)
    prepare_case(scan, case_job(model_dir, "RAS"))
    (image_path,), _ = planning.case_files(planning.folders_in(model_dir), scan.scan_id, 1)
    assert image_path.is_symlink()
    case = prepare_case(scan, case_job(model_dir, "LPS"))
    assert not case.linked and not image_path.is_symlink()
    assert nib.aff2axcodes(nib.load(image_path).affine) == ("L", "P", "S")
    assert sha256(source) == before


def test_a_case_with_an_empty_reference_fails_as_input_and_writes_nothing(
    scan: Scan, tmp_path: Path
) -> None:
    stored = nib.load(scan.channel("t1w"))
    empty = write(tmp_path / "empty.nii.gz", np.zeros(stored.shape, np.uint8), stored.affine)
    job = case_job(tmp_path / "model")
    with pytest.raises(StageFailure) as raised:
        prepare_case(replace(scan, scan_id="sub-empty", reference=empty), job)
    failure = raised.value
    assert (failure.stage, failure.error_type, failure.verdict) == (
        "prepare",
        "ReferenceError",
        Verdict.INPUT,
    )
    assert not failure.retryable and "empty" in failure.message
    raw = job.folders.raw_dataset
    assert not list(raw.rglob("sub-empty*"))


# --- planning: the presets' shrunk network --------------------------------------------


@pytest.mark.parametrize("name", sorted(planning.PRESETS))
def test_a_preset_shrinks_the_planned_3d_fullres_network(name: str) -> None:
    preset = planning.PRESETS[name]
    plans = {
        "plans_name": "nnUNetPlans",
        "configurations": {
            "2d": {"patch_size": [256, 256]},
            "3d_fullres": {
                "spacing": [0.8, 0.8, 0.8],
                "patch_size": [128, 128, 128],
                "batch_size": 2,
                "data_identifier": "nnUNetPlans_3d_fullres",
                "architecture": {
                    "network_class_name": "PlainConvUNet",
                    "arch_kwargs": {"n_stages": 6, "conv_op": "torch.nn.modules.conv.Conv3d",
                                    "features_per_stage": [32, 64, 128, 256, 320, 320]},
                },
            },
        },
    }  # fmt: skip
    shrunk = preset.shrink(plans)
    assert list(shrunk["configurations"]) == ["3d_fullres"]  # the others are dropped
    config = shrunk["configurations"]["3d_fullres"]
    stages = len(preset.features)
    arch = config["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == stages and arch["features_per_stage"] == list(preset.features)
    assert arch["conv_op"] == "torch.nn.modules.conv.Conv3d"  # what it does not set is kept
    assert len(arch["kernel_sizes"]) == len(arch["strides"]) == stages
    assert len(arch["n_conv_per_stage"]) == stages
    assert len(arch["n_conv_per_stage_decoder"]) == stages - 1
    assert config["patch_size"] == list(preset.patch) and config["batch_size"] == preset.batch_size
    assert config["spacing"] == list(preset.spacing)
    assert config["data_identifier"] == "nnUNetPlans_3d_fullres"  # plan_default renames it
    # Every stride-2 stage halves the patch: it must stay a whole number of voxels.
    downsampling = int(np.prod([s[0] for s in arch["strides"]]))
    assert all(side % downsampling == 0 for side in preset.patch)
    assert preset.schedule.epochs >= 1 and preset.schedule.checkpoint_every >= 1


def test_dataset_json_lists_the_cases_so_the_planner_needs_no_process_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nnU-Net's planner lists imagesTr through a forked multiprocessing Pool unless
    dataset.json lists the files; forked from the threaded driver, that pool hung a
    `train` (CI stop 31). With the list, nnU-Net reads it and starts no pool."""
    from nnunetv2.utilities import utils as nnunet_utils

    folders = planning.folders_in(tmp_path / "model")
    document = planning.write_dataset_json(folders, ("T1w", "FLAIR"), 2, cases=["a", "b"])
    assert document["dataset"]["b"] == {
        "images": ["imagesTr/b_0000.nii.gz", "imagesTr/b_0001.nii.gz"],
        "label": "labelsTr/b.nii.gz",
    }

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("nnU-Net listed imagesTr through its process pool")

    monkeypatch.setattr(nnunet_utils, "create_lists_from_splitted_dataset_folder", no_pool)
    raw = folders.raw_dataset
    found = nnunet_utils.get_filenames_of_train_images_and_targets(str(raw))
    assert found["a"]["images"] == [
        str(raw / "imagesTr/a_0000.nii.gz"),
        str(raw / "imagesTr/a_0001.nii.gz"),
    ]
    assert found["a"]["label"] == str(raw / "labelsTr/a.nii.gz")
