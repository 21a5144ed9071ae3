"""Benchmark helpers: the FLOP counts and the roofline the speed numbers are judged against."""

from __future__ import annotations

import pytest
from tiny import tiny_model, tiny_tokenizer

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
