"""Shared fixtures: one small synthetic cohort per test session (3 scans, 3 sites, T2w),
and a tiny model made like the benchmarks' PINGU-sized one (random weights)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pingu_dask.synth.cohort import generate_cohort

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, n_scans=3, sites=("iso1mm", "iso08mm", "axial3mm"), seed=7, t2w=True)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, cohort: Path) -> Path:
    """scripts/make_bench_model.py --size tiny: nnU-Net's planner at 0.8 mm, shrunk to a
    4-32 feature, 64^3 patch, 2.5 mm network with RANDOM weights (not a model: fast
    enough on a CPU to compare implementations, its masks mean nothing). Its output
    bias is set on a cohort scan for 2 % foreground, so that masks have shapes."""
    out = tmp_path_factory.mktemp("bench_model")
    scan = cohort / "sub-001" / "anat" / "sub-001_T1w.nii.gz"
    command = [sys.executable, str(SCRIPTS / "make_bench_model.py"), str(out), "--size", "tiny",
               "--calibrate-on", str(scan), "--foreground", "0.02"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(result.stdout.strip().splitlines()[-1])
