"""Batch-system options of `pingu-dask run` (--cluster slurm|pbs)."""

from __future__ import annotations

import click

from pingu_dask.cli.common import option_group
from pingu_dask.config import setting
from pingu_dask.run.jobs import JobOptions

# Options for SLURM/PBS worker jobs; unset ones come from Dask's jobqueue config.
jobqueue_options = option_group(
    click.option(
        "--jobqueue-config",
        default=None,
        help="Section of Dask's jobqueue.yaml to start from (default: slurm or pbs).",
    ),
    click.option("--cores", type=click.IntRange(min=1), default=None, help="Cores per job."),
    click.option("--memory", default=None, help="Memory per job, e.g. 32GB."),
    click.option(
        "--processes",
        type=click.IntRange(min=1),
        default=None,
        help="Worker processes per job: one per GPU (default 1).",
    ),
    click.option(
        "--gpus-per-job",
        type=click.IntRange(min=0),
        default=None,
        help="GPUs per job (default: one per worker process; 0 for CPU-only jobs).",
    ),
    click.option(
        "--walltime",
        default=None,
        help="Job walltime, HH:MM:SS (default: jobqueue.yaml's walltime, which "
        f"dask-jobqueue ships as 00:30:00; without one, {setting('job-walltime')}).",
    ),
    click.option("--queue", default=None, help="Partition (SLURM) or queue (PBS)."),
    click.option("--account", default=None, help="Account / project to charge."),
    click.option(
        "--prologue",
        multiple=True,
        help="A line run before the worker starts (repeatable): module load, source venv.",
    ),
    click.option("--log-dir", default=None, help="Folder for the jobs' output files."),
    click.option(
        "--worker-python",
        default=None,
        help="Python command for worker jobs (default: this interpreter), e.g. "
        "'apptainer exec --nv pingu-dask.sif python'.",
    ),
    click.option(
        "--job-extra",
        multiple=True,
        help="An extra directive for the job script (repeatable), e.g. --constraint=a100.",
    ),
    click.option(
        "--min-jobs", type=click.IntRange(min=0), default=setting("min-jobs"), show_default=True
    ),
    click.option(
        "--max-jobs",
        type=click.IntRange(min=1),
        default=setting("max-jobs"),
        show_default=True,
        help="At most this many worker jobs (fewer when fewer scans are left).",
    ),
    click.option(
        "--tls/--no-tls",
        default=None,
        help="TLS between the scheduler and the worker jobs, with a certificate made for "
        "the run: nobody else who can reach the scheduler's port can connect "
        "(default: config pingu.batch-tls, on). --no-tls: plain TCP, only on a network "
        "that only you can reach.",
    ),
    click.option(
        "--dry-run",
        is_flag=True,
        help="Print the worker job script and stop; nothing is queued.",
    ),
)


def job_options(values: dict) -> JobOptions:
    """JobOptions from the parsed options (the keys jobqueue_options adds)."""
    return JobOptions(
        config_name=values.pop("jobqueue_config"),
        cores=values.pop("cores"),
        memory=values.pop("memory"),
        processes=values.pop("processes"),
        gpus_per_job=values.pop("gpus_per_job"),
        walltime=values.pop("walltime"),
        queue=values.pop("queue"),
        account=values.pop("account"),
        prologue=tuple(values.pop("prologue")),
        log_directory=values.pop("log_dir"),
        python=values.pop("worker_python"),
        job_extra=tuple(values.pop("job_extra")),
        min_jobs=values.pop("min_jobs"),
        max_jobs=values.pop("max_jobs"),
        tls=values.pop("tls"),
    )
