"""Quarantine: a refused batch's bytes, unchanged, in a folder of their own with its reports.

A partly bad batch is quarantined whole, so nothing the user sent is silently dropped; the
folder is never reused and nothing is ever deleted or overwritten.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.config.validation import ValidationSettings
from flows.facts.batch import BatchNameError, BatchValidation, batch_id_for, fallback_batch_id
from flows.facts.inbox import BatchSnapshot, release, store, take_snapshot
from flows.facts.report import atomic_write_text, write_report


def _claim_folder(root: Path, batch_id: str) -> Path:
    """Create and return ``root/batch_id``, or ``-2``, ``-3``, ... when taken (never reuses one)."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        folder = root / (batch_id if n == 1 else f"{batch_id}-{n}")
        try:
            folder.mkdir()  # atomic: two quarantines of one name cannot get the same folder
        except FileExistsError:
            continue
        return folder
    raise RuntimeError(f"no free quarantine folder for {batch_id!r} under {root}")


def quarantine(
    source: Path | BatchSnapshot,
    validation: BatchValidation | None,
    quarantine_root: Path,
    reason: Mapping[str, Any],
    max_bytes: int = ValidationSettings.max_file_bytes,
) -> Path:
    """Keep the batch's bytes in their own folder under ``quarantine_root`` and clear the inbox entry.

    The folder is ``quarantine_root/BATCH_ID`` (``BATCH_ID-2``, ``-3``, ... when a batch of
    the same name was quarantined before; nothing is overwritten). It receives the bytes the
    night read (``source``'s snapshot: never a link, never bytes written after the night
    read them) under the file's name (``BATCH_ID.jsonl`` when the name is invalid), the
    reports of ``validation`` when given and ``reason.json`` (reason, time, sha256, original
    name and, for a symlink, what it pointed to). The inbox entry is then removed unless it
    was rewritten meanwhile (:func:`flows.facts.inbox.release`). Returns the folder.

    Raises:
        ValueError: ``validation`` is about other bytes than ``source``.
    """
    snap = source if isinstance(source, BatchSnapshot) else take_snapshot(Path(source), max_bytes)
    if validation is not None and validation.sha256 != snap.sha256:
        raise ValueError(f"validation is about sha256 {validation.sha256[:12]}, not the bytes of {snap.name!r}")
    try:
        batch_id, valid_name = batch_id_for(snap.path), True
    except BatchNameError:
        batch_id, valid_name = fallback_batch_id(snap.sha256), False
    folder = _claim_folder(Path(quarantine_root), batch_id)
    target = folder / (snap.name if valid_name else f"{batch_id}.jsonl")
    stored = store(snap, target)
    left = release(snap)
    if validation is not None:
        write_report(validation, folder)
    record = {
        "reason": dict(reason),
        "quarantined_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "batch_id": batch_id,
        "original_name": snap.name,
        "original_path": str(snap.path),
        "symlink_target": snap.link_target,
        "file": target.name,
        "sha256": stored,
        "validated_sha256": None if validation is None else validation.sha256,
        "inbox_entry_kept": left,
        "passed": None if validation is None else validation.passed,
    }
    # default=str: a reason may carry paths or timestamps from the flow.
    atomic_write_text(folder / "reason.json", json.dumps(record, indent=2, ensure_ascii=True, default=str) + "\n")
    return folder


__all__ = ["quarantine"]
