"""Pre-flight checks of one scan, on the CPU before any GPU time.

nnU-Net takes whatever it is given: a parcellation given as the T1w gives an empty
mask (a believable 0 PVS), and a T1w whose header is turned against its parcellation
gives clusters in the wrong regions. In a cohort of 10,000 nobody looks at each scan,
so each scan is measured here and every check gives one of two verdicts:

- a **failure**: the scan is not run, and the reason (the measured value and the bound)
  is recorded;
- a **flag**: the scan is run, and the flag is kept beside its results.
  `CheckOutcome.strict()` (``--strict``) turns flags into failures.

The checks (bounds in pingu.config DEFAULTS, keys ``check-*``; None turns one off):

- ``label_map``: an image whose values are all integers, with few distinct values or
  with most neighbouring voxels equal, is a label map (a parcellation or mask given as
  the image): failure. (An empty image or NaN voxels are refused before this, by
  inputs.imaging.check_image_data.)
- ``intensity_spread``: nearly every voxel the same value (failure), or the head's
  intensities within a few per cent of each other (flag).
- ``voxel_size`` and ``field_of_view``: per array axis, within stated bounds (flag
  outside the inner pair, failure outside the outer pair).
- ``alignment``: the share of the parcellation's brain (labels > 0) that lies in the
  image's head foreground (failure or flag below bounds): a parcellation of another
  field of view or subject.
- ``orientation``: how much better the parcellation's labels explain the image's
  intensities as stored than turned by any of the 23 other right-angle orientations
  (a ratio; < 1: another orientation fits better, which is what a wrong header gives).
  Why not only ``alignment``: a head is larger than its brain, so a brain turned by
  90 degrees inside it mostly stays in the head (measured: Colin27 turned, 98-100 % of
  its brain still inside). The fit is the share of the intensities' information
  (entropy) that the labels explain, their mutual information over the intensity
  entropy: contrast-agnostic (T1w, T2w, FLAIR alike), and the ratio of two fits needs
  no scale of its own. It needs tissue labels (two or more brain labels, as SynthSeg
  and aseg have); with a brain mask alone it does not run (a mask turned inside a
  symmetric synthetic head fits as well as the mask as stored).

Calibration (the defaults; tests/test_checks.py holds them to it): on Colin27 (1, 0.8,
0.5 mm, 0.9 x 0.9 x 3 mm slices), MNI152 and every synthetic site (T1w and T2w) no check
fails or flags. Measured there: equal neighbours <= 0.23 (label maps >= 0.68, AAL,
AICHA, JHU, Harvard-Oxford and the synthetic parcellations included); one value <= 79 %
of voxels; contrast >= 0.94; brain in head >= 0.96 (1.00 on every synthetic scan);
orientation margin >= 1.16 (synthetic heads: nearly symmetric ellipsoids, the hard
case) and >= 1.79 on real heads. Turned 90 degrees (three axis swaps with a flip, and
stored LSP), every synthetic scan and real head with tissue labels has a margin <= 0.98
(stored LSP <= 0.77).

Everything runs on a block-averaged copy (~3 mm voxels) and strided samples of the
full grid, so that a 0.5 mm scan costs a fraction of a second (measured: 0.14 and
0.18 core-seconds for Colin27 at 1 and 0.5 mm; scripts/bench_preflight.py).
Pure numpy/scipy: the caller passes voxels, affine, spacing and the parcellation's
labels already on the image grid (analysis.regions.parcellation_on_grid).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage

from pingu_dask.config import DEFAULTS, setting
from pingu_dask.errors import InputError

#: Voxel size of the block-averaged copy the head and orientation measures use (mm).
COARSE_MM = 3.0
#: Intensity bins (quantiles of the head's block means) of the orientation fit, and
#: the most head voxels it reads (every k-th beyond: a histogram needs no more).
INTENSITY_BINS = 32
FIT_POINTS = 40_000
#: Most voxels in the strided sample the value measures (label map, spread) read.
SAMPLE_VOXELS = 2_000_000
#: The head foreground: block means above this share of their 99th percentile.
HEAD_FRACTION = 0.1
#: Right-angle turns of the world axes (signed permutation matrices, det +1), identity
#: first: the orientations a header with swapped or flipped axes can give a scan.
TURNS: tuple[np.ndarray, ...] = tuple(
    sorted(
        (
            matrix
            for matrix in (
                np.array(entries, dtype=np.float64).reshape(3, 3)
                for entries in itertools.product((-1, 0, 1), repeat=9)
            )
            if (np.abs(matrix).sum(axis=0) == 1).all()
            and (np.abs(matrix).sum(axis=1) == 1).all()
            and round(float(np.linalg.det(matrix))) == 1
        ),
        key=lambda matrix: not np.array_equal(matrix, np.eye(3)),
    )
)
_WORLD_AXES = ("left-right", "posterior-anterior", "inferior-superior")


class PreflightError(InputError):
    """A scan failed its pre-flight checks: an input error (the same files fail the
    same way, so the scan is not retried); the message names the scan and lists every
    failure with its measured value and bound."""

    def __init__(self, scan_id: str, outcome: CheckOutcome) -> None:
        super().__init__(f"{scan_id}: pre-flight checks failed: {outcome.reason}")
        self.scan_id = scan_id
        self.outcome = outcome

    def __reduce__(self):  # picklable across Dask's workers with its two arguments
        return (type(self), (self.scan_id, self.outcome))


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict in plain words: `check` is a short name for tables
    (label_map, intensity_spread, voxel_size, field_of_view, alignment, orientation),
    `message` says what was measured and the bound it was held to."""

    check: str
    message: str


@dataclass(frozen=True)
class CheckOutcome:
    """What the checks found for one image: failures (the scan is not run), flags (the
    scan is run and the flags are kept), and the measured values by name (for the
    scans table; a check that did not run has none)."""

    failures: tuple[Finding, ...] = ()
    flags: tuple[Finding, ...] = ()
    measures: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def ok(self) -> bool:
        """True when nothing failed (flags may be there)."""
        return not self.failures

    @property
    def flag_names(self) -> str:
        """The flags' check names, ';'-joined (empty when none): a table column."""
        return ";".join(finding.check for finding in self.flags)

    @property
    def failure_names(self) -> str:
        """The failures' check names, ';'-joined (empty when none)."""
        return ";".join(finding.check for finding in self.failures)

    @property
    def reason(self) -> str:
        """Every failure's message, '; '-joined (empty when none): the recorded reason."""
        return "; ".join(f"{finding.check}: {finding.message}" for finding in self.failures)

    def strict(self) -> CheckOutcome:
        """The outcome under --strict: every flag is a failure too."""
        return CheckOutcome(self.failures + self.flags, (), dict(self.measures))

    def raise_failures(self, scan_id: str) -> None:
        """Raise PreflightError naming the scan when anything failed."""
        if self.failures:
            raise PreflightError(scan_id, self)

    @classmethod
    def combine(
        cls, outcomes: Iterable[CheckOutcome], prefixes: Sequence[str] = ()
    ) -> CheckOutcome:
        """One outcome of several (e.g. one per channel). Measures are kept under
        `prefix.name` where prefixes are given (one per outcome), else by name."""
        failures: list[Finding] = []
        flags: list[Finding] = []
        measures: dict[str, float] = {}
        for index, outcome in enumerate(outcomes):
            failures += outcome.failures
            flags += outcome.flags
            prefix = f"{prefixes[index]}." if index < len(prefixes) else ""
            measures.update({prefix + key: value for key, value in outcome.measures.items()})
        return cls(tuple(failures), tuple(flags), measures)


Bounds = tuple[float, float] | None


_DEFAULT = DEFAULTS["pingu"]  # the thresholds' defaults are config's values, not copies


def _default_bounds(key: str) -> Bounds:
    """A (low, high) default from config (a list there, as YAML gives it)."""
    value = _DEFAULT[key]
    return None if value is None else (float(value[0]), float(value[1]))


_BOUNDS = {
    key: _default_bounds(key)
    for key in (
        "check-voxel-mm-flag",
        "check-voxel-mm-fail",
        "check-fov-mm-flag",
        "check-fov-mm-fail",
    )
}


@dataclass(frozen=True)
class CheckThresholds:
    """The bounds each check holds an image to; None turns that verdict off.

    Calibrated (see the module docstring) so that Colin27 (1, 0.8, 0.5 mm, 3 mm
    slices), MNI152 and every synthetic site pass with no flag, and that a
    parcellation given as the T1w and a T1w whose header is turned 90 degrees against
    its parcellation fail.
    """

    #: label_map: an all-integer image with fewer distinct values is a label map...
    label_map_min_values: int | None = _DEFAULT["check-label-map-min-values"]
    #: ...and so is one where at least this share of neighbouring voxel pairs (outside
    #: the background) are equal (measured: label maps >= 0.68, scans <= 0.23).
    label_map_equal_neighbours: float | None = _DEFAULT["check-label-map-equal-neighbours"]
    #: intensity_spread failure: at least this share of voxels have one value.
    same_value_share: float | None = _DEFAULT["check-same-value-share"]
    #: intensity_spread flag: the head's 5th-95th percentile span over its median.
    min_contrast: float | None = _DEFAULT["check-min-contrast"]
    #: voxel_size (mm, each array axis): flag outside, failure outside.
    voxel_mm_flag: Bounds = _BOUNDS["check-voxel-mm-flag"]
    voxel_mm_fail: Bounds = _BOUNDS["check-voxel-mm-fail"]
    #: field_of_view (mm, each array axis: voxels x spacing): flag outside, failure outside.
    fov_mm_flag: Bounds = _BOUNDS["check-fov-mm-flag"]
    fov_mm_fail: Bounds = _BOUNDS["check-fov-mm-fail"]
    #: alignment: the share of the parcellation's brain inside the head: flag, failure.
    brain_in_head_flag: float | None = _DEFAULT["check-brain-in-head-flag"]
    brain_in_head_fail: float | None = _DEFAULT["check-brain-in-head-fail"]
    #: orientation: fit as stored over the best right-angle turn: flag, failure.
    orientation_flag: float | None = _DEFAULT["check-orientation-flag"]
    orientation_fail: float | None = _DEFAULT["check-orientation-fail"]

    @classmethod
    def from_config(cls, **overrides: Any) -> CheckThresholds:
        """Thresholds from Dask's `pingu` config (keys check-*), explicit ones on top."""
        values: dict[str, Any] = {}
        for item in fields(cls):
            value = setting("check-" + item.name.replace("_", "-"))
            if value is not None and item.name.endswith(("_flag", "_fail")) and "mm" in item.name:
                low, high = (float(bound) for bound in value)
                value = (low, high)
            values[item.name] = value
        values.update(overrides)
        return cls(**values)


def preflight(
    voxels: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    parcellation: np.ndarray | None,
    thresholds: CheckThresholds | None = None,
    channel: str = "image",
) -> CheckOutcome:
    """Check one image (and its parcellation, on the image's grid, if there is one).

    `voxels` as read (check_image_data has refused empty and non-finite ones),
    `affine` the image's voxel-to-world matrix, `spacing` its voxel size per array
    axis in mm, `parcellation` integer labels on the same grid or None (then the
    alignment checks do not run). `channel` names the image in the messages.
    """
    limits = thresholds if thresholds is not None else CheckThresholds.from_config()
    voxels = np.asarray(voxels)
    spacing = tuple(float(size) for size in spacing[:3])
    found = _Found()
    _check_geometry(found, voxels.shape[:3], spacing, limits)
    if _check_label_map(found, voxels, spacing, limits, channel):
        return found.outcome()  # a label map: its spread and fit mean nothing
    factors = tuple(max(1, round(COARSE_MM / size)) for size in spacing)
    coarse = _block_means(voxels, factors)
    head = _head_mask(coarse)
    _check_spread(found, voxels, coarse[head], limits, channel)
    if parcellation is not None:
        if np.shape(parcellation)[:3] != voxels.shape[:3]:
            raise ValueError(
                f"the parcellation's grid {np.shape(parcellation)} is not the {channel}'s "
                f"{voxels.shape}: bring it onto the image grid first (parcellation_on_grid)"
            )
        labels = _block_centres(np.asarray(parcellation), factors)
        coarse_affine = np.asarray(affine, dtype=np.float64).copy()
        coarse_affine[:3, 3] += coarse_affine[:3, :3] @ ((np.asarray(factors) - 1) / 2.0)
        coarse_affine[:3, :3] = coarse_affine[:3, :3] * np.asarray(factors, dtype=np.float64)
        _check_alignment(found, coarse, head, labels, coarse_affine, limits, channel)
    return found.outcome()


@dataclass
class _Found:
    """Findings and measures as the checks add them."""

    failures: list[Finding] = field(default_factory=list)
    flags: list[Finding] = field(default_factory=list)
    measures: dict[str, float] = field(default_factory=dict)

    def outcome(self) -> CheckOutcome:
        return CheckOutcome(tuple(self.failures), tuple(self.flags), self.measures)


# Geometry ------------------------------------------------------------------------------


def _outside(values: Sequence[float], bounds: Bounds) -> list[float]:
    if bounds is None:
        return []
    return [value for value in values if not bounds[0] <= value <= bounds[1]]


def _mm(values: Iterable[float]) -> str:
    return " x ".join(f"{value:.3g}" for value in values)


def _check_geometry(
    found: _Found, shape: tuple[int, ...], spacing: tuple[float, ...], limits: CheckThresholds
) -> None:
    """Voxel size and field of view per array axis against their two pairs of bounds."""
    fov = tuple(n * size for n, size in zip(shape, spacing, strict=True))
    found.measures.update(max_voxel_mm=max(spacing), min_voxel_mm=min(spacing))
    found.measures.update(min_fov_mm=min(fov), max_fov_mm=max(fov))
    for check, values, fail, flag, what in (
        ("voxel_size", spacing, limits.voxel_mm_fail, limits.voxel_mm_flag, "voxel size"),
        ("field_of_view", fov, limits.fov_mm_fail, limits.fov_mm_flag, "field of view"),
    ):
        # The failure bounds first: a value outside them is not flagged as well.
        for verdicts, bounds, usual, why in (
            (found.failures, fail, "", " (a header in other units, or not a head scan?)"),
            (found.flags, flag, "the usual ", ""),
        ):
            if bounds is not None and (wrong := _outside(values, bounds)):
                message = (
                    f"{what} {_mm(values)} mm: {_mm(wrong)} mm is outside {usual}"
                    f"{bounds[0]:g}-{bounds[1]:g} mm{why}"
                )
                verdicts.append(Finding(check, message))
                break


# Label map -----------------------------------------------------------------------------


def _check_label_map(
    found: _Found,
    voxels: np.ndarray,
    spacing: tuple[float, ...],
    limits: CheckThresholds,
    channel: str,
) -> bool:
    """A failure (and True) when the image looks like a label map.

    Read on a sample: full lines along the finest axis, every k-th line across, so
    that neighbouring voxels along that axis are compared. Only an image whose sampled
    values are all integers can be a label map; then it is one when it has few
    distinct values, or when most neighbouring pairs (those not both the minimum,
    i.e. the background) are equal: a scan's noise and partial volume make neighbours
    differ even when it is stored as 8-bit integers.
    """
    if limits.label_map_min_values is None and limits.label_map_equal_neighbours is None:
        return False
    axis = int(np.argmin(spacing))
    lines = np.moveaxis(voxels, axis, 0)
    across = lines.shape[1] * lines.shape[2]
    stride = max(1, math.ceil(math.sqrt(lines.shape[0] * across / SAMPLE_VOXELS)))
    sample = np.asarray(lines[:, ::stride, ::stride], dtype=np.float64)
    if not np.array_equal(sample, np.round(sample)):
        return False
    low, high = float(sample.min()), float(sample.max())
    if high - low < 4_000_000:
        distinct = int(np.count_nonzero(np.bincount((sample - low).astype(np.int64).ravel())))
    else:
        distinct = int(np.unique(sample).size)
    background = (sample[1:] == low) & (sample[:-1] == low)
    pairs = int(np.count_nonzero(~background))
    equal = int(np.count_nonzero((sample[1:] == sample[:-1]) & ~background))
    share = equal / pairs if pairs else 1.0
    found.measures.update(distinct_values=float(distinct), equal_neighbours=share)
    few = limits.label_map_min_values is not None and distinct < limits.label_map_min_values
    flat = (
        limits.label_map_equal_neighbours is not None and share >= limits.label_map_equal_neighbours
    )
    if not (few or flat):
        return False
    bounds = []
    if limits.label_map_min_values is not None:
        bounds.append(f">= {limits.label_map_min_values} distinct values")
    if limits.label_map_equal_neighbours is not None:
        bounds.append(f"< {limits.label_map_equal_neighbours:.0%} equal neighbours")
    found.failures.append(
        Finding(
            "label_map",
            f"the {channel} holds only integers, {distinct} distinct values, and "
            f"{share:.0%} of neighbouring voxels are equal: a label map (a parcellation "
            f"or mask given as the {channel}?); a scan has {' and '.join(bounds)}",
        )
    )
    return True


# Intensities ---------------------------------------------------------------------------


def _check_spread(
    found: _Found,
    voxels: np.ndarray,
    head_values: np.ndarray,
    limits: CheckThresholds,
    channel: str,
) -> None:
    """Nearly one value everywhere (failure), or a head of nearly one intensity (flag).

    The share at one value is that of the median (any value held by over half the
    voxels is the median), on a strided sample. The contrast is the head's 5th-95th
    percentile span over its median, on the block means: T1w and T2w heads span
    about their median or more; a scan of noise around an offset does not.
    """
    stride = max(1, math.ceil((voxels.size / SAMPLE_VOXELS) ** (1 / 3)))
    sample = voxels[::stride, ::stride, ::stride]
    median = float(np.median(sample))
    same = float(np.count_nonzero(sample == median)) / sample.size
    found.measures["same_value_share"] = same
    if limits.same_value_share is not None and same >= limits.same_value_share:
        found.failures.append(
            Finding(
                "intensity_spread",
                f"{same:.1%} of the {channel}'s voxels have the value {median:g}: nearly "
                f"empty; a scan has under {limits.same_value_share:.0%} at one value",
            )
        )
        return
    if head_values.size == 0:
        return
    low, middle, high = np.percentile(head_values, (5, 50, 95))
    contrast = float((high - low) / abs(middle)) if middle else math.inf
    found.measures["contrast"] = contrast
    if limits.min_contrast is not None and contrast < limits.min_contrast:
        found.flags.append(
            Finding(
                "intensity_spread",
                f"low contrast: the {channel}'s head spans {contrast:.1%} of its median "
                f"intensity (5th-95th percentile); a scan spans >= {limits.min_contrast:.0%}",
            )
        )


# Alignment -----------------------------------------------------------------------------


def _check_alignment(
    found: _Found,
    coarse: np.ndarray,
    head: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    limits: CheckThresholds,
    channel: str,
) -> None:
    """The parcellation's brain in the head (alignment), and its labels' fit to the
    intensities as stored against the best right-angle turn (orientation)."""
    brain = labels > 0
    if not brain.any():
        found.failures.append(
            Finding("alignment", f"the parcellation has no brain on the {channel}'s grid")
        )
        return
    near_head = ndimage.binary_dilation(head)  # one coarse voxel: partial volume at edges
    share = float(np.count_nonzero(brain & near_head)) / float(np.count_nonzero(brain))
    found.measures["brain_in_head"] = share
    message = f"{share:.1%} of the parcellation's brain lies in the {channel}'s head foreground"
    if limits.brain_in_head_fail is not None and share < limits.brain_in_head_fail:
        found.failures.append(
            Finding(
                "alignment",
                f"only {message}; an aligned parcellation has >= {limits.brain_in_head_fail:.0%}"
                " (another scan's parcellation, or a wrong header?)",
            )
        )
    elif limits.brain_in_head_flag is not None and share < limits.brain_in_head_flag:
        found.flags.append(
            Finding("alignment", f"{message}; usually >= {limits.brain_in_head_flag:.0%}")
        )
    if limits.orientation_fail is None and limits.orientation_flag is None:
        return
    if not head.any():  # no head to fit the labels to (already an alignment failure)
        return
    if np.unique(labels[brain]).size < 2:  # a brain mask: see the module docstring
        return
    stored, turned, turn = _orientation_fit(coarse, head, labels, affine)
    ratio = stored / turned if turned > 0 else math.inf
    found.measures["orientation_fit"] = stored
    found.measures["orientation_margin"] = ratio
    said = (
        f"the parcellation's labels explain {stored:.2f} of the {channel}'s intensity "
        f"information in the head as stored and {turned:.2f} turned {_describe(turn)}: "
        f"{ratio:.2f} x"
    )
    if limits.orientation_fail is not None and ratio < limits.orientation_fail:
        found.failures.append(
            Finding(
                "orientation",
                f"{said}, under {limits.orientation_fail:g} x: the {channel}'s header "
                "orientation (qform/sform) or the parcellation's is probably wrong",
            )
        )
    elif limits.orientation_flag is not None and ratio < limits.orientation_flag:
        found.flags.append(
            Finding("orientation", f"{said}; usually >= {limits.orientation_flag:g} x")
        )


def _orientation_fit(
    coarse: np.ndarray, head: np.ndarray, labels: np.ndarray, affine: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """(fit as stored, best fit turned, that turn), each fit the share of the head's
    intensity entropy that the labels explain (mutual information / entropy), with
    the labels as stored and turned by each right-angle turn of the world axes.

    A turn pivots about the brain's centre, the head's centre or the grid's centre,
    whichever fits best (a wrong header turns a scan about a point nobody knows), so
    that a misoriented scan finds the turn that undoes it.
    """
    points = np.array(np.nonzero(head), dtype=np.float64)
    if points.shape[1] > FIT_POINTS:  # every k-th head voxel: the fit is a histogram
        points = points[:, :: math.ceil(points.shape[1] / FIT_POINTS)]
    index = tuple(points.astype(np.intp))
    values = coarse[index]
    edges = np.quantile(values, np.linspace(0.0, 1.0, INTENSITY_BINS + 1)[1:-1])
    bins = np.searchsorted(edges, values).astype(np.intp)
    _, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(labels.shape).astype(np.intp)
    n_codes = int(codes.max()) + 2
    flat = np.append(codes.ravel(), n_codes - 1)  # off the grid: a group of its own
    fit = _Fit(bins, n_codes)
    stored = fit(codes[index])
    linear, offset = affine[:3, :3], affine[:3, 3]
    inverse = np.linalg.inv(linear)
    shape = np.array(labels.shape)
    brain_centre = np.array(np.nonzero(labels > 0), dtype=np.float64).mean(axis=1)
    pivots = (  # in world coordinates
        linear @ brain_centre + offset,
        linear @ points.mean(axis=1) + offset,
        linear @ ((shape - 1) / 2.0) + offset,
    )
    best, best_turn = -1.0, TURNS[1]
    for turn in TURNS[1:]:
        # voxel -> world -> turned about the pivot -> voxel: one affine map of indices
        matrix = inverse @ turn.T @ linear
        for pivot in pivots:
            shift = inverse @ (pivot + turn.T @ (offset - pivot) - offset)
            source = np.rint(matrix @ points + shift[:, None]).astype(np.intp)
            inside = ((source >= 0) & (source < shape[:, None])).all(axis=0)
            linear_index = (source[0] * shape[1] + source[1]) * shape[2] + source[2]
            turned = fit(flat[np.where(inside, linear_index, flat.size - 1)])
            if turned > best:
                best, best_turn = turned, turn
    return stored, best, best_turn


class _Fit:
    """The share (0..1) of the entropy of binned intensities that a grouping of the
    same voxels explains: I(groups; bins) / H(bins), the uncertainty coefficient."""

    def __init__(self, bins: np.ndarray, n_groups: int) -> None:
        self.bins = bins
        self.n_bins = int(bins.max()) + 1 if bins.size else 1
        self.n_groups = n_groups
        self.entropy = _entropy(np.bincount(bins, minlength=self.n_bins))

    def __call__(self, groups: np.ndarray) -> float:
        if self.entropy <= 0:
            return 0.0
        joint = np.bincount(groups * self.n_bins + self.bins, minlength=self.n_groups * self.n_bins)
        by_group = joint.reshape(self.n_groups, self.n_bins).sum(axis=1)
        information = self.entropy + _entropy(by_group) - _entropy(joint)
        return max(0.0, information / self.entropy)


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a histogram."""
    used = counts[counts > 0].astype(np.float64)
    if used.size == 0:
        return 0.0
    p = used / used.sum()
    return float(-(p * np.log(p)).sum())


def _describe(turn: np.ndarray) -> str:
    """A right-angle turn in words, e.g. '90 degrees about the left-right axis'."""
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (float(np.trace(turn)) - 1) / 2))))
    if round(angle) == 180:
        symmetric = (turn + np.eye(3)) / 2  # axis a: turn = 2 a a^T - I
        axis = symmetric[:, int(np.argmax(np.diag(symmetric)))]
    else:
        axis = np.array([turn[2, 1] - turn[1, 2], turn[0, 2] - turn[2, 0], turn[1, 0] - turn[0, 1]])
    axis = axis / np.abs(axis).max()
    used = [index for index in range(3) if abs(axis[index]) > 0.5]
    if len(used) == 1:
        return f"{round(angle)} degrees about the {_WORLD_AXES[used[0]]} axis"
    letters = ",".join(f"{'+' if axis[i] > 0 else '-'}{'xyz'[i]}" for i in range(3) if i in used)
    return f"{round(angle)} degrees about the ({letters}) diagonal"


# Coarse copies -------------------------------------------------------------------------


def _block_means(voxels: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Means of `factors`-sized blocks (a partial block at the far edges is left out)."""
    whole = [n // f * f for n, f in zip(voxels.shape[:3], factors, strict=True)]
    if min(whole) == 0:  # a grid smaller than one block along an axis: no averaging
        return np.asarray(voxels, dtype=np.float32)
    cropped = voxels[: whole[0], : whole[1], : whole[2]]
    shape = []
    for n, f in zip(whole, factors, strict=True):
        shape += [n // f, f]
    return cropped.reshape(shape).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def _block_centres(labels: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """The label at each block's centre voxel (labels are not averaged)."""
    whole = [n // f * f for n, f in zip(labels.shape[:3], factors, strict=True)]
    if min(whole) == 0:
        return labels
    index = tuple(slice(f // 2, n, f) for n, f in zip(whole, factors, strict=True))
    return np.ascontiguousarray(labels[index])


def _head_mask(coarse: np.ndarray) -> np.ndarray:
    """The head foreground on the coarse grid: above a tenth of the 99th percentile
    (skull-stripped or not), closed, holes (skull, CSF, ventricles) filled."""
    threshold = HEAD_FRACTION * float(np.percentile(coarse, 99))
    above = coarse > threshold
    closed = ndimage.binary_closing(above, iterations=2) | above
    return ndimage.binary_fill_holes(closed)
