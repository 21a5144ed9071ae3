"""A version's increment: the factor pairs and keys of every edit call since its parent.

A compact checkpoint stores only this (about 2.5 MB for a 24-edit SmolLM2 night over five
layers, against 240 MB for the full editor state). The update of a call is rebuilt bit for
bit by :meth:`nas_core.deltas.LowRankUpdate.dense`, its editor state by
:meth:`nas_core.editors.base.Editor.replay`.

Tensor names in ``increment.safetensors``: ``{step}/{weight}/{pair}/left|right`` and
``{step}/keys/{layer}``; the manifest's ``increment`` list says which exist (counts, ranks,
layout), so no name is ever parsed. A tensor the editor held as a transposed view is stored
as its transpose and given back as the same view (``stored_transposed`` lists them,
:func:`nas_core.state.as_stored`): the rebuild takes the very BLAS path the edit took.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nas_core.deltas import LowRankUpdate
from nas_core.editors.base import EditResult
from nas_core.state import as_stored

INCREMENT = "increment.safetensors"


@dataclass(frozen=True)
class Step:
    """One edit call as a checkpoint stores it.

    Attributes:
        factors: edited weight name -> the call's update as factor pairs.
        keys: layer -> (d_in, m) keys the call added to the editor state.
        edited, skipped: requests written and requests NAS skipped.
    """

    factors: dict[str, LowRankUpdate]
    keys: dict[int, torch.Tensor]
    edited: int
    skipped: int

    @classmethod
    def of(cls, result: EditResult) -> Step:
        edited = sum(not r.skipped for r in result.requests)
        return cls(dict(result.factors), dict(result.keys), edited, len(result.requests) - edited)

    def updates(self) -> dict[str, torch.Tensor]:
        """The call's float32 updates in storage layout, as the editor wrote them."""
        return {name: update.dense() for name, update in self.factors.items()}

    def nbytes(self) -> int:
        pairs = sum(t.numel() * t.element_size() for u in self.factors.values() for p in u.pairs for t in p)
        return pairs + sum(k.numel() * k.element_size() for k in self.keys.values())


def pack(steps: list[Step]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """``(tensors for increment.safetensors, the manifest's increment list)``."""
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict[str, Any]] = []

    def put(name: str, t: torch.Tensor, flipped: list[str]) -> None:
        tensors[name], was_view = as_stored(t)
        if was_view:
            flipped.append(name)

    for b, step in enumerate(steps):
        weights, flipped = {}, []
        for name, update in step.factors.items():
            for i, (left, right) in enumerate(update.pairs):
                put(f"{b}/{name}/{i}/left", left, flipped)
                put(f"{b}/{name}/{i}/right", right, flipped)
            weights[name] = {"ranks": [int(left.shape[1]) for left, _ in update.pairs],
                             "transposed": update.transposed}
        for layer, k in step.keys.items():
            put(f"{b}/keys/{layer}", k, flipped)
        meta.append({"edited": step.edited, "skipped": step.skipped, "weights": weights,
                     "layers": sorted(step.keys), "stored_transposed": flipped})
    return tensors, meta


def unpack(tensors: dict[str, torch.Tensor], meta: list[dict[str, Any]]) -> list[Step]:
    """The steps :func:`pack` wrote; a tensor the manifest names but the file lacks, or one the
    manifest does not name, is an error (the file and its manifest disagree)."""
    used: set[str] = set()

    def taken(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"{INCREMENT} lacks {name!r}, which the manifest lists")
        used.add(name)
        return tensors[name]

    steps = []
    for b, m in enumerate(meta):
        flipped = set(m.get("stored_transposed", []))

        def take(name: str, flipped: set[str] = flipped) -> torch.Tensor:
            t = taken(name)
            return t.T if name in flipped else t

        factors = {name: LowRankUpdate(tuple((take(f"{b}/{name}/{i}/left"), take(f"{b}/{name}/{i}/right"))
                                             for i in range(len(w["ranks"]))), bool(w["transposed"]))
                   for name, w in m["weights"].items()}
        keys = {int(layer): take(f"{b}/keys/{layer}") for layer in m["layers"]}
        steps.append(Step(factors, keys, int(m["edited"]), int(m["skipped"])))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{INCREMENT} holds tensors the manifest does not list: {extra[:3]}")
    return steps


__all__ = ["INCREMENT", "Step", "pack", "unpack"]
