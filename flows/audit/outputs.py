"""The audit's files under ``data/replay/`` and the plot data the DVC pipeline shows.

Written at promotion from the ledger (``"source": "promotion"``) and by the replay and
evaluate stages (``"source": "replay"``); ``dvc metrics`` / ``dvc plots`` read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPLAY_DIR = Path("data/replay")
CHAMPION_DIR = REPLAY_DIR / "champion"
REPLAY_JSON = REPLAY_DIR / "replay.json"
METRICS_JSON = REPLAY_DIR / "metrics.json"
NORMS_CSV = REPLAY_DIR / "norms.csv"
RETENTION_CSV = REPLAY_DIR / "retention.csv"
PROMOTION_JSON = REPLAY_DIR / "promotion.json"

#: Retention columns of retention.csv (the flow's ``retention.*`` metrics).
RETENTION_COLUMNS = ("efficacy_success", "generalisation_success", "specificity_success", "editing_score",
                     "perplexity_ratio", "general_drop", "norm_ratio_max")

NORMS_HEADER = ("version", "edits_so_far", "layer", "norm_ratio", "source")
RETENTION_HEADER = ("version", "edits_so_far", *RETENTION_COLUMNS, "source")


def norms_rows(entries: Sequence[dict[str, Any]], current: dict[str, float] | None = None, version: str | None = None,
               edits: int = 0, source: str = "replay") -> list[dict[str, Any]]:
    """||W_t||/||W_0|| per layer after each promotion of the lineage (and of the current model)."""
    rows: list[dict[str, Any]] = []
    layers = list((entries[0].get("norm_ratios") or {}) if entries else (current or {}))
    for layer in layers:
        rows.append({"version": "base", "edits_so_far": 0, "layer": layer, "norm_ratio": 1.0, "source": "base"})
    for e in entries:
        for layer, r in (e.get("norm_ratios") or {}).items():
            rows.append({"version": e["version"], "edits_so_far": e.get("edits_so_far", 0), "layer": layer,
                         "norm_ratio": r, "source": "ledger"})
    for layer, r in (current or {}).items():
        rows.append({"version": version or "base", "edits_so_far": edits, "layer": layer, "norm_ratio": r,
                     "source": source})
    return rows


def retention_rows(entries: Sequence[dict[str, Any]], current: dict[str, Any] | None = None,
                   version: str | None = None, edits: int = 0, source: str = "replay") -> list[dict[str, Any]]:
    """The retention metrics after each promotion (the ledger's ``retention.*``) and of the current model."""
    rows = []
    for e in entries:
        m = e.get("metrics") or {}
        rows.append({"version": e["version"], "edits_so_far": e.get("edits_so_far", 0),
                     **{c: m.get(f"retention.{c}", "") for c in RETENTION_COLUMNS}, "source": "ledger"})
    if current is not None:
        rows.append({"version": version or "base", "edits_so_far": edits,
                     **{c: "" if current.get(c) is None else current[c] for c in RETENTION_COLUMNS},
                     "source": source})
    return rows
