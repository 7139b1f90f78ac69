"""What run.json records about a run: tool and library versions, model, settings, manifest,
and what the manifest's scans had to work with (region_sources)."""

from __future__ import annotations

import hashlib
import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from pingu_dask.analysis.atlas import ATLAS_REGION_SOURCE
from pingu_dask.inputs.manifest import NO_REGION_SOURCE, Scan
from pingu_dask.records import timestamp
from pingu_dask.run import stages
from pingu_dask.version import __version__

REGION_SOURCES = "region_sources"  # run.json key: what the current manifest's scans used


def manifest_info(manifest: Path | None) -> dict | None:
    """Where the manifest is and its SHA-256 (run.json: which cohort this was)."""
    if manifest is None:
        return None
    return {
        "path": str(Path(manifest).resolve()),
        "sha256": hashlib.sha256(Path(manifest).read_bytes()).hexdigest(),
    }


LIBRARIES = ("nnunetv2", "torch", "dask", "distributed", "zarr", "numpy")


def package_versions(packages: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of these packages (None where one is missing)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def provenance(pipeline: stages.Pipeline, manifest: Path | None, n_scans: int) -> dict:
    """What run.json records: tool and library versions, model, settings, manifest."""
    versions = package_versions()
    return {
        "tool": "pingu-dask",
        "version": __version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "libraries": versions,
        "model": {"folder": str(pipeline.model.folder), **pipeline.model.facts()},
        "inference": asdict(pipeline.inference),
        "clusters": asdict(pipeline.pvs_rules),
        "regions": {"table": pipeline.regions.name, "regions": dict(pipeline.regions.regions)},
        "labels": pipeline.model_labels.record(),
        "atlas": atlas_record(pipeline),
        "pipeline_fingerprint": pipeline.fingerprint(),
        "manifest": manifest_info(manifest),
        "n_scans": n_scans,
        "started": timestamp(),
        "finished": None,
    }


def atlas_record(pipeline: stages.Pipeline) -> dict:
    """The atlas settings where the run uses the atlas; otherwise only that it does not
    (no template files are read for a run that never registers one)."""
    if pipeline.atlas_for == "none":
        return {"for": "none"}
    return {
        "for": pipeline.atlas_for,
        **asdict(pipeline.atlas),
        "fingerprint": pipeline.atlas.fingerprint(),
    }


def region_sources(scans: Sequence[Scan], pipeline: stages.Pipeline) -> dict:
    """run.json's record of what the scans of the current manifest used, not the default.

    `regions` in run.json is the region table the run was set up with (compared on
    resume); this says how many scans had regions for it at all, per region source
    ("synthseg", ..., "atlas", "model": the model's region-specific labels, or "none":
    whole-brain figures only), and for how many the brain rule (drop clusters mostly
    outside the brain, `max_outside_brain`) ran, since it needs a parcellation or the
    atlas: counts of one cohort made with and without it are not comparable. It is
    rewritten by every run, like `n_scans`, and kept out of the settings that resuming
    compares.
    """
    per_source = Counter(pipeline.region_source(scan) for scan in scans)
    with_atlas = per_source.get(ATLAS_REGION_SOURCE, 0)
    with_parcellation = sum(
        scan.parcellation is not None and not pipeline.uses_atlas(scan) for scan in scans
    )
    without = len(scans) - with_parcellation - with_atlas
    rule = pipeline.pvs_rules
    checked = with_parcellation + with_atlas if rule.drops_outside_brain else 0
    return {
        "table": pipeline.regions.name if with_parcellation or with_atlas else None,
        "scans_with_parcellation": with_parcellation,
        "scans_with_atlas": with_atlas,
        # Neither a parcellation nor the atlas: whole-brain figures, or the model's
        # own regions; no brain rule either way.
        "scans_without_parcellation": without,
        "scans_whole_brain_only": per_source.get(NO_REGION_SOURCE, 0),
        "per_source": dict(sorted(per_source.items())),
        "brain_rule": {
            "max_outside_brain": rule.max_outside_brain,
            "on": rule.drops_outside_brain,
            "scans_with": checked,
            "scans_without": len(scans) - checked,
        },
    }
