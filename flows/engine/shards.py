"""Edit metrics over many facts (retention) scored in shards, here or on a Dask cluster.

The scoring plan (``nas_core.evaluate.scoring.plan_scores``) is made once by the caller; its
batches are cut into shards (:meth:`ScoringPlan.shards`) and each shard is scored where the runner
says. A batch's scores depend only on the batch, so the merged scores are the numbers of one
unsharded pass at the same torch thread count.

On a Dask worker a shard scores on the worker's own copy of the base model with the caller's
edited weights put in (scattered to every worker once per evaluation), after checking that the
copy then hashes to the caller's weights: a shard never scores another model than the caller's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flows.config.runner import RunnerSettings, ScoringParams
from flows.engine.workers import BaseIdent, dask_client, load_ident, unit_threads
from nas_core.deltas import weights_hash
from nas_core.evaluate.counterfact import Scorer, score_here
from nas_core.evaluate.scoring import (
    PartialScores,
    ScoringBatch,
    ScoringPlan,
    TargetScores,
    merge_scores,
    score_batches,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditedWeights:
    """The caller's edited weights (name -> CPU tensor) and the hash of its whole model with them."""

    tensors: dict[str, torch.Tensor]
    weights_hash: str


@dataclass(frozen=True)
class ShardedScorer:
    """A :data:`nas_core.evaluate.counterfact.Scorer` that scores a plan in ``shards`` shards.

    Attributes:
        shards: how many shards the plan's batches are cut into.
        runner: where they run (sequential: on the caller's model, one after another).
        ident: the base model the caller's model was edited from (needed by the dask runner).
        weight_names: the weights the caller's model has edited (sent to the workers).
    """

    shards: int
    runner: RunnerSettings
    ident: BaseIdent | None = None
    weight_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.runner.kind == "dask" and self.ident is None:
            raise ValueError("scoring on the dask runner needs the base model's identity")

    def __call__(self, model: nn.Module, plan: ScoringPlan) -> TargetScores:
        t0 = time.perf_counter()
        parts = plan.shards(self.shards)
        if self.runner.kind == "sequential":
            with unit_threads(self.runner.threads):
                partials = [score_batches(model, plan.pad_id, part) for part in parts]
        else:
            partials = self._on_dask(model, plan, parts)
        log.info("scored %d pairs in %d shards on the %s runner in %.1f s", plan.n_pairs, len(parts),
                 self.runner.kind, time.perf_counter() - t0)
        return merge_scores(plan, partials)

    def _on_dask(self, model: nn.Module, plan: ScoringPlan,
                 parts: Sequence[tuple[ScoringBatch, ...]]) -> list[PartialScores]:
        weights = EditedWeights({n: model.get_parameter(n).detach().cpu().clone() for n in self.weight_names},
                                weights_hash(model))
        with dask_client(self.runner) as client:
            sent = client.scatter(weights, broadcast=True)
            futures = [client.submit(score_shard, self.ident, sent, plan.pad_id, part, self.runner.threads,
                                     pure=False) for part in parts]
            return client.gather(futures)


def scorer_for(scoring: ScoringParams, ident: BaseIdent | None, weight_names: Sequence[str]) -> Scorer:
    """params.yaml's ``scoring`` as a Scorer (one shard here at the process's threads: ``score_here``)."""
    if scoring.shards == 1 and scoring.runner == RunnerSettings():
        return score_here
    return ShardedScorer(scoring.shards, scoring.runner, ident, tuple(weight_names))


class _ScoringCopy:
    """This process's model for scoring shards: the base with the last evaluation's edited weights in.

    Kept apart from the base a study's unit edits in place (a unit waiting on its shards may share
    the process with them); the lock serialises shards of one process.
    """

    def __init__(self, base) -> None:
        self.base = base
        self.originals: dict[str, torch.Tensor] = {}
        self.holds = base.base_hash

    @torch.no_grad()
    def hold(self, weights: EditedWeights) -> nn.Module:
        if self.holds == weights.weights_hash:
            return self.base.model
        model = self.base.model
        for name, original in self.originals.items():
            model.get_parameter(name).copy_(original)
        self.originals = {n: model.get_parameter(n).detach().clone() for n in weights.tensors}
        for name, tensor in weights.tensors.items():
            p = model.get_parameter(name)
            p.copy_(tensor.to(p.device, p.dtype))
        self.holds = weights_hash(model)
        if self.holds != weights.weights_hash:
            raise RuntimeError(f"the base model with the sent weights hashes to {self.holds[:12]}, "
                               f"the caller's model to {weights.weights_hash[:12]}: other base weights")
        return model


_COPIES: dict[BaseIdent, _ScoringCopy] = {}
_LOCK = threading.Lock()


def score_shard(ident: BaseIdent, weights: EditedWeights, pad_id: int, batches: tuple[ScoringBatch, ...],
                threads: int | None) -> PartialScores:
    """One shard on this process's scoring copy of ``ident`` holding ``weights`` (a Dask task)."""
    with _LOCK, unit_threads(threads):
        copy = _COPIES.get(ident)
        if copy is None:
            copy = _COPIES[ident] = _ScoringCopy(load_ident(ident))
        return score_batches(copy.hold(weights), pad_id, batches)
