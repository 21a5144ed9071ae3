"""Covariance statistics C = E[k k^T] of the MLP-projection inputs.

All edited layers are measured in one forward pass per token batch, and the pass stops
right after the deepest edited layer (nothing above it can change those inputs).
Per-batch products are taken in the activations' float32 and summed in float64, which
keeps the result accurate over millions of tokens at half the cost of a float64 GEMM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from nas_core.hooks import capture, compute_in, stop_after
from nas_core.spec import ModelSpec, get_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecondMoment:
    """Uncentred second moments of the projection inputs.

    Attributes:
        cov: layer -> (d_in, d_in) float64 E[k k^T] over all counted tokens.
        tokens: number of tokens averaged over.
    """

    cov: dict[int, torch.Tensor]
    tokens: int


@torch.no_grad()
def second_moment(
    model: nn.Module,
    spec: ModelSpec,
    layers: Sequence[int],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    progress: Callable[[int], None] | None = None,
    forward_dtype: torch.dtype | None = None,
) -> SecondMoment:
    """Stream ``batches`` of ``(input_ids (B, T), attention_mask (B, T))`` through the model.

    Only tokens with mask 1 are counted. ``progress(tokens_in_batch)`` is called per batch.
    ``forward_dtype`` (e.g. bfloat16 where native) runs the blocks up to the deepest layer in
    that dtype; the keys are upcast and the products stay float32, the sums float64.
    """
    if not layers:
        raise ValueError("no layers to measure")
    sums: dict[int, torch.Tensor] = {}
    count = 0
    deepest = max(layers)
    for ids, mask in batches:
        with ExitStack() as stack:
            caps = {
                layer: stack.enter_context(
                    capture(get_module(model, spec.proj_name(layer)), inputs=True, outputs=False)
                )
                for layer in layers
            }
            stack.enter_context(stop_after(get_module(model, spec.layer_name(deepest))))
            if forward_dtype is not None:
                blocks = [get_module(model, spec.layer_name(i)) for i in range(deepest + 1)]
                stack.enter_context(compute_in(blocks, forward_dtype))
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        keep = mask.reshape(-1).bool()
        for layer, rec in caps.items():
            x = rec.inputs[0].reshape(-1, rec.inputs[0].shape[-1])[keep].float()  # (tokens, d_in)
            xtx = (x.T @ x).double()  # (d_in, d_in)
            sums[layer] = sums[layer] + xtx if layer in sums else xtx
        n = int(keep.sum())
        count += n
        if progress is not None:
            progress(n)
    if count == 0:
        raise ValueError("the corpus produced no tokens")
    return SecondMoment(cov={layer: s / count for layer, s in sums.items()}, tokens=count)


def token_batches(
    ids: Sequence[int], seq_len: int, batch_size: int, device: torch.device | None = None
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Cut one long token stream into (batch_size, seq_len) batches (the last may be short)."""
    chunks = [list(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    for start in range(0, len(chunks), batch_size):
        group = chunks[start : start + batch_size]
        width = max(len(c) for c in group)
        x = torch.zeros((len(group), width), dtype=torch.long, device=device)
        m = torch.zeros((len(group), width), dtype=torch.long, device=device)
        for row, c in enumerate(group):
            x[row, : len(c)] = torch.tensor(c, dtype=torch.long)
            m[row, : len(c)] = 1
        yield x, m


@torch.no_grad()
def sample_self_text(model: nn.Module, tok, n_sequences: int, length: int, seed: int) -> list[str]:
    """Data-free corpus: text the model samples itself from its BOS token, seeded.

    For machines with no corpus. The statistics then describe what the model itself
    tends to say, not real text; callers must say so in their logs.
    """
    device = next(model.parameters()).device
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = torch.full((n_sequences, 1), start, dtype=torch.long, device=device)
    # fork_rng restores the global RNG afterwards: sampling leaves no global state behind.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             max_new_tokens=length, min_new_tokens=length, top_k=0, top_p=1.0,
                             pad_token_id=start)
    return [tok.decode(row[1:], skip_special_tokens=True) for row in out.tolist()]
