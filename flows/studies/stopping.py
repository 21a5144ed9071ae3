"""Stopping a study when it is interrupted, and one process per method folder.

A study's methods run as tasks on the flow's task runner: in a worker thread of the flow's
process (sequential runner) or on Dask workers. Python handles SIGTERM and Ctrl-C in the main
thread only, so without help the units go on editing for hours after the flow has given up, and
a second run started to resume the study writes the same checkpoints as the first. Three guards:

* the flow waits for its units in short sleeps (:func:`result_of`): the kernel may hand SIGTERM
  to any thread, and Python runs the handler only when the main thread next runs bytecode, so a
  plain ``future.result()`` would take the signal only after the unit has finished;
* a stop flag per run (:func:`new_flag`): the flow raises it when it is interrupted or a unit
  fails; every unit looks at it before each batch and returns what it has measured (its last
  checkpoint stays as it was), so the process ends within a batch and the same command resumes.
* :func:`method_lock`: an exclusive ``flock`` on a method's folder while a unit edits it; a
  second unit on that folder fails at once, naming the process that holds it. The kernel drops
  the lock when the holder dies, so a killed study never leaves a stale lock behind.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from flows.io import LockHeld, atomic_write_text, exclusive_lock, now, this_process

LOCK_NAME = ".lock"
STOP_DIR = "stop-requests"


class StudyBusyError(RuntimeError):
    """A method's folder is being edited by another process."""


def new_flag(out: Path) -> Path:
    """A fresh stop flag for one run of the study in ``out`` (not raised yet).

    One per run, so that two processes sharing a study folder (one per side of the NAS
    comparison) stop independently."""
    return out / STOP_DIR / uuid.uuid4().hex


def raise_flag(flag: Path, reason: str) -> None:
    """Ask every unit of the run to stop before its next batch."""
    atomic_write_text(flag, json.dumps({"reason": reason, "requested_at": now(), "by": this_process()}))


def flag_raised(flag: Path | None) -> bool:
    """Whether the run that owns ``flag`` asked its units to stop (never, without a flag)."""
    return flag is not None and flag.is_file()


def drop_flag(flag: Path) -> None:
    """Remove the run's flag when the run ends, raised or not."""
    flag.unlink(missing_ok=True)


#: Seconds between the flow's looks at its units: how soon an interrupt is handled.
POLL_S = 0.5


def wait_for(unit: Any, poll_s: float = POLL_S) -> None:
    """Wait until the Prefect future ``unit`` is done, in ``poll_s`` sleeps, so that the main
    thread takes a SIGTERM or Ctrl-C within ``poll_s`` wherever the kernel delivered it."""
    while not unit.wrapped_future.done():
        unit.wait(timeout=poll_s)


def result_of(unit: Any, poll_s: float = POLL_S) -> Any:
    """``unit.result()``, waited for by :func:`wait_for`."""
    wait_for(unit, poll_s)
    return unit.result()


def stop_units(units: Mapping[str, Any], flag: Path, reason: str, logger, poll_s: float = POLL_S) -> None:
    """Raise ``flag`` and wait for every unit (a Prefect future) to return at its next batch.

    A second interrupt while waiting is not caught: it leaves the wait at once."""
    raise_flag(flag, reason)
    logger.warning("%s: the study's units stop before their next batch; the same command resumes from "
                   "each method's last measurement", reason)
    for unit in units.values():
        wait_for(unit, poll_s)


@contextmanager
def method_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a method's folder of a study) for the block.

    Raises:
        StudyBusyError: another process holds it; the message names that process.
    """
    with ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(folder / LOCK_NAME))
        except LockHeld as err:
            raise StudyBusyError(f"{folder} is being edited by another process ({err.holder}): wait for it or "
                                 "stop it, then run the same command to resume") from None
        yield
