"""The atlas path: the template's aseg-numbered labels, and their registration to a scan.

Fast: the template's labels (sides, volumes), the settings' fingerprint, the template
moved onto another grid (rotated, shifted, anisotropic, LAS) and found again, and
unusable images refused with a RegionError. Slow: Colin27 (real head, skull on)
against its AAL labels, a synthetic phantom, and the ANTs engine when installed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pingu_dask.analysis.atlas import (
    ATLAS_REGION_SOURCE,
    AtlasSettings,
    atlas_parcellation,
    template_labels,
)
from pingu_dask.analysis.regions import ASEG, RegionError
from pingu_dask.synth.cohort import generate_cohort

COLIN27 = Path("/usr/share/mricron/templates")
BASAL_GANGLIA = (11, 12, 13, 26, 50, 51, 52, 58)
FAST = AtlasSettings(resolution_mm=3.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def template_t1() -> tuple[np.ndarray, np.ndarray]:
    """The template's own T1 (brain only), as nilearn ships it."""
    from pingu_dask.analysis import atlas

    image = nib.load(atlas._template_path(*atlas.TEMPLATE_T1))
    return np.asanyarray(image.dataobj).astype(np.float32), image.affine


def cm3(labels: np.ndarray, *values: int) -> float:
    return np.count_nonzero(np.isin(labels, values)) / 1000.0  # 1 mm voxels


def test_template_labels_sides_and_volumes() -> None:
    labels, affine = template_labels()
    assert labels.dtype == np.int32 and labels.shape == (197, 233, 189)
    assert np.allclose(np.abs(np.diag(affine)[:3]), 1.0)
    assert not labels.flags.writeable  # cached: callers must not change it
    # MNI space is larger than an average head (a ~1.9 l brain), hence the high WM.
    assert 250 < cm3(labels, 2) < 340 and 250 < cm3(labels, 41) < 340
    assert abs(cm3(labels, 2) - cm3(labels, 41)) < 15  # a symmetric template
    for left, right in ((11, 50), (12, 51), (13, 52), (26, 58), (10, 49)):
        for label in (left, right):
            assert 1.0 < cm3(labels, label) < 15.0, label
    assert 5.0 < cm3(labels, 12) < 10.0  # putamen
    assert 10.0 < cm3(labels, 7, 8) < 120 and 10.0 < cm3(labels, 46, 47) < 120  # cerebellum
    assert 0 < cm3(labels, 4, 43) < 60
    assert not np.any(labels == 24)  # no extracerebral CSF: no intracranial volume
    for left, right in ((2, 41), (11, 50), (12, 51)):  # left labels on the left (x < 0)
        x_left = nib.affines.apply_affine(affine, np.argwhere(labels == left))[:, 0]
        x_right = nib.affines.apply_affine(affine, np.argwhere(labels == right))[:, 0]
        assert np.mean(x_left < 0) > 0.99 and np.mean(x_right > 0) > 0.99, (left, right)
    # every region of the ASEG table is there, and voxels outside them (cortex, ...)
    codes = ASEG.index_map(labels)
    assert set(np.unique(codes)) == set(range(len(ASEG.regions) + 1))


def test_settings_fingerprint_and_pickling() -> None:
    base = AtlasSettings()
    assert base.method == "dipy" and base.resolution_mm == 2.0 and ATLAS_REGION_SOURCE == "atlas"
    assert base.fingerprint() == AtlasSettings().fingerprint()
    assert len(base.fingerprint()) == 16
    others = [
        AtlasSettings(resolution_mm=3.0),
        AtlasSettings(method="ants"),
        AtlasSettings(nonlinear=True),
        AtlasSettings(affine_iterations=(100, 50)),
        AtlasSettings(seed=1),
    ]
    assert len({base.fingerprint(), *(o.fingerprint() for o in others)}) == 1 + len(others)
    assert pickle.loads(pickle.dumps(base)) == base and hash(base) == hash(AtlasSettings())
    with pytest.raises(ValueError, match="method"):
        AtlasSettings(method="fsl")
    with pytest.raises(ValueError, match="resolution"):
        AtlasSettings(resolution_mm=0.1)


def moved_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template T1 and its labels resampled onto a rotated (10°, 6°, -8°), shifted
    (7, -5, 4 mm), 1.3 x 1.3 x 1.6 mm LAS grid: (t1, labels, affine)."""
    t1, affine = template_t1()
    labels, _ = template_labels()
    linear = Rotation.from_euler("xyz", (10, 6, -8), degrees=True).as_matrix() @ np.diag(
        [-1.3, 1.3, 1.6]
    )
    shape = (130, 170, 110)
    grid = np.eye(4)
    grid[:3, :3] = linear
    grid[:3, 3] = np.array([7.0, -23.0, 14.0]) - linear @ ((np.array(shape) - 1) / 2)
    moved = nibabel.processing.resample_from_to(nib.Nifti1Image(t1, affine), (shape, grid), 1)
    truth = nibabel.processing.resample_from_to(
        nib.Nifti1Image(labels.astype(np.int16), affine), (shape, grid), 0
    )
    return np.asarray(moved.dataobj), np.asarray(truth.dataobj).astype(np.int32), grid


@pytest.mark.slow  # seconds of real processes: the full suite runs it
def test_moved_template_is_found_again() -> None:
    t1, truth, affine = moved_template()
    labels = atlas_parcellation(t1, affine, FAST)
    assert labels.shape == t1.shape and labels.dtype == np.int32
    assert dice(np.isin(labels, (2, 41)), np.isin(truth, (2, 41))) > 0.85
    assert dice(np.isin(labels, BASAL_GANGLIA), np.isin(truth, BASAL_GANGLIA)) > 0.75
    for label in (2, 41, 11, 50, 12, 51, 10, 49):  # sides not swapped
        assert dice(labels == label, truth == label) > 0.7, label
    assert dice(labels > 0, truth > 0) > 0.9


def test_unusable_images_are_refused() -> None:
    affine = np.eye(4)
    with pytest.raises(RegionError, match="empty"):
        atlas_parcellation(np.zeros((60, 60, 60), np.float32), affine, FAST)
    with pytest.raises(RegionError, match="NaN"):
        atlas_parcellation(np.full((20, 20, 20), np.nan, np.float32), affine, FAST)
    with pytest.raises(RegionError, match="3D"):
        atlas_parcellation(np.ones((20, 20), np.float32), affine, FAST)
    # a 2 cm ball is no brain: its extraction (or the placed template) is far too small
    ball = (np.linalg.norm(np.indices((80, 80, 80)) - 40, axis=0) < 10).astype(np.float32)
    with pytest.raises(RegionError, match="cm³"):
        atlas_parcellation(ball * 1000, affine, FAST)


def colin27(name: str) -> Path:
    path = COLIN27 / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: sudo apt-get install -y mricron-data")
    return path


@pytest.mark.slow
def test_colin27_deep_grey_matter_against_aal() -> None:
    """Colin27 with skull, at the default 2 mm: the atlas's caudate, putamen, pallidum
    and thalamus against AAL's, drawn on Colin27 itself (AAL and Desikan-Killiany draw
    them differently: this bounds the error). Measured: mean Dice ~0.72."""
    image = nib.load(colin27("ch2.nii.gz"))
    aal = np.asanyarray(nib.load(colin27("aal.nii.gz")).dataobj)
    labels = atlas_parcellation(np.asanyarray(image.dataobj), image.affine, AtlasSettings())
    pairs = {71: 11, 72: 50, 73: 12, 74: 51, 75: 13, 76: 52, 77: 10, 78: 49}
    scores = [dice(aal == a, labels == b) for a, b in pairs.items()]
    assert min(scores) > 0.5 and np.mean(scores) > 0.65, np.round(scores, 2)
    brain = np.count_nonzero(labels) / 1000.0
    assert 1100 < brain < 1900, brain  # Colin27 is close to MNI size


@pytest.mark.slow
def test_phantom_brain_and_white_matter(tmp_path: Path) -> None:
    """A synthetic head (skull and scalp on, 0.8 mm LAS, oblique): the atlas brain sits
    on the phantom's. The phantom's nuclei are ellipsoids placed unlike MNI's, so only
    the brain and white matter are checked (see docs/benchmarks.md for figures)."""
    generate_cohort(tmp_path, n_scans=2, sites=("iso08mm",), seed=3)
    image = nib.load(tmp_path / "sub-002" / "anat" / "sub-002_T1w.nii.gz")
    truth = np.asanyarray(
        nib.load(tmp_path / "derivatives/synthseg/sub-002/anat/sub-002_dseg.nii.gz").dataobj
    )
    labels = atlas_parcellation(np.asanyarray(image.dataobj), image.affine, FAST)
    assert dice(labels > 0, truth > 0) > 0.8
    assert dice(np.isin(labels, (2, 41)), np.isin(truth, (2, 41))) > 0.4


@pytest.mark.slow
def test_ants_engine_finds_the_moved_template() -> None:
    pytest.importorskip("ants", reason="antspyx is an optional engine")
    t1, truth, affine = moved_template()
    labels = atlas_parcellation(t1, affine, AtlasSettings(method="ants", resolution_mm=3.0), 2)
    assert dice(np.isin(labels, (2, 41)), np.isin(truth, (2, 41))) > 0.85
    assert dice(np.isin(labels, BASAL_GANGLIA), np.isin(truth, BASAL_GANGLIA)) > 0.75
