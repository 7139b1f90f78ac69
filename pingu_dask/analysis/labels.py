"""A model's output labels: which are PVS, which region a PVS label stands for, and
which are other structures.

Public PVS models label more than "PVS": the Monash T1w+FLAIR model labels PVS and
white-matter hyperintensities (lesions, not PVS); region-specific models label WM-PVS
and BG-PVS apart. Turning every foreground label into one "PVS" mask would count WMH
lesions as PVS clusters and throw a model's own regions away, so:

- PVS labels are those whose name contains "PVS" (any case) by default, or the ones
  the user names (`--pvs-labels`). A model with a single foreground label (the demo
  model, an imported v1 model's `label_1`) counts it as PVS. A model with several
  labels of which none is named like PVS is refused: guessing would be silent.
- Every other foreground label is another structure: kept as its own mask and volume,
  never clustered or counted as PVS.
- A PVS label whose name says where it is (WM-PVS, BG-PVS, hippocampus PVS, ...)
  stands for that region (NAME_REGIONS, overridable with `--label-regions`), so a
  model's own classes give regions when a scan has no parcellation.

Nothing here imports nnU-Net: a model's labels arrive as (name, value) pairs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from pingu_dask.analysis.regions import REGION_NAME, RESERVED, RegionError, RegionTable

#: Region of a PVS label, from words of its name (lower-cased, split at non-letters).
NAME_REGIONS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"wm", "white", "whitematter", "cso", "centrum"}), "white_matter"),
    (frozenset({"bg", "basal", "basalganglia"}), "basal_ganglia"),
    (frozenset({"hc", "hippo", "hippocampus", "hippocampal"}), "hippocampus"),
    (frozenset({"mb", "midbrain", "brainstem"}), "brainstem"),
    (frozenset({"thalamus", "thalamic"}), "thalamus"),
    (frozenset({"cerebellum", "cerebellar"}), "cerebellum"),
)
MODEL_REGION_SOURCE = "model"
MODEL_TABLE = "model-labels"


class LabelError(RegionError):
    """Label settings that do not fit the model; the message names the model's labels."""


@dataclass(frozen=True)
class ModelLabels:
    """How a model's foreground labels are read. Small and hashable: it travels with tasks.

    `labels` are the foreground (name, value) pairs as dataset.json gives them; `pvs`
    the values counted as PVS; `regions` (value, region) for PVS labels that stand for
    a region.
    """

    labels: tuple[tuple[str, int], ...]
    pvs: tuple[int, ...]
    regions: tuple[tuple[int, str], ...] = ()

    @property
    def names(self) -> dict[int, str]:
        return {value: name for name, value in self.labels}

    @property
    def pvs_names(self) -> tuple[str, ...]:
        return tuple(self.names[value] for value in self.pvs)

    @property
    def others(self) -> tuple[tuple[str, int], ...]:
        """The foreground labels that are not PVS: other structures (e.g. WMH)."""
        return tuple((name, value) for name, value in self.labels if value not in self.pvs)

    @property
    def is_binary(self) -> bool:
        """One PVS label and nothing else: what a mask of 0/1 always meant."""
        return len(self.labels) == 1 and self.pvs == (self.labels[0][1],)

    def pvs_voxels(self, label_map: np.ndarray) -> np.ndarray:
        """Boolean mask of the voxels whose label counts as PVS."""
        return np.isin(label_map, self.pvs)

    def region_table(self) -> RegionTable | None:
        """The model's own regions as a table over label values (None: no PVS label
        stands for a region). Two labels may share a region (left and right WM-PVS)."""
        if not self.regions:
            return None
        grouped: dict[str, list[int]] = {}
        for value, region in self.regions:
            grouped.setdefault(region, []).append(value)
        return RegionTable(MODEL_TABLE, tuple((r, tuple(v)) for r, v in grouped.items()))

    def record(self) -> dict[str, object]:
        """What run.json and the sidecars say of the labels."""
        names = self.names
        return {
            "pvs": [names[value] for value in self.pvs],
            "other_structures": [name for name, _ in self.others],
            "label_regions": {names[value]: region for value, region in self.regions},
            "values": {name: value for name, value in self.labels},
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]


def binary_labels() -> ModelLabels:
    """A model that labels PVS only (value 1): the default where no model is at hand."""
    return ModelLabels((("PVS", 1),), (1,))


def name_words(name: str) -> set[str]:
    """'WM-PVS' -> {'wm', 'pvs'}; 'BasalGanglia_PVS' -> {'basal', 'ganglia', 'pvs'}."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return {word for word in re.split(r"[^a-z]+", spaced.lower()) if word}


def region_of_name(name: str) -> str | None:
    """The region a label's name stands for (NAME_REGIONS), None when it names none
    or more than one."""
    words = name_words(name)
    found = {region for keys, region in NAME_REGIONS if words & keys}
    return found.pop() if len(found) == 1 else None


def resolve_labels(
    model_name: str,
    labels: tuple[tuple[str, int], ...],
    pvs_spec: str | None = None,
    regions_spec: str | None = None,
) -> ModelLabels:
    """A model's (name, value) labels -> ModelLabels, by the rules of the module docstring.

    `pvs_spec`: comma-separated label names or values counted as PVS. `regions_spec`:
    "none" (no model regions), or comma-separated LABEL=region pairs replacing the
    regions read from the names. LabelError names the model and its labels.
    """
    foreground = tuple((name, value) for name, value in labels if value != 0)
    known = ", ".join(f"{name} ({value})" for name, value in foreground) or "none"
    where = f"model {model_name} (labels: {known})"
    if not foreground:
        raise LabelError(f"{where}: no foreground label")
    if pvs_spec:
        pvs = tuple(sorted({_label_value(item, foreground, where) for item in _items(pvs_spec)}))
    else:
        pvs = tuple(value for name, value in foreground if "pvs" in name.lower())
        if not pvs and len(foreground) == 1:
            pvs = (foreground[0][1],)
        if not pvs:
            raise LabelError(
                f"{where}: no label is named like PVS; say which labels count as PVS "
                "with --pvs-labels (names or values, comma-separated)"
            )
    if not pvs:
        raise LabelError(f"{where}: --pvs-labels names no label")
    names = {value: name for name, value in foreground}
    if regions_spec is None:
        regions = tuple(
            (value, region) for value in pvs if (region := region_of_name(names[value])) is not None
        )
    elif regions_spec.strip().lower() == "none":
        regions = ()
    else:
        regions = _regions_from_spec(regions_spec, foreground, pvs, where)
    return ModelLabels(foreground, pvs, tuple(sorted(regions)))


def _items(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",") if item.strip()]


def _label_value(item: str, foreground: tuple[tuple[str, int], ...], where: str) -> int:
    """A label named by its name (any case) or its value."""
    for name, value in foreground:
        if item.lower() == name.lower() or (item.isdigit() and int(item) == value):
            return value
    raise LabelError(f"{where}: {item!r} is not one of its labels")


def _regions_from_spec(
    spec: str, foreground: tuple[tuple[str, int], ...], pvs: tuple[int, ...], where: str
) -> tuple[tuple[int, str], ...]:
    regions = []
    for item in _items(spec):
        label, _, region = item.partition("=")
        region = region.strip()
        if not region:
            raise LabelError(
                f"--label-regions {item!r}: write LABEL=region, e.g. WM-PVS=white_matter"
            )
        value = _label_value(label.strip(), foreground, where)
        if value not in pvs:
            raise LabelError(f"--label-regions {item!r}: {label.strip()} is not a PVS label")
        if not REGION_NAME.fullmatch(region) or region in RESERVED:
            raise LabelError(
                f"--label-regions {item!r}: a region name is lower-case letters, digits and "
                f"'_' (not {' or '.join(RESERVED)})"
            )
        regions.append((value, region))
    return tuple(regions)


def majority_labels(
    cluster_labels: np.ndarray, n_clusters: int, label_map: np.ndarray, values: tuple[int, ...]
) -> np.ndarray:
    """The model label value most of each cluster's voxels carry (clusters 1..n).

    A cluster is a connected component of every PVS label together, so a vessel the
    network labelled partly WM-PVS and partly BG-PVS is one cluster; it takes the label
    of most of its voxels, the lower value on a tie (reproducible, unlike a random
    tie-break).
    """
    if n_clusters == 0:
        return np.zeros(0, dtype=np.int64)
    inside = cluster_labels > 0
    lookup = np.zeros(int(max(values)) + 1, dtype=np.int64)
    lookup[list(values)] = np.arange(len(values))
    codes = lookup[np.clip(label_map[inside], 0, len(lookup) - 1).astype(np.intp)]
    pairs = cluster_labels[inside].astype(np.int64) * len(values) + codes
    counts = np.bincount(pairs, minlength=(n_clusters + 1) * len(values))
    winners = counts.reshape(n_clusters + 1, len(values))[1:].argmax(axis=1)
    return np.asarray(values, dtype=np.int64)[winners]
