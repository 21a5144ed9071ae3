"""Hand memory the process freed back to the operating system between a night's phases.

glibc keeps freed blocks in its heaps for reuse: after the value optimisation its bfloat16
copies of the upper blocks and its autograd buffers (about 290 MB for SmolLM2) are free but still
resident, and the evaluation then grows the heap further around them. ``malloc_trim(0)`` returns
every free page of every heap (not only the top), at a cost of milliseconds. Elsewhere (another
C library, macOS, Windows) this is a no-op. docs/integrity.md has the measurements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

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
