"""params.yaml ``validation``: the night's thresholds for a fact batch (:mod:`flows.facts.validate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nas_core.formats import MAX_TEXT_CHARS, SchemaPolicy

CONFLICT_POLICIES = ("reject", "supersede")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ValidationSettings:
    """Thresholds of :func:`validate_batch`.

    Attributes:
        min_records: a batch with fewer records fails (GX row-count expectation). 0 lets an
            empty batch pass.
        max_records: a batch with more records fails (one night's edits are bounded).
        max_prompt_chars: longest prompt template, in characters after stripping.
        max_subject_chars: longest subject.
        max_target_chars: longest ``target_new`` / ``target_true``.
        max_target_tokens: most tokens a target may take (with its leading space, as the
            editors tokenise it): each target token is one more optimisation target.
        conflict_policy: ``"reject"``: a record that changes a fact an earlier batch wrote
            fails with ``ledger_conflict``; ``"supersede"``: it is accepted and the ledger
            fact is listed in :attr:`BatchValidation.superseded`.
        max_file_bytes: a larger file is not read at all (``file_too_large``); 16 MiB is
            far beyond ``max_records`` records of ``MAX_TEXT_CHARS`` texts. The size is
            taken while the file is read in chunks, so a larger file is never held.
        max_paraphrases, max_neighbourhood_prompts, max_generation_prompts: evaluation-only
            lists are cut to this many items with a warning (``list_too_long``); each item
            costs evaluation time that night and every later night (retention).
        fold_confusables: fact identity and the target comparison map Cyrillic/Greek
            look-alike letters to Latin (``nas_core.text.fold``).
        max_problems_per_rule: reports list at most this many problems of one rule, then
            the count of the rest (a batch of 50,000 bad records stays a readable report).
    """

    min_records: int = 1
    max_records: int = 1000
    max_prompt_chars: int = 300
    max_subject_chars: int = 200
    max_target_chars: int = 100
    max_target_tokens: int = 16
    conflict_policy: str = "reject"
    max_file_bytes: int = 16 * 2**20
    max_paraphrases: int = 20
    max_neighbourhood_prompts: int = 20
    max_generation_prompts: int = 10
    fold_confusables: bool = True
    max_problems_per_rule: int = 50

    def __post_init__(self) -> None:
        self.schema_policy()  # checks the list bounds
        for name in (
            "max_problems_per_rule",
            "min_records",
            "max_records",
            "max_prompt_chars",
            "max_subject_chars",
            "max_target_chars",
            "max_target_tokens",
            "max_file_bytes",
        ):
            _check(_is_int(getattr(self, name)), f"validation.{name} must be an integer")
        _check(self.min_records >= 0, "validation.min_records must be >= 0")
        _check(
            self.max_records >= max(1, self.min_records),
            "validation.max_records must be >= 1 and >= min_records",
        )
        for name in ("max_prompt_chars", "max_subject_chars", "max_target_chars"):
            # The parser already rejects longer texts, so a larger bound would only mislead.
            _check(
                1 <= getattr(self, name) <= MAX_TEXT_CHARS,
                f"validation.{name} must be between 1 and {MAX_TEXT_CHARS}",
            )
        _check(self.max_target_tokens >= 1, "validation.max_target_tokens must be >= 1")
        _check(
            self.conflict_policy in CONFLICT_POLICIES,
            f"validation.conflict_policy must be one of {CONFLICT_POLICIES}, got {self.conflict_policy!r}",
        )
        _check(self.max_file_bytes >= 1, "validation.max_file_bytes must be >= 1")
        _check(self.max_problems_per_rule >= 1, "validation.max_problems_per_rule must be >= 1")

    def schema_policy(self) -> SchemaPolicy:
        """The parser's part of these settings."""
        return SchemaPolicy(self.max_paraphrases, self.max_neighbourhood_prompts, self.max_generation_prompts,
                            self.fold_confusables)
