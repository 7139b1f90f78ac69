"""Runs through a real SLURM (scripts/slurm_testbed.sh start), and the PBS job script.

The SLURM tests need the single-node test cluster that `make test` starts; when SLURM
is not there they fail and say why, rather than skip. They run as a user would, with
TLS between the scheduler and the worker jobs (pingu.batch-tls, on by default).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_jobs import assert_strangers_are_refused

from pingu_dask.output import tables
from pingu_dask.run.jobs import JobOptions, jobqueue_cluster, lifetime_arguments, parse_walltime
from pingu_dask.synth.cohort import generate_cohort

pytestmark = pytest.mark.slow  # the whole module: see pyproject's markers

SLURM_OPTIONS = [
    "--model", "demo", "--no-tta", "--step-size", "1.0", "--device", "cpu",
    "--cluster", "slurm", "--cores", "2", "--memory", "6GB", "--walltime", "00:20:00",
    "--min-jobs", "1", "--max-jobs", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def slurm() -> None:
    try:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"SLURM is not available ({error}); start it: scripts/slurm_testbed.sh start")
    if state.returncode != 0 or not re.search(r"idle|mix|alloc", state.stdout):
        pytest.fail(
            "SLURM is not up (sinfo: "
            f"{(state.stdout + state.stderr).strip()!r}); start it: scripts/slurm_testbed.sh start"
        )
    # A machine's own SLURM (the testbed refuses to replace its configuration) is not
    # the testbed: these tests submit jobs to its `gpu` partition with fake GPUs.
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    cluster = re.search(r"^ClusterName\s*=\s*(\S+)", config.stdout, re.MULTILINE)
    if not cluster or cluster.group(1) != "pingu-test":
        pytest.fail(
            f"this SLURM is not the testbed's (ClusterName {cluster.group(1) if cluster else '?'}"
            ", not pingu-test): the SLURM tier runs on the testbed only, on a machine without "
            "a SLURM of its own (see scripts/slurm_testbed.sh and the README's Development)"
        )


@pytest.fixture(scope="module")
def cohort6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort6")
    generate_cohort(root, n_scans=6, seed=21, jobs=2)
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    for column in ("t1w", "parcellation", "reference"):
        manifest[column] = [str(root / p) for p in manifest[column]]
    manifest.to_csv(root / "absolute.csv", index=False)
    return root / "absolute.csv"


def start_run(
    manifest: Path, out: Path, logs: Path, *extra: str, **environment: str
) -> subprocess.Popen:
    command = [sys.executable, "-m", "pingu_dask.cli", "run", str(manifest), "--out", str(out)]
    return subprocess.Popen(
        [*command, *SLURM_OPTIONS, "--log-dir", str(logs), *extra],
        env=dict(os.environ, DASK_PINGU__FLUSH_EVERY_SCANS="1", COLUMNS="200", **environment),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def job_ids(logs: Path) -> set[int]:
    """SLURM job ids of the worker jobs, from their output files (dask-worker-ID.err)."""
    return {int(m[1]) for p in logs.glob("*.err") if (m := re.search(r"-(\d+)\.err$", p.name))}


def job_record(job_id: int) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", str(job_id)], capture_output=True, text=True
    ).stdout


def finish(process: subprocess.Popen, timeout: int = 600) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the run did not finish in {timeout} s:\n{output}")
    return output


@pytest.mark.slurm
def test_a_cohort_runs_on_slurm_worker_jobs(slurm, cohort6: Path, tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    process = start_run(cohort6, out, logs)
    output = finish(process)
    assert process.returncode == 0, output
    assert "slurm worker jobs (adaptive)" in output
    ledger = tables.read_table(out, "ledger")
    assert (ledger.status == "ok").sum() == 6
    ids = job_ids(logs)
    assert ids, f"no worker job output in {logs}"
    record = job_record(min(ids))
    assert "JobName=dask-worker" in record
    assert re.search(r"gres[:/]gpu[:=]1|gpu:1", record), record  # the GPU directive was used
    # The workers that did the work ran inside those jobs (their logs name them).
    worker_logs = "".join(p.read_text() for p in logs.glob("*.err"))
    for worker in set(ledger.worker.dropna()):
        assert worker in worker_logs


def worker_log_lines(logs: Path, label: str) -> list[str]:
    """The addresses after `label` (e.g. 'Registered to:') in the worker jobs' logs."""
    text = "".join(p.read_text() for p in logs.glob("*.err"))
    return re.findall(rf"{label}\s+(\S+)", text)


@pytest.mark.slurm
def test_a_tls_run_completes_and_strangers_are_refused(
    slurm, cohort6: Path, tmp_path: Path
) -> None:
    """TLS is on by default (nothing asks for it here): the scheduler listens on
    tls://, the worker jobs join it with the run's certificate (dask-jobqueue's files
    in pingu.batch-tls-directory, readable by the user only), and while the run goes on
    clients without the credentials are refused: plain TCP to the scheduler's port, and
    TLS with a certificate of their own. The run completes."""
    out, logs, tls = tmp_path / "out", tmp_path / "logs", tmp_path / "tls"
    process = start_run(cohort6, out, logs, DASK_PINGU__BATCH_TLS_DIRECTORY=str(tls))
    deadline = time.monotonic() + 300
    while not worker_log_lines(logs, "Registered to:"):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no worker joined the scheduler:\n{finish(process, 10)}")
        time.sleep(0.5)
    scheduler = worker_log_lines(logs, "Registered to:")[0]
    files = sorted(tls.iterdir())
    assert len(files) == 3 and all(f.stat().st_mode & 0o077 == 0 for f in files), files
    started = time.monotonic()
    assert_strangers_are_refused(scheduler)
    assert process.poll() is None, "the run ended before the strangers were tried"
    print(f"strangers refused in {time.monotonic() - started:.1f} s while the run went on")
    output = finish(process)
    assert process.returncode == 0, output
    assert (tables.read_table(out, "ledger").status == "ok").sum() == 6
    assert all(a.startswith("tls://") for a in worker_log_lines(logs, "Start worker at:"))
    assert not list(tls.iterdir())  # the driver's files went with it


def running_worker_jobs() -> set[str]:
    listing = subprocess.run(
        ["squeue", "-h", "-n", "dask-worker", "-t", "RUNNING", "-o", "%i"],
        capture_output=True,
        text=True,
    ).stdout
    return set(listing.split())


def worker_jobs(logs: Path) -> dict[str, int]:
    """Worker address -> SLURM job id, from the jobs' logs (dask-worker-ID.err)."""
    found = {}
    for path in logs.glob("*.err"):
        job = int(re.search(r"-(\d+)\.err$", path.name)[1])
        for address in re.findall(r"Start worker at:\s+(\S+)", path.read_text()):
            found[address] = job
    return found


@pytest.mark.slurm
def test_jobs_are_asked_for_from_the_work_left_and_released(
    slurm, cohort6: Path, tmp_path: Path
) -> None:
    """The shape of deploy/slurm/run_cohort.sbatch on a node that looks like a GPU node
    (16 CPUs, 4 GPUs): 8-core jobs, --min-jobs 0 --max-jobs 3. Two jobs fit at once;
    Dask's own adaptive target kept this at one job for the whole run."""
    manifest = pd.read_csv(cohort6)
    eight = pd.concat([manifest, manifest.head(2).assign(scan_id=["sub-901", "sub-902"])])
    eight.to_csv(tmp_path / "eight.csv", index=False)
    out, logs = tmp_path / "out", tmp_path / "logs"
    scaled = ["--cores", "8", "--min-jobs", "0", "--max-jobs", "3", "--torch-threads", "1"]
    process = start_run(tmp_path / "eight.csv", out, logs, *scaled)
    most = 0
    while process.poll() is None:
        most = max(most, len(running_worker_jobs()))
        time.sleep(0.5)
    output = finish(process)
    assert process.returncode == 0, output
    assert most >= 2, f"at most {most} worker job(s) ran at once"
    deadline = time.monotonic() + 60
    while running_worker_jobs() and time.monotonic() < deadline:
        time.sleep(1)
    assert not running_worker_jobs()  # every job ended with the run
    ledger = tables.read_table(out, "ledger")
    assert (ledger.status == "ok").sum() == 8
    jobs = worker_jobs(logs)
    assert len({jobs[worker] for worker in ledger.worker}) >= 2  # work reached 2+ jobs


@pytest.mark.slurm
def test_a_cancelled_worker_job_does_not_stop_the_run(slurm, cohort6: Path, tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    process = start_run(cohort6, out, logs)
    deadline = time.monotonic() + 300
    while (tables.read_table(out, "ledger").status == "ok").sum() < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no progress before the cancel:\n{finish(process, 10)}")
        time.sleep(0.5)
    first_jobs = job_ids(logs)
    subprocess.run(["scancel", *map(str, first_jobs)], check=True)
    output = finish(process)
    assert process.returncode == 0, output
    ledger = tables.read_table(out, "ledger")
    assert set(ledger[ledger.status == "ok"].scan_id) == {f"sub-{i:03d}" for i in range(1, 7)}
    assert len(job_ids(logs) - first_jobs) >= 1  # a new worker job was asked for
    assert len(tables.read_table(out, "regions").query("region == 'whole_brain'")) == 6
    # The scans lost with the job are the driver's retries, in the ledger (Dask's own
    # silent reruns are off): a failed KilledWorker attempt, then an ok one.
    lost = ledger[ledger.status == "failed"]
    assert len(lost) >= 1 and set(lost.error_type) == {"KilledWorker"}, ledger
    for scan_id in lost.scan_id:
        attempts = ledger[ledger.scan_id == scan_id].sort_values("attempt")
        assert attempts.attempt.tolist()[-1] >= 2 and attempts.status.tolist()[-1] == "ok"


DRIVER_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "run_cohort.sbatch"
DRIVER_OPTIONS = (
    "--no-tta --step-size 1.0 --device cpu --cores 2 --memory 4GB --walltime 00:20:00 "
    "--max-jobs 2 --torch-threads 1"
)  # small worker jobs on the testbed; they win over the script's own (later options win)


@pytest.fixture(scope="module")
def cohort9(cohort6: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 scans (cohort6 and 3 of them again, under other ids): to stop runs mid-way."""
    manifest = pd.read_csv(cohort6)
    again = manifest.head(3).assign(scan_id=[f"sub-{i:03d}" for i in range(101, 104)])
    path = tmp_path_factory.mktemp("cohort9") / "nine.csv"
    pd.concat([manifest, again]).to_csv(path, index=False)
    return path


def submit_driver(manifest: Path, out: Path, folder: Path) -> int:
    """sbatch deploy/slurm/run_cohort.sbatch as a user would, from `folder`; the job id."""
    (folder / "logs").mkdir(exist_ok=True)  # SLURM opens the job's output file there first
    environment = dict(
        os.environ,
        SBATCH_PARTITION="gpu",  # the testbed's one partition, over the script's `cpu`
        PINGU_VENV=sys.prefix,
        PINGU_RUN_OPTIONS=DRIVER_OPTIONS,
        DASK_PINGU__FLUSH_EVERY_SCANS="1",
        COLUMNS="200",
    )
    submitted = subprocess.run(
        ["sbatch", "--parsable", str(DRIVER_SCRIPT), str(manifest), str(out), "demo"],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(submitted.stdout.strip().split(";")[0])


def job_state(job_id: int) -> str:
    """PENDING, RUNNING, ... or '' once SLURM has forgotten the job."""
    found = re.search(r"JobState=(\S+)", job_record(job_id))
    return found[1] if found else ""


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.5)


def ok_count(out: Path) -> int:
    return int((tables.read_table(out, "ledger").status == "ok").sum())


def driver_log(folder: Path, job_id: int) -> str:
    path = folder / "logs" / f"pingu-driver-{job_id}.out"
    return path.read_text() if path.exists() else ""


def ended(job_id: int) -> bool:
    return job_state(job_id) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")


def processes_gone(job_id: int) -> bool:
    """The job has ended and none of its processes is left. A cancelled job reads
    CANCELLED at once, while its processes still have KillWait (30 s) to clean up;
    squeue lists it as COMPLETING until the last of them has exited."""
    listed = subprocess.run(
        ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True
    )
    return ended(job_id) and listed.stdout.strip() in ("", "CANCELLED", "COMPLETED", "FAILED")


@pytest.mark.slurm
def test_a_driver_job_is_resubmitted_stopped_and_resumed_without_a_person(
    slurm, cohort9: Path, tmp_path: Path
) -> None:
    """deploy/slurm/run_cohort.sbatch end to end: near its walltime (USR1, as
    --signal=B:USR1@600 sends it) the job queues its successor and stops; the successor
    resumes; `scancel` of that one stops its driver by SIGTERM, which releases OUT/.lock;
    a SIGKILLed driver's lock from another node, stale by its heartbeat, does not stop
    the next job from finishing the cohort."""
    out = tmp_path / "out"
    first = submit_driver(cohort9, out, tmp_path)
    wait_until(lambda: ok_count(out) >= 1 or ended(first), "the first driver's first scan")
    assert not ended(first), driver_log(tmp_path, first)

    # The walltime is near: SLURM signals the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(first)], check=True)
    wait_until(lambda: ended(first), "the first driver job to end", 120)
    log = driver_log(tmp_path, first)
    assert "queueing the successor" in log and "driver exited with 143" in log, log
    successor = int(re.search(r"Submitted batch job (\d+)", log)[1])
    done_by_first = ok_count(out)
    assert done_by_first < 9, log

    # The successor resumes; a person cancels it mid-way (SIGTERM to the driver).
    wait_until(lambda: ok_count(out) > done_by_first or ended(successor), "the successor")
    assert not ended(successor), driver_log(tmp_path, successor)
    log = driver_log(tmp_path, successor)
    assert f"resuming: {done_by_first} scans done earlier are skipped" in log, log
    assert "took over a stale lock" not in log  # the first driver released it
    subprocess.run(["scancel", str(successor)], check=True)
    wait_until(lambda: processes_gone(successor), "the cancelled driver to exit", 120)
    log = driver_log(tmp_path, successor)
    assert "interrupted by SIGTERM" in log, log
    assert not (out / ".lock").exists(), log  # released on SIGTERM
    done_by_second = ok_count(out)
    assert done_by_second < 9, log

    # As if a driver had been SIGKILLed on another node: its lock stays, its heartbeat
    # stops. Past the stale time the next job takes it over and finishes the cohort.
    stale = {
        "host": "gpu-node-17",
        "pid": 4242,
        "started": "2026-01-01T00:00:00+00:00",
        "heartbeat": "2026-01-01T00:05:00+00:00",
        "command": "pingu-dask run",
    }
    (out / ".lock").write_text(json.dumps(stale))
    last = submit_driver(cohort9, out, tmp_path)
    wait_until(lambda: ended(last), "the last driver job to finish the cohort", 600)
    log = driver_log(tmp_path, last)
    assert "took over a stale lock of pid 4242 on gpu-node-17" in log, log
    assert f"resuming: {done_by_second} scans done earlier are skipped" in log, log
    assert "driver exited with 0" in log, log
    assert not (out / ".lock").exists()
    regions = tables.read_table(out, "regions").query("region == 'whole_brain'")
    assert sorted(regions.scan_id) == sorted(pd.read_csv(cohort9).scan_id)  # each once
    wait_until(lambda: not running_worker_jobs(), "the worker jobs to end", 90)


def test_lifetime_is_safely_below_the_walltime() -> None:
    for walltime in ("00:20:00", "01:00:00", "12:00:00", "2-00:00:00"):
        total = parse_walltime(walltime)
        arguments = lifetime_arguments(walltime)
        lifetime = int(arguments[1].rstrip("s"))
        stagger = int(arguments[3].rstrip("s"))
        assert lifetime + stagger / 2 <= total - 60  # leaves a minute at the very least
        assert lifetime >= total / 2
    assert parse_walltime("90") == 5400 and parse_walltime("1-00:00:00") == 86400


def test_slurm_and_pbs_job_scripts() -> None:
    options = JobOptions(
        cores=8,
        memory="32GB",
        processes=2,
        walltime="04:00:00",
        queue="gpu",
        account="lab42",
        prologue=("module load cuda/12.4", "source /opt/pingu/venv/bin/activate"),
        max_jobs=3,
    )
    script = job_script("slurm", options)
    for line in (
        "#SBATCH -p gpu",
        "#SBATCH -A lab42",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH -t 04:00:00",
        "#SBATCH --gres=gpu:2",
        "module load cuda/12.4",
        "export DASK_PINGU__WORKER_THREADS=4",
    ):
        assert line in script, (line, script)
    assert "-m pingu_dask.run.worker" in script and "--resources GPU=1" in script
    assert "--nworkers 2" in script and "--lifetime 12660s --lifetime-stagger 300s" in script

    # No PBS server is installable here: the generated script is checked as text only.
    script = job_script("pbs", options)
    for line in (
        "#PBS -q gpu",
        "#PBS -A lab42",
        "#PBS -l select=1:ncpus=8:mem=32GB:ngpus=2",
        "#PBS -l walltime=04:00:00",
        "source /opt/pingu/venv/bin/activate",
    ):
        assert line in script, (line, script)
    assert "-m pingu_dask.run.worker" in script and "--resources GPU=1" in script


def job_script(kind: str, options: JobOptions) -> str:
    """The worker job script a batch cluster would submit (nothing is submitted)."""
    cluster = jobqueue_cluster(kind, options)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def test_dry_run_prints_the_job_script_and_queues_nothing() -> None:
    from click.testing import CliRunner

    from pingu_dask.cli import main

    arguments = ["run", "unused.csv", "--out", "unused", "--cluster", "slurm", "--dry-run"]
    result = CliRunner().invoke(main, [*arguments, "--walltime", "00:30:00", "--gpus-per-job", "0"])
    assert result.exit_code == 0, result.output
    assert "#SBATCH -t 00:30:00" in result.output and "--gres" not in result.output
    assert "--lifetime 1410s --lifetime-stagger 90s" in result.output
    assert not Path("unused").exists()


def test_the_deploy_jobqueue_file_drives_the_job_script() -> None:
    import dask.config
    import dask_jobqueue  # noqa: F401  (its config defaults first, as at a user's import)
    import yaml

    document = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "jobqueue.yaml").read_text())
    # As Dask does with a file in ~/.config/dask: merged over the defaults.
    with dask.config.set(dask.config.merge(dask.config.config, document)):
        cluster = jobqueue_cluster("slurm", JobOptions(config_name="slurm-a100"))
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    for line in ("#SBATCH -p gpu", "--constraint=a100", "#SBATCH --gres=gpu:2", "-t 12:00:00"):
        assert line in script, (line, script)
    assert "--nworkers 2" in script and "module load cuda/12.4" in script
    options = JobOptions(python="apptainer exec --nv pingu.sif python", walltime="00:30:00")
    cluster = jobqueue_cluster("slurm", options)
    try:
        command = "apptainer exec --nv pingu.sif python -m pingu_dask.run.worker"
        assert command in cluster.job_script()
    finally:
        cluster.close()


@pytest.mark.slurm
def test_slurm_accepts_the_dry_run_job_script(slurm, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pingu_dask.cli import main

    arguments = ["run", "m.csv", "--out", "o", "--cluster", "slurm", "--dry-run"]
    options = ["--cores", "2", "--memory", "4GB", "--walltime", "01:00:00"]
    result = CliRunner().invoke(main, [*arguments, *options])
    assert result.exit_code == 0, result.output
    script = tmp_path / "worker.sbatch"
    script.write_text(result.output)
    check = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    # sbatch --test-only validates the script and its resources without queuing it.
    assert check.returncode == 0, check.stderr
    assert "to start at" in check.stderr
