"""Loading what a night starts from besides the base model (:mod:`flows.engine.base`): its
statistics and its NAS anchor.

The nightly flow, the DVC stages and the replay all call these, so they load alike.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from flows.engine.base import BaseModel
from flows.engine.caches import ensure_anchor, ensure_stats
from flows.engine.workers import ident_for

log = logging.getLogger(__name__)


def night_inputs(cov: dict[int, torch.Tensor], anchor: float | None) -> dict[str, Any]:
    """What the edits were computed from, in a few numbers the ledger records and an audit compares:
    the NAS anchor and the trace of every layer's covariance (another corpus changes them)."""
    return {"anchor": anchor, "covariance_trace": {str(layer): float(torch.trace(c.to(torch.float64)))
                                                   for layer, c in sorted(cov.items())}}


def logged_progress(logger: logging.Logger | logging.LoggerAdapter, label: str, steps: int = 10):
    """A ``progress(done, total)`` callback that logs ``label`` at every tenth of the way, so
    long work shows itself in a log file as well as on a terminal."""
    shown = -1

    def tick(done: int, total: int) -> None:
        nonlocal shown
        step = done * steps // max(total, 1)
        if step > shown:
            shown = step
            logger.info("%s: %d/%d", label, done, total)

    return tick


def base_stats(base: BaseModel, params, logger: logging.Logger | logging.LoggerAdapter = log,
               require_cached: bool = False) -> dict[int, torch.Tensor]:
    """C of every layer the model config edits (one file serves every method); ``require_cached``
    refuses to measure (a replay uses the statistics the ``stats`` stage made)."""
    cfg = params.model_config()
    cov, path, cached = ensure_stats(base.model, base.tok, base.name, cfg.all_layers(), cfg.stats, base.base_hash,
                                     params.roots, progress=logged_progress(logger, "covariance tokens"))
    if require_cached and not cached:
        raise RuntimeError(f"covariance statistics {path} were not made by the stats stage (dvc repro stats)")
    logger.info("covariance statistics %s%s", path, " (cached)" if cached else "")
    return cov


def base_anchor(base: BaseModel, params, settings, logger: logging.Logger | logging.LoggerAdapter = log,
                require_cached: bool = False) -> float | None:
    """The NAS reference norm for ``settings`` (None with NAS off), calibrated on the base model once."""
    if not settings.nas.enabled:
        return None
    rec, path, cached = ensure_anchor(base.model, base.tok, base.name, params.edit.method, settings, base.base_hash,
                                      params.roots, progress=logged_progress(logger, "NAS anchor pilots"),
                                      runner=params.anchor.runner,
                                      ident=ident_for(params.model_config().model, params, base.base_hash))
    if require_cached and not cached:
        raise RuntimeError(f"NAS anchor {path} was not made by the anchor stage (dvc repro anchor)")
    logger.info("NAS reference norm a = %.4f from %d pilots%s (%s)", rec["reference_norm"], rec["pilots"],
                " (cached)" if cached else "", path)
    return float(rec["reference_norm"])
