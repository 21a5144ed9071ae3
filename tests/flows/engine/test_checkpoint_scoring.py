"""A checkpoint set on a fresh base model: ``nas export``'s verified rebuild, ``nas eval``'s norm
ratios and metrics.json context, on the tiny in-process model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from flows.engine import editing, evaluation
from flows.engine.checkpoints import read_checkpoint, rebuild_verified, write_checkpoint
from nas_core.deltas import weights_hash
from nas_core.requests import EditRequest
from nas_core.settings import MemitSettings, NASSettings, ValueSettings

VALUES = ValueSettings(steps=10, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0)
REQ = EditRequest("a", "The capital of {} is", "France", "Rome", "Paris")


@pytest.fixture
def checkpoint(tok, tmp_path) -> Path:
    model = tiny_model("llama")
    s = MemitSettings(layers=(0,), mom2_weight=1.0, nas=NASSettings(enabled=False), values=VALUES)
    session = editing.open_session(model, tok, "tiny", "memit", s, {0: torch.eye(64, dtype=torch.float64)},
                                   weights_hash(model), None)
    session.apply([REQ])
    return write_checkpoint(session, tmp_path / "v1")


def test_rebuild_verified_returns_the_manifests_hash_and_refuses_a_mismatch(checkpoint):
    model = tiny_model("llama")
    manifest = read_checkpoint(checkpoint).manifest
    assert rebuild_verified(model, weights_hash(tiny_model("llama")), checkpoint) == manifest["weights_hash"]
    assert weights_hash(model) == manifest["weights_hash"]
    doctored = {**manifest, "weights_hash": "f" * 64}
    (checkpoint / "manifest.json").write_text(json.dumps(doctored), encoding="utf-8")
    fresh = tiny_model("llama")
    expected = f"rebuilt weights hash {manifest['weights_hash'][:12]} != checkpoint's f{{12}}$"
    with pytest.raises(ValueError, match=expected):
        rebuild_verified(fresh, weights_hash(fresh), checkpoint)


def test_a_checkpoint_from_other_base_weights_is_refused(checkpoint):
    other = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="base weights"):
        rebuild_verified(other, weights_hash(other), checkpoint)
    with pytest.raises(ValueError, match="base weights"):
        evaluation.apply_checkpoint(other, weights_hash(other), checkpoint)


def test_apply_checkpoint_measures_the_manifests_norm_ratios(checkpoint):
    model = tiny_model("llama")
    base_hash = weights_hash(model)
    applied = evaluation.apply_checkpoint(model, base_hash, checkpoint)
    manifest = read_checkpoint(checkpoint).manifest
    assert applied.manifest == manifest and applied.edits == 1 and applied.path == checkpoint
    assert applied.norm_ratios == pytest.approx({n: manifest["norms"][n]["ratio"] for n in manifest["edited_weights"]})
    assert all(r != 1.0 for r in applied.norm_ratios.values())
    ctx = evaluation.eval_context("tiny", base_hash, applied, Path("r.jsonl"), 1.234)
    assert ctx == {"model": "tiny", "base_weights_hash": base_hash, "checkpoint": str(checkpoint),
                   "weights_hash": manifest["weights_hash"], "requests_file": "r.jsonl", "edits_so_far": 1,
                   "seconds": 1.23}


def test_without_a_checkpoint_the_base_model_is_scored_as_it_is():
    model = tiny_model("llama")
    base_hash = weights_hash(model)
    applied = evaluation.apply_checkpoint(model, base_hash, None)
    assert (applied.path, applied.manifest, applied.norm_ratios, applied.edits) == (None, {}, None, 0)
    assert weights_hash(model) == base_hash
    ctx = evaluation.eval_context("tiny", base_hash, applied, Path("r.json"), 0.0)
    assert ctx["checkpoint"] is None and ctx["weights_hash"] == base_hash and ctx["edits_so_far"] == 0
