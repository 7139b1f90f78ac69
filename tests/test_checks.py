"""Pre-flight checks (inputs/checks.py): what fails, what is flagged, what passes.

Real synthetic scans (every site, T1w and T2w, with their parcellations), real heads
(Colin27, MNI152) and hand-built arrays. The bad cases are the review's: a
parcellation given as the T1w, and a T1w whose header is turned 90 degrees (and
flipped) against its own parcellation (same voxels, affine changed, stored LSP).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import dask.config
import nibabel as nib
import numpy as np
import pytest

from pingu_dask.analysis import atlas
from pingu_dask.analysis.regions import label_map_on_grid, parcellation_on_grid
from pingu_dask.errors import InputError, Verdict, verdict_of
from pingu_dask.inputs.checks import (
    TURNS,
    CheckOutcome,
    CheckThresholds,
    Finding,
    PreflightError,
    preflight,
)
from pingu_dask.inputs.imaging import check_image_data
from pingu_dask.synth.cohort import generate_cohort

DEFAULTS = CheckThresholds()
#: Colin27 (the Debian package mricron-data) at 1 mm (full head) and 0.5 mm (brain only)
COLIN27 = Path("/usr/share/mricron/templates")
COLIN27_HEADS = {"colin27_1mm": "ch2.nii.gz", "colin27_05mm": "ch2better.nii.gz"}
#: Voxel-axis swaps with one flip (new axes, signs) applied to a stored affine: the
#: same voxels, the header turned 90 degrees about the grid's centre. LSP: the
#: review's case, a RAS-stored scan whose header says L, S, P.
TURNS_90 = {
    "swap x-y": ((1, 0, 2), (-1, 1, 1)),
    "swap y-z": ((0, 2, 1), (1, -1, 1)),
    "swap x-z": ((2, 1, 0), (1, 1, -1)),
    "stored LSP": ((0, 2, 1), (-1, 1, -1)),
}


def turned_header(affine: np.ndarray, shape: tuple[int, ...], turn: str) -> np.ndarray:
    """`affine` with two voxel axes swapped and one flipped, the grid's centre kept."""
    axes, signs = TURNS_90[turn]
    linear = affine[:3, :3][:, list(axes)] * np.asarray(signs, dtype=float)
    centre = (np.asarray(shape[:3]) - 1) / 2.0
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = affine[:3, :3] @ centre + affine[:3, 3] - linear @ centre
    return out


def scan_files(root: Path, scan_id: str) -> dict[str, Path]:
    anat = root / scan_id / "anat"
    files = {
        "t1w": anat / f"{scan_id}_T1w.nii.gz",
        "t2w": anat / f"{scan_id}_T2w.nii.gz",
        "parcellation": root / "derivatives/synthseg" / scan_id / "anat" / f"{scan_id}_dseg.nii.gz",
    }
    return {name: path for name, path in files.items() if path.exists()}


def real_heads() -> dict[str, Path]:
    """Colin27 at 1 and 0.5 mm and MNI152 (nilearn's, the atlas template), by name; a
    failure saying what to install when Colin27 is missing (never a skip)."""
    heads = {name: COLIN27 / file for name, file in COLIN27_HEADS.items()}
    missing = sorted(str(path) for path in heads.values() if not path.is_file())
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: install the Debian package mricron-data "
            "(`sudo scripts/install_test_data.sh`)",
            pytrace=False,
        )
    return {**heads, "mni152_1mm": atlas._template_path(*atlas.TEMPLATE_T1)}


def check_file(image: Path, parcellation: Path | None, affine: np.ndarray | None = None, **kw):
    """preflight of an image file (with its header's affine, or `affine` instead)."""
    info, voxels = check_image_data(image)
    affine = info.affine if affine is None else affine
    labels = None
    if parcellation is not None:
        labels = parcellation_on_grid(parcellation, info.shape, affine)
    return preflight(voxels, affine, info.spacing, labels, **kw)


@pytest.fixture(scope="module")
def sag12mm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scan of the site the session cohort lacks (1.2 x 1 x 1 mm, sagittal)."""
    root = tmp_path_factory.mktemp("sag12mm")
    generate_cohort(root, 1, sites=("sag12mm",), seed=3, t2w=True)
    return root


def phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 head image, int32 labels, affine) of a layered ellipsoid filling ~80 % of
    the field of view: white matter 1000 (label 2), grey 650 (label 3), skull 80,
    scalp 850, air 0, plus noise."""
    rng = np.random.default_rng(seed)
    size = np.asarray(shape) * np.asarray(spacing)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt(
        (x / (0.4 * size[0])) ** 2 + (y / (0.4 * size[1])) ** 2 + (z / (0.4 * size[2])) ** 2
    )
    image = np.select(
        [radius < 0.6, radius < 0.8, radius < 0.9, radius < 1.0], [1000, 650, 80, 850], 0
    )
    image = image + rng.normal(0, 25, shape)
    labels = np.select([radius < 0.6, radius < 0.8], [2, 3], 0).astype(np.int32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    return image.astype(np.float32), labels, affine


# Good scans ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cohort", "sag12mm"])
def test_every_synthetic_site_passes_with_no_flag(which: str, cohort: Path, sag12mm: Path) -> None:
    root = cohort if which == "cohort" else sag12mm
    scan_ids = sorted(p.name for p in root.glob("sub-*"))
    assert len(scan_ids) == (3 if which == "cohort" else 1)
    for scan_id in scan_ids:
        files = scan_files(root, scan_id)
        assert {"t1w", "t2w", "parcellation"} <= set(files)
        for channel in ("t1w", "t2w"):
            outcome = check_file(files[channel], files["parcellation"], channel=channel)
            where = f"{scan_id} {channel}"
            assert outcome.failures == () and outcome.flags == (), (where, outcome)
            assert outcome.flag_names == ""
            m = outcome.measures
            assert m["brain_in_head"] > 0.99, where
            # the margin the defaults keep: calibrated minimum 1.16 on synthetic heads
            assert m["orientation_margin"] > 1.12, (where, m["orientation_margin"])
            assert m["equal_neighbours"] < 0.1 and m["distinct_values"] > 500, where
            assert m["contrast"] > 0.9 and m["same_value_share"] < 0.05, where


def test_real_heads_pass_with_no_flag(tmp_path: Path) -> None:
    """Colin27 at 1 mm (full head, uint8) and 0.5 mm (brain only, 76 grey levels), and
    MNI152: what the suite runs has no parcellation; Colin27 1 mm also with a brain
    mask (ch2bet) and with MNI152's tissue classes (a real head with tissue labels)."""
    found = real_heads()
    for name in ("colin27_1mm", "colin27_05mm", "mni152_1mm"):
        outcome = check_file(found[name], None)
        assert outcome.failures == () and outcome.flags == (), (name, outcome)
        assert outcome.measures["equal_neighbours"] < 0.3, name  # 0.5 mm: 0.23, 8-bit
    # MNI152's grey and white matter (nilearn) as a two-label parcellation of Colin27
    mni = nib.load(found["mni152_1mm"])
    grey, white = (
        np.asarray(nib.load(atlas._template_path(*template)).dataobj)
        for template in (atlas.TEMPLATE_GM, atlas.TEMPLATE_WM)
    )
    tissue = np.where(grey + white > 0.5, np.where(white >= grey, 2, 3), 0).astype(np.int16)
    tissue_path = tmp_path / "mni_tissue.nii.gz"
    nib.save(nib.Nifti1Image(tissue, mni.affine), tissue_path)
    outcome = check_file(found["colin27_1mm"], tissue_path)
    assert outcome.failures == () and outcome.flags == (), outcome
    assert outcome.measures["orientation_margin"] > 1.5  # measured 1.79
    ch2bet = nib.load(found["colin27_1mm"].parent / "ch2bet.nii.gz")
    mask_path = tmp_path / "ch2bet_mask.nii.gz"
    nib.save(
        nib.Nifti1Image((np.asarray(ch2bet.dataobj) > 0).astype(np.int16), ch2bet.affine), mask_path
    )
    outcome = check_file(found["colin27_1mm"], mask_path)
    assert outcome.failures == () and outcome.flags == (), outcome
    assert outcome.measures["brain_in_head"] > 0.99
    assert "orientation_margin" not in outcome.measures  # one label: a mask, not tissues
    info, _ = check_image_data(found["colin27_1mm"])
    turned = turned_header(info.affine, info.shape, "stored LSP")
    outcome = check_file(found["colin27_1mm"], tissue_path, affine=turned)
    assert outcome.failure_names == "orientation", outcome
    assert outcome.measures["orientation_margin"] < 0.5  # measured 0.26


# Bad scans -----------------------------------------------------------------------------


def test_a_parcellation_given_as_the_t1w_fails_as_a_label_map(cohort: Path) -> None:
    files = scan_files(cohort, "sub-001")
    for parcellation in (None, files["parcellation"]):  # as the lead's stage passes it
        outcome = check_file(files["parcellation"], parcellation, channel="t1w")
        assert outcome.failure_names == "label_map" and outcome.flags == ()
        m = outcome.measures
        assert m["distinct_values"] == 18  # background + 17 synthetic labels
        assert m["equal_neighbours"] > 0.85
        assert "contrast" not in m and "brain_in_head" not in m  # nothing else measured
        message = outcome.failures[0].message
        assert "the t1w holds only integers, 18 distinct values" in message
        assert ">= 16 distinct values and < 50% equal neighbours" in message


def test_integer_scans_are_not_label_maps_but_masks_are(cohort: Path) -> None:
    """An 8-bit scan (integers, ~80 grey levels, like Colin27 at 0.5 mm) is a scan; a
    binary mask or a 20-label map with many values per label is a label map."""
    info, voxels = check_image_data(scan_files(cohort, "sub-001")["t1w"])
    eight_bit = np.round(voxels / voxels.max() * 80).astype(np.float32)
    outcome = preflight(eight_bit, info.affine, info.spacing, None)
    assert outcome.ok and outcome.flags == (), outcome
    assert 16 < outcome.measures["distinct_values"] <= 81
    assert outcome.measures["equal_neighbours"] < 0.5
    mask = (voxels > np.percentile(voxels, 60)).astype(np.float32)
    outcome = preflight(mask, info.affine, info.spacing, None)
    assert outcome.failure_names == "label_map"
    assert outcome.measures["distinct_values"] == 2
    _, labels, affine = phantom((80, 96, 80), (1.5, 1.5, 1.5))
    many = (labels * 100 + np.arange(80)[:, None, None] // 4).astype(np.float32)  # 61 labels
    outcome = preflight(many, affine, (1.5, 1.5, 1.5), None)
    assert outcome.failure_names == "label_map"
    assert outcome.measures["distinct_values"] > 16  # caught by its equal neighbours
    assert outcome.measures["equal_neighbours"] > 0.7


@pytest.mark.parametrize("turn", sorted(TURNS_90))
def test_a_header_turned_against_its_parcellation_fails_orientation(
    turn: str, cohort: Path
) -> None:
    files = scan_files(cohort, "sub-001")  # iso1mm, stored RAS
    stored = check_file(files["t1w"], files["parcellation"])
    assert stored.ok and stored.measures["orientation_margin"] > 1.12
    info, _ = check_image_data(files["t1w"])
    affine = turned_header(info.affine, info.shape, turn)
    assert not np.allclose(affine, info.affine)
    outcome = check_file(files["t1w"], files["parcellation"], affine=affine)
    assert "orientation" in outcome.failure_names.split(";"), outcome
    margin = outcome.measures["orientation_margin"]
    assert margin < 1.0, margin  # another orientation fits better than the stored one
    if turn == "stored LSP":
        assert margin < 0.8  # measured 0.42 (calibration: all stored-LSP cases <= 0.77)
    message = next(f.message for f in outcome.failures if f.check == "orientation")
    assert "turned" in message and "degrees about the" in message
    assert "header orientation (qform/sform)" in message
    # the brain-in-head share alone would not fail it: a turned brain stays in its head
    assert outcome.measures["brain_in_head"] > 0.85  # measured 0.86-1.00
    assert "alignment" not in outcome.failure_names


def test_a_parcellation_of_another_field_of_view_fails_alignment(cohort: Path) -> None:
    files = scan_files(cohort, "sub-002")
    info, voxels = check_image_data(files["t1w"])
    labels = parcellation_on_grid(files["parcellation"], info.shape, info.affine)
    shifted = np.zeros_like(labels)
    shift = 75  # voxels of 0.8 mm: 60 mm along the first axis (measured: 0.71 inside)
    shifted[shift:] = labels[:-shift]
    outcome = preflight(voxels, info.affine, info.spacing, shifted)
    assert "alignment" in outcome.failure_names.split(";")
    share = outcome.measures["brain_in_head"]
    assert share < 0.75
    assert "orientation" in outcome.failure_names  # a shift is no better fit than a turn
    message = next(f.message for f in outcome.failures if f.check == "alignment")
    assert f"only {share:.1%} of the parcellation's brain" in message
    assert ">= 75%" in message
    # a brain mask alone: the share is measured, the orientation fit is not
    outcome = preflight(voxels, info.affine, info.spacing, labels > 0)
    assert outcome.ok and outcome.measures["brain_in_head"] > 0.99
    assert "orientation_margin" not in outcome.measures
    with pytest.raises(ValueError, match="not the image's"):
        preflight(voxels, info.affine, info.spacing, labels[1:])


def test_an_image_with_no_head_above_zero_fails_without_a_crash(cohort: Path) -> None:
    """A negated image (every voxel <= 0): no head foreground is found, which fails
    alignment with its reason instead of crashing the orientation fit (it raised an
    IndexError on zero head voxels)."""
    files = scan_files(cohort, "sub-002")
    info, voxels = check_image_data(files["t1w"])
    labels = parcellation_on_grid(files["parcellation"], info.shape, info.affine)
    outcome = preflight(-voxels, info.affine, info.spacing, labels)
    assert outcome.failure_names == "alignment"
    assert outcome.measures["brain_in_head"] == 0.0


def test_nearly_empty_and_low_contrast_images() -> None:
    image, _, affine = phantom((80, 96, 80), (1.5, 1.5, 1.5))
    empty = np.zeros_like(image)
    empty[38:42, 46:50, 38:42] = 900.0 + np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    outcome = preflight(empty, affine, (1.5, 1.5, 1.5), None)
    assert outcome.failure_names == "intensity_spread"
    assert outcome.measures["same_value_share"] > 0.999
    assert "have the value 0: nearly empty" in outcome.failures[0].message
    rng = np.random.default_rng(1)
    offset = (5000 + rng.normal(0, 20, image.shape)).astype(np.float32)  # noise on a bias
    outcome = preflight(offset, affine, (1.5, 1.5, 1.5), None)
    assert outcome.ok and outcome.flag_names == "intensity_spread"
    assert outcome.measures["contrast"] < 0.05
    assert "low contrast" in outcome.flags[0].message
    outcome = preflight(image, affine, (1.5, 1.5, 1.5), None)  # the phantom itself
    assert outcome.ok and outcome.flags == ()
    assert outcome.measures["contrast"] > 0.5


@pytest.mark.parametrize(
    ("shape", "spacing", "failures", "flags"),
    [
        ((100, 120, 100), (1.0, 1.0, 1.0), "", ""),
        ((100, 120, 25), (1.0, 1.0, 5.0), "", "voxel_size"),  # 5 mm slices
        ((100, 120, 14), (1.0, 1.0, 9.0), "voxel_size", ""),  # 9 mm: not a head scan
        ((400, 120, 100), (0.25, 1.0, 1.0), "", "voxel_size"),  # finer than 0.3 mm
        ((100, 120, 60), (1.0, 1.0, 1.0), "", "field_of_view"),  # a 60 mm slab
        ((100, 120, 30), (1.0, 1.0, 1.0), "field_of_view", ""),  # 30 mm: no brain fits
        ((100, 120, 25), (1.0, 1.0, 14.0), "voxel_size", "field_of_view"),  # 350 mm high
    ],
)
def test_voxel_size_and_field_of_view_bounds(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], failures: str, flags: str
) -> None:
    image, _, affine = phantom(shape, spacing)
    outcome = preflight(image, affine, spacing, None)
    assert outcome.failure_names == failures and outcome.flag_names == flags, outcome
    fov = [n * s for n, s in zip(shape, spacing, strict=True)]
    assert outcome.measures["max_voxel_mm"] == max(spacing)
    assert outcome.measures["min_fov_mm"] == pytest.approx(min(fov))
    for finding in outcome.failures + outcome.flags:
        if finding.check == "voxel_size":
            assert f"voxel size {' x '.join(f'{s:.3g}' for s in spacing)} mm" in finding.message


def test_both_geometry_flags_and_strict() -> None:
    spacing = (1.0, 1.0, 4.5)
    image, _, affine = phantom((100, 120, 16), spacing)  # 4.5 mm slices, 72 mm high
    outcome = preflight(image, affine, spacing, None)
    assert outcome.ok and outcome.flag_names == "voxel_size;field_of_view"
    strict = outcome.strict()
    assert not strict.ok and strict.flags == ()
    assert strict.failure_names == "voxel_size;field_of_view"
    assert strict.failures == outcome.flags and strict.measures == outcome.measures
    assert "voxel_size: voxel size 1 x 1 x 4.5 mm" in strict.reason
    assert "field_of_view: field of view 100 x 120 x 72 mm" in strict.reason
    assert outcome.strict().strict() == strict
    clean = preflight(*phantom((100, 120, 100), (1.0, 1.0, 1.0))[::2], (1.0, 1.0, 1.0), None)
    assert clean.strict().ok and clean.strict().failures == ()


def test_thresholds_come_from_config(cohort: Path) -> None:
    assert CheckThresholds.from_config() == DEFAULTS  # the config's defaults are the class's
    spacing = (1.0, 1.0, 5.0)
    image, _, affine = phantom((100, 120, 25), spacing)
    assert preflight(image, affine, spacing, None).flag_names == "voxel_size"
    with dask.config.set({"pingu.check-voxel-mm-flag": [0.3, 6.0]}):
        thresholds = CheckThresholds.from_config()
        assert thresholds.voxel_mm_flag == (0.3, 6.0)
        assert preflight(image, affine, spacing, None).flags == ()  # read when not given
        assert preflight(image, affine, spacing, None, DEFAULTS).flag_names == "voxel_size"
    with dask.config.set({"pingu.check-voxel-mm-fail": [0.1, 4.5]}):
        assert preflight(image, affine, spacing, None).failure_names == "voxel_size"
    assert CheckThresholds.from_config(min_contrast=None).min_contrast is None
    # None turns a check off: the turned header then runs
    files = scan_files(cohort, "sub-001")
    info, _ = check_image_data(files["t1w"])
    turned = turned_header(info.affine, info.shape, "stored LSP")
    off = {"pingu.check-orientation-fail": None, "pingu.check-orientation-flag": None}
    with dask.config.set(off):
        outcome = check_file(files["t1w"], files["parcellation"], affine=turned)
    assert outcome.ok and "orientation_margin" not in outcome.measures
    with dask.config.set({"pingu.check-orientation-fail": 0.1}):  # fails only below 0.1
        outcome = check_file(files["t1w"], files["parcellation"], affine=turned)
    assert outcome.ok and "orientation" in outcome.flag_names  # still under the flag's 1.1


# The outcome and the error -------------------------------------------------------------


def test_preflight_error_is_an_input_error_that_names_the_scan() -> None:
    outcome = CheckOutcome(
        failures=(Finding("label_map", "18 distinct values"),),
        flags=(Finding("voxel_size", "5 mm"),),
        measures={"distinct_values": 18.0},
    )
    error = PreflightError("sub-007", outcome)
    assert isinstance(error, InputError) and verdict_of(error) is Verdict.INPUT
    assert str(error) == "sub-007: pre-flight checks failed: label_map: 18 distinct values"
    copy = pickle.loads(pickle.dumps(error))  # crosses from a Dask worker
    assert str(copy) == str(error) and copy.outcome == outcome and copy.scan_id == "sub-007"
    with pytest.raises(PreflightError, match="sub-007"):
        outcome.raise_failures("sub-007")
    CheckOutcome(flags=outcome.flags).raise_failures("sub-007")  # flags alone: no error
    both = CheckOutcome.combine(
        [outcome, CheckOutcome(flags=(Finding("alignment", "89%"),), measures={"x": 1.0})],
        prefixes=("t1w", "t2w"),
    )
    assert both.failure_names == "label_map" and both.flag_names == "voxel_size;alignment"
    assert both.measures == {"t1w.distinct_values": 18.0, "t2w.x": 1.0}


def test_the_turns_are_the_24_rotations_of_the_axes() -> None:
    assert len(TURNS) == 24 and np.array_equal(TURNS[0], np.eye(3))
    keys = {tuple(turn.astype(int).ravel()) for turn in TURNS}
    assert len(keys) == 24
    assert all(round(float(np.linalg.det(turn))) == 1 for turn in TURNS)


def test_a_label_map_on_its_own_grid_is_what_the_checks_expect(cohort: Path) -> None:
    """label_map_on_grid (what parcellation_on_grid uses) gives int32 labels on the
    image's grid, the input preflight's docstring asks for."""
    files = scan_files(cohort, "sub-003")  # 0.9 x 0.9 x 3 mm, oblique
    info, voxels = check_image_data(files["t1w"])
    labels = label_map_on_grid(files["parcellation"], info.shape, info.affine)
    assert labels.dtype == np.int32 and labels.shape == voxels.shape
    outcome = preflight(voxels, info.affine, info.spacing, labels)
    assert outcome.ok and outcome.flags == ()
