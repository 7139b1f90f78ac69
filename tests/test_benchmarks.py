"""Every benchmark script still runs, small, and writes its section.

The benchmarks are deliverables (docs/benchmarks.md) but no test used to run them, so
an API change broke bench_inference unnoticed. Here each script runs as a user would
run it, with tiny sizes, writing to a scratch copy of the page (PINGU_BENCHMARKS_DOC);
no timing is asserted, only that the section is there with its rows and figures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
        ["--scans", "2", "--workers", "1", "--skip-per-case"],
        "bench_inference_cpu",
        [
            r"\(a\) pingu-dask, 1 worker\(s\) x \d+ torch threads \| [0-9.]+ \| [0-9.]+ \|",
            r"\(b\) nnUNetv2_predict, folder mode",
            r"\| predict \| [0-9.]+ \|",
            r"\| 1 worker\(s\) \| \d+% \| n/a \(cpu\) \|",
            # the (a) vs (b) mask comparison: at least 99.9 % of voxels, over both scans
            r"agreement \(a\) vs \(b\): min (1\.000000|0\.999\d+), .* over 2 scans",
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
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *arguments],
        env=dict(os.environ, PINGU_BENCHMARKS_DOC=str(doc)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    body = section(doc.read_text(), name)
    for pattern in expected:
        assert re.search(pattern, body), f"{pattern!r} not in {script}'s section:\n{body}"
    assert "Machine:" in body and "Command:" in body
