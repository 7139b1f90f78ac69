"""Shared fixtures: one small synthetic cohort per test session (3 scans, 3 sites, T2w)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pingu_dask.synth import generate_cohort


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, n_scans=3, sites=("iso1mm", "iso08mm", "axial3mm"), seed=7, t2w=True)
    return root
