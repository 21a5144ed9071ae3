"""Benchmark helpers (the FLOP counts and the roofline the speed numbers are judged against) and the
studies behind ``nas bench efficacy``, ``layer-sweep``, ``stats --bf16``, ``fall-of-rome``, ``trace``
and ``speed --stream``, on the tiny in-process model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from flows.engine import editing, precision
from nas_core.deltas import weights_hash
from nas_core.requests import EditRequest
from nas_core.settings import (
    AlphaEditSettings,
    EvalSettings,
    MemitSettings,
    NASSettings,
    RomeSettings,
    ValueSettings,
)
from nas_core.spec import spec_for


def test_stats_flops_count_every_linear_up_to_the_deepest_layer(tmp_path) -> None:
    from flows.studies.bench import stats_flops_per_token, time_stats
    from nas_core.settings import StatsSettings

    model, tok = tiny_model(layers=2), tiny_tokenizer()  # hidden 32, MLP 64, 4 heads, 2 kv heads of 8
    per_block = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 64)
    f = stats_flops_per_token(model, spec_for(model), [0, 1], seq_len=16)
    assert f["forward"] == 2 * 2 * per_block + 2 * (2 * 16 * 32)
    assert f["covariance"] == 2 * 64**2 * 2
    assert stats_flops_per_token(model, spec_for(model), [0], seq_len=16)["forward"] == 2 * per_block + 2 * 16 * 32
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Eiffel Tower is located in Paris. " * 40, encoding="utf-8")
    r = time_stats(model, tok, [0, 1], StatsSettings(corpus=str(corpus), seq_len=16, batch_size=4), tokens=200,
                   wikitext=tmp_path / "absent.txt")
    assert r["tokens"] == 200 and r["tokens_per_s"] > 0 and r["gemm_peak_gflops"] > 0
    assert r["floor_seconds_250k"] == pytest.approx(f["total"] * 250_000 / (r["gemm_peak_gflops"] * 1e9))

VALUES = ValueSettings(steps=4, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0)
REQS = [EditRequest("a", "The capital of {} is", "France", "Rome", "Paris",
                    paraphrase_prompts=("Here is a fact. The capital of France is",)),
        EditRequest("b", "{} speaks", "Danielle Darrieux", "English", "French")]
COV = {layer: torch.eye(64, dtype=torch.float64) for layer in (0, 1)}


def _memit(model, tok, nas: bool = False):
    s = MemitSettings(layers=(0,), mom2_weight=1.0, nas=NASSettings(enabled=nas), values=VALUES)
    return editing.open_session(model, tok, "tiny", "memit", s, COV, weights_hash(model), 2.0 if nas else None)


def test_efficacy_study_edits_each_case_alone_per_spec(tok):
    from flows.studies import bench

    model, opened = tiny_model(), []

    def open_session(method, nas):
        opened.append((method, nas))
        return _memit(model, tok, nas)

    base_hash = weights_hash(model)
    rows = list(bench.efficacy_study(["memit", "memit+nas"], REQS, open_session))
    assert opened == [("memit", False), ("memit", True)] and weights_hash(model) == base_hash
    for row, spec in zip(rows, ["memit", "memit+nas"], strict=True):
        r = row.record
        assert (row.spec, row.n) == (spec, 2) and len(r["seconds"]) == 2
        assert (row.efficacy, row.paraphrase) == (sum(r["efficacy"]), sum(r["paraphrase"]))
        assert row.median_seconds == sorted(r["seconds"])[1] and r["compute_dtype"] == "float32"
        assert row.base_efficacy == round(2 * r["base_efficacy"]) and set(precision.cpu_facts()) <= set(r)


def test_layer_sweep_runs_rome_without_nas_at_each_layer(tok):
    from flows.studies import bench

    model = tiny_model()
    cfg = SimpleNamespace(rome=RomeSettings(layers=(1,), values=VALUES, nas=NASSettings(enabled=True)),
                          all_layers=lambda: [1])
    assert bench.sweep_layers([0], cfg) == [0, 1]
    rows = list(bench.layer_sweep(model, tok, "tiny", cfg, weights_hash(model), COV, [0, 1], REQS))
    assert [r.layer for r in rows] == [0, 1]
    for r in rows:
        assert r.efficacy == sum(r.record["efficacy"]) and len(r.record["seconds"]) == 2
        assert r.neighbourhood_kept_pct is None  # no neighbourhood prompts in REQS


def test_null_space_angles_cover_alphaedits_layers_only():
    from flows.studies import bench

    torch.manual_seed(0)
    x = torch.randn(64, 64, dtype=torch.float64)
    c = x @ x.T / 64
    a = AlphaEditSettings(layers=(1,), nullspace_threshold=0.5)
    angles = bench.null_space_angles({0: c, 1: c}, {0: c, 1: c.clone()}, a)
    assert list(angles) == [1] and angles[1]["max_angle_deg"] < 1e-3 and angles[1]["dim_a"] == angles[1]["dim_b"] > 0


def test_fall_of_method_judges_all_kinds_together_and_regroups_them(tok, monkeypatch):
    from flows.studies import fall_of_rome

    model = tiny_model()
    canary = tok(" ".join(["The Eiffel Tower is located in Paris."] * 8))["input_ids"]
    monkeypatch.setattr(fall_of_rome.evaluation, "canary_ids", lambda tok, settings, roots: (canary, "test"))
    kinds = {"subject_first": REQS[1:], "ordinary": REQS[:1]}
    s = fall_of_rome.FallSettings(cases=1, canary_tokens=64)
    res = fall_of_rome.fall_of_method(_memit(model, tok), kinds, EvalSettings(canary_window=16), None, s)
    assert [r["case_id"] for v in res.edits.values() for r in v] == ["b", "a"]
    assert res.summary == fall_of_rome.summary(res.edits) and res.compute_dtype == "float32"
    assert list(res.record()) == ["base_perplexity", "summary", "edits", "compute_dtype"]
    assert fall_of_rome.regroup([1, 2, 3], {"x": [0, 0], "y": [0]}) == {"x": [1, 2], "y": [3]}
    doc = fall_of_rome.document(kinds, s)
    assert doc["cases"] == {"subject_first": ["b"], "ordinary": ["a"]} and doc["methods"] == {}


def test_trace_study_picks_the_best_known_cases_and_bands(tok):
    from flows.studies import causal_trace

    model = tiny_model(layers=4)
    with pytest.raises(ValueError):
        causal_trace.trace_settings(0, None)
    settings = causal_trace.trace_settings(2, 1)
    assert (settings.samples, settings.window) == (2, 1)
    cases = causal_trace.best_known(model, tok, REQS, 1)
    assert len(cases) == 1 and cases[0] in REQS
    ticks = []
    study = causal_trace.trace_study(model, tok, "tiny", cases, settings, 2, (1, 2), progress=ticks.append)
    assert len(study.chosen) == len(study.without_first) == 2 and study.without_first[0] >= 1 and sum(ticks) == 1
    doc = study.document()
    assert doc["cases"] == [cases[0].case_id] and doc["best_band"] == list(study.chosen)
    assert doc["config_layers"] == [1, 2] and len(doc["indirect_effect"]) == 4 and doc["seconds"] == study.seconds


def test_stream_speed_settings_and_rows():
    from flows.studies import stream_speed

    s = stream_speed.stream_settings("memit+nas", 1000, 10, None, None)
    assert (s.methods, s.eval_every, s.eval_every_dense, s.dense_until, s.pilots, s.compute_dtype) == (
        ("memit+nas",), 250, 100, 1000, 50, "auto")
    points = [{"edits": 0, "seconds_per_edit": 0.0, "eval_seconds": 2.0},
              {"edits": 100, "seconds_per_edit": 1.5, "seconds_per_edit_all": 1.7, "eval_seconds": 3.0,
               "phase_seconds": {"values": 10.0, "solve": 4.0}}]
    rows = stream_speed.stream_rows(points)
    assert [(r.edits, r.measured_seconds, r.phase_seconds) for r in rows] == [
        (0, 2.0, (0, 0, 0, 0)), (100, 5.0, (10.0, 0, 4.0, 0))]
