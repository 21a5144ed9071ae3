"""Unit tests of the pure engine on tiny in-process models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import tiny_model

from nas_core.anchor import anchor, reference_norm_from, targets
from nas_core.deltas import accumulate, edited_weights, materialise, weights_hash
from nas_core.editors import AlphaEditEditor, MemitEditor, RomeEditor
from nas_core.hooks import add_at_positions, capture, hooks, replay_layers, stop_after
from nas_core.keys import read_at_subject
from nas_core.linalg import nullspace_projector, projected_solve, rank_one_update, ridge_solve
from nas_core.prompts import subject_last_token, target_ids, tokenise
from nas_core.requests import EditRequest
from nas_core.settings import (
    AlphaEditSettings,
    MemitSettings,
    NASSettings,
    RomeSettings,
    ValueSettings,
)
from nas_core.spec import KNOWN_MODEL_TYPES, UnknownArchitectureError, get_module, spec_for, spec_for_model_type
from nas_core.state import EditState
from nas_core.stats import second_moment, token_batches
from nas_core.values import logits_at, optimise_values

REQ = EditRequest("1", "The capital of {} is", "France", "Rome", "Paris")
# The tiny random model needs room to move: no clamp, no decay (the defaults are for real models).
VALUES = ValueSettings(steps=20, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0)


# --- specs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma3_text", "gpt2", "gptj"])
def test_every_template_resolves_on_a_tiny_model(model_type):
    model = tiny_model(model_type)
    spec = spec_for(model)
    for layer in range(2):
        for name in (spec.layer_name(layer), spec.mlp_name(layer), spec.proj_name(layer)):
            get_module(model, name)
        w = get_module(model, spec.proj_name(layer)).weight
        d_in, d_out = (w.shape[0], w.shape[1]) if spec.transposed else (w.shape[1], w.shape[0])
        assert d_out == 32 and d_in > 32
    get_module(model, spec.final_norm)
    get_module(model, spec.lm_head)


def test_unknown_model_type_names_the_known_ones():
    with pytest.raises(UnknownArchitectureError) as err:
        spec_for_model_type("mamba")
    for known in KNOWN_MODEL_TYPES:
        assert known in str(err.value)


# --- prompts and hooks -----------------------------------------------------------------------

def test_subject_last_token_with_bos(tok):
    text = "The capital of France is"
    idx = subject_last_token(tok, text, text.index("France") + len("France"))
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[: idx + 1]).endswith("France")
    assert not tok.decode(ids[: idx]).endswith("France")


def test_tokenise_appends_target_minus_last(tok):
    tgt = target_ids(tok, "Paris")
    p = tokenise(tok, "", REQ.prompt, REQ.subject, tgt)
    assert list(p.ids[p.target_start :]) == tgt[:-1]


def test_hooks_are_removed_after_an_exception(llama, tok):
    layer = get_module(llama, "model.layers.0")
    ids = torch.tensor([tok("The capital")["input_ids"]])
    with pytest.raises(RuntimeError), capture(layer), add_at_positions(
        layer, torch.zeros(1, 32), torch.tensor([0]), torch.tensor([0])
    ):
        raise RuntimeError("boom")
    assert not layer._forward_hooks
    with stop_after(layer):
        llama(input_ids=ids)
    assert not layer._forward_hooks
    with pytest.raises(RuntimeError), replay_layers([layer], [torch.zeros(1)]):
        assert layer(torch.ones(1)).sum() == 0  # replayed, not computed
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__
    llama(input_ids=ids)  # computes again


def test_scoped_hooks_resolve_names_and_are_always_removed(llama, tok):
    ids = torch.tensor([tok("The capital")["input_ids"]])
    calls = []

    def seen(tag):
        return lambda _m, _a, _out: calls.append(tag)

    embed = llama.get_input_embeddings()
    pairs = [("model.layers.1", seen("name")), (embed, seen("module")), ("model.layers.1", seen("again"))]
    with hooks(llama, pairs) as root:
        assert root is llama
        llama(input_ids=ids)
    assert calls == ["module", "name", "again"]  # in forward order; one module's hooks in the order given
    assert all(not m._forward_hooks for m in llama.modules())
    with pytest.raises(RuntimeError), hooks(llama, [("model.layers.0", seen("x"))]):
        raise RuntimeError("boom")
    with pytest.raises(UnknownArchitectureError), hooks(llama, [(embed, seen("y")), ("model.nowhere", seen("z"))]):
        pass
    assert all(not m._forward_hooks for m in llama.modules())


# --- NAS -------------------------------------------------------------------------------------

def test_anchored_norm_equals_reference_and_keeps_direction():
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0]])  # norms 5, 0.5, 10
    res = anchor(v, reference_norm=6.0, settings=NASSettings(outlier_factor=2.0))
    assert torch.allclose(res.norms_after, torch.full((3,), 6.0))
    cos = torch.nn.functional.cosine_similarity(res.v_star, v, dim=1)
    assert torch.allclose(cos, torch.ones(3))
    assert not res.skipped.any()


def test_outlier_rule_skip_and_clip():
    v = torch.tensor([[30.0, 40.0], [3.0, 4.0]])  # 50 > 2 * 6
    skip = anchor(v, 6.0, NASSettings(outlier_policy="skip"))
    assert skip.outlier.tolist() == [True, False] and skip.skipped.tolist() == [True, False]
    assert torch.equal(skip.v_star[0], v[0])
    clip = anchor(v, 6.0, NASSettings(outlier_policy="clip"))
    assert clip.outlier.tolist() == [True, False] and not clip.skipped.any()
    assert torch.allclose(clip.norms_after, torch.full((2,), 6.0))


def test_reference_norm_drops_the_top_fraction():
    norms = torch.tensor([1.0] * 19 + [100.0])
    cal = reference_norm_from(norms, 0.05)
    assert cal.dropped == 1 and cal.reference_norm == pytest.approx(1.0)


def test_targets_with_and_without_nas():
    h, v0, d = torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    z_off, _ = targets(h, v0, d, None, NASSettings(enabled=False))
    assert torch.equal(z_off, h + d)
    z_on, res = targets(h, v0, d, 1.5, NASSettings())
    assert torch.allclose(z_on, h - v0 + torch.tensor([[1.5, 0.0]]))
    with pytest.raises(ValueError, match="reference norm"):
        targets(h, v0, d, None, NASSettings())


# --- linear algebra --------------------------------------------------------------------------

def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * n)


def test_ridge_solve_equals_direct_lstsq():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n, lam = 8, 5, 3, 2.0
    k = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    c = _spd(d_in)
    delta = ridge_solve(k, r, c, lam)
    # Same objective as a stacked least squares: min ||D K - R||^2 + lam * tr(D C D^T).
    chol = torch.linalg.cholesky(lam * c)
    a = torch.cat([k.T, chol.T])  # (n + d_in, d_in)
    b = torch.cat([r.T, torch.zeros(d_in, d_out, dtype=torch.float64)])
    direct = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(delta, direct, atol=1e-10)


def test_projector_is_idempotent_and_annihilates_preserved_keys():
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64)).Q
    evals = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 1e-4, 1e-5, 1e-6, 1e-7, 0.0], dtype=torch.float64)
    cov = basis @ torch.diag(evals) @ basis.T
    p = nullspace_projector(cov, threshold=0.01)
    assert torch.allclose(p @ p, p, atol=1e-10)
    preserved = basis[:, :5]  # eigenvectors with large eigenvalues
    assert torch.allclose(p @ preserved, torch.zeros_like(preserved), atol=1e-10)
    # An AlphaEdit update therefore leaves preserved keys' outputs unchanged.
    k = torch.randn(10, 2, generator=g, dtype=torch.float64)
    r = torch.randn(4, 2, generator=g, dtype=torch.float64)
    delta = projected_solve(k, r, p, l2=1.0)
    assert torch.allclose(delta @ preserved, torch.zeros(4, 5, dtype=torch.float64), atol=1e-10)


def test_relative_nullspace_cut_does_not_depend_on_the_key_scale():
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64)).Q
    evals = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 1e-4, 1e-5, 1e-6, 1e-7, 0.0], dtype=torch.float64)
    cov = basis @ torch.diag(evals) @ basis.T
    # An absolute cut sees a different null space when the keys are ~170x larger (C 3e4x) ...
    assert round(float(torch.trace(nullspace_projector(cov, threshold=0.01)))) == 5
    assert round(float(torch.trace(nullspace_projector(cov * 3e4, threshold=0.01)))) == 2
    # ... a relative cut (fraction of lambda_max) does not.
    for scale in (1.0, 3e4, 1e-6):
        p = nullspace_projector(cov * scale, threshold=0.01, relative=1e-3)
        assert round(float(torch.trace(p))) == 5
        assert torch.allclose(p, nullspace_projector(cov, threshold=0.01), atol=1e-8)
    with pytest.raises(ValueError, match="nullspace_relative_threshold"):
        AlphaEditSettings(nullspace_relative_threshold=1.5)


def test_rank_one_update_denominator_positive_and_hits_target():
    c = _spd(6, seed=3)
    k = torch.randn(6, dtype=torch.float64)
    r = torch.randn(4, dtype=torch.float64)
    delta, denom = rank_one_update(k, r, c)
    assert denom > 0
    assert torch.allclose(delta @ k, r)


# --- state -----------------------------------------------------------------------------------

def test_edit_state_round_trips():
    s = EditState(layers=(1, 2), projectors={1: torch.eye(3)}, reference_norm=4.5)
    s = s.advanced(edited=3, skipped=1, inverses={2: torch.eye(3, dtype=torch.float64).T})
    back = EditState.from_state_dict(s.state_dict())
    assert back.layers == (1, 2) and back.edit_count == 3 and back.skipped_count == 1
    assert back.reference_norm == 4.5
    assert torch.equal(back.projectors[1], torch.eye(3)) and torch.equal(back.inverses[2], s.inverses[2])
    assert "projector.1" not in s.state_dict(projectors=False)
    # A state written before the key cache was dropped still loads; its S is not kept.
    legacy = {**s.state_dict(), "key_cache.1": torch.ones(3, 3, dtype=torch.float64)}
    assert not hasattr(EditState.from_state_dict(legacy), "key_cache")
    with pytest.raises(ValueError, match="unknown"):
        EditState.from_state_dict({**s.state_dict(), "bogus": torch.zeros(1)})


# --- statistics, keys, values ----------------------------------------------------------------

def test_second_moment_matches_direct_computation(llama, tok):
    spec = spec_for(llama)
    ids = tok(" ".join(["The capital of France is Paris."] * 4))["input_ids"]
    stats = second_moment(llama, spec, [0, 1], token_batches(ids, seq_len=7, batch_size=2))
    assert stats.tokens == len(ids)
    with capture(get_module(llama, spec.proj_name(1)), inputs=True, outputs=False) as rec:
        for x, m in token_batches(ids, 7, 2):
            llama(input_ids=x, attention_mask=m)
    xs = torch.cat([i.reshape(-1, i.shape[-1]) for i in rec.inputs])
    mask = torch.cat([m.reshape(-1) for _, m in token_batches(ids, 7, 2)]).bool()
    xs = xs[mask].double()
    # float32 products summed in float64: agrees with a float64 product to float32 precision.
    assert torch.allclose(stats.cov[1], xs.T @ xs / len(xs), rtol=1e-5, atol=1e-5)


def test_keys_are_averaged_over_prefixes(llama, tok):
    spec = spec_for(llama)
    one = read_at_subject(llama, tok, spec, [REQ], [0], [""])
    two = read_at_subject(llama, tok, spec, [REQ], [0], ["", "Here is a fact. "])
    prefixed = EditRequest("1", "Here is a fact. The capital of {} is", "France", "Rome", "Paris")
    pre = read_at_subject(llama, tok, spec, [prefixed], [0], [""])
    assert torch.allclose(two.keys[0], (one.keys[0] + pre.keys[0]) / 2, atol=1e-5)


def _target_logprob(model, tok, req):
    p = tokenise(tok, "", req.prompt, req.subject, target_ids(tok, req.target_new))
    ids = torch.tensor([p.ids])
    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state[0]
    logp = torch.log_softmax(logits_at(model, h), -1)
    return float(sum(logp[p.target_start - 1 + j, t] for j, t in enumerate(p.target)))


def test_batched_values_equal_single_values(llama, tok):
    spec = spec_for(llama)
    other = EditRequest("2", "{} speaks", "Danielle Darrieux", "English", "French")
    batch = optimise_values(llama, tok, spec, [REQ, other], 0, VALUES)
    alone = optimise_values(llama, tok, spec, [other], 0, VALUES)
    assert torch.allclose(batch.delta[1], alone.delta[0], atol=1e-4)
    assert (batch.nll_end < batch.nll_start).all()


def _editor(method, model, nas):
    spec = spec_for(model)
    w = get_module(model, spec.proj_name(0)).weight
    d_in = w.shape[0] if spec.transposed else w.shape[1]
    cov = {0: torch.eye(d_in, dtype=torch.float64) * 0.5}
    n = NASSettings(enabled=nas, outlier_factor=100.0)
    if method == "memit":
        return MemitEditor(MemitSettings(layers=(0,), mom2_weight=1.0, nas=n, values=VALUES), cov)
    if method == "alphaedit":
        cov = {0: torch.diag(torch.linspace(0, 1, d_in, dtype=torch.float64))}
        return AlphaEditEditor(AlphaEditSettings(layers=(0,), nullspace_threshold=0.5, l2=1.0,
                                                 nas=n, values=VALUES), cov)
    return RomeEditor(RomeSettings(layers=(0,), nas=n, values=VALUES), cov)


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome"])
@pytest.mark.parametrize("nas", [False, True])
def test_editor_raises_target_and_touches_nothing_else(method, nas, tok):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = _editor(method, model, nas)
    state = editor.init_state(model)
    if nas:
        vr = optimise_values(model, tok, spec_for(model), [REQ], 0, VALUES)
        state = state.__class__(**{**state.__dict__, "reference_norm": float(vr.v_star.norm()) * 1.1})
    lp0 = _target_logprob(model, tok, REQ)
    result = editor.compute(model, tok, [REQ], state)
    assert _target_logprob(model, tok, REQ) > lp0 + 0.05
    edited = set(result.deltas)
    assert edited == {"model.layers.0.mlp.down_proj.weight"}
    for name, t in model.state_dict().items():
        if name not in edited:
            assert torch.equal(t, before[name]), name
    assert result.state.edit_count == 1
    if nas:
        assert result.requests[0].v_norm_after == pytest.approx(state.reference_norm, rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome"])
def test_factors_and_replay_rebuild_every_update_and_state_bit_for_bit(method, model_type, tok):
    # A compact checkpoint stores only factors and keys: both must rebuild what compute wrote.
    model = tiny_model(model_type)
    editor = _editor(method, model, nas=False)
    start = editor.init_state(model)
    other = EditRequest("2", "The capital of {} is", "Spain", "Rome", "Madrid")
    first = editor.compute(model, tok, [REQ, other], start)
    results = [first, editor.compute(model, tok, [other], first.state)]
    replayed = start
    for result in results:
        assert set(result.factors) == set(result.deltas)
        for name, update in result.factors.items():
            assert torch.equal(update.dense(), result.deltas[name]), name
        edited = sum(not r.skipped for r in result.requests)
        replayed = editor.replay(replayed, result.keys, edited, len(result.requests) - edited)
        assert replayed.edit_count == result.state.edit_count
        for attr in ("inverses", "projectors"):
            mine, theirs = getattr(replayed, attr), getattr(result.state, attr)
            assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), attr
    (update,) = first.factors.values()
    assert update.rank == 2 and len(update.pairs) == (2 if method == "rome" else 1)


def test_memit_spreads_over_layers_and_is_deterministic(tok):
    results = []
    for _ in range(2):
        model = tiny_model("llama", layers=3)
        cov = {i: torch.eye(64, dtype=torch.float64) for i in (0, 1)}
        ed = MemitEditor(MemitSettings(layers=(0, 1), mom2_weight=1.0,
                                       nas=NASSettings(enabled=False), values=VALUES), cov)
        results.append(ed.compute(model, tok, [REQ], ed.init_state(model)))
    a, b = results
    assert set(a.deltas) == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for name in a.deltas:
        assert torch.equal(a.deltas[name], b.deltas[name])


def test_checkpoint_materialisation_is_exact(tok):
    model = tiny_model("gpt2")
    spec = spec_for(model)
    names = [spec.weight_name(0)]
    base = edited_weights(model, names)
    h0 = weights_hash(model)
    cum = accumulate({}, {names[0]: torch.full_like(base[names[0]], 0.01)})
    materialise(model, base, cum)
    h1 = weights_hash(model)
    assert h1 != h0
    materialise(model, base, {})
    assert weights_hash(model) == h0
    materialise(model, base, cum)
    assert weights_hash(model) == h1


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma3_text", "gpt2", "gptj"])
def test_tail_only_optimisation_scores_like_a_full_forward(model_type, tok):
    """The optimisation recomputes only the columns right of the subject; at step 0 its loss
    must equal an independent full-sequence score, and a few steps must lower it."""
    from nas_core.evaluate.scoring import target_nll

    model = tiny_model(model_type)
    settings = dataclasses.replace(VALUES, steps=3)
    reqs = [REQ, EditRequest("2", "{} speaks", "Danielle Darrieux", "English", "French")]
    vr = optimise_values(model, tok, spec_for(model), reqs, 0, settings)
    for i, r in enumerate(reqs):
        prompts = [p + r.filled_prompt for p in settings.prefixes]
        full = target_nll(model, tok, prompts, [r.target_new] * len(prompts)).mean()
        assert float(vr.nll_start[i]) == pytest.approx(float(full), rel=1e-4, abs=1e-4)
    assert (vr.nll_end < vr.nll_start).all()


def test_woodbury_sequence_equals_direct_solves():
    """Three sequential batches: the maintained inverse gives MEMIT's and AlphaEdit's direct solves."""
    from nas_core.linalg import woodbury_solve

    g = torch.Generator().manual_seed(5)
    d, d_out, lam, beta = 12, 4, 3.0, 2.0
    c = _spd(d, seed=6)
    p = nullspace_projector(c, threshold=float(torch.linalg.eigvalsh(c)[6]))
    s = torch.zeros(d, d, dtype=torch.float64)
    inv_memit = torch.linalg.inv(lam * c)
    inv_alpha = torch.eye(d, dtype=torch.float64) / beta
    for n in (1, 3, 2):
        k = torch.randn(d, n, generator=g, dtype=torch.float64)
        r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
        x, inv_memit = woodbury_solve(inv_memit, k, k, k)
        assert torch.allclose(r @ x.T, ridge_solve(k, r, c, lam, s), atol=1e-9)
        pk = p @ k
        a_inv_pk, inv_alpha = woodbury_solve(inv_alpha, pk, k, pk)  # the editor's order: (A^-1 P K) R^T
        assert torch.allclose(r @ a_inv_pk.T, projected_solve(k, r, p, beta, s), atol=1e-9)
        s = s + k @ k.T


def test_alphaedit_relative_cut_edits_a_model_whose_spectrum_has_no_small_eigenvalues(tok):
    # The tiny model's C is well conditioned (smallest eigenvalue ~0.15): AlphaEdit's absolute
    # cut 0.02 leaves no free direction and the update is zero; a relative cut finds one.
    from tiny import CORPUS

    from nas_core.stats import second_moment, token_batches

    model = tiny_model("llama")
    ids = [i for t in CORPUS * 30 for i in tok(t).input_ids]
    cov = second_moment(model, spec_for(model), [0], token_batches(ids, 32, 8)).cov
    lp0 = _target_logprob(model, tok, REQ)
    nas = NASSettings(enabled=False)
    absolute = AlphaEditEditor(AlphaEditSettings(layers=(0,), nas=nas, values=VALUES, l2=1.0), cov)
    state = absolute.init_state(model)
    assert float(torch.trace(state.projectors[0])) < 0.5
    result = absolute.compute(model, tok, [REQ], state)
    assert all(float(d.abs().max()) == 0.0 for d in result.deltas.values())
    for name, delta in result.deltas.items():  # undo (nothing) and start again with the relative cut
        model.get_parameter(name).data -= delta.to(model.get_parameter(name).dtype)
    relative = AlphaEditEditor(AlphaEditSettings(layers=(0,), nullspace_relative_threshold=0.2, nas=nas,
                                                 values=VALUES, l2=1.0), cov)
    state = relative.init_state(model)
    assert 10 < float(torch.trace(state.projectors[0])) < 64
    relative.compute(model, tok, [REQ], state)
    assert _target_logprob(model, tok, REQ) > lp0 + 0.05


def test_values_grouped_by_tail_width_equal_each_request_alone(llama, tok):
    """Requests of different tail widths run as separate batches and come back in request order."""
    from nas_core.values import tail_width

    short = EditRequest("s", "{} speaks", "Danielle Darrieux", "English", "French")
    long = EditRequest("l", "{} is located in the country of", "The Eiffel Tower", "Italy", "France")
    same = EditRequest("m", "{} speaks", "Michael Jordan", "French", "English")
    reqs = [long, short, same]
    assert len({tail_width(tok, r, VALUES) for r in reqs}) >= 2  # more than one batch
    batch = optimise_values(llama, tok, spec_for(llama), reqs, 0, VALUES)
    for i, r in enumerate(reqs):
        alone = optimise_values(llama, tok, spec_for(llama), [r], 0, VALUES)
        assert torch.allclose(batch.delta[i], alone.delta[0], atol=1e-4), r.case_id
        assert torch.allclose(batch.hidden[i], alone.hidden[0], atol=1e-5)
        assert int(batch.steps[i]) == int(alone.steps[0])


def test_tail_groups_join_widths_within_the_slack():
    from nas_core.values import tail_groups

    widths = [5, 3, 8, 3, 4, 9]
    assert tail_groups(widths, 0) == [[1, 3], [4], [0], [2], [5]]  # one group per width, width order
    assert tail_groups(widths, 1) == [[1, 3, 4], [0], [2, 5]]
    assert tail_groups(widths, 10) == [[1, 3, 4, 0, 2, 5]]
    assert tail_groups([], 2) == []


def test_values_in_one_padded_batch_equal_each_request_alone(llama, tok):
    """With a slack, requests of different tail widths share one padded batch; each still gets
    what it gets alone (padding changes the cost and the last bits, not the answer)."""
    from nas_core.values import tail_width

    short = EditRequest("s", "{} speaks", "Danielle Darrieux", "English", "French")
    long = EditRequest("l", "{} is located in the country of", "The Eiffel Tower", "Italy", "France")
    reqs = [long, short]
    widths = [tail_width(tok, r, VALUES) for r in reqs]
    padded = dataclasses.replace(VALUES, tail_group_slack=abs(widths[0] - widths[1]))
    batch = optimise_values(llama, tok, spec_for(llama), reqs, 0, padded)
    for i, r in enumerate(reqs):
        alone = optimise_values(llama, tok, spec_for(llama), [r], 0, VALUES)
        assert torch.allclose(batch.delta[i], alone.delta[0], atol=1e-4), r.case_id
        assert int(batch.steps[i]) == int(alone.steps[0])
    with pytest.raises(ValueError, match="tail_group_slack"):
        dataclasses.replace(VALUES, tail_group_slack=-1)


def test_read_with_replayed_blocks_is_bit_identical(tok):
    model = tiny_model(layers=4)
    spec = spec_for(model)
    other = EditRequest("2", "{} speaks", "Danielle Darrieux", "English", "French")
    prefixes = ["", "Here is a fact. "]
    full = read_at_subject(model, tok, spec, [REQ, other], [2], prefixes, readout_layer=3, keep_block_outputs=True)
    assert len(full.block_outputs) == 4
    fast = read_at_subject(model, tok, spec, [REQ, other], [2], prefixes, readout_layer=3,
                           replay=full.block_outputs[:2])
    assert torch.equal(fast.keys[2], full.keys[2])
    assert torch.equal(fast.hidden, full.hidden) and torch.equal(fast.mlp_out, full.mlp_out)
    assert all(not m.__dict__.get("forward") for m in model.modules())  # the replay is undone
    with pytest.raises(ValueError, match="replayed block"):
        read_at_subject(model, tok, spec, [REQ], [1], prefixes, readout_layer=3, replay=full.block_outputs[:2])


def test_alphaedit_lets_go_of_c_once_p_is_built_and_hands_out_the_same_p(llama):
    """C is only needed to build P; the editor drops it (d_in^2 float64 per layer) and a later
    init_state (a reloaded checkpoint) gets exactly the same projector."""
    from nas_core.linalg import nullspace_projector

    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    c = basis @ torch.diag(torch.linspace(0.0, 1.0, 64, dtype=torch.float64)) @ basis.T
    editor = AlphaEditEditor(AlphaEditSettings(layers=(0,), nullspace_threshold=0.3, values=VALUES), {0: c, 1: c})
    first = editor.init_state(llama)
    assert editor.cov is None
    again = editor.init_state(llama)
    assert torch.equal(first.projectors[0], again.projectors[0])
    assert first.projectors is not again.projectors  # each state its own dict
    assert torch.equal(first.projectors[0], nullspace_projector(c, 0.3, None).float())
