"""What a second `train` on the same MODEL_DIR does with the first one's training.json:
goes on (same manifest and settings), refuses (others, naming them), or starts afresh
(--force). No training runs here."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pingu_dask.analysis.regions import ASEG
from pingu_dask.config import InferenceSettings, PvsClusterRules
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.manifest import ManifestReport
from pingu_dask.nnunet.planning import PRESETS
from pingu_dask.train.evaluation import Scoring
from pingu_dask.train.request import TrainRefused, TrainRequest, check_previous
from pingu_dask.train.splits import SplitSpec


def request_for(tmp_path: Path, **changes) -> TrainRequest:
    manifest = tmp_path / "manifest.csv"
    if not manifest.exists():
        manifest.write_text("scan_id,t1w,reference\n")
    report = ManifestReport(path=manifest, n_rows=0, channels=("t1w",), scans=(), problems=())
    request = TrainRequest(
        report=report,
        model_dir=tmp_path / "model",
        split=SplitSpec.parse("site"),
        channel_names=("T1w",),
        schedule=PRESETS["tiny"].schedule,
        scoring=Scoring(InferenceSettings(), PvsClusterRules(), ASEG, CheckThresholds()),
        preset=PRESETS["tiny"],
    )
    return replace(request, **changes)


def earlier_training(tmp_path: Path, request: TrainRequest) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    record = check_previous(model_dir, request)
    record["runs"] = [{"run_id": "first"}]
    (model_dir / "training.json").write_text(json.dumps(record))
    (model_dir / "ledger").mkdir()
    (model_dir / "ledger" / "part-1.parquet").write_bytes(b"rows")
    (model_dir / ".lock").write_text("held")
    return model_dir


def test_the_same_manifest_and_settings_go_on(tmp_path: Path) -> None:
    request = request_for(tmp_path)
    model_dir = earlier_training(tmp_path, request)
    record = check_previous(model_dir, request)
    assert record["runs"] == [{"run_id": "first"}]
    assert (model_dir / "ledger" / "part-1.parquet").exists()


def test_other_settings_are_refused_naming_them(tmp_path: Path) -> None:
    request = request_for(tmp_path)
    model_dir = earlier_training(tmp_path, request)
    other = replace(request, split=SplitSpec.parse("kfold", k=3))
    with pytest.raises(TrainRefused) as refused:
        check_previous(model_dir, other)
    assert "different: split" in str(refused.value) and "--force" in str(refused.value)
    (tmp_path / "manifest.csv").write_text("scan_id,t1w,reference\nx,a.nii.gz,b.nii.gz\n")
    with pytest.raises(TrainRefused, match="manifest_sha256"):
        check_previous(model_dir, request_for(tmp_path))
    assert (model_dir / "ledger" / "part-1.parquet").exists()  # nothing was deleted


@pytest.mark.parametrize("same_settings", [True, False])
def test_force_starts_afresh_and_keeps_the_lock(tmp_path: Path, same_settings: bool) -> None:
    request = request_for(tmp_path)
    model_dir = earlier_training(tmp_path, request)
    forced = replace(request, force=True)
    if not same_settings:
        forced = replace(forced, split=SplitSpec.parse("kfold", k=2))
    record = check_previous(model_dir, forced)
    assert "runs" not in record
    assert sorted(p.name for p in model_dir.iterdir()) == [".lock"]


def test_changed_cases_are_named() -> None:
    """A second train compares its cases with cases.csv: a training whose cases changed
    (in, out, or their files) is refused, since its plans and folds are of the old ones."""
    import pandas as pd

    from pingu_dask.nnunet.planning import CaseFingerprint
    from pingu_dask.train.cases import PreparedCase, case_changes

    def case(scan_id: str, fingerprint: str) -> PreparedCase:
        return PreparedCase(
            scan_id=scan_id, site="A", fingerprint=CaseFingerprint([1], [1.0], [], 1.0),
            input_fingerprint=fingerprint, stored_orientation="RAS",
            voxel_size_mm=(1.0, 1.0, 1.0), reference_voxels=1, flags=(), linked=True,
            seconds=0.0, worker="w",
        )  # fmt: skip

    earlier = pd.DataFrame(
        {
            "scan_id": ["a", "b", "c", "d"],
            "status": ["included", "included", "included", "left out"],
            "input_fingerprint": ["fa", "fb", "fc", None],
        }
    )
    same = [case("a", "fa"), case("b", "fb"), case("c", "fc")]
    assert case_changes(earlier, same) == []
    changed = [case("a", "fa"), case("b", "fB"), case("d", "fd")]
    assert case_changes(earlier, changed) == [
        "d now included",
        "c now left out",
        "b's files changed",
    ]
