"""One coordinator process per SQLite file, enforced with an advisory file lock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from coordinator import errors


class StoreLockedError(errors.FailedPrecondition):
    """Another coordinator process is using this SQLite database file."""


class ProcessLock:
    """An exclusive ``flock`` on ``<dbfile>.lock``, held while the store is open.

    The kernel drops it when the process dies, so a SIGKILLed coordinator never leaves a
    stale lock behind.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, db_path: Path) -> ProcessLock:
        lock_path = db_path.with_name(db_path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StoreLockedError(
                f"another coordinator process is using {db_path}; SQLite serves one "
                "coordinator process — stop it, or use PostgreSQL "
                "(TRELLIS_DATABASE_URL=postgresql://...) for several replicas"
            ) from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, lock_path)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
