"""A lineage's weight-norm history and its forecast: how many edits before the norm bound."""

from __future__ import annotations

from flows.ledger.records import Ledger
from nas_core.collapse import forecast


def lineage_forecast(ledger: Ledger, version: str | None, bound: float, current: dict[str, float] | None = None,
                     edits: int = 0) -> dict[str, float | None]:
    """The norm forecast of ``version``'s lineage (plus a candidate's ``current`` ratios at
    ``edits``): further edits before ``bound`` by a linear and an exponential fit, the worse,
    and the nights that is at the lineage's mean edits per night."""
    lineage = ledger.lineage(version) if version else []
    history = [(0, 1.0)] + [(e["edits_so_far"], max((e.get("norm_ratios") or {"": 1.0}).values())) for e in lineage]
    nights = len(lineage)
    if current:
        history.append((edits, max(current.values())))
        nights += 1
    f = forecast(history, bound)
    per_night = history[-1][0] / nights if nights else 0
    worst = f.worst
    return {"edits_left_linear": f.linear, "edits_left_exponential": f.exponential, "edits_left": worst,
            "nights_left": worst / per_night if worst is not None and per_night else None}


def norm_history(ledger: Ledger, version: str | None, current: dict[str, float], edits: int) -> dict[str, list]:
    """``(edits, ||W||/||W0||)`` per edited weight over ``version``'s lineage, then ``current``."""
    history: dict[str, list] = {}
    for entry in ledger.lineage(version) if version else []:
        for name, r in entry.get("norm_ratios", {}).items():
            history.setdefault(name, [(0, 1.0)]).append((entry["edits_so_far"], r))
    for name, r in current.items():
        history.setdefault(name, [(0, 1.0)]).append((edits, r))
    return history
