"""A compact fingerprint of an edited weight, to judge a rebuild without the original weights.

A rebuild on other arithmetic (another CPU, BLAS, thread count) changes the last bits of every
update, so its weights hash differs even when the edit is the same. The fingerprint of an
update D (out x in) is ||D||_F and ``PROBES`` bilinear sketches u_k^T D v_k with fixed unit
probe vectors, all in float64: a few numbers per layer that a ledger line can hold. A sketch
moves by at most ||D_a - D_b||_F when D moves, so agreement within a tolerance relative to
||D||_F is necessary (not sufficient) for the updates to agree that closely; another edit moves
the norm and the sketches by far more. The probes come from integer hashing, the same on every
machine and torch version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

PROBES = 4


def probe(n: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The k-th probe of length ``n``: signs from a multiplicative hash of the index, norm 1 (float64)."""
    j = torch.arange(n, dtype=torch.int64, device=device)
    h = (j * 2654435761 + (k + 1) * 40503) % (2**32)
    signs = ((h >> 15) & 1).to(torch.float64) * 2.0 - 1.0
    return signs / n**0.5


def fingerprint(delta: torch.Tensor) -> dict[str, float | list[float]]:
    """``{"delta_norm": ||D||_F, "sketch": [u_k^T D v_k for k < PROBES]}`` of one update D (out x in)."""
    d = delta.detach().to(torch.float64)
    out_dim, in_dim = d.shape
    sketch = [float(probe(out_dim, 2 * k, d.device) @ d @ probe(in_dim, 2 * k + 1, d.device)) for k in range(PROBES)]
    return {"delta_norm": float(torch.linalg.matrix_norm(d)), "sketch": sketch}


def fingerprints(deltas: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float | list[float]]]:
    """The fingerprint of every update, by weight name."""
    return {name: fingerprint(d) for name, d in deltas.items()}


@dataclass(frozen=True)
class Divergence:
    """How far a rebuilt update is from the recorded one, relative to the recorded ||D||_F.

    ``relative`` is the largest of |Δ||D||_F| and every |Δ sketch|, divided by the recorded
    ||D||_F (inf for a weight one side lacks; 0 for two zero updates)."""

    name: str
    relative: float


def divergences(recorded: Mapping[str, Mapping], rebuilt: Mapping[str, Mapping]) -> list[Divergence]:
    """Every weight's divergence, largest first."""
    out = []
    for name in sorted(set(recorded) | set(rebuilt)):
        a, b = recorded.get(name), rebuilt.get(name)
        if a is None or b is None or len(a["sketch"]) != len(b["sketch"]):
            out.append(Divergence(name, float("inf")))
            continue
        pairs = [(a["delta_norm"], b["delta_norm"]), *zip(a["sketch"], b["sketch"], strict=True)]
        diffs = [abs(x - y) for x, y in pairs]
        scale = a["delta_norm"]
        worst = max(diffs)
        out.append(Divergence(name, 0.0 if worst == 0.0 else worst / scale if scale > 0 else float("inf")))
    return sorted(out, key=lambda d: d.relative, reverse=True)
