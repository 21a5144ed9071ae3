"""A weight's cumulative edit as LoRA factors: B (d_out, r) @ A (r, d_in).

Every update the editors write is a sum of factor products (:class:`nas_core.deltas.LowRankUpdate`),
so the lineage's edit of a weight is exactly ``[L_1 ... L_k] [R_1 ... R_k]^T``: rank r = the
columns of every pair. That is exact while r < min(d_out, d_in); above it (or when the factors
are lost: an old checkpoint) the truncated SVD of D gives the best rank-r approximation, and
the relative error says what it costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """LoRA factors of one weight's cumulative update, float32.

    Attributes:
        b: (d_out, r) ``lora_B``.
        a: (r, d_in) ``lora_A``.
        exact: the factors are the edits' own; False for an SVD (truncated, or of D when the
            factors are lost), whose cost ``relative_error`` states.
        relative_error: ||D - B A||_F / ||D||_F against the model's float32 D.
    """

    b: torch.Tensor
    a: torch.Tensor
    exact: bool
    relative_error: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def _error(dense: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    d = dense.double()
    norm = float(d.norm())
    return float((d - b.double() @ a.double()).norm()) / norm if norm else 0.0


def from_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], dense: torch.Tensor,
               max_rank: int | None = None) -> LoraFactors:
    """The concatenated factor pairs ``(left (d_out, r_i), right (d_in, r_i))`` when their rank is
    below min(d_out, d_in) and at most ``max_rank``; else :func:`from_dense` at ``max_rank``
    (default min(d_out, d_in): no truncation). ``dense``: D as (d_out, d_in)."""
    rank = sum(int(left.shape[1]) for left, _ in pairs)
    full = min(dense.shape)
    if not pairs or rank >= full or (max_rank is not None and rank > max_rank):
        return from_dense(dense, full if max_rank is None else min(max_rank, full))
    b = torch.cat([left.double() for left, _ in pairs], dim=1)
    a = torch.cat([right.double() for _, right in pairs], dim=1).T
    return LoraFactors(b.float(), a.float().contiguous(), True, _error(dense, b, a))


def from_dense(dense: torch.Tensor, max_rank: int) -> LoraFactors:
    """The rank-``max_rank`` truncated SVD of ``dense`` (d_out, d_in), split as B = U S, A = V^T."""
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    numerical_rank = int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0
    keep = min(max_rank, numerical_rank)
    b, a = u[:, :keep] * s[:keep], vh[:keep]
    return LoraFactors(b.float(), a.float().contiguous(), False, _error(dense, b, a))
