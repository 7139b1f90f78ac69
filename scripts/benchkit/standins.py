"""A stand-in model for the runner's tests and benchmarks: **not a model**.

`StandInModel` is one implementation of the model seam (records.SegmentationModel),
nnU-Net's (nnunet/engine.py) being the other: the real stages run around it, so a
stand-in run keeps the real input reads and checks, orientation, analysis, mask and
table writes; only the network is missing (its label map is empty). Scans are tiny
real NIfTI images (`make_scans`), so a run of forty takes seconds on a real
LocalCluster, and the runner's window, retries, time limits, circuit breaker and
Parquet flushes run for real. Behaviour is steered per scan by files in the model's
`controls` folder (the test or benchmark writes them); each scan's image is named
after it, which is how the model knows which scan it holds. The one set of stand-ins:
tests (pytest's pythonpath has scripts/) and benchmarks (bench_scale, bench_dashboard,
bench_feed) import this module; tests ship it to the workers by value
(cloudpickle.register_pickle_by_value).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import numpy as np
from distributed import Client

from pingu_dask.config import InferenceSettings
from pingu_dask.errors import ModelError
from pingu_dask.inputs.checks import CheckThresholds
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output.files import save_nifti
from pingu_dask.records import ScanImages
from pingu_dask.run.local import local_cluster
from pingu_dask.run.stages import Pipeline

#: The stand-in scans' grid: small, 2 mm voxels (the pre-flight checks are off, see
#: pipeline_in: a 24 mm head is no head).
SHAPE = (12, 12, 12)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
#: Every verdict of the pre-flight checks off: the stand-in images are noise.
NO_CHECKS = CheckThresholds(**{item.name: None for item in fields(CheckThresholds)})


def first_time(marker: Path) -> bool:
    """True for the first caller only, across processes: it makes `marker` atomically
    (O_EXCL), so a fault injected "once" fails one attempt whichever worker retries."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def scan_of(path: Path) -> str:
    """The scan id a stand-in image is named after (`<scan_id>_T1w.nii.gz`)."""
    return Path(path).name.split("_T1w")[0]


@dataclass(frozen=True)
class StandInCase:
    """What StandInModel.prepare hands to predict: the scan's id and grid."""

    scan_id: str
    shape: tuple[int, ...]

    @property
    def geometry(self) -> StandInCase:
        return self


@dataclass(frozen=True)
class StandInModel:
    """The model seam without a network: an empty label map, steered by control files
    in `controls` (see the methods). Small and picklable, as the seam asks."""

    controls: Path
    name: str = "stand-in"
    channels: tuple[str, ...] = ("t1w",)
    labels: tuple[tuple[str, int], ...] = (("background", 0), ("pvs", 1))
    fingerprint: str = "stand-in-0001"

    @property
    def folder(self) -> Path:
        return self.controls

    def facts(self) -> dict[str, object]:
        return {"name": self.name, "fingerprint": self.fingerprint, "stand_in": True}

    def check(self) -> None:
        """Nothing to load."""

    def _control(self, name: str) -> Path:
        return self.controls / name

    def _listed(self, name: str, scan_id: str) -> bool:
        path = self._control(name)
        return path.exists() and scan_id in path.read_text().split()

    def _first_attempt(self, what: str, scan_id: str) -> bool:
        """True once per (what, scan), whichever worker asks."""
        return first_time(self._control(f".{what}-{scan_id}"))

    def _sleep(self, name: str) -> None:
        if self._control(name).exists():
            time.sleep(float(self._control(name).read_text()))

    def prepare(self, scan: ScanImages, inference: InferenceSettings) -> StandInCase:
        """`preprocess-sleep`: seconds per scan."""
        self._sleep("preprocess-sleep")
        return StandInCase(scan_of(scan.paths[0]), tuple(scan.images[0].shape))

    def predict(self, prepared: Any, inference: InferenceSettings, slot: int) -> np.ndarray:
        """Steered by control files: `sleep` (seconds per scan), `broken-model` (every
        scan fails as a checkpoint that cannot load would), `io-once` (listed scans
        fail their first attempt with an I/O error), `type-error` (listed scans: a
        programming error), `hang-once` (listed scans hang on their first attempt: a
        stand-in for a stuck read)."""
        scan_id = prepared.scan_id
        if self._control("broken-model").exists():
            raise ModelError("cannot load the checkpoint fold_0/checkpoint_final.pth: bad zip")
        if self._listed("io-once", scan_id) and self._first_attempt("io", scan_id):
            raise OSError(f"injected I/O error reading {scan_id}")
        if self._listed("type-error", scan_id):
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        if self._listed("hang-once", scan_id) and self._first_attempt("hang", scan_id):
            time.sleep(300)
        self._sleep("sleep")
        return np.zeros(prepared.shape, np.uint8)

    def restore(self, labels: np.ndarray, geometry: Any, shape: tuple[int, ...]) -> np.ndarray:
        """`hold`: listed scans wait (up to 60 s) until the file `release` exists;
        `finish-sleep`: seconds per scan (restore runs in the finish stage)."""
        self._sleep("finish-sleep")
        if self._listed("hold", geometry.scan_id):
            deadline = time.monotonic() + 60
            while not self._control("release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return labels


def stand_in_image(folder: Path, scan_id: str) -> Path:
    """The scan's image: a link named after it to one tiny noise image in `folder`."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    shared = images / "noise.nii.gz"
    if not shared.exists():
        noise = np.random.default_rng(0).uniform(10, 100, SHAPE).astype(np.float32)
        save_nifti(shared, noise, AFFINE)
    link = images / f"{scan_id}_T1w.nii.gz"
    if not link.exists():
        link.symlink_to(shared.name)
    return link


def new_image(scan: Scan, seed: int = 1) -> None:
    """Replace the scan's image by a file of its own with other voxels (a new input)."""
    path = scan.channel("t1w")
    path.unlink()
    noise = np.random.default_rng(seed).uniform(10, 100, SHAPE).astype(np.float32)
    save_nifti(path, noise, AFFINE)


def make_scans(n: int, folder: Path) -> list[Scan]:
    """`n` stand-in scans, sub-000..., each with its own (linked) tiny image."""
    return [
        Scan(f"sub-{i:03d}", (("t1w", stand_in_image(folder, f"sub-{i:03d}")),), site="site-a")
        for i in range(n)
    ]


def pipeline_in(folder: Path, **given: Any) -> Pipeline:
    """A pipeline of the stand-in model writing to folder/out, its control files in
    folder, the pre-flight checks off (anything else in `given`)."""
    settings = InferenceSettings(tta=False, device="cpu")
    pipeline = Pipeline(StandInModel(folder), settings, folder / "out", write_nifti=False,
                        checks=NO_CHECKS)  # fmt: skip
    return replace(pipeline, **given) if given else pipeline


@contextmanager
def client_for_stand_ins(
    n_workers: int, threads_per_worker: int, *by_value: ModuleType
) -> Iterator[Client]:
    """A client on a LocalCluster of separate worker processes that can run these
    stages (this module, and any test module in `by_value`, pickled by value: the
    workers cannot import test modules)."""
    for module in (sys.modules[__name__], *by_value):
        cloudpickle.register_pickle_by_value(module)
    with (
        local_cluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                      torch_threads=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        yield client
