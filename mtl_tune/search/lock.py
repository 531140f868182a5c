"""One driver per sweep folder: an exclusive ``fcntl.flock`` on ``<sweep>/.driver.lock``.

Two drivers on the same sweep (a ``--resume`` started while the search still runs) both
restore Tune's state and tell the same Optuna trials: the study gets more COMPLETE trials
than the budget, the second driver crashes and trials are orphaned. The lock is held for a
driver's whole run and released by the kernel when the process ends, however it ends, so a
``kill -9`` never leaves a stale lock behind (``--resume`` then just works). The file keeps
the holder's PID, for the message only: the lock itself, not the file, decides.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from mtl_tune.search.validate import LOCK_FILE, SearchError

__all__ = ["LOCK_FILE", "SweepLock", "check_unlocked"]


def _holder(path: Path) -> str:
    """`` (PID 123)`` from the lock file, or "" when it cannot be read."""
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (PID {pid})" if pid.isdigit() else ""


def _refusal(sweep_dir: Path, path: Path) -> SearchError:
    return SearchError(f"{sweep_dir} is in use by another search driver{_holder(path)}; wait for it to end (or "
                       "stop it) before resuming, or choose another --name")


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def check_unlocked(sweep_dir: Path) -> None:
    """Refuse (before Ray starts) a sweep folder that a running driver holds; writes nothing."""
    path = sweep_dir / LOCK_FILE
    if not path.is_file():
        return
    try:
        handle = path.open("r")
    except OSError:
        return  # unreadable: SweepLock.acquire reports it when the search starts
    with handle:
        if not _try_lock(handle):
            raise _refusal(sweep_dir, path)
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class SweepLock:
    """The exclusive lock of one sweep folder, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = sweep_dir
        self.path = sweep_dir / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Create the folder and take the lock, or raise SearchError naming the holder."""
        try:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            # "a": never truncate a file another driver holds before we know we own the lock.
            # Python opens it non-inheritable, so Ray's processes started later never hold it
            handle = self.path.open("a+")
        except OSError as err:  # a read-only storage path, a lock file of another user: one line, exit 2
            raise SearchError(f"cannot take the lock {self.path} of this sweep ({err.strerror or err})") from None
        if not _try_lock(handle):
            handle.close()
            raise _refusal(self.sweep_dir, self.path)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Drop the lock (closing the file releases it); the file stays, as a stale one is harmless."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> SweepLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
