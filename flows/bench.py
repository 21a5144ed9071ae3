"""Benchmarks that print numbers: edit speed, single-edit efficacy, the layer sweep."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from flows import editing
from nas_core.deltas import materialise
from nas_core.evaluate.scoring import prefers_new
from nas_core.requests import EditRequest, from_counterfact_rome

COUNTERFACT_500 = editing.SHARED_DATA / "counterfact" / "counterfact_500.json"


def counterfact_cases(n: int, offset: int = 0) -> list[EditRequest]:
    if not COUNTERFACT_500.is_file():
        raise FileNotFoundError(f"{COUNTERFACT_500} is absent (../shared/data)")
    report = from_counterfact_rome(json.loads(COUNTERFACT_500.read_text(encoding="utf-8")))
    return list(report.requests[offset : offset + n])


def efficacy(model, tok, reqs: list[EditRequest]) -> dict[str, list[bool]]:
    """Per request: edit prompt wins, and every paraphrase wins (p(new) > p(true))."""
    eff = prefers_new(model, tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs],
                      [r.target_true for r in reqs]).tolist()
    para = []
    for r in reqs:
        if r.paraphrase_prompts:
            wins = prefers_new(model, tok, list(r.paraphrase_prompts), [r.target_new] * len(r.paraphrase_prompts),
                               [r.target_true] * len(r.paraphrase_prompts))
            para.append(bool(wins.all()))
        else:
            para.append(False)
    return {"efficacy": eff, "paraphrase": para}


def edit_each_alone(session: editing.EditSession, reqs: list[EditRequest]) -> dict[str, Any]:
    """Edit every request alone from the base model; returns per-request success and times."""
    eff, para, times = [], [], []
    initial_state = session.state
    for r in reqs:
        materialise(session.model, session.base, {})
        session.cumulative, session.state = {}, initial_state
        t0 = time.perf_counter()
        session.apply([r])
        times.append(time.perf_counter() - t0)
        e = efficacy(session.model, session.tok, [r])
        eff.append(e["efficacy"][0])
        para.append(e["paraphrase"][0])
    materialise(session.model, session.base, {})
    session.cumulative, session.state = {}, initial_state
    return {"efficacy": eff, "paraphrase": para, "seconds": times}


def speed(session: editing.EditSession, reqs: list[EditRequest]) -> dict[str, Any]:
    """Single-request calls vs one batched call over the same requests."""
    single = edit_each_alone(session, reqs)
    initial_state = session.state
    t0 = time.perf_counter()
    result = session.apply(reqs)
    batch_seconds = time.perf_counter() - t0
    batch_eff = efficacy(session.model, session.tok, reqs)
    materialise(session.model, session.base, {})
    session.cumulative, session.state = {}, initial_state
    return {
        "single_median_s": statistics.median(single["seconds"]),
        "single_seconds": single["seconds"],
        "single_total_s": sum(single["seconds"]),
        "single_efficacy": sum(single["efficacy"]) / len(reqs),
        "batch_total_s": batch_seconds,
        "batch_per_edit_s": batch_seconds / len(reqs),
        "batch_efficacy": sum(batch_eff["efficacy"]) / len(reqs),
        "batch_timings": result.timings,
        "speedup_per_edit": sum(single["seconds"]) / batch_seconds,
    }


def write_json(path: Path, data: Any) -> None:
    editing.atomic_write_text(path, json.dumps(data, indent=1, default=str))


def base_answers(model, tok, reqs) -> torch.Tensor:
    return prefers_new(model, tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs],
                       [r.target_true for r in reqs])
