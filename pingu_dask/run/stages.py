"""The three per-scan stages that run on Dask workers.

    preprocess (CPU)  read and check the channels, the parcellation on the image grid,
                      the model's preparation (nnU-Net's preprocessing) of the voxels read
    predict    (slot) this worker's cached predictor: logits, and the export on the same
                      device (logits onto the scan's grid, argmax): a uint8 label map
    finish     (CPU)  label map -> mask on the input grid, clusters, mask file, record

Each is a plain function of small picklable arguments (a Scan, a Pipeline) and the
previous stage's result, so Dask can place, retry and overlap them: while one scan is
on the GPU the next is being preprocessed and the last finished. The stages only
orchestrate: the model is behind its seam (records.SegmentationModel: prepare,
predict, restore; nnU-Net's is nnunet/engine.py), the numbers behind analysis. Big
arrays stay in worker memory and move between workers only if Dask chooses to; what
crosses from predict to finish is a uint8 map of the head, and `finish` returns a
small ScanResult, the only thing the driver receives.

Nothing here starts processes: Dask workers are daemonic and cannot have children,
which is why nnU-Net's own multi-process predict_from_files is not used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pingu_dask.analysis.atlas import ATLAS_REGION_SOURCE, AtlasSettings, atlas_parcellation
from pingu_dask.analysis.labels import MODEL_REGION_SOURCE, ModelLabels, resolve_labels
from pingu_dask.analysis.regions import ASEG, RegionTable, parcellation_on_grid
from pingu_dask.analysis.scan import (
    Regions,
    analyse_mask,
    intracranial_volume,
    regions_from_labels,
)
from pingu_dask.config import InferenceSettings, PvsClusterRules, worker_threads
from pingu_dask.errors import InputError, StageFailure, verdict_of
from pingu_dask.inputs.checks import CheckOutcome, CheckThresholds, preflight
from pingu_dask.inputs.imaging import ImageInfo, check_image_data, voxel_volume
from pingu_dask.inputs.manifest import (
    NO_REGION_SOURCE,
    Scan,
    channel_grid_mismatch,
    input_fingerprint,
    region_source,
)
from pingu_dask.inputs.orientation import Reorientation
from pingu_dask.nnunet.predictor import worker_slot
from pingu_dask.output import derivatives, masks, tables
from pingu_dask.records import (
    PreparedScan,
    ScanFacts,
    ScanImages,
    ScanResult,
    SegmentationModel,
)
from pingu_dask.report import qc

F = TypeVar("F", bound=Callable[..., Any])


def _this_worker():
    """The Dask worker running this task, or None outside a worker."""
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def worker_name() -> str:
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


DEFAULT_PVS_RULES = PvsClusterRules()
DEFAULT_ATLAS = AtlasSettings()
ATLAS_FOR = ("none", "missing", "all")
DEFAULT_CHECKS = CheckThresholds()


@dataclass(frozen=True)
class Pipeline:
    """Everything the stages need besides the scan; small, it travels with each task."""

    model: SegmentationModel  # the model seam: nnunet/engine.py, or a stand-in
    inference: InferenceSettings
    out: Path
    pvs_rules: PvsClusterRules = DEFAULT_PVS_RULES
    regions: RegionTable = ASEG
    write_nifti: bool = True
    qc: bool = False  # write a QC montage per scan (OUT/qc); not part of the fingerprint
    # Pre-flight checks: they decide which scans run, not any figure, so they are not
    # part of the fingerprint (run.json records them).
    checks: CheckThresholds = DEFAULT_CHECKS
    strict: bool = False  # flags fail the scan too
    # Which model labels are PVS and which regions they stand for (analysis/labels.py);
    # None: read from the model's labels by the default rules (LabelError when they
    # cannot decide).
    labels: ModelLabels | None = None
    # Regions from the atlas (analysis/atlas.py) for which scans: "none", "missing"
    # (scans without a parcellation) or "all"; and how it is registered.
    atlas_for: str = "none"
    atlas: AtlasSettings = DEFAULT_ATLAS

    def __post_init__(self) -> None:
        if self.atlas_for not in ATLAS_FOR:
            raise ValueError(f"atlas_for {self.atlas_for!r}: one of {', '.join(ATLAS_FOR)}")
        if self.labels is None:
            labels = resolve_labels(self.model.name, self.model.labels)
            object.__setattr__(self, "labels", labels)

    @property
    def model_labels(self) -> ModelLabels:
        assert self.labels is not None  # set in __post_init__
        return self.labels

    def fingerprint(self) -> str:
        """What decides a scan's outputs: model, inference, cluster, region and label
        settings (a PVS-only model's labels add nothing, so its fingerprint stays what
        it was before labels were read)."""
        parts = [
            self.model.fingerprint,
            self.inference.fingerprint(),
            json.dumps(asdict(self.pvs_rules), sort_keys=True),
            self.regions.fingerprint(),
        ]
        if not self.model_labels.is_binary:
            parts.append(self.model_labels.fingerprint())
        if self.atlas_for != "none":
            parts.append(f"atlas:{self.atlas_for}:{self.atlas.fingerprint()}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def uses_atlas(self, scan: Scan) -> bool:
        """Whether this scan's regions come from the atlas rather than its parcellation."""
        return self.atlas_for == "all" or (self.atlas_for == "missing" and not scan.parcellation)

    def region_source(self, scan: Scan) -> str:
        """Where this scan's regions come from: the parcellation's table, the atlas
        ("atlas"), the model's region-specific labels ("model"), or "none"."""
        if self.uses_atlas(scan):
            return ATLAS_REGION_SOURCE
        source = region_source(scan, self.regions.name)
        if source == NO_REGION_SOURCE and self.model_labels.region_table() is not None:
            return MODEL_REGION_SOURCE
        return source


@dataclass
class Source:
    """What preprocess learnt about the scan's files, for finish (no second read)."""

    info: ImageInfo  # the first channel's grid on the model's orientation
    regions: Regions | None  # on that grid
    input_fingerprint: str  # of the files as they were read
    picture: qc.QCImage | None = None  # with --qc: the first channel, 8-bit, for finish
    turn: Reorientation = field(kw_only=True)  # stored grid <-> model's orientation
    stored_affine: np.ndarray = field(kw_only=True)  # the mask is written on the stored grid
    facts: ScanFacts | None = field(default=None, kw_only=True)


@dataclass
class Preprocessed:
    scan_id: str
    case: PreparedScan  # the model's prepared input and where it lies in the scan
    source: Source
    seconds: float
    worker: str


@dataclass
class Predicted:
    scan_id: str
    labels: np.ndarray  # uint8 label map as the model made it (nnU-Net: the cropped head)
    geometry: Any  # where it lies in the scan (the model's, for restore)
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
                    name, worker_name(), type(error).__name__, str(error), verdict_of(error)
                ) from error

        return run  # type: ignore[return-value]

    return wrap


@stage("preprocess")
def preprocess(scan: Scan, pipeline: Pipeline) -> Preprocessed:
    """Check the scan's images, bring them to the model's orientation, then the model's
    preprocessing of the voxels read.

    Every channel is read in full first (check_image_data): nnU-Net would accept a
    truncated file, NaN voxels or an empty image without a word. The pre-flight checks
    (inputs/checks.py) then refuse or flag images that do not look like their channel
    or do not line up with their parcellation, before the GPU stage. The voxels are
    then permuted and flipped onto the model's orientation (inputs/orientation.py), so
    a scan's figures do not depend on how its file is stored; those voxels are what
    nnU-Net preprocesses (no second read). The parcellation is brought onto the image
    grid here too, so that an unusable one fails the scan without taking a slot.
    """
    started = time.perf_counter()
    model = pipeline.model
    atlas = pipeline.uses_atlas(scan)
    checked = check_inputs(
        scan, model.channels, pipeline.checks, pipeline.strict, parcellation=not atlas
    )
    stored, voxels, labels, findings = (checked.stored, checked.voxels, checked.labels,
                                        checked.findings)  # fmt: skip
    if atlas:
        labels = atlas_labels(scan, checked, pipeline)
    regions = None
    if labels is not None:
        regions = regions_from_labels(labels, pipeline.regions, pipeline.pvs_rules)
        del labels
    turn = Reorientation.for_image(stored.affine, stored.shape, pipeline.inference.orientation)
    info = ImageInfo(
        path=stored.path,
        shape=turn.target_shape,
        spacing=turn.target_spacing(stored.spacing),
        affine=turn.target_affine(stored.affine),
        dtype=stored.dtype,
    )
    images = [turn.to_target(voxels[scan.channel(column)]) for column in model.channels]
    source = Source(
        info,
        reoriented_regions(regions, turn),
        input_fingerprint(scan),
        qc.qc_image(images[0], info.affine) if pipeline.qc else None,
        turn=turn,
        stored_affine=stored.affine,
        facts=ScanFacts(
            stored_orientation=turn.stored,
            voxel_size_mm=(stored.spacing[0], stored.spacing[1], stored.spacing[2]),
            flags=tuple(finding.check for finding in findings.flags),
            flag_messages=tuple(f"{f.check}: {f.message}" for f in findings.flags),
            region_source=pipeline.region_source(scan),
            brain_rule=regions is not None and pipeline.pvs_rules.drops_outside_brain,
            icv_mm3=intracranial_volume(regions, voxel_volume(stored.affine)),
        ),
    )
    paths = [scan.channel(column) for column in model.channels]
    case = model.prepare(ScanImages(images, info.spacing[:3], paths), pipeline.inference)
    seconds = time.perf_counter() - started
    return Preprocessed(scan.scan_id, case, source, seconds, worker_name())


@dataclass
class CheckedInputs:
    """A scan's images read in full and checked, before anything is made of them."""

    stored: ImageInfo  # the first channel's grid as stored
    voxels: dict[Path, np.ndarray]  # every channel's voxels, by path
    labels: np.ndarray | None  # the parcellation on that grid, if the scan has one
    findings: CheckOutcome  # the pre-flight checks' flags (failures have been raised)


def check_inputs(
    scan: Scan,
    channels: tuple[str, ...],
    checks: CheckThresholds,
    strict: bool,
    parcellation: bool = True,
) -> CheckedInputs:
    """Read every channel in full and run the pre-flight checks (run's and train's).

    Every channel is read whole (check_image_data): nnU-Net would accept a truncated
    file, NaN voxels or an empty image without a word. The parcellation comes onto the
    image grid, so that an unusable one fails the scan here (`parcellation` False:
    it is not used, e.g. regions come from the atlas). Raises the scan's input error
    (never retried); flags are returned (with `strict`, they fail it too).
    """
    first = scan.channel(channels[0])
    infos: dict[Path, ImageInfo] = {}
    voxels: dict[Path, np.ndarray] = {}
    for path in scan.channel_paths:
        infos[path], voxels[path] = check_image_data(path)
    if mismatch := channel_grid_mismatch(scan, infos):
        raise InputError(mismatch)
    stored = infos[first]
    labels = None
    if scan.parcellation is not None and parcellation:
        labels = parcellation_on_grid(scan.parcellation, stored.shape, stored.affine)
    findings = CheckOutcome.combine(
        [
            preflight(
                voxels[scan.channel(column)],
                stored.affine,
                stored.spacing[:3],
                labels if column == channels[0] else None,
                checks,
                channel=column,
            )
            for column in channels
        ],
        prefixes=channels,
    )
    if strict:
        findings = findings.strict()
    findings.raise_failures(f"scan {scan.scan_id!r}")
    return CheckedInputs(stored, voxels, labels, findings)


ATLAS_CHANNEL = "t1w"


def atlas_labels(scan: Scan, checked: CheckedInputs, pipeline: Pipeline) -> np.ndarray:
    """The atlas's aseg-numbered labels on the scan's stored grid, registered to its
    T1w on this CPU worker (no inference slot is held). RegionError (an input error:
    the scan fails with the reason, never retried) when registration clearly failed."""
    if ATLAS_CHANNEL not in pipeline.model.channels:
        raise InputError(
            f"scan {scan.scan_id!r}: atlas regions need a T1w channel; the model's "
            f"channels are {', '.join(pipeline.model.channels)}"
        )
    t1 = checked.voxels[scan.channel(ATLAS_CHANNEL)]
    threads = _torch_threads(pipeline.inference)
    return atlas_parcellation(t1, checked.stored.affine, pipeline.atlas, threads=threads)


def reoriented_regions(regions: Regions | None, turn: Reorientation) -> Regions | None:
    """A scan's regions (made on its stored grid) on the model's orientation: the same
    permutation and flips as the image, so no label is resampled."""
    if regions is None or turn.is_identity:
        return regions

    def moved(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else turn.to_target(array)

    codes = turn.to_target(regions.codes)
    return replace(
        regions, codes=codes, excluded=moved(regions.excluded), brain=moved(regions.brain)
    )


@stage("predict")
def predict(item: Preprocessed, pipeline: Pipeline) -> Predicted:
    """The label map from the model on this worker's slot (one scan at a time per
    worker; nnU-Net: resampling, network and export all on the predictor's device)."""
    started = time.perf_counter()
    worker = _this_worker()
    slot = worker_slot(worker.name) if worker else 0
    _set_torch_threads(pipeline.inference)
    labels = pipeline.model.predict(item.case, pipeline.inference, slot)
    return Predicted(
        item.scan_id,
        labels,
        item.case.geometry,
        item.source,
        {"preprocess": item.seconds, "predict": time.perf_counter() - started},
        {"preprocess": item.worker, "predict": worker_name()},
    )


@stage("finish")
def finish(item: Predicted, scan: Scan, pipeline: Pipeline, nifti_name: str | None) -> ScanResult:
    """Label map -> mask -> clusters, regions, metrics; store the mask on the stored grid.

    The analysis runs on the model's orientation (so cluster numbers, like every
    figure, do not depend on how the file is stored); the mask and the cluster image
    are put back onto the scan's stored grid, exactly, before they are written.
    Returns the scan's result: counts, timings and its table rows (Arrow tables of a
    few hundred rows at most), which the driver writes.
    """
    started = time.perf_counter()
    source = item.source
    info = source.info
    raw = pipeline.model.restore(item.labels, item.geometry, info.shape[:3])
    analysis = analyse_mask(
        raw,
        info.affine,
        scan,
        source.regions,
        pipeline.pvs_rules,
        pipeline.regions,
        pipeline.model_labels,
        source.facts.region_source if source.facts else None,
    )
    turn = source.turn
    mask = turn.to_stored(analysis.mask)
    attrs = {
        "model_fingerprint": pipeline.model.fingerprint,
        "pipeline_fingerprint": pipeline.fingerprint(),
        "input_fingerprint": source.input_fingerprint,
        "stored_orientation": turn.stored,
        "network_orientation": turn.target,
        "labels": pipeline.model_labels.record(),
    }
    structures = None if analysis.structures is None else turn.to_stored(analysis.structures)
    result = ScanResult.counted(
        scan.scan_id,
        analysis.counts,
        input_fingerprint=source.input_fingerprint,
        facts=source.facts,
        mask=masks.write_mask(
            pipeline.out, scan.scan_id, mask, source.stored_affine, attrs, structures
        ),
        tables=tables.scan_tables(analysis.rows),
    )
    if pipeline.write_nifti and nifti_name:
        written = derivatives.write_nifti_outputs(
            Path(pipeline.out),
            nifti_name,
            mask,
            turn.to_stored(analysis.labels),
            source.stored_affine,
            mask_sidecar(pipeline, source),
            sources=[str(path) for path in scan.channel_paths],
            structures=structures,
            structure_labels=dict(pipeline.model_labels.others),
        )
        result.nifti = written["mask"]
    if source.picture is not None:
        parcels = source.regions.codes if source.regions is not None else None
        sheet = qc.scan_montage(scan, analysis, source.picture, parcels, pipeline.regions.names)
        result.qc = str(qc.write_png(pipeline.out, scan.scan_id, sheet))
    result.seconds = dict(item.seconds, finish=time.perf_counter() - started)
    result.workers = dict(item.workers, finish=worker_name())
    return result


def mask_sidecar(pipeline: Pipeline, source: Source) -> dict[str, Any]:
    """What a mask's JSON sidecar says of how it was made: model, settings, region
    source, pre-flight flags, orientation."""
    facts = source.facts
    return {
        "Model": pipeline.model.facts(),
        "PipelineFingerprint": pipeline.fingerprint(),
        "Inference": asdict(pipeline.inference),
        "PvsClusterRules": asdict(pipeline.pvs_rules),
        "RegionTable": pipeline.regions.name,
        "Labels": pipeline.model_labels.record(),
        "RegionSource": facts.region_source if facts else None,
        "BrainRule": facts.brain_rule if facts else None,
        "Flags": list(facts.flag_messages) if facts else [],
        "StoredOrientation": source.turn.stored,
        "NetworkOrientation": source.turn.target,
    }
