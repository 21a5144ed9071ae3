"""Model-health metrics: canary perplexity, zero-shot general tasks by option likelihood.

Both are computed on the base model and on every candidate, and only their *ratio* or
*difference* to the base matters to the collapse verdict: absolute scores of a 135M
model on MMLU are near chance, but a collapsing edit sequence moves them anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nas_core.evaluate.scoring import next_token_logprobs, target_scores
from nas_core.prompts import target_ids
from nas_core.values import logits_at

#: Bumped when a health metric's arithmetic changes, so cached base-model scores are redone
#: (2: perplexity from contiguous per-window logits, 15x closer to a float64 reference; 3: general
#: tasks in padding-minimising batches, so base and candidate are scored in the same batches).
SCORING_VERSION = 3
_HEAD_ROWS = 64  # positions per LM-head product in perplexity: 12 MB of logits for SmolLM2


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: Sequence[int], window: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of ``token_ids`` cut into non-overlapping windows.

    Every window is scored on its own (the first token of each window is context only),
    so the number depends only on the ids and the window, not on the batch size. The
    blocks run ``batch_size`` windows at a time, the head ``_HEAD_ROWS`` positions at a time:
    vocabulary-wide logits are the largest tensors of a night (one 256-token window's are
    50 MB for SmolLM2, twice over with the log-softmax the loss takes; a batch's, 400 MB).

    Args:
        token_ids: the canary text's ids (a fixed list, so runs are comparable).
        window: tokens per window; the tail shorter than 2 tokens is dropped.
    """
    device = next(model.parameters()).device
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise ValueError("perplexity needs at least 2 tokens")
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        group = chunks[start : start + batch_size]
        width = max(len(c) for c in group)
        batch = torch.zeros((len(group), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(batch)
        for row, c in enumerate(group):
            batch[row, : len(c)] = c
            mask[row, : len(c)] = 1
        hidden = model.base_model(input_ids=batch, attention_mask=mask, use_cache=False).last_hidden_state
        for row, c in enumerate(group):
            for at in range(0, len(c) - 1, _HEAD_ROWS):  # (<= _HEAD_ROWS, V) float32 logits at a time
                end = min(at + _HEAD_ROWS, len(c) - 1)
                logits = logits_at(model, hidden[row, at:end])
                total += float(F.cross_entropy(logits, c[at + 1 : end + 1], reduction="none").double().sum())
            count += len(c) - 1
    return math.exp(total / count)


@dataclass(frozen=True)
class OptionItem:
    """One zero-shot item: a prompt, its answer options (continuations) and the right one."""

    prompt: str
    options: tuple[str, ...]
    label: int


def _yes_no(question: str) -> Callable[[Mapping[str, Any]], OptionItem]:
    def build(r: Mapping[str, Any]) -> OptionItem:
        return OptionItem(f"Sentence: {r['sentence']}\nQuestion: {question}\nAnswer:", ("No", "Yes"), int(r["label"]))

    return build


def _mrpc(r: Mapping[str, Any]) -> OptionItem:
    prompt = (f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\n"
              "Question: Do both sentences mean the same thing?\nAnswer:")
    return OptionItem(prompt, ("No", "Yes"), int(r["label"]))


def _entailment(r: Mapping[str, Any]) -> OptionItem:
    # GLUE RTE: 0 = entailment, 1 = not entailment; the NLI file spells the labels out.
    label = r["label"]
    index = {"entailment": 0, "not_entailment": 1}[label] if isinstance(label, str) else int(label)
    return OptionItem(f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", ("True", "False"), index)


def _mmlu(r: Mapping[str, Any]) -> OptionItem:
    letters = "ABCD"[: len(r["choices"])]
    lines = "\n".join(f"{letter}. {c}" for letter, c in zip(letters, r["choices"], strict=True))
    subject = str(r.get("subject", "")).replace("_", " ")
    prompt = f"The following is a multiple choice question about {subject}.\n{r['question']}\n{lines}\nAnswer:"
    return OptionItem(prompt, tuple(letters), int(r["answer"]))


#: How each general task's records (../shared/data/general/*.jsonl) become option items.
GENERAL_TASKS: dict[str, Callable[[Mapping[str, Any]], OptionItem]] = {
    "sst2": lambda r: OptionItem(f"Review: {r['sentence']}\nSentiment:", ("negative", "positive"), int(r["label"])),
    "mrpc": _mrpc,
    "cola": _yes_no("Is this sentence grammatically correct?"),
    "rte": _entailment,
    "nli": _entailment,
    "mmlu": _mmlu,
}


def option_items(task: str, records: Sequence[Mapping[str, Any]]) -> list[OptionItem]:
    """The option items of ``task`` built from its raw records."""
    if task not in GENERAL_TASKS:
        raise KeyError(f"unknown general task {task!r}; known: {sorted(GENERAL_TASKS)}")
    return [GENERAL_TASKS[task](r) for r in records]


@torch.no_grad()
def option_accuracy(model: nn.Module, tok, items: Sequence[OptionItem], batch_size: int = 32,
                    batch_tokens: int = 4096) -> float:
    """Percent of items whose right option has the highest log-likelihood (summed over its tokens).

    Options are scored as continuations with a leading space. When every option is a
    single token (all shipped tasks on common tokenizers: " A", " Yes", " True"...) one
    forward pass per item scores all its options at once; otherwise each option is scored
    teacher-forced. Ties go to the first option.
    """
    if not items:
        return float("nan")
    option_ids = [[target_ids(tok, o) for o in it.options] for it in items]
    if all(len(ids) == 1 for opts in option_ids for ids in opts):
        logps = next_token_logprobs(model, tok, [it.prompt for it in items],
                                    [[ids[0] for ids in opts] for opts in option_ids], batch_size, batch_tokens)
        scores = [-lp for lp in logps]
    else:
        prompts = [it.prompt for it in items for _ in it.options]
        options = [o for it in items for o in it.options]
        total = target_scores(model, tok, prompts, options, batch_size, batch_tokens).total_nll
        bounds = torch.tensor([0] + [len(it.options) for it in items]).cumsum(0).tolist()
        scores = [total[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    correct = sum(int(torch.argmin(sc)) == it.label for sc, it in zip(scores, items, strict=True))
    return 100.0 * correct / len(items)
