"""The ledger: ``data/ledger.jsonl``, an append-only record of every decision the pipeline made.

One JSON object per line, each with an ``event``:

* ``promote``: a batch passed the gate; its checkpoint ``version`` became champion.
* ``reject``: a batch was edited and evaluated but failed the gate (``failed_checks``).
* ``quarantine``: a batch failed validation before any edit.
* ``rollback`` / ``manual_promote``: an operator moved the champion to ``version``.

The champion is the ``version`` of the last promote / rollback / manual_promote event; a
batch whose file sha256 appears in a ``promote`` event is never applied again. Lines are
appended with one ``write`` + ``fsync`` each, so a crash leaves at most a torn last line,
which reading reports and ignores.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAMPION_EVENTS = ("promote", "rollback", "manual_promote")
EVENTS = (*CHAMPION_EVENTS, "reject", "quarantine")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Ledger:
    """The ledger file at ``path``."""

    path: Path

    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry in order (a torn last line from a crash is skipped with a warning)."""
        if not self.path.is_file():
            return []
        out = []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    log.warning("ledger %s: ignoring a torn last line (an interrupted write)", self.path)
                    continue
                raise ValueError(f"ledger {self.path} line {i + 1} is not JSON: the ledger is damaged") from None
        return out

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry (with ``event`` and ``time``) durably; returns it."""
        if event not in EVENTS:
            raise ValueError(f"unknown ledger event {event!r}; known: {EVENTS}")
        entry = {"event": event, "time": now(), **fields}
        data = (json.dumps(entry, allow_nan=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_torn_tail()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def _repair_torn_tail(self) -> None:
        # A torn last line (no newline) would glue onto the next entry; end it first.
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with self.path.open("ab") as g:
                        g.write(b"\n")

    def champion(self) -> dict[str, Any] | None:
        """The promote/rollback/manual_promote entry that set the current champion (None: the base model)."""
        current = None
        for e in self.entries():
            if e["event"] in CHAMPION_EVENTS:
                current = e
        return current

    def promotions(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["event"] == "promote"]

    def promotion(self, version: str) -> dict[str, Any] | None:
        return next((e for e in self.promotions() if e["version"] == version), None)

    def applied_hashes(self) -> set[str]:
        """sha256 of every batch file that was promoted at some point."""
        return {e["file_sha256"] for e in self.promotions()}

    def lineage(self, version: str | None) -> list[dict[str, Any]]:
        """The promote entries that built ``version``, oldest first (follows ``parent`` links)."""
        by_version = {e["version"]: e for e in self.promotions()}
        chain = []
        while version is not None:
            entry = by_version.get(version)
            if entry is None:
                raise ValueError(f"ledger has no promotion of {version}")
            chain.append(entry)
            version = entry.get("parent")
        return chain[::-1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.entries())
