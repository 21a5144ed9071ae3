"""Causal tracing: the batched one-pass trace equals a row-by-row reference; band choice; hooks."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from nas_core.hooks import capture
from nas_core.prompts import encode, fill, target_ids
from nas_core.requests import EditRequest
from nas_core.settings import TraceSettings
from nas_core.spec import get_module, spec_for
from nas_core.trace import (
    answer_probability,
    best_band,
    causal_trace,
    first_mlp_free,
    restore_window,
    subject_span,
    trace_request,
)
from nas_core.values import logits_at

REQ = EditRequest(case_id="t1", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                  target_new="English", target_true="French")
REQ2 = EditRequest(case_id="t2", prompt="{} is located in", subject="The Eiffel Tower",
                   target_new="Rome", target_true="Paris")


def test_restore_window_is_centred_and_clipped() -> None:
    assert list(restore_window(5, 30, 5)) == [3, 4, 5, 6, 7]
    assert list(restore_window(0, 30, 5)) == [0, 1, 2]
    assert list(restore_window(29, 30, 5)) == [27, 28, 29]
    assert list(restore_window(4, 30, 1)) == [4]
    assert list(restore_window(3, 4, 10)) == [0, 1, 2, 3]


def test_best_band_takes_the_largest_sum() -> None:
    effect = torch.tensor([0.0, 0.1, 0.5, 0.4, 0.3, 0.0, 0.6])
    assert best_band(effect, 3) == (2, 3, 4)
    assert best_band(effect, 1) == (6,)
    with pytest.raises(ValueError, match="band width"):
        best_band(effect, 8)
    assert best_band(effect, 3, lowest=3) == (4, 5, 6)
    assert best_band(torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3]), 2, lowest=first_mlp_free(3)) == (2, 3)
    assert first_mlp_free(5) == 3 and 0 not in restore_window(first_mlp_free(5), 30, 5)
    assert 0 in restore_window(first_mlp_free(5) - 1, 30, 5) and first_mlp_free(1) == 1
    with pytest.raises(ValueError, match="from layer 5"):
        best_band(effect, 3, lowest=5)


def test_subject_span_counts_the_bos() -> None:
    tok = tiny_tokenizer()
    first, last = subject_span(tok, REQ.prompt, REQ.subject)
    ids = encode(tok, fill(REQ.prompt, REQ.subject))
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[first : last + 1]).strip() == REQ.subject
    first, last = subject_span(tok, REQ2.prompt, REQ2.subject)  # subject at the start
    assert first == 1 and tok.decode(encode(tok, fill(REQ2.prompt, REQ2.subject))[first : last + 1]) == REQ2.subject


def _reference(model, tok, req: EditRequest, settings: TraceSettings, noise_std: float) -> tuple[float, float, list]:
    """Row by row, with explicit patching: what the one-pass trace must reproduce."""
    spec = spec_for(model)
    n = model.config.num_hidden_layers
    ids = torch.tensor([encode(tok, fill(req.prompt, req.subject))])
    first, last = subject_span(tok, req.prompt, req.subject)
    answer = target_ids(tok, req.target_true)[0]
    g = torch.Generator().manual_seed(settings.seed)
    d = model.get_input_embeddings().embedding_dim
    noise = torch.randn((settings.samples, last - first + 1, d), generator=g) * settings.noise_factor * noise_std

    def p(hooks) -> float:
        handles = [get_module(model, name).register_forward_hook(fn) for name, fn in hooks]
        try:
            h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
        finally:
            for hd in handles:
                hd.remove()
        return float(torch.softmax(logits_at(model, h), -1)[0, answer])

    with torch.no_grad():
        caps = {}
        hooks_clean = []
        for j in range(n):
            caps[j] = capture(get_module(model, spec.mlp_name(j)))
        from contextlib import ExitStack

        with ExitStack() as st:
            recs = {j: st.enter_context(c) for j, c in caps.items()}
            p_clean = p(hooks_clean)
        clean = {j: recs[j].outputs[0][0, last].clone() for j in range(n)}
        emb_name = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())

        def noisy(k):
            def fn(_m, _a, out):
                out = out.clone()
                out[0, first : last + 1] += noise[k]
                return out
            return fn

        def restore(j):
            def fn(_m, _a, out):
                h = (out[0] if isinstance(out, tuple) else out).clone()
                h[0, last] = clean[j]
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return fn

        p_corrupt = sum(p([(emb_name, noisy(k))]) for k in range(settings.samples)) / settings.samples
        restored = []
        for c in range(n):
            window = [(spec.mlp_name(j), restore(j)) for j in restore_window(c, n, settings.window)]
            restored.append(sum(p([(emb_name, noisy(k)), *window]) for k in range(settings.samples)) / settings.samples)
    return p_clean, p_corrupt, restored


@pytest.mark.parametrize(("model_type", "window"), [("llama", 1), ("llama", 3), ("qwen2", 2), ("gemma3_text", 1)])
def test_one_pass_trace_equals_the_row_by_row_reference(model_type: str, window: int) -> None:
    model, tok = tiny_model(model_type, layers=4), tiny_tokenizer()
    settings = TraceSettings(samples=3, noise_factor=3.0, window=window, seed=7)
    got = trace_request(model, tok, spec_for(model), REQ, settings, noise_std=0.5,
                        generator=torch.Generator().manual_seed(settings.seed))
    p_clean, p_corrupt, restored = _reference(model, tok, REQ, settings, 0.5)
    assert got.p_clean == pytest.approx(p_clean, rel=1e-4, abs=1e-7)
    assert got.p_corrupt == pytest.approx(p_corrupt, rel=1e-4, abs=1e-7)
    assert torch.allclose(got.p_restored, torch.tensor(restored), rtol=1e-4, atol=1e-7)
    assert got.p_corrupt != pytest.approx(got.p_clean, abs=1e-6)  # the noise really corrupts
    assert not torch.allclose(got.p_restored, torch.full_like(got.p_restored, got.p_corrupt))  # restores matter


def test_causal_trace_averages_and_leaves_no_hook() -> None:
    model, tok = tiny_model(layers=4), tiny_tokenizer()
    settings = TraceSettings(samples=2, window=2)
    ticks = []
    res = causal_trace(model, tok, spec_for(model), [REQ, REQ2], settings, progress=ticks.append)
    assert ticks == [1, 1]
    assert res.indirect_effect.shape == (4,)
    expect = (res.cases[0].indirect_effect + res.cases[1].indirect_effect) / 2
    assert torch.allclose(res.indirect_effect, expect)
    assert res.noise_std > 0
    assert all(not m._forward_hooks for m in model.modules())
    again = causal_trace(model, tok, spec_for(model), [REQ, REQ2], settings)
    assert torch.equal(again.indirect_effect, res.indirect_effect)  # seeded
    with pytest.raises(ValueError, match="no requests"):
        causal_trace(model, tok, spec_for(model), [], settings)


@pytest.mark.parametrize(("field", "value"), [("samples", 0), ("noise_factor", 0.0), ("window", 0)])
def test_bad_trace_settings_are_errors(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"trace.{field}"):
        TraceSettings(**{field: value})


def test_answer_probability_matches_a_single_prompt_forward() -> None:
    model, tok = tiny_model(layers=2), tiny_tokenizer()
    got = answer_probability(model, tok, [REQ, REQ2], batch_size=2)  # different lengths: padding must not matter
    for i, req in enumerate([REQ, REQ2]):
        ids = torch.tensor([encode(tok, fill(req.prompt, req.subject))])
        with torch.no_grad():
            h = model.base_model(input_ids=ids).last_hidden_state[:, -1]
        want = torch.softmax(logits_at(model, h), -1)[0, target_ids(tok, req.target_true)[0]]
        assert float(got[i]) == pytest.approx(float(want), rel=1e-5)

