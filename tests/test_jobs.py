"""Batch clusters as dask-jobqueue means them to be built, and closed to other users (TLS).

No batch system is needed: a cluster's scheduler starts here and no job is asked for.
Runs through a real SLURM are in test_slurm.py.
"""

from __future__ import annotations

import copy
import re
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import dask.config
import pytest
from distributed import Client
from distributed.security import Security

from pingu_dask.run.jobqueue import PBSCluster, PBSJob, SLURMCluster, SLURMJob
from pingu_dask.run.jobs import (
    GpuPBSJob,
    GpuSLURMJob,
    JobOptions,
    job_shape,
    jobqueue_cluster,
)

PINGU_RUN = Path(__file__).resolve().parents[1] / "pingu_dask" / "run"


def refusal(address: str, security: Security | None = None, timeout: float = 3) -> str:
    """How a client at `address` with `security` (None: none) fails to get in ('' if
    it gets in)."""
    try:
        with Client(address, security=security, timeout=timeout, set_as_default=False) as client:
            client.scheduler_info()
    except Exception as error:  # OSError, TimeoutError, CommClosedError: kept out
        return f"{type(error).__name__}: {error}"
    return ""


def refusal_without_client_certificate(address: str, ca: str) -> str:
    """TLS that trusts the scheduler (knows its CA) but shows no certificate of its own:
    how the scheduler ends the connection after the handshake ('' if it lets the client
    talk)."""
    where = urlparse(address)
    context = ssl.create_default_context(cadata=ca)
    context.check_hostname = False  # Dask's certificates name no host
    raw = socket.create_connection((where.hostname, where.port), timeout=5)
    with context.wrap_socket(raw) as tls:  # TLS 1.3: the client's side completes
        try:
            tls.sendall(b"\0" * 8)
            return "closed" if tls.recv(1) == b"" else ""
        except OSError as error:  # ssl.SSLError: the alert, or EOF
            return f"{type(error).__name__}: {error}"


def assert_strangers_are_refused(address: str, ca: str | None = None) -> None:
    """Clients without the run's credentials do not get in: plain TCP to the port, TLS
    with a certificate of their own, and (given the run's CA, as if its public
    certificate had leaked) TLS that trusts the scheduler but has no client certificate:
    the scheduler asks for one."""
    assert address.startswith("tls://"), address
    plain = refusal(address.replace("tls://", "tcp://", 1))
    assert plain, "a plain TCP client got in"
    own = refusal(address, Security.temporary())
    assert "certificate" in own, own
    if ca is not None:
        # The scheduler sends "certificate required" and closes (or just closes).
        assert refusal_without_client_certificate(address, ca)


def cluster_with(tmp_path: Path, kind: str = "slurm", **options):
    with dask.config.set({"pingu.batch-tls-directory": str(tmp_path / "tls")}):
        return jobqueue_cluster(kind, JobOptions(**options), dashboard_address="127.0.0.1:0")


def test_batch_clusters_are_dask_jobqueues_with_our_job_classes(tmp_path: Path) -> None:
    assert issubclass(GpuSLURMJob, SLURMJob) and issubclass(GpuPBSJob, PBSJob)
    for kind, cluster_type, job_type in (
        ("slurm", SLURMCluster, GpuSLURMJob),
        ("pbs", PBSCluster, GpuPBSJob),
    ):
        with cluster_with(tmp_path, kind, tls=False) as cluster:
            assert isinstance(cluster, cluster_type) and cluster.job_cls is job_type
            assert "-m pingu_dask.run.worker" in cluster.job_script()


def test_tls_is_on_by_default_and_strangers_are_refused(tmp_path: Path) -> None:
    with cluster_with(tmp_path) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        script = cluster.job_script()
        assert f"-m pingu_dask.run.worker {cluster.scheduler_address} " in script
        # The worker's key and certificate: in the shared folder, for the user's eyes only.
        files = {flag: Path(path) for flag, path in re.findall(r"--(tls-\S+) (\S+)", script)}
        assert set(files) == {"tls-ca-file", "tls-cert", "tls-key"}, script
        for path in files.values():
            assert path.parent == (tmp_path / "tls").resolve() and path.exists()
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
        with Client(cluster, timeout=10) as client:  # the driver's: the cluster's security
            assert client.scheduler_info()["address"] == cluster.scheduler_address
        assert refusal(cluster.scheduler_address, cluster.security) == ""  # the control
        assert_strangers_are_refused(cluster.scheduler_address, cluster.security.tls_ca_file)


@pytest.mark.parametrize(
    ("options", "setting"),
    [({"tls": False}, True), ({}, False), ({}, "false"), ({"tls": False}, None)],
)
def test_tls_can_be_turned_off(tmp_path: Path, options: dict, setting) -> None:
    values = {} if setting is None else {"pingu.batch-tls": setting}
    with dask.config.set(values), cluster_with(tmp_path, **options) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        assert "--tls" not in cluster.job_script() and "tcp://" in cluster.job_script()
    assert not (tmp_path / "tls").exists()


def test_the_command_line_turns_tls_on_over_the_config(tmp_path: Path) -> None:
    with dask.config.set({"pingu.batch-tls": False}), cluster_with(tmp_path, tls=True) as cluster:
        assert cluster.scheduler_address.startswith("tls://")


def jobqueue_and_scheduler_config() -> dict:
    """What building a batch cluster could have changed in Dask's config (the whole of
    it would see other tests' clients come and go)."""
    sections = ("jobqueue", "distributed.scheduler", "distributed.nanny", "pingu")
    return copy.deepcopy({name: dask.config.get(name) for name in sections})


def test_building_a_batch_cluster_leaves_dasks_config_as_it_was(tmp_path: Path) -> None:
    named = {"cores": 16, "processes": 2, "job-extra-directives": ["--constraint=a100"]}
    with dask.config.set({"jobqueue.slurm-a100": named}):
        before = jobqueue_and_scheduler_config()
        with cluster_with(tmp_path, config_name="slurm-a100", walltime="02:00:00") as cluster:
            script = cluster.job_script()
            # The named section was not merged into the base one, nor anything set.
            assert jobqueue_and_scheduler_config() == before
        assert jobqueue_and_scheduler_config() == before
    for line in ("--constraint=a100", "--gres=gpu:2", "--cpus-per-task=16", "-t 02:00:00"):
        assert line in script, (line, script)
    assert "--nworkers 2" in script and "export DASK_PINGU__WORKER_THREADS=8" in script


def test_a_named_section_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no section jobqueue\.nowhere"):
        cluster_with(tmp_path, config_name="nowhere", tls=False)


def test_a_configured_pbs_resource_spec_wins_over_ours(tmp_path: Path) -> None:
    spec = "select=1:ncpus=8:ngpus=1:gpu_model=a100"
    configured = dask.config.set({"jobqueue.pbs.resource-spec": spec})
    with configured, cluster_with(tmp_path, "pbs", tls=False) as cluster:
        script = cluster.job_script()
    assert f"#PBS -l {spec}" in script and "mem=" not in script
    with cluster_with(tmp_path, "pbs", tls=False, cores=4, memory="8 GB") as cluster:
        assert "#PBS -l select=1:ncpus=4:mem=8GB:ngpus=1" in cluster.job_script()


def test_the_job_shape_is_the_options_over_the_config() -> None:
    shape = job_shape("slurm", JobOptions(cores=8, processes=2, memory="32GB"))
    assert (shape.cores, shape.processes, shape.gpus, shape.threads) == (8, 2, 2, 4)
    with dask.config.set({"jobqueue.slurm.cores": 6, "jobqueue.slurm.walltime": None}):
        shape = job_shape("slurm", JobOptions(gpus_per_job=0))
    assert (shape.cores, shape.gpus, shape.walltime, shape.memory) == (6, 0, "01:00:00", "16GB")


def test_no_private_dask_api_in_the_cluster_modules() -> None:
    """No `._name` attribute of another library's object (dask-jobqueue's _dummy_job,
    SpecCluster's _correct_state, ...): only what they document."""
    for name in ("jobs.py", "local.py", "clusters.py", "worker.py"):
        text = (PINGU_RUN / name).read_text()
        assert not re.findall(r"\w\._[a-z]\w*", text), name


def test_a_second_client_on_a_tls_cluster_connects_with_the_first_clients_credentials(
    tmp_path: Path,
) -> None:
    """`train` scores its folds through a second client on its batch cluster's address,
    given the first client's credentials (ClusterRequest.security); without them that
    client is refused (no work left: no job is asked for)."""
    from pingu_dask.run.clusters import ClusterRequest, open_client

    request = ClusterRequest("slurm", dashboard_address="127.0.0.1:0")
    with (
        dask.config.set({"pingu.batch-tls-directory": str(tmp_path / "tls")}),
        open_client(request, 0, "cpu") as (client, _),
    ):
        address = client.scheduler.address
        assert address.startswith("tls://")
        given = ClusterRequest(address, security=client.security)
        with open_client(given, 0, "cpu") as (again, _):
            assert again.scheduler_info()["address"] == address
        assert refusal(address)  # the address alone is not enough
    assert refusal(address)  # closed with the first client's cluster


def test_importing_the_batch_code_leaves_ctrl_c_to_python() -> None:
    """dask_jobqueue's runner module sets SIGINT to sys.exit() when imported: Ctrl-C
    then ended a run with exit 0 and no clean-up message. A fresh interpreter that
    imports the CLI and the batch code keeps Python's own handler."""
    code = (
        "import signal, pingu_dask.cli, pingu_dask.run.jobs, dask_jobqueue\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
