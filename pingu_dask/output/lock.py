"""One run at a time per output directory: OUT/.lock names its holder.

OUT often lives on a shared file system (NFS, Lustre, GPFS) and the drivers that
contend for it run on different nodes, one after another in a resubmission chain or
by mistake at the same time. So the lock relies only on operations that are atomic
there too, and says when it is stale without trusting any one node:

- **Creation** writes the holder's JSON (host, pid, started, command, heartbeat and a
  random token) in full to a temporary file and hard-links it to OUT/.lock. link()
  fails when .lock exists, so exactly one contender wins, and .lock never exists
  empty or half-written: a reader cannot take a lock being created for a broken one.
- **Heartbeat**: while the lock is held, a daemon thread rewrites it every
  LockTimes.heartbeat_seconds (pingu.lock-heartbeat-seconds; temporary file, then
  os.replace) with a fresh UTC `heartbeat`, but only while .lock still holds this
  holder's token.
- **Stale**: on the same host, when the holder's pid is gone; on any host, when its
  heartbeat is older than LockTimes.stale_seconds (pingu.lock-stale-seconds; a driver
  killed outright, or its node lost, stops beating; this is what lets a resubmitted
  driver on another node in); when it is unreadable or names no pid, once its file is older than
  UNREADABLE_GRACE_SECONDS. A lock written by an older version (no heartbeat) counts
  by its file's age on other hosts; on the same host its pid decides, since such a
  holder never refreshes anything.
- **Takeover** of a stale lock lets exactly one contender win: it first claims that
  very lock file (mkdir of a name made from its inode and content: exclusive),
  checks .lock is still that file, moves it aside and links its own. Contenders that
  lose the claim look again and find either the stale lock (still being taken over:
  they wait) or the winner's fresh one (they are refused). Nobody ever moves a lock
  it has not judged stale, so nobody's fresh lock is displaced.
- **Release** removes .lock only when it still holds this holder's token.

Times are compared across hosts, so the stale time (minutes) must be much longer than
the clock differences between nodes (NTP keeps them well under a second).

Why not flufl.lock (the maintained NFS-safe lock: link() of a claim file, lifetimes,
refresh): its lock() breaks another holder's lock only once that lock's lifetime has
run out (its `state` can tell that a pid on this host is gone, but acquiring does not
act on it), so a driver killed here would keep OUT locked for a whole lifetime where
this lock lets the next run in at once (the Ctrl-C, kill and resubmission tests rely
on it); and its lock file holds only the claim file's name, so `pingu-dask status` and
a refusal could not say which command holds OUT, since when, and when it last beat.
tests/test_lock.py holds this module to those guarantees (checked against flufl.lock
8.1, _lockfile.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pingu_dask.config import DEFAULTS
from pingu_dask.errors import RunError

LOCK_NAME = ".lock"
UNREADABLE_GRACE_SECONDS = 5.0  # an unreadable / pid-less lock younger than this is left be
CLAIM_TIMEOUT_SECONDS = 10.0  # a takeover takes milliseconds; an older claim was abandoned
ACQUIRE_PATIENCE_SECONDS = 30.0  # give up waiting for another contender's takeover after this

log = logging.getLogger(__name__)


class LockedError(RunError):
    """Another run holds the output directory."""


@dataclass(frozen=True)
class LockTimes:
    """How often a holder beats, and how long after its last beat a lock is stale (the
    run's settings give them: pingu.lock-heartbeat-seconds / lock-stale-seconds)."""

    heartbeat_seconds: float = DEFAULTS["pingu"]["lock-heartbeat-seconds"]
    stale_seconds: float = DEFAULTS["pingu"]["lock-stale-seconds"]

    @property
    def beat_every(self) -> float:
        """The heartbeat interval, but never so long that a live holder could look stale
        between two beats."""
        third = self.stale_seconds / 3
        return min(self.heartbeat_seconds, third) if self.heartbeat_seconds > 0 else third


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (pid > 0 only: 0 and negative
    numbers would signal process groups and always answer yes)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class _Snapshot:
    """One look at a lock file: its bytes and which file (inode) they came from."""

    raw: bytes
    device: int
    inode: int
    mtime: float
    holder: dict | None  # None: not a JSON object

    @property
    def identity(self) -> tuple[int, int, bytes]:
        return self.device, self.inode, self.raw

    @property
    def digest(self) -> str:
        return hashlib.sha1(b"%d:%d:" % (self.device, self.inode) + self.raw).hexdigest()[:16]


def _read(path: Path) -> _Snapshot | None:
    """The lock file as it is now, or None when there is none."""
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            raw = handle.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = None
    if not isinstance(holder, dict):
        holder = None
    return _Snapshot(raw, status.st_dev, status.st_ino, status.st_mtime, holder)


def _pid(holder: dict | None) -> int | None:
    pid = (holder or {}).get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def _heartbeat_age(holder: dict, now: float) -> float | None:
    try:
        beat = datetime.fromisoformat(str(holder["heartbeat"]))
    except (KeyError, ValueError):
        return None
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=UTC)
    return now - beat.timestamp()


@dataclass(frozen=True)
class _Verdict:
    """Whether a lock is stale, why, and how to say so."""

    holder: dict
    stale: bool
    reason: str
    heartbeat_age: float | None  # seconds since its heartbeat (file age for old locks)

    def refusal(self, path: Path) -> str:
        holder = self.holder
        if holder.get("pid") is None:
            return f"{path} is there but {self.reason}. Try again in a moment, or delete it."
        return (
            f"{path.parent} is in use by another run: pid {holder.get('pid')} on "
            f"{holder.get('host')} since {holder.get('started')} ({holder.get('command')}); "
            f"{self.reason}. Wait for it, or delete {path} if you are sure that run is gone."
        )


def _judge(snapshot: _Snapshot, times: LockTimes, now: float | None = None) -> _Verdict:
    now = time.time() if now is None else now
    limit = times.stale_seconds
    file_age = now - snapshot.mtime
    holder = snapshot.holder
    pid = _pid(holder)
    if holder is None or pid is None:
        stale = file_age > UNREADABLE_GRACE_SECONDS
        shown = {"pid": None, "host": None, "started": None, "command": ""}
        shown.update({k: v for k, v in (holder or {}).items() if k in shown and k != "pid"})
        reason = (
            f"its lock file names no process ({'no pid' if holder else 'unreadable'}); "
            f"it counts as stale {UNREADABLE_GRACE_SECONDS:.0f} s after it was last "
            f"written, {file_age:.0f} s ago"
        )
        return _Verdict(shown, stale, reason, None)
    same_host = holder.get("host") == socket.gethostname()
    if same_host and not _alive(pid):
        return _Verdict(holder, True, f"its process {pid} is gone", None)
    age = _heartbeat_age(holder, now)
    if age is None:  # written by a version without heartbeats
        if same_host:
            return _Verdict(holder, False, f"its process {pid} is running on this host", None)
        return _Verdict(
            holder,
            file_age > limit,
            f"it has no heartbeat (an older pingu-dask); written {file_age:.0f} s ago, it "
            f"becomes stale {limit:.0f} s after that",
            file_age,
        )
    reason = (
        f"last heartbeat {max(age, 0):.0f} s ago; it becomes stale {limit:.0f} s after "
        "its last heartbeat" + (" or as soon as its process is gone" if same_host else "")
    )
    return _Verdict(holder, age > limit, reason, age)


def read_lock(out: Path, times: LockTimes | None = None) -> dict | None:
    """The holder of OUT's lock, or None when there is none.

    The holder's fields (pid, host, started, command, heartbeat) plus `stale` (whether
    a new run would take it over), `reason` (why, in words) and `heartbeat_age`
    (seconds; None when unknown). `pingu-dask status` shows these.
    """
    snapshot = _read(Path(out) / LOCK_NAME)
    if snapshot is None:
        return None
    verdict = _judge(snapshot, times or LockTimes())
    holder = {"pid": None, "host": None, "started": None, "command": ""}
    holder.update((k, v) for k, v in verdict.holder.items() if k != "token")
    return {
        **holder,
        "stale": verdict.stale,
        "reason": verdict.reason,
        "heartbeat_age": verdict.heartbeat_age,
    }


def _write_temporary(path: Path, holder: dict) -> Path:
    """The holder's JSON, complete, under a name no other writer uses."""
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(holder, handle)
    return temporary


def _link(source: Path, target: Path) -> bool:
    """Make `target` another name of `source` unless `target` exists: True if we did.

    On NFS a link can succeed on the server while its reply is lost; the link count of
    `source` then still tells whether it did (the flufl.lock check).
    """
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    except OSError:
        with suppress(OSError):
            if os.stat(source).st_nlink == 2:
                return True
        raise
    return True


def _clear_if_abandoned(claim: Path) -> None:
    """Remove a takeover claim whose maker died half-way (claims live milliseconds)."""
    try:
        age = time.time() - os.stat(claim).st_mtime
    except FileNotFoundError:
        return
    if age > CLAIM_TIMEOUT_SECONDS:
        graveyard = claim.with_name(f"{claim.name}.{uuid.uuid4().hex}.abandoned")
        with suppress(OSError):
            os.rename(claim, graveyard)
            os.rmdir(graveyard)


class OutputLock:
    """Context manager: hold OUT/.lock for the duration of a run (see the module doc).

    `took_over` is the holder of the stale lock this one replaced, if any; `lost` is set
    when the heartbeat finds that the lock is no longer this holder's.
    """

    def __init__(self, out: Path, times: LockTimes | None = None) -> None:
        self.path = Path(out) / LOCK_NAME
        self.times = times or LockTimes()
        self.took_over: dict | None = None
        self.lost: dict | None = None
        self._holder: dict | None = None
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._holder is not None

    def acquire(self) -> None:
        """Take the lock, or take over a stale one; raise LockedError if it is in use."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this OutputLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = _now()
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now,
            "heartbeat": now,
            "command": " ".join(sys.argv),
            "token": uuid.uuid4().hex,
        }
        temporary = _write_temporary(self.path, holder)
        deadline = time.monotonic() + ACQUIRE_PATIENCE_SECONDS
        try:
            while not _link(temporary, self.path):
                snapshot = _read(self.path)
                if snapshot is not None:
                    verdict = _judge(snapshot, self.times)
                    if not verdict.stale:
                        raise LockedError(verdict.refusal(self.path))
                    if self._take_over(snapshot, temporary):
                        self.took_over = verdict.holder
                        break
                if time.monotonic() > deadline:
                    raise LockedError(
                        f"could not take the lock {self.path}: another process kept taking "
                        f"it over for {ACQUIRE_PATIENCE_SECONDS:.0f} s"
                    )
                time.sleep(random.uniform(0.005, 0.05))  # another contender is at it
        finally:
            temporary.unlink(missing_ok=True)
        self._holder = holder
        self.lost = None
        self._stop.clear()
        self._beater = threading.Thread(
            target=self._beat_until_stopped, name="pingu-lock-heartbeat", daemon=True
        )
        self._beater.start()

    def _take_over(self, stale: _Snapshot, temporary: Path) -> bool:
        """Replace the lock file judged stale by ours, if no other contender does first."""
        claim = self.path.with_name(f"{self.path.name}.takeover-{stale.digest}")
        try:
            os.mkdir(claim)
        except FileExistsError:  # another contender is taking this very lock over
            _clear_if_abandoned(claim)
            return False
        try:
            current = _read(self.path)
            if current is None or current.identity != stale.identity:
                return False  # released, beaten or taken over since we looked
            aside = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.stale")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            moved = _read(aside)
            if moved is None or moved.identity != stale.identity:
                self._put_back(aside)  # changed between the check and the move
                return False
            won = _link(temporary, self.path)  # False: a newcomer linked first, and won
            aside.unlink(missing_ok=True)
            return won
        finally:
            with suppress(OSError):
                os.rmdir(claim)

    def _put_back(self, aside: Path) -> None:
        if not _link(aside, self.path):
            log.warning("%s: could not put back a lock moved aside (%s)", self.path, aside)
        aside.unlink(missing_ok=True)

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.times.beat_every):
            try:
                if not self._beat():
                    return
            except OSError as error:  # a file-system hiccup: try again next time
                log.warning("%s: heartbeat not written: %s", self.path, error)

    def _beat(self) -> bool:
        """Refresh the heartbeat if the lock is still ours; False when it is not."""
        holder = self._holder
        if holder is None:
            return False
        current = _read(self.path)
        if current is None or (current.holder or {}).get("token") != holder["token"]:
            self.lost = (current.holder if current else None) or {}
            log.warning(
                "%s is no longer this run's lock (now: %s); another run may write into %s",
                self.path,
                self.lost or "none",
                self.path.parent,
            )
            return False
        holder["heartbeat"] = _now()
        temporary = _write_temporary(self.path, holder)
        try:
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        holder, self._holder = self._holder, None
        self._stop.set()
        if self._beater is not None and self._beater is not threading.current_thread():
            self._beater.join(timeout=10)
        self._beater = None
        if holder is None:
            return
        current = _read(self.path)
        if current is not None and (current.holder or {}).get("token") == holder["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
