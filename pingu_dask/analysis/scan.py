"""One scan's predicted mask -> the numbers a study reports (runs in `finish`).

The steps, each in its own module: the parcellation on the image grid (regions),
exclusions and the size filter, then connected components (postprocess), the brain
rule (clusters mostly outside the parcellation's brain are dropped), region of each
cluster (regions), measures per cluster and per region (metrics), and, when the
manifest names a reference mask, agreement with it (evaluate). Kept apart from the
nnU-Net stages so that it can be tested on hand-made volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pingu_dask.analysis import metrics
from pingu_dask.analysis.clusters import find_clusters
from pingu_dask.analysis.evaluate import evaluate_by_region
from pingu_dask.analysis.labels import ModelLabels, binary_labels, majority_labels
from pingu_dask.analysis.regions import (
    WHOLE_BRAIN,
    RegionTable,
    assign_clusters,
    brain_voxels,
    drop_outside_brain,
    excluded_voxels,
    label_map_on_grid,
    parcellation_on_grid,
    region_names,
)
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.imaging import voxel_volume
from pingu_dask.inputs.manifest import Scan, scan_columns
from pingu_dask.records import ScanCounts, ScanRows

#: aseg's and SynthSeg's label for extracerebral CSF: a parcellation with it covers the
#: whole intracranial space.
EXTRACEREBRAL_CSF = 24


@dataclass
class Regions:
    """A scan's parcellation on its image grid, reduced to what finish needs."""

    codes: np.ndarray  # uint8 region code per voxel (0 = outside every region)
    excluded: np.ndarray | None  # voxels removed from the mask (e.g. ventricles)
    # Voxels with any label (the brain rule's mask, the pre-flight alignment check's
    # brain); None: hand-made Regions. The rule runs when the settings turn it on.
    brain: np.ndarray | None = None
    # Voxels per region code (index 0: labelled voxels in no region), and all labelled
    # voxels: the regions' tissue volumes. None: not counted (hand-made Regions).
    tissue_voxels: np.ndarray | None = None
    labelled_voxels: int | None = None
    # Whether the parcellation labels extracerebral CSF (label 24, as SynthSeg and aseg
    # do): then its labelled voxels are the intracranial volume.
    labels_csf: bool = False


def scan_regions(
    scan: Scan,
    shape: tuple[int, ...],
    affine: np.ndarray,
    table: RegionTable,
    settings: PvsClusterRules,
) -> Regions | None:
    """The scan's parcellation on an image grid as region codes and excluded voxels."""
    if scan.parcellation is None:
        return None
    return regions_from_labels(
        parcellation_on_grid(scan.parcellation, shape, affine), table, settings
    )


def regions_from_labels(
    labels: np.ndarray, table: RegionTable, settings: PvsClusterRules
) -> Regions:
    """Region codes, excluded voxels, brain and tissue counts of a parcellation's labels
    already on the image grid (analysis.regions.parcellation_on_grid)."""
    codes = table.index_map(labels)
    labelled = brain_voxels(labels)
    return Regions(
        codes,
        excluded_voxels(labels, settings.exclude_labels),
        labelled,
        tissue_voxels=np.bincount(codes[labelled], minlength=len(table.regions) + 1),
        labelled_voxels=int(np.count_nonzero(labelled)),
        labels_csf=bool(np.any(labels == EXTRACEREBRAL_CSF)),
    )


def intracranial_volume(regions: Regions | None, voxel_mm3: float) -> float | None:
    """The intracranial volume (mm³) where the parcellation gives it: every labelled
    voxel, when extracerebral CSF is labelled too (SynthSeg's total intracranial
    volume is this sum); None otherwise (e.g. a parcellation of the brain only)."""
    if regions is None or not regions.labels_csf or regions.labelled_voxels is None:
        return None
    return round(regions.labelled_voxels * voxel_mm3, 3)


def _tissue_volumes(
    regions: Regions | None, names: tuple[str, ...], voxel_mm3: float
) -> dict[str, float]:
    """Tissue volume (mm³) per reported region name: its parcellation voxels; `other`
    the labelled voxels in no region; whole_brain every labelled voxel."""
    if regions is None or regions.tissue_voxels is None or regions.labelled_voxels is None:
        return {}
    volumes = {
        name: float(n) * voxel_mm3 for name, n in zip(names, regions.tissue_voxels, strict=True)
    }
    volumes[WHOLE_BRAIN] = regions.labelled_voxels * voxel_mm3
    return volumes


def keep_inside_brain(
    cleaned: np.ndarray,
    labels: np.ndarray,
    n_clusters: int,
    regions: Regions | None,
    settings: PvsClusterRules,
) -> tuple[np.ndarray, np.ndarray, int, int | None]:
    """The brain rule on labelled clusters: (mask, labels, kept, dropped).

    Dropped clusters leave the mask as well as the tables, so the stored mask and the
    counts agree. `dropped` is None when the rule did not run (no parcellation, or
    turned off), so a table can tell "none dropped" from "not checked".
    """
    if regions is None or regions.brain is None or not settings.drops_outside_brain:
        return cleaned, labels, n_clusters, None
    share = settings.max_outside_brain
    assert share is not None  # drops_outside_brain: a share below 1
    labels, kept, dropped = drop_outside_brain(labels, n_clusters, regions.brain, share)
    return (labels > 0 if dropped else cleaned), labels, kept, dropped


class MaskAnalysis(NamedTuple):
    # uint8: the model's PVS label values (1 for a PVS-only model) where PVS was kept
    # (exclusions, size filter, brain rule applied), 0 elsewhere; what is stored
    mask: np.ndarray
    counts: ScanCounts  # whole-brain figures
    rows: ScanRows  # the scan's table rows
    labels: np.ndarray  # cluster labels 1..n on the image grid (0: no PVS)
    cluster_regions: list[str]  # the region each cluster was counted in, by label - 1
    region_names: tuple[str, ...]  # the regions a cluster could be counted in
    # The model's other structures (e.g. WMH) as it labelled them, 0 elsewhere; None
    # for a model that labels PVS only.
    structures: np.ndarray | None = None


def model_regions(label_map: np.ndarray, labels: ModelLabels) -> tuple[Regions, RegionTable] | None:
    """Regions from the model's own region-specific PVS labels (WM-PVS, BG-PVS), for a
    scan without a parcellation: each voxel's region is its label's. No brain mask and
    no tissue volumes: the labels say where PVS are, not where tissue is."""
    table = labels.region_table()
    if table is None:
        return None
    return Regions(table.index_map(label_map), excluded=None), table


def analyse_mask(
    raw_mask: np.ndarray,
    affine: np.ndarray,
    scan: Scan,
    regions: Regions | None,
    settings: PvsClusterRules,
    table: RegionTable,
    model_labels: ModelLabels | None = None,
    region_source: str | None = None,
) -> MaskAnalysis:
    """Clusters, regions, metrics and (with a reference) evaluation of one predicted
    label map (the model's label values on the image grid).

    Only the model's PVS labels are clustered and counted; its other structures are
    kept apart with their volumes. Without a parcellation, region-specific PVS labels
    give the regions. Returns the cleaned mask, the whole-brain counts, the scan's
    table rows, and the clusters with their regions (for the QC picture).
    """
    model_labels = model_labels or binary_labels()
    volume = voxel_volume(affine)
    excluded = regions.excluded if regions is not None else None
    pvs = model_labels.pvs_voxels(raw_mask)
    cleaned, labels, n_clusters = find_clusters(pvs, volume, settings, excluded)
    cleaned, labels, n_clusters, n_outside = keep_inside_brain(
        cleaned, labels, n_clusters, regions, settings
    )
    counted_in, counted_table = regions, table
    if regions is None and (own := model_regions(raw_mask, model_labels)) is not None:
        counted_in, counted_table = own
    if counted_in is None:
        names, codes = region_names(None), np.zeros(n_clusters, dtype=np.intp)
    else:
        names = region_names(counted_table)
        codes = assign_clusters(labels, n_clusters, counted_in.codes, len(counted_table.regions))
    cluster_regions = [names[code] for code in codes]
    columns = metrics.cluster_measures(labels, n_clusters, affine, cluster_regions)
    label_names = model_labels.names
    columns["label"] = [
        label_names[int(v)] for v in majority_labels(labels, n_clusters, raw_mask, model_labels.pvs)
    ]
    report_order = names if counted_in is None else (*names[1:], names[0])  # `other` last
    region_rows = metrics.region_summary(
        columns["volume_mm3"], columns["n_voxels"], cluster_regions, report_order
    )
    tissue = _tissue_volumes(regions, names, volume)
    for row in region_rows:  # whole_brain's row only (the brain rule counts brain-wide)
        row["n_clusters_outside_brain"] = None
        row["tissue_volume_mm3"] = tissue.get(row["region"])
        row["pvs_volume_fraction"] = (
            row["total_volume_mm3"] / row["tissue_volume_mm3"] if row["tissue_volume_mm3"] else None
        )
    region_rows[-1]["n_clusters_outside_brain"] = n_outside
    identity = {**scan_columns(scan), "region_source": region_source}
    structures, structure_rows = other_structures(raw_mask, model_labels, volume)
    rows = ScanRows(
        regions=[{**identity, **row} for row in region_rows],
        clusters={**{k: [v] * n_clusters for k, v in identity.items()}, **columns},
        structures=[{**scan_columns(scan), **row} for row in structure_rows],
    )
    whole = region_rows[-1]
    counts = {
        "n_clusters": whole["n_clusters"],
        "n_voxels": whole["n_voxels"],
        "volume_mm3": whole["total_volume_mm3"],
        "clusters_outside_brain": n_outside,
    }
    if scan.reference is not None:
        rows.evaluation = evaluate_against_reference(
            cleaned, affine, scan, regions, settings, table
        )
        whole = rows.evaluation[-1]
        counts.update(
            reference_clusters=whole["n_reference_clusters"],
            voxel_dice=whole["voxel_dice"],
            cluster_f1=whole["cluster_f1"],
        )
    stored = np.where(cleaned, raw_mask, 0).astype(np.uint8)
    analysis = (stored, ScanCounts(**counts), rows)
    return MaskAnalysis(*analysis, labels, cluster_regions, names, structures)


def other_structures(
    label_map: np.ndarray, model_labels: ModelLabels, voxel_mm3: float
) -> tuple[np.ndarray | None, list[dict]]:
    """The model's non-PVS labels as they came (None when it has none) and one row per
    such label: its voxels and volume. Never clustered, never counted as PVS."""
    others = model_labels.others
    if not others:
        return None, []
    kept = np.where(np.isin(label_map, [value for _, value in others]), label_map, 0)
    counts = np.bincount(kept.ravel(), minlength=max(value for _, value in others) + 1)
    rows = [
        {
            "label": name,
            "label_value": value,
            "n_voxels": int(counts[value]),
            "volume_mm3": float(counts[value]) * voxel_mm3,
        }
        for name, value in others
    ]
    return kept.astype(np.uint8), rows


def evaluate_against_reference(
    mask: np.ndarray,
    affine: np.ndarray,
    scan: Scan,
    regions: Regions | None,
    settings: PvsClusterRules,
    table: RegionTable,
) -> list[dict]:
    """The scan's evaluation rows (per region, whole brain last) against its reference.

    The reference is ground truth: it is compared as given (resampled onto the mask's
    grid), as the PINGU paper and nnU-Net's evaluation do. Passing it through the
    pipeline's filter as well (`settings.filter_reference`) drops the rater's small
    clusters that the prediction lost to the same filter, which inflates Dice; the
    rows say which was done (`reference_filtered`). `mask` is used as given.
    """
    if scan.reference is None:
        raise ValueError(f"scan {scan.scan_id!r} has no reference mask")
    reference = label_map_on_grid(scan.reference, mask.shape, affine, "reference mask") > 0
    if settings.filter_reference:
        reference = pipeline_filter(reference, affine, regions, settings)
    codes = None if regions is None else regions.codes
    names = region_names(None if regions is None else table)
    volume = voxel_volume(affine)
    rows = evaluate_by_region(mask, reference, codes, names, settings.connectivity, volume)
    identity = {**scan_columns(scan), "reference_filtered": settings.filter_reference}
    return [{**identity, **row} for row in rows]


def pipeline_filter(
    mask: np.ndarray, affine: np.ndarray, regions: Regions | None, settings: PvsClusterRules
) -> np.ndarray:
    """What analyse_mask keeps of a mask: exclusions, size filter, then the brain rule.

    One function for a stored prediction and for a reference under --filter-reference,
    so "filtered" means the same as in a run.
    """
    excluded = regions.excluded if regions is not None else None
    cleaned, labels, n_clusters = find_clusters(mask, voxel_volume(affine), settings, excluded)
    return keep_inside_brain(cleaned, labels, n_clusters, regions, settings)[0]
