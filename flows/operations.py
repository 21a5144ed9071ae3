"""Operator commands on the ledger: status, rollback, manual promote, and the demo nights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flows.audit import record_promotion
from flows.config import REPO
from flows.ledger import Ledger
from flows.params import Params
from flows.refresh import refresh_lock, sha256_file
from nas_core.collapse import norm_growth_per_edit


def status(params: Params, nights: int = 5) -> dict[str, Any]:
    """Champion version, edits so far, worst norm ratio, and the last nights' decisions."""
    ledger = Ledger(params.paths.resolve("ledger"))
    entries = ledger.entries()
    champ = ledger.champion()
    promo = ledger.promotion(champ["version"]) if champ else None
    ratios = promo.get("norm_ratios", {}) if promo else {}
    edits = promo.get("edits_so_far", 0) if promo else 0
    return {
        "champion": champ["version"] if champ else None,
        "champion_set_by": champ["event"] if champ else None,
        "weights_hash": promo["weights_hash"] if promo else None,
        "edits_so_far": edits,
        "norm_ratio_max": max(ratios.values()) if ratios else 1.0,
        "norm_growth_per_edit": norm_growth_per_edit(ratios, edits),
        "inbox": sorted(p.name for p in params.paths.resolve("inbox").glob("*") if p.is_file())
        if params.paths.resolve("inbox").is_dir() else [],
        "recent": [{k: e.get(k) for k in ("time", "event", "batch_id", "version", "failed_checks", "problems",
                                          "from_version", "reason")} for e in entries[-nights:]],
    }


def move_champion(params: Params, version: str, event: str, reason: str, tracker=None) -> dict[str, Any]:
    """Point the champion at an earlier promoted ``version`` (``rollback`` or ``manual_promote``).

    The checkpoint folder must still rebuild the weights the ledger recorded; the MLflow
    ``champion`` alias follows when ``tracker`` is given, and the DVC audit record
    (:func:`flows.audit.record_promotion`; its problems are in the returned entry's
    ``audit_problems``). Holds the refresh lock.
    """
    ledger = Ledger(params.paths.resolve("ledger"))
    with refresh_lock(params.paths.resolve("ledger").with_name(".refresh.lock")):
        promo = ledger.promotion(version)
        if promo is None:
            known = [e["version"] for e in ledger.promotions()]
            raise ValueError(f"{version} was never promoted; promoted versions: {known or 'none'}")
        ckpt = params.paths.resolve("checkpoints") / version
        manifest = ckpt / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} is missing (restore it with `dvc pull` / `dvc repro`)")
        recorded = json.loads(manifest.read_text(encoding="utf-8"))["weights_hash"]
        if recorded != promo["weights_hash"]:
            raise ValueError(f"{ckpt} holds weights {recorded[:12]}, the ledger promoted {promo['weights_hash'][:12]}")
        champ = ledger.champion()
        if champ is not None and champ["version"] == version:
            raise ValueError(f"{version} is already the champion")
        entry = ledger.append(event, version=version, from_version=champ["version"] if champ else None,
                              weights_hash=promo["weights_hash"], reason=reason)
        # The DVC record follows the ledger (data/replay/champion, dvc.lock), so `dvc status` stays clean.
        entry["audit_problems"] = record_promotion(REPO, params=params)
    if tracker is not None:
        from flows.tracking import registered_model_name

        name = registered_model_name(Path(json.loads(manifest.read_text(encoding="utf-8"))["model"]).name)
        mv = tracker.version_for_label(name, version)
        if mv is not None:
            tracker.set_champion(name, mv)
            entry["mlflow_model_version"] = mv
    return entry


def demo_nights(params: Params) -> list[Path]:
    """The shipped demo batches not yet seen by the ledger, in night order."""
    ledger = Ledger(params.paths.resolve("ledger"))
    seen = {e.get("file_sha256") for e in ledger.entries()}
    return [p for p in sorted(params.paths.resolve("demo_batches").glob("*.jsonl")) if sha256_file(p) not in seen]


def stage_demo_night(params: Params, night: Path) -> Path:
    """Copy one demo batch into the inbox (a copy: the shipped file stays as it is)."""
    inbox = params.paths.resolve("inbox")
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / night.name
    shutil.copy2(night, target)
    return target
