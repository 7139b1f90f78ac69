"""An analytic brain phantom with perivascular spaces (PVS) drawn as thin tubes.

The anatomy is a set of closed-form shapes in millimetres (a folded cortex over white
matter, ventricles and deep grey nuclei), so it can be sampled on any scanner grid and
any orientation without resampling artefacts. PVS are capsules (tubes with round ends)
placed inside white matter (roughly radial) and basal ganglia (roughly vertical), kept
apart from each other, and rasterised with partial volume by supersampling each voxel
(the PVSDRO recipe: draw at high resolution, take to the scan grid, threshold the
fraction at 0.5 for the ground truth).

Label numbers follow FreeSurfer aseg / SynthSeg, so a phantom's parcellation can be
read by the same code as a real one. Coordinates are RAS+ (x grows to the subject's
right, so the left hemisphere has x < 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation
from scipy.stats import qmc

# FreeSurfer / SynthSeg label numbers (left, right).
LEFT_RIGHT_LABELS = {
    "cerebral_white_matter": (2, 41),
    "cerebral_cortex": (3, 42),
    "lateral_ventricle": (4, 43),
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "accumbens": (26, 58),
}
CSF = 24
# Tissue codes outside the brain: used for intensities only, written as 0 in parcellations.
SKULL = 901
SCALP = 902
NON_BRAIN = (SKULL, SCALP)

WHITE_MATTER = frozenset(LEFT_RIGHT_LABELS["cerebral_white_matter"])
BASAL_GANGLIA = frozenset(
    label
    for name in ("caudate", "putamen", "pallidum", "accumbens")
    for label in LEFT_RIGHT_LABELS[name]
)


@dataclass(frozen=True, slots=True)
class Nucleus:
    """A deep structure drawn as an ellipsoid (optionally bent), mirrored across the midline.

    `centre` is the left-hemisphere centre (x < 0); `bend` curves the long (y) axis
    downwards at both ends, which turns an ellipsoid into a ventricle-like arch.
    """

    name: str
    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    bend: float = 0.0


# Drawing order matters: later shapes overwrite earlier ones where they overlap.
BASE_NUCLEI = (
    Nucleus("putamen", (-17.0, 2.0, 1.0), (3.8, 9.5, 6.5)),
    Nucleus("pallidum", (-12.5, 0.0, 0.0), (2.8, 5.5, 4.0)),
    Nucleus("accumbens", (-8.0, 12.5, -4.0), (3.0, 3.5, 3.0)),
    Nucleus("caudate", (-10.5, 9.0, 9.5), (3.5, 9.0, 5.0)),
    Nucleus("thalamus", (-7.0, -10.0, 3.0), (5.5, 8.5, 5.5)),
    Nucleus("lateral_ventricle", (-5.0, -2.0, 12.0), (3.0, 21.0, 3.5), bend=0.016),
)

BASE_BRAIN_SEMI_AXES = np.array([48.0, 58.0, 42.0])
CORTEX_THICKNESS = 0.055  # of the brain radius, ~2.5 mm
GYRAL_DEPTH = 0.09  # extra cortex where the folding pattern dips, ~4 mm
CSF_RIM, SKULL_RIM, SCALP_RIM = 1.04, 1.10, 1.16  # outer radii, relative to the brain surface


@dataclass(frozen=True)
class Anatomy:
    """One subject's brain: shapes in subject space plus a pose in scanner space."""

    brain_semi_axes: np.ndarray
    surface_waves: tuple[np.ndarray, np.ndarray, np.ndarray]  # frequencies, phases, amplitudes
    gyral_waves: tuple[np.ndarray, np.ndarray]  # frequencies, phases
    nuclei: tuple[Nucleus, ...]
    rotation: np.ndarray  # subject -> scanner
    translation: np.ndarray

    def to_subject(self, world: np.ndarray) -> np.ndarray:
        """Scanner coordinates (N, 3) -> subject coordinates (N, 3)."""
        return (np.asarray(world, dtype=np.float64) - self.translation) @ self.rotation

    def to_world(self, subject: np.ndarray) -> np.ndarray:
        """Subject coordinates (N, 3) -> scanner coordinates (N, 3)."""
        return np.asarray(subject, dtype=np.float64) @ self.rotation.T + self.translation

    def labels_at(self, world: np.ndarray) -> np.ndarray:
        """Tissue label (FreeSurfer numbers, SKULL/SCALP codes, 0 outside) at each point.

        Costly terms are evaluated only where they can matter (this runs on every voxel
        of every synthetic scan): the head outline only inside a bounding ellipsoid, the
        cortical folding only in the outer shell, the nuclei only in the central box.
        """
        p = self.to_subject(world).astype(np.float32)
        labels = np.zeros(len(p), dtype=np.int16)
        frequencies, phases, amplitudes = self.surface_waves
        widest = float(1.0 + amplitudes.sum())
        raw_rho = np.linalg.norm(p / self.brain_semi_axes.astype(np.float32), axis=1)
        head = np.flatnonzero(raw_rho < SCALP_RIM * widest)
        p, raw_rho = p[head], raw_rho[head]
        direction = p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-6)
        surface = 1.0 + np.cos(direction @ frequencies.T.astype(np.float32) + phases) @ amplitudes
        rho = raw_rho / surface.astype(np.float32)

        tissue = np.zeros(len(p), dtype=np.int16)
        tissue[rho < SCALP_RIM] = SCALP
        tissue[rho < SKULL_RIM] = SKULL
        tissue[rho < CSF_RIM] = CSF
        left = p[:, 0] < 0
        self._assign(tissue, rho < 1.0, left, "cerebral_cortex")
        deepest_cortex = 1.0 - CORTEX_THICKNESS - GYRAL_DEPTH
        self._assign(tissue, rho < deepest_cortex, left, "cerebral_white_matter")
        shell = np.flatnonzero((rho >= deepest_cortex) & (rho < 1.0 - CORTEX_THICKNESS))
        gyral_frequencies, gyral_phases = self.gyral_waves
        folding = np.cos(direction[shell] @ gyral_frequencies.T.astype(np.float32) + gyral_phases)
        white_limit = (
            1.0 - CORTEX_THICKNESS - GYRAL_DEPTH * (0.5 + 0.5 * np.tanh(4 * folding.mean(axis=1)))
        )
        folded_white = shell[rho[shell] < white_limit]
        in_folded_white = np.zeros(len(p), dtype=bool)
        in_folded_white[folded_white] = True
        self._assign(tissue, in_folded_white, left, "cerebral_white_matter")
        fissure = (
            (np.abs(p[:, 0]) < 1.0) & (rho > 0.55) & (p[:, 2] > -0.3 * self.brain_semi_axes[2])
        )
        tissue[fissure & (rho < 1.0)] = CSF

        reach = np.array(
            [
                max(abs(n.centre[0]) + n.semi_axes[0] for n in self.nuclei),
                max(abs(n.centre[1]) + n.semi_axes[1] for n in self.nuclei),
                max(abs(n.centre[2]) + n.semi_axes[2] for n in self.nuclei),
            ]
        )
        central = np.flatnonzero((np.abs(p) < reach + 8.0).all(axis=1) & (rho < 0.9))
        core, core_left = p[central], left[central]
        core_tissue = tissue[central]
        for nucleus in self.nuclei:
            for mirror, side in ((1.0, core_left), (-1.0, ~core_left)):
                centre = np.array(nucleus.centre) * np.array([mirror, 1.0, 1.0])
                inside = _inside_ellipsoid(core, centre, np.array(nucleus.semi_axes), nucleus.bend)
                self._assign(core_tissue, inside & side, core_left, nucleus.name)
        tissue[central] = core_tissue
        labels[head] = tissue
        return labels

    @staticmethod
    def _assign(labels: np.ndarray, where: np.ndarray, left: np.ndarray, name: str) -> None:
        left_label, right_label = LEFT_RIGHT_LABELS[name]
        labels[where & left] = left_label
        labels[where & ~left] = right_label


def _inside_ellipsoid(
    points: np.ndarray, centre: np.ndarray, semi_axes: np.ndarray, bend: float
) -> np.ndarray:
    offset = points - centre
    if bend:
        offset[:, 2] = offset[:, 2] + bend * offset[:, 1] ** 2
    return ((offset / semi_axes) ** 2).sum(axis=1) < 1.0


def _random_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.normal(size=(n, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one subject: brain size and shape, folding, nuclei, ventricle size and head pose."""
    semi_axes = BASE_BRAIN_SEMI_AXES * rng.uniform(0.95, 1.05, size=3)
    n_surface = 6
    surface_waves = (
        _random_directions(rng, n_surface) * rng.uniform(2.0, 4.0, size=(n_surface, 1)),
        rng.uniform(0, 2 * np.pi, size=n_surface),
        rng.uniform(0.01, 0.025, size=n_surface),
    )
    n_gyral = 10
    gyral_waves = (
        _random_directions(rng, n_gyral) * rng.uniform(9.0, 14.0, size=(n_gyral, 1)),
        rng.uniform(0, 2 * np.pi, size=n_gyral),
    )
    ventricle_scale = rng.uniform(0.8, 1.7)  # ventricles grow with age
    nuclei = []
    for nucleus in BASE_NUCLEI:
        scale = rng.uniform(0.92, 1.08, size=3)
        if nucleus.name == "lateral_ventricle":
            scale = scale * np.array([ventricle_scale, 1.0, ventricle_scale])
        nuclei.append(
            Nucleus(
                nucleus.name,
                tuple(np.array(nucleus.centre) + rng.normal(0.0, 0.6, size=3)),
                tuple(np.array(nucleus.semi_axes) * scale),
                nucleus.bend,
            )
        )
    rotation = Rotation.from_euler("xyz", rng.normal(0.0, 4.0, size=3), degrees=True).as_matrix()
    return Anatomy(
        brain_semi_axes=semi_axes,
        surface_waves=surface_waves,
        gyral_waves=gyral_waves,
        nuclei=tuple(nuclei),
        rotation=rotation,
        translation=rng.normal(0.0, 3.0, size=3),
    )


@dataclass(frozen=True, slots=True)
class Tube:
    """One PVS: a capsule between two end points (scanner mm) with a given width."""

    region: str  # "wm" or "bg"
    start: np.ndarray
    end: np.ndarray
    width_mm: float

    @property
    def radius(self) -> float:
        return self.width_mm / 2.0

    @property
    def length_mm(self) -> float:
        """Tip-to-tip length, round caps included."""
        return float(np.linalg.norm(self.end - self.start)) + self.width_mm

    def axis_points(self, step_mm: float = 0.5) -> np.ndarray:
        """Points along the axis, at most `step_mm` apart, ends included."""
        n = max(2, int(np.ceil(np.linalg.norm(self.end - self.start) / step_mm)) + 1)
        t = np.linspace(0.0, 1.0, n)[:, None]
        return self.start + t * (self.end - self.start)


# Per region: label set, typical direction, width and length ranges in mm.
TUBE_RULES: dict[str, dict[str, Any]] = {
    "wm": dict(labels=WHITE_MATTER, width=(0.6, 2.6), length=(2.0, 15.0), jitter=0.25, margin=1.0),
    "bg": dict(labels=BASAL_GANGLIA, width=(0.8, 3.0), length=(2.0, 10.0), jitter=0.3, margin=0.5),
}


def place_tubes(
    anatomy: Anatomy,
    rng: np.random.Generator,
    counts: dict[str, int],
    min_gap_mm: float,
) -> list[Tube]:
    """Place non-touching PVS tubes inside their regions.

    WM tubes point away from the brain centre (PVS run perpendicular to the cortex);
    BG tubes run roughly vertically (lenticulostriate arteries). A candidate is kept
    only if every point of its axis, pushed `radius + margin` along each axis, stays
    in the region, and its surface stays `min_gap_mm` from every tube kept so far (so
    that distinct tubes stay distinct clusters on the scan grid).
    """
    tubes: list[Tube] = []
    kept_points: list[np.ndarray] = []
    kept_radii: list[np.ndarray] = []
    for region, count in counts.items():
        rules = TUBE_RULES[region]
        labels = np.array(sorted(rules["labels"]))
        centres = _sample_points_in(anatomy, rng, labels, n=count * 60)
        placed = 0
        for centre_subject in centres:
            if placed == count:
                break
            width = rng.uniform(*rules["width"])
            length = rng.uniform(max(rules["length"][0], 1.8 * width), rules["length"][1])
            axis = (
                centre_subject / np.linalg.norm(centre_subject)
                if region == "wm"
                else np.array([0, 0, 1.0])
            )
            axis = axis + rng.normal(0.0, rules["jitter"], size=3)
            axis /= np.linalg.norm(axis)
            half = (length - width) / 2.0
            start, end = anatomy.to_world(
                np.stack([centre_subject - half * axis, centre_subject + half * axis])
            )
            tube = Tube(region, start, end, float(width))
            points = tube.axis_points()
            if not _stays_inside(anatomy, points, tube.radius + rules["margin"], labels):
                continue
            if kept_points and not _keeps_apart(
                points, tube.radius, kept_points, kept_radii, min_gap_mm
            ):
                continue
            tubes.append(tube)
            kept_points.append(points)
            kept_radii.append(np.full(len(points), tube.radius))
            placed += 1
    return tubes


def _sample_points_in(
    anatomy: Anatomy, rng: np.random.Generator, labels: np.ndarray, n: int
) -> np.ndarray:
    """Uniform random subject-space points whose label is in `labels` (rejection sampling)."""
    found: list[np.ndarray] = []
    total = 0
    for _ in range(50):
        candidates = rng.uniform(-1.0, 1.0, size=(20_000, 3)) * anatomy.brain_semi_axes
        hits = candidates[np.isin(anatomy.labels_at(anatomy.to_world(candidates)), labels)]
        found.append(hits)
        total += len(hits)
        if total >= n:
            break
    return np.concatenate(found)[:n]


_PUSHES = np.array(
    [[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1.0]]
)


def _stays_inside(anatomy: Anatomy, points: np.ndarray, reach: float, labels: np.ndarray) -> bool:
    probes = (points[:, None, :] + reach * _PUSHES[None]).reshape(-1, 3)
    return bool(np.isin(anatomy.labels_at(probes), labels).all())


def _keeps_apart(
    points: np.ndarray,
    radius: float,
    kept_points: list[np.ndarray],
    kept_radii: list[np.ndarray],
    gap: float,
) -> bool:
    others = np.concatenate(kept_points)
    other_radii = np.concatenate(kept_radii)
    distances = np.linalg.norm(points[:, None, :] - others[None, :, :], axis=2)
    return bool((distances - other_radii[None, :] - radius >= gap).all())


def rasterise_tubes(
    tubes: list[Tube],
    affine: np.ndarray,
    shape: tuple[int, int, int],
    subsample_mm: float = 0.25,
) -> tuple[np.ndarray, list[int]]:
    """Partial-volume fraction of PVS in each voxel, and each tube's ground-truth voxel count.

    Each voxel near a tube is sampled at about one point per `subsample_mm` cube (more
    in thick slices) and the fraction of points inside the capsule is counted. A tube's ground truth
    is its voxels with fraction >= 0.5; a very thin tube may have none (it is then
    present in the image as a faint partial-volume darkening, but not in the truth).
    """
    fraction = np.zeros(shape, dtype=np.float32)
    spacing = nib.affines.voxel_sizes(affine)
    n_samples = int(np.prod(np.maximum(1, np.ceil(spacing / subsample_mm))))
    # Scrambled Sobol points rather than a regular sub-grid: a regular grid over- or
    # under-counts thin tubes systematically, quasi-random points do not.
    sobol = qmc.Sobol(d=3, scramble=True, seed=0)
    sub_offsets = sobol.random(2 ** int(np.ceil(np.log2(n_samples)))) - 0.5
    half_diagonal = 0.5 * float(np.linalg.norm(spacing))
    voxel_counts = []
    for tube in tubes:
        reach = tube.radius + half_diagonal
        corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=float)
        low_world = np.minimum(tube.start, tube.end) - reach
        high_world = np.maximum(tube.start, tube.end) + reach
        box_world = low_world + corners * (high_world - low_world)
        box_voxels = nib.affines.apply_affine(np.linalg.inv(affine), box_world)
        low = np.clip(np.floor(box_voxels.min(axis=0)).astype(int), 0, np.array(shape) - 1)
        high = np.clip(np.ceil(box_voxels.max(axis=0)).astype(int) + 1, 0, np.array(shape))
        if np.any(high <= low):
            voxel_counts.append(0)
            continue
        grid = np.stack(
            np.meshgrid(
                *[np.arange(lo, hi) for lo, hi in zip(low, high, strict=True)], indexing="ij"
            ),
            axis=-1,
        ).reshape(-1, 3)
        near = grid[
            _distance_to_segment(nib.affines.apply_affine(affine, grid), tube.start, tube.end)
            <= reach
        ]
        if len(near) == 0:
            voxel_counts.append(0)
            continue
        samples = nib.affines.apply_affine(
            affine, (near[:, None, :] + sub_offsets[None]).reshape(-1, 3)
        )
        inside = _distance_to_segment(samples, tube.start, tube.end) <= tube.radius
        tube_fraction = inside.reshape(len(near), -1).mean(axis=1).astype(np.float32)
        index = tuple(near.T)
        fraction[index] = np.maximum(fraction[index], tube_fraction)
        voxel_counts.append(int((tube_fraction >= 0.5).sum()))
    return fraction, voxel_counts


def _distance_to_segment(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    axis = end - start
    length_sq = float(axis @ axis)
    if length_sq == 0.0:
        return np.linalg.norm(points - start, axis=1)
    t = np.clip((points - start) @ axis / length_sq, 0.0, 1.0)
    return np.linalg.norm(points - (start + t[:, None] * axis), axis=1)
