"""Config loading and the checkpoint round trip, on tiny in-process models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from flows.config.model import ConfigError, config_for, load_model_config
from flows.engine import editing
from flows.engine.caches import ensure_anchor, ensure_stats
from flows.engine.checkpoints import read_checkpoint, write_checkpoint
from flows.paths import Paths
from nas_core.deltas import weights_hash
from nas_core.requests import EditRequest
from nas_core.settings import MemitSettings, NASSettings, ValueSettings

VALUES = ValueSettings(steps=10, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0)
REQS = [
    EditRequest("a", "The capital of {} is", "France", "Rome", "Paris"),
    EditRequest("b", "{} speaks", "Danielle Darrieux", "English", "French"),
]

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_model_config(path)
    for method in ("memit", "alphaedit", "rome"):
        s = cfg.method(method)
        assert s.layers and s.values.steps >= 1 and cfg.layers_note


def test_unknown_and_mistyped_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nmemit:\n  layers: [1, 2]\n  lamda: 3\n")
    with pytest.raises(ConfigError, match="lamda"):
        load_model_config(bad)
    bad.write_text("model: x\nvalues:\n  steps: many\n")
    with pytest.raises(ConfigError, match="steps"):
        load_model_config(bad)
    bad.write_text("model: x\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_model_config(bad)
    with pytest.raises(ConfigError, match="shipped configs"):
        config_for("no-such-model")


def _session(model, tok, checkpoint=None):
    s = MemitSettings(layers=(0,), mom2_weight=1.0, nas=NASSettings(enabled=True, outlier_factor=100.0),
                      values=VALUES)
    cov = {0: torch.eye(64, dtype=torch.float64)}
    return editing.open_session(model, tok, "tiny", "memit", s, cov, weights_hash(model), 2.0, checkpoint)


def test_checkpoint_round_trip_and_continue(tok, tmp_path):
    model = tiny_model("llama")
    base_hash = weights_hash(model)
    session = _session(model, tok)
    session.apply(REQS[:1])
    ckpt = write_checkpoint(session, tmp_path / "v1")
    man = read_checkpoint(ckpt).manifest
    assert man["request_ids"] == ["a"] and man["base_weights_hash"] == base_hash
    assert man["norms"]["model.layers.0.mlp.down_proj.weight"]["ratio"] != 1.0
    assert man["requests"][0]["v_norm_after"] == pytest.approx(2.0, rel=1e-5)

    # A fresh base model + the checkpoint gives the same weights, and editing continues.
    fresh = tiny_model("llama")
    cont = _session(fresh, tok, ckpt)
    assert weights_hash(fresh) == man["weights_hash"]
    cont.apply(REQS[1:])
    ckpt2 = write_checkpoint(cont, tmp_path / "v2")
    man2 = read_checkpoint(ckpt2).manifest
    assert man2["request_ids"] == ["a", "b"] and man2["edit_count"] == 2

    # Continuous editing in one session gives bit-identical deltas to resuming from disk.
    again = _session(tiny_model("llama"), tok)
    again.apply(REQS[:1])
    again.apply(REQS[1:])
    for name, d in again.cumulative.items():
        assert torch.equal(d, cont.cumulative[name])


def test_checkpoint_from_other_base_is_refused(tok, tmp_path):
    session = _session(tiny_model("llama"), tok)
    session.apply(REQS[:1])
    ckpt = write_checkpoint(session, tmp_path / "v1")
    with pytest.raises(ValueError, match="base weights"):
        _session(tiny_model("llama", seed=1), tok, ckpt)


def test_rewriting_a_checkpoint_is_atomic(tok, tmp_path):
    session = _session(tiny_model("llama"), tok)
    session.apply(REQS[:1])
    out = write_checkpoint(session, tmp_path / "v1")
    write_checkpoint(session, out)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
    assert read_checkpoint(out).manifest["edit_count"] == 1


def test_stats_cache_second_call_is_instant(tok, tmp_path, monkeypatch):
    model = tiny_model("llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is Paris. " * 40)
    from nas_core.settings import StatsSettings

    s = StatsSettings(corpus=str(corpus), tokens=200, seq_len=16, batch_size=4)
    h = weights_hash(model)
    roots = Paths(stats=str(tmp_path / "stats")).under(REPO)
    cov, path, cached = ensure_stats(model, tok, "tiny", [0, 1], s, h, roots)
    assert not cached and set(cov) == {0, 1} and path.is_file()
    cov2, path2, cached2 = ensure_stats(model, tok, "tiny", [0, 1], s, h, roots)
    assert cached2 and path2 == path and torch.equal(cov2[1], cov[1])
    s2 = dataclasses.replace(s, tokens=100)
    _, path3, cached3 = ensure_stats(model, tok, "tiny", [0, 1], s2, h, roots)
    assert not cached3 and path3 != path


def test_data_free_stats_corpus(tok, tmp_path):
    model = tiny_model("llama")
    from nas_core.settings import StatsSettings

    s = StatsSettings(corpus="self", tokens=64, seq_len=16, batch_size=2)
    roots = Paths(stats=str(tmp_path)).under(REPO)
    cov, _, _ = ensure_stats(model, tok, "tiny", [0], s, weights_hash(model), roots)
    assert cov[0].shape == (64, 64) and torch.isfinite(cov[0]).all()


def test_without_wikitext_the_shipped_corpus_is_used_else_the_model_samples(tok, tmp_path, caplog):
    """Where WikiText-2 is absent, C comes from data/demo/corpus.txt (the same bytes on every
    machine, so an auditor elsewhere rebuilds it), and only without that from sampling."""
    from nas_core.settings import StatsSettings

    model = tiny_model("llama")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    s = StatsSettings(corpus="wikitext", tokens=64, seq_len=16, batch_size=2)
    roots = Paths(stats=str(tmp_path / "stats"), shared_data=str(tmp_path / "none"), demo=str(demo)).under(REPO)
    with caplog.at_level("WARNING"):
        _, shipped, _ = ensure_stats(model, tok, "tiny", [0], s, weights_hash(model), roots)
    assert "shipped text" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the next night finds C in the cache: said once, when it was measured
        _, cached, hit = ensure_stats(model, tok, "tiny", [0], s, weights_hash(model), roots)
    assert hit and cached == shipped and "WikiText" not in caplog.text
    (demo / "corpus.txt").unlink()
    _, sampled, _ = ensure_stats(model, tok, "tiny", [0], s, weights_hash(model), roots)
    assert "samples itself" in caplog.text and sampled != shipped


def test_anchor_refuses_an_edited_model(tok, tmp_path):
    model = tiny_model("llama")
    h = weights_hash(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.1)
    s = MemitSettings(layers=(0,), values=VALUES)
    with pytest.raises(RuntimeError, match="edited model"):
        ensure_anchor(model, tok, "tiny", "memit", s, h, Paths(anchors=str(tmp_path)).under(REPO))
    assert not any(Path(tmp_path).rglob("*.json"))


def test_a_spilled_snapshot_holds_no_inverses_and_restores_them_bit_for_bit(tok, tmp_path):
    model = tiny_model("llama")
    session = _session(model, tok)
    session.apply(REQS[:1])
    inverses = {k: v.clone() for k, v in session.state.inverses.items()}
    before = weights_hash(model)
    snap = session.snapshot(spill=tmp_path / "inverses.safetensors")
    assert snap.state.inverses == {} and snap.spilled is not None and inverses
    session.apply(REQS[1:])
    assert weights_hash(model) != before
    session.restore(snap)
    assert weights_hash(model) == before and session.state.edit_count == 1
    assert inverses.keys() == session.state.inverses.keys()
    for k, v in inverses.items():
        assert session.state.inverses[k].dtype == torch.float64 and torch.equal(session.state.inverses[k], v)
    # The session goes on from the restored state exactly as from one that was never spilled.
    again = _session(tiny_model("llama"), tok)
    again.apply(REQS[:1])
    again.apply(REQS[1:])
    session.apply(REQS[1:])
    assert weights_hash(session.model) == weights_hash(again.model)
