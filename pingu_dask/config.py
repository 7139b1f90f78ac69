"""Settings: one home for everything a run can be told.

Values come from the command line (or a caller), falling back to Dask's own config
system under a `pingu` section (e.g. `~/.config/dask/pingu.yaml`, or the environment
variable DASK_PINGU__CACHE_DIR): one file format that a lab already uses for
dask-jobqueue. The defaults, each with what it does, ship as pingu.yaml beside this
module and are copied, commented out, to the user's Dask config folder on first use
(as dask-jobqueue ships jobqueue.yaml). No other module reads environment variables
or config files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask.config
import yaml

#: The shipped defaults: pingu.yaml beside this module, commented, as dask-jobqueue
#: ships jobqueue.yaml (the one list of every setting, with what each does).
DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "pingu.yaml")


def _load_defaults() -> dict[str, dict[str, Any]]:
    """Register pingu.yaml as defaults of Dask's config and copy it, commented out, to
    the user's Dask config folder (if it is not there yet, and where that folder can be
    written), where its lines are there to be uncommented."""
    with open(DEFAULTS_FILE) as file:
        defaults = yaml.safe_load(file)
    dask.config.update_defaults(defaults)
    dask.config.ensure_file(source=DEFAULTS_FILE, comment=True)
    return defaults


DEFAULTS: dict[str, dict[str, Any]] = _load_defaults()
_DEFAULT = DEFAULTS["pingu"]  # the dataclasses' defaults are these values, not copies

#: The Dask worker resource that stands for an inference slot (a GPU, or on a CPU-only
#: machine the cores torch predicts with): predict tasks ask for one.
INFERENCE_RESOURCE = "GPU"


def setting(key: str):
    """A value of the `pingu` section of Dask's config, e.g. setting('step-size')."""
    return dask.config.get(f"pingu.{key}")


def setting_flag(key: str) -> bool:
    """A yes/no setting, e.g. setting_flag('batch-tls'). Dask reads an environment
    variable's value as a Python literal (DASK_PINGU__BATCH_TLS=False), and keeps what
    is not one as text: 'false', 'no', 'off' and '0' are taken as no, not as a
    non-empty (true) string."""
    value = setting(key)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("false", "no", "off", "0", ""):
            return False
        if text in ("true", "yes", "on", "1"):
            return True
        raise ValueError(f"pingu.{key} must be true or false, got {value!r}")
    return bool(value)


def cache_dir() -> Path:
    """Where unpacked model zips live (shared by runs; safe to delete)."""
    configured = setting("cache-dir")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pingu-dask"


@dataclass(frozen=True)
class InferenceSettings:
    """How the nnU-Net predictor runs. Hashable: it keys the per-worker model cache.

    `tta` is nnU-Net's mirroring test-time augmentation (on by default in nnU-Net,
    ~8x the network cost in 3D). `torch_threads` None means: the cores of the worker
    divided by its inference slots, set by the worker itself (Dask's nanny sets
    OMP/MKL threads to 1, which would otherwise leave CPU inference on one core).
    """

    folds: tuple[str, ...] | None = None  # None: every fold the model folder has
    checkpoint: str = _DEFAULT["checkpoint"]
    tta: bool = _DEFAULT["tta"]
    step_size: float = _DEFAULT["step-size"]
    device: str = _DEFAULT["device"]  # auto | cpu | cuda | cuda:N
    torch_threads: int | None = None
    orientation: str = _DEFAULT["orientation"]  # axis codes (RAS, LPS, ...) or "stored"

    @classmethod
    def from_config(cls, **overrides) -> InferenceSettings:
        """Settings from Dask's `pingu` config, with explicit (non-None) overrides on top."""
        base: dict[str, Any] = {
            "checkpoint": setting("checkpoint"),
            "tta": bool(setting("tta")),
            "step_size": float(setting("step-size")),
            "device": str(setting("device")),
            "orientation": str(setting("orientation")),
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        if base.get("folds") is not None:
            base["folds"] = tuple(str(f) for f in base["folds"])
        return cls(**base)

    def __post_init__(self) -> None:
        if not 0.0 < self.step_size <= 1.0:
            raise ValueError(f"step size must be in (0, 1], got {self.step_size}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch threads must be at least 1")
        object.__setattr__(self, "orientation", check_orientation(self.orientation))

    def fingerprint(self) -> str:
        """Short hash of the settings that change the masks (for provenance)."""
        relevant = {k: v for k, v in asdict(self).items() if k not in ("device", "torch_threads")}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


AS_STORED = "stored"  # the orientation setting that turns reorienting off
_AXIS_OF_CODE = {"L": "x", "R": "x", "P": "y", "A": "y", "I": "z", "S": "z"}


def check_orientation(value: str) -> str:
    """A valid orientation setting: three axis codes (RAS, LPS, LIA, ...) or 'stored'."""
    text = str(value).strip()
    if text.lower() == AS_STORED:
        return AS_STORED
    codes = text.upper()
    axes = {_AXIS_OF_CODE.get(code) for code in codes}
    if len(codes) != 3 or None in axes or len(axes) != 3:
        raise ValueError(
            f"orientation {value!r} is not three axis codes such as RAS, LPS or LIA "
            f"(one of L/R, one of P/A, one of I/S), nor {AS_STORED!r}"
        )
    return codes


@dataclass(frozen=True)
class PvsClusterRules:
    """How a predicted mask becomes PVS clusters; shared by the pipeline and evaluation.

    `min_voxels` 6 drops clusters of 5 voxels or fewer (SHiVAi's default);
    `min_volume_mm3` drops clusters below a physical volume as well (0: off), which
    keeps the rule fair across sites with different voxel sizes. `exclude_labels` are
    parcellation labels whose voxels are removed from the mask before clustering
    (e.g. lateral ventricles 4, 43); they need a parcellation. `max_outside_brain`
    drops clusters with more than that share of their voxels outside the brain
    (parcellation label 0; SHiVAi drops those > 25 % outside its brain mask): a
    prediction on the skull, eyes or neck is not a PVS. It needs a parcellation too;
    None or 1.0 turns it off and is kept as 1.0, so both give the same fingerprint.
    `filter_reference` is for evaluation only: whether the reference mask goes through
    the same exclusions and size filter before it is compared (off: the reference is
    ground truth as given, as the PINGU paper and nnU-Net compare). It is part of the
    run's fingerprint, since it changes the evaluation table.
    """

    connectivity: int = _DEFAULT["connectivity"]
    min_voxels: int = _DEFAULT["min-cluster-voxels"]
    min_volume_mm3: float = _DEFAULT["min-cluster-mm3"]
    exclude_labels: tuple[int, ...] = ()
    max_outside_brain: float | None = _DEFAULT["max-outside-brain"]
    filter_reference: bool = _DEFAULT["filter-reference"]

    @classmethod
    def from_config(cls, **overrides) -> PvsClusterRules:
        """Settings from Dask's `pingu` config, with explicit (non-None) overrides on top."""
        base: dict[str, Any] = {
            "connectivity": int(setting("connectivity")),
            "min_voxels": int(setting("min-cluster-voxels")),
            "min_volume_mm3": float(setting("min-cluster-mm3")),
            "exclude_labels": setting("exclude-labels"),
            "max_outside_brain": setting("max-outside-brain"),
            "filter_reference": bool(setting("filter-reference")),
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        base["exclude_labels"] = tuple(sorted({int(label) for label in base["exclude_labels"]}))
        return cls(**base)

    def __post_init__(self) -> None:
        if self.connectivity not in (6, 18, 26):
            raise ValueError(f"connectivity must be 6, 18 or 26, got {self.connectivity}")
        if self.min_voxels < 1 or self.min_volume_mm3 < 0:
            raise ValueError("minimum cluster size must be >= 1 voxel and >= 0 mm³")
        share = 1.0 if self.max_outside_brain is None else float(self.max_outside_brain)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"max share outside the brain must be in [0, 1], got {share}")
        object.__setattr__(self, "max_outside_brain", share)  # frozen: normalise once

    @property
    def drops_outside_brain(self) -> bool:
        """Whether the brain rule can drop anything (a share of 1.0 never exceeds it)."""
        return self.max_outside_brain is not None and self.max_outside_brain < 1.0

    def min_voxels_for(self, voxel_volume_mm3: float) -> int:
        """The size rule in voxels for one scan: the stricter of the voxel and mm³ rules."""
        by_volume = math.ceil(self.min_volume_mm3 / voxel_volume_mm3 - 1e-9)
        return max(self.min_voxels, by_volume, 1)


def worker_threads() -> int:
    """Threads one worker process may use for torch and numpy work.

    pingu.worker-threads is set where the worker is started: by local_cluster (cores of
    this machine / local workers) and by a batch job's script (cores of that job /
    worker processes), so a worker in an 8-core job uses 8 threads whatever the
    driver's own job has. Without it (a scheduler started by hand): all cores here.
    """
    return int(setting("worker-threads") or available_cores())


def available_cores() -> int:
    """CPU cores this process may use (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
