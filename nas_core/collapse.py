"""Norm tracking and the collapse verdict.

``verdict`` is a pure function from the metrics of an edited model (and its base model's)
to a pass/fail with every check it made; each threshold is a field of
``CollapseSettings``. The refresh flow gates promotion on it and the horizon study uses
it to find each method's collapse point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nas_core.editors import METHODS


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class CollapseSettings:
    """Thresholds of the collapse verdict.

    Attributes:
        min_editing_score: the editing score (harmonic mean of efficacy, generalisation and
            specificity success, percent) over *every* edit applied so far must stay at or
            above this (DESIGN.md section 6: 60).
        max_perplexity_ratio: canary perplexity of the edited model over the base model's
            must stay at or below this (2: "perplexity more than doubles").
        max_general_drop: the mean general-task accuracy may fall at most this many
            percentage points below the base model's.
        max_norm_ratio: no edited weight's ||W_t||_F / ||W_0||_F may exceed this.
        norm_ratio_by_method: the norm bound of a method label (``alphaedit+nas``: method,
            ``+nas`` when NAS is on) where the horizon study measured its own;
            :meth:`for_method` picks it, ``max_norm_ratio`` serves every other method.

    Derived from the long horizon study on SmolLM2-135M (docs/horizon.md,
    ``scripts/gate_from_horizon.py``; batch 10, 3,000-edit CounterFact stream). The canary
    perplexity crossed 2x (CP@60) at a norm ratio of 1.473 for MEMIT (after about 1,300
    edits) and 1.470 for MEMIT+NAS (about 2,000): the damage follows the norm ratio, whatever
    slowed its growth. ``max_norm_ratio`` 1.45 therefore refuses a night 0.02 of norm ratio
    before that point: 60-80 edits at the measured growth rates, several nights of margin.
    AlphaEdit+NAS tolerates more norm: its perplexity crossed 2x at a norm ratio of 1.621
    (1,500 edits; 1.45 at about 900, while it was healthy), plain AlphaEdit at 1.713 (also
    1,500 edits), so their bounds are 1.60 and 1.69 (params.yaml ``norm_ratio_by_method``),
    the same 0.02 margin.
    It does not hold for MEMIT without its key cache (``memit-plain``, a baseline, not a night
    method): its later edits overwrite earlier ones, and perplexity doubled at a norm ratio of
    1.19 after 600 edits, so there the perplexity check, not the norm bound, catches it.
    The editing score did not separate healthy from collapsed points (73.6-83.6 healthy,
    73.7-74.6 collapsed): it falls late, after fluency, so 60 (the literature's CP@60) stays
    as the last-resort floor. The general-task drop of a measurement with 10 items per task
    had a standard deviation of 6.7 points over healthy points, so a 10-point bound needs
    about 40 items per task to sit 3 standard deviations above the noise (the nights use
    ``eval.general_items``).
    """

    min_editing_score: float = 60.0
    max_perplexity_ratio: float = 2.0
    max_general_drop: float = 10.0
    max_norm_ratio: float = 1.45
    norm_ratio_by_method: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(0 <= self.min_editing_score <= 100, "collapse.min_editing_score must be in [0, 100]")
        _check(self.max_perplexity_ratio >= 1, "collapse.max_perplexity_ratio must be >= 1")
        _check(0 <= self.max_general_drop <= 100, "collapse.max_general_drop must be in [0, 100]")
        _check(self.max_norm_ratio >= 1, "collapse.max_norm_ratio must be >= 1")
        for label, bound in self.norm_ratio_by_method.items():
            _check(label.removesuffix("+nas") in METHODS,
                   f"collapse.norm_ratio_by_method: {label!r} is not a method label ({', '.join(METHODS)}, +nas)")
            _check(bound >= 1, f"collapse.norm_ratio_by_method.{label} must be >= 1")

    def for_method(self, label: str) -> CollapseSettings:
        """These thresholds with the norm bound of method ``label`` (e.g. ``alphaedit+nas``)."""
        bound = self.norm_ratio_by_method.get(label, self.max_norm_ratio)
        return dataclasses.replace(self, max_norm_ratio=bound)


@dataclass(frozen=True)
class HealthSnapshot:
    """What the verdict looks at; None means "not measured" and skips that check.

    Attributes:
        editing_score: editing score over all edits so far (percent).
        perplexity / base_perplexity: canary perplexity of the edited and the base model.
        general_mean / base_general_mean: mean general-task accuracy (percent).
        norm_ratios: ||W_t||_F / ||W_0||_F per edited weight name.
    """

    editing_score: float | None = None
    perplexity: float | None = None
    base_perplexity: float | None = None
    general_mean: float | None = None
    base_general_mean: float | None = None
    norm_ratios: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Check:
    """One check of the verdict: its value, the limit, and whether it passed."""

    name: str
    value: float
    limit: float
    passed: bool
    message: str


@dataclass(frozen=True)
class Verdict:
    """The verdict: ``collapsed`` if any check failed; ``checks`` lists all that ran."""

    checks: tuple[Check, ...]

    @property
    def collapsed(self) -> bool:
        return any(not c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def summary(self) -> str:
        if not self.collapsed:
            return f"healthy ({len(self.checks)} checks passed)"
        return "collapse: " + "; ".join(c.message for c in self.failed)


def _bad(x: float) -> bool:
    # NaN or inf is what a collapsed model produces; it must fail, never compare as "fine".
    return not math.isfinite(x)


def verdict(snapshot: HealthSnapshot, settings: CollapseSettings = CollapseSettings()) -> Verdict:
    """Apply every threshold of ``settings`` to ``snapshot`` (unmeasured checks are skipped)."""
    checks: list[Check] = []
    s = snapshot
    if s.editing_score is not None:
        ok = not _bad(s.editing_score) and s.editing_score >= settings.min_editing_score
        checks.append(Check("editing_score", s.editing_score, settings.min_editing_score, ok,
                            f"editing score {s.editing_score:.1f} < {settings.min_editing_score:g}"))
    if s.perplexity is not None and s.base_perplexity is not None:
        ratio = s.perplexity / s.base_perplexity
        ok = not _bad(ratio) and ratio <= settings.max_perplexity_ratio
        checks.append(Check("perplexity_ratio", ratio, settings.max_perplexity_ratio, ok,
                            f"canary perplexity {ratio:.2f}x the base > {settings.max_perplexity_ratio:g}x"))
    if s.general_mean is not None and s.base_general_mean is not None:
        drop = s.base_general_mean - s.general_mean
        ok = not _bad(drop) and drop <= settings.max_general_drop
        checks.append(Check("general_drop", drop, settings.max_general_drop, ok,
                            f"general tasks {drop:.1f} points below the base > {settings.max_general_drop:g}"))
    if s.norm_ratios:
        name, worst = max(s.norm_ratios.items(), key=lambda kv: (_bad(kv[1]), kv[1]))
        ok = not _bad(worst) and worst <= settings.max_norm_ratio
        checks.append(Check("norm_ratio", worst, settings.max_norm_ratio, ok,
                            f"||W||/||W0|| of {name} is {worst:.3f} > {settings.max_norm_ratio:g}"))
    return Verdict(tuple(checks))


def norm_ratios(current: Mapping[str, float], original: Mapping[str, float]) -> dict[str, float]:
    """||W_t||_F / ||W_0||_F per weight name (names missing from ``original`` are errors)."""
    return {name: current[name] / original[name] for name in current}


def norm_growth_per_edit(ratios: Mapping[str, float], edits: int) -> float:
    """Largest (ratio - 1) per edit so far: how fast the worst weight norm grows (0 before any edit)."""
    if edits <= 0 or not ratios:
        return 0.0
    return max(r - 1.0 for r in ratios.values()) / edits


@dataclass(frozen=True)
class Forecast:
    """How many more edits a lineage takes before its worst norm ratio crosses ``bound``.

    Attributes:
        bound: the norm-ratio bound (``collapse.max_norm_ratio``).
        edits: edits so far (the last point of the history).
        linear: further edits by a line through (0, 1) fitted to the history; None when the
            norm is not growing.
        exponential: further edits by an exponential fitted to the excess ratio - 1 (at least
            three points with a growing excess); None when it cannot be fitted.
    """

    bound: float
    edits: int
    linear: float | None
    exponential: float | None

    @property
    def worst(self) -> float | None:
        """The smaller of the two (the one a gate should believe)."""
        known = [x for x in (self.linear, self.exponential) if x is not None]
        return min(known) if known else None


def forecast(history: Sequence[tuple[int, float]], bound: float) -> Forecast:
    """Forecast from ``(edits, max norm ratio)`` points, oldest first (see :class:`Forecast`)."""
    pts = [(float(x), y - 1.0) for x, y in history if x > 0]
    edits = int(max((x for x, _ in history), default=0))
    excess_bound = bound - 1.0
    linear = exponential = None
    if pts:
        slope = sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)
        if slope > 0:
            linear = max(excess_bound / slope - edits, 0.0)
    growing = [(x, y) for x, y in pts if y > 0]
    if len(growing) >= 3 and excess_bound > 0:
        mx = sum(x for x, _ in growing) / len(growing)
        my = sum(math.log(y) for _, y in growing) / len(growing)
        sxx = sum((x - mx) ** 2 for x, _ in growing)
        if sxx > 0:
            rate = sum((x - mx) * (math.log(y) - my) for x, y in growing) / sxx
            if rate > 0:
                exponential = max((math.log(excess_bound) - (my - rate * mx)) / rate - edits, 0.0)
    return Forecast(bound, edits, linear, exponential)
