"""``return_freed_memory``: glibc's heaps give their free pages back (a no-op elsewhere), at once or
on a clock while a block runs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flows.engine.memory import _malloc_trim, return_freed_memory, returning_freed_memory


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_heap_blocks_go_back_to_the_os():
    # 64 KiB blocks live in the heap (below glibc's mmap threshold); the last one stays alive, so
    # the heap's top cannot shrink and only malloc_trim's release of inner pages can lower RSS.
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 256 MB
    keep = blocks[-1]
    del blocks
    before = _rss_kb()
    assert return_freed_memory() is True
    assert before - _rss_kb() > 100 * 1024, "less than 100 MB of the 256 MB freed went back"
    assert keep.sum() == 16 * 1024


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_inside_the_block_freed_pages_go_back_on_a_clock_and_the_thread_ends_with_it():
    with returning_freed_memory(0.05):
        blocks = [torch.ones(16 * 1024) for _ in range(4000)]
        keep = blocks[-1]
        del blocks
        before = _rss_kb()
        deadline = time.monotonic() + 5
        while before - _rss_kb() < 100 * 1024 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert before - _rss_kb() > 100 * 1024, "no trim ran within 5 s"
        assert any(t.name == "heap-trim" for t in threading.enumerate())
    assert not any(t.name == "heap-trim" for t in threading.enumerate())
    assert keep.sum() == 16 * 1024


def test_zero_trims_only_at_the_end_and_a_negative_interval_is_refused():
    with returning_freed_memory(0):
        assert not any(t.name == "heap-trim" for t in threading.enumerate())
    with pytest.raises(ValueError, match="every_s"), returning_freed_memory(-1):
        pass
