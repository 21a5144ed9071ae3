"""``nas bench speed --stream``: one method of the horizon flow timed on a long edit stream."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.studies.horizon import HorizonSettings

#: Where the stream's study lives, and the engine phases its table breaks the time into.
OUT_ROOT = Path("bench/stream")
PHASES = ("values", "keys", "solve", "write")


def stream_settings(label: str, n: int, batch_size: int, pilots: int | None,
                    compute_dtype: str | None) -> HorizonSettings:
    """The horizon study's settings for timing ``label`` on a stream of ``n``: measurements every 250
    edits (every 100 until 1000), 50 NAS pilots and ``auto`` precision unless given. A bad value is
    a ValueError."""
    return HorizonSettings(methods=(label,), stream_length=n, batch_size=batch_size, eval_every=250,
                           eval_every_dense=100, dense_until=1000, pilots=pilots or 50,
                           compute_dtype=compute_dtype or "auto")


@dataclass(frozen=True)
class StreamRow:
    """One measurement point: seconds per edit (editing only, and with the measurements so far),
    the cumulative seconds of each of :data:`PHASES`, and the measurements' cumulative seconds."""

    edits: int
    seconds_per_edit: float
    seconds_per_edit_all: float
    phase_seconds: tuple[float, ...]
    measured_seconds: float


def stream_rows(points: list[dict[str, Any]]) -> list[StreamRow]:
    """The rows of the stream's table, one per measurement point."""
    rows = []
    for p in points:
        ph = p.get("phase_seconds", {})
        measured = sum(q["eval_seconds"] for q in points if q["edits"] <= p["edits"])
        rows.append(StreamRow(p["edits"], p["seconds_per_edit"], p.get("seconds_per_edit_all", 0),
                              tuple(ph.get(k, 0) for k in PHASES), measured))
    return rows
