"""Benchmarks that print numbers: edit speed, single-edit efficacy, the layer sweep."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flows.engine import editing, precision
from flows.engine.caches import corpus_text, corpus_token_ids
from flows.io import atomic_write_text
from flows.paths import Roots
from nas_core.evaluate.scoring import prefers_new
from nas_core.formats import from_counterfact_rome
from nas_core.requests import EditRequest


def counterfact_cases(roots: Roots, n: int, offset: int = 0) -> list[EditRequest]:
    """The first ``n`` (after ``offset``) CounterFact-500 cases of the project's shared data."""
    source = roots.counterfact_500
    if not source.is_file():
        raise FileNotFoundError(f"{source} is absent (params.yaml paths.shared_data)")
    report = from_counterfact_rome(json.loads(source.read_text(encoding="utf-8")))
    return list(report.requests[offset : offset + n])


def efficacy(model, tok, reqs: list[EditRequest]) -> dict[str, list]:
    """Per request: edit prompt wins, and every paraphrase wins (p(new) > p(true));
    ``specificity``: the share of its neighbourhood prompts (other subjects) where the
    true answer still beats the new one (None without neighbourhood prompts)."""
    eff = prefers_new(model, tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs],
                      [r.target_true for r in reqs]).tolist()
    spec = []
    for r in reqs:
        if r.neighbourhood_prompts:
            n = r.neighbourhood_prompts
            new_wins = prefers_new(model, tok, [x.prompt for x in n], [r.target_new] * len(n), [x.target for x in n])
            spec.append(float((~new_wins).float().mean()))
        else:
            spec.append(None)
    para = []
    for r in reqs:
        if r.paraphrase_prompts:
            wins = prefers_new(model, tok, list(r.paraphrase_prompts), [r.target_new] * len(r.paraphrase_prompts),
                               [r.target_true] * len(r.paraphrase_prompts))
            para.append(bool(wins.all()))
        else:
            para.append(False)
    return {"efficacy": eff, "paraphrase": para, "specificity": spec}


def edit_each_alone(session: editing.EditSession, reqs: list[EditRequest]) -> dict[str, Any]:
    """Edit every request alone from the base model; returns per-request success and times."""
    eff, para, spec, times = [], [], [], []
    initial = session.snapshot()
    for r in reqs:
        session.restore(initial)
        t0 = time.perf_counter()
        session.apply([r])
        times.append(time.perf_counter() - t0)
        e = efficacy(session.model, session.tok, [r])
        eff.append(e["efficacy"][0])
        para.append(e["paraphrase"][0])
        spec.append(e["specificity"][0])
    session.restore(initial)
    return {"efficacy": eff, "paraphrase": para, "specificity": spec, "seconds": times}


def speed(session: editing.EditSession, reqs: list[EditRequest]) -> dict[str, Any]:
    """Single-request calls vs one batched call over the same requests."""
    single = edit_each_alone(session, reqs)
    initial = session.snapshot()
    t0 = time.perf_counter()
    result = session.apply(reqs)
    batch_seconds = time.perf_counter() - t0
    batch_eff = efficacy(session.model, session.tok, reqs)
    session.restore(initial)
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
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def base_answers(model, tok, reqs) -> torch.Tensor:
    return prefers_new(model, tok, [r.filled_prompt for r in reqs], [r.target_new for r in reqs],
                       [r.target_true for r in reqs])


def gemm_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """This machine's float32 matrix-product rate (GFLOP/s) at the current thread count.

    The roofline every compute-bound phase is measured against: no phase of the engine can
    run faster than its FLOPs divided by this.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and kernel selection
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def stats_flops_per_token(model, spec, layers, seq_len: int) -> dict[str, float]:
    """Floating-point operations per corpus token of the one-pass covariance measurement.

    ``forward``: 2 per weight of every linear map in blocks 0..deepest, plus causal attention
    scores and mixing (2 * seq_len * d_model per block on average); ``covariance``: the
    per-batch k k^T products, 2 * d_in^2 per edited layer.
    """
    from torch import nn

    from nas_core.spec import get_module

    deepest = max(layers)
    linear = sum(m.weight.numel() for i in range(deepest + 1)
                 for m in get_module(model, spec.layer_name(i)).modules() if isinstance(m, nn.Linear))
    d_model = model.config.hidden_size
    forward = 2 * linear + (deepest + 1) * 2 * seq_len * d_model
    d_in = get_module(model, spec.proj_name(deepest)).weight.shape[1]
    covariance = 2 * d_in**2 * len(layers)
    return {"forward": float(forward), "covariance": float(covariance), "total": float(forward + covariance)}


def max_principal_angle(cov_a: torch.Tensor, cov_b: torch.Tensor, threshold: float,
                        relative: float | None) -> dict[str, float]:
    """The largest principal angle (degrees) between AlphaEdit's null spaces of two
    covariances, and their dimensions: how far a projector built from ``cov_b`` is from
    the one built from ``cov_a``."""
    from nas_core.linalg import nullspace_projector

    bases = []
    for c in (cov_a, cov_b):
        evals, evecs = torch.linalg.eigh(nullspace_projector(c, threshold, relative))
        bases.append(evecs[:, evals > 0.5])  # the projector's eigenvalue-1 directions
    a, b = bases
    if a.shape[1] == 0 or b.shape[1] == 0:
        return {"dim_a": a.shape[1], "dim_b": b.shape[1], "max_angle_deg": 90.0}
    # min(dim_a, dim_b) principal angles: the smaller space measured against the larger.
    s = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return {"dim_a": a.shape[1], "dim_b": b.shape[1], "max_angle_deg": float(torch.rad2deg(torch.arccos(s.min())))}


def time_stats(model, tok, layers, settings, tokens: int, wikitext: Path, progress=None,
               forward_dtype=None) -> dict[str, Any]:
    """Time the one-pass covariance measurement over ``tokens`` corpus tokens (nothing is cached)."""
    from nas_core.spec import spec_for
    from nas_core.stats import second_moment, token_batches

    text, corpus_desc = corpus_text(settings, model, tok, wikitext)
    ids = corpus_token_ids(tok, text, tokens)
    spec = spec_for(model)
    t0 = time.perf_counter()
    sm = second_moment(model, spec, layers, token_batches(ids, settings.seq_len, settings.batch_size),
                       progress=progress, forward_dtype=forward_dtype)
    seconds = time.perf_counter() - t0
    flops = stats_flops_per_token(model, spec, layers, settings.seq_len)
    peak = gemm_peak_gflops()
    return {"tokens": sm.tokens, "layers": list(layers), "corpus": corpus_desc, "seq_len": settings.seq_len,
            "batch_size": settings.batch_size, "seconds": seconds, "tokens_per_s": sm.tokens / seconds,
            "flops_per_token": flops, "achieved_gflops": flops["total"] * sm.tokens / seconds / 1e9,
            "gemm_peak_gflops": peak, "threads": torch.get_num_threads(),
            "floor_seconds_250k": flops["total"] * 250_000 / (peak * 1e9),
            "seconds_250k_at_this_rate": 250_000 * seconds / sm.tokens, "cov": sm.cov,
            "forward_dtype": str(forward_dtype or torch.float32).removeprefix("torch.")}


@dataclass(frozen=True)
class EfficacyRow:
    """One method of ``nas bench efficacy``: its counts over ``n`` cases and its JSON record."""

    spec: str
    n: int
    efficacy: int
    paraphrase: int
    base_efficacy: int
    median_seconds: float
    record: dict[str, Any]


def efficacy_study(specs: Sequence[str], reqs: list[EditRequest],
                   open_session: Callable[[str, bool], editing.EditSession]) -> Iterator[EfficacyRow]:
    """Each ``method[+nas]`` spec in turn: every request edited alone from the base model, and how
    often the base model already prefers the new answer. ``open_session(method, nas)`` gives the
    method's session on the base model."""
    for spec in specs:
        method, _, flag = spec.partition("+")
        session = open_session(method, flag == "nas")
        base_eff = base_answers(session.model, session.tok, reqs)
        r = edit_each_alone(session, reqs)
        record = {**r, "base_efficacy": base_eff.float().mean().item(), "compute_dtype": session.compute_dtype,
                  **precision.cpu_facts()}
        n = len(reqs)
        yield EfficacyRow(spec, n, sum(r["efficacy"]), sum(r["paraphrase"]), int(base_eff.sum()),
                          sorted(r["seconds"])[n // 2], record)


def null_space_angles(cov32: dict[int, torch.Tensor], cov_other: dict[int, torch.Tensor],
                      alphaedit) -> dict[int, dict[str, float]]:
    """Per layer AlphaEdit edits: :func:`max_principal_angle` between the null spaces of the float32
    covariance and another one (``nas bench stats --bf16``), at AlphaEdit's thresholds."""
    cut = (alphaedit.nullspace_threshold, alphaedit.nullspace_relative_threshold)
    return {layer: max_principal_angle(cov32[layer], c, *cut) for layer, c in cov_other.items()
            if layer in alphaedit.layers}


@dataclass(frozen=True)
class SweepRow:
    """One layer of ``nas bench layer-sweep``: its counts, the share of neighbourhood prompts kept
    (percent; None without any), the median seconds per edit, and its JSON record."""

    layer: int
    efficacy: int
    paraphrase: int
    neighbourhood_kept_pct: float | None
    median_seconds: float
    record: dict[str, Any]


def sweep_layers(layers: Sequence[int], cfg) -> list[int]:
    """The layers whose covariance the sweep needs: the swept ones and the config's own."""
    return sorted(set(layers) | set(cfg.all_layers()))


def sweep_one(m, tok, name: str, cfg, base_hash: str, cov: dict[int, torch.Tensor], layer: int,
              reqs: list[EditRequest]) -> SweepRow:
    """r-ROME with NAS off at ``layer`` alone, every request edited alone from the base model."""
    s = dataclasses.replace(cfg.rome, layers=(layer,), nas=dataclasses.replace(cfg.rome.nas, enabled=False))
    session = editing.open_session(m, tok, name, "rome", s, cov, base_hash, None)
    r = edit_each_alone(session, reqs)
    specs = [x for x in r["specificity"] if x is not None]
    kept = 100 * sum(specs) / len(specs) if specs else None
    return SweepRow(layer, sum(r["efficacy"]), sum(r["paraphrase"]), kept, statistics.median(r["seconds"]), r)


def layer_sweep(m, tok, name: str, cfg, base_hash: str, cov: dict[int, torch.Tensor], layers: Sequence[int],
                reqs: list[EditRequest]) -> Iterator[SweepRow]:
    """:func:`sweep_one` at each layer in turn, in this process."""
    for layer in layers:
        yield sweep_one(m, tok, name, cfg, base_hash, cov, layer, reqs)
