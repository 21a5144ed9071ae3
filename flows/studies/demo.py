"""``nas demo``: one fact written into the real model with AlphaEdit+NAS, its answers before and after.

The demo is sized for a CPU: C is measured on fewer corpus tokens than the config's and NAS is
calibrated on few pilots (``nas stats`` / ``nas anchor`` compute the full-size versions).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from flows.config.model import ModelConfig
from flows.engine.editing import EditSession
from nas_core.editors.base import RequestDiagnostics
from nas_core.evaluate.fluency import greedy_generations
from nas_core.requests import EditRequest

#: The demo's method (always with NAS) and the tokens generated per probe.
METHOD = "alphaedit"
ANSWER_TOKENS = 6


def demo_request() -> EditRequest:
    """The demo's fact: the Eiffel Tower moves from Paris to Rome."""
    return EditRequest("demo-eiffel", "The {} is located in the city of", "Eiffel Tower", "Rome", "Paris",
                       paraphrase_prompts=("Where is the Eiffel Tower? It stands in the city of",))


def probes(req: EditRequest) -> list[str]:
    """The prompts answered before and after: the edit prompt, its paraphrase, an unrelated fact."""
    return [req.filled_prompt, req.paraphrase_prompts[0], "The capital of France is"]


def demo_config(cfg: ModelConfig, stats_tokens: int) -> ModelConfig:
    """The model's config with C measured on ``stats_tokens`` corpus tokens."""
    return dataclasses.replace(cfg, stats=dataclasses.replace(cfg.stats, tokens=stats_tokens))


@dataclass(frozen=True)
class DemoResult:
    """The demo edit: each probe's greedy answer before and after, the edit's seconds and its
    diagnostics (v* norms, target NLL)."""

    request: EditRequest
    before: dict[str, str]
    after: dict[str, str]
    seconds: float
    edit: RequestDiagnostics


def answers(model, tok, prompts: list[str]) -> dict[str, str]:
    """Each prompt's greedy continuation of :data:`ANSWER_TOKENS` tokens."""
    return dict(zip(prompts, greedy_generations(model, tok, prompts, ANSWER_TOKENS), strict=True))


def run_demo(session: EditSession, req: EditRequest | None = None) -> DemoResult:
    """Answer the probes, apply the one edit, answer them again."""
    req = req or demo_request()
    ps = probes(req)
    before = answers(session.model, session.tok, ps)
    t0 = time.perf_counter()
    result = session.apply([req])
    seconds = time.perf_counter() - t0
    return DemoResult(req, before, answers(session.model, session.tok, ps), seconds, result.requests[0])
