"""What run.json records about a run: tool and library versions, model, settings, manifest."""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from pingu_dask import __version__
from pingu_dask.run import stages


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
        "model": {
            "folder": str(pipeline.model.folder),
            "name": pipeline.model.name,
            "folds": list(pipeline.model.folds),
            "checkpoint": pipeline.model.checkpoint,
            "fingerprint": pipeline.model.fingerprint,
        },
        "inference": asdict(pipeline.inference),
        "clusters": asdict(pipeline.pvs_rules),
        "regions": {"table": pipeline.regions.name, "regions": dict(pipeline.regions.regions)},
        "pipeline_fingerprint": pipeline.fingerprint(),
        "manifest": manifest_info(manifest),
        "n_scans": n_scans,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished": None,
    }
