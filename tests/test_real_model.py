"""The one real-model smoke test: SmolLM2-135M on CPU, AlphaEdit+NAS, one edit.

Statistics come from the cached `nas stats` file when present and otherwise from a small
slice of WikiText-2 (or model-sampled text when ../shared is absent); the NAS anchor is
calibrated on a few pilots. That keeps the test to about a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from flows.config.model import config_for
from flows.engine import editing
from flows.engine.caches import ensure_anchor, ensure_stats
from flows.paths import Paths
from nas_core.deltas import weights_hash
from nas_core.evaluate.scoring import target_nll
from nas_core.requests import EditRequest

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_alphaedit_nas_changes_the_target_and_keeps_paris(smollm2, tmp_path):
    model, tok = smollm2
    cfg = config_for("smollm2-135m")
    # wikitext when ../shared is there, else data-free (ensure_stats falls back and says so).
    stats = dataclasses.replace(cfg.stats, tokens=8_000)
    h = weights_hash(model)
    roots = Paths(stats=str(tmp_path / "stats"), anchors=str(tmp_path / "a")).under(Path.cwd())
    cov, _, _ = ensure_stats(model, tok, "smollm2-135m", cfg.alphaedit.layers, stats, h, roots)
    s = cfg.method("alphaedit", nas=True)
    s = dataclasses.replace(s, nas=dataclasses.replace(s.nas, pilots=4, pilot_batch_size=4))
    rec, _, _ = ensure_anchor(model, tok, "smollm2-135m", "alphaedit", s, h, roots)
    a = rec["reference_norm"]

    req = EditRequest("smoke", "The {} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    unrelated = ("The capital of France is", "Paris")

    def nlls():
        return target_nll(model, tok, [req.filled_prompt, req.filled_prompt, unrelated[0]],
                          [req.target_new, req.target_true, unrelated[1]])

    before = nlls()
    assert before[0] > before[1]  # the base model prefers Paris for the tower
    top_before = int(model(**tok(unrelated[0], return_tensors="pt")).logits[0, -1].argmax())
    session = editing.open_session(model, tok, "smollm2-135m", "alphaedit", s, cov, h, a)
    try:
        session.apply([req])
        after = nlls()
        assert after[0] < after[1], f"edit did not take: NLL new {after[0]:.2f} vs true {after[1]:.2f}"
        with torch.no_grad():
            top_after = int(model(**tok(unrelated[0], return_tensors="pt")).logits[0, -1].argmax())
        assert top_after == top_before and tok.decode([top_after]).strip() == "Paris"
    finally:
        from nas_core.deltas import materialise

        materialise(model, session.base, {})
    assert weights_hash(model) == h
