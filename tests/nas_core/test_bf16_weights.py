"""bfloat16 weights (the GPU default): the edit lands, the update matches the float32 path's,
the weights keep their dtype and no hook is left behind."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from nas_core.editors import AlphaEditEditor, MemitEditor, RomeEditor
from nas_core.requests import EditRequest
from nas_core.settings import AlphaEditSettings, MemitSettings, NASSettings, RomeSettings, ValueSettings

VALUES = ValueSettings(steps=10, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0)
REQS = [EditRequest("1", "The capital of {} is", "France", "Rome", "Paris"),
        EditRequest("2", "{} speaks", "Danielle Darrieux", "English", "French")]
#: ||Delta_bf16 - Delta_fp32|| / ||Delta_fp32||: the v* optimisation sees bf16 activations (8 bits
#: of mantissa), the solves are float64 either way. Measured 2.1-4.0% on the tiny model (2 layers).
TOLERANCE = 0.08


def _editor(method):
    nas = NASSettings(enabled=True, outlier_factor=100.0)
    if method == "memit":
        return MemitEditor(MemitSettings(layers=(0, 1), mom2_weight=1.0, nas=nas, values=VALUES),
                           {i: torch.eye(64, dtype=torch.float64) for i in (0, 1)})
    if method == "alphaedit":
        return AlphaEditEditor(AlphaEditSettings(layers=(0, 1), nullspace_threshold=0.5, l2=1.0, nas=nas,
                                                 values=VALUES),
                               {i: torch.diag(torch.linspace(0, 1, 64, dtype=torch.float64)) for i in (0, 1)})
    return RomeEditor(RomeSettings(layers=(0,), nas=nas, values=VALUES), {0: torch.eye(64, dtype=torch.float64)})


def _edit(method, dtype, tok):
    model = tiny_model("llama", layers=3).to(dtype)
    editor = _editor(method)
    state = editor.init_state(model).__class__(**{**editor.init_state(model).__dict__, "reference_norm": 3.0})
    result = editor.compute(model, tok, REQS, state)
    return model, result


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome"])
def test_bf16_weights_edit_like_float32(method, tok):
    ref_model, ref = _edit(method, torch.float32, tok)
    model, result = _edit(method, torch.bfloat16, tok)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert _hooks(model) == 0
    for name, delta in result.deltas.items():
        assert delta.dtype == torch.float32  # the update stays float32 until the write casts it
        want = ref.deltas[name]
        assert float((delta - want).norm() / want.norm()) < TOLERANCE, name
    # the edit lands: the new target is more likely than before in the bf16 model
    base = tiny_model("llama", layers=3).to(torch.bfloat16)
    ids = tok(REQS[0].prompt.format(REQS[0].subject), return_tensors="pt").input_ids
    new = tok(" " + REQS[0].target_new).input_ids[0]
    with torch.no_grad():
        before, after = (m(ids).logits[0, -1].float().log_softmax(-1)[new] for m in (base, model))
    assert float(after) > float(before)
    assert result.requests[0].v_norm_after == pytest.approx(3.0, rel=1e-2)  # NAS anchored in bf16 too
