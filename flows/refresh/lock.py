"""One night at a time: an exclusive lock on the project's ledger for the whole night, and one
night per model across every worker of the Prefect server (a global concurrency slot)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from flows.io import LockHeld, exclusive_lock


class RefreshLocked(RuntimeError):
    """Another refresh holds the lock."""


@contextmanager
def refresh_lock(path: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``path`` for the whole night (released by the OS on a crash)."""
    with ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(path))
        except LockHeld as err:
            raise RefreshLocked(f"another refresh is running (lock {path} held by {err.holder}); not editing") from None
        yield


def slot_name(model: str) -> str:
    """The global concurrency limit of ``model``'s nights: ``nas-refresh-NAME-HASH`` (the name
    without the characters Prefect refuses, the hash of the whole name against collisions)."""
    import hashlib
    import re

    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rsplit("/", 1)[-1]).strip("-")[:40] or "model"
    return f"nas-refresh-{readable}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


@contextmanager
def model_slot(model: str, wait_s: float = 5.0, lease_s: float = 120.0) -> Iterator[str]:
    """One night per model on every worker of the Prefect server: the night holds the single slot
    of the global concurrency limit :func:`slot_name` (created with limit 1 on first use; Prefect
    renews its lease while the night runs; a killed night's slot frees when the lease lapses).
    The file lock of :func:`refresh_lock` cannot see a worker on another machine; this one can."""
    from prefect import get_client
    from prefect.concurrency.sync import concurrency

    name = slot_name(model)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with ExitStack() as held:
        try:  # only the acquisition's timeout means "held": the night's own errors pass through
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=wait_s, lease_duration=lease_s,
                                             strict=True))
        except TimeoutError as err:
            raise RefreshLocked(f"another night of {model} holds the Prefect concurrency slot {name!r} "
                                f"(waited {wait_s:g} s); not editing") from err
        yield name
