"""Brain regions: label lookup tables, the parcellation on the image grid, cluster assignment.

A region table names groups of parcellation labels (FreeSurfer aseg / SynthSeg numbers
by default, or a user table from JSON). The parcellation is brought onto the image grid
through the two affines (nearest neighbour), each cluster goes to the region holding
most of its voxels, and clusters that sit mostly outside every region, or tie, go to
`other`. Without a parcellation there is one region, `whole_brain`.

The parcellation also gives the brain mask (every label > 0): clusters lying mostly
outside it (on the skull, eyes, neck) are dropped before they are counted.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np

from pingu_dask.errors import InputError
from pingu_dask.inputs.imaging import LABEL_MAP_SUFFIXES, load_volume

OTHER = "other"
WHOLE_BRAIN = "whole_brain"
RESERVED = (OTHER, WHOLE_BRAIN)
REGION_NAME = re.compile(r"[a-z][a-z0-9_]*")
AFFINE_TOLERANCE_MM = 1e-3

#: The regions every summary shows first (PINGU reports WM and BG), when present.
HEADLINE_REGIONS = ("white_matter", "basal_ganglia", "whole_brain")


class RegionError(InputError):
    """A region table or parcellation that cannot be used; the message says why."""


@dataclass(frozen=True)
class RegionTable:
    """Named groups of parcellation labels, in reporting order. Small and hashable."""

    name: str
    regions: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for region, labels in self.regions:
            if not REGION_NAME.fullmatch(region) or region in RESERVED:
                raise RegionError(
                    f"region name {region!r}: use lower-case letters, digits and '_' "
                    f"(not {' or '.join(RESERVED)})"
                )
            for label in labels:
                if label <= 0:
                    raise RegionError(f"region {region!r}: label {label} must be positive")
                if label in seen:
                    raise RegionError(f"label {label} is in both {seen[label]!r} and {region!r}")
                seen[label] = region

    @classmethod
    def from_mapping(cls, name: str, regions: dict[str, list[int]]) -> RegionTable:
        """A table from {region: [labels]} (as run.json records it)."""
        return cls(
            name,
            tuple((region, tuple(int(x) for x in labels)) for region, labels in regions.items()),
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.regions)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.regions).encode()).hexdigest()[:16]

    def index_map(self, labels: np.ndarray) -> np.ndarray:
        """Parcellation labels -> region codes (uint8): 0 outside every region, i+1 for region i."""
        largest = max((max(group) for _, group in self.regions if group), default=0)
        lookup = np.zeros(largest + 2, dtype=np.uint8)
        for code, (_, group) in enumerate(self.regions, start=1):
            lookup[list(group)] = code
        clipped = np.clip(labels, 0, largest + 1).astype(np.intp)  # beyond the table -> 0
        return lookup[clipped]


def _labels(*spans: int | tuple[int, int]) -> tuple[int, ...]:
    out: list[int] = []
    for span in spans:
        out.extend(range(span[0], span[1] + 1) if isinstance(span, tuple) else [span])
    return tuple(out)


# FreeSurfer aseg and SynthSeg share label numbers (FreeSurferColorLUT; SynthSeg's
# "labels table.txt" lists the same numbers). Left, right:
#   cerebral WM 2, 41; cerebellum WM 7, 46 and cortex 8, 47; thalamus 10, 49;
#   caudate 11, 50; putamen 12, 51; pallidum 13, 52; hippocampus 17, 53;
#   accumbens 26, 58; ventral DC 28, 60. Not lateralised: brainstem 16,
#   WM hypointensities 77 and corpus callosum 251-255 (both aseg only).
# Neither has a midbrain label: brainstem 16 holds midbrain, pons and medulla.
ASEG = RegionTable(
    "synthseg",
    (
        ("white_matter", _labels(2, 41, 77, (251, 255))),
        ("basal_ganglia", _labels(11, 12, 13, 26, 50, 51, 52, 58)),
        ("thalamus", _labels(10, 49)),
        ("hippocampus", _labels(17, 53)),
        ("brainstem", _labels(16)),
        ("cerebellum", _labels(7, 8, 46, 47)),
    ),
)
# The regions PVS studies report per hemisphere (SHiVAi's set), on the same labels as
# ASEG so that the two add up: left + right (+ unlateralised WM) = the ASEG region.
# Thalamus stays its own region here as in ASEG (SHiVAi counts it in BG): BG + thalamus
# gives their definition, while the reverse could not be taken apart.
ASEG_PVS = RegionTable(
    "pvs",
    (
        ("white_matter_left", _labels(2)),
        ("white_matter_right", _labels(41)),
        ("white_matter_unlateralised", _labels(77, (251, 255))),
        ("basal_ganglia_left", _labels(11, 12, 13, 26)),
        ("basal_ganglia_right", _labels(50, 51, 52, 58)),
        ("thalamus_left", _labels(10)),
        ("thalamus_right", _labels(49)),
        ("hippocampus_left", _labels(17)),
        ("hippocampus_right", _labels(53)),
        ("cerebellum_left", _labels(7, 8)),
        ("cerebellum_right", _labels(46, 47)),
        ("ventral_dc_left", _labels(28)),
        ("ventral_dc_right", _labels(60)),
        ("brainstem", _labels(16)),
    ),
)
BUILT_IN_TABLES = {
    "synthseg": ASEG,
    "aseg": ASEG,
    "freesurfer": ASEG,
    "pvs": ASEG_PVS,
    "synthseg-pvs": ASEG_PVS,
    "aseg-pvs": ASEG_PVS,
    "freesurfer-pvs": ASEG_PVS,
}
# Label groups that can be named instead of numbers, e.g. to exclude them from masks.
LABEL_GROUPS = {"lateral_ventricles": _labels(4, 5, 43, 44), "csf": _labels(24)}


def parse_labels(items: list | tuple, where: str) -> tuple[int, ...]:
    """Labels given as numbers, "251-255" ranges or LABEL_GROUPS names -> sorted ints."""
    labels: set[int] = set()
    for item in items:
        text = str(item).strip()
        if text in LABEL_GROUPS:
            labels.update(LABEL_GROUPS[text])
        elif re.fullmatch(r"\d+", text):
            labels.add(int(text))
        elif match := re.fullmatch(r"(\d+)\s*-\s*(\d+)", text):
            low, high = int(match[1]), int(match[2])
            labels.update(range(low, high + 1))
        else:
            known = ", ".join(LABEL_GROUPS)
            raise RegionError(f"{where}: {item!r} is not a label, a range like 251-255, or {known}")
    return tuple(sorted(labels))


def load_region_table(spec: str | Path) -> RegionTable:
    """A built-in table by name or a user table from JSON.

    Built in: synthseg = aseg = freesurfer (WM, BG, thalamus, hippocampus, brainstem,
    cerebellum) and pvs = synthseg-pvs = aseg-pvs = freesurfer-pvs (the same labels
    per hemisphere, plus ventral DC).

    JSON: {"name": "mine", "regions": {"white_matter": [2, 41, "251-255"], ...}}, or
    just the "regions" mapping (the file name becomes the table name).
    """
    if str(spec).lower() in BUILT_IN_TABLES:
        return BUILT_IN_TABLES[str(spec).lower()]
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(BUILT_IN_TABLES)
        raise RegionError(f"region table {spec!r} is neither a JSON file nor one of: {known}")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RegionError(f"cannot read region table {path}: {error}") from error
    regions = document.get("regions", document) if isinstance(document, dict) else None
    if not isinstance(regions, dict) or not regions:
        raise RegionError(f"{path}: expected a mapping of region name -> list of labels")
    parsed = []
    for name, items in regions.items():
        if not isinstance(items, list):
            raise RegionError(f"{path}: region {name!r} must list its labels")
        parsed.append((str(name), parse_labels(items, f"{path}: region {name!r}")))
    return RegionTable(str(document.get("name", path.stem)), tuple(parsed))


def label_map_on_grid(
    path: Path, shape: tuple[int, ...], affine: np.ndarray, what: str = "parcellation"
) -> np.ndarray:
    """A label image (parcellation, reference mask) on the image grid, as int32.

    Taken as it is when the grids match; otherwise resampled through the two affines
    with nearest neighbour (labels must not be interpolated). Voxels of the image
    outside the label image's field of view get 0.
    """
    # ImageError: unreadable, truncated, not 3D
    data, label_affine = load_volume(path, LABEL_MAP_SUFFIXES)
    if not (np.all(np.isfinite(data)) and np.array_equal(data, np.round(data))):
        raise RegionError(f"{what} {path} holds non-integer values: not a label map")
    data = data.astype(np.int32)
    same_affine = np.allclose(label_affine, affine, atol=AFFINE_TOLERANCE_MM)
    if data.shape == tuple(shape[:3]) and same_affine:
        return np.ascontiguousarray(data)
    resampled = nibabel.processing.resample_from_to(
        nib.Nifti1Image(data, label_affine), (tuple(shape[:3]), affine), order=0, cval=0
    )
    return np.ascontiguousarray(np.asanyarray(resampled.dataobj), dtype=np.int32)


def parcellation_on_grid(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The parcellation's labels on the image grid; RegionError when it misses the image."""
    on_grid = label_map_on_grid(path, shape, affine, "parcellation")
    if not np.any(on_grid > 0):
        raise RegionError(
            f"parcellation {path} does not overlap the image: check that both are of the same "
            "subject and session and that their affines (qform/sform) are right"
        )
    return on_grid


def excluded_voxels(labels: np.ndarray, exclude_labels: tuple[int, ...]) -> np.ndarray | None:
    """Voxels whose label is to be removed from PVS masks (None when nothing is excluded)."""
    return np.isin(labels, exclude_labels) if exclude_labels else None


def assign_clusters(
    cluster_labels: np.ndarray, n_clusters: int, region_codes: np.ndarray, n_regions: int
) -> np.ndarray:
    """Region code (0 = other, i+1 = region i) of clusters 1..n, by majority of voxels.

    Voxels outside every region compete as code 0, so a cluster lying mostly outside
    the regions goes to `other`; so does a tie between regions.
    """
    inside = cluster_labels > 0
    width = n_regions + 1
    pairs = cluster_labels[inside].astype(np.int64) * width + region_codes[inside]
    counts = np.bincount(pairs, minlength=(n_clusters + 1) * width)
    counts = counts.reshape(n_clusters + 1, width)[1:]
    best = counts.max(axis=1, keepdims=True)
    winners = np.argmax(counts, axis=1)
    tied = (counts == best).sum(axis=1) > 1
    winners[tied] = 0
    return winners


def region_names(table: RegionTable | None) -> tuple[str, ...]:
    """Names by region code: code 0 is `other` (or `whole_brain` without a parcellation)."""
    return (WHOLE_BRAIN,) if table is None else (OTHER, *table.names)


def brain_voxels(labels: np.ndarray) -> np.ndarray:
    """The brain mask of a parcellation on the image grid: every voxel with a label.

    Label 0 is background in aseg and SynthSeg (and outside the parcellation's field of
    view after resampling). Extracerebral CSF (24, SynthSeg 2) counts as brain: it is
    inside the skull, and a PVS cluster touching it is not an artefact.
    """
    return labels > 0


def outside_brain_shares(
    cluster_labels: np.ndarray, n_clusters: int, brain: np.ndarray
) -> np.ndarray:
    """Share (0..1) of the voxels of clusters 1..n that lie outside `brain`."""
    inside_cluster = cluster_labels > 0
    ids = cluster_labels[inside_cluster].astype(np.intp)
    sizes = np.bincount(ids, minlength=n_clusters + 1)[1:]
    outside = np.bincount(ids[~brain[inside_cluster]], minlength=n_clusters + 1)[1:]
    return outside / np.maximum(sizes, 1)


def drop_outside_brain(
    cluster_labels: np.ndarray, n_clusters: int, brain: np.ndarray, max_share: float
) -> tuple[np.ndarray, int, int]:
    """Remove clusters with more than `max_share` of their voxels outside the brain.

    Returns (cluster labels renumbered 1..kept in their old order, kept, dropped), so
    the labels read as if the kept clusters had been labelled on their own.
    "More than": a cluster exactly at the share stays (SHiVAi drops those > 25 %).
    """
    dropped = outside_brain_shares(cluster_labels, n_clusters, brain) > max_share
    n_dropped = int(dropped.sum())
    if not n_dropped:
        return cluster_labels, n_clusters, 0
    renumber = np.zeros(n_clusters + 1, dtype=cluster_labels.dtype)
    kept = np.flatnonzero(~dropped) + 1
    renumber[kept] = np.arange(1, len(kept) + 1)
    return renumber[cluster_labels], len(kept), n_dropped
