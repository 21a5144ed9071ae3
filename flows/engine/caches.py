"""The engine's caches: covariance statistics and NAS anchors, keyed by everything they depend on.

Both are computed once on the *unedited* model and found again by key (weights hash,
layers, corpus, settings), so a night, a replay and a benchmark share the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flows.config.runner import RunnerSettings
from flows.engine import precision
from flows.engine.pilots import pilot_norms
from flows.engine.workers import BaseIdent
from flows.io import atomic_write_text, digest, now
from flows.paths import Roots
from nas_core.anchor import reference_norm_from
from nas_core.deltas import weights_hash
from nas_core.formats import from_counterfact_easyedit, parse_fact_jsonl
from nas_core.requests import EditRequest
from nas_core.settings import AlphaEditSettings, MemitSettings, RomeSettings, StatsSettings
from nas_core.spec import spec_for
from nas_core.stats import sample_self_text, second_moment, token_batches

log = logging.getLogger(__name__)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- covariance statistics -------------------------------------------------------------------

def corpus_text(settings: StatsSettings, model: nn.Module, tok, wikitext: Path) -> tuple[str, str]:
    """The corpus text and a description of it. ``self`` samples from the model (data-free)."""
    c = settings.corpus
    if c == "wikitext":
        if not wikitext.is_file():
            raise FileNotFoundError(
                f"corpus 'wikitext' expects {wikitext}; set stats.corpus to a text file or 'self'"
            )
        return wikitext.read_text(encoding="utf-8"), f"file:{wikitext.name}"
    if c == "self":
        # Enough sequences for the token budget; seeded, so the same model gives the same text.
        n_seq = max(1, settings.tokens // settings.seq_len)
        log.warning("stats corpus 'self': data-free calibration on %d sequences the model samples "
                    "itself; no real text is used", n_seq)
        texts = sample_self_text(model, tok, n_seq, settings.seq_len, settings.seed)
        return "\n".join(texts), f"self:seed={settings.seed}"
    if c.startswith("dataset:"):
        import datasets

        parts = c.split(":")[1:]
        if len(parts) == 3:
            name, split, column = parts
            cfg = None
        elif len(parts) == 4:
            name, cfg, split, column = parts
        else:
            raise ValueError(f"stats.corpus {c!r}: use dataset:NAME[:CONFIG]:SPLIT:COLUMN")
        ds = datasets.load_dataset(name, cfg, split=split)
        return "\n".join(str(x) for x in ds[column]), c
    path = Path(c)
    if not path.is_file():
        raise FileNotFoundError(f"stats.corpus {c!r} is neither 'wikitext', 'self', a dataset: spec "
                                "nor an existing text file")
    return path.read_text(encoding="utf-8"), f"file:{path.name}"


def corpus_token_ids(tok, text: str, limit: int, chunk_chars: int = 20_000) -> list[int]:
    """Token ids of ``text`` up to ``limit``, tokenised in line-aligned chunks (a whole corpus
    in one call trips the tokenizer's max-length warning and costs memory)."""
    ids: list[int] = []
    start = 0
    while start < len(text) and len(ids) < limit:
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        ids.extend(tok(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return ids[:limit]


def _without_wikitext(settings: StatsSettings, roots: Roots) -> tuple[StatsSettings, str, str]:
    """The corpus where WikiText-2 is absent: the project's shipped text (the same bytes on every
    machine), else text the model samples itself. Returns the settings, the cache key's label and
    what to tell the user when C is measured (a cached C was told about when it was measured)."""
    if roots.fallback_corpus.is_file():
        return (dataclasses.replace(settings, corpus=str(roots.fallback_corpus)), "fallback:corpus.txt",
                f"no WikiText-2 at {roots.wikitext}: C is measured on the project's shipped text "
                f"{roots.fallback_corpus} (text SmolLM2 sampled itself; put the benchmark data there for "
                "better statistics)")
    return (dataclasses.replace(settings, corpus="self"), "self",
            f"no corpus: {roots.wikitext} is absent, so C is measured data-free on text the model samples "
            "itself (set stats.corpus to a real text file for better statistics)")


def ensure_stats(
    model: nn.Module,
    tok,
    model_name: str,
    layers: Sequence[int],
    settings: StatsSettings,
    base_hash: str,
    roots: Roots,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> tuple[dict[int, torch.Tensor], Path, bool]:
    """C for ``layers``, from the cache under ``roots.stats`` when the same inputs were measured before.

    Returns (covariances, file, cached?). The cache key covers the weights hash, layers,
    corpus and its hash, token budget, sequence length and seed.
    """
    layers = sorted(set(layers))
    wikitext = roots.wikitext
    corpus_label, fallback = settings.corpus, None
    if settings.corpus == "wikitext" and not wikitext.is_file():
        settings, corpus_label, fallback = _without_wikitext(settings, roots)
    text, corpus_desc = corpus_text(settings, model, tok, wikitext) if settings.corpus != "self" else ("", "self")
    corpus_hash = hashlib.sha256(text.encode()).hexdigest()[:16] if text else f"self-{settings.seed}"
    key = {"weights": base_hash, "layers": layers, "corpus": corpus_label, "corpus_hash": corpus_hash,
           "tokens": settings.tokens, "seq_len": settings.seq_len, "seed": settings.seed}
    path = roots.stats / model_name / f"cov-{digest(key)}.safetensors"
    if path.is_file() and not force:
        tensors = load_file(path)
        if fallback is not None:
            log.info("C from the cache, measured on %s (no WikiText-2 at %s)", corpus_label, wikitext)
        return {int(k.split(".")[1]): v for k, v in tensors.items()}, path, True
    if fallback is not None:
        log.warning("%s", fallback)
    if settings.corpus == "self":
        text, corpus_desc = corpus_text(settings, model, tok, wikitext)
    ids = corpus_token_ids(tok, text, settings.tokens)
    spec = spec_for(model)
    device = next(model.parameters()).device
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(ids))

    t0 = time.perf_counter()
    sm = second_moment(model, spec, layers, token_batches(ids, settings.seq_len, settings.batch_size, device),
                       progress=tick)
    seconds = time.perf_counter() - t0
    meta = {**{k: json.dumps(v) for k, v in key.items()}, "corpus_desc": corpus_desc,
            "token_count": str(sm.tokens), "seconds": f"{seconds:.1f}", "created": now()}
    atomic_save_tensors(path, {f"cov.{layer}": c for layer, c in sm.cov.items()}, meta)
    log.info("stats: %d tokens, layers %s, %.1f s (%.0f tokens/s) -> %s", sm.tokens, layers, seconds,
             sm.tokens / max(seconds, 1e-9), path)
    return sm.cov, path, False


# --- NAS anchors -----------------------------------------------------------------------------

def pilot_file(roots: Roots) -> Path:
    """CounterFact train where the shared data is, else the project's own pilot facts."""
    return roots.pilot_source if roots.pilot_source.is_file() else roots.fallback_pilots


def pilot_requests(n: int, seed: int, roots: Roots) -> list[EditRequest]:
    """A seeded sample of ``n`` CounterFact requests (the training split, never the eval one).

    Without the shared data the project's own 20 pilot facts are used instead, with a warning.
    """
    source = pilot_file(roots)
    if source == roots.pilot_source:
        reqs = list(from_counterfact_easyedit(json.loads(source.read_text(encoding="utf-8"))).requests)
    else:
        log.warning("NAS pilots: %s is absent; using the %s shipped pilot facts instead", roots.pilot_source,
                    source.name)
        reqs = list(parse_fact_jsonl(source.read_text(encoding="utf-8")).requests)
    rng = random.Random(seed)
    return rng.sample(reqs, min(n, len(reqs)))


def ensure_anchor(
    model: nn.Module,
    tok,
    model_name: str,
    method: str,
    settings: MemitSettings | AlphaEditSettings | RomeSettings,
    base_hash: str,
    roots: Roots,
    progress: Callable[[int, int], None] | None = None,
    runner: RunnerSettings = RunnerSettings(),
    ident: BaseIdent | None = None,
) -> tuple[dict[str, Any], Path, bool]:
    """The NAS reference norm for ``settings``' last layer, calibrated once on the base model.

    Cached under ``roots.anchors``. The caller must pass the *unedited* model: the hash of its
    weights is checked against ``base_hash`` so an anchor is never calibrated on an edited model.
    The pilots run on ``runner`` (the dask runner: on workers' copies of ``ident``); the record
    says which, and at which torch threads (the norms depend on them).
    """
    settings = precision.resolve(settings, next(model.parameters()).device)
    layer = settings.layers[-1]
    values = dataclasses.asdict(settings.values)
    if values["compute_dtype"] == "float32":
        del values["compute_dtype"]  # the key of every anchor calibrated before the setting existed
    if values["attention"] == "default":
        del values["attention"]  # likewise
    if values["tail_group_slack"] == 0:
        del values["tail_group_slack"]  # likewise
    key = {"weights": base_hash, "layer": layer, "values": values,
           "pilots": settings.nas.pilots, "drop": settings.nas.drop_top_fraction, "seed": settings.nas.seed,
           "pilot_source": pilot_file(roots).name}
    path = roots.anchors / model_name / f"anchor-L{layer}-{digest(key)}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), path, True
    if weights_hash(model) != base_hash:
        raise RuntimeError("refusing to calibrate NAS on an edited model: load the base model")
    pilots = pilot_requests(settings.nas.pilots, settings.nas.seed, roots)
    t0 = time.perf_counter()
    norms = pilot_norms(model, tok, pilots, layer, settings.values, settings.nas, runner, ident, progress)
    cal = reference_norm_from(norms.norms, settings.nas.drop_top_fraction)
    record = {
        "reference_norm": cal.reference_norm,
        "layer": layer,
        "pilots": cal.pilots,
        "dropped": cal.dropped,
        "seed": settings.nas.seed,
        "pilot_source": pilot_file(roots).name,
        "settings": {"values": dataclasses.asdict(settings.values), "nas": dataclasses.asdict(settings.nas)},
        "base_weights_hash": base_hash,
        "method_hint": method,
        "seconds": round(time.perf_counter() - t0, 1),
        "runner": {**runner.record(), "threads_used": list(norms.threads)},
        "created": now(),
        "pilot_norms": list(cal.norms),
    }
    atomic_write_text(path, json.dumps(record, indent=1))
    return record, path, False
