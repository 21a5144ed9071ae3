"""Evaluation I/O: the canary text, the general-task files, cached base-model scores, metrics.json.

The metrics themselves are pure functions in ``nas_core.evaluate`` and ``nas_core.collapse``;
this module feeds them data from disk and writes their results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from flows.engine.caches import corpus_token_ids
from flows.engine.checkpoints import load_checkpoint_into
from flows.engine.memory import return_freed_memory
from flows.io import atomic_write_text, digest, now
from flows.paths import Roots
from nas_core.collapse import CollapseSettings, HealthSnapshot, Verdict, norm_growth_per_edit, norm_ratios, verdict
from nas_core.deltas import frobenius_norms
from nas_core.evaluate.counterfact import Scorer, edit_metrics, score_here
from nas_core.evaluate.fluency import fluency
from nas_core.evaluate.health import SCORING_VERSION, option_accuracy, option_items, perplexity
from nas_core.requests import EditRequest
from nas_core.settings import EvalSettings

log = logging.getLogger(__name__)

#: What each number in metrics.json means (its definition name), for readers of the file.
DEFINITIONS: dict[str, str] = {
    "efficacy_success": "CounterFact ES (MEMIT): % edit prompts where p(target_new) > p(target_true), "
                        "p = exp(-mean token NLL), macro-averaged over requests",
    "efficacy_magnitude": "CounterFact EM (MEMIT): mean p(target_new) - p(target_true) on edit prompts, x100",
    "generalisation_success": "CounterFact PS (MEMIT): ES on paraphrase prompts",
    "generalisation_magnitude": "CounterFact PM (MEMIT): EM on paraphrase prompts",
    "specificity_success": "CounterFact NS (MEMIT): % neighbourhood prompts where p(true answer) > p(target_new)",
    "specificity_magnitude": "CounterFact NM (MEMIT): mean p(true answer) - p(target_new) on neighbourhood, x100",
    "editing_score": "CounterFact S (MEMIT): harmonic mean of ES, PS, NS",
    "efficacy_token_accuracy": "EasyEdit rewrite accuracy: % target_new tokens predicted top-1, teacher-forced",
    "generalisation_token_accuracy": "EasyEdit rephrase accuracy: token accuracy on paraphrases",
    "specificity_token_accuracy": "token accuracy of the neighbours' true answers on neighbourhood prompts",
    "n_requests": "number of requests the edit metrics cover",
    "fluency": "ROME fluency: mean weighted bi/tri-gram entropy (bits) of greedy generations",
    "perplexity": "canary perplexity: exp(mean next-token NLL) over fixed windows of the canary text",
    "perplexity_ratio": "canary perplexity / the base model's",
    "general_mean": "mean zero-shot accuracy (%) over the general tasks, by option log-likelihood",
    "general_drop": "base model's general_mean minus this model's (percentage points)",
    "norm_ratio_max": "largest ||W_t||_F / ||W_0||_F over edited weights",
    "norm_growth_per_edit": "(norm_ratio_max - 1) / edits so far",
    "collapsed": "1 if the collapse verdict failed any check, else 0",
}


def canary_ids(tok, settings: EvalSettings, roots: Roots) -> tuple[list[int], str]:
    """The canary's token ids and where they came from (WikiText-2 test, else the product's own)."""
    source = roots.wikitext if roots.wikitext.is_file() else roots.canary_text
    if source == roots.canary_text:
        log.info("canary: WikiText-2 not found at %s; using the product's own canary %s", roots.wikitext, source)
    text = source.read_text(encoding="utf-8")[: settings.canary_tokens * 12]  # ~4 chars/token: plenty
    return corpus_token_ids(tok, text, settings.canary_tokens), str(source)


def general_records(settings: EvalSettings, root: Path) -> dict[str, list[dict[str, Any]]]:
    """The first ``general_items`` records of each task file present under ``root``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for task in settings.general_tasks:
        path = root / f"{task}.jsonl"
        if not path.is_file():
            log.info("general task %s skipped: %s not found", task, path)
            continue
        records = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if len(records) >= settings.general_items:
                    break
                if line.strip():
                    records.append(json.loads(line))
        out[task] = records
    return out


def health_metrics(model: nn.Module, tok, settings: EvalSettings, canary: Sequence[int],
                   general: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Canary perplexity and each general task's accuracy (``general.<task>``) and their mean."""
    t0 = time.perf_counter()
    out = {"perplexity": perplexity(model, canary, settings.canary_window, batch_size=4)}
    for task, records in general.items():
        out[f"general.{task}"] = option_accuracy(model, tok, option_items(task, records), settings.batch_size,
                                                     settings.batch_tokens)
    accs = [v for k, v in out.items() if k.startswith("general.")]
    if accs:
        out["general_mean"] = sum(accs) / len(accs)
    log.debug("health metrics in %.1f s", time.perf_counter() - t0)
    return out


def base_reference(model: nn.Module, tok, model_name: str, base_hash: str, settings: EvalSettings,
                   roots: Roots) -> dict[str, Any]:
    """The unedited model's health metrics, computed once per (weights, settings, data) and
    cached under ``roots.eval_cache``.

    Must be called on the base model; the cache key includes its weights hash.
    """
    canary, source = canary_ids(tok, settings, roots)
    general = general_records(settings, roots.general_tasks)
    key = digest({"base": base_hash, "settings": dataclasses.asdict(settings), "canary": canary,
                  "general": {t: len(r) for t, r in general.items()}, "scoring": SCORING_VERSION})
    path = roots.eval_cache / model_name / f"base-{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    log.info("scoring the base model's canary perplexity and general tasks (cached afterwards)")
    record = {"model": model_name, "base_weights_hash": base_hash, "canary_source": source,
              "canary_tokens": len(canary), "general_items": {t: len(r) for t, r in general.items()},
              "settings": dataclasses.asdict(settings), "created": now(),
              "metrics": health_metrics(model, tok, settings, canary, general)}
    atomic_write_text(path, json.dumps(record, indent=1))
    return record


def evaluate(
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest],
    settings: EvalSettings,
    base: dict[str, Any],
    roots: Roots,
    norm_ratios: dict[str, float] | None = None,
    edits: int = 0,
    collapse: CollapseSettings = CollapseSettings(),
    health: bool = True,
    with_fluency: bool = True,
    scorer: Scorer = score_here,
) -> tuple[dict[str, float | None], Verdict]:
    """Every metric of ``model`` (flat name -> value) and the collapse verdict.

    Args:
        requests: the edits to measure (for retention: all edits applied so far).
        base: ``base_reference`` of the unedited model.
        roots: where the canary and general-task files are.
        norm_ratios: ||W_t||/||W_0|| per edited weight (None: the model is unedited).
        edits: edits applied so far (for the norm growth per edit).
        health: also score canary perplexity and general tasks (the expensive part).
        scorer: where the edit metrics' scoring batches run (:mod:`flows.engine.shards`).
    """
    t0 = time.perf_counter()
    log.info("evaluating %d edits: efficacy, generalisation and specificity prompts", len(requests))
    metrics: dict[str, float | None] = dict(edit_metrics(model, tok, requests, settings.batch_size,
                                                         settings.batch_tokens, scorer).as_dict())
    log.info("edit metrics in %.0f s: editing score %.1f", time.perf_counter() - t0, metrics["editing_score"])
    if with_fluency:
        prompts = [p for r in requests for p in r.generation_prompts][: settings.fluency_prompts]
        metrics["fluency"] = fluency(model, tok, prompts, settings.fluency_new_tokens)
    snapshot_kw: dict[str, Any] = {"editing_score": metrics["editing_score"]}
    if health:
        return_freed_memory()  # what the edit metrics and fluency freed, before the largest phase
        canary, _ = canary_ids(tok, settings, roots)
        general = general_records(settings, roots.general_tasks)
        t1 = time.perf_counter()
        log.info("model health: canary perplexity over %d tokens, general tasks %s", len(canary),
                 ", ".join(f"{t} ({len(r)})" for t, r in general.items()) or "none")
        h = health_metrics(model, tok, settings, canary, general)
        log.info("model health in %.0f s: perplexity %.2f", time.perf_counter() - t1, h["perplexity"])
        metrics.update(h)
        b = base["metrics"]
        metrics["perplexity_ratio"] = h["perplexity"] / b["perplexity"]
        snapshot_kw.update(perplexity=h["perplexity"], base_perplexity=b["perplexity"])
        if "general_mean" in h and "general_mean" in b:
            metrics["general_drop"] = b["general_mean"] - h["general_mean"]
            snapshot_kw.update(general_mean=h["general_mean"], base_general_mean=b["general_mean"])
    if norm_ratios:
        for name, ratio in norm_ratios.items():
            metrics[f"norm_ratio.{name}"] = ratio
        metrics["norm_ratio_max"] = max(norm_ratios.values())
        metrics["norm_growth_per_edit"] = norm_growth_per_edit(norm_ratios, edits)
        snapshot_kw["norm_ratios"] = norm_ratios
    result = verdict(HealthSnapshot(**snapshot_kw), collapse)
    metrics["collapsed"] = float(result.collapsed)
    return metrics, result


@dataclasses.dataclass(frozen=True)
class AppliedCheckpoint:
    """A checkpoint set on the base model for scoring (``path`` None: the base model itself).

    Attributes:
        manifest: the checkpoint's manifest ({} for the base model).
        norm_ratios: ||W_t||/||W_0|| per edited weight (None for the base model).
        edits: edits the checkpoint holds.
    """

    path: Path | None
    manifest: dict[str, Any]
    norm_ratios: dict[str, float] | None
    edits: int


def apply_checkpoint(model: nn.Module, base_hash: str, path: Path | None) -> AppliedCheckpoint:
    """Set the unedited ``model`` to the checkpoint at ``path`` (None: leave it as it is) and measure
    its norm ratios against the manifest's ``before`` norms. Refusals are ValueErrors, as in
    :func:`flows.engine.checkpoints.load_checkpoint_into`."""
    if path is None:
        return AppliedCheckpoint(None, {}, None, 0)
    manifest = load_checkpoint_into(model, base_hash, path)
    names = manifest["edited_weights"]
    ratios = norm_ratios(frobenius_norms(model, names), {n: manifest["norms"][n]["before"] for n in names})
    return AppliedCheckpoint(path, manifest, ratios, int(manifest["edit_count"]))


def eval_context(model_name: str, base_hash: str, applied: AppliedCheckpoint, requests_file: Path,
                 seconds: float) -> dict[str, Any]:
    """The context ``nas eval`` writes into metrics.json next to the metrics: what was scored on what."""
    return {"model": model_name, "base_weights_hash": base_hash,
            "checkpoint": str(applied.path) if applied.path else None,
            "weights_hash": applied.manifest.get("weights_hash", base_hash), "requests_file": str(requests_file),
            "edits_so_far": applied.edits, "seconds": round(seconds, 2)}


def definition(name: str) -> str:
    """The definition of a metric name (per-task and per-weight names share their family's)."""
    if name.startswith("general."):
        return f"zero-shot accuracy (%) on {name.split('.', 1)[1]} by option log-likelihood"
    if name.startswith("norm_ratio."):
        return f"||W_t||_F / ||W_0||_F of {name.split('.', 1)[1]}"
    return DEFINITIONS.get(name, "")


def write_metrics(path: Path, metrics: dict[str, float | None], verdict_: Verdict, context: dict[str, Any]) -> Path:
    """metrics.json: each number with its definition, the verdict with every check, the context."""
    doc = {
        **context,
        "created": now(),
        "metrics": {k: {"value": v, "definition": definition(k)} for k, v in metrics.items()},
        "verdict": {"collapsed": verdict_.collapsed, "summary": verdict_.summary(),
                    "checks": [dataclasses.asdict(c) for c in verdict_.checks]},
    }
    atomic_write_text(Path(path), json.dumps(doc, indent=1, allow_nan=True))
    return Path(path)
