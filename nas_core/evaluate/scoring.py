"""Teacher-forced target scoring, batched: the primitive every edit metric is built on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nas_core.prompts import pad_batch, pad_token_id, target_ids, tokenise_filled
from nas_core.values import logits_at


@dataclass(frozen=True)
class TargetScores:
    """Teacher-forced scores of N (prompt, target) pairs.

    Attributes:
        nll: (N,) float32 mean negative log-probability over the target's tokens (MEMIT's
            CounterFact score; ``exp(-nll)`` is the geometric-mean token probability).
        token_accuracy: (N,) float32 share of target tokens that are the model's top-1
            prediction given the prompt and the target's earlier tokens (EasyEdit / zsRE).
        total_nll: (N,) float32 summed NLL (the log-likelihood of the whole target, used to
            rank answer options).
    """

    nll: torch.Tensor
    token_accuracy: torch.Tensor
    total_nll: torch.Tensor


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped shortest first into batches of at most ``max_rows`` rows and
    ``max_tokens`` padded tokens (rows x the longest row; a longer row goes alone)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        cur = batches[-1] if batches else None
        if cur is None or len(cur) >= max_rows or (len(cur) + 1) * lengths[i] > max_tokens:
            batches.append([i])
        else:
            cur.append(i)
    return batches


@torch.no_grad()
def target_scores(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64,
    batch_tokens: int = 4096,
) -> TargetScores:
    """Score each target continuing its filled prompt, batched by length (``length_batches``).

    A leading space is added to each target by tokenisation (``prompts.target_ids``); the
    sequence is ``prompt ids + target ids`` so scoring sees the tokens an edit wrote. Pairs
    whose forward rows are the same ids (the same prompt with single-token targets, as
    CounterFact's new and true answers mostly are) share one row and one head product per
    position: the scores are the same, the forward work about half.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    device = next(model.parameters()).device
    every = [tokenise_filled(tok, p, target_ids(tok, t)) for p, t in zip(prompts, targets, strict=True)]
    row_of: dict[tuple[int, ...], int] = {}
    pair_row = [row_of.setdefault(r.ids, len(row_of)) for r in every]  # pair -> distinct row
    unique = list(row_of)
    pairs_of: list[list[int]] = [[] for _ in unique]
    for pair, row in enumerate(pair_row):
        pairs_of[row].append(pair)
    tok_nll_out = torch.zeros(len(prompts), dtype=torch.float32)
    hits_out = torch.zeros(len(prompts), dtype=torch.float32)
    for idx in length_batches([len(u) for u in unique], batch_size, batch_tokens):
        ids, mask = pad_batch([every[pairs_of[i][0]] for i in idx], pad_token_id(tok), device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        # One entry per (pair, target token); each distinct (row, position) goes through the head once.
        entries = [(b, every[p].target_start - 1 + j, t, p) for b, i in enumerate(idx) for p in pairs_of[i]
                   for j, t in enumerate(every[p].target)]
        if not entries:
            continue
        spot_of: dict[tuple[int, int], int] = {}
        spot = [spot_of.setdefault((b, pos), len(spot_of)) for b, pos, _, _ in entries]
        rows_i, cols_i = zip(*spot_of, strict=True)
        logp = F.log_softmax(logits_at(model, hidden[list(rows_i), list(cols_i)]).float(), -1)  # (S, V)
        e_spot = torch.tensor(spot, device=device)
        t_ids = torch.tensor([t for _, _, t, _ in entries], device=device)
        owner = torch.tensor([p for _, _, _, p in entries])
        tok_nll_out.index_add_(0, owner, (-logp[e_spot, t_ids]).cpu())
        hits_out.index_add_(0, owner, (logp.argmax(-1)[e_spot] == t_ids).float().cpu())
    lengths = torch.tensor([len(r.target) for r in every], dtype=torch.float32)
    nll_out, acc_out, total_out = tok_nll_out / lengths, hits_out / lengths, tok_nll_out
    return TargetScores(nll=nll_out, token_accuracy=acc_out, total_nll=total_out)


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module, tok, prompts: Sequence[str], candidates: Sequence[Sequence[int]], batch_size: int = 32,
    batch_tokens: int = 4096,
) -> list[torch.Tensor]:
    """log p(candidate token | prompt) for each prompt's candidate ids: one forward row per prompt.

    Prompts are batched by length (``length_batches``); results come back in input order.

    Returns:
        one (len(candidates[i]),) float32 tensor per prompt.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    device = next(model.parameters()).device
    rows = [tokenise_filled(tok, p) for p in prompts]
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for idx in length_batches([len(r.ids) for r in rows], batch_size, batch_tokens):
        ids, mask = pad_batch([rows[i] for i in idx], pad_token_id(tok), device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = torch.tensor([len(rows[i].ids) - 1 for i in idx], device=device)
        logp = F.log_softmax(logits_at(model, hidden[torch.arange(len(idx), device=device), last]).float(), -1)
        for j, i in enumerate(idx):
            out[i] = logp[j, torch.tensor(list(candidates[i]), device=device)].cpu()
    return out


def target_nll(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64,
    batch_tokens: int = 4096,
) -> torch.Tensor:
    """(N,) mean per-token NLL of each target continuing its prompt (see ``target_scores``)."""
    return target_scores(model, tok, prompts, targets, batch_size, batch_tokens).nll


def prefers_new(model: nn.Module, tok, prompts: Sequence[str], new: Sequence[str], true: Sequence[str]) -> torch.Tensor:
    """(N,) bool: p(new) > p(true) by mean token probability (lower NLL wins)."""
    both = target_nll(model, tok, list(prompts) * 2, list(new) + list(true))
    n = len(prompts)
    return both[:n] < both[n:]
