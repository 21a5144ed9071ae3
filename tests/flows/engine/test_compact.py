"""Compact checkpoints: increments, chains, snapshots, the format-1 reader, standalone copies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_model

from flows.engine import editing
from flows.engine.chain import lineage_steps, read_chain
from flows.engine.checkpoints import (
    CheckpointTampered,
    read_checkpoint,
    rebuild_verified,
    standalone_copy,
    verify_checkpoint,
    write_checkpoint,
)
from flows.io import sha256_file
from nas_core.deltas import weights_hash
from nas_core.requests import EditRequest
from nas_core.settings import AlphaEditSettings, MemitSettings, NASSettings, ValueSettings

VALUES = ValueSettings(steps=8, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0)
REQS = [EditRequest(str(i), "The capital of {} is", s, "Rome", t)
        for i, (s, t) in enumerate([("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Milan"),
                                    ("Chile", "Lima"), ("Peru", "Quito"), ("Japan", "Kyoto")])]
NIGHTS = [REQS[0:2], REQS[2:3], REQS[3:5], REQS[5:6]]


def _session(method, tok, checkpoint=None, dtype=torch.float32):
    model = tiny_model("llama", layers=3).to(dtype)
    nas = NASSettings(enabled=True, outlier_factor=100.0)
    if method == "alphaedit":
        s = AlphaEditSettings(layers=(0, 1), nullspace_threshold=0.5, l2=1.0, nas=nas, values=VALUES)
        cov = {i: torch.diag(torch.linspace(0, 1, 64, dtype=torch.float64)) for i in (0, 1)}
    else:
        s = MemitSettings(layers=(0, 1), mom2_weight=1.0, nas=nas, values=VALUES)
        cov = {i: torch.eye(64, dtype=torch.float64) for i in (0, 1)}
    return editing.open_session(model, tok, "tiny", method, s, cov, weights_hash(model), 2.0, checkpoint)


def _same_state(a, b):
    for attr in ("inverses", "projectors"):
        x, y = getattr(a, attr), getattr(b, attr)
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), attr
    assert (a.edit_count, a.skipped_count, a.reference_norm) == (b.edit_count, b.skipped_count, b.reference_norm)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("every", [2, 30])
def test_nights_from_disk_equal_one_continuous_session_bit_for_bit(method, every, tok, tmp_path):
    # One process edits every night; another loads each night's champion from disk and continues.
    continuous = _session(method, tok)
    champion = None
    for i, night in enumerate(NIGHTS, 1):
        continuous.apply(night)
        session = _session(method, tok, champion)
        session.apply(night)
        champion = write_checkpoint(session, tmp_path / f"v{i:04d}", snapshot_every=every)
        assert weights_hash(session.model) == weights_hash(continuous.model)
        _same_state(session.state, continuous.state)
    kinds = [json.loads((tmp_path / f"v{i:04d}" / "manifest.json").read_text())["snapshot"] for i in range(1, 5)]
    assert kinds == ([None, "end", None, "end"] if every == 2 else [None] * 4)
    loaded = read_checkpoint(champion)
    assert len(loaded.chain) == (1 if every == 2 else 4)
    _same_state(loaded.state(_session(method, tok).editor, tiny_model("llama", layers=3)), continuous.state)
    for name, d in continuous.cumulative.items():
        assert torch.equal(loaded.deltas[name], d)
    # Every version's increment, from the base: what LoRA export reads.
    steps = lineage_steps(champion)
    assert steps is not None and sum(s.edited for s in steps) == len(REQS)


def test_a_compact_night_is_small_and_a_snapshot_is_not(tok, tmp_path):
    session = _session("alphaedit", tok)
    session.apply(REQS[:4])
    compact = write_checkpoint(session, tmp_path / "v0001")
    session.apply(REQS[4:])
    snap = write_checkpoint(session, tmp_path / "v0002", snapshot_every=1)
    assert sorted(p.name for p in compact.iterdir()) == ["increment.safetensors", "manifest.json"]
    assert {"deltas.safetensors", "state.safetensors"} <= {p.name for p in snap.iterdir()}
    # 2 layers x 4 requests: left (32 x 4 float32), right and keys (64 x 4: float64, float32)
    assert (compact / "increment.safetensors").stat().st_size < 2 * 4 * (32 * 4 + 64 * 8 + 64 * 4) + 2000
    assert (snap / "state.safetensors").stat().st_size > 2 * 64 * 64 * 8  # the two layers' inverses


def test_a_format_1_checkpoint_still_loads_and_continues(tok, tmp_path):
    # The old writer: D and the full state (projector included), no increment.
    session = _session("alphaedit", tok)
    session.apply(REQS[:2])
    old = tmp_path / "v0001"
    old.mkdir()
    save_file(dict(session.cumulative), old / "deltas.safetensors")
    save_file(session.state.state_dict(), old / "state.safetensors")
    manifest = {"format": "nas-checkpoint/1", "base_weights_hash": session.base_hash, "method": "alphaedit",
                "weights_hash": weights_hash(session.model), "reference_norm": 2.0,
                "files": {n: sha256_file(old / n) for n in ("deltas.safetensors", "state.safetensors")}}
    (old / "manifest.json").write_text(json.dumps(manifest))
    model = tiny_model("llama", layers=3)
    assert rebuild_verified(model, weights_hash(model), old) == manifest["weights_hash"]
    cont = _session("alphaedit", tok, old)
    cont.apply(REQS[2:3])
    new = write_checkpoint(cont, tmp_path / "v0002")  # a compact child of the old snapshot
    session.apply(REQS[2:3])
    assert read_checkpoint(new).manifest["weights_hash"] == weights_hash(session.model)
    assert lineage_steps(new) is None  # the old version kept no factors: export falls back to D


def test_a_tampered_or_missing_parent_is_refused_naming_it(tok, tmp_path):
    session = _session("memit", tok)
    for i, night in enumerate(NIGHTS[:2], 1):
        session.apply(night)
        write_checkpoint(session, tmp_path / f"v{i:04d}")
    man = json.loads((tmp_path / "v0001" / "manifest.json").read_text())
    man["reference_norm"] = 10.0
    (tmp_path / "v0001" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointTampered, match="v0001: manifest.json .* v0002's parent pointer"):
        read_checkpoint(tmp_path / "v0002")
    with pytest.raises(CheckpointTampered, match="v0001"):
        verify_checkpoint(tmp_path / "v0002")
    (tmp_path / "v0001" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="needs its parent v0001"):
        read_chain(tmp_path / "v0002")


def test_a_standalone_copy_needs_no_other_folder_and_keeps_the_weights(tok, tmp_path):
    session = _session("memit", tok)
    for i, night in enumerate(NIGHTS, 1):
        session.apply(night)
        write_checkpoint(session, tmp_path / "lineage" / f"v{i:04d}", snapshot_every=3)
    for src in ("v0002", "v0004"):  # a chain from the base, a chain from a snapshot
        copy = standalone_copy(tmp_path / "lineage" / src, tmp_path / "copies" / src)
        model = tiny_model("llama", layers=3)
        want = json.loads((tmp_path / "lineage" / src / "manifest.json").read_text())["weights_hash"]
        assert rebuild_verified(model, weights_hash(model), copy) == want
        assert read_checkpoint(copy).manifest["parent"] is None


def test_rewriting_a_version_in_place_makes_it_a_snapshot(tok, tmp_path):
    session = _session("memit", tok)
    session.apply(REQS[:1])
    out = write_checkpoint(session, tmp_path / "v1")
    session.apply(REQS[1:2])
    write_checkpoint(session, out)  # its own parent: it must stand alone
    loaded = read_checkpoint(out)
    assert loaded.manifest["snapshot"] == "end" and loaded.manifest["parent"] is None
    assert loaded.manifest["weights_hash"] == weights_hash(session.model)
    assert lineage_steps(out) is None


def test_a_bfloat16_lineage_reloads_bit_for_bit(tok, tmp_path):
    session = _session("alphaedit", tok, dtype=torch.bfloat16)
    session.apply(REQS[:2])
    write_checkpoint(session, tmp_path / "v0001")
    cont = _session("alphaedit", tok, tmp_path / "v0001", dtype=torch.bfloat16)
    assert weights_hash(cont.model) == weights_hash(session.model)
    assert cont.model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    cont.apply(REQS[2:3])
    session.apply(REQS[2:3])
    assert weights_hash(cont.model) == weights_hash(session.model)
    with pytest.raises(ValueError, match="base weights"):  # a float32 base is another model
        _session("alphaedit", tok, tmp_path / "v0001")
