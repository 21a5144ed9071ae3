"""Checkpoint version folders ``vNNNN`` and where a batch file goes without overwriting anything."""

from __future__ import annotations

import shutil
from pathlib import Path

from flows.ledger.records import Ledger


def next_version(checkpoints: Path) -> str:
    """``vNNNN`` one past the highest existing checkpoint folder (orphans from a crash included)."""
    numbers = [int(p.name[1:]) for p in checkpoints.glob("v[0-9][0-9][0-9][0-9]") if p.name[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:04d}"


#: The folder a batch's rollback state is spilled to while it is edited (flows/refresh/flow.py).
ROLLBACK_PREFIX = ".rollback-"


def tidy_checkpoints(checkpoints: Path, ledger: Ledger) -> tuple[list[str], list[str]]:
    """Remove the half-written folders a killed checkpoint write leaves (``.vNNNN.tmp-*``,
    ``.vNNNN.old-*``) and a killed night's rollback spill (``.rollback-*``), and list orphans
    (complete ``vNNNN`` folders the ledger never promoted).

    Call it under the refresh lock only (no write can be in flight then). Orphans stay where
    they are: their numbers are never reused (:func:`next_version` counts them) and an
    operator may want to look at them. Returns ``(removed, orphans)``.
    """
    if not checkpoints.is_dir():
        return [], []
    removed = []
    for p in sorted([*checkpoints.glob(".v[0-9]*"), *checkpoints.glob(f"{ROLLBACK_PREFIX}*")]):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name or p.name.startswith(ROLLBACK_PREFIX)):
            shutil.rmtree(p)
            removed.append(p.name)
    promoted = {e["version"] for e in ledger.promotions()}
    orphans = sorted(p.name for p in checkpoints.glob("v[0-9][0-9][0-9][0-9]") if p.is_dir() and p.name not in promoted)
    return removed, orphans
