"""The spawned child of flows/child.py: reused across calls, stopped by ``close``, replaced once
when it dies, errors raised in the caller."""

from __future__ import annotations

import os
import signal

import pytest

from flows.child import SpawnedChild


@pytest.fixture
def child():
    c = SpawnedChild()
    yield c
    c.close()


def test_calls_run_in_one_reused_child(child):
    pid = child.call(os.getpid)
    assert pid != os.getpid()
    assert child.call(os.getpid) == pid
    assert child.running


def test_close_stops_the_child_and_the_next_call_starts_one(child):
    pid = child.call(os.getpid)
    child.close()
    assert not child.running
    assert not _alive(pid)
    assert child.call(os.getpid) not in (pid, os.getpid())


def test_a_killed_child_is_replaced(child):
    pid = child.call(os.getpid)
    os.kill(pid, signal.SIGKILL)
    assert child.call(os.getpid) != pid


def test_an_error_in_the_child_is_raised_here(child):
    with pytest.raises(ValueError, match="invalid literal"):
        child.call(int, "not a number")
    assert child.call(int, "7") == 7


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
