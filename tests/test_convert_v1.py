"""nnU-Net v1 models -> v2 model folders, tested on a model laid out like PINGU's.

The v1 model is made here by nnU-Net v1 itself (the `nnunet` 1.7.1 package, installed
without its dependencies): its ExperimentPlanner3D_v21 with a 0.8 mm target spacing
(as PINGU's nnUNetPlansv2.1_trgSp_8x8x8) writes plans.pkl, its nnUNetTrainerV2 builds
each fold's Generic_UNet and saves checkpoint, .model.pkl and plans.pkl, and its
determine_postprocessing writes postprocessing.json from a cross-validation in which
post-processing does not help (what PINGU ships). Only the features are small (4 at
the top) so that the test stays quick. The weights are randomised (not left at He
initialisation's zero biases and unit norms) so that a mix-up of any two tensors shows.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import pickle
import shutil
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pingu_dask.cli import main
from pingu_dask.config import InferenceSettings
from pingu_dask.nnunet.convert_v1 import V1_CHECKPOINT, import_v1_model
from pingu_dask.nnunet.model import ModelError, resolve_model
from pingu_dask.nnunet.predictor import load_predictor
from pingu_dask.output import tables

pytestmark = pytest.mark.slow  # the whole module: see pyproject's markers

# PINGU's published run script: nnUNet_predict -tr nnUNetTrainerV2 -m 3d_fullres
#   -p nnUNetPlansv2.1_trgSp_8x8x8 -t Task101_LabelsSpecificplusWP5FCV (every fold)
TASK = "Task101_LabelsSpecificplusWP5FCV"
TRAINER = "nnUNetTrainerV2"
PLANS_IDENTIFIER = "nnUNetPlansv2.1_trgSp_8x8x8"
FOLDS = (0, 1, 2, 3, 4)
TARGET_SPACING = (0.8, 0.8, 0.8)
V1_FOLDER = Path("nnUNet", "3d_fullres", TASK, f"{TRAINER}__{PLANS_IDENTIFIER}")
#: What v1's DatasetAnalyzer would report for small T1w scans at 1 mm, not skull
#: stripped (cropping to non-zero removes little, so no mask for normalisation).
DATASET_PROPERTIES = {
    "all_sizes": [(32, 32, 32), (32, 34, 32), (30, 32, 34)],
    "all_spacings": [(1.0, 1.0, 1.0)] * 3,
    "all_classes": [1],
    "modalities": {0: "T1"},
    "intensityproperties": None,  # v1 collects them for CT only
    "size_reductions": OrderedDict([("case_0", 1.0), ("case_1", 0.97), ("case_2", 1.0)]),
}


def _stub_medpy() -> None:
    """nnunet 1.7.1 imports medpy at module level for its Hausdorff metrics, which
    neither planning, training set-up nor the default evaluation computes; the package
    is installed without dependencies, so a stand-in module lets its code import."""
    if "medpy" not in sys.modules and importlib.util.find_spec("medpy") is None:
        medpy = types.ModuleType("medpy")
        medpy.metric = types.ModuleType("medpy.metric")
        sys.modules.setdefault("medpy", medpy)
        sys.modules.setdefault("medpy.metric", medpy.metric)


@contextlib.contextmanager
def as_v1_on_cpu() -> Iterator[None]:
    """v1's code, quiet (it prints its progress) and on the CPU like the pipeline in
    these tests (v1 moves networks to CUDA whenever it sees one)."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        mock.patch.object(torch.cuda, "is_available", return_value=False),
    ):
        yield


def nnunet_v1() -> SimpleNamespace:
    """The v1 classes and functions used to make the model."""
    _stub_medpy()
    with as_v1_on_cpu():
        from nnunet.evaluation.evaluator import aggregate_scores
        from nnunet.experiment_planning.experiment_planner_baseline_3DUNet_v21 import (
            ExperimentPlanner3D_v21,
        )
        from nnunet.postprocessing.connected_components import determine_postprocessing
        from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2
    return SimpleNamespace(
        planner=ExperimentPlanner3D_v21,
        trainer=nnUNetTrainerV2,
        aggregate_scores=aggregate_scores,
        determine_postprocessing=determine_postprocessing,
    )


def plan_v1(preprocessed: Path) -> Path:
    """plans file from v1's planner with PINGU's 0.8 mm target spacing, written the way
    nnunet's own custom-target-spacing planners (trgSp_2x2x2) are; returns its path."""
    v1 = nnunet_v1()

    class Planner(v1.planner):
        def __init__(self, cropped: str, output: str) -> None:
            super().__init__(cropped, output)
            self.data_identifier = "nnUNetData_plans_v2.1_trgSp_8x8x8"
            self.plans_fname = str(Path(output) / f"{PLANS_IDENTIFIER}_plans_3D.pkl")
            self.unet_base_num_features = 4  # v1's 32, made small to keep the test quick

        def get_target_spacing(self) -> np.ndarray:
            return np.array(TARGET_SPACING)

    cropped = preprocessed / "cropped"
    cropped.mkdir(parents=True)
    with (cropped / "dataset_properties.pkl").open("wb") as handle:
        pickle.dump(DATASET_PROPERTIES, handle)
    with as_v1_on_cpu():
        planner = Planner(str(cropped), str(preprocessed))
        planner.plan_experiment()
    return Path(planner.plans_fname)


def edited_plans(plans_file: Path, name: str, change) -> Path:
    """A copy of a plans file with `change` applied to its one stage."""
    with plans_file.open("rb") as handle:
        plans = pickle.load(handle)
    change(plans["plans_per_stage"][0])
    edited = plans_file.with_name(f"{name}_plans_3D.pkl")
    with edited.open("wb") as handle:
        pickle.dump(plans, handle)
    return edited


def train_v1(plans_file: Path, root: Path, seed: int, folds=FOLDS) -> dict:
    """Each fold's nnUNetTrainerV2 set up as nnUNet_train does, random weights in place of
    training, saved by v1's own save_checkpoint (checkpoint and .model.pkl) and
    save_debug_information (which copies plans.pkl next to the folds)."""
    v1 = nnunet_v1()
    output = root / V1_FOLDER
    trainers = {}
    for fold in folds:
        with as_v1_on_cpu():
            trainer = v1.trainer(
                str(plans_file),
                fold,
                output_folder=str(output),
                dataset_directory=str(plans_file.parent),
                batch_dice=True,
                stage=0,
                unpack_data=True,
                deterministic=False,
                fp16=False,
            )
            trainer.initialize(training=False)
            torch.manual_seed(seed + fold)
            with torch.no_grad():
                for parameter in trainer.network.parameters():
                    parameter.normal_(0.0, 0.3)
            trainer.save_debug_information()
            trainer.save_checkpoint(str(output / f"fold_{fold}" / V1_CHECKPOINT))
        trainers[fold] = trainer
    return trainers


def _write_label(path: Path, corner: int) -> None:
    import SimpleITK as sitk

    label = np.zeros((20, 20, 20), np.uint8)
    label[corner : corner + 8, 5:13, 5:13] = 1  # one connected component
    image = sitk.GetImageFromArray(label)
    image.SetSpacing(TARGET_SPACING)
    sitk.WriteImage(image, str(path))


def postprocess_v1(folder: Path) -> None:
    """postprocessing.json as v1's consolidate_folds writes it, from v1's own
    determine_postprocessing on cross-validation predictions that are one connected
    component each (so keeping the largest component cannot help: nothing is
    post-processed). The cross-validation folders are not part of a published model."""
    v1 = nnunet_v1()
    raw, reference = folder / "cv_niftis_raw", folder / "gt_niftis"
    raw.mkdir()
    reference.mkdir()
    for case, (predicted, true) in enumerate([(5, 6), (4, 4)]):
        _write_label(raw / f"case_{case}.nii.gz", predicted)
        _write_label(reference / f"case_{case}.nii.gz", true)
    pairs = [(str(p), str(reference / p.name)) for p in sorted(raw.glob("*.nii.gz"))]
    with as_v1_on_cpu():
        summary = str(raw / "summary.json")
        v1.aggregate_scores(pairs, labels=[0, 1], json_output_file=summary, num_threads=1)
        v1.determine_postprocessing(
            str(folder), str(reference), "cv_niftis_raw",
            final_subf_name="cv_niftis_postprocessed", processes=1,
        )  # fmt: skip
    for scratch in ("cv_niftis_raw", "cv_niftis_postprocessed", "gt_niftis"):
        shutil.rmtree(folder / scratch)


def load_plans(plans_file: Path) -> dict:
    with plans_file.open("rb") as handle:
        return pickle.load(handle)


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("v1")
    plans_file = plan_v1(root / "preprocessed")
    trainers = train_v1(plans_file, root / "unpacked", seed=0)
    folder = root / "unpacked" / V1_FOLDER
    postprocess_v1(folder)
    archive = root / "PINGU-like_v0.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((root / "unpacked").rglob("*")):
            zipped.write(path, path.relative_to(root / "unpacked"))
    return {"root": root, "folder": folder, "zip": archive, "plans_file": plans_file,
            "plans": load_plans(plans_file), "trainers": trainers}  # fmt: skip


def test_the_v1_model_is_laid_out_like_pingus(v1_model) -> None:
    """The fixture is what the import is meant for: PINGU's folder, five folds, 0.8 mm,
    and the postprocessing.json of a model that post-processes nothing."""
    names = set(zipfile.ZipFile(v1_model["zip"]).namelist())
    assert f"{V1_FOLDER}/plans.pkl" in names and f"{V1_FOLDER}/postprocessing.json" in names
    for fold in FOLDS:
        assert f"{V1_FOLDER}/fold_{fold}/{V1_CHECKPOINT}" in names
        assert f"{V1_FOLDER}/fold_{fold}/{V1_CHECKPOINT}.pkl" in names
    assert {Path(n).parts[:4] for n in names if len(Path(n).parts) > 4} == {V1_FOLDER.parts}
    plans = load_plans(v1_model["folder"] / "plans.pkl")
    assert plans["plans_per_stage"][0]["current_spacing"].tolist() == list(TARGET_SPACING)
    assert plans["original_spacings"] == [(1.0, 1.0, 1.0)] * 3
    postprocessing = json.loads((v1_model["folder"] / "postprocessing.json").read_text())
    assert postprocessing["for_which_classes"] == []
    assert postprocessing["min_valid_object_sizes"] == "None"  # v1 writes str(None)
    assert set(postprocessing["dc_per_class_raw"]) == {"1"}
    assert postprocessing["validation_raw"] == "cv_niftis_raw"


def _v1_probabilities(trainer, data: np.ndarray) -> np.ndarray:
    """v1's prediction of one fold (sliding window, Gaussian weighting, no mirroring)."""
    with as_v1_on_cpu():
        _, probabilities = trainer.predict_preprocessed_data_return_seg_and_softmax(
            data, do_mirroring=False, mirror_axes=(), step_size=0.5, verbose=False,
            mixed_precision=False,
        )  # fmt: skip
    return probabilities


def test_the_converted_model_predicts_as_v1(v1_model, tmp_path: Path) -> None:
    converted = import_v1_model(v1_model["zip"], tmp_path)
    model = resolve_model(converted)
    assert model.folds == tuple(str(f) for f in FOLDS) and model.channels == ("t1w",)
    assert model.configuration == "3d_fullres"
    settings = InferenceSettings(tta=False, device="cpu", torch_threads=2)
    predictor = load_predictor(model, settings)  # the pipeline's own loading path
    stage = v1_model["plans"]["plans_per_stage"][0]
    patch = tuple(int(x) for x in stage["patch_size"])
    torch.manual_seed(5)
    image = torch.randn(1, 1, *patch)
    tiny = torch.randn(1, 30, 36, 28)  # smaller than the patch: padded, as a small scan is
    outputs, v1_probabilities = [], []
    for fold, weights in enumerate(predictor.list_of_parameters):
        predictor.network.load_state_dict(weights)
        v1 = v1_model["trainers"][fold].network
        v1.do_ds = False
        with torch.no_grad():
            expected = v1.eval()(image)
            got = predictor.network.eval()(image)
        assert got.shape == expected.shape == (1, 2, *patch)
        assert float(expected.std()) > 0.05  # the logits vary: not a trivial network
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        outputs.append(got)
        # A whole prediction: v2 adds up the sliding-window logits in float16 (nnU-Net
        # v2's own choice, to save memory), hence the tolerance.
        ours = torch.softmax(predictor.predict_sliding_window_return_logits(tiny).float(), 0)
        theirs = _v1_probabilities(v1_model["trainers"][fold], tiny.numpy())
        np.testing.assert_allclose(ours.numpy(), theirs, atol=5e-3)
        v1_probabilities.append(theirs)
    assert float((outputs[0] - outputs[1]).abs().max()) > 0.1  # each fold its own weights
    # The five-fold mask: v1 averages the folds' probabilities, v2 their logits. The
    # masks may differ only where v1's ensemble is a near tie (random folds disagree
    # far more than trained ones, so this is the hard case).
    ensemble = predictor.predict_logits_from_preprocessed_data(tiny).argmax(0).numpy()
    v1_ensemble = np.mean(v1_probabilities, 0)
    differ = ensemble != v1_ensemble.argmax(0)
    assert differ.mean() < 0.01, differ.mean()
    assert np.all(np.abs(v1_ensemble[1][differ] - 0.5) < 0.01)
    plans = json.loads((converted / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    assert configuration["spacing"] == list(TARGET_SPACING)
    assert configuration["patch_size"] == list(patch)
    assert configuration["normalization_schemes"] == ["ZScoreNormalization"]
    assert configuration["use_mask_for_norm"] == [False]
    arch = configuration["architecture"]["arch_kwargs"]
    assert arch["strides"] == [[1, 1, 1], *stage["pool_op_kernel_sizes"]]
    assert arch["features_per_stage"] == [4 * 2**s for s in range(len(arch["strides"]))]
    dataset = json.loads((converted / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T1w"}
    assert dataset["labels"] == {"background": 0, "label_1": 1}
    provenance = json.loads((converted / "imported_from_v1.json").read_text())
    assert provenance["task"] == TASK and provenance["folds"] == [str(f) for f in FOLDS]


def _n_stages(plans: dict) -> int:
    return len(plans["plans_per_stage"][0]["pool_op_kernel_sizes"]) + 1


def test_what_v2_cannot_express_is_refused(v1_model, tmp_path: Path) -> None:
    n_stages = _n_stages(v1_model["plans"])

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
    info = folder / "fold_0" / f"{V1_CHECKPOINT}.pkl"
    edit_pickle(info, lambda i: i.update(name="nnUNetTrainerV2_ResencUNet"))
    with pytest.raises(ModelError, match="trainer 'nnUNetTrainerV2_ResencUNet' is not supported"):
        import_v1_model(folder, tmp_path / "out")

    folder = variant("postprocessing")
    settings = json.loads((folder / "postprocessing.json").read_text())
    settings["for_which_classes"] = [1]  # what v1 writes when keeping the largest one helps
    (folder / "postprocessing.json").write_text(json.dumps(settings))
    with pytest.raises(ModelError, match="asks for post-processing"):
        import_v1_model(folder, tmp_path / "out")

    folder = variant("cascade")
    cascade = folder.parent.parent.parent / "3d_cascade_fullres"
    shutil.move(folder.parent.parent, cascade)
    with pytest.raises(ModelError, match="configuration '3d_cascade_fullres' is not supported"):
        import_v1_model(cascade, tmp_path / "out")

    folder = variant("extra_layer")
    checkpoint_path = folder / "fold_1" / V1_CHECKPOINT
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["state_dict"][f"seg_outputs.{n_stages - 2}.bias"] = torch.zeros(2)
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(ModelError, match=rf"not a plain Generic_UNet.*seg_outputs\.{n_stages - 2}"):
        import_v1_model(folder, tmp_path / "out")

    folder = variant("kernels")
    edit_pickle(
        folder / "plans.pkl",
        lambda p: p["plans_per_stage"][0].update(conv_kernel_sizes=[[1, 3, 3]] * n_stages),
    )
    with pytest.raises(ModelError, match="kernel sizes in the weights"):
        import_v1_model(folder, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())  # nothing half-written left behind

    # v1's decoder takes its kernels one stage deeper than v2's: with anisotropic
    # kernels the two networks differ, so such a model cannot be converted.
    anisotropic = edited_plans(
        v1_model["plans_file"],
        "anisotropic",
        lambda s: s.update(conv_kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * (n_stages - 1)),
    )
    train_v1(anisotropic, tmp_path / "anisotropic", seed=2, folds=(0,))
    with pytest.raises(ModelError, match=rf"decoder stage {n_stages - 2} uses kernel \(3, 3, 3\)"):
        import_v1_model(tmp_path / "anisotropic", tmp_path / "out")

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
    assert sorted(p.name for p in folder.glob("fold_*")) == [f"fold_{f}" for f in FOLDS]
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
    plans = v1_model["plans"]
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
        zooms = np.asarray(nib.load(image).header.get_zooms()[:3])
        differences[tuple(round(float(z), 2) for z in zooms)] = float(np.abs(ours - theirs).max())
    # At the target spacing nothing is resampled: the same to the last bit. Resampled
    # scans differ by under 1 % of the z-scored range (v1 and v2 resampling code).
    assert differences[TARGET_SPACING] == 0.0, differences
    assert max(differences.values()) < 0.05, differences


def test_ct_normalisation_transpose_and_export_settings_are_translated(v1_model) -> None:
    from pingu_dask.nnunet.convert_v1 import V1Model, translate_plans
    from pingu_dask.nnunet.v1_network import read_architecture

    plans = copy.deepcopy(v1_model["plans"])
    plans["normalization_schemes"] = OrderedDict([(0, "CT")])
    properties = {"median": 40.0, "mean": 42.0, "sd": 11.0, "mn": -1000.0, "mx": 3000.0,
                  "percentile_99_5": 200.0, "percentile_00_5": -50.0}  # fmt: skip
    plans["dataset_properties"]["intensityproperties"] = OrderedDict([(0, properties)])
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    plans["segmentation_export_params"] = {"force_separate_z": True, "interpolation_order": 3,
                                           "interpolation_order_z": 1}  # fmt: skip
    stage = plans["plans_per_stage"][0]
    weights = v1_model["trainers"][0].network.state_dict()
    v1 = V1Model(Path("x"), "3d_fullres", TASK, TRAINER, PLANS_IDENTIFIER, ("0",))
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
    assert translated["dataset_name"] == "Dataset101_LabelsSpecificplusWP5FCV"
