"""``nas demo``'s study: the fact, its probes, the answers before and after one edit (tiny model)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from flows.engine import editing
from flows.studies import demo
from nas_core.deltas import weights_hash
from nas_core.settings import MemitSettings, NASSettings, ValueSettings


def _cli_greedy_answer(m, tok, prompt: str, max_new_tokens: int = 6) -> str:
    """The CLI's own greedy_answer before it moved (kept here to show greedy_generations matches it)."""
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = m.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("pad", ["<pad>", "<bos>"], ids=["pad", "pad-id-0"])  # id 0: `or` and `is not None` differ
def test_answers_match_the_clis_former_greedy_answer(pad):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.pad_token = pad
    ps = demo.probes(demo.demo_request())
    assert demo.answers(model, tok, ps) == {p: _cli_greedy_answer(model, tok, p) for p in ps}


def test_run_demo_answers_before_and_after_the_one_edit(tok):
    model = tiny_model("llama")
    s = MemitSettings(layers=(0,), mom2_weight=1.0, nas=NASSettings(enabled=False),
                      values=ValueSettings(steps=10, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0))
    session = editing.open_session(model, tok, "tiny", "memit", s, {0: torch.eye(64, dtype=torch.float64)},
                                   weights_hash(model), None)
    req = demo.demo_request()
    expected_before = demo.answers(model, tok, demo.probes(req))
    res = demo.run_demo(session)
    assert res.request == req and list(res.before) == list(res.after) == demo.probes(req)
    assert res.before == expected_before and res.after == demo.answers(model, tok, demo.probes(req))
    assert res.seconds > 0 and res.edit.case_id == "demo-eiffel" and res.edit.nll_end < res.edit.nll_start


def test_demo_config_only_shrinks_the_statistics_corpus():
    from flows.config.model import config_for

    cfg = config_for("smollm2-135m")
    small = demo.demo_config(cfg, 100_000)
    assert small.stats.tokens == 100_000 and small.stats.corpus == cfg.stats.corpus
    assert small.alphaedit == cfg.alphaedit and demo.METHOD == "alphaedit"
