"""Evaluation against the reference as given (or filtered, when asked) and count agreement.

Hand-made volumes where the two reference choices differ, with Dice and F1 worked out
by hand, and Lin's CCC / Pearson r / Bland-Altman figures checked against values
computed on paper and against Lin's own decomposition of the CCC.
"""

from __future__ import annotations

import math
from pathlib import Path

import dask.config
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pingu_dask.analysis.evaluate import (
    agreement,
    count_agreement,
    lin_ccc,
    pearson_r,
    reference_handling,
)
from pingu_dask.analysis.regions import ASEG
from pingu_dask.analysis.scan import evaluate_against_reference
from pingu_dask.cli import main
from pingu_dask.cli.common import pvs_cluster_rules
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output import parts, tables
from pingu_dask.output.files import save_nifti
from pingu_dask.report.build import agreement_rows
from pingu_dask.run.evaluation import evaluate_stored

AS_GIVEN = PvsClusterRules(max_outside_brain=None)
FILTERED = PvsClusterRules(max_outside_brain=None, filter_reference=True)


def tube() -> np.ndarray:
    """A 20³ volume with one 8-voxel tube: a PVS the size filter (>= 6 voxels) keeps."""
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[4:12, 5, 5] = 1
    return mask


def reference_with_a_dot(folder: Path, affine: np.ndarray) -> Path:
    """The tube plus an isolated 1-voxel PVS the rater marked and the size filter drops."""
    reference = tube()
    reference[15, 15, 15] = 1
    return save_nifti(folder / "reference.nii.gz", reference, affine)


def scan_with(reference: Path) -> Scan:
    return Scan("s1", (("t1w", Path("t1.nii.gz")),), site="A", reference=reference)


def whole_brain(evaluation: pa.Table | list[dict]) -> dict:
    """The whole-brain row (the last) of a scan's evaluation rows or table."""
    rows = evaluation.to_pylist() if isinstance(evaluation, pa.Table) else evaluation
    return rows[-1]


def test_the_reference_is_compared_as_given_by_default(tmp_path: Path) -> None:
    """Prediction: the tube (8 voxels). Reference: the tube + 1 dot (9 voxels).
    As given: Dice 2*8/(8+9) = 16/17; clusters: the tube is found, the dot is not, so
    recall 1/2, precision 1/1, F1 2*(1*1/2)/(1+1/2) = 2/3."""
    scan = scan_with(reference_with_a_dot(tmp_path, np.eye(4)))
    row = whole_brain(evaluate_against_reference(tube(), np.eye(4), scan, None, AS_GIVEN, ASEG))
    assert row["voxel_dice"] == pytest.approx(16 / 17)
    assert (row["cluster_precision"], row["cluster_recall"]) == (1.0, 0.5)
    assert row["cluster_f1"] == pytest.approx(2 / 3)
    assert (row["n_predicted_clusters"], row["n_reference_clusters"]) == (1, 2)
    assert (row["predicted_voxels"], row["reference_voxels"]) == (8, 9)
    assert row["reference_filtered"] is False


def test_filtering_the_reference_drops_the_raters_dot_and_inflates_dice(tmp_path: Path) -> None:
    """The same volumes with --filter-reference: the dot is gone, so Dice and F1 are 1."""
    scan = scan_with(reference_with_a_dot(tmp_path, np.eye(4)))
    row = whole_brain(evaluate_against_reference(tube(), np.eye(4), scan, None, FILTERED, ASEG))
    assert (row["voxel_dice"], row["cluster_f1"]) == (1.0, 1.0)
    assert (row["n_reference_clusters"], row["reference_voxels"]) == (1, 8)
    assert row["reference_filtered"] is True
    as_given = evaluate_against_reference(tube(), np.eye(4), scan, None, AS_GIVEN, ASEG)
    assert whole_brain(as_given)["voxel_dice"] < row["voxel_dice"]


def test_volumes_are_in_mm3(tmp_path: Path) -> None:
    """2 x 1 x 1.5 mm voxels: 3 mm³ each, so 8 and 9 voxels are 24 and 27 mm³."""
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    scan = scan_with(reference_with_a_dot(tmp_path, affine))
    row = whole_brain(evaluate_against_reference(tube(), affine, scan, None, AS_GIVEN, ASEG))
    assert row["predicted_volume_mm3"] == pytest.approx(24.0)
    assert row["reference_volume_mm3"] == pytest.approx(27.0)


def test_a_stored_prediction_is_filtered_and_the_reference_is_not(tmp_path: Path) -> None:
    """A NIfTI prediction with the tube and a 2-voxel speck: the speck goes (the
    pipeline's filter), the reference's dot stays (as given): Dice 16/17 as above."""
    prediction = tube()
    prediction[1, 1, 1:3] = 1
    path = save_nifti(tmp_path / "s1.nii.gz", prediction, np.eye(4))
    scan = scan_with(reference_with_a_dot(tmp_path, np.eye(4)))
    row = whole_brain(evaluate_stored(path, scan, AS_GIVEN, ASEG))
    assert row["predicted_voxels"] == 8 and row["reference_voxels"] == 9
    assert row["voxel_dice"] == pytest.approx(16 / 17)
    assert whole_brain(evaluate_stored(path, scan, FILTERED, ASEG))["voxel_dice"] == 1.0


def test_the_choice_comes_from_the_config_and_the_options() -> None:
    assert PvsClusterRules.from_config().filter_reference is False
    with dask.config.set({"pingu.filter-reference": True}):
        assert PvsClusterRules.from_config().filter_reference is True
    # A run.json from before the choice existed (no key): as given.
    old = {"connectivity": 26, "min_voxels": 6, "min_volume_mm3": 0.0, "exclude_labels": []}
    assert pvs_cluster_rules(None, None, None, None, old).filter_reference is False
    chosen = {**old, "filter_reference": True}  # a run that asked for it...
    assert pvs_cluster_rules(None, None, None, None, chosen).filter_reference is True
    # ...and --reference-as-given over it.
    overridden = pvs_cluster_rules(None, None, None, None, chosen, filter_reference=False)
    assert overridden.filter_reference is False


def test_the_choice_is_part_of_the_pipeline_fingerprint(tmp_path: Path) -> None:
    from pingu_dask.config import InferenceSettings
    from pingu_dask.nnunet.engine import nnunet_model
    from pingu_dask.run.stages import Pipeline

    model, inference = nnunet_model("demo"), InferenceSettings(tta=False)
    as_given = Pipeline(model, inference, tmp_path, pvs_rules=AS_GIVEN)
    filtered = Pipeline(model, inference, tmp_path, pvs_rules=FILTERED)
    assert as_given.fingerprint() != filtered.fingerprint()


def test_evaluate_command_compares_with_the_reference_as_given(tmp_path: Path) -> None:
    """`pingu-dask evaluate` on a NIfTI folder: as given by default, and says so."""
    masks = tmp_path / "masks"
    masks.mkdir()
    save_nifti(masks / "s1.nii.gz", tube(), np.eye(4))
    reference = reference_with_a_dot(tmp_path, np.eye(4))
    t1w = save_nifti(tmp_path / "t1.nii.gz", np.ones((20, 20, 20), np.float32), np.eye(4))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"scan_id,t1w,reference,site\ns1,{t1w},{reference},A\n")
    saved = tmp_path / "evaluation.parquet"
    arguments = ["evaluate", str(masks), "-m", str(manifest), "-w", "1", "--save", str(saved)]
    with dask.config.set({"pingu.max-outside-brain": None}):
        result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    row = pq.read_table(saved).to_pylist()[-1]
    assert row["reference_filtered"] is False
    assert row["voxel_dice"] == pytest.approx(16 / 17)
    assert "reference masks as given" in result.output
    assert "Agreement of PVS count per scan" in result.output
    assert "--filter-reference" in CliRunner().invoke(main, ["evaluate", "--help"]).output


# --- count agreement ----------------------------------------------------------------------
def test_ccc_of_identical_values_is_one() -> None:
    result = agreement(np.array([1, 2, 3]), np.array([1, 2, 3]))
    assert (result.ccc, result.bias, result.sd_difference) == (1, 0, 0)
    assert result.pearson_r == pytest.approx(1.0)
    assert (result.loa_lower, result.loa_upper) == (0, 0)


def test_ccc_of_a_shift_by_one() -> None:
    """x = 1, 2, 3; y = x + 1: means 2 and 3, variances 2/3 (1/n), covariance 2/3.
    CCC = 2(2/3) / (2/3 + 2/3 + 1²) = 4/7; r = 1; bias +1 with no spread."""
    result = agreement(np.array([2, 3, 4]), np.array([1, 2, 3]))
    assert result.ccc == pytest.approx(4 / 7)
    assert result.pearson_r == pytest.approx(1.0)
    assert (result.bias, result.sd_difference) == (1.0, 0.0)


def test_ccc_of_a_doubling() -> None:
    """y = 2x on 1, 2, 3: var x 2/3, var y 8/3, cov 4/3, means differ by 2:
    CCC = (8/3) / (2/3 + 8/3 + 4) = 4/11, while r is 1."""
    assert lin_ccc(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(4 / 11)
    assert pearson_r(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(1.0)


def test_agreement_of_two_swapped_values() -> None:
    """reference 1, 2, 3, 4; predicted 1, 3, 2, 4: equal means and variances (1.25),
    covariance 1, so CCC = r = 0.8; differences 0, 1, -1, 0: bias 0, sample SD
    sqrt(2/3), limits ±1.96 sqrt(2/3)."""
    result = agreement(np.array([1, 3, 2, 4]), np.array([1, 2, 3, 4]))
    assert result.ccc == pytest.approx(0.8)
    assert result.pearson_r == pytest.approx(0.8)
    assert result.bias == 0.0
    assert result.sd_difference == pytest.approx(math.sqrt(2 / 3))
    assert result.loa_upper == pytest.approx(1.96 * math.sqrt(2 / 3))
    assert result.loa_lower == pytest.approx(-1.96 * math.sqrt(2 / 3))


def test_ccc_equals_lins_decomposition() -> None:
    """Lin (1989): CCC = r * C_b, C_b = 2 / (v + 1/v + u²), v = σx/σy,
    u = (μx - μy) / sqrt(σx σy), σ with 1/n: a second route to the same number."""
    rng = np.random.default_rng(7)
    x = rng.poisson(30, 25).astype(float)
    y = 0.8 * x + rng.normal(3, 4, 25)
    sx, sy = x.std(), y.std()
    v, u = sx / sy, (x.mean() - y.mean()) / math.sqrt(sx * sy)
    expected = np.corrcoef(x, y)[0, 1] * 2 / (v + 1 / v + u**2)
    assert lin_ccc(x, y) == pytest.approx(expected)
    assert pearson_r(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_undefined_figures_are_nan_with_a_note() -> None:
    one = agreement(np.array([5.0]), np.array([3.0]))
    assert math.isnan(one.ccc) and math.isnan(one.pearson_r) and math.isnan(one.loa_upper)
    assert one.bias == 2.0 and "n < 2" in one.note
    same = agreement(np.array([3, 3]), np.array([3, 3]))  # 0/0
    assert math.isnan(same.ccc) and math.isnan(same.pearson_r) and same.bias == 0
    assert same.note == "CCC undefined (no spread); r undefined (no spread)"
    flat = agreement(np.array([2, 2]), np.array([1, 3]))  # defined CCC (0), no r
    assert flat.ccc == 0.0 and math.isnan(flat.pearson_r) and flat.note == "r undefined (no spread)"
    none = agreement(np.array([]), np.array([]))
    assert none.n == 0 and math.isnan(none.bias) and none.note == "no scans"


def evaluation_frame() -> pd.DataFrame:
    """Whole-brain rows of 4 scans at sites A (3) and B (1); scan b1's table is older
    (no volumes recorded)."""
    rows = [
        ("a1", "A", 10, 12, 100.0, 120.0),
        ("a2", "A", 20, 22, 200.0, 210.0),
        ("a3", "A", 30, 29, 300.0, 310.0),
        ("b1", "B", 5, 8, None, None),
    ]
    columns = ["scan_id", "site", "n_predicted_clusters", "n_reference_clusters"]
    frame = pd.DataFrame(rows, columns=[*columns, "predicted_volume_mm3", "reference_volume_mm3"])
    return frame.assign(region="whole_brain", reference_filtered=False)


def test_count_agreement_per_site_and_over_all() -> None:
    table = count_agreement(evaluation_frame()).set_index(["site", "measure"])
    a = table.loc[("A", "clusters")]
    assert a["n"] == 3 and a["bias"] == pytest.approx((-2 - 2 + 1) / 3)
    p, r = np.array([10, 20, 30]), np.array([12, 22, 29])
    assert a["ccc"] == pytest.approx(lin_ccc(p, r))
    assert table.loc[("B", "clusters")]["note"].startswith("n < 2")
    assert table.loc[("all", "clusters")]["n"] == 4
    assert table.loc[("all", "volume_mm3")]["n"] == 3  # b1 has no volumes
    assert table.loc[("all", "volume_mm3")]["bias"] == pytest.approx(-40 / 3)


def test_the_report_rows_show_the_agreement() -> None:
    rows = agreement_rows(evaluation_frame(), ["whole_brain"])
    shown = {(row["site"], row["measure"]): row for row in rows}
    a = shown[("A", "PVS count")]
    assert (a["scans"], a["predicted"], a["reference"], a["bias"]) == (3, "20.0", "21.0", "-1.0")
    assert shown[("B", "PVS count")]["CCC"] == "-"
    assert agreement_rows(evaluation_frame().iloc[0:0], ["whole_brain"]) is None


def test_reference_handling_is_said_in_words() -> None:
    frame = evaluation_frame()
    assert reference_handling(frame) == "reference masks as given"
    assert "--filter-reference" in reference_handling(frame.assign(reference_filtered=True))
    older = frame.drop(columns="reference_filtered")
    assert "before this was recorded" in reference_handling(older)
    mixed = frame.assign(reference_filtered=[False, False, True, None])
    assert reference_handling(mixed).startswith("reference masks treated differently")


def test_older_evaluation_parts_read_with_the_new_columns_as_null(tmp_path: Path) -> None:
    new = ("predicted_volume_mm3", "reference_volume_mm3", "reference_filtered")
    old_schema = pa.schema([f for f in tables.SCHEMAS["evaluation"] if f.name not in new])
    folder = tmp_path / parts.TABLES / "evaluation"
    folder.mkdir(parents=True)
    row = {"scan_id": "old", "region": "whole_brain", "voxel_dice": 0.9}
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), folder / "part-0-old.parquet")
    frame = tables.read_table(tmp_path, "evaluation")
    assert frame["reference_filtered"].isna().all() and frame["voxel_dice"].iloc[0] == 0.9
