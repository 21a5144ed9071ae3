"""What a conversion reports: rule names, severities, problems, the report, the schema policy.

Every converter of :mod:`nas_core.formats` returns a :class:`ConversionReport`: the requests
that converted and one :class:`RecordProblem` per thing wrong with the records that did not.
Rule names are short and stable; :data:`RULES` lists them, :data:`RULE_SEVERITY` says what
each one does, and ``docs/FACT_SCHEMA.md`` explains them to users.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from nas_core.requests import EditRequest

# --------------------------------------------------------------------------------------
# Limits and rules
# --------------------------------------------------------------------------------------

#: Longest string (in characters, before stripping) the fact-batch schema accepts in any
#: field. Real facts are far shorter (CounterFact's longest prompt has 182 characters);
#: the bound keeps a malformed or hostile batch from reaching the tokenizer.
MAX_TEXT_CHARS = 1000

#: Every rule name a converter can report, with its meaning.
RULES: Mapping[str, str] = MappingProxyType(
    {
        "malformed_json": "a JSONL line is not valid JSON",
        "wrong_type": "a record is not an object, or a field has the wrong type",
        "missing_field": "a required field is absent",
        "unknown_field": "a field the fact-batch schema does not define",
        "duplicate_field": "the same key appears twice in one JSON object",
        "empty_field": "a text is empty, only whitespace or has no visible character",
        "text_too_long": f"a text is longer than MAX_TEXT_CHARS ({MAX_TEXT_CHARS}) characters",
        "control_character": "a text contains a control character (newline, tab, NUL, ...)",
        "invalid_case_id": "case_id does not match [A-Za-z0-9._-]{1,64}",
        "template_placeholder_count": "the prompt template does not contain exactly one {}",
        "subject_not_in_prompt": "a paraphrase prompt does not mention the subject",
        "subject_not_found": "the subject cannot be located in a filled prompt",
        "target_equals_true": "target_new equals target_true after Unicode normalisation (nas_core.text.fold)",
        "duplicate_case_id": "the case_id was already used by an earlier record of the batch",
        "template_stray_brace": "the prompt template has a brace besides its one {} ({{}}, {subject}, ...)",
        "eval_text_dropped": "an evaluation-only text (paraphrase, neighbourhood, generation prompt) is empty, "
        "invisible or too long: it is left out of the evaluation, the fact is kept",
        "eval_text_control_character": "an evaluation-only text contains a control character (a newline, ...): "
        "kept and evaluated as written",
        "list_too_long": "an evaluation-only list is longer than its bound (SchemaPolicy): only the first items "
        "are evaluated",
    }
)

#: What a problem does. ``record``: the record cannot be edited correctly and is refused
#: (the night holds batches all-or-nothing, so its batch goes to quarantine naming the
#: record); ``batch``: the file as a whole is refused; ``warn``: reported, the record is
#: kept. Texts that only evaluate an edit (paraphrases, neighbourhood and generation
#: prompts) never refuse a fact: a user would lose the whole fact for a weaker evaluation.
SEVERITIES = ("record", "batch", "warn")

#: The severity of every rule of :data:`RULES`.
RULE_SEVERITY: Mapping[str, str] = MappingProxyType(
    {
        rule: "warn" if rule in {"subject_not_in_prompt", "eval_text_dropped", "eval_text_control_character",
                                 "list_too_long"} else "record"
        for rule in RULES
    }
)


@dataclass(frozen=True)
class SchemaPolicy:
    """Bounds and comparison policy of the fact-batch schema (``validation`` in params.yaml).

    Attributes:
        max_paraphrases: paraphrase prompts evaluated per fact; more are reported
            (``list_too_long``) and left out: each one costs evaluation time that night and
            every later night (retention).
        max_neighbourhood_prompts: neighbourhood prompts evaluated per fact, likewise.
        max_generation_prompts: generation prompts kept per fact, likewise.
        fold_confusables: compare texts with Cyrillic/Greek look-alike letters mapped to
            Latin (``nas_core.text.fold``), so "Pаris" (Cyrillic а) equals "Paris".
    """

    max_paraphrases: int = 20
    max_neighbourhood_prompts: int = 20
    max_generation_prompts: int = 10
    fold_confusables: bool = True

    def __post_init__(self) -> None:
        for name in ("max_paraphrases", "max_neighbourhood_prompts", "max_generation_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"validation.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.fold_confusables, bool):
            raise ValueError(f"validation.fold_confusables must be true or false, got {self.fold_confusables!r}")


# --------------------------------------------------------------------------------------
# Report types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordProblem:
    """One thing wrong with one input record.

    Attributes:
        position: 0-based index of the record in the input list (line index for JSONL).
        case_id: the record's case id where it could be read, else ``None``.
        rule: a stable rule name from :data:`RULES`.
        message: a human-readable explanation.
        field: the offending field as a path (``"neighbourhood_prompts[1].target"``), or
            ``""`` when the problem concerns the whole record.
        severity: one of :data:`SEVERITIES` (``"record"`` unless the rule says otherwise).
    """

    position: int
    case_id: str | None
    rule: str
    message: str
    field: str = ""
    severity: str = "record"

    def __str__(self) -> str:
        where = f"#{self.position}" + (f" (case {self.case_id!r})" if self.case_id else "")
        return f"{where}: [{self.rule}] {self.message}"


class RequestError(ValueError):
    """Records could not be converted into edit requests.

    ``problems`` holds the individual :class:`RecordProblem` objects (may be empty when the
    input as a whole is unusable, e.g. not a list).
    """

    def __init__(self, message: str, problems: Sequence[RecordProblem] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[RecordProblem, ...] = tuple(problems)


@dataclass(frozen=True)
class ConversionReport:
    """The outcome of converting a batch of records.

    Attributes:
        requests: the requests of every record that converted, in input order.
        problems: every problem that refused a record, ordered by position.
        warnings: problems of severity ``"warn"`` (the record was kept), ordered by position.
        total: number of input records (non-blank lines for JSONL); ``None`` means
            ``len(requests)`` plus the number of failed records.
    """

    requests: tuple[EditRequest, ...]
    problems: tuple[RecordProblem, ...] = ()
    total: int | None = None
    warnings: tuple[RecordProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every record converted."""
        return not self.problems

    @property
    def failed_positions(self) -> tuple[int, ...]:
        """Positions of the records that failed, each once, ascending."""
        return tuple(sorted({p.position for p in self.problems}))

    @property
    def n_failed(self) -> int:
        """Number of records that failed (a record with several problems counts once)."""
        return len(self.failed_positions)

    @property
    def n_total(self) -> int:
        """Number of input records."""
        return self.total if self.total is not None else len(self.requests) + self.n_failed

    def problems_by_rule(self) -> dict[str, tuple[RecordProblem, ...]]:
        """Problems grouped by rule, the most frequent rule first (ties by name)."""
        groups: dict[str, list[RecordProblem]] = {}
        for problem in self.problems:
            groups.setdefault(problem.rule, []).append(problem)
        order = sorted(groups, key=lambda rule: (-len(groups[rule]), rule))
        return {rule: tuple(groups[rule]) for rule in order}

    def summary(self, max_examples: int = 3) -> str:
        """A readable multi-line account: counts, then each rule with a few examples."""
        head = f"{len(self.requests)} of {self.n_total} records converted, {self.n_failed} failed"
        if not self.problems:
            return head
        lines = [f"{head} ({len(self.problems)} problems)"]
        for rule, problems in self.problems_by_rule().items():
            records = len({p.position for p in problems})
            lines.append(f"  {rule}: {len(problems)} problems in {records} records")
            lines.extend(f"    {p}" for p in problems[:max_examples])
            if len(problems) > max_examples:
                lines.append(f"    ... and {len(problems) - max_examples} more")
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """Raise :class:`RequestError` carrying the summary when any record failed."""
        if self.problems:
            raise RequestError(self.summary(), self.problems)
