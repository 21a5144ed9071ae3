"""Fluency: weighted bi/tri-gram entropy of greedy generations (ROME/MEMIT's metric).

A collapsing model repeats itself ("Paris Paris Paris ..."), which drives the n-gram
entropy of its generations down; healthy text scores about 5-6 bits on 100-token
generations and the metric has no reference text to depend on.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from nas_core.prompts import encode

_WORD = re.compile(r"\w+|[^\w\s]")

#: ROME's weights: bigram entropy x 2/3, trigram entropy x 4/3, arithmetic mean.
NGRAM_WEIGHTS: dict[int, float] = {2: 2 / 3, 3: 4 / 3}


def ngram_entropy(text: str, weights: dict[int, float] = NGRAM_WEIGHTS) -> float:
    """Weighted mean over n of the entropy (bits) of ``text``'s word n-gram distribution.

    Words are runs of word characters or single punctuation marks (ROME uses NLTK's
    tokenizer; this needs no download and agrees on plain text). A text with fewer than
    n words contributes 0 for that n.
    """
    words = _WORD.findall(text.lower())
    parts = []
    for n, w in weights.items():
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


@torch.no_grad()
def greedy_generations(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (text after the prompt), one prompt at a time.

    One at a time keeps every prompt's result independent of the others (no padding
    effects), which matters more here than speed: generations are short.
    """
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode(tok, prompt)], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def fluency(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int = 40) -> float | None:
    """Mean n-gram entropy of the greedy generations from ``prompts`` (None without prompts)."""
    if not prompts:
        return None
    texts = greedy_generations(model, tok, prompts, max_new_tokens)
    return sum(ngram_entropy(t) for t in texts) / len(texts)
