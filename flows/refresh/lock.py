"""One night at a time: an exclusive lock on the project's ledger for the whole night."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RefreshLocked(RuntimeError):
    """Another refresh holds the lock."""


@contextmanager
def refresh_lock(path: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``path`` for the whole night (released by the OS on a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8").strip() or "unknown"
            raise RefreshLocked(f"another refresh is running (lock {path} held by {holder}); not editing") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)
