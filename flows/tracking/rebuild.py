"""A registry lost with its store (a deleted ``mlflow.db``) is rebuilt from the ledger's checkpoints.

The ledger is the source of truth: each version it promoted that the registry lacks is
re-registered from its checkpoint folder (if the folder still holds the weights the ledger
promoted), and the ``champion`` alias is pointed at the ledger's champion again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.tracking.names import CHAMPION_ALIAS

if TYPE_CHECKING:
    from flows.tracking.tracker import Tracker

log = logging.getLogger(__name__)

REBUILT_TAG = "rebuilt_from_ledger"


@dataclass(frozen=True)
class PromotedCheckpoint:
    """One ledger ``promote`` line, as much as the registry needs (plain data: no ledger import).

    ``checkpoint`` is the version's folder; ``run_id`` and ``model_version`` are the original
    MLflow run and version number, kept as tags when a lost registry is rebuilt.
    """

    version_label: str
    checkpoint: Path
    weights_hash: str | None = None
    batch_id: str | None = None
    run_id: str | None = None
    model_version: str | None = None
    files: Mapping[str, str] | None = None  # the ledger's sha256 of every checkpoint file

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], root: Path, checkpoints: Path | None = None) -> PromotedCheckpoint:
        """Read a ledger ``promote`` dict; a relative ``checkpoint`` is taken relative to ``root`` (the repo).

        A line without ``checkpoint`` falls back to ``checkpoints / version`` (ValueError without either).
        """
        label = str(entry["version"])
        if entry.get("checkpoint"):
            folder = Path(entry["checkpoint"])
            folder = folder if folder.is_absolute() else Path(root) / folder
        elif checkpoints is not None:
            folder = Path(checkpoints) / label
        else:
            raise ValueError(f"the ledger's promote line for {label} names no checkpoint folder")

        def text(field: str) -> str | None:
            return None if entry.get(field) is None else str(entry[field])

        return cls(
            version_label=label,
            checkpoint=folder,
            weights_hash=text("weights_hash"),
            batch_id=text("batch_id"),
            run_id=text("mlflow_run_id"),
            model_version=text("model_version"),
            files=dict(entry.get("files") or {}) or None,
        )


@dataclass(frozen=True)
class RegistryRebuild:
    """What :meth:`Tracker.rebuild_registry` did; labels in ledger order.

    ``missing``: the checkpoint folder (or one of its files) is gone; ``mismatched``: its
    manifest is unreadable or names other weights than the ledger promoted. Neither is registered.
    ``champion_version`` is the registry version holding the alias afterwards (None: no alias).
    """

    rebuilt: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    alias_moved: bool = False
    champion_version: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.rebuilt) or self.alias_moved


def rebuild_registry(
    tracker: Tracker, model_name: str, promotions: Sequence[PromotedCheckpoint], champion_label: str | None
) -> RegistryRebuild:
    """Re-register the ledger's promoted versions the registry lacks, then point ``champion`` at the ledger's.

    In ledger order, each missing version gets a new FINISHED run tagged ``rebuilt_from_ledger=true``
    and ``original_run_id`` (the night's run went with the old store), and is registered from its
    checkpoint folder's :func:`flows.engine.checkpoints.registry_files` with the night's labels and
    tags. Unusable folders are skipped and reported. Idempotent: once nothing is missing, a call changes nothing.
    """
    todo = set(tracker.unregistered_labels(model_name, [p.version_label for p in promotions]))
    rebuilt: list[str] = []
    missing: list[str] = []
    mismatched: list[str] = []
    for promo in promotions:
        if promo.version_label not in todo:
            continue
        todo.discard(promo.version_label)  # a label listed twice is handled once
        problem = _checkpoint_problem(promo)
        if problem is not None:
            (missing if problem == "missing" else mismatched).append(promo.version_label)
            continue
        version = _reregister(tracker, model_name, promo)
        log.warning(
            "%s %s re-registered from %s as version %s (rebuilt from the ledger)",
            model_name,
            promo.version_label,
            promo.checkpoint,
            version,
        )
        rebuilt.append(promo.version_label)
    moved, champion_version = _point_champion(tracker, model_name, champion_label)
    return RegistryRebuild(tuple(rebuilt), tuple(missing), tuple(mismatched), moved, champion_version)


def _reregister(tracker: Tracker, model_name: str, promo: PromotedCheckpoint) -> str:
    """Register ``promo`` again under a new run that records the lost original; returns the version."""
    label = promo.version_label
    run_tags = {"original_run_id": promo.run_id, "original_model_version": promo.model_version}
    version_tags = {"batch_id": promo.batch_id, "weights_hash": promo.weights_hash}
    run_tags = {REBUILT_TAG: "true", "version": label, **_known(run_tags)}
    version_tags = {REBUILT_TAG: "true", **_known(version_tags)}
    run_id = tracker.start_batch_run(promo.batch_id or label, {}, tags=run_tags)
    try:
        with tempfile.TemporaryDirectory() as staging:
            from flows.engine.checkpoints import registry_files

            for name in registry_files(promo.checkpoint):
                shutil.copy2(promo.checkpoint / name, Path(staging) / name)
            version = tracker.register_checkpoint(model_name, run_id, Path(staging), label, version_tags)
        tracker.describe_version(
            model_name,
            version,
            f"{label}: NAS-edited checkpoint rebuilt from the ledger "
            f"(original run {promo.run_id or 'unknown'}, lost with the old store)",
        )
    except BaseException:
        tracker.abandon_run(run_id)
        raise
    tracker.tag_run(run_id, {"verdict": "promoted"})
    tracker.finish_run(run_id)
    return version


def _point_champion(tracker: Tracker, model_name: str, champion_label: str | None) -> tuple[bool, str | None]:
    """Move the alias to the ledger's champion if it is registered; returns (moved, version holding it)."""
    current = tracker.champion(model_name)
    held = current.version if current else None
    if champion_label is None:  # the ledger's champion is the base model: nothing to point at
        return False, held
    target = tracker.version_for_label(model_name, champion_label)
    if target is None:
        log.warning(
            "%s: the ledger's champion %s is not in the registry; alias %r left at %s",
            model_name,
            champion_label,
            CHAMPION_ALIAS,
            held or "nothing",
        )
        return False, held
    if held == target:
        return False, target
    tracker.set_champion(model_name, target)
    log.warning(
        "%s: alias %r re-pointed at version %s (%s, the ledger's champion)",
        model_name,
        CHAMPION_ALIAS,
        target,
        champion_label,
    )
    return True, target


def _known(tags: Mapping[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if v is not None}


def _checkpoint_problem(promo: PromotedCheckpoint) -> str | None:
    """None when ``promo.checkpoint`` can be registered; else "missing" or "mismatched" (logged)."""
    from flows.engine.checkpoints import verify_checkpoint

    try:
        recorded = verify_checkpoint(promo.checkpoint, promo.files).get("weights_hash")
    except FileNotFoundError as exc:
        log.warning("cannot re-register %s: %s", promo.version_label, exc)
        return "missing"
    except (OSError, ValueError, AttributeError) as exc:  # CheckpointTampered is a ValueError
        log.warning("cannot re-register %s: unreadable manifest in %s (%s)", promo.version_label, promo.checkpoint, exc)
        return "mismatched"
    if promo.weights_hash is not None and recorded != promo.weights_hash:
        log.warning(
            "cannot re-register %s: %s holds weights %s, the ledger promoted %s",
            promo.version_label,
            promo.checkpoint,
            str(recorded)[:12],
            promo.weights_hash[:12],
        )
        return "mismatched"
    return None
