"""What a reviewer reads in the MLflow UI for one night: the batch as a dataset input, a table
with one row per fact, and a one-sentence description of the verdict.

Builders only (columns and sentences from the night's results); :class:`flows.tracking.tracker.Tracker`
stores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nas_core.evaluate.counterfact import FactScore
from nas_core.requests import EditRequest

FACTS_TABLE = "facts.json"


def batch_columns(requests: Sequence[EditRequest]) -> dict[str, list[Any]]:
    """The batch's records as the dataset input's columns."""
    return {"case_id": [r.case_id for r in requests], "subject": [r.subject for r in requests],
            "prompt": [r.filled_prompt for r in requests], "target_true": [r.target_true for r in requests],
            "target_new": [r.target_new for r in requests]}


def fact_table(requests: Sequence[EditRequest], before: Sequence[str], after: Sequence[str],
               scores: Sequence[FactScore], skipped: Sequence[str], failed_checks: Sequence[str]) -> dict[str, list]:
    """One row per fact: the record, the greedy answer before and after, p(new) and p(true) after,
    whether it passed on its prompt, NAS's skip, and the night's failed checks (a rejected night)."""
    n = len(requests)
    skip = set(skipped)
    failed = ", ".join(failed_checks)
    return {**batch_columns(requests),
            "answer_before": list(before) or [""] * n, "answer_after": list(after) or [""] * n,
            "p_new_after": [round(s.p_new, 4) for s in scores], "p_true_after": [round(s.p_true, 4) for s in scores],
            "passed": [s.passed and r.case_id not in skip for r, s in zip(requests, scores, strict=True)],
            "skipped_by_nas": [r.case_id in skip for r in requests],
            "night_failed_checks": [failed] * n}


def promoted_sentence(batch_id: str, version: str, metrics: dict[str, Any], norm_ratio: float) -> str:
    """From the gate's flat metrics: the new batch's efficacy and the retention over every edit."""
    n = int(metrics.get("batch.n_requests") or 0)
    won = round((metrics.get("batch.efficacy_success") or 0.0) * n / 100)
    return (f"{batch_id} was promoted as {version}: {won} of {n} new facts win on their prompt; over every edit "
            f"the champion holds the editing score is {metrics.get('retention.editing_score', float('nan')):.1f}, "
            f"canary perplexity x{metrics.get('retention.perplexity_ratio', float('nan')):.3f} of the base model, "
            f"largest norm ratio {norm_ratio:.4f}.")


def rejected_sentence(batch_id: str, champion: str | None, failed: Sequence[str]) -> str:
    return (f"{batch_id} was rejected by the gate ({', '.join(failed)}): nothing was promoted and the champion "
            f"stays {champion or 'the base model'}; the batch is in quarantine.")


def quarantined_sentence(batch_id: str, problems: str) -> str:
    return f"{batch_id} was quarantined at validation ({problems}): nothing was edited; see validation.html."
