"""nnU-Net inference on Dask workers with the bundled demo model.

Real parts only: the real nnunetv2 predictor, the bundled model, a LocalCluster of
separate worker processes, and (for parity) the real `nnUNetv2_predict` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import dask.config
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from distributed import Client

import pingu_dask
from pingu_dask.analysis.clusters import clean_mask
from pingu_dask.analysis.regions import ASEG
from pingu_dask.config import InferenceSettings, PvsClusterRules
from pingu_dask.inputs.manifest import load_manifest
from pingu_dask.nnunet.engine import NnUNetModel
from pingu_dask.nnunet.model import ModelError, demo_model_folder, resolve_model
from pingu_dask.nnunet.predictor import load_counts, load_predictor
from pingu_dask.output import masks, tables
from pingu_dask.run import stages
from pingu_dask.run.local import local_cluster
from pingu_dask.run.loop import Segmentation, segment_scans

CPU = InferenceSettings(tta=False, device="cpu", torch_threads=2)


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo model folder that tests may alter."""
    target = tmp_path_factory.mktemp("models") / demo_model_folder().name
    shutil.copytree(demo_model_folder(), target)
    return target


def test_demo_model_resolves_with_its_channels_and_fingerprint() -> None:
    model = resolve_model("demo")
    assert model.channels == ("t1w",)
    assert model.folds == ("all",)
    assert len(model.fingerprint) == 64
    assert resolve_model(model.folder).fingerprint == model.fingerprint


def test_fingerprint_changes_with_the_weights(demo_copy: Path, tmp_path: Path) -> None:
    changed = tmp_path / demo_copy.name
    shutil.copytree(demo_copy, changed)
    checkpoint = changed / "fold_all" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    assert resolve_model(changed).fingerprint != resolve_model(demo_copy).fingerprint


def test_a_folder_that_is_not_a_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match="not an nnU-Net v2 model folder"):
        resolve_model(tmp_path)
    with pytest.raises(ModelError, match="model not found"):
        resolve_model(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="not a zip"):
        resolve_model(tmp_path / "notes.txt")


def test_a_missing_fold_lists_the_available_ones(demo_copy: Path) -> None:
    with pytest.raises(ModelError, match=r"fold 3 not found; available folds: \['all'\]"):
        resolve_model(demo_copy, folds=("3",))
    with pytest.raises(ModelError, match=r"no fold has model_best\.pth"):
        resolve_model(demo_copy, checkpoint="model_best.pth")


def test_several_models_below_a_folder_must_be_chosen(demo_copy: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        shutil.copytree(demo_copy, tmp_path / name / demo_copy.name)
    with pytest.raises(ModelError, match="holds several models"):
        resolve_model(tmp_path)
    assert resolve_model(tmp_path / "a").folder == tmp_path / "a" / demo_copy.name


def test_model_zip_is_unpacked_once_into_the_cache(demo_copy: Path, tmp_path: Path) -> None:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:  # the layout nnUNetv2_export_model_to_zip writes
        for path in demo_copy.rglob("*"):
            handle.write(path, Path("Dataset901_PinguDemo") / path.relative_to(demo_copy.parent))
    with dask.config.set({"pingu.cache-dir": str(tmp_path / "cache")}):
        first = resolve_model(archive)
        marker = first.folder / "unpacked-once"
        marker.write_text("")
        second = resolve_model(archive)
    assert second.folder == first.folder and marker.exists()
    assert first.folder.is_relative_to(tmp_path / "cache")
    assert first.fingerprint == resolve_model(demo_copy).fingerprint


def test_model_channels_decide_the_manifest_columns(demo_copy: Path, tmp_path: Path, cohort: Path):
    two_channel = tmp_path / demo_copy.name
    shutil.copytree(demo_copy, two_channel)
    dataset = json.loads((two_channel / "dataset.json").read_text())
    dataset["channel_names"] = {"0": "T1w", "1": "FLAIR"}
    (two_channel / "dataset.json").write_text(json.dumps(dataset))
    model = resolve_model(two_channel)
    assert model.channels == ("t1w", "flair")
    report = load_manifest(cohort / "manifest.csv", model.channels)
    assert "missing required column 'flair'" in str(report.problems[0])


def test_an_unimportable_trainer_class_does_not_stop_inference(demo_copy: Path, tmp_path: Path):
    custom = tmp_path / demo_copy.name
    shutil.copytree(demo_copy, custom)
    path = custom / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerFromALabWeDoNotHave"
    torch.save(checkpoint, path)
    predictor = load_predictor(resolve_model(custom), CPU)
    assert predictor.trainer_name == "nnUNetTrainerFromALabWeDoNotHave"

    plans = json.loads((custom / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [
        4,
        8,
        16,
        32,
    ]
    (custom / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match=r"plans\.json does not describe the saved weights"):
        load_predictor(resolve_model(custom), CPU)


@pytest.fixture(scope="module")
def dask_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    """The cohort segmented on a LocalCluster of two worker processes."""
    out = tmp_path_factory.mktemp("run")
    model = resolve_model("demo")
    scans = load_manifest(cohort / "manifest.csv").scans
    settings = InferenceSettings(tta=False, device="cpu", torch_threads=1)
    pipeline = stages.Pipeline(NnUNetModel(model), settings, out)
    cluster = local_cluster(n_workers=2, threads_per_worker=2, torch_threads=1)
    with cluster, Client(cluster) as client:
        records = segment_scans(client, Segmentation(scans=scans, pipeline=pipeline, window=4))
        loads = client.run(load_counts)
    return out, model, records, loads


@pytest.mark.slow
def test_dask_stages_write_masks_on_the_original_grid(dask_run, cohort: Path) -> None:
    out, _, records, _ = dask_run
    assert [r.status for r in records] == ["ok"] * 3
    for record in records:
        mask = nib.load(record.nifti)
        assert Path(record.nifti).name == f"{record.scan_id}_desc-pvs_mask.nii.gz"
        t1 = nib.load(cohort / record.scan_id / "anat" / f"{record.scan_id}_T1w.nii.gz")
        assert mask.shape == t1.shape
        assert np.allclose(mask.affine, t1.affine)
        data = np.asarray(mask.dataobj)
        assert int(data.sum()) == record.n_voxels > 0
        assert set(np.unique(data).tolist()) <= {0, 1}
        stored, affine = masks.read_mask(out, record.scan_id)
        assert np.array_equal(stored, data) and np.allclose(affine, t1.affine)
        assert set(record.seconds) == {"preprocess", "predict", "finish"}
        assert record.voxel_dice > 0.3  # the model really segments (see docs for figures)


@pytest.mark.slow
def test_the_pipeline_writes_regions_clusters_and_evaluation(dask_run) -> None:
    out, model, records, _ = dask_run
    results = pingu_dask.open_results(out)
    regions = tables.read_table(out, "regions")
    assert sorted(set(regions.scan_id)) == sorted(r.scan_id for r in records)
    assert len(regions) == 3 * (len(ASEG.names) + 2)
    whole = regions[regions.region == "whole_brain"].set_index("scan_id")
    clusters = tables.read_table(out, "clusters")
    for record in records:
        scan_id = record.scan_id
        assert whole.loc[scan_id, "n_clusters"] == record.n_clusters
        assert (clusters.scan_id == scan_id).sum() == record.n_clusters
        assert whole.loc[scan_id, "n_voxels"] == record.n_voxels
        attrs = masks.mask_attrs(out, scan_id)
        assert attrs["complete"] and attrs["model_fingerprint"] == model.fingerprint
    # Synthetic PVS are drawn in WM and BG only, so the model's clusters land there.
    share = regions.groupby("region")["n_clusters"].sum()
    assert share["white_matter"] + share["basal_ganglia"] >= 0.8 * share["whole_brain"]
    assert clusters["length_mm"].min() > 0 and (clusters["n_voxels"] >= 6).all()
    evaluation = results.evaluation
    assert set(evaluation.region) == {*ASEG.names, "whole_brain"}
    brain = evaluation[evaluation.region == "whole_brain"].set_index("scan_id")
    for record in records:
        assert brain.loc[record.scan_id, "voxel_dice"] == record.voxel_dice
    assert results.regions["n_clusters"].sel(region="whole_brain").sum() == whole.n_clusters.sum()


@pytest.mark.slow
def test_evaluate_command_reproduces_the_pipeline_figures(
    dask_run, cohort: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from pingu_dask.cli import main

    out = dask_run[0]
    before = tables.read_table(out, "evaluation").sort_values(["scan_id", "region"])
    manifest = str(cohort / "manifest.csv")
    result = CliRunner().invoke(main, ["evaluate", str(out), "--manifest", manifest, "-w", "1"])
    assert result.exit_code == 0, result.output
    assert "Evaluation of" in result.output and "all" in result.output
    after = tables.read_table(out, "evaluation").sort_values(["scan_id", "region"])
    assert len(after) == len(before)  # replaced, not appended
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True))
    # The same masks as a NIfTI folder give the same numbers.
    saved = tmp_path / "evaluation.parquet"
    arguments = ["evaluate", str(out / "nifti"), "--manifest", manifest, "--save", str(saved)]
    result = CliRunner().invoke(main, [*arguments, "-w", "1"])
    assert result.exit_code == 0, result.output
    from_nifti = pd.read_parquet(saved).sort_values(["scan_id", "region"])
    pd.testing.assert_frame_equal(before.reset_index(drop=True), from_nifti.reset_index(drop=True))


@pytest.mark.slow
def test_each_worker_loads_the_model_once_and_reuses_it(dask_run) -> None:
    _, model, records, loads = dask_run
    predicted_on = Counter(r.workers["predict"] for r in records)
    for worker in predicted_on:
        assert loads[worker] == {model.fingerprint: 1}
    busiest, scans = predicted_on.most_common(1)[0]
    assert scans >= 2 and loads[busiest] == {model.fingerprint: 1}  # reused, not reloaded


def nnunet_predict(inputs: Path, output: Path, results: Path) -> None:
    env = dict(
        os.environ,
        nnUNet_results=str(results),
        nnUNet_raw=str(results),
        nnUNet_preprocessed=str(results),
    )
    command = [
        str(Path(sys.executable).parent / "nnUNetv2_predict"),
        "-i",
        str(inputs),
        "-o",
        str(output),
        "-d",
        "901",
        "-tr",
        "nnUNetTrainer",
        "-p",
        "nnUNetPlansDemo",
        "-c",
        "3d_fullres",
        "-f",
        "all",
        "-chk",
        "checkpoint_final.pth",
        "--disable_tta",
        "-step_size",
        "0.5",
        "-device",
        "cpu",
        "-npp",
        "1",
        "-nps",
        "1",
    ]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=900)


def _reoriented(source: Path, target: Path, codes: str) -> None:
    """`source` stored in the orientation `codes` (nibabel's as_reoriented)."""
    image = nib.load(source)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(tuple(codes))
    )
    nib.save(image.as_reoriented(ornt), target)


@pytest.mark.slow
def test_masks_agree_with_nnunetv2_predict(dask_run, cohort: Path, tmp_path: Path) -> None:
    """pingu-dask gives the network each scan in the model's orientation (RAS): on a scan
    stored RAS that is nnUNetv2_predict's input as is, on the others nnUNetv2_predict's
    input stored RAS. Either way the masks agree; nnUNetv2_predict on the file as stored
    (another input for the network) is measured against them too, and printed."""
    _, model, records, _ = dask_run
    results = tmp_path / "results" / "Dataset901_PinguDemo"
    results.mkdir(parents=True)
    (results / model.folder.name).symlink_to(model.folder)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    stored = {}
    for record in records:
        scan_id = record.scan_id
        source = cohort / scan_id / "anat" / f"{scan_id}_T1w.nii.gz"
        stored[scan_id] = "".join(nib.aff2axcodes(nib.load(source).affine))
        (inputs / f"{scan_id}_0000.nii.gz").symlink_to(source)
        if stored[scan_id] != "RAS":
            _reoriented(source, inputs / f"{scan_id}-RAS_0000.nii.gz", "RAS")
    assert set(stored.values()) - {"RAS"}, "the cohort has scans stored otherwise"
    nnunet_predict(inputs, tmp_path / "nnunet", tmp_path / "results")

    def theirs(name: str, like: nib.Nifti1Image) -> np.ndarray:
        image = nib.load(tmp_path / "nnunet" / f"{name}.nii.gz")
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(image.affine),
            nib.orientations.io_orientation(like.affine),
        )
        image = image.as_reoriented(ornt)  # onto the stored grid (identity if stored RAS)
        assert np.allclose(image.affine, like.affine, atol=1e-4)
        # Ours went through the size filter; put theirs through the same one.
        voxel_volume = abs(np.linalg.det(image.affine[:3, :3]))
        return clean_mask(np.asarray(image.dataobj), voxel_volume, PvsClusterRules())

    agreement, as_stored = [], {}
    for record in records:
        ours_image = nib.load(record.nifti)
        ours = np.asarray(ours_image.dataobj)
        name = record.scan_id if stored[record.scan_id] == "RAS" else f"{record.scan_id}-RAS"
        agreement.append(float((ours == theirs(name, ours_image)).mean()))
        if stored[record.scan_id] != "RAS":
            other = theirs(record.scan_id, ours_image)
            dice = 2 * (ours & other).sum() / max(1, ours.sum() + other.sum())
            as_stored[record.scan_id] = (stored[record.scan_id], float(dice))
    print("voxel agreement with nnUNetv2_predict on RAS-stored input:", agreement)
    print("Dice with nnUNetv2_predict on the file as stored (not RAS):", as_stored)
    assert min(agreement) >= 0.999


def test_run_without_a_model_names_the_choices(cohort: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pingu_dask.cli import main

    result = CliRunner().invoke(main, ["run", str(cohort / "manifest.csv"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "nnUNetv2_export_model_to_zip" in text and "'demo'" in text
    assert "not for real scans" in text
    result = CliRunner().invoke(
        main, ["run", str(cohort / "manifest.csv"), "--out", str(tmp_path), "--model", "nowhere"]
    )
    assert result.exit_code == 2 and "model not found" in result.output


@pytest.mark.slow
def test_run_command_writes_provenance_and_uses_a_user_region_table(
    cohort: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from pingu_dask.cli import main

    manifest = pd.read_csv(cohort / "manifest.csv", dtype=str).head(1)
    for column in ("t1w", "t2w", "parcellation", "reference"):
        manifest[column] = [str(cohort / p) for p in manifest[column]]
    manifest.to_csv(tmp_path / "one.csv", index=False)
    table = tmp_path / "deep.json"
    table.write_text(json.dumps({"name": "deep", "regions": {"deep_grey": ["11-13", 26, 10]}}))
    out = tmp_path / "out"
    arguments = ["run", str(tmp_path / "one.csv"), "--out", str(out), "--model", "demo"]
    options = ["--no-tta", "--device", "cpu", "--regions", str(table), "--exclude", "4,43"]
    result = CliRunner().invoke(main, [*arguments, *options, "--min-cluster-voxels", "8"])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["fingerprint"] == resolve_model("demo").fingerprint
    assert run["clusters"] == {
        "connectivity": 26,
        "min_voxels": 8,
        "min_volume_mm3": 0.0,
        "exclude_labels": [4, 43],
        "max_outside_brain": 0.25,
        "filter_reference": False,
    }
    assert run["regions"] == {"table": "deep", "regions": {"deep_grey": [10, 11, 12, 13, 26]}}
    assert run["inference"]["tta"] is False and run["finished"] and run["n_scans"] == 1
    assert [r["to_do"] for r in run["runs"]] == [1]
    assert len(run["manifest"]["sha256"]) == 64
    regions = tables.read_table(out, "regions")
    assert regions.region.tolist() == ["deep_grey", "other", "whole_brain"]
    assert tables.read_table(out, "clusters")["n_voxels"].min() >= 8
    assert "Evaluation against the reference masks" in result.output
    assert "whole brain" in result.output


def test_each_worker_process_of_a_multi_gpu_job_gets_its_own_gpu() -> None:
    from pingu_dask.nnunet.predictor import pick_cuda_device, worker_slot

    # Pure functions: a GPU itself cannot be tested here (no GPU in CI).
    assert [worker_slot(n) for n in (0, 3, "dask-worker-12345-1", "tcp://1.2.3.4:5")] == [
        0,
        3,
        1,
        0,
    ]
    assert [pick_cuda_device("cuda", slot, 2) for slot in range(3)] == [
        "cuda:0",
        "cuda:1",
        "cuda:0",
    ]
    assert pick_cuda_device("cuda:1", 0, 2) == "cuda:1"  # an explicit choice is kept
    assert pick_cuda_device("cuda", 5, 1) == "cuda"
