"""nas export --format peft: the real peft loads the adapter, and its logits are the edited model's."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from tiny import tiny_model

from flows.engine import editing
from flows.engine.checkpoints import write_checkpoint
from flows.engine.lora_export import ADAPTER, REPORT, export_peft
from nas_core.deltas import weights_hash
from nas_core.requests import EditRequest
from nas_core.settings import MemitSettings, NASSettings, ValueSettings
from nas_core.spec import get_module, spec_for

VALUES = ValueSettings(steps=8, kl_factor=0.0, clamp_norm_factor=50.0, weight_decay=0.0)
REQS = [EditRequest(str(i), "The capital of {} is", s, "Rome", t)
        for i, (s, t) in enumerate([("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Milan")])]


def _lineage(model_type, tok, tmp_path):
    """Two nights (2 facts, then 1) of MEMIT+NAS on layers 0 and 1; returns (edited model, champion)."""
    model = tiny_model(model_type, layers=3)
    spec = spec_for(model)
    w = get_module(model, spec.proj_name(0)).weight
    d_in = w.shape[0] if spec.transposed else w.shape[1]
    s = MemitSettings(layers=(0, 1), mom2_weight=1.0, nas=NASSettings(enabled=True, outlier_factor=100.0),
                      values=VALUES)
    cov = {i: torch.eye(d_in, dtype=torch.float64) for i in (0, 1)}
    session = editing.open_session(model, tok, "tiny", "memit", s, cov, weights_hash(model), 2.0)
    session.apply(REQS[:2])
    write_checkpoint(session, tmp_path / "ckpt" / "v0001")
    session.apply(REQS[2:])
    return session.model, write_checkpoint(session, tmp_path / "ckpt" / "v0002")


def _logits(model, tok):
    ids = tok("The capital of France is Paris and the capital of Spain is", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_adapter_loads_in_peft_and_gives_the_edited_logits(model_type, tok, tmp_path):
    edited, champion = _lineage(model_type, tok, tmp_path)
    report = export_peft(champion, tmp_path / "adapter", "tiny", spec_for(edited).transposed)
    assert report["source"] == "factors" and len(report["modules"]) == 2
    assert all(m["rank"] == 3 and m["exact"] and m["relative_error"] < 1e-6 for m in report["modules"].values())
    assert (tmp_path / "adapter" / ADAPTER).stat().st_size == report["adapter_bytes"]
    assert json.loads((tmp_path / "adapter" / REPORT).read_text())["weights_hash"] == weights_hash(edited)

    base = tiny_model(model_type, layers=3)
    before = _logits(base, tok)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    want, got = _logits(edited, tok), _logits(adapted, tok)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((before - want).abs().max()) > 1e-3  # the edits moved the logits: the check has teeth


def test_a_rank_cap_truncates_and_reports_the_error(tok, tmp_path):
    edited, champion = _lineage("llama", tok, tmp_path)
    report = export_peft(champion, tmp_path / "adapter", "tiny", False, max_rank=1)
    for module in report["modules"].values():
        assert module["rank"] == 1 and not module["exact"] and 0.0 < module["relative_error"] < 1.0
    base = tiny_model("llama", layers=3)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert float((_logits(adapted, tok) - _logits(edited, tok)).abs().max()) > 0.0


def test_an_empty_checkpoint_has_no_adapter(tok, tmp_path):
    model = tiny_model("llama", layers=3)
    s = MemitSettings(layers=(0,), mom2_weight=1.0, nas=NASSettings(enabled=False), values=VALUES)
    session = editing.open_session(model, tok, "tiny", "memit", s, {0: torch.eye(64, dtype=torch.float64)},
                                   weights_hash(model), None)
    empty = write_checkpoint(session, tmp_path / "v0001")
    with pytest.raises(ValueError, match="edits nothing"):
        export_peft(empty, tmp_path / "adapter", "tiny", False)
