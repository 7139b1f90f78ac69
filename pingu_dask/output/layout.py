"""The output directory (a contract that tests and users read):

    OUT/run.json          provenance: tool version, model fingerprint, settings, manifest
    OUT/masks.zarr/       Zarr v3; one group per scan id with array `pvs` (uint8 0/1) and
                          attrs affine, spacing, shape, fingerprints, attempt, complete
    OUT/.masks-tmp/       mask groups being written, renamed into masks.zarr when whole
    OUT/tables/NAME/      Parquet parts (regions, clusters, evaluation, ledger): tables.py
    OUT/nifti/            optional masks, sub-X[_ses-Y]_desc-pvs_mask.nii.gz

Workers write masks (each attempt its own staged group, renamed in whole); the
driver alone creates the layout and writes tables, in parts under a temporary name
that is renamed into place, so a reader or a crash never sees half a file (readers
skip names starting with '.' or '_').
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from pingu_dask.inputs.manifest import Scan
from pingu_dask.output.files import atomic_path
from pingu_dask.output.masks import MASKS, remove_partial_masks
from pingu_dask.output.parts import TABLES
from pingu_dask.output.tables import SCHEMAS
from pingu_dask.version import __version__

NIFTI = "nifti"
RUN_JSON = "run.json"
QC = "qc"  # <scan_id>.png per scan, with --qc (qc.py)
REPORT = "report"  # index.html and gallery pages (report.py)
EXPORT = "export"  # pvs_<layout>.<format>, by `pingu-dask export` (export.py)
LAYOUT_VERSION = 1

# --- layout (driver) -----------------------------------------------------------------


def prepare_output(out: Path) -> None:
    """Create the output folders and the root Zarr group (once, from the driver)."""
    import zarr

    out = Path(out)
    for name in SCHEMAS:
        (out / TABLES / name).mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(out / MASKS, mode="a", zarr_format=3)
    if "layout" not in root.attrs:
        root.attrs.update({"layout": LAYOUT_VERSION, "created_by": f"pingu-dask {__version__}"})


def reset_output(out: Path) -> None:
    """Remove what a run wrote into OUT (for --force); other files are left alone."""
    out = Path(out)
    for name in (MASKS, TABLES, NIFTI, QC, REPORT, EXPORT):
        shutil.rmtree(out / name, ignore_errors=True)
    remove_partial_masks(out)
    (out / RUN_JSON).unlink(missing_ok=True)


def write_json(path: Path, document: dict) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2, default=str) + "\n")


def read_run_json(out: Path) -> dict | None:
    path = Path(out) / RUN_JSON
    return json.loads(path.read_text()) if path.exists() else None


# --- NIfTI names ---------------------------------------------------------------------

BIDS_LABEL = re.compile(r"[A-Za-z0-9]+")


def nifti_names(scans: Iterable[Scan]) -> dict[str, str]:
    """scan id -> mask path under OUT/nifti, laid out as a BIDS-derivatives dataset.

    sub-X/[ses-Y/]anat/sub-X[_ses-Y]_desc-pvs_mask.nii.gz when the subject (and
    session) are BIDS labels and no other scan gets the same name; when two scans would
    (e.g. two runs of one session), their scan ids stand in for the entities (a BIDS
    input's ids are the entities, e.g. sub-X_ses-Y_run-2). Scans without a BIDS subject
    label: <scan_id>_desc-pvs_mask.nii.gz at the top.
    """
    folders: dict[str, str] = {}
    proposed: dict[str, str] = {}
    for scan in scans:
        stem, folder = scan.scan_id, ""
        subject = _bids_label(scan.subject, "sub-")
        session = _bids_label(scan.session, "ses-")
        if subject and (scan.session is None or session):
            stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            folder = f"sub-{subject}/" + (f"ses-{session}/" if session else "") + "anat/"
        proposed[scan.scan_id] = stem
        folders[scan.scan_id] = folder
    taken = pd.Series(list(proposed.values())).value_counts()
    return {
        scan_id: f"{folders[scan_id]}{stem if taken[stem] == 1 else scan_id}_desc-pvs_mask.nii.gz"
        for scan_id, stem in proposed.items()
    }


#: What GeneratedBy says pingu-dask does (BIDS: a free-text description of the pipeline).
GENERATED_BY_DESCRIPTION = (
    "Perivascular space masks from an nnU-Net v2 model (PINGU or another), run by "
    "pingu-dask; `Model` names the model: its folder name, the folds averaged, the "
    "checkpoint file, the nnU-Net configuration and the SHA-256 fingerprint of its "
    "dataset.json, plans.json and the checkpoints used (as in OUT/run.json)."
)


def describe_nifti_dataset(out: Path, model: Mapping[str, object] | None = None) -> None:
    """OUT/nifti/dataset_description.json: the masks as a BIDS-derivatives dataset.

    GeneratedBy names the tool (Name, Version, Description; no CodeURL: the project
    has no public address yet) and, in a `Model` object, the model that made the
    masks: `model` is a plain dict (this layer does not know nnU-Net) such as
    {"name", "folds", "fingerprint", "configuration", "checkpoint"}, its keys written
    in BIDS's CamelCase (Name, Folds, Fingerprint, ...). Without the model facts, two
    cohorts segmented by, say, PINGU-AF and PINGU-ADNI could not be told apart from
    their derivatives.

    A resumed run with the same tool and model finds its own entry and leaves the
    file as it is. Where an earlier entry differs (a resume allowed across versions),
    the new entry is added after it: the folder then holds masks made by both, and
    GeneratedBy, a list, says so.
    """
    folder = Path(out) / NIFTI
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset_description.json"
    entry: dict[str, object] = {
        "Name": "pingu-dask",
        "Version": __version__,
        "Description": GENERATED_BY_DESCRIPTION,
    }
    if model is not None:
        entry["Model"] = {_camel_case(key): value for key, value in model.items()}
    entry = json.loads(json.dumps(entry, default=str))  # as it reads back (tuples: lists)
    generated_by: list = []
    if path.exists():
        try:
            previous = json.loads(path.read_text())
            generated_by = list(previous.get("GeneratedBy") or [])
        except (ValueError, AttributeError):
            generated_by = []  # unreadable or not an object: written anew
    if entry in generated_by:
        return
    description = {
        "Name": "pingu-dask perivascular space masks",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [*generated_by, entry],
    }
    write_json(path, description)


def _camel_case(key: str) -> str:
    """'fingerprint' -> 'Fingerprint', 'model_name' -> 'ModelName' (BIDS key style)."""
    return "".join(part[:1].upper() + part[1:] for part in str(key).split("_"))


def _bids_label(value: str | None, prefix: str) -> str | None:
    if value is None:
        return None
    value = value[len(prefix) :] if value.startswith(prefix) else value
    return value if BIDS_LABEL.fullmatch(value) else None
