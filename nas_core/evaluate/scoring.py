"""Teacher-forced target scoring, batched: the primitive every edit metric is built on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nas_core.prompts import TokenisedPrompt, pad_batch, pad_token_id, target_ids, tokenise_filled
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


#: One forward pass's fixed cost, counted in padded tokens, when :func:`length_batches` weighs a
#: new batch against more padding (SmolLM2 on 2 CPU cores: a 1x16 pass costs what ~50 tokens of a
#: large pass cost; docs/speed.md "Scoring batches without the padding").
BATCH_OVERHEAD_TOKENS = 64


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int,
                   overhead_tokens: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices grouped into batches of at most ``max_rows`` rows and ``max_tokens`` padded tokens
    (rows x the longest row; a longer row goes alone), with the least padded tokens plus
    ``overhead_tokens`` per batch.

    Rows are sorted by length and cut into runs; the cuts are chosen by dynamic programming
    (O(rows x max_rows)), so a batch never pads a short row to a much longer one just to fill its
    rows: a forward costs about its padded tokens, real or not. Deterministic: the shortest rows
    come first, ties by index.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    best = [0] + [0] * n  # best[j]: least cost of the first j sorted rows
    cut = [0] * (n + 1)  # cut[j]: where the last batch of that best split starts
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]  # the longest of any batch ending at j
        best[j], cut[j] = best[j - 1] + width + overhead_tokens, j - 1  # the row alone: always allowed
        for i in range(j - 2, max(j - max_rows, 0) - 1, -1):
            if (j - i) * width > max_tokens:
                break
            cost = best[i] + (j - i) * width + overhead_tokens
            if cost <= best[j]:
                best[j], cut[j] = cost, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return batches[::-1]


@dataclass(frozen=True)
class ScoringBatch:
    """One forward batch of a :class:`ScoringPlan`: everything a process needs to score it (ids only).

    Attributes:
        rows: the distinct forward rows, in batch order (right-padded together).
        pairs: per (pair, row): (pair index in the plan, row in this batch, target_start, target ids).
    """

    rows: tuple[TokenisedPrompt, ...]
    pairs: tuple[tuple[int, int, int, tuple[int, ...]], ...]

    @property
    def padded_tokens(self) -> int:
        return len(self.rows) * max(len(r.ids) for r in self.rows)


@dataclass(frozen=True)
class ScoringPlan:
    """How N (prompt, target) pairs are scored: the batches of :func:`plan_scores`.

    A batch's scores depend only on the batch (padding width, rows), so scoring the batches in any
    split (:meth:`shards`) and merging gives the numbers of scoring them all in one process.
    """

    n_pairs: int
    target_lengths: tuple[int, ...]
    pad_id: int
    batches: tuple[ScoringBatch, ...]

    def shards(self, n: int) -> list[tuple[ScoringBatch, ...]]:
        """The batches cut into at most ``n`` non-empty shards of about equal padded tokens
        (largest batch first onto the lightest shard; deterministic)."""
        if n < 1:
            raise ValueError(f"shards must be >= 1, got {n}")
        loads = [0] * min(n, len(self.batches))
        parts: list[list[int]] = [[] for _ in loads]
        for i in sorted(range(len(self.batches)), key=lambda i: (-self.batches[i].padded_tokens, i)):
            k = min(range(len(loads)), key=lambda k: (loads[k], k))
            parts[k].append(i)
            loads[k] += self.batches[i].padded_tokens
        return [tuple(self.batches[i] for i in sorted(part)) for part in parts]


@dataclass(frozen=True)
class PartialScores:
    """Summed target-token NLL and top-1 hits of the pairs one shard scored.

    Attributes:
        pair: (P,) long, the pairs' indices in the plan; tok_nll / hits: (P,) float32 sums over
            each pair's target tokens.
    """

    pair: torch.Tensor
    tok_nll: torch.Tensor
    hits: torch.Tensor


def plan_scores(tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64,
                batch_tokens: int = 4096) -> ScoringPlan:
    """Tokenise the pairs and batch their distinct forward rows by length (``length_batches``).

    A leading space is added to each target by tokenisation (``prompts.target_ids``); the sequence
    is ``prompt ids + target ids`` so scoring sees the tokens an edit wrote. Pairs whose forward
    rows are the same ids (the same prompt with single-token targets, as CounterFact's new and true
    answers mostly are) share one row.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    every = [tokenise_filled(tok, p, target_ids(tok, t)) for p, t in zip(prompts, targets, strict=True)]
    row_of: dict[tuple[int, ...], int] = {}
    pair_row = [row_of.setdefault(r.ids, len(row_of)) for r in every]  # pair -> distinct row
    pairs_of: list[list[int]] = [[] for _ in row_of]
    for pair, row in enumerate(pair_row):
        pairs_of[row].append(pair)
    batches = []
    for idx in length_batches([len(u) for u in row_of], batch_size, batch_tokens):
        pairs = tuple((p, b, every[p].target_start, every[p].target) for b, i in enumerate(idx) for p in pairs_of[i])
        batches.append(ScoringBatch(tuple(every[pairs_of[i][0]] for i in idx), pairs))
    return ScoringPlan(len(every), tuple(len(r.target) for r in every), pad_token_id(tok), tuple(batches))


@torch.no_grad()
def score_batches(model: nn.Module, pad_id: int, batches: Sequence[ScoringBatch]) -> PartialScores:
    """Score ``batches`` (a shard of a plan) on ``model``; each distinct (row, position) goes
    through the head once."""
    device = next(model.parameters()).device
    pair_out, nll_out, hits_out = [], [], []
    for batch in batches:
        ids, mask = pad_batch(batch.rows, pad_id, device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        # One entry per (pair, target token), owned by the pair's place in this batch.
        entries = [(b, start - 1 + j, t, k) for k, (_, b, start, target) in enumerate(batch.pairs)
                   for j, t in enumerate(target)]
        tok_nll = torch.zeros(len(batch.pairs), dtype=torch.float32)
        hits = torch.zeros(len(batch.pairs), dtype=torch.float32)
        if entries:
            spot_of: dict[tuple[int, int], int] = {}
            spot = [spot_of.setdefault((b, pos), len(spot_of)) for b, pos, _, _ in entries]
            rows_i, cols_i = zip(*spot_of, strict=True)
            logp = F.log_softmax(logits_at(model, hidden[list(rows_i), list(cols_i)]).float(), -1)  # (S, V)
            e_spot = torch.tensor(spot, device=device)
            t_ids = torch.tensor([t for _, _, t, _ in entries], device=device)
            owner = torch.tensor([k for _, _, _, k in entries])
            tok_nll.index_add_(0, owner, (-logp[e_spot, t_ids]).cpu())
            hits.index_add_(0, owner, (logp.argmax(-1)[e_spot] == t_ids).float().cpu())
        pair_out.append(torch.tensor([p for p, _, _, _ in batch.pairs], dtype=torch.long))
        nll_out.append(tok_nll)
        hits_out.append(hits)
    if not pair_out:
        return PartialScores(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0))
    return PartialScores(torch.cat(pair_out), torch.cat(nll_out), torch.cat(hits_out))


def merge_scores(plan: ScoringPlan, parts: Sequence[PartialScores]) -> TargetScores:
    """The plan's :class:`TargetScores` from its shards' partial scores (each pair exactly once)."""
    tok_nll = torch.zeros(plan.n_pairs, dtype=torch.float32)
    hits = torch.zeros(plan.n_pairs, dtype=torch.float32)
    seen = torch.zeros(plan.n_pairs, dtype=torch.long)
    for part in parts:
        tok_nll[part.pair] = part.tok_nll
        hits[part.pair] = part.hits
        seen.index_add_(0, part.pair, torch.ones_like(part.pair))
    if plan.n_pairs and not bool((seen == 1).all()):
        missing, twice = int((seen == 0).sum()), int((seen > 1).sum())
        raise ValueError(f"partial scores cover the plan's {plan.n_pairs} pairs wrongly: "
                         f"{missing} missing, {twice} more than once")
    lengths = torch.tensor(plan.target_lengths, dtype=torch.float32)
    return TargetScores(nll=tok_nll / lengths, token_accuracy=hits / lengths, total_nll=tok_nll)


def target_scores(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64,
    batch_tokens: int = 4096,
) -> TargetScores:
    """Score each target continuing its filled prompt (:func:`plan_scores`, all batches here)."""
    plan = plan_scores(tok, prompts, targets, batch_size, batch_tokens)
    return merge_scores(plan, [score_batches(model, plan.pad_id, plan.batches)])


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
