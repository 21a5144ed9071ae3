"""Mixed precision for the value optimisation: the bf16 path (upper blocks in bfloat16, shift,
loss and Adam in float32) against the float32 path on tiny models, the scoped dtype swap, the
resolution of ``auto`` at the edge and the recorded path a replay takes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import tiny_model

from flows.engine import precision
from nas_core.editors import MemitEditor
from nas_core.hooks import compute_in
from nas_core.requests import EditRequest
from nas_core.settings import MemitSettings, NASSettings, ValueSettings
from nas_core.spec import get_module, spec_for
from nas_core.values import optimise_values

REQS = [EditRequest("1", "The capital of {} is", "France", "Rome", "Paris"),
        EditRequest("2", "{} speaks", "Danielle Darrieux", "English", "French")]
VALUES = ValueSettings(steps=20, kl_factor=0.0625, clamp_norm_factor=50.0, weight_decay=0.0)
BF16 = dataclasses.replace(VALUES, compute_dtype="bfloat16")


def test_compute_in_runs_in_the_dtype_and_restores_the_very_tensors():
    model = tiny_model("llama", layers=3)
    block = get_module(model, spec_for(model).layer_name(2))
    before = {k: (v, v.clone()) for k, v in block.state_dict(keep_vars=True).items()}
    seen = []
    handle = block.mlp.down_proj.register_forward_hook(lambda _m, args, out: seen.append((args[0].dtype, out.dtype)))
    with compute_in([block], torch.bfloat16):
        assert block.mlp.down_proj.weight.dtype == torch.bfloat16
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    handle.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    for name, (tensor, copy) in before.items():
        now = dict(block.state_dict(keep_vars=True))[name]
        assert now.data_ptr() == tensor.data_ptr() and torch.equal(now, copy) and now.dtype == copy.dtype


def test_the_copies_are_views_of_one_buffer_with_the_values_of_a_plain_cast():
    model = tiny_model("llama", layers=3)
    blocks = [get_module(model, spec_for(model).layer_name(i)) for i in (1, 2)]
    expected = {id(p): p.data.to(torch.bfloat16) for b in blocks for p in b.parameters()}
    with compute_in([*blocks, blocks[1]], torch.bfloat16):  # a module listed twice is cast once
        params = [p for b in blocks for p in b.parameters()]
        bases = {p.untyped_storage().data_ptr() for p in params}
        assert len(bases) == 1
        for p in params:
            assert p.dtype == torch.bfloat16 and p.is_contiguous() and torch.equal(p.data, expected[id(p)])
            assert (p.data_ptr() - min(bases)) % 128 == 0  # each copy on a 128-byte step of the buffer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_bf16_values_match_float32_within_tolerance(tok, arch):
    model = tiny_model(arch, layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = spec_for(model)
    # Five steps: long enough to move far from zero, short enough that two Adam trajectories on a
    # random tiny model have not diverged for reasons other than precision.
    short = dataclasses.replace(VALUES, steps=5)
    f32 = optimise_values(model, tok, spec, REQS, 0, short)
    b16 = optimise_values(model, tok, spec, REQS, 0, dataclasses.replace(short, compute_dtype="bfloat16"))
    for name, t in model.state_dict().items():  # nothing left in bfloat16, nothing changed
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    assert torch.equal(f32.v0, b16.v0) and torch.equal(f32.hidden, b16.hidden)  # the clean pass is float32
    assert b16.delta.dtype == torch.float32
    # Stated tolerance: the loss trajectories agree to 1% and the shifts point the same way
    # (cosine >= 0.8). Elementwise the shifts may differ more: Adam's first steps are about
    # lr * sign(gradient), and bf16 rounding flips the sign of the near-zero components.
    assert torch.allclose(b16.nll_end, f32.nll_end, rtol=0.01)
    assert float(torch.nn.functional.cosine_similarity(b16.delta, f32.delta, dim=1).min()) >= 0.8
    assert (b16.nll_end < b16.nll_start).all() and (f32.nll_end < f32.nll_start).all()


def test_an_edit_on_the_bf16_path_lands_and_touches_nothing_else(tok):
    model = tiny_model("llama", layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cov = {0: torch.eye(64, dtype=torch.float64) * 0.5}
    editor = MemitEditor(MemitSettings(layers=(0,), mom2_weight=1.0, nas=NASSettings(enabled=False), values=BF16), cov)
    result = editor.compute(model, tok, REQS[:1], editor.init_state(model))
    assert set(result.deltas) == {"model.layers.0.mlp.down_proj.weight"}
    assert result.requests[0].nll_end < result.requests[0].nll_start
    for name, t in model.state_dict().items():
        assert t.dtype == torch.float32
        if name not in result.deltas:
            assert torch.equal(t, before[name]), name


def test_auto_is_resolved_at_the_edge_never_in_nas_core(tok, monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="auto"):
        optimise_values(model, tok, spec_for(model), REQS[:1], 0, dataclasses.replace(VALUES, compute_dtype="auto"))
    settings = MemitSettings(layers=(0,), values=dataclasses.replace(VALUES, compute_dtype="auto"))
    monkeypatch.setattr(precision, "cpu_facts", lambda: {"cpu": "x", "bf16_flags": ["amx_bf16"]})
    assert precision.resolve(settings, torch.device("cpu")).values.compute_dtype == "bfloat16"
    monkeypatch.setattr(precision, "cpu_facts", lambda: {"cpu": "x", "bf16_flags": []})
    assert precision.resolve(settings, torch.device("cpu")).values.compute_dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve(settings, torch.device("cuda")).values.compute_dtype == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a pre-Ampere GPU
    assert precision.resolve(settings, torch.device("cuda")).values.compute_dtype == "float32"
    fixed = dataclasses.replace(settings, values=VALUES)
    assert precision.resolve(fixed, torch.device("cuda")) is fixed  # a concrete path is never changed
    assert "no native bf16" in precision.describe(precision.resolve(settings, torch.device("cpu")))


def test_a_session_takes_the_recorded_path(tok):
    from flows.engine import editing
    from nas_core.deltas import weights_hash

    model = tiny_model("llama")
    settings = MemitSettings(layers=(0,), mom2_weight=1.0, nas=NASSettings(enabled=False), values=VALUES)
    cov = {0: torch.eye(64, dtype=torch.float64) * 0.5}
    session = editing.open_session(model, tok, "tiny", "memit", settings, cov, weights_hash(model), None)
    assert session.compute_dtype == "float32"
    session.use_path("bfloat16", "math", 2)
    assert session.compute_dtype == "bfloat16" and session.editor.settings.values.compute_dtype == "bfloat16"
    assert session.attention == "math" and session.editor.settings.values.attention == "math"
    assert session.tail_group_slack == 2 and session.editor.settings.values.tail_group_slack == 2
    session.apply(REQS[:1])
    assert session.request_log[0]["nll_end"] < session.request_log[0]["nll_start"]


def test_statistics_with_a_bf16_forward_stay_close_and_restore_the_model():
    from flows.studies.bench import max_principal_angle
    from nas_core.stats import second_moment, token_batches

    model = tiny_model("llama", layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [(7 * i) % 90 + 3 for i in range(400)]
    f32 = second_moment(model, spec_for(model), [0, 1], token_batches(ids, 32, 4))
    b16 = second_moment(model, spec_for(model), [0, 1], token_batches(ids, 32, 4), forward_dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    for layer in (0, 1):
        assert b16.cov[layer].dtype == torch.float64
        rel = (b16.cov[layer] - f32.cov[layer]).norm() / f32.cov[layer].norm()
        assert float(rel) < 0.02, rel  # stated tolerance: 2% of ||C|| on the tiny model
    same = max_principal_angle(f32.cov[1], f32.cov[1], 0.0, 0.5)
    assert same["max_angle_deg"] < 1e-3 and same["dim_a"] == same["dim_b"] > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_math_attention_kernel_finds_the_same_shift(tok, arch):
    model = tiny_model(arch, layers=3)
    spec = spec_for(model)
    short = dataclasses.replace(VALUES, steps=5)
    default = optimise_values(model, tok, spec, REQS, 0, short)
    math = optimise_values(model, tok, spec, REQS, 0, dataclasses.replace(short, attention="math"))
    # Float32 on both kernels: the same optimisation up to the kernels' rounding.
    torch.testing.assert_close(math.delta, default.delta, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(math.nll_end, default.nll_end, rtol=1e-4, atol=1e-5)


def test_the_attention_kernel_is_part_of_the_recorded_path():
    with pytest.raises(ValueError, match="values.attention"):
        ValueSettings(attention="fast")
    # Records made before each setting existed ran on float32, the default kernel, one batch per width.
    assert precision.recorded_path({}) == ("float32", "default", 0)
    assert precision.recorded_path({"compute_dtype": "bfloat16", "attention": "math"}) == ("bfloat16", "math", 0)
    assert precision.recorded_path({"compute_dtype": "bfloat16", "attention": "math", "tail_group_slack": 2}) == (
        "bfloat16", "math", 2)
    s = precision.with_path(MemitSettings(layers=(0,)), "float32", "math")
    assert (s.values.compute_dtype, s.values.attention) == ("float32", "math")
    assert precision.with_path(s, "bfloat16").values.attention == "math"  # kept when not given
