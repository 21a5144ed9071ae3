"""``nas bench trace``: causal tracing (ROME) of the facts the model knows best, and the band of
layers where restoring the MLP state recovers the most of the true answer."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nas_core.requests import EditRequest
from nas_core.settings import TraceSettings
from nas_core.spec import spec_for
from nas_core.trace import TraceResult, answer_probability, best_band, causal_trace, first_mlp_free


def trace_settings(samples: int | None, window: int | None) -> TraceSettings:
    """TraceSettings with the values given (None: the default); a bad one is a ValueError."""
    return TraceSettings(**{k: v for k, v in {"samples": samples, "window": window}.items() if v is not None})


def best_known(model, tok, pool: list[EditRequest], n: int) -> list[EditRequest]:
    """The ``n`` requests whose true answer the model finds most probable: a fact it barely predicts
    has no recall to locate."""
    p_true = answer_probability(model, tok, pool)
    return [pool[i] for i in p_true.argsort(descending=True)[:n].tolist()]


@dataclass(frozen=True)
class TraceStudy:
    """A causal trace of ``cases`` and the bands chosen from it.

    Attributes:
        chosen: the best band of ``width`` layers.
        without_first: the best band among windows that leave layer 0 out.
        config_layers: the layers the model's config edits, for comparison.
    """

    model: str
    cases: list[EditRequest]
    settings: TraceSettings
    result: TraceResult
    seconds: float
    width: int
    chosen: tuple[int, ...]
    without_first: tuple[int, ...]
    config_layers: tuple[int, ...]

    def document(self) -> dict[str, Any]:
        """The study's JSON (bench/trace-MODEL.json)."""
        res = self.result
        return {
            "model": self.model, "cases": [r.case_id for r in self.cases],
            "settings": dataclasses.asdict(self.settings),
            "noise_std": res.noise_std, "p_clean": res.mean_p_clean, "p_corrupt": res.mean_p_corrupt,
            "indirect_effect": res.indirect_effect.tolist(), "best_band": list(self.chosen),
            "best_band_without_layer_0": list(self.without_first), "config_layers": list(self.config_layers),
            "per_case": {c.case_id: {"p_clean": c.p_clean, "p_corrupt": c.p_corrupt,
                                     "p_restored": c.p_restored.tolist()} for c in res.cases},
            "seconds": self.seconds}


def trace_study(model, tok, name: str, cases: list[EditRequest], settings: TraceSettings, width: int,
                config_layers: tuple[int, ...], progress: Callable[[int], None] | None = None) -> TraceStudy:
    """Trace ``cases`` (``progress(k)`` after every k of them) and choose the bands of ``width``."""
    t0 = time.perf_counter()
    res = causal_trace(model, tok, spec_for(model), cases, settings, progress=progress)
    seconds = time.perf_counter() - t0
    effect = res.indirect_effect
    return TraceStudy(name, cases, settings, res, seconds, width, best_band(effect, width),
                      best_band(effect, width, lowest=first_mlp_free(settings.window)), tuple(config_layers))
