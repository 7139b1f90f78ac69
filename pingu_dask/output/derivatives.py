"""One scan's files in OUT/nifti, the BIDS-derivatives dataset: mask, clusters, sidecars.

For a mask named (layout.nifti_names) `<stem>_desc-pvs_mask.nii.gz`:

    <stem>_desc-pvs_mask.nii.gz           uint8, 1 = PVS (the mask stored in masks.zarr)
    <stem>_desc-pvs_mask.json             where it came from: the caller's facts (model,
                                          settings, region source, flags, orientation),
                                          "Sources" (the input images) and "ClusterImage"
    <stem>_desc-pvsclusters_dseg.nii.gz   the clusters: each voxel's value is its row's
                                          `cluster` in tables/clusters (1..n; 0 = no PVS)
    <stem>_desc-pvsclusters_dseg.json     what the values mean; "Sources": the mask

The labelled image is what ties a clusters-table row (volume, length, region) to its
voxels: a reader selects `cluster == k` in the table and `image == k` in the volume.
Its values are integers, uint16 (up to 65,534 clusters, far more than a head holds)
or uint32 beyond, with the mask's affine in qform and sform, and NIfTI intent
"label" so that viewers show it as a label map.

Each file is written under a temporary name and renamed into place (files.py), so a
reader or a crash never sees half of one; a retried attempt writes the same names
again. The mask's sidecar is written last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from pingu_dask.output.files import atomic_path, save_nifti
from pingu_dask.output.layout import NIFTI

MASK_SUFFIX = "_desc-pvs_mask.nii.gz"
CLUSTERS_SUFFIX = "_desc-pvsclusters_dseg.nii.gz"
STRUCTURES_SUFFIX = "_desc-structures_dseg.nii.gz"
MASK_DESCRIPTION = (
    "Perivascular space mask on the input image's grid: the model's PVS label value "
    "(1 for a model that labels PVS only; see Labels) where PVS was kept, 0 = not."
)
STRUCTURES_DESCRIPTION = (
    "The model's labels that are not PVS (e.g. white-matter hyperintensities), as it "
    "labelled them; never counted as PVS. Values: see Labels."
)
CLUSTERS_DESCRIPTION = (
    "Perivascular space clusters: each voxel's value is its cluster's number, the "
    "`cluster` column of pingu-dask's clusters table (tables/clusters) for this scan "
    "(1..n); 0 = no PVS. Its voxels are the mask's, exactly."
)


def clusters_name(nifti_name: str) -> str:
    """The cluster image's name beside a mask: ..._desc-pvs_mask.nii.gz ->
    ..._desc-pvsclusters_dseg.nii.gz (same folder)."""
    return nifti_name.removesuffix(MASK_SUFFIX) + CLUSTERS_SUFFIX


def sidecar_name(image_name: str) -> str:
    """A NIfTI file's JSON sidecar (BIDS: same stem, .json)."""
    return image_name.removesuffix(".nii.gz") + ".json"


def label_dtype(n_clusters: int) -> type[np.unsignedinteger]:
    """uint16 while the labels fit (n < 65535), else uint32."""
    return np.uint16 if n_clusters < 65535 else np.uint32


def write_nifti_outputs(
    out: Path,
    nifti_name: str,
    mask: np.ndarray,
    cluster_labels: np.ndarray,
    affine: np.ndarray,
    sidecar: Mapping[str, object],
    sources: Sequence[str] = (),
    structures: np.ndarray | None = None,
    structure_labels: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Write one scan's mask, cluster image and their sidecars under OUT/nifti, and
    for a model with non-PVS labels their image (`structures`, values named by
    `structure_labels`) as ..._desc-structures_dseg.nii.gz.

    `nifti_name` is the mask's path relative to OUT/nifti (layout.nifti_names, ending
    in _desc-pvs_mask.nii.gz). `cluster_labels` are the clusters table's labels 1..n
    on the mask's grid (analysis MaskAnalysis.labels); they must cover exactly the
    mask's voxels, or the image would not be the table's. `sidecar` (model, settings,
    region source, flags, orientation, ...) goes into the mask's JSON as given
    (numpy values as plain numbers, NaN as null), with "Sources" (the given
    `sources`, e.g. the input images, after any the sidecar names) and
    "ClusterImage" (the cluster image's file name, same folder) added.

    Returns the paths written: {"mask", "clusters", "sidecar", "clusters_sidecar"}.
    Raises ValueError naming the file when the inputs do not fit together.
    """
    folder = Path(out) / NIFTI
    relative = PurePosixPath(nifti_name)
    if relative.is_absolute() or ".." in relative.parts or not nifti_name.endswith(MASK_SUFFIX):
        raise ValueError(
            f"{nifti_name!r}: not a mask name under OUT/{NIFTI} "
            f"(a relative path without '..', ending in {MASK_SUFFIX})"
        )
    mask_path = folder / relative
    mask = np.asarray(mask)
    labels = np.asarray(cluster_labels)
    if mask.ndim != 3 or labels.shape != mask.shape:
        raise ValueError(
            f"{mask_path}: the mask ({mask.shape}) and its cluster labels ({labels.shape}) "
            "must be 3D volumes of the same shape"
        )
    if labels.dtype.kind not in "iub" or (labels.size and labels.min() < 0):
        raise ValueError(
            f"{mask_path}: cluster labels must be non-negative integers, got {labels.dtype}"
        )
    labelled, masked = labels > 0, mask > 0
    if not np.array_equal(labelled, masked):
        differ = int(np.count_nonzero(labelled != masked))
        raise ValueError(
            f"{mask_path}: the cluster labels and the mask differ at {differ} voxels "
            "(the labels must be the mask's clusters)"
        )
    flat = labels.ravel() if labels.dtype.kind == "i" else labels.ravel().astype(np.int64)
    counts = np.bincount(flat) if labels.size else np.zeros(1)
    n_clusters = len(counts) - 1
    if n_clusters and not counts[1:].all():
        missing = np.flatnonzero(counts[1:] == 0)[:5] + 1
        raise ValueError(
            f"{mask_path}: cluster labels must be 1..{n_clusters} without gaps "
            f"(as in the clusters table); missing: {missing.tolist()}"
        )
    affine = np.asarray(affine, dtype=np.float64)

    cluster_path = mask_path.with_name(clusters_name(mask_path.name))
    save_nifti(cluster_path, labels.astype(label_dtype(n_clusters)), affine, intent="label")
    clusters_sidecar = mask_path.with_name(sidecar_name(cluster_path.name))
    _write_json(
        clusters_sidecar,
        {
            "Description": CLUSTERS_DESCRIPTION,
            "NumberOfClusters": n_clusters,
            "Sources": [f"bids::{relative}"],
        },
    )
    written = {}
    if structures is not None:
        structures_path = mask_path.with_name(
            mask_path.name.removesuffix(MASK_SUFFIX) + STRUCTURES_SUFFIX
        )
        save_nifti(structures_path, np.asarray(structures, np.uint8), affine, intent="label")
        _write_json(
            structures_path.with_name(sidecar_name(structures_path.name)),
            {
                "Description": STRUCTURES_DESCRIPTION,
                "Labels": {str(v): k for k, v in (structure_labels or {}).items()},
                "Sources": [f"bids::{relative}"],
            },
        )
        written["structures"] = str(structures_path)
    save_nifti(mask_path, mask.astype(np.uint8) if mask.dtype == bool else mask, affine)
    mask_sidecar = mask_path.with_name(sidecar_name(mask_path.name))
    given = sidecar.get("Sources") or []
    named = list(given) if isinstance(given, list | tuple) else [given]
    document = {
        "Description": MASK_DESCRIPTION,
        **{key: value for key, value in sidecar.items() if key != "Sources"},
        "Sources": [str(source) for source in (*named, *sources)],
        "ClusterImage": cluster_path.name,
    }
    if "structures" in written:
        document["StructuresImage"] = Path(written["structures"]).name
    _write_json(mask_sidecar, document)
    return {
        "mask": str(mask_path),
        "clusters": str(cluster_path),
        "sidecar": str(mask_sidecar),
        "clusters_sidecar": str(clusters_sidecar),
        **written,
    }


def _write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_plain(document), indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def _plain(value: object) -> object:
    """JSON-ready: numpy scalars and arrays as numbers and lists, paths as strings,
    tuples as lists, sets as sorted lists, NaN and infinities as null (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, set | frozenset):
        return [_plain(item) for item in sorted(value, key=str)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
