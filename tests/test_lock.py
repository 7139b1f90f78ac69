"""OUT/.lock under contention, and signals that stop a holder (issue 15).

Real processes race for one lock (multiprocessing, started together at a barrier);
"another host" is a lock file naming another host, or a holder process whose
socket.gethostname says so. The end-to-end SIGTERM / SIGHUP runs of `pingu-dask run`
(exit 143 / 129, lock released, resume) are in test_runner.py; here the signal
handling is checked on small real processes, which is quick.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import absolute_manifest

from pingu_dask.cli import main
from pingu_dask.output import layout, parts
from pingu_dask.output.lock import LOCK_NAME, LockedError, LockTimes, OutputLock, read_lock
from pingu_dask.run.signals import Stopped, stop_on_signals

CONTENDERS = 8
ROUNDS = 6
FAST_OPTIONS = ["--model", "demo", "--no-tta", "--step-size", "1.0", "--device", "cpu"]


def iso(seconds_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()


def holder(**fields) -> dict:
    base = {"host": "gpu-node-17", "pid": 4242, "started": iso(3600), "command": "pingu-dask run"}
    return {**base, **fields}


def write_lock(out: Path, content: dict | str, age: float = 0.0) -> Path:
    path = out / LOCK_NAME
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def dead_pid() -> int:
    command = [sys.executable, "-c", "import os; print(os.getpid())"]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def leftovers(out: Path) -> list[str]:
    """Temporary, moved-aside or claim files the lock left in OUT."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(f"{LOCK_NAME}."))


# --- racing processes ---------------------------------------------------------------


def _contend(out: str, barrier, results, rounds: int) -> None:
    """One contender: every round, try to take the lock at the same moment as the
    others, report, hold it until all have tried, then release."""
    for round_ in range(rounds):
        barrier.wait()
        lock = OutputLock(Path(out))
        try:
            lock.acquire()
            won, took_over = True, lock.took_over
        except LockedError:
            won, took_over = False, None
        results.put((round_, os.getpid(), won, took_over))
        barrier.wait()  # everyone has tried
        if won:
            lock.release()
        barrier.wait()  # released: the next round may start


def race(out: Path, prepare_round) -> list[list[tuple]]:
    """ROUNDS rounds of CONTENDERS processes acquiring OUT's lock at once; before each
    round, prepare_round(round) sets up OUT/.lock. The results, per round."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(CONTENDERS + 1, timeout=120)
    results = context.Queue()
    processes = [
        context.Process(target=_contend, args=(str(out), barrier, results, ROUNDS))
        for _ in range(CONTENDERS)
    ]
    for process in processes:
        process.start()
    per_round: list[list[tuple]] = []
    try:
        for round_ in range(ROUNDS):
            prepare_round(round_)
            barrier.wait()  # they try
            tried = [results.get(timeout=60) for _ in range(CONTENDERS)]
            winners = [pid for _, pid, won, _ in tried if won]
            if len(winners) == 1:  # the file names the one winner, who still holds it
                assert read_lock(out)["pid"] == winners[0]
            per_round.append(tried)
            barrier.wait()  # the winner releases
            barrier.wait()
            if len(winners) == 1:
                assert not (out / LOCK_NAME).exists()  # released
            assert leftovers(out) == []
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    return per_round


@pytest.mark.slow
def test_exactly_one_of_many_processes_takes_a_free_lock(tmp_path: Path) -> None:
    rounds = race(tmp_path, lambda round_: None)
    for tried in rounds:
        assert sum(won for _, _, won, _ in tried) == 1, tried
        assert all(took_over is None for *_, took_over in tried)


@pytest.mark.slow
def test_exactly_one_of_many_processes_takes_over_a_stale_lock(tmp_path: Path) -> None:
    """Every kind of stale lock, each raced for by 8 processes at once."""
    me = socket.gethostname()
    stale_locks = [
        (holder(host=me, pid=dead_pid(), heartbeat=iso(1)), 0.0),  # its process is gone
        (holder(heartbeat=iso(400)), 0.0),  # another host, heartbeat too old
        (holder(), 400.0),  # another host, an older version without heartbeat: by mtime
        ("", 10.0),  # empty (an older version died while writing it)
        ({"host": me, "pid": 0}, 10.0),  # no usable pid (not "process group 0: alive")
        ("{not json", 10.0),
    ]

    def prepare(round_: int) -> None:
        content, age = stale_locks[round_ % len(stale_locks)]
        write_lock(tmp_path, content, age)
        assert read_lock(tmp_path)["stale"]

    rounds = race(tmp_path, prepare)  # the default stale time: 300 s
    reported = 0
    for (content, _), tried in zip(stale_locks, rounds, strict=True):
        winners = [took_over for _, _, won, took_over in tried if won]
        assert len(winners) == 1, tried
        # The winner is the contender that took the stale lock over, or (rarely) one that
        # linked into the name in the moment the taker had moved the stale file aside: it
        # then took a free lock, and says so (took_over None). Exactly one holds it.
        if winners[0] is not None:
            reported += 1
            if isinstance(content, dict) and content.get("pid"):
                assert winners[0]["pid"] == content["pid"]
    assert reported >= len(stale_locks) // 2  # the taker wins almost always


def _acquire_and_release(out: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with OutputLock(Path(out)):
            pass


@pytest.mark.slow
def test_a_reader_never_sees_a_lock_half_made(tmp_path: Path) -> None:
    """While another process takes and releases the lock in a loop, every lock file
    a reader opens is complete, and read_lock never calls the live holder stale."""
    context = multiprocessing.get_context("spawn")
    churn = context.Process(target=_acquire_and_release, args=(str(tmp_path), 4.0))
    churn.start()
    seen = 0
    try:
        deadline = time.monotonic() + 30
        while churn.is_alive() and time.monotonic() < deadline:
            try:
                raw = (tmp_path / LOCK_NAME).read_bytes()
            except FileNotFoundError:
                continue
            content = json.loads(raw)  # never empty, never half-written
            assert content["pid"] == churn.pid and content["heartbeat"]
            found = read_lock(tmp_path)
            assert found is None or not found["stale"], found
            seen += 1
    finally:
        churn.join(timeout=30)
    assert churn.exitcode == 0
    assert seen > 50  # the reader did catch the lock many times
    assert not (tmp_path / LOCK_NAME).exists() and leftovers(tmp_path) == []


# --- another host, heartbeats ---------------------------------------------------------


def test_another_hosts_lock_is_refused_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    write_lock(tmp_path, holder(heartbeat=iso(40)))
    assert not read_lock(tmp_path)["stale"]
    with pytest.raises(LockedError) as refused:
        OutputLock(tmp_path).acquire()
    text = str(refused.value)
    assert "in use by another run: pid 4242 on gpu-node-17" in text
    assert "last heartbeat 40 s ago; it becomes stale 300 s after its last heartbeat" in text

    write_lock(tmp_path, holder(heartbeat=iso(301)))
    assert read_lock(tmp_path)["stale"]
    with OutputLock(tmp_path) as lock:
        assert lock.took_over["host"] == "gpu-node-17"
        assert read_lock(tmp_path)["pid"] == os.getpid()

    # A lock from an older version has no heartbeat: its file's age counts instead.
    write_lock(tmp_path, holder(), age=200)
    with pytest.raises(LockedError, match="no heartbeat"):
        OutputLock(tmp_path).acquire()
    write_lock(tmp_path, holder(), age=400)
    with OutputLock(tmp_path) as lock:
        assert lock.took_over["pid"] == 4242
    assert leftovers(tmp_path) == [] and not (tmp_path / LOCK_NAME).exists()


def test_a_lock_without_a_process_is_stale_only_once_it_is_a_few_seconds_old(
    tmp_path: Path,
) -> None:
    for content in ("", '{"host": "x"', json.dumps({"host": socket.gethostname(), "pid": 0})):
        write_lock(tmp_path, content)
        assert not read_lock(tmp_path)["stale"]  # perhaps still being written
        with pytest.raises(LockedError, match="names no process"):
            OutputLock(tmp_path).acquire()
        write_lock(tmp_path, content, age=10)
        assert read_lock(tmp_path)["stale"]
        with OutputLock(tmp_path) as lock:
            assert lock.took_over["pid"] is None


def test_the_heartbeat_advances_while_held_and_only_on_its_own_lock(tmp_path: Path) -> None:
    lock = OutputLock(tmp_path, LockTimes(heartbeat_seconds=0.1))
    lock.acquire()
    first = read_lock(tmp_path)
    time.sleep(0.6)
    later = read_lock(tmp_path)
    assert later["heartbeat"] > first["heartbeat"] and later["heartbeat_age"] < 0.5
    assert later["started"] == first["started"] and later["pid"] == os.getpid()

    # Someone else's lock in its place (say, it was judged stale and taken over):
    # the heartbeat does not write over it, and release leaves it.
    other = holder(heartbeat=iso(0))
    write_lock(tmp_path, other)
    time.sleep(0.4)
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other
    assert lock.lost == other
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other
    assert leftovers(tmp_path) == []


HOLDER_ON_ANOTHER_HOST = """
import socket, sys, time
socket.gethostname = lambda: "gpu-node-17"  # as if this process ran on another node
from pingu_dask.output.lock import LockTimes, OutputLock
OutputLock(sys.argv[1], LockTimes(heartbeat_seconds=0.2)).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # seconds of real processes: the full suite runs it
def test_a_killed_holder_on_another_host_becomes_stale_after_the_stale_time(
    tmp_path: Path,
) -> None:
    environment = dict(os.environ)
    quick = LockTimes(stale_seconds=1.5)
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER_ON_ANOTHER_HOST, str(tmp_path)],
        env=environment,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "held"
        # Alive (its heartbeat goes on) though its pid cannot be checked from here.
        time.sleep(2.5)
        assert read_lock(tmp_path, quick)["host"] == "gpu-node-17"
        with pytest.raises(LockedError, match="on gpu-node-17"):
            OutputLock(tmp_path, quick).acquire()
        process.kill()
        process.wait(timeout=30)
        killed = time.monotonic()
        with pytest.raises(LockedError):  # its last heartbeat is still recent
            OutputLock(tmp_path, quick).acquire()
        lock = OutputLock(tmp_path, quick)
        while True:
            try:
                lock.acquire()
                break
            except LockedError:
                assert time.monotonic() - killed < 10
                time.sleep(0.1)
        waited = time.monotonic() - killed
        lock.release()
        assert 1.0 < waited < 10
        assert lock.took_over["host"] == "gpu-node-17" and lock.took_over["pid"] == process.pid
    finally:
        process.kill()
        process.wait(timeout=30)


# --- writers that take the lock ---------------------------------------------------------


def test_a_second_concurrent_run_is_refused_and_a_stale_lock_taken_over(
    cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    manifest = tmp_path / "one.csv"
    absolute_manifest(cohort, manifest, rows=1)
    with OutputLock(out):
        result = CliRunner().invoke(main, ["run", str(manifest), "--out", str(out), *FAST_OPTIONS])
        assert result.exit_code == 1
        text = " ".join(result.output.split())
        assert f"is in use by another run: pid {os.getpid()}" in text
        assert "it becomes stale 300 s after its last heartbeat" in text
        with pytest.raises(LockedError):
            OutputLock(out).acquire()
    assert not (out / LOCK_NAME).exists()

    gone = dead_pid()
    write_lock(out, holder(host=socket.gethostname(), pid=gone, heartbeat=iso(1)))
    lock = OutputLock(out)
    lock.acquire()
    assert lock.took_over["pid"] == gone
    assert read_lock(out)["pid"] == os.getpid()
    lock.release()


def test_evaluate_is_refused_while_a_run_holds_the_output(tmp_path: Path) -> None:
    """`evaluate OUT` replaces OUT/tables/evaluation: not while a run writes there."""
    (tmp_path / layout.MASKS).mkdir()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,t1w,reference\n")
    with OutputLock(tmp_path):
        result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--manifest", manifest])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert f"cannot evaluate now: {tmp_path} is in use by another run: pid {os.getpid()}" in text
    assert not (tmp_path / parts.TABLES).exists()  # nothing written
    assert not (tmp_path / LOCK_NAME).exists()


# --- signals ---------------------------------------------------------------------


@pytest.fixture
def python_sigint():
    """SIGINT as a plain Python program has it (KeyboardInterrupt): earlier tests in the
    same process (Dask clusters, click's runner) may have left another handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigterm_raises_stopped_and_repeats_do_not_cut_the_clean_up_short(
    python_sigint,
) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    cleaned = False
    with pytest.raises(Stopped) as stopped, stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
            pytest.fail("SIGTERM did not stop the block")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # what an impatient scheduler does
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            cleaned = True
    assert cleaned
    assert (stopped.value.signum, stopped.value.name, stopped.value.exit_code) == (
        signal.SIGTERM,
        "SIGTERM",
        143,
    )
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


def test_an_ignored_sighup_stays_ignored() -> None:
    """`nohup pingu-dask run ...`: a closed terminal must not stop the run."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


STOPPABLE_HOLDER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring them
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from pathlib import Path
from pingu_dask.output.lock import OutputLock
from pingu_dask.run.signals import Stopped, exit_code, stop_on_signals
out, clean_up_seconds = Path(sys.argv[1]), float(sys.argv[2])
try:
    with stop_on_signals(), OutputLock(out):
        try:
            print("held", flush=True)  # inside the try: a signal right after it cleans up
            time.sleep(600)
        finally:
            time.sleep(clean_up_seconds)  # flushing tables, closing the cluster
            (out / "cleaned").write_text("yes")
except KeyboardInterrupt as stop:
    print("stopped by", stop.name if isinstance(stop, Stopped) else "SIGINT", flush=True)
    sys.exit(exit_code(stop))
"""


def start_holder(out: Path, clean_up_seconds: float, **environment) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE_HOLDER, str(out), str(clean_up_seconds)],
        env=dict(os.environ, **environment),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signalled_holder_cleans_up_releases_and_exits_128_plus_signum(
    tmp_path: Path, signum: int
) -> None:
    process = start_holder(tmp_path, 1.0)
    try:
        os.kill(process.pid, signum)
        time.sleep(0.3)
        os.kill(process.pid, signal.SIGTERM)  # repeats, mid clean-up
        os.kill(process.pid, signal.SIGHUP)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, output
    assert f"stopped by {signal.Signals(signum).name}" in output
    assert "ignored: still cleaning up" in output
    assert (tmp_path / "cleaned").read_text() == "yes"  # the clean-up ran to its end
    assert not (tmp_path / LOCK_NAME).exists() and leftovers(tmp_path) == []


def test_a_clean_up_that_hangs_ends_after_the_grace_time(tmp_path: Path) -> None:
    process = start_holder(tmp_path, 600, DASK_PINGU__STOP_GRACE_SECONDS="1")
    try:
        os.kill(process.pid, signal.SIGTERM)
        started = time.monotonic()
        output, _ = process.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        process.kill()
    assert process.returncode == 143 and 0.8 < took < 30, output
    assert "exiting now" in output
    # The lock is left (its workers may still write), but its process is gone: stale.
    assert read_lock(tmp_path)["stale"]


def test_a_process_forked_inside_the_block_dies_of_sigterm() -> None:
    """A library's process pool forked during a run (nnU-Net's planner lists files with
    one) inherits the stop handler; the SIGTERM Pool.terminate sends must end its workers
    as the default action does, not raise Stopped inside them (a worker stuck on its
    queue's lock that way left the pool's join waiting forever)."""
    import multiprocessing

    with stop_on_signals():
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.5)
        os.kill(child.pid, signal.SIGTERM)
        child.join(10)
    assert child.exitcode == -signal.SIGTERM  # raising Stopped in it would give 1
