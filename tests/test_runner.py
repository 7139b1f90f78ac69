"""The cohort runner under faults: killed workers, a killed driver, broken inputs, locks.

Real parts: real nnU-Net v2 model folders run by the real predictor, LocalClusters of
separate worker processes, and the `pingu-dask` command in a subprocess where the
driver itself is killed. Inference runs with a sliding-window step of 1.0 (no tile
overlap) to keep the runs short. The fault tests (killed workers and drivers,
signals, broken inputs) run the tiny RANDOM-weight model (conftest's `tiny_model`):
what they check is the runner, not the masks, and it makes their runs ~4x shorter;
the tests about the model itself (its fingerprint, reuse, a corrupt checkpoint) run
the bundled demo model.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from distributed import Client
from helpers import absolute_manifest

from pingu_dask.cli import main
from pingu_dask.config import InferenceSettings, PvsClusterRules
from pingu_dask.inputs.manifest import load_manifest
from pingu_dask.nnunet.engine import nnunet_model
from pingu_dask.nnunet.model import resolve_model
from pingu_dask.nnunet.predictor import load_counts
from pingu_dask.output import tables
from pingu_dask.output.lock import read_lock
from pingu_dask.run.local import local_cluster
from pingu_dask.run.loop import Segmentation, segment_scans
from pingu_dask.run.orchestrate import RunRefused, check_settings
from pingu_dask.run.stages import Pipeline
from pingu_dask.synth.cohort import generate_cohort

FAST = InferenceSettings(tta=False, step_size=1.0, device="cpu", torch_threads=1)
FAST_OPTIONS = ["--model", "demo", "--no-tta", "--step-size", "1.0", "--device", "cpu"]
N_SCANS = 12  # the module's cohort


def tiny_options(tiny_model: Path) -> list[str]:
    """FAST_OPTIONS with the tiny random-weight model instead of the demo model."""
    return [o if o != "demo" else str(tiny_model) for o in FAST_OPTIONS]


@pytest.fixture(scope="module")
def cohort12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort12")
    generate_cohort(root, n_scans=N_SCANS, seed=11, jobs=2)
    return root


def whole_brain_rows(out: Path) -> pd.Series:
    regions = tables.read_table(out, "regions")
    return regions[regions.region == "whole_brain"]["scan_id"].value_counts()


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_survived(
    cohort12: Path, tiny_model: Path, tmp_path: Path
) -> None:
    scans = load_manifest(cohort12 / "manifest.csv").scans
    out = tmp_path / "out"
    pipeline = Pipeline(nnunet_model(tiny_model), FAST, out)
    killed: list[str] = []
    cluster = local_cluster(n_workers=2, threads_per_worker=2, torch_threads=1)
    with cluster, Client(cluster) as client:
        pids = client.run(os.getpid)

        def kill_one_worker(progress) -> None:
            if progress.done >= 3 and not killed:
                address, pid = sorted(pids.items())[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(address)

        records = segment_scans(
            client, Segmentation(scans=scans, pipeline=pipeline, on_progress=kill_one_worker)
        )
    assert killed
    assert sorted(r.scan_id for r in records) == sorted(s.scan_id for s in scans)
    assert all(r.status == "ok" for r in records)
    counts = whole_brain_rows(out)
    assert len(counts) == N_SCANS and set(counts) == {1}  # every scan exactly once
    ledger = tables.read_table(out, "ledger")
    assert (ledger.status == "ok").sum() == N_SCANS
    retried = ledger[ledger.status == "failed"]
    assert len(retried) >= 1
    assert set(retried.error_type) == {"KilledWorker"} and retried.retryable.all()
    assert "worker process died" in retried.message.iloc[0]
    for scan_id in retried.scan_id:
        attempts = ledger[ledger.scan_id == scan_id].sort_values("attempt")
        assert attempts.status.tolist()[-1] == "ok" and attempts.attempt.max() >= 2


def run_command(manifest: Path, out: Path, model: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pingu_dask.cli", "run", str(manifest), "--out", str(out)]
    environment = dict(os.environ, DASK_PINGU__FLUSH_EVERY_SCANS="1")
    return subprocess.Popen(
        [*command, *tiny_options(model), "--workers", "2"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the driver and its workers
        preexec_fn=_default_sighup,
    )


def _default_sighup() -> None:
    """The driver handles SIGHUP unless told to ignore it: a test suite started under
    `nohup` would tell it so through the inherited disposition."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def wait_for_ok_rows(process: subprocess.Popen, out: Path, at_least: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended too early:\n{process.stdout.read()}")
        if (tables.read_table(out, "ledger").status == "ok").sum() >= at_least:
            return
        time.sleep(0.5)
    pytest.fail("the run made no progress")


def ok_scans(out: Path) -> set[str]:
    return set(tables.read_table(out, "ledger").query("status == 'ok'").scan_id)


@pytest.mark.slow
def test_ctrl_c_and_a_killed_driver_are_resumed_without_redoing_finished_scans(
    cohort12: Path, tiny_model: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "ten.csv"
    absolute_manifest(cohort12, manifest, rows=10)
    out = tmp_path / "out"

    # Ctrl-C in a terminal: SIGINT to the driver and its workers.
    interrupted = run_command(manifest, out, tiny_model)
    wait_for_ok_rows(interrupted, out, 1)
    status = CliRunner().invoke(main, ["status", str(out)])  # while the run is going
    assert status.exit_code == 1 and f"running now: pid {interrupted.pid}" in status.output
    os.killpg(interrupted.pid, signal.SIGINT)
    output, _ = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, output
    assert "interrupted: in-flight scans cancelled" in output
    assert not (out / ".lock").exists()
    after_interrupt = ok_scans(out)
    assert len(whole_brain_rows(out)) == len(after_interrupt) >= 1

    # A driver killed outright leaves its lock and maybe a half-written flush.
    first = run_command(manifest, out, tiny_model)
    wait_for_ok_rows(first, out, len(after_interrupt) + 2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert read_lock(out)["stale"]  # the dead driver's lock is left behind

    done_before = ok_scans(out)
    assert len(after_interrupt) + 2 <= len(done_before) < 10
    second = run_command(manifest, out, tiny_model)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    assert f"resuming: {len(done_before)} scans done earlier are skipped" in output
    ledger = tables.read_table(out, "ledger")
    last_run = ledger.sort_values("finished").run_id.iloc[-1]
    redone = set(ledger[ledger.run_id == last_run].scan_id)
    assert redone == {f"sub-{i:03d}" for i in range(1, 11)} - done_before
    counts = whole_brain_rows(out)
    assert len(counts) == 10 and set(counts) == {1}  # no duplicate rows
    assert not (out / ".lock").exists()

    # An input that changed since is redone; nothing else is.
    t1w = cohort12 / "sub-002" / "anat" / "sub-002_T1w.nii.gz"
    os.utime(t1w, ns=(time.time_ns(), time.time_ns()))
    third = run_command(manifest, out, tiny_model)
    output, _ = third.communicate(timeout=600)
    assert third.returncode == 0, output
    assert "9 scans done earlier are skipped, 1 to do (1 of them changed since)" in output
    counts = whole_brain_rows(out)
    assert len(counts) == 10 and set(counts) == {1}

    # Other settings into the same OUT are refused.
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(manifest),
            "--out",
            str(out),
            *tiny_options(tiny_model),
            "--min-cluster-voxels",
            "9",
        ],
    )
    assert result.exit_code == 1
    assert "holds results of another model or other settings (different: clusters)" in " ".join(
        result.output.split()
    )


def broken_cohort(cohort: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """4 good scans and 12 kinds of broken input; returns the manifest and expected errors."""
    manifest = absolute_manifest(cohort, root / "good.csv", rows=4)
    good = manifest.iloc[0]
    image = nib.load(good.t1w)
    data = np.asarray(image.dataobj, dtype=np.float32)
    bad = root / "bad"
    bad.mkdir()

    def save(name: str, array: np.ndarray, affine=image.affine) -> str:
        path = bad / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), path)
        return str(path)

    raw = gzip.decompress(Path(good.t1w).read_bytes())
    (bad / "truncated.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    (bad / "text.nii.gz").write_text("not an image")
    with_nan = data.copy()
    with_nan[40:50, 40:50, 20:30] = np.nan
    shifted = image.affine.copy()
    shifted[:3, 3] += 1000.0
    parcellation = np.asarray(nib.load(good.parcellation).dataobj)
    rows = {
        "missing": dict(t1w=str(bad / "nowhere.nii.gz")),
        "not_nifti": dict(t1w=str(bad / "text.nii.gz")),
        "flat2d": dict(t1w=save("flat2d", data[:, :, 10])),
        "fourd": dict(t1w=save("fourd", np.stack([data, data], axis=-1))),
        "sub-001": dict(),  # a duplicate of the first good scan's id
        "../escape": dict(),
        "no_t1w": dict(t1w=""),
        "truncated": dict(t1w=str(bad / "truncated.nii.gz")),
        "nan_voxels": dict(t1w=save("nan", with_nan)),
        "empty": dict(t1w=save("empty", np.zeros_like(data))),
        "parc_elsewhere": dict(parcellation=save("parc_far", parcellation, shifted)),
        "parc_not_labels": dict(parcellation=save("parc_float", parcellation + 0.5)),
    }
    expected = {
        "missing": "file not found",
        "not_nifti": "cannot read NIfTI header",
        "flat2d": "3D",
        "fourd": "3D",
        "sub-001": "duplicate",
        "../escape": "scan_id",
        "no_t1w": "t1w",
        "truncated": "truncated or corrupt",
        "nan_voxels": "NaN or infinite",
        "empty": "image is empty",
        "parc_elsewhere": "does not overlap the image",
        "parc_not_labels": "non-integer values",
    }
    broken = []
    for scan_id, changes in rows.items():
        row = good.to_dict()
        row.update(scan_id=scan_id, subject=scan_id.strip("./"), **changes)
        broken.append(row)
    mixed = pd.concat([manifest, pd.DataFrame(broken)], ignore_index=True)
    mixed.to_csv(root / "mixed.csv", index=False)
    return root / "mixed.csv", expected


@pytest.mark.slow
def test_broken_inputs_each_get_a_clear_row_and_good_scans_finish(
    cohort12: Path, tiny_model: Path, tmp_path: Path
) -> None:
    manifest, expected = broken_cohort(cohort12, tmp_path)
    out = tmp_path / "run" / "out"
    options = tiny_options(tiny_model)
    arguments = ["run", str(manifest), "--out", str(out), *options, "--workers", "2"]
    result = CliRunner().invoke(main, [*arguments, "--skip-invalid"])
    assert result.exit_code == 1, result.output
    ledger = tables.read_table(out, "ledger")
    good = [f"sub-{i:03d}" for i in range(1, 5)]
    assert set(ledger.query("status == 'ok'").scan_id) == set(good)
    assert len(whole_brain_rows(out)) == 4
    bad = ledger[ledger.status != "ok"]
    for scan_id, phrase in expected.items():
        if scan_id == "sub-001":  # the duplicate row: reported by its row number
            rows = bad[bad.message.str.contains("duplicate")]
        else:
            rows = bad[bad.scan_id == scan_id]
        assert len(rows) == 1, (scan_id, bad[["scan_id", "message"]].to_string())
        row = rows.iloc[0]
        assert phrase in row.message, (scan_id, row.message)
        assert not row.retryable and row.attempt <= 1  # input errors are not retried
    failed = bad[bad.status == "failed"]
    assert set(failed.scan_id) == {
        "truncated",
        "nan_voxels",
        "empty",
        "parc_elsewhere",
        "parc_not_labels",
    }
    # The unsafe id created nothing, inside or outside OUT.
    assert not list(tmp_path.rglob("*escape*"))
    status = CliRunner().invoke(main, ["status", str(out)])
    assert status.exit_code == 1
    text = " ".join(status.output.split())
    assert "4 done, 5 failed, 7 invalid manifest rows" in text
    assert "ImageError" in text and "RegionError" in text and "ManifestError" in text


def test_other_settings_are_refused_unless_forced(tmp_path: Path) -> None:
    from pingu_dask.output import layout
    from pingu_dask.run.provenance import provenance

    model = nnunet_model("demo")
    first = Pipeline(model, FAST, tmp_path)
    layout.prepare_output(tmp_path)
    layout.write_json(tmp_path / layout.RUN_JSON, provenance(first, None, 1))
    check_settings(tmp_path, first, force=False)  # the same settings: fine
    other = Pipeline(model, FAST, tmp_path, PvsClusterRules(connectivity=6))
    with pytest.raises(RunRefused, match=r"different: clusters"):
        check_settings(tmp_path, other, force=False)
    check_settings(tmp_path, other, force=True)
    assert not (tmp_path / layout.RUN_JSON).exists() and not (tmp_path / layout.MASKS).exists()


def test_other_versions_are_refused_on_resume_unless_allowed(cohort: Path, tmp_path: Path) -> None:
    from pingu_dask.output import layout
    from pingu_dask.run.orchestrate import current_versions
    from pingu_dask.run.provenance import provenance

    pipeline = Pipeline(nnunet_model("demo"), FAST, tmp_path)
    layout.prepare_output(tmp_path)
    run_info = provenance(pipeline, None, 1)
    run_info["runs"] = [{"run_id": "earlier", "versions": current_versions()}]
    layout.write_json(tmp_path / layout.RUN_JSON, run_info)
    check_settings(tmp_path, pipeline, force=False)  # the same versions: fine

    run_info["runs"][-1]["versions"].update({"torch": "2.0.0", "nnunetv2": "2.5"})
    layout.write_json(tmp_path / layout.RUN_JSON, run_info)
    with pytest.raises(RunRefused) as refused:
        check_settings(tmp_path, pipeline, force=False)
    now = current_versions()
    assert f"nnunetv2 2.5 -> {now['nnunetv2']}; torch 2.0.0 -> {now['torch']}" in str(refused.value)
    check_settings(tmp_path, pipeline, force=False, allow_version_change=True)
    assert (tmp_path / layout.RUN_JSON).exists()  # allowed: nothing deleted

    # The CLI refuses before any work, naming the option.
    manifest = tmp_path / "one.csv"
    absolute_manifest(cohort, manifest, rows=1)
    result = CliRunner().invoke(main, ["run", str(manifest), "--out", str(tmp_path), *FAST_OPTIONS])
    assert result.exit_code == 1
    assert "--allow-version-change" in " ".join(result.output.split())
    assert tables.read_table(tmp_path, "ledger").empty


def test_status_counts_the_scans_of_the_latest_manifest(tmp_path: Path) -> None:
    """An OUT first run with 5 scans, then with a manifest of 3 of them and 1 new one."""
    from pingu_dask.output import layout, ledger

    started = ledger.now()
    with tables.TableWriter(tmp_path) as writer:
        for i in range(1, 6):
            row = ledger.attempt_row(f"sub-{i}", "a", ledger.OK, 1, "first", started)
            writer.add({}, [row])
    layout.write_json(tmp_path / layout.RUN_JSON, {"n_scans": 4})
    ledger.write_manifest_scans(tmp_path, ["sub-1", "sub-2", "sub-3", "sub-9"])
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    text = " ".join(result.output.split())
    assert "3 done, 0 failed, 0 invalid manifest rows, 1 not done yet (of 4 scans)" in text
    assert "2 scans of earlier manifests not counted" in text
    assert result.exit_code == 1  # not all done


@pytest.mark.slow
def test_a_model_that_cannot_load_trips_the_circuit_breaker(cohort12: Path, tmp_path: Path) -> None:
    """A real model whose weights do not fit its plans.json (what the checkpoint check
    before dispatch cannot see: each checkpoint loads; only building the network fails):
    every worker fails to load it (a ModelError, which would repeat: not retried). After
    4 scans (the breaker's setting here) the run stops, says why in one line and exits
    3, instead of failing all 12. (A truncated checkpoint stops the run before any scan:
    tests/test_model_check.py.)"""
    import shutil

    from pingu_dask.nnunet.model import demo_model_folder

    broken = tmp_path / "broken_model"
    shutil.copytree(demo_model_folder(), broken)
    plans = json.loads((broken / "plans.json").read_text())
    architecture = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    architecture["features_per_stage"] = [2 * f for f in architecture["features_per_stage"]]
    (broken / "plans.json").write_text(json.dumps(plans))
    manifest = tmp_path / "all.csv"
    absolute_manifest(cohort12, manifest, rows=N_SCANS)
    out = tmp_path / "out"
    options = [o if o != "demo" else str(broken) for o in FAST_OPTIONS]
    process = subprocess.run(
        [sys.executable, "-m", "pingu_dask.cli", "run", str(manifest), "--out", str(out),
         *options, "--workers", "2"],
        env=dict(os.environ, DASK_PINGU__CIRCUIT_BREAKER_SCANS="4", COLUMNS="200"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = process.stdout + process.stderr
    assert process.returncode == 3, output
    line = (
        r"stopped: the first attempts of 4 scans in a row failed with ModelError"
        r" on (\d) worker\(s\)"
    )
    found = re.search(line, " ".join(output.split()))
    assert found and "plans.json does not describe the saved weights" in output, output
    ledger = tables.read_table(out, "ledger")
    assert set(ledger.status) == {"failed"} and set(ledger.error_type) == {"ModelError"}
    assert set(ledger.attempt) == {1}  # a model that cannot load is not retried
    assert 4 <= ledger.scan_id.nunique() < N_SCANS  # stopped early; the rest left to do
    # Which worker takes the first scans is the scheduler's choice (one may hold
    # several in flight before the other reports): the breaker then trips on the one
    # worker it has seen, and the line says so.
    assert 1 <= int(found.group(1)) <= ledger.worker.nunique() <= 2
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_run_joins_an_existing_scheduler(cohort12: Path, tmp_path: Path) -> None:

    manifest = tmp_path / "two.csv"
    absolute_manifest(cohort12, manifest, rows=2)
    out = tmp_path / "out"
    with local_cluster(n_workers=1, threads_per_worker=2, torch_threads=2) as cluster:
        address = cluster.scheduler_address
        arguments = ["run", str(manifest), "--out", str(out), *FAST_OPTIONS, "--cluster", address]
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 0, result.output
        assert f"scheduler {address}" in result.output
        with Client(cluster) as client:
            loads = client.run(load_counts)
            page = f"{client.dashboard_link.removesuffix('/status')}/pingu"
        # The run's page stays on a scheduler that outlives the run.
        assert f"this run's page: {page}" in result.output
        with urllib.request.urlopen(page + "/status.json", timeout=30) as response:
            status = json.loads(response.read())
        assert (status["counts"]["done"], status["run"]["status"]) == (2, "finished")
    assert list(loads.values()) == [{resolve_model("demo").fingerprint: 1}]
    assert len(whole_brain_rows(out)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_run_like_ctrl_c(
    cohort12: Path, tiny_model: Path, tmp_path: Path, signum: int
) -> None:
    """What SLURM does at the walltime or on scancel (SIGTERM to the job's processes):
    the driver cancels, flushes, releases OUT/.lock and exits 128 + signum; the same
    command then resumes without anyone deleting anything."""
    manifest = tmp_path / "eight.csv"
    absolute_manifest(cohort12, manifest, rows=8)  # the tiny model does 4 in ~5 s
    out = tmp_path / "out"
    stopped = run_command(manifest, out, tiny_model)
    wait_for_ok_rows(stopped, out, 1)
    os.killpg(stopped.pid, signum)
    output, _ = stopped.communicate(timeout=120)
    assert stopped.returncode == 128 + signum, output
    assert signal.Signals(signum).name in output and "resume" in output
    assert read_lock(out) is None  # released: a resubmitted driver is not refused
    kept = ok_scans(out)
    assert len(kept) >= 1
    resumed = run_command(manifest, out, tiny_model)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert ok_scans(out) == {f"sub-{i:03d}" for i in range(1, 9)}
    assert set(whole_brain_rows(out)) == {1}  # every scan exactly once
