"""One run at a time per output directory: OUT/.lock names its holder.

The lock file is created exclusively (O_EXCL), holding the driver's host, pid, start
time and command. A second run is refused with the holder's details. A lock whose
process is gone (same host, pid not alive) is stale: the new run takes it over. On
another host the pid cannot be checked, so such a lock is never taken over silently.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class LockedError(RuntimeError):
    """Another run holds the output directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(out: Path) -> dict | None:
    """The holder of OUT's lock, or None; `stale` says whether its process is gone."""
    path = Path(out) / LOCK_NAME
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"pid": None, "host": None, "stale": True, "started": None, "command": ""}
    same_host = holder.get("host") == socket.gethostname()
    holder["stale"] = same_host and not _alive(int(holder.get("pid") or 0))
    return holder


class OutputLock:
    """Context manager: hold OUT/.lock for the duration of a run."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.took_over: dict | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.path.parent)
                if holder is None:
                    continue  # released in between: try again
                if not holder["stale"]:
                    raise LockedError(
                        f"{self.path.parent} is in use by another run: pid {holder.get('pid')} "
                        f"on {holder.get('host')} since {holder.get('started')} "
                        f"({holder.get('command')}). Wait for it, or delete {self.path} "
                        "if you are sure that run is gone."
                    ) from None
                self.took_over = holder
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(me, handle)
            return
        raise LockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        holder = read_lock(self.path.parent)
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
