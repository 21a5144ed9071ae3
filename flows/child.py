"""One spawned child process that runs calls for its parent, so the parent never imports what
those calls need (Great Expectations, MLflow): a night's process keeps only the edit's working
set under its peak resident memory (docs/integrity.md has the measurements).

``spawn`` (not ``fork``), so the child holds none of the parent's model, heap or threads. Calls
are serialised: one child, one call at a time. A child that died (killed, out of memory) is
replaced once per call; a second failure propagates.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")


class SpawnedChild:
    """A single spawned worker, started on first use and stopped by :meth:`close`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the child (``fn`` a module-level function, arguments picklable)."""
        with self._lock:
            try:
                return self._started().submit(fn, *args).result()
            except BrokenProcessPool:
                self._stop()
                return self._started().submit(fn, *args).result()

    def close(self) -> None:
        """Stop the child and wait for it (its memory is returned); the next call starts one."""
        with self._lock:
            self._stop()

    @property
    def running(self) -> bool:
        """Whether a child is started."""
        return self._pool is not None

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["SpawnedChild"]
