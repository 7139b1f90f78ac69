"""nnU-Net v1 models -> v2 model folders.

The v1 model is built here the way nnU-Net v1 builds and saves one: its own
Generic_UNet (from the `nnunet` 1.7.1 package, installed without its dependencies:
only the network module is needed) with nnUNetTrainerV2's arguments, weights saved with
torch.save in v1's checkpoint layout, plans.pkl and model_final_checkpoint.model.pkl
pickled as v1 writes them, in v1's folder layout. The weights are randomised (not left
at He initialisation's zero biases and unit norms) so that a mix-up of any two tensors
shows in the logits.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pingu_dask import tables
from pingu_dask.cli import main
from pingu_dask.config import InferenceSettings
from pingu_dask.convert_v1 import import_v1_model
from pingu_dask.model import ModelError, load_predictor, resolve_model

TASK = "Task101_TestPVS"
PLANS_IDENTIFIER = "nnUNetPlansv2.1_trgSp_1x1x1"
POOLS = [[2, 2, 2], [2, 2, 2], [1, 2, 2]]
KERNELS = [[3, 3, 3]] * 4  # as in isotropic plans such as PINGU's trgSp_1x1x1


def v1_plans(kernels=KERNELS) -> dict:
    """plans.pkl as nnU-Net v1's ExperimentPlanner3D_v21 writes it (one stage)."""
    stage = {
        "batch_size": 2,
        "num_pool_per_axis": [2, 3, 3],
        "patch_size": np.array([32, 32, 32]),
        "median_patient_size_in_voxels": np.array([116, 150, 128]),
        "current_spacing": np.array([1.0, 1.0, 1.0]),
        "original_spacing": np.array([1.0, 1.0, 1.0]),
        "do_dummy_2D_data_aug": False,
        "pool_op_kernel_sizes": POOLS,
        "conv_kernel_sizes": kernels,
    }
    return {
        "num_stages": 1,
        "num_modalities": 1,
        "modalities": {0: "T1"},
        "normalization_schemes": OrderedDict([(0, "nonCT")]),
        "dataset_properties": {"intensityproperties": None},
        "list_of_npz_files": [],
        "original_spacings": [np.array([1.0, 1.0, 1.0])],
        "original_sizes": [np.array([116, 150, 128])],
        "preprocessed_data_folder": "/nowhere",
        "num_classes": 1,
        "all_classes": [1],
        "base_num_features": 4,
        "use_mask_for_norm": OrderedDict([(0, False)]),
        "keep_only_largest_region": None,
        "min_region_size_per_class": None,
        "min_size_per_class": None,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "data_identifier": "nnUNetData_plans_v2.1",
        "plans_per_stage": {0: stage},
        "preprocessor_name": "GenericPreprocessor",
        "conv_per_stage": 2,
    }


def v1_network(plans: dict, seed: int):
    """nnUNetTrainerV2.initialize_network, then random weights."""
    from nnunet.network_architecture.generic_UNet import Generic_UNet
    from nnunet.network_architecture.initialization import InitWeights_He

    stage = plans["plans_per_stage"][0]
    torch.manual_seed(seed)
    network = Generic_UNet(
        plans["num_modalities"],
        plans["base_num_features"],
        plans["num_classes"] + 1,
        len(stage["pool_op_kernel_sizes"]),
        plans["conv_per_stage"],
        2,
        torch.nn.Conv3d,
        torch.nn.InstanceNorm3d,
        {"eps": 1e-5, "affine": True},
        torch.nn.Dropout3d,
        {"p": 0, "inplace": True},
        torch.nn.LeakyReLU,
        {"negative_slope": 1e-2, "inplace": True},
        True,
        False,
        lambda x: x,
        InitWeights_He(1e-2),
        stage["pool_op_kernel_sizes"],
        stage["conv_kernel_sizes"],
        False,
        True,
        True,
    )
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, 0.3)
    return network.eval()


def save_v1_model(root: Path, plans: dict, networks: dict[int, torch.nn.Module]) -> Path:
    """v1's layout: nnUNet/3d_fullres/<Task>/<Trainer>__<Plans>/{plans.pkl, fold_N/...}."""
    folder = root / "nnUNet" / "3d_fullres" / TASK / f"nnUNetTrainerV2__{PLANS_IDENTIFIER}"
    folder.mkdir(parents=True)
    with (folder / "plans.pkl").open("wb") as handle:
        pickle.dump(plans, handle)
    for fold, network in networks.items():
        fold_dir = folder / f"fold_{fold}"
        fold_dir.mkdir()
        losses = [np.float64(0.5), np.float64(0.4)]
        checkpoint = {  # nnUNetTrainer.save_checkpoint
            "epoch": 1000,
            "state_dict": OrderedDict((k, v.cpu()) for k, v in network.state_dict().items()),
            "optimizer_state_dict": None,
            "amp_grad_scaler": None,
            "plot_stuff": (losses, losses, losses, losses),
            "best_stuff": (999, np.float64(0.4), np.float64(0.4), np.float64(0.4)),
        }
        torch.save(checkpoint, fold_dir / "model_final_checkpoint.model")
        info = {  # NetworkTrainer.save_checkpoint's .pkl
            "init": ("plans.pkl", fold, str(fold_dir), "/nowhere", False, 0, True, False, True),
            "name": "nnUNetTrainerV2",
            "class": "<class 'nnunet.training.network_training.nnUNetTrainerV2.nnUNetTrainerV2'>",
            "plans": plans,
        }
        with (fold_dir / "model_final_checkpoint.model.pkl").open("wb") as handle:
            pickle.dump(info, handle)
    (folder / "postprocessing.json").write_text(
        json.dumps({"for_which_classes": [], "min_valid_object_sizes": {}})
    )
    return folder


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("v1")
    plans = v1_plans()
    networks = {0: v1_network(plans, seed=0), 1: v1_network(plans, seed=1)}
    folder = save_v1_model(root / "unpacked", plans, networks)
    archive = root / "PINGU-like_v0.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((root / "unpacked").rglob("*")):
            zipped.write(path, path.relative_to(root / "unpacked"))
    return {"root": root, "folder": folder, "zip": archive, "networks": networks}


def test_the_converted_model_gives_v1s_logits(v1_model, tmp_path: Path) -> None:
    converted = import_v1_model(v1_model["zip"], tmp_path)
    model = resolve_model(converted)
    assert model.folds == ("0", "1") and model.channels == ("t1w",)
    assert model.configuration == "3d_fullres"
    settings = InferenceSettings(tta=False, device="cpu", torch_threads=2)
    predictor = load_predictor(model, settings)  # the pipeline's own loading path
    torch.manual_seed(5)
    image = torch.randn(1, 1, 32, 48, 40)
    outputs = []
    for fold, weights in enumerate(predictor.list_of_parameters):
        predictor.network.load_state_dict(weights)
        v1 = v1_model["networks"][fold]
        v1.do_ds = False
        with torch.no_grad():
            expected = v1(image)
            got = predictor.network.eval()(image)
        assert got.shape == expected.shape == (1, 2, 32, 48, 40)
        assert float(expected.std()) > 0.05  # the logits vary: not a trivial network
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        outputs.append(got)
    assert float((outputs[0] - outputs[1]).abs().max()) > 0.1  # each fold its own weights
    plans = json.loads((converted / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    assert configuration["patch_size"] == [32, 32, 32] and configuration["spacing"] == [1, 1, 1]
    assert configuration["normalization_schemes"] == ["ZScoreNormalization"]
    assert configuration["architecture"]["arch_kwargs"]["strides"] == [[1, 1, 1], *POOLS]
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"] == [4, 8, 16, 32]
    dataset = json.loads((converted / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T1w"}
    assert dataset["labels"] == {"background": 0, "label_1": 1}
    provenance = json.loads((converted / "imported_from_v1.json").read_text())
    assert provenance["task"] == TASK and provenance["folds"] == ["0", "1"]


def test_what_v2_cannot_express_is_refused(v1_model, tmp_path: Path) -> None:
    def variant(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(v1_model["root"] / "unpacked", copy)
        return next(copy.rglob("plans.pkl")).parent

    def edit_pickle(path: Path, change) -> None:
        with path.open("rb") as handle:
            content = pickle.load(handle)
        change(content)
        with path.open("wb") as handle:
            pickle.dump(content, handle)

    folder = variant("ct2")
    edit_pickle(folder / "plans.pkl", lambda p: p["normalization_schemes"].update({0: "CT2"}))
    with pytest.raises(ModelError, match="'CT2' has no nnU-Net v2 equivalent"):
        import_v1_model(folder, tmp_path / "out")

    folder = variant("trainer")
    info = folder / "fold_0" / "model_final_checkpoint.model.pkl"
    edit_pickle(info, lambda i: i.update(name="nnUNetTrainerV2_ResencUNet"))
    with pytest.raises(ModelError, match="trainer 'nnUNetTrainerV2_ResencUNet' is not supported"):
        import_v1_model(folder, tmp_path / "out")

    folder = variant("postprocessing")
    (folder / "postprocessing.json").write_text(json.dumps({"for_which_classes": [1]}))
    with pytest.raises(ModelError, match="asks for post-processing"):
        import_v1_model(folder, tmp_path / "out")

    folder = variant("cascade")
    cascade = folder.parent.parent.parent / "3d_cascade_fullres"
    shutil.move(folder.parent.parent, cascade)
    with pytest.raises(ModelError, match="configuration '3d_cascade_fullres' is not supported"):
        import_v1_model(cascade, tmp_path / "out")

    folder = variant("extra_layer")
    checkpoint_path = folder / "fold_1" / "model_final_checkpoint.model"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["state_dict"]["seg_outputs.2.bias"] = torch.zeros(2)
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(ModelError, match=r"not a plain Generic_UNet.*seg_outputs\.2\.bias"):
        import_v1_model(folder, tmp_path / "out")

    folder = variant("kernels")
    edit_pickle(
        folder / "plans.pkl",
        lambda p: p["plans_per_stage"][0].update(conv_kernel_sizes=[[1, 3, 3]] * 4),
    )
    with pytest.raises(ModelError, match="kernel sizes in the weights"):
        import_v1_model(folder, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())  # nothing half-written left behind

    # v1's decoder takes its kernels one stage deeper than v2's: with anisotropic
    # kernels the two networks differ, so such a model cannot be converted.
    anisotropic = v1_plans(kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]])
    folder = save_v1_model(tmp_path / "anisotropic", anisotropic, {0: v1_network(anisotropic, 2)})
    with pytest.raises(ModelError, match=r"decoder stage 2 uses kernel \(3, 3, 3\)"):
        import_v1_model(folder, tmp_path / "out")

    with pytest.raises(ModelError, match="holds several v1 models"):
        import_v1_model(tmp_path, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no nnU-Net v1 model"):
        import_v1_model(tmp_path / "empty", tmp_path / "out")


def test_import_command_and_a_run_with_the_converted_model(v1_model, cohort: Path, tmp_path):
    result = CliRunner().invoke(
        main, ["model", "import", str(v1_model["zip"]), "--out", str(tmp_path / "models")]
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "models" / f"nnUNetTrainer__{PLANS_IDENTIFIER}__3d_fullres"
    assert f"v2 model written to {folder}" in result.output
    out = tmp_path / "out"
    arguments = ["run", str(cohort / "manifest.csv"), "--out", str(out), "--model", str(folder)]
    arguments += ["--folds", "0", "--no-tta", "--step-size", "1.0", "--device", "cpu"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    ledger = tables.read_table(out, "ledger")
    assert (ledger.status == "ok").sum() == 3
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["name"] == folder.name and run["model"]["folds"] == ["0"]


def test_v1_and_v2_preprocess_a_scan_alike_with_the_translated_plans(v1_model, cohort, tmp_path):
    """v1's GenericPreprocessor with plans.pkl vs v2's DefaultPreprocessor with the
    translated plans.json, on the cohort's scans (1 mm, 0.8 mm and 3 mm slices)."""
    from nnunet.preprocessing.preprocessing import GenericPreprocessor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    converted = import_v1_model(v1_model["folder"], tmp_path)
    plans = v1_plans()
    stage = plans["plans_per_stage"][0]
    v1 = GenericPreprocessor(
        plans["normalization_schemes"],
        plans["use_mask_for_norm"],
        plans["transpose_forward"],
        plans["dataset_properties"]["intensityproperties"],
    )
    manager = PlansManager(json.loads((converted / "plans.json").read_text()))
    dataset = json.loads((converted / "dataset.json").read_text())
    differences = {}
    for image in sorted(cohort.glob("sub-*/anat/*_T1w.nii.gz")):
        with contextlib.redirect_stdout(io.StringIO()):  # v1 prints its progress
            theirs, _, _ = v1.preprocess_test_case([str(image)], stage["current_spacing"])
        ours, _, _ = DefaultPreprocessor(verbose=False).run_case(
            [str(image)], None, manager, manager.get_configuration("3d_fullres"), dataset
        )
        assert ours.shape == theirs.shape
        differences[image.name] = float(np.abs(ours - theirs).max())
    # At the target spacing nothing is resampled: the same to the last bit. Resampled
    # scans differ by under 1 % of the z-scored range (v1 and v2 resampling code).
    assert differences["sub-001_T1w.nii.gz"] == 0.0
    assert max(differences.values()) < 0.05, differences


def test_ct_normalisation_transpose_and_export_settings_are_translated(v1_model) -> None:
    from pingu_dask.convert_v1 import V1Model, read_architecture, translate_plans

    plans = v1_plans()
    plans["normalization_schemes"] = OrderedDict([(0, "CT")])
    properties = {"median": 40.0, "mean": 42.0, "sd": 11.0, "mn": -1000.0, "mx": 3000.0,
                  "percentile_99_5": 200.0, "percentile_00_5": -50.0}  # fmt: skip
    plans["dataset_properties"]["intensityproperties"] = OrderedDict([(0, properties)])
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    plans["segmentation_export_params"] = {"force_separate_z": True, "interpolation_order": 3,
                                           "interpolation_order_z": 1}  # fmt: skip
    stage = plans["plans_per_stage"][0]
    weights = v1_model["networks"][0].state_dict()
    v1 = V1Model(Path("x"), "3d_fullres", TASK, "nnUNetTrainerV2", PLANS_IDENTIFIER, ("0",))
    translated = translate_plans(plans, stage, v1, read_architecture(weights, stage))
    configuration = translated["configurations"]["3d_fullres"]
    assert configuration["normalization_schemes"] == ["CTNormalization"]
    assert translated["foreground_intensity_properties_per_channel"] == {
        "0": {"median": 40.0, "mean": 42.0, "std": 11.0, "min": -1000.0, "max": 3000.0,
              "percentile_99_5": 200.0, "percentile_00_5": -50.0}
    }  # fmt: skip
    assert translated["transpose_forward"] == [2, 0, 1]
    assert translated["transpose_backward"] == [1, 2, 0]
    assert configuration["resampling_fn_probabilities_kwargs"] == {
        "is_seg": False, "order": 3, "order_z": 1, "force_separate_z": True
    }  # fmt: skip
    assert translated["dataset_name"] == "Dataset101_TestPVS"
