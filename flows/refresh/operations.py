"""Operator commands on the ledger: status, rollback, manual promote, and the demo nights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.audit.record import record_promotion
from flows.config.params import Params
from flows.engine.checkpoints import CheckpointTampered, verify_checkpoint
from flows.facts.inbox import scan_inbox
from flows.io import sha256_file
from flows.ledger.records import CHAMPION_EVENTS, Ledger, LedgerDamaged
from flows.refresh.lock import refresh_lock
from flows.tracking.tracker import Tracker
from flows.tracking.tracker_process import AnyTracker, TrackerProcess
from flows.tracking.uris import resolve_tracking_uri
from nas_core.collapse import norm_growth_per_edit

if TYPE_CHECKING:
    from flows.refresh.steps import BatchOutcome

#: ``nightly_refresh``'s signature: (params file, project directory) -> the night's outcomes.
RunNight = Callable[[str | None, str | None], list["BatchOutcome"]]


def _checkpoint_problem(params: Params, entry, missing_ok: bool = False, chain: bool = True) -> str | None:
    """Why the checkpoint of promote ``entry`` cannot be trusted, or None."""
    ckpt = params.roots.checkpoints / entry["version"]
    if missing_ok and not ckpt.exists():
        return None
    if not (ckpt / "manifest.json").is_file():
        return f"{entry['version']}: checkpoint {ckpt} is missing (restore it with `dvc pull data/checkpoints.dvc`)"
    try:
        manifest = verify_checkpoint(ckpt, entry.files, chain)
    except (CheckpointTampered, FileNotFoundError) as err:
        return str(err)
    if manifest.get("weights_hash") != entry["weights_hash"]:
        return (f"{entry['version']}: manifest.json records weights {str(manifest.get('weights_hash'))[:12]}, the "
                f"ledger promoted {entry['weights_hash'][:12]}")
    return None  # a line without ``files`` (promoted before file hashes): its weights hash is what was checked


def verify_lineage(params: Params, ledger: Ledger, version: str | None, missing_ok: bool = False) -> list[str]:
    """Every checkpoint and accepted batch of ``version``'s lineage checked against the ledger
    (``missing_ok``: a checkpoint folder that is absent, as on an auditor's fresh clone, is skipped)."""
    problems: list[str] = []
    for entry in ledger.lineage(version) if version else []:
        # Every version is checked against the ledger here, so a compact one's parents need no second look.
        problem = _checkpoint_problem(params, entry, missing_ok, chain=False)
        if problem:
            problems.append(problem)
        batch = params.roots.resolve(entry["accepted_path"])
        if not batch.is_file():
            problems.append(f"{entry['version']}: accepted batch {batch} is missing")
        elif (digest := sha256_file(batch)) != entry["file_sha256"]:
            problems.append(f"{entry['version']}: accepted batch {batch.name} hashes to {digest}, the ledger "
                            f"recorded {entry['file_sha256']}")
    return problems


def _forecast(params: Params, ledger: Ledger, version: str) -> dict[str, float | None] | None:
    from flows.ledger.norms import lineage_forecast

    try:
        return lineage_forecast(ledger, version, params.model_config().collapse.max_norm_ratio)
    except LedgerDamaged:
        return None


def status(params: Params, nights: int = 5, verify: bool = False) -> dict[str, Any]:
    """Champion version, edits so far, worst norm ratio, the last nights' decisions, what the
    inbox holds, ledger damage and the champion's checkpoint check (``verify``: the whole lineage)."""
    ledger = Ledger(params.roots.ledger)
    entries, damage = ledger.read()
    champ = next((e for e in reversed(entries) if e.event in CHAMPION_EVENTS), None)
    promo = next((e for e in entries if e.event == "promote" and e.version == champ.version), None) if champ else None
    ratios = promo.get("norm_ratios", {}) if promo else {}
    edits = promo.get("edits_so_far", 0) if promo else 0
    integrity: list[str] = []
    if not damage and champ is not None:
        try:
            integrity = verify_lineage(params, ledger, champ.version) if verify else \
                [p for p in [_checkpoint_problem(params, promo)] if p] if promo else []
        except LedgerDamaged as err:
            damage.append(str(err))
    scan = scan_inbox(params.roots.inbox)
    return {
        "ledger": str(params.roots.ledger),
        "champion": champ["version"] if champ else None,
        "champion_set_by": champ["event"] if champ else None,
        "weights_hash": promo["weights_hash"] if promo else None,
        "edits_so_far": edits,
        "norm_ratio_max": max(ratios.values()) if ratios else 1.0,
        "norm_growth_per_edit": norm_growth_per_edit(ratios, edits),
        "inbox": [p.name for p in scan.batches],
        "inbox_ignored": [{"name": i.name, "why": i.why} for i in scan.ignored],
        "ledger_damage": damage,
        "integrity": integrity,
        "verified": "lineage" if verify else "champion",
        "unhashed_versions": [e.version for e in entries if e.event == "promote" and not e.files],
        "forecast": _forecast(params, ledger, champ.version) if champ is not None and not damage else None,
        "recent": [{k: e.get(k) for k in ("time", "event", "batch_id", "version", "failed_checks", "problems",
                                          "from_version", "reason", "metrics", "norm_ratios")}
                   for e in entries[-nights:]],
    }


def move_champion(params: Params, version: str, event: str, reason: str, tracker=None) -> dict[str, Any]:
    """Point the champion at an earlier promoted ``version`` (``rollback`` or ``manual_promote``).

    The checkpoint folder must still rebuild the weights the ledger recorded; the MLflow
    ``champion`` alias follows when ``tracker`` is given, and the DVC audit record
    (:func:`flows.audit.record.record_promotion`; its problems are in the returned entry's
    ``audit_problems``). Holds the refresh lock.
    """
    ledger = Ledger(params.roots.ledger)
    with refresh_lock(params.roots.ledger.with_name(".refresh.lock")):
        promo = ledger.promotion(version)
        if promo is None:
            known = [e["version"] for e in ledger.promotions()]
            raise ValueError(f"{version} was never promoted; promoted versions: {known or 'none'}")
        ckpt = params.roots.checkpoints / version
        manifest = ckpt / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} is missing (restore it with `dvc pull` / `dvc repro`)")
        recorded = verify_checkpoint(ckpt, promo.files).get("weights_hash")
        if recorded != promo["weights_hash"]:
            raise ValueError(f"{ckpt} holds weights {str(recorded)[:12]}, the ledger promoted "
                             f"{promo['weights_hash'][:12]}")
        champ = ledger.champion()
        if champ is not None and champ["version"] == version:
            raise ValueError(f"{version} is already the champion")
        entry = ledger.append(event, version=version, from_version=champ["version"] if champ else None,
                              weights_hash=promo["weights_hash"], reason=reason)
        # The DVC record follows the ledger (data/replay/champion, dvc.lock), so `dvc status` stays clean.
        entry["audit_problems"] = record_promotion(params, git_commit=params.audit.commit_pointers)
    if tracker is not None:
        from flows.tracking.names import registered_model_name

        name = registered_model_name(Path(json.loads(manifest.read_text(encoding="utf-8"))["model"]).name)
        mv = tracker.version_for_label(name, version)
        if mv is not None:
            tracker.set_champion(name, mv)
            entry["mlflow_model_version"] = mv
    return entry


def open_tracker(params: Params, in_child: bool = False) -> AnyTracker:
    """The project's MLflow tracker (params.yaml ``tracking``); raises TrackingError when the store is
    unreachable. The night's ``connect_tracking`` retries this and runs it ``in_child``
    (:class:`TrackerProcess`: MLflow stays out of the night's memory); the operator commands do not."""
    kind = TrackerProcess if in_child else Tracker
    return kind(resolve_tracking_uri(params.tracking.uri or None, params.root), params.tracking.experiment)


def demo_nights(params: Params) -> list[Path]:
    """The shipped demo batches not yet seen by the ledger, in night order."""
    ledger = Ledger(params.roots.ledger)
    seen = {e.get("file_sha256") for e in ledger.entries()}
    return [p for p in sorted(params.roots.demo_batches.glob("*.jsonl")) if sha256_file(p) not in seen]


def stage_demo_night(params: Params, night: Path) -> Path:
    """Copy one demo batch into the inbox (a copy: the shipped file stays as it is)."""
    inbox = params.roots.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / night.name
    shutil.copy2(night, target)
    return target


def refresh_nights(params: Params, params_file: Path | None, nights: Sequence[Path] | None = None,
                   on_staged: Callable[[Path, Path], None] | None = None,
                   run: RunNight | None = None) -> list[BatchOutcome]:
    """``nas refresh``: one flow run over the inbox as it is (``nights`` None), or one per demo night,
    each staged into the inbox first (``on_staged(night, staged)`` after each copy). ``run``
    defaults to :func:`flows.refresh.flow.nightly_refresh`; its refusals propagate."""
    if run is None:
        from flows.refresh.flow import nightly_refresh as run
    outcomes: list[BatchOutcome] = []
    for night in [None] if nights is None else nights:
        if night is not None:
            staged = stage_demo_night(params, night)
            if on_staged is not None:
                on_staged(night, staged)
        outcomes += run(str(params_file.resolve()) if params_file else None, str(params.root))
    return outcomes
