"""The promotion gate: the collapse verdict's checks plus params.yaml's promotion thresholds (pure)."""

from __future__ import annotations

from typing import Any

from flows.config.params import Params
from nas_core.collapse import Check, Verdict


def gate(batch: dict[str, Any], retention: dict[str, Any], collapse_checks: tuple[Check, ...], skipped_fraction: float,
         params: Params) -> tuple[Check, ...]:
    """The collapse verdict's checks plus the promotion thresholds; the batch passes if all pass."""
    p = params.promotion
    checks = list(collapse_checks)

    def at_least(name: str, value: float | None, limit: float, what: str) -> None:
        if value is not None:
            checks.append(Check(name, value, limit, value >= limit, f"{what} {value:.1f} < {limit:g}"))

    at_least("batch_efficacy", batch.get("efficacy_success"), p.min_batch_efficacy, "new batch efficacy")
    at_least("batch_generalisation", batch.get("generalisation_success"), p.min_batch_generalisation,
             "new batch generalisation")
    at_least("batch_specificity", batch.get("specificity_success"), p.min_batch_specificity, "new batch specificity")
    at_least("retention_efficacy", retention.get("efficacy_success"), p.min_retention_efficacy,
             "efficacy over all accepted edits")
    growth = retention.get("norm_growth_per_edit")
    if growth is not None:
        checks.append(Check("norm_growth_per_edit", growth, p.max_norm_growth_per_edit,
                            growth <= p.max_norm_growth_per_edit,
                            f"norm growth {growth:.4f}/edit > {p.max_norm_growth_per_edit:g}"))
    checks.append(Check("skipped_fraction", skipped_fraction, p.max_skipped_fraction,
                        skipped_fraction <= p.max_skipped_fraction,
                        f"NAS skipped {skipped_fraction:.0%} of the batch > {p.max_skipped_fraction:.0%}"))
    return tuple(checks)


def verdict_of(checks: tuple[Check, ...]) -> Verdict:
    return Verdict(tuple(checks))


def flat_metrics(batch: dict[str, Any], retention: dict[str, Any],
                 diagnostics: list[dict[str, Any]]) -> dict[str, float]:
    """The numbers a night logs and records: ``batch.*``, ``retention.*`` and the v* norms of its requests."""
    flat: dict[str, float] = {}
    for prefix, values in (("batch", batch), ("retention", retention)):
        for k, v in values.items():
            if isinstance(v, int | float) and v is not None:
                flat[f"{prefix}.{k}"] = float(v)
    before = [d["v_norm_before"] for d in diagnostics]
    after = [d["v_norm_after"] for d in diagnostics if not d["skipped"]]
    flat["v_norm_before_mean"] = sum(before) / len(before) if before else 0.0
    flat["v_norm_before_max"] = max(before, default=0.0)
    flat["v_norm_after_mean"] = sum(after) / len(after) if after else 0.0
    flat["skipped"] = float(sum(d["skipped"] for d in diagnostics))
    return flat
