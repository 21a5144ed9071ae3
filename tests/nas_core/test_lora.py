"""LoRA factors: the edits' own pairs while their rank is below min(d_out, d_in), else an SVD."""

from __future__ import annotations

import torch

from nas_core import lora


def _pairs(rank: int, d_out: int = 6, d_in: int = 8):
    g = torch.Generator().manual_seed(rank)
    pairs = [(torch.randn(d_out, 1, generator=g), torch.randn(d_in, 1, generator=g, dtype=torch.float64))
             for _ in range(rank)]
    dense = sum(left.double() @ right.T for left, right in pairs).float()
    return pairs, dense


def test_pairs_below_full_rank_are_exact():
    pairs, dense = _pairs(3)
    f = lora.from_pairs(pairs, dense)
    assert f.exact and f.rank == 3 and f.relative_error < 1e-6


def test_full_rank_falls_back_to_an_untruncated_svd_and_a_cap_truncates():
    pairs, dense = _pairs(9)  # 9 pairs on a 6 x 8 weight: rank 6 = min(d_out, d_in)
    full = lora.from_pairs(pairs, dense)
    assert not full.exact and full.rank == 6 and full.relative_error < 1e-6
    capped = lora.from_pairs(pairs, dense, max_rank=2)
    assert capped.rank == 2 and capped.relative_error > 1e-2
