"""Hand memory the process freed back to the operating system between a night's phases.

glibc keeps freed blocks in its heaps for reuse: after the value optimisation its bfloat16
copies of the upper blocks and its autograd buffers (about 290 MB for SmolLM2) are free but still
resident, and the evaluation then grows the heap further around them. ``malloc_trim(0)`` returns
every free page of every heap (not only the top), at a cost of milliseconds. Elsewhere (another
C library, macOS, Windows) this is a no-op. docs/integrity.md has the measurements.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_memory() -> bool:
    """Give the heaps' free pages back to the OS; True if the C library released any."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@contextlib.contextmanager
def returning_freed_memory(every_s: float) -> Iterator[None]:
    """While the block runs, give freed heap pages back every ``every_s`` seconds, and once at
    its end; 0 only at the end.

    A phase that frees and reallocates tensors of many sizes (the solves, the evaluation's
    forwards) grows glibc's heaps around blocks it no longer uses; trimming on a clock keeps
    them near what is live. The trim runs on a daemon thread (glibc locks each arena while it
    trims it), a few milliseconds each time."""
    if every_s < 0:
        raise ValueError(f"every_s must be >= 0, not {every_s}")
    stop = threading.Event()
    worker = None
    if every_s > 0 and _malloc_trim() is not None:
        worker = threading.Thread(target=_trim_until, args=(stop, every_s), name="heap-trim", daemon=True)
        worker.start()
    try:
        yield
    finally:
        stop.set()
        if worker is not None:
            worker.join()
        return_freed_memory()


def _trim_until(stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        return_freed_memory()
