"""``return_freed_memory``: glibc's heaps give their free pages back (a no-op elsewhere)."""

from __future__ import annotations

import pytest
import torch

from flows.engine.memory import _malloc_trim, return_freed_memory


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
