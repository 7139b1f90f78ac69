"""Helpers shared by test modules: manifests with absolute paths, broken copies of
images, and the headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

PATH_COLUMNS = ("t1w", "t2w", "parcellation", "reference")


def absolute_manifest(cohort: Path, target: Path, rows: int | None = None) -> pd.DataFrame:
    """The cohort's manifest with absolute paths (so it can live anywhere)."""
    manifest = pd.read_csv(cohort / "manifest.csv", dtype=str)
    manifest = manifest.head(rows) if rows else manifest
    for column in PATH_COLUMNS:
        if column in manifest:
            manifest[column] = [str(cohort / p) for p in manifest[column]]
    manifest.to_csv(target, index=False)
    return manifest


def with_nan_scan(manifest: pd.DataFrame, scan_id: str, folder: Path, at: int) -> pd.DataFrame:
    """The manifest with one more row, at position `at`: a copy of the first scan
    whose T1w has a block of NaN voxels (an input error, found in preprocess)."""
    image = nib.load(manifest.t1w.iloc[0])
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[40:50, 40:50, 20:30] = np.nan
    path = folder / f"{scan_id}.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), path)
    row = {**manifest.iloc[0].to_dict(), "scan_id": scan_id, "subject": scan_id, "t1w": str(path)}
    return pd.concat([manifest.iloc[:at], pd.DataFrame([row]), manifest.iloc[at:]])


def chromium() -> str:
    """The headless browser (Debian package `chromium`; .ci/run installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("headless Chromium is needed (Debian package `chromium`; .ci/run installs it)")
    return path


def headless(url: str, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` (e.g. --dump-dom, --screenshot=...): scripts get 4 s
    of virtual time; console messages go to stderr."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags += ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=4000"]
    command = [chromium(), *flags, *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def shown(html: str, element_id: str) -> str | None:
    """The text inside the element with this id (None when there is none)."""
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    return match.group(1) if match else None
