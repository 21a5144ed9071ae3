"""The classic baselines (memit-plain, rome-classic) as settings of their editors: each raises
its target and touches nothing else, like every editor; memit-plain forgets earlier keys;
rome-classic mixes the bare and the prefixed key, r-ROME does not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_core import REQ, VALUES, _target_logprob
from tiny import tiny_model

from flows.config.model import config_for
from flows.engine.editing import make_editor
from nas_core.editors import VARIANTS, base_method
from nas_core.linalg import classic_rank_one_update, rank_one_update
from nas_core.settings import MemitSettings, NASSettings, RomeSettings

OFF = NASSettings(enabled=False)


def settings_for(variant: str):
    if variant == "memit-plain":
        return MemitSettings(layers=(0,), mom2_weight=1.0, nas=OFF, values=VALUES, use_key_cache=False)
    return RomeSettings(layers=(0,), nas=OFF, values=VALUES, prefix_consistent=False)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_baseline_raises_its_target_and_touches_nothing_else(variant, tok):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = make_editor(variant, settings_for(variant), {0: torch.eye(64, dtype=torch.float64) * 0.5})
    assert type(editor).__name__.lower().startswith(base_method(variant))
    lp0 = _target_logprob(model, tok, REQ)
    result = editor.compute(model, tok, [REQ], editor.init_state(model))
    assert _target_logprob(model, tok, REQ) > lp0 + 0.05
    assert set(result.deltas) == {"model.layers.0.mlp.down_proj.weight"}
    for name, t in model.state_dict().items():
        if name not in result.deltas:
            assert torch.equal(t, before[name]), name


def test_memit_plain_forgets_earlier_keys(tok):
    from nas_core.requests import EditRequest

    other = EditRequest("2", "{} speaks", "Danielle Darrieux", "English", "French")
    cov = {0: torch.eye(64, dtype=torch.float64) * 0.5}
    plain = make_editor("memit-plain", settings_for("memit-plain"), cov)
    model = tiny_model("llama")
    first = plain.compute(model, tok, [REQ], plain.init_state(model))
    assert first.state.inverses == {}  # nothing carried: the next solve sees lambda C only
    seq = make_editor("memit", dataclasses.replace(settings_for("memit-plain"), use_key_cache=True), cov)
    model2 = tiny_model("llama")
    first2 = seq.compute(model2, tok, [REQ], seq.init_state(model2))
    assert set(first2.state.inverses) == {0}
    a = plain.compute(model, tok, [other], first.state).deltas["model.layers.0.mlp.down_proj.weight"]
    b = seq.compute(model2, tok, [other], first2.state).deltas["model.layers.0.mlp.down_proj.weight"]
    assert not torch.allclose(a, b)


def test_classic_rome_equals_r_rome_when_the_keys_agree_and_blows_up_when_they_do_not():
    torch.manual_seed(0)
    c = torch.eye(8, dtype=torch.float64) + 0.1
    k, r = torch.randn(8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    consistent, _ = rank_one_update(k, r, c)
    classic, _ = classic_rank_one_update(k, k, r, c)
    assert torch.allclose(consistent, classic)
    # A bare key nearly orthogonal (under C^-1) to the averaged one: a tiny denominator.
    cinv_k = torch.linalg.solve(c, k)
    bare = torch.randn(8, dtype=torch.float64)
    bare = bare - (bare @ cinv_k) / (k @ cinv_k) * k * 0.999
    blown, denom = classic_rank_one_update(k, bare, r, c)
    assert abs(denom) < 1e-2 * float(k @ cinv_k) and blown.norm() > 50 * consistent.norm()


def test_variants_are_methods_of_the_shipped_configs():
    cfg = config_for("smollm2-135m")
    assert cfg.method("memit-plain").use_key_cache is False and cfg.method("memit").use_key_cache is True
    assert cfg.method("rome-classic", nas=True).prefix_consistent is False
    assert cfg.method("rome-classic", nas=True).nas.enabled


def test_fall_of_rome_counts_blow_ups_by_kind(tok):
    from flows.engine.editing import open_session
    from flows.studies import fall_of_rome
    from nas_core.deltas import weights_hash
    from nas_core.requests import EditRequest

    reqs = [EditRequest("a", "{} speaks", "Danielle Darrieux", "English", "French"),
            EditRequest("b", "The capital of {} is", "France", "Rome", "Paris"),
            EditRequest("c", "{} is in", "Tokyo", "Africa", "Asia")]
    kinds = fall_of_rome.split_cases(reqs, 5)
    assert [r.case_id for r in kinds["subject_first"]] == ["a", "c"] and [r.case_id for r in kinds["ordinary"]] == ["b"]
    model = tiny_model("llama")
    before = weights_hash(model)
    settings = RomeSettings(layers=(0,), nas=OFF, values=VALUES, prefix_consistent=False)
    session = open_session(model, tok, "tiny", "rome-classic", settings, {0: torch.eye(64, dtype=torch.float64)},
                           before, None)
    canary = list(range(1, 60))
    rows = [fall_of_rome.edit_alone(session, r, canary, 16) for r in reqs]
    assert weights_hash(model) == before  # every edit is undone
    assert all(r["error"] is None and r["update_norm"] > 0 for r in rows)
    s = fall_of_rome.FallSettings(norm_factor=1.5)
    judged = fall_of_rome.verdicts(rows + [{**rows[0], "update_norm": 1e9, "case_id": "z"}], 1e9, s)
    assert judged[-1]["blown_up"] and "norm" in judged[-1]["why"][0]
    summ = fall_of_rome.summary({"subject_first": judged[:2], "ordinary": judged[2:]})
    assert summ["ordinary"]["edits"] == 2 and summ["ordinary"]["blown_up"] >= 1
