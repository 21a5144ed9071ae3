"""CounterFact edit metrics with MEMIT's definitions, plus EasyEdit-style token accuracy.

For each request the model is scored teacher-forced (``scoring.target_scores``) on

* the edit prompt: does ``target_new`` beat ``target_true``? (efficacy)
* each paraphrase prompt: same comparison (generalisation)
* each neighbourhood prompt: does the neighbour's own answer still beat ``target_new``?
  (specificity)

"Beat" compares the mean token probability ``p = exp(-mean NLL)`` of the whole target, as
in MEMIT's evaluation code. *Success* is the share of prompts won, *magnitude* the mean
probability difference (winner's side minus loser's side, so both grow when the edit is
good). Both are averaged over a request's prompts first, then over requests (MEMIT's
macro average), and reported in percent. The editing score is the harmonic mean of the
three successes. All prompts of all requests are scored in one batched plan
(``scoring.plan_scores``), here or, by a ``scorer``, in shards elsewhere with the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nas_core.evaluate.scoring import ScoringPlan, TargetScores, merge_scores, plan_scores, score_batches
from nas_core.requests import EditRequest


@dataclass(frozen=True)
class EditMetrics:
    """Edit metrics over ``n_requests`` requests, in percent (None: no prompt of that kind).

    Attributes:
        efficacy_success: share of edit prompts where p(target_new) > p(target_true).
        efficacy_magnitude: mean p(target_new) - p(target_true) on the edit prompts.
        generalisation_success / generalisation_magnitude: the same on paraphrase prompts.
        specificity_success: share of neighbourhood prompts where p(neighbour's answer) >
            p(target_new) (the edit did not leak).
        specificity_magnitude: mean p(neighbour's answer) - p(target_new).
        editing_score: harmonic mean of the (available) three successes.
        efficacy_token_accuracy: mean teacher-forced top-1 accuracy over target_new's tokens
            on the edit prompt (EasyEdit's "rewrite accuracy", zsRE's metric).
        generalisation_token_accuracy: the same on paraphrases.
        specificity_token_accuracy: top-1 accuracy over the neighbour answers' tokens.
    """

    n_requests: int
    efficacy_success: float | None
    efficacy_magnitude: float | None
    generalisation_success: float | None
    generalisation_magnitude: float | None
    specificity_success: float | None
    specificity_magnitude: float | None
    editing_score: float | None
    efficacy_token_accuracy: float | None
    generalisation_token_accuracy: float | None
    specificity_token_accuracy: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass(frozen=True)
class FactScore:
    """One request on its edit prompt: p(target_new), p(target_true) (mean token probability) and
    whether the new target wins (efficacy for this fact)."""

    p_new: float
    p_true: float

    @property
    def passed(self) -> bool:
        return self.p_new > self.p_true


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of the values that are not None; 0 if any is 0; None if none given."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if any(v <= 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


def _macro(per_request: list[list[float]]) -> float | None:
    """Mean over requests of each request's mean (requests without prompts are left out), x100."""
    means = [sum(v) / len(v) for v in per_request if v]
    return 100.0 * sum(means) / len(means) if means else None


#: Scores every batch of a plan on a model: :func:`score_here`, or shards on other processes.
Scorer = Callable[[nn.Module, ScoringPlan], TargetScores]


def score_here(model: nn.Module, plan: ScoringPlan) -> TargetScores:
    """Every batch of ``plan`` on ``model``, in this process."""
    return merge_scores(plan, [score_batches(model, plan.pad_id, plan.batches)])


@torch.no_grad()
def edit_metrics(model: nn.Module, tok, requests: Sequence[EditRequest], batch_size: int = 64,
                 batch_tokens: int = 4096, scorer: Scorer = score_here) -> EditMetrics:
    """CounterFact metrics of ``model`` on ``requests`` (see the module docstring)."""
    return edit_metrics_and_facts(model, tok, requests, batch_size, batch_tokens, scorer)[0]


def edit_metrics_and_facts(model: nn.Module, tok, requests: Sequence[EditRequest], batch_size: int = 64,
                           batch_tokens: int = 4096,
                           scorer: Scorer = score_here) -> tuple[EditMetrics, list[FactScore]]:
    """:func:`edit_metrics` and each request's :class:`FactScore` on its edit prompt, from one scoring plan."""
    prompts: list[str] = []
    targets: list[str] = []
    # (request index, kind, index of the "good" row, index of the "bad" row)
    pairs: list[tuple[int, str, int, int]] = []

    def add(prompt: str, good: str, bad: str) -> tuple[int, int]:
        prompts.extend([prompt, prompt])
        targets.extend([good, bad])
        return len(prompts) - 2, len(prompts) - 1

    for i, r in enumerate(requests):
        pairs.append((i, "efficacy", *add(r.filled_prompt, r.target_new, r.target_true)))
        for p in r.paraphrase_prompts:
            pairs.append((i, "generalisation", *add(p, r.target_new, r.target_true)))
        for nb in r.neighbourhood_prompts:
            pairs.append((i, "specificity", *add(nb.prompt, nb.target, r.target_new)))
    if not prompts:
        return EditMetrics(0, *([None] * 10)), []
    scores = scorer(model, plan_scores(tok, prompts, targets, batch_size, batch_tokens))
    prob = torch.exp(-scores.nll.double())

    kinds = ("efficacy", "generalisation", "specificity")
    success = {k: [[] for _ in requests] for k in kinds}
    magnitude = {k: [[] for _ in requests] for k in kinds}
    accuracy = {k: [[] for _ in requests] for k in kinds}
    for i, kind, good, bad in pairs:
        success[kind][i].append(float(prob[good] > prob[bad]))
        magnitude[kind][i].append(float(prob[good] - prob[bad]))
        accuracy[kind][i].append(float(scores.token_accuracy[good]))
    s = {k: _macro(success[k]) for k in kinds}
    facts = [FactScore(float(prob[good]), float(prob[bad])) for _, kind, good, bad in pairs if kind == "efficacy"]
    return EditMetrics(
        n_requests=len(requests),
        efficacy_success=s["efficacy"],
        efficacy_magnitude=_macro(magnitude["efficacy"]),
        generalisation_success=s["generalisation"],
        generalisation_magnitude=_macro(magnitude["generalisation"]),
        specificity_success=s["specificity"],
        specificity_magnitude=_macro(magnitude["specificity"]),
        editing_score=harmonic_mean([s[k] for k in kinds]),
        efficacy_token_accuracy=_macro(accuracy["efficacy"]),
        generalisation_token_accuracy=_macro(accuracy["generalisation"]),
        specificity_token_accuracy=_macro(accuracy["specificity"]),
    ), facts

