"""Apply and revert cumulative deltas, hash weights.

A checkpoint is the base weights' hash plus the cumulative deltas D of the edited
weights. The model is always materialised as W = W_base + D (float32 sum, cast to the
weight's dtype), so a checkpoint rebuilds the exact same weights every time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn


def factor_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left (d_out, r) @ right (d_in, r)^T`` in float64: the one product behind every update an
    editor writes and every rebuild of it, so a rebuilt update is bit-identical to the written one."""
    return left.to(torch.float64) @ right.to(torch.float64).T


def storage_update(product: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A (d_out, d_in) update in the parameter's storage layout, float32 (the layout and cast the
    editors write)."""
    return (product.T.contiguous() if transposed else product).to(torch.float32)


@dataclass(frozen=True)
class LowRankUpdate:
    """One edit call's update of one weight as ordered factor pairs: the update is
    ``sum_i storage_update(left_i right_i^T)``, summed in float32 in pair order (ROME writes one
    pair per request, MEMIT and AlphaEdit one per call).

    Attributes:
        pairs: ``(left (d_out, r_i), right (d_in, r_i))``, each in the dtype the solve produced.
        transposed: the parameter is stored (d_in, d_out) (GPT-2's Conv1D).
    """

    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    transposed: bool

    @property
    def rank(self) -> int:
        return sum(int(left.shape[1]) for left, _ in self.pairs)

    def dense(self) -> torch.Tensor:
        """The float32 update in storage layout, exactly as the editor added it."""
        total: torch.Tensor | None = None
        for left, right in self.pairs:
            d = storage_update(factor_product(left, right), self.transposed)
            total = d if total is None else total + d
        if total is None:
            raise ValueError("a LowRankUpdate needs at least one factor pair")
        return total


def edited_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A detached copy of the named parameters (the base weights to keep for reverts)."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"model has no parameters {missing}")
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def materialise(model: nn.Module, base: dict[str, torch.Tensor], cumulative: dict[str, torch.Tensor]) -> None:
    """Set each named weight to base + cumulative (computed in float32)."""
    params = dict(model.named_parameters())
    for name, b in base.items():
        d = cumulative.get(name)
        target = b if d is None else (b.float() + d.to(b.device, torch.float32)).to(b.dtype)
        params[name].copy_(target)


def accumulate(cumulative: dict[str, torch.Tensor], step: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new dict D + step (float32), leaving both inputs untouched."""
    out = {k: v.clone() for k, v in cumulative.items()}
    for name, d in step.items():
        d32 = d.to(torch.float32)
        out[name] = out[name] + d32 if name in out else d32.clone()
    return out


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():  # the tensor's own buffer, not a bytes copy of it (113 MB for SmolLM2's embedding)
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def frobenius_norms(model: nn.Module, names: list[str]) -> dict[str, float]:
    """||W||_F of the named parameters."""
    params = dict(model.named_parameters())
    return {n: float(params[n].detach().float().norm()) for n in names}
