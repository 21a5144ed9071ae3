"""Teacher-forced target scoring, batched: the primitive every edit metric is built on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nas_core.prompts import pad_batch, pad_token_id, target_ids, tokenise_filled
from nas_core.values import logits_at


@torch.no_grad()
def target_nll(
    model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Mean per-token NLL of each target continuing its prompt (MEMIT's CounterFact score).

    Args:
        prompts: filled prompts.
        targets: answers, one per prompt (a leading space is added by tokenisation).

    Returns:
        (N,) float32 mean negative log-probability over the target's tokens.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = next(model.parameters()).device
    out = torch.empty(len(prompts))
    for start in range(0, len(prompts), batch_size):
        rows = [tokenise_filled(tok, p, target_ids(tok, t))
                for p, t in zip(prompts[start : start + batch_size], targets[start : start + batch_size],
                                strict=True)]
        ids, mask = pad_batch(rows, pad_token_id(tok), device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        r_idx, p_idx, t_ids, owner, weight = [], [], [], [], []
        for i, r in enumerate(rows):
            for j, t in enumerate(r.target):
                r_idx.append(i)
                p_idx.append(r.target_start - 1 + j)
                t_ids.append(t)
                owner.append(i)
                weight.append(1.0 / len(r.target))
        logp = F.log_softmax(logits_at(model, hidden[r_idx, p_idx]), -1)  # (P, V)
        tok_nll = -logp[torch.arange(len(t_ids)), torch.tensor(t_ids, device=device)]
        tok_nll = tok_nll * torch.tensor(weight, device=device)
        nll = torch.zeros(len(rows), device=device).index_add(0, torch.tensor(owner, device=device), tok_nll)
        out[start : start + len(rows)] = nll.cpu()
    return out


def prefers_new(model: nn.Module, tok, prompts: Sequence[str], new: Sequence[str], true: Sequence[str]) -> torch.Tensor:
    """(N,) bool: p(new) > p(true) by mean token probability (lower NLL wins)."""
    both = target_nll(model, tok, list(prompts) * 2, list(new) + list(true))
    n = len(prompts)
    return both[:n] < both[n:]
