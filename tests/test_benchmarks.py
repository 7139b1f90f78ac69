"""Every benchmark script still runs, small, and writes its section.

The benchmarks are deliverables (docs/benchmarks.md) but no test used to run them, so
an API change broke bench_inference unnoticed. Here each script runs as a user would
run it, with tiny sizes, writing to a scratch copy of the page (PINGU_BENCHMARKS_DOC);
no timing is asserted, only that the section is there with its rows and figures. The
GPU benchmark (scripts/gpu_bench.sh) runs its CPU path with a tiny random-weight model,
as it would on a machine without SimpleITK.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the whole module: see pyproject's markers

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

# script, tiny arguments, the section it owns, patterns (regex) the section must contain
CASES = [
    ("bench_synth.py", ["--scans", "2", "--rows", "2000"], "bench_synth", [r"2,000"]),
    (
        "bench_scale.py",
        ["--rows", "3000", "--run-scans", "60", "--workers", "1"],
        "bench_scale",
        [
            r"validate 3,000 rows \(file checks on\) \| \d",
            r"run 60 scans through the runner",
            r"resume check",
        ],
    ),
    (
        "bench_dashboard.py",
        ["--scans", "40", "--rounds", "1", "--workers", "1"],
        "bench_dashboard",
        [r"transition", r"status\.json", r"/metrics"],
    ),
    (
        "bench_qc.py",
        ["--scans", "3", "--report-scans", "50"],
        "bench_qc",
        [r"\| sub-003 \|", r"50 scans"],
    ),
    (
        "bench_inference.py",
        # the tiny random-weight model (the synthetic-input path; gpu_bench.sh below runs
        # the real-input one, test_inference the demo model's agreement with nnU-Net)
        ["--scans", "2", "--workers", "1", "--skip-per-case", "--model", "tiny"],
        "bench_inference_cpu",
        [
            r"\| TTA off \| \(a\) pingu-dask, 1 worker\(s\) \| [0-9.]+ \| [0-9.]+ \| n/a \(cpu\)",
            r"\(b\) nnUNetv2_predict, folder mode",
            r"\| predict \| [0-9.]+ \|",
            r"\| TTA off \| 1 worker\(s\) \| \d+% \| n/a \(cpu\) \| (slot|CPU side) \|",
            # the (a) vs (b) mask comparison: at least 99.9 % of voxels, over both scans
            r"agreement \(a\) vs \(b\): min (1\.000000|0\.999\d+) of voxels over 2 scans",
        ],
    ),
    (
        "bench_cpu_side.py",
        ["--kinds", "colin27_1mm", "--models", "demo", "--skip-demo-agreement"],
        "bench_cpu_side",
        [
            *[
                rf"\| demo \| 1 mm \(colin27_1mm\) \| {variant} \| [0-9.]+ \| [0-9.]+ \| "
                rf"\*\*[0-9.]+\*\* \|"
                for variant in (
                    "nnUNetv2_predict's workers",
                    r"pingu-dask before \(afecddf\)",
                    "pingu-dask after, CPU worker",
                    "pingu-dask after, GPU worker",
                )
            ],
            r"\| pingu-dask after, GPU worker \| (1\.000000|0\.999\d+) \|",
        ],
    ),
    (
        "bench_preflight.py",
        ["--kinds", "colin27_1mm", "--repeats", "1"],
        "bench_preflight",
        [
            rf"\| 1 mm colin27_1mm \| {stored} \| 181x217x181 \|( [0-9.]+ \|){{6}} [0-9.]+% \|"
            for stored in (r"RAS \(as shipped\)", r"LPI \(axes reversed\)")
        ],
    ),
    (
        "bench_feed.py",
        [
            "--scans",
            "3",
            "--workers",
            "1",
            "--predict-seconds",
            "0.5",
            "--modes",
            "threads",
            "--kinds",
            "colin27_1mm",
            "--model",
            "demo",
        ],
        "bench_feed",
        [
            r"\| 1 \| threads \| 0\.5 \| 4; 0 x - \| [0-9.]+ \| \d+% \| \*\*\d+%\*\* \|",
            r"\| (CPU|slots \(GPU stand-in\)): slots [0-9.]+, CPU [0-9.]+ scans/min \|",
        ],
    ),
    (
        "bench_atlas.py",
        ["--methods", "dipy", "--resolutions", "3", "--phantoms", "1", "--skip-colin05"],
        "bench_atlas",
        [
            r"\| dipy 3 mm affine \| [0-9.]+ \| [0-9.]+ \| \d+ \| 0\.\d\d",
            r"\| no registration \(both MNI\) \|",
            r"\| dipy 3 mm affine\+SyN \| 1/1 \|",
        ],
    ),
    (
        "bench_train.py",
        # tiny: 3 scans, one run each; the replica (hours) is not run here
        [
            "--scans",
            "3",
            "--repeats",
            "1",
            "--iterations",
            "2",
            "--val-iterations",
            "1",
            "--wait-iterations",
            "2",
            "--wait-processes",
            "1",
        ],
        "bench_train",
        [
            r"\| `pingu-dask train --prepare-only --workers 2` \| [0-9.]+ \| [0-9.]+ \|",
            r"\| `nnUNetv2_plan_and_preprocess -np 2` \| [0-9.]+ \|",
            r"\| nnU-Net's `run_training` \(what `nnUNetv2_train` runs\) \| [0-9.]+ \|",
            r"Ratio pingu-dask / nnU-Net: \*\*[0-9.]+x\*\*",
            r"\| 1 \| [0-9.]+ \| \d+ % \|",
        ],
    ),
    (
        "gpu_bench.sh",
        ["--tiny"],
        "bench_gpu",
        [
            r"\| TTA off \| \(a\) pingu-dask, 1 worker\(s\) \| [0-9.]+",
            r"\| TTA off \| \(c\) nnUNetv2_predict, one call per scan \(timed on 1 scans",
            r"\*\*random weights\*\*",
            r"\| TTA off \| colin27_3mm \| (1\.000000|0\.999\d+) \| 1 \|",
        ],
    ),
]


def section(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"section {name} not written"
    return match[1]


@pytest.mark.parametrize(
    ("script", "arguments", "name", "expected"), CASES, ids=[case[0] for case in CASES]
)
def test_benchmark_script_writes_its_section(
    script: str, arguments: list[str], name: str, expected: list[str], tmp_path: Path
) -> None:
    doc = tmp_path / "benchmarks.md"
    env = dict(os.environ, PINGU_BENCHMARKS_DOC=str(doc))
    command = [sys.executable, str(SCRIPTS / script), *arguments]
    if script.endswith(".sh"):  # the GPU benchmark's CPU path, as on a machine without
        # SimpleITK (the device's): the stand-in module and a NibabelIO model
        command = ["bash", str(SCRIPTS / script), *arguments]
        env.update(PYTHON=sys.executable, GPU_BENCH_STUB_SITK="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    body = section(doc.read_text(), name)
    for pattern in expected:
        assert re.search(pattern, body), f"{pattern!r} not in {script}'s section:\n{body}"
    assert "Machine:" in body and "Command:" in body
    if script == "gpu_bench.sh":  # and the 5-fold ensemble's cost
        ensemble = section(doc.read_text(), "bench_gpu_ensemble")
        assert re.search(r"folds 0, 1, 2, 3, 4", ensemble) and "(a) pingu-dask" in ensemble
