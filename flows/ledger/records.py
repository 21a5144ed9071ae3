"""The ledger: ``data/ledger.jsonl``, an append-only record of every decision the pipeline made.

One JSON object per line, each with an ``event``:

* ``promote``: a batch passed the gate; its checkpoint ``version`` became champion.
* ``reject``: a batch was edited and evaluated but failed the gate (``failed_checks``).
* ``quarantine``: a batch failed validation before any edit.
* ``rollback`` / ``manual_promote``: an operator moved the champion to ``version``.

The champion is the ``version`` of the last promote / rollback / manual_promote event; a
batch whose file sha256 appears in a ``promote`` event is never applied again. Lines are
appended with one ``write`` + ``fsync`` each, so a crash leaves at most a torn last line,
which reading reports and ignores. Every other line is parsed into a typed
:class:`LedgerEntry`; a line of the wrong shape is a :class:`LedgerDamaged` error naming the
line number and what is wrong (``Ledger.read`` lists all of them for ``nas status``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.io import now

log = logging.getLogger(__name__)

CHAMPION_EVENTS = ("promote", "rollback", "manual_promote")
EVENTS = (*CHAMPION_EVENTS, "reject", "quarantine", "pull")


class LedgerDamaged(ValueError):
    """A ledger line is not a valid entry; the message names the file, the line and the fault."""


_VERSION = re.compile(r"v\d{4,}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# event -> (field, check, what it must be) for the fields the pipeline reads.
_STR = (lambda v: isinstance(v, str) and bool(v), "a non-empty string")
_SHA = (lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)), "a sha256 (64 hex digits)")
_VER = (lambda v: isinstance(v, str) and bool(_VERSION.fullmatch(v)), "a version such as v0001")
_IDS = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of case ids")
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
_SCHEMA: dict[str, dict[str, tuple]] = {
    "promote": {"version": _VER, "batch_id": _STR, "file_sha256": _SHA, "weights_hash": _SHA,
                "request_ids": _IDS, "accepted_path": _STR, "edits_so_far": _INT},
    "reject": {"batch_id": _STR, "file_sha256": _SHA},
    "quarantine": {"batch_id": _STR, "file_sha256": _SHA},
    "rollback": {"version": _VER},
    "manual_promote": {"version": _VER},
    "pull": {"source": _STR, "path": _STR, "revision": _STR, "file_sha256": _SHA, "inbox_name": _STR},
}
_OPTIONAL: dict[str, tuple] = {
    "parent": (lambda v: v is None or _VER[0](v), "null or a version"),
    "files": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _SHA[0](h) for k, h in v.items()),
              "an object of file name -> sha256"),
    "skipped_ids": _IDS,
    "weights_hash": _SHA,
}


@dataclass(frozen=True)
class LedgerEntry(Mapping):
    """One checked ledger line: ``event``, its ``line`` number (1-based) and its fields.

    The fields the pipeline reads are checked for presence and type by event
    (:func:`parse_entry`); the entry reads like the JSON object it came from.
    """

    line: int
    event: str
    fields: Mapping[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    @property
    def version(self) -> str | None:
        return self.fields.get("version")

    @property
    def files(self) -> dict[str, str]:
        """The sha256 of every checkpoint file the line recorded (empty before file hashes existed)."""
        return dict(self.fields.get("files") or {})


def parse_entry(value: Any, line: int, path: Path | str = "ledger") -> LedgerEntry:
    """The typed entry of one decoded ledger line, or :class:`LedgerDamaged` saying what is wrong."""
    where = f"ledger {path} line {line}"
    if not isinstance(value, dict):
        raise LedgerDamaged(f"{where}: expected a JSON object, got {type(value).__name__}")
    event = value.get("event")
    if event not in EVENTS:
        raise LedgerDamaged(f"{where}: 'event' is {event!r}, not one of {', '.join(EVENTS)}")
    checks = {**{k: v for k, v in _OPTIONAL.items() if k in value}, **_SCHEMA[event]}
    for key, (ok, what) in checks.items():
        if key not in value:
            raise LedgerDamaged(f"{where}: a {event} entry needs {key!r} ({what})")
        if not ok(value[key]):
            raise LedgerDamaged(f"{where}: {event} field {key!r} must be {what}, got {value[key]!r:.60}")
    return LedgerEntry(line, event, value)


@dataclass(frozen=True)
class Ledger:
    """The ledger file at ``path``."""

    path: Path

    def read(self) -> tuple[list[LedgerEntry], list[str]]:
        """Every valid entry in order and one message per damaged line (for ``nas status``).

        A torn last line (an interrupted write) is skipped with a warning, not damage.
        """
        if not self.path.is_file():
            return [], []
        out: list[LedgerEntry] = []
        damage: list[str] = []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                if i == len(lines) - 1:
                    log.warning("ledger %s: ignoring a torn last line (an interrupted write)", self.path)
                    continue
                damage.append(f"ledger {self.path} line {i + 1}: not JSON")
                continue
            try:
                out.append(parse_entry(value, i + 1, self.path))
            except LedgerDamaged as err:
                damage.append(str(err))
        return out, damage

    def entries(self) -> list[LedgerEntry]:
        """Every entry in order; raises :class:`LedgerDamaged` (first damaged line) if any is damaged."""
        out, damage = self.read()
        if damage:
            more = f" (and {len(damage) - 1} more damaged lines)" if len(damage) > 1 else ""
            raise LedgerDamaged(f"{damage[0]}{more}; repair it from git or `dvc pull data/ledger.jsonl.dvc`")
        return out

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry (with ``event`` and ``time``) durably; returns it."""
        entry = {"event": event, "time": now(), **fields}
        parse_entry(json.loads(json.dumps(entry, allow_nan=True, default=str)), 0, self.path)  # never write damage
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
        """Set a torn last line (an interrupted append: no newline) aside before appending.

        Ending it with a newline would leave a damaged line in the middle of the ledger, which
        every later read refuses; its bytes go to ``ledger.jsonl.torn-TIME`` and are cut off.
        """
        if not (self.path.is_file() and self.path.stat().st_size):
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        aside = self.path.with_name(f"{self.path.name}.torn-{now().replace(':', '')}")
        aside.write_bytes(data[keep:])
        with self.path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        log.warning("ledger %s: an interrupted write left a torn last line; set aside in %s", self.path, aside)

    def champion(self) -> LedgerEntry | None:
        """The promote/rollback/manual_promote entry that set the current champion (None: the base model)."""
        current = None
        for e in self.entries():
            if e["event"] in CHAMPION_EVENTS:
                current = e
        return current

    def promotions(self) -> list[LedgerEntry]:
        return [e for e in self.entries() if e["event"] == "promote"]

    def promotion(self, version: str) -> LedgerEntry | None:
        return next((e for e in self.promotions() if e["version"] == version), None)

    def applied_hashes(self) -> set[str]:
        """sha256 of every batch file that was promoted at some point."""
        return {e["file_sha256"] for e in self.promotions()}

    def lineage(self, version: str | None) -> list[LedgerEntry]:
        """The promote entries that built ``version``, oldest first (follows ``parent`` links)."""
        by_version = {e["version"]: e for e in self.promotions()}
        chain: list[LedgerEntry] = []
        while version is not None:
            entry = by_version.get(version)
            if entry is None:
                raise LedgerDamaged(f"ledger {self.path} has no promotion of {version}")
            if entry in chain:
                raise LedgerDamaged(f"ledger {self.path} line {entry.line}: the parent links of {version} form a cycle")
            chain.append(entry)
            version = entry.get("parent")
        return chain[::-1]

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries())
