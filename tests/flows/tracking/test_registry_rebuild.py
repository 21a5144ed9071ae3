"""A deleted ``mlflow.db`` (issue 12, item 11): the registry and the ``champion`` alias are rebuilt from the ledger.

A real SQLite MLflow store in a temp folder; checkpoints are registered exactly as
``flows.refresh.steps.promote`` registers them (deltas + manifest from a staging copy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.tracking.names import registered_model_name
from flows.tracking.rebuild import REBUILT_TAG, PromotedCheckpoint, RegistryRebuild
from flows.tracking.tracker import Tracker
from flows.tracking.uris import default_tracking_uri

NAME = registered_model_name("smollm2-135m")
DELTA_KEY = "model.layers.3.mlp.down_proj.weight"


def write_checkpoint(folder: Path, edits: int) -> dict:
    """A folder shaped like flows.engine.checkpoints.write_checkpoint output; returns its manifest."""
    folder.mkdir(parents=True)
    save_file({DELTA_KEY: torch.full((2, 2), float(edits))}, folder / "deltas.safetensors")
    save_file({"edit_count": torch.tensor([edits])}, folder / "state.safetensors")
    manifest = {"format": "nas-checkpoint/1", "model": "smollm2-135m", "weights_hash": f"{edits:064x}"}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return manifest


def promote_like_the_night(tracker: Tracker, repo: Path, version: str, edits: int) -> dict:
    """Register a checkpoint as process_batch does, move the alias, and return the ledger's promote line."""
    batch_id = f"night-{edits}"
    run_id = tracker.start_batch_run(batch_id, {})
    ckpt = repo / "data" / "checkpoints" / version
    manifest = write_checkpoint(ckpt, edits)
    staging = repo / "staging" / version
    staging.mkdir(parents=True)
    for name in ("deltas.safetensors", "manifest.json"):
        shutil.copy2(ckpt / name, staging / name)
    mv = tracker.register_checkpoint(
        NAME, run_id, staging, version, {"batch_id": batch_id, "weights_hash": manifest["weights_hash"]}
    )
    tracker.set_champion(NAME, mv)
    tracker.tag_run(run_id, {"verdict": "promoted", "version": version})
    tracker.finish_run(run_id)
    return {
        "event": "promote",
        "version": version,
        "batch_id": batch_id,
        "weights_hash": manifest["weights_hash"],
        "checkpoint": str(ckpt.relative_to(repo)),
        "mlflow_run_id": run_id,
        "model_version": mv,
    }


def delete_store(repo: Path) -> None:
    """``rm mlflow.db``, then forget what MLflow cached for it: the next night is a fresh process.

    MLflow keeps one store object per URI and one engine per database in the process; without
    this, the next Tracker would use a store whose schema check already ran (and a pooled
    connection to the unlinked file).
    """
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    db = repo / "mlflow.db"
    db.unlink()
    TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
    ModelRegistryStoreRegistry._get_store_with_resolved_uri.cache_clear()
    for store in (TrackingStore, RegistryStore):
        for uri in [u for u in store._engine_map if str(db) in u]:
            store._engine_map.pop(uri).dispose()


def labels(tracker: Tracker) -> list[str]:
    versions = tracker.client.search_model_versions(f"name = '{NAME}'")
    return sorted(v.tags["version_label"] for v in versions)


@pytest.fixture
def repo(tmp_path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def night_tracker(repo) -> Tracker:
    repo.mkdir()
    return Tracker(default_tracking_uri(repo))


def test_rebuild_restores_versions_and_alias_after_mlflow_db_deleted(repo, night_tracker):
    entries = [promote_like_the_night(night_tracker, repo, v, edits) for edits, v in enumerate(("v0001", "v0002"), 1)]
    night_tracker.set_champion(NAME, entries[0]["model_version"])  # a rollback: the champion is not the newest
    delete_store(repo)

    fresh = Tracker(default_tracking_uri(repo))
    # The defect: MLflow recreated the store without a word, and it holds none of the ledger's versions.
    assert (repo / "mlflow.db").is_file()
    assert labels(fresh) == [] and fresh.champion(NAME) is None
    assert fresh.version_for_label(NAME, "v0001") is None
    assert fresh.registry_lost(NAME, ["v0001", "v0002"])
    assert fresh.unregistered_labels(NAME, ["v0001", "v0002", "v0001"]) == ["v0001", "v0002"]

    promotions = [PromotedCheckpoint.from_entry(e, repo) for e in entries]
    result = fresh.rebuild_registry(NAME, promotions, champion_label="v0001")

    v1, v2 = fresh.version_for_label(NAME, "v0001"), fresh.version_for_label(NAME, "v0002")
    assert (v1, v2) == ("1", "2")  # re-registered in ledger order
    assert result == RegistryRebuild(rebuilt=("v0001", "v0002"), alias_moved=True, champion_version=v1)
    assert labels(fresh) == ["v0001", "v0002"]
    assert fresh.champion(NAME).version_label == "v0001"
    assert not fresh.registry_lost(NAME, ["v0001", "v0002"])

    client = fresh.client
    for entry, version in zip(entries, (v1, v2), strict=True):
        mv = client.get_model_version(NAME, version)
        assert mv.tags == {
            "version_label": entry["version"],
            "batch_id": entry["batch_id"],
            "weights_hash": entry["weights_hash"],
            REBUILT_TAG: "true",
        }
        assert "rebuilt from the ledger" in mv.description
        run = client.get_run(mv.run_id)
        assert mv.run_id != entry["mlflow_run_id"]  # the night's run went with the old database
        assert run.info.status == "FINISHED" and run.info.experiment_id == fresh.experiment_id
        assert run.data.tags[REBUILT_TAG] == "true"
        assert run.data.tags["original_run_id"] == entry["mlflow_run_id"]
        assert run.data.tags["original_model_version"] == entry["model_version"]
        assert run.data.tags["batch_id"] == entry["batch_id"] and run.data.tags["version"] == entry["version"]
        # The registry holds what the night registers: deltas + manifest, not the editor state.
        assert fresh.list_artifacts(mv.run_id, "checkpoint") == [
            "checkpoint/deltas.safetensors",
            "checkpoint/manifest.json",
        ]
    from mlflow.utils.file_utils import local_file_uri_to_path

    source = Path(local_file_uri_to_path(client.get_model_version(NAME, v2).source))
    assert torch.equal(load_file(source / "deltas.safetensors")[DELTA_KEY], torch.full((2, 2), 2.0))

    # Idempotent: a second call (the next night) registers nothing and leaves the alias alone.
    runs_before = len(client.search_runs([fresh.experiment_id]))
    again = Tracker(default_tracking_uri(repo)).rebuild_registry(NAME, promotions, champion_label="v0001")
    assert again == RegistryRebuild(champion_version=v1) and not again.changed
    assert labels(fresh) == ["v0001", "v0002"]
    assert len(client.search_runs([fresh.experiment_id])) == runs_before


def test_rebuild_reports_unusable_checkpoints_and_recovers_once_restored(repo, night_tracker, tmp_path):
    entries = [promote_like_the_night(night_tracker, repo, f"v000{i}", i) for i in (1, 2, 3)]
    night_tracker.set_champion(NAME, entries[1]["model_version"])
    delete_store(repo)
    backup = tmp_path / "dvc-cache-v0002"
    shutil.move(repo / "data/checkpoints/v0002", backup)  # gone: not pulled back yet
    manifest = repo / "data/checkpoints/v0003/manifest.json"
    manifest.write_text(json.dumps({"model": "smollm2-135m", "weights_hash": "f" * 64}), encoding="utf-8")

    fresh = Tracker(default_tracking_uri(repo))
    promotions = [PromotedCheckpoint.from_entry(e, repo) for e in entries]
    result = fresh.rebuild_registry(NAME, promotions, champion_label="v0002")
    # Not fatal: v0001 is back; the champion's folder is missing, so no alias (rather than a wrong one).
    assert result == RegistryRebuild(rebuilt=("v0001",), missing=("v0002",), mismatched=("v0003",))
    assert labels(fresh) == ["v0001"] and fresh.champion(NAME) is None

    again = fresh.rebuild_registry(NAME, promotions, champion_label="v0002")
    assert again == RegistryRebuild(missing=("v0002",), mismatched=("v0003",)) and not again.changed
    assert labels(fresh) == ["v0001"]

    shutil.move(backup, repo / "data/checkpoints/v0002")  # `dvc pull`
    restored = fresh.rebuild_registry(NAME, promotions, champion_label="v0002")
    assert restored.rebuilt == ("v0002",) and restored.alias_moved
    assert fresh.champion(NAME).version_label == "v0002"
    assert labels(fresh) == ["v0001", "v0002"]


def test_rebuild_fills_a_partial_registry_and_keeps_a_base_champions_alias(repo, night_tracker):
    entries = [promote_like_the_night(night_tracker, repo, f"v000{i}", i) for i in (1, 2)]
    delete_store(repo)
    fresh = Tracker(default_tracking_uri(repo))
    # A night ran on the emptied store before anyone noticed: v0003 is registered, v0001/v0002 are not.
    entries.append(promote_like_the_night(fresh, repo, "v0003", 3))
    all_labels = [e["version"] for e in entries]
    assert not fresh.registry_lost(NAME, all_labels)  # not empty, but still missing two versions
    assert fresh.unregistered_labels(NAME, all_labels) == ["v0001", "v0002"]

    promotions = [PromotedCheckpoint.from_entry(e, repo) for e in entries]
    result = fresh.rebuild_registry(NAME, promotions, champion_label="v0003")
    v3 = fresh.version_for_label(NAME, "v0003")
    assert result == RegistryRebuild(rebuilt=("v0001", "v0002"), champion_version=v3)  # alias already right
    assert labels(fresh) == ["v0001", "v0002", "v0003"]
    # The ledger's champion is the base model (a rollback to base): the alias is left as it is.
    assert fresh.rebuild_registry(NAME, promotions, champion_label=None) == RegistryRebuild(champion_version=v3)
    assert fresh.unregistered_labels(NAME, all_labels) == [] and not fresh.registry_lost(NAME, [])


def test_promoted_checkpoint_from_ledger_entry(tmp_path):
    entry = {
        "event": "promote",
        "version": "v0004",
        "checkpoint": "data/checkpoints/v0004",
        "weights_hash": "ab" * 32,
        "batch_id": "2026-01-04",
        "mlflow_run_id": "r" * 32,
        "model_version": "7",
        "parent": "v0003",
    }
    promo = PromotedCheckpoint.from_entry(entry, tmp_path)
    assert promo == PromotedCheckpoint(
        "v0004", tmp_path / "data/checkpoints/v0004", "ab" * 32, "2026-01-04", "r" * 32, "7"
    )
    bare = PromotedCheckpoint.from_entry({"version": "v0001", "checkpoint": "/elsewhere/v0001"}, tmp_path)
    assert bare == PromotedCheckpoint("v0001", Path("/elsewhere/v0001"))
    # An older or hand-written line without a checkpoint path: the checkpoints folder + its label.
    old = PromotedCheckpoint.from_entry({"version": "v0002"}, tmp_path, checkpoints=tmp_path / "ckpts")
    assert old.checkpoint == tmp_path / "ckpts" / "v0002"
    with pytest.raises(ValueError, match="v0002"):
        PromotedCheckpoint.from_entry({"version": "v0002"}, tmp_path)
