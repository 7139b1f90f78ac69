"""`pingu-dask train --cluster slurm` on the SLURM testbed (scripts/slurm_testbed.sh start).

Two folds (a site split of 2 sites) train at the same time in two worker jobs, and the
jobs end with the training. Real nnU-Net training (the `tiny` preset) on a CPU.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import absolute_manifest
from test_slurm import slurm, worker_jobs  # noqa: F401  (slurm: a fixture)

from pingu_dask.output.training import read_ledger
from pingu_dask.synth.cohort import generate_cohort

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# 4 epochs of 3 iterations: ~40 s per fold on 2 real cores, time enough to see both
# jobs at once in squeue; the whole command takes ~80 s (cases and plans included).
TRAIN_OPTIONS = [
    "--split", "site", "--preset", "tiny", "--epochs", "4", "--iterations-per-epoch", "3",
    "--val-iterations", "1", "--no-tta", "--device", "cpu", "--no-evaluate",
    "--cluster", "slurm", "--cores", "2", "--memory", "6GB", "--walltime", "00:20:00",
    "--max-jobs", "2", "--dashboard-address", "127.0.0.1:0",
]  # fmt: skip
TIMEOUT = 300  # seconds for the whole command
STARTED = re.compile(r"^(.+): attempt (\d+) started on (\S+)")
EPOCH = re.compile(r"^(.+): epoch (\d+)/(\d+) ")
ENDED = re.compile(r"^(.+): attempt (\d+) (finished|failed)")


@dataclass(frozen=True)
class Sample:
    """One look at squeue, between two looks at what the command had said."""

    running: frozenset[str]  # this test's RUNNING worker jobs
    started: dict[str, str]  # fold label -> worker address, said before the look
    ending: frozenset[str]  # folds at their last epoch or ended, said up to after the look
    settled: int  # ledger rows (folds the driver had settled) just after the look

    @property
    def both_training(self) -> bool:
        return len(self.started) == 2 and not self.ending and not self.settled


def job_states(logs: Path) -> dict[str, str]:
    """This test's worker jobs that SLURM still lists, in any state (those whose output
    goes to `logs`): job id -> state."""
    listing = subprocess.run(
        ["squeue", "-h", "-n", "dask-worker", "-O", "JobID:20,State:20,STDOUT:2000"],
        capture_output=True,
        text=True,
    ).stdout
    rows = [line.split(maxsplit=2) for line in listing.splitlines() if line.strip()]
    return {row[0]: row[1] for row in rows if len(row) == 3 and row[2].startswith(f"{logs}/")}


def read_lines(process: subprocess.Popen, lines: list[str]) -> None:
    for line in process.stdout:
        lines.append(line)


def folds_said(lines: list[str]) -> tuple[dict[str, str], frozenset[str]]:
    """Folds started (label -> worker) and those at their last epoch or ended."""
    started = {m[1]: m[3] for line in lines if (m := STARTED.match(line))}
    ending = {m[1] for line in lines if (m := EPOCH.match(line)) and m[2] == m[3]}
    ending |= {m[1] for line in lines if (m := ENDED.match(line))}
    return started, frozenset(ending)


@pytest.mark.usefixtures("slurm")
def test_two_folds_train_in_two_worker_jobs_at_once_and_the_jobs_end(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, n_scans=4, sites=("iso1mm", "iso08mm"), seed=31, jobs=2)
    manifest = tmp_path / "manifest.csv"
    absolute_manifest(cohort, manifest)
    model_dir, logs = tmp_path / "model", tmp_path / "logs"
    command = [sys.executable, "-m", "pingu_dask.cli", "train", str(manifest),
               "--out", str(model_dir), *TRAIN_OPTIONS, "--log-dir", str(logs)]  # fmt: skip
    started_at = time.monotonic()
    process = subprocess.Popen(
        command,
        env=dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=read_lines, args=(process, lines), daemon=True)
    reader.start()
    samples: list[Sample] = []
    try:
        while process.poll() is None:
            if time.monotonic() > started_at + TIMEOUT:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                pytest.fail(f"train did not finish in {TIMEOUT} s:\n{''.join(lines)}")
            started, _ = folds_said(list(lines))
            states = job_states(logs)
            _, ending = folds_said(list(lines))
            settled = len(read_ledger(model_dir))
            running = frozenset(job for job, state in states.items() if state == "RUNNING")
            samples.append(Sample(running, started, ending, settled))
            time.sleep(0.5)
        seconds = time.monotonic() - started_at
        reader.join(timeout=10)
        output = "".join(lines)
        assert process.returncode == 0, output
        check(model_dir, logs, lines, samples, seconds)
    finally:
        left = job_states(logs)
        if left:  # a failed test: leave no job behind for the next
            subprocess.run(["scancel", *left], check=False)


def check(
    model_dir: Path, logs: Path, lines: list[str], samples: list[Sample], seconds: float
) -> None:
    output = "".join(lines)

    # Each fold trained once, ok, on a worker of its own, in a job of its own.
    ledger = read_ledger(model_dir)
    assert sorted(ledger.fold) == [0, 1] and set(ledger.status) == {"ok"}, ledger.to_string()
    assert ledger.worker.nunique() == 2, ledger.to_string()
    jobs = worker_jobs(logs)  # worker address -> job id, from the jobs' logs
    fold_jobs = {str(jobs[worker]) for worker in ledger.worker}
    assert len(fold_jobs) == 2, (jobs, ledger.to_string())

    # Both folds' jobs were RUNNING together while both folds trained.
    # (Not from the "finished" lines: the last fold's is often missing, its event comes
    # back through the topic after FoldLoop has stopped listening; the ledger is complete.)
    assert set(folds_said(lines)[0].values()) == set(ledger.worker), output
    both = [s for s in samples if s.both_training]
    assert both, f"never saw both folds training at once ({len(samples)} looks):\n{output}"
    overlap = max(len(s.running & fold_jobs) for s in both)
    folds = (ledger.finished - ledger.started).dt.total_seconds()
    print(f"{len(both)} of {len(samples)} looks with both folds training; at most {overlap} "
          f"of their jobs RUNNING together; folds took {folds.min():.0f}-{folds.max():.0f} s, "
          f"train {seconds:.0f} s")  # fmt: skip
    assert overlap == 2, [sorted(s.running) for s in both]

    # The jobs end with the training: none of this test's jobs is left, in any state.
    deadline = time.monotonic() + 30
    while job_states(logs) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not job_states(logs), f"jobs left 30 s after train ended: {job_states(logs)}"
