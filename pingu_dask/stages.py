"""The three per-scan stages that run on Dask workers, and the per-worker model cache.

    preprocess (CPU)  read the channels with the model's reader, nnU-Net preprocessing
    predict    (slot) sliding-window logits with this worker's cached predictor
    finish     (CPU)  logits -> mask on the original grid, clusters, mask file, record

Each is a plain function of small picklable arguments (a Scan, a Model, settings) and
the previous stage's result, so Dask can place, retry and overlap them: while one scan
is on the GPU the next is being preprocessed and the last exported. Big arrays (the
preprocessed volume, the logits) stay in worker memory and move between workers only
if Dask chooses to; `finish` returns a small dict, the only thing the driver receives.

Nothing here starts processes: Dask workers are daemonic and cannot have children,
which is why nnU-Net's own multi-process predict_from_files is not used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pingu_dask import qc, store
from pingu_dask.analyse import Regions, analyse_mask, input_fingerprint, scan_regions
from pingu_dask.config import ClusterSettings, InferenceSettings, worker_threads
from pingu_dask.errors import InputError, StageFailure, verdict_of
from pingu_dask.imaging import ImageInfo, check_image_data, load_volume, save_nifti
from pingu_dask.manifest import Scan, channel_grid_mismatch
from pingu_dask.model import Model, load_predictor, worker_slot
from pingu_dask.regions import ASEG, RegionTable

# Readers whose arrays are the NIfTI array with the axes reversed (SimpleITK order).
TRANSPOSING_READERS = {"SimpleITKIO", "NibabelIO"}

F = TypeVar("F", bound=Callable[..., Any])
_lock = threading.Lock()
_predictors: dict[tuple[str, InferenceSettings], Any] = {}
_plans: dict[str, Any] = {}
_load_counts: Counter[str] = Counter()


@dataclass(frozen=True)
class ModelPlan:
    """The light part of a model (no weights): what preprocess and finish need."""

    plans_manager: Any
    configuration: Any
    dataset_json: dict
    label_manager: Any


def model_plan(model: Model) -> ModelPlan:
    """This process's cached ModelPlan for `model`."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with _lock:
        if model.fingerprint not in _plans:
            plans_manager = PlansManager(json.loads((model.folder / "plans.json").read_text()))
            dataset_json = json.loads((model.folder / "dataset.json").read_text())
            _plans[model.fingerprint] = ModelPlan(
                plans_manager,
                plans_manager.get_configuration(model.configuration),
                dataset_json,
                plans_manager.get_label_manager(dataset_json),
            )
        return _plans[model.fingerprint]


def cached_predictor(model: Model, settings: InferenceSettings):
    """This process's predictor for (model, settings), loaded on first use only."""
    key = (model.fingerprint, settings)
    with _lock:
        if key not in _predictors:
            worker = _this_worker()
            slot = worker_slot(worker.name) if worker else 0
            _predictors[key] = load_predictor(model, settings, slot)
            _load_counts[model.fingerprint] += 1
        return _predictors[key]


def load_counts() -> dict[str, int]:
    """How many times this process loaded each model (by fingerprint). For tests and QA."""
    with _lock:
        return dict(_load_counts)


def _this_worker():
    """The Dask worker running this task, or None outside a worker."""
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def _worker_name() -> str:
    """This worker's address (what the ledger and the dashboards show)."""
    worker = _this_worker()
    return worker.address if worker else "local"


def _torch_threads(settings: InferenceSettings) -> int:
    """Torch threads for this worker: the user's number, else the worker's own share of
    its machine or batch job (pingu.worker-threads, set where the worker was started)."""
    return settings.torch_threads or worker_threads()


def _set_torch_threads(settings: InferenceSettings) -> None:
    import torch

    threads = _torch_threads(settings)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


DEFAULT_CLUSTERS = ClusterSettings()


@dataclass(frozen=True)
class Pipeline:
    """Everything the stages need besides the scan; small, it travels with each task."""

    model: Model
    inference: InferenceSettings
    out: Path
    clusters: ClusterSettings = DEFAULT_CLUSTERS
    regions: RegionTable = ASEG
    write_nifti: bool = True
    qc: bool = False  # write a QC montage per scan (OUT/qc); not part of the fingerprint

    def fingerprint(self) -> str:
        """What decides a scan's outputs: model, inference, cluster and region settings."""
        parts = [
            self.model.fingerprint,
            self.inference.fingerprint(),
            json.dumps(asdict(self.clusters), sort_keys=True),
            self.regions.fingerprint(),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class Source:
    """What preprocess learnt about the scan's files, for finish (no second read)."""

    info: ImageInfo  # the first channel's grid: the mask is written on it
    regions: Regions | None
    input_fingerprint: str  # of the files as they were read
    picture: qc.QCImage | None = None  # with --qc: the first channel, 8-bit, for finish


@dataclass
class Preprocessed:
    scan_id: str
    data: np.ndarray  # (C, Z, Y, X) float32, nnU-Net's preprocessed volume
    properties: dict
    source: Source
    seconds: float
    worker: str


@dataclass
class Predicted:
    scan_id: str
    logits: Any  # torch.Tensor (classes, Z, Y, X) on the CPU
    properties: dict
    source: Source
    seconds: dict[str, float]
    workers: dict[str, str]


def stage(name: str) -> Callable[[F], F]:
    """Wrap a stage so that any error reaches the driver as a StageFailure.

    It records the stage, the worker and the verdict on retrying (see errors.py).
    """

    def wrap(function: F) -> F:
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                raise StageFailure(
                    name, _worker_name(), type(error).__name__, str(error), verdict_of(error)
                ) from error

        return run  # type: ignore[return-value]

    return wrap


@stage("preprocess")
def preprocess(scan: Scan, pipeline: Pipeline) -> Preprocessed:
    """Check the scan's images, then read them with the model's reader and preprocess.

    Every channel is read in full first (check_image_data): nnU-Net would accept a
    truncated file, NaN voxels or an empty image without a word. The parcellation is
    brought onto the image grid here too, before the GPU stage, so that an unusable
    one fails the scan without taking an inference slot.
    """
    started = time.perf_counter()
    model = pipeline.model
    first = scan.channel(model.channels[0])
    infos, picture = {}, None
    for path in scan.channel_paths:
        infos[path], data = check_image_data(path)
        if path == first and pipeline.qc:
            picture = qc.qc_image(data, infos[path].affine)
    if mismatch := channel_grid_mismatch(scan, infos):
        raise InputError(mismatch)
    info = infos[first]
    regions = scan_regions(scan, info.shape, info.affine, pipeline.regions, pipeline.clusters)
    source = Source(info, regions, input_fingerprint(scan), picture)
    plan = model_plan(model)
    preprocessor = plan.configuration.preprocessor_class(verbose=False)
    files = [str(scan.channel(column)) for column in model.channels]
    data, _, properties = preprocessor.run_case(
        files, None, plan.plans_manager, plan.configuration, plan.dataset_json
    )
    data = np.ascontiguousarray(data, dtype=np.float32)
    seconds = time.perf_counter() - started
    return Preprocessed(scan.scan_id, data, properties, source, seconds, _worker_name())


@stage("predict")
def predict(item: Preprocessed, pipeline: Pipeline) -> Predicted:
    """Sliding-window logits on this worker's cached predictor (one at a time per worker)."""
    import torch

    started = time.perf_counter()
    predictor = cached_predictor(pipeline.model, pipeline.inference)
    _set_torch_threads(pipeline.inference)
    data = torch.from_numpy(item.data)
    logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
    return Predicted(
        item.scan_id,
        logits,
        item.properties,
        item.source,
        {"preprocess": item.seconds, "predict": time.perf_counter() - started},
        {"preprocess": item.worker, "predict": _worker_name()},
    )


@stage("finish")
def finish(item: Predicted, scan: Scan, pipeline: Pipeline, nifti_name: str | None) -> dict:
    """Logits -> mask on the scan's grid -> clusters, regions, metrics; store the mask.

    Returns a small record: counts, timings and the scan's table rows (Arrow tables
    of a few hundred rows at most), which the driver writes.
    """
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    started = time.perf_counter()
    plan = model_plan(pipeline.model)
    segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
        item.logits,
        plan.plans_manager,
        plan.configuration,
        plan.label_manager,
        item.properties,
        return_probabilities=False,
        num_threads_torch=_torch_threads(pipeline.inference),
    )
    source = item.source
    info = source.info
    raw = to_image_order(np.asarray(segmentation), plan, item.properties, info.shape[:3])
    analysis = analyse_mask(
        raw, info.affine, scan, source.regions, pipeline.clusters, pipeline.regions
    )
    mask, result = analysis.mask, analysis.record
    attrs = {
        "model_fingerprint": pipeline.model.fingerprint,
        "pipeline_fingerprint": pipeline.fingerprint(),
        "input_fingerprint": source.input_fingerprint,
    }
    result["input_fingerprint"] = source.input_fingerprint
    result["mask"] = store.write_mask(pipeline.out, scan.scan_id, mask, info.affine, attrs)
    if pipeline.write_nifti and nifti_name:
        path = Path(pipeline.out) / store.NIFTI / nifti_name
        save_nifti(path, mask, info.affine)
        result["nifti"] = str(path)
    if source.picture is not None:
        parcels = source.regions.codes if source.regions is not None else None
        sheet = qc.scan_montage(scan, analysis, source.picture, parcels, pipeline.regions.names)
        result["qc"] = str(qc.write_png(pipeline.out, scan.scan_id, sheet))
    result["seconds"] = dict(item.seconds, finish=time.perf_counter() - started)
    result["workers"] = dict(item.workers, finish=_worker_name())
    return result


def to_image_order(
    segmentation: np.ndarray, plan: ModelPlan, properties: dict, shape: tuple[int, ...]
) -> np.ndarray:
    """nnU-Net's segmentation array -> the array order of the input NIfTI file.

    SimpleITKIO and NibabelIO hand nnU-Net the NIfTI array with its axes reversed, so
    reversing them back is exact. Any other reader (e.g. one that reorients) writes
    the mask with its own writer to a temporary file, which is then read back.
    """
    reader = plan.plans_manager.image_reader_writer_class
    if reader.__name__ in TRANSPOSING_READERS:
        mask = segmentation.transpose(2, 1, 0)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            path = str(Path(scratch) / "mask.nii.gz")
            reader().write_seg(segmentation, path, properties)
            mask, _ = load_volume(path)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask shape {mask.shape} does not match the image {tuple(shape)}")
    return mask
