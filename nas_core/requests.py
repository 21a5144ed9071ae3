"""Edit requests: the one record type every editor and evaluator consumes.

Converters from CounterFact (ROME and EasyEdit layouts), zsRE (MEND layout) and the
project's own JSONL fact-batch schema live here too. They are pure: they take already
parsed Python objects (dicts, lists) or decoded text, never paths.

Every converter returns a :class:`ConversionReport`: the requests that converted and one
:class:`RecordProblem` per thing wrong with the records that did not. All bad records are
reported, not just the first; a record with any problem yields no request. Problem
``position`` is the record's 0-based index in the input list (the 0-based line index for
:func:`parse_fact_jsonl`). Rule names are short and stable; :data:`RULES` lists them and
``docs/FACT_SCHEMA.md`` explains them to users.

Normalisation shared by all converters: every text is stripped of surrounding whitespace
(targets are stored without a leading space; the tokenisation code adds it), case ids
become strings. The benchmark converters accept newlines inside prompts (CounterFact
paraphrases contain them); the fact-batch schema, written by people, does not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from nas_core.text import fold, has_visible


@dataclass(frozen=True)
class NeighbourhoodPrompt:
    """A prompt about a *different* subject whose answer must not change.

    ``target`` is the answer the unedited model should keep preferring (CounterFact
    scores it against the edit's ``target_new``).
    """

    prompt: str
    target: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    ``prompt`` is a template with exactly one ``{}`` where the subject goes, e.g.
    ``"{} is located in"``; ``target_new`` is the answer to write, ``target_true`` the
    answer the model gives today. Targets are stored without a leading space; the
    tokenisation code adds the space that separates them from the prompt.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    relation_id: str = ""
    paraphrase_prompts: tuple[str, ...] = ()
    neighbourhood_prompts: tuple[NeighbourhoodPrompt, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject in place."""
        return self.prompt.replace("{}", self.subject)


# --------------------------------------------------------------------------------------
# Limits and rules
# --------------------------------------------------------------------------------------

#: Longest string (in characters, before stripping) the fact-batch schema accepts in any
#: field. Real facts are far shorter (CounterFact's longest prompt has 182 characters);
#: the bound keeps a malformed or hostile batch from reaching the tokenizer.
MAX_TEXT_CHARS = 1000

#: Case ids in the fact-batch schema: 1 to 64 letters, digits, ``.``, ``_`` or ``-``.
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")

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

_FACT_REQUIRED = ("case_id", "prompt", "subject", "target_new", "target_true")
_FACT_OPTIONAL = (
    "relation_id",
    "paraphrase_prompts",
    "neighbourhood_prompts",
    "generation_prompts",
)
_FACT_FIELDS = frozenset(_FACT_REQUIRED + _FACT_OPTIONAL)
_NEIGHBOUR_FIELDS = ("prompt", "target")
_LINE_SEPARATORS = frozenset("\u2028\u2029")


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


# --------------------------------------------------------------------------------------
# Per-record checking machinery (instances live for one record only)
# --------------------------------------------------------------------------------------

_MISSING = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return type(value).__name__


# Bidirectional embeddings/overrides/isolates: "\u202eacirfA" displays as "Africa" but is another text.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _bad_character(text: str) -> tuple[int, str] | None:
    """First control character (Unicode category Cc, a line/paragraph separator, or a bidi control)."""
    for index, char in enumerate(text):
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F or char in _LINE_SEPARATORS or char in _BIDI_CONTROLS:
            return index, char
    return None


class _Checker:
    """Collects the problems of one record; ``strict`` adds the fact-schema text rules."""

    def __init__(self, position: int, strict: bool, policy: SchemaPolicy | None = None) -> None:
        self.position = position
        self.strict = strict
        self.policy = policy or SchemaPolicy()
        self.case_id: str | None = None
        self.problems: list[RecordProblem] = []
        self.warnings: list[RecordProblem] = []

    def add(self, rule: str, field: str, message: str) -> None:
        """Report a problem; its severity comes from :data:`RULE_SEVERITY`."""
        severity = RULE_SEVERITY.get(rule, "record")
        problem = RecordProblem(self.position, self.case_id, rule, message, field, severity)
        (self.warnings if severity == "warn" else self.problems).append(problem)

    def get(self, record: Mapping[str, Any], key: str, path: str, required: bool) -> Any:
        """``record[key]``, or ``_MISSING`` (reported as ``missing_field`` when required)."""
        if key in record:
            return record[key]
        if required:
            self.add("missing_field", path, f"{path} is missing")
        return _MISSING

    def mapping(self, value: Any, path: str) -> Mapping[str, Any] | None:
        if isinstance(value, Mapping):
            return value
        self.add("wrong_type", path, f"{path} must be an object, got {_type_name(value)}")
        return None

    def text(self, value: Any, path: str) -> str | None:
        """A stripped non-empty string, or ``None`` after reporting why not."""
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            self.add("wrong_type", path, f"{path} must be a string, got {_type_name(value)}")
            return None
        if self.strict:
            if len(value) > MAX_TEXT_CHARS:
                self.add(
                    "text_too_long",
                    path,
                    f"{path} has {len(value)} characters (at most {MAX_TEXT_CHARS})",
                )
            bad = _bad_character(value)
            if bad is not None:
                index, char = bad
                self.add(
                    "control_character",
                    path,
                    f"{path} contains control character U+{ord(char):04X} at index {index}",
                )
        stripped = value.strip()
        # Only invisible characters (zero-width joiners, Hangul fillers, a braille blank,
        # combining marks alone...) is as empty as no text at all.
        if not has_visible(stripped):
            self.add("empty_field", path, f"{path} is empty or has no visible character")
            return None
        return stripped

    def eval_text(self, value: Any, path: str) -> str | None:
        """An evaluation-only text: like :meth:`text`, but what would only weaken the
        evaluation is a warning; ``None`` means "leave this item out" (also reported)."""
        if not isinstance(value, str):
            self.add("wrong_type", path, f"{path} must be a string, got {_type_name(value)}")
            return None
        stripped = value.strip()
        if not has_visible(stripped) or (self.strict and len(value) > MAX_TEXT_CHARS):
            why = "is empty or invisible" if not has_visible(stripped) else f"has {len(value)} characters"
            self.add("eval_text_dropped", path, f"{path} {why}: left out of the evaluation")
            return None
        bad = _bad_character(value) if self.strict else None
        if bad is not None:
            self.add("eval_text_control_character", path,
                     f"{path} contains control character U+{ord(bad[1]):04X} at index {bad[0]}: kept as written")
        return stripped

    def bounded(self, items: Sequence[Any], path: str, limit: int | None) -> Sequence[Any]:
        """The first ``limit`` items of an evaluation-only list (``list_too_long`` beyond)."""
        if limit is not None and len(items) > limit:
            self.add("list_too_long", path, f"{path} has {len(items)} items; the first {limit} are evaluated")
            return items[:limit]
        return items

    def sequence(self, value: Any, path: str) -> Sequence[Any] | None:
        """A list (or tuple) value, or ``None``; a missing optional list is empty."""
        if value is _MISSING:
            return ()
        if isinstance(value, (list, tuple)):
            return value
        self.add("wrong_type", path, f"{path} must be a list, got {_type_name(value)}")
        return None

    def texts(self, value: Any, path: str, limit: int | None = None) -> tuple[str, ...] | None:
        """An evaluation-only list of texts: bad items left out with a warning, wrong types refused."""
        items = self.sequence(value, path)
        if items is None:
            return None
        n_refused = len(self.problems)
        out = [self.eval_text(item, f"{path}[{i}]") for i, item in enumerate(self.bounded(items, path, limit))]
        if len(self.problems) > n_refused:
            return None
        return tuple(item for item in out if item is not None)

    def benchmark_case_id(self, record: Mapping[str, Any], key: str = "case_id") -> str | None:
        """A benchmark case id: an int or a non-empty string, returned as a string."""
        value = self.get(record, key, key, required=True)
        if value is _MISSING:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            self.case_id = str(value)
            return self.case_id
        if isinstance(value, str) and value.strip():
            self.case_id = value.strip()
            return self.case_id
        if isinstance(value, str):
            self.add("empty_field", key, f"{key} is empty")
        else:
            self.add(
                "wrong_type", key, f"{key} must be an int or a string, got {_type_name(value)}"
            )
        return None

    def finish(
        self,
        case_id: str | None,
        prompt: str | None,
        subject: str | None,
        target_new: str | None,
        target_true: str | None,
        relation_id: str | None = "",
        paraphrases: tuple[str, ...] | None = (),
        neighbours: tuple[NeighbourhoodPrompt, ...] | None = (),
        generations: tuple[str, ...] | None = (),
        paths: Mapping[str, str] | None = None,
    ) -> EditRequest | None:
        """Run the semantic rules on the parts and build the request if all is well."""
        path = {
            "prompt": "prompt",
            "target_new": "target_new",
            "paraphrase_prompts": "paraphrase_prompts",
            **(paths or {}),
        }
        if prompt is not None and prompt.count("{}") != 1:
            self.add(
                "template_placeholder_count",
                path["prompt"],
                f"{path['prompt']} must contain exactly one '{{}}', found "
                f"{prompt.count('{}')}: {prompt!r}",
            )
        elif prompt is not None and ("{" in prompt.replace("{}", "", 1) or "}" in prompt.replace("{}", "", 1)):
            self.add(
                "template_stray_brace",
                path["prompt"],
                f"{path['prompt']} may hold braces only in its one '{{}}': {prompt!r}",
            )
        confusables = self.policy.fold_confusables
        if (
            target_new is not None
            and target_true is not None
            and fold(target_new, confusables) == fold(target_true, confusables)
        ):
            self.add(
                "target_equals_true",
                path["target_new"],
                f"target_new {target_new!r} equals target_true {target_true!r} (after Unicode normalisation)",
            )
        if subject is not None and paraphrases:
            folded = fold(subject, confusables)
            for i, text in enumerate(paraphrases):
                if folded not in fold(text, confusables):
                    field = f"{path['paraphrase_prompts']}[{i}]"
                    self.add(
                        "subject_not_in_prompt",
                        field,
                        f"{field} does not mention the subject {subject!r}: {text!r}",
                    )
        parts = (case_id, prompt, subject, target_new, target_true, relation_id)
        lists = (paraphrases, neighbours, generations)
        if self.problems or any(p is None for p in parts) or any(v is None for v in lists):
            return None
        return EditRequest(
            case_id=case_id,  # type: ignore[arg-type]
            prompt=prompt,  # type: ignore[arg-type]
            subject=subject,  # type: ignore[arg-type]
            target_new=target_new,  # type: ignore[arg-type]
            target_true=target_true,  # type: ignore[arg-type]
            relation_id=relation_id,  # type: ignore[arg-type]
            paraphrase_prompts=paraphrases,  # type: ignore[arg-type]
            neighbourhood_prompts=neighbours,  # type: ignore[arg-type]
            generation_prompts=generations,  # type: ignore[arg-type]
        )


_RecordFn = Callable[[Mapping[str, Any], _Checker], "EditRequest | None"]


def _convert(
    items: Sequence[tuple[int, Any]],
    convert_one: _RecordFn,
    strict: bool,
    extra_problems: Sequence[RecordProblem] = (),
    total: int | None = None,
    policy: SchemaPolicy | None = None,
) -> ConversionReport:
    """Convert ``(position, record)`` pairs; later records reusing a case id fail."""
    requests: list[EditRequest] = []
    problems: list[RecordProblem] = list(extra_problems)
    warnings: list[RecordProblem] = []
    first_seen: dict[str, int] = {}
    for position, record in items:
        checker = _Checker(position, strict, policy)
        if not isinstance(record, Mapping):
            checker.add("wrong_type", "", f"record must be an object, got {_type_name(record)}")
            problems.extend(checker.problems)
            continue
        request = convert_one(record, checker)
        if checker.case_id is not None:
            if checker.case_id in first_seen:
                checker.add(
                    "duplicate_case_id",
                    "case_id",
                    f"case_id {checker.case_id!r} already used by record "
                    f"#{first_seen[checker.case_id]}",
                )
                request = None
            else:
                first_seen[checker.case_id] = position
        problems.extend(checker.problems)
        warnings.extend(checker.warnings)
        if request is not None and not checker.problems:
            requests.append(request)
    problems.sort(key=lambda p: p.position)
    return ConversionReport(
        requests=tuple(requests),
        problems=tuple(problems),
        total=len(items) + len({p.position for p in extra_problems}) if total is None else total,
        warnings=tuple(warnings),
    )


def _records(records: Any) -> list[tuple[int, Any]]:
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise RequestError(f"expected a list of records, got {_type_name(records)}")
    return list(enumerate(records))


def _locate_subject(filled: str, subject: str) -> tuple[int, int] | None:
    """Span of ``subject`` in ``filled``, or ``None``.

    Preference order: an exact match standing as a whole word (no letter or digit right
    before or after it), then any exact match, then the same two case-insensitively; within
    each, the *first* occurrence. CounterFact and zsRE put the subject early and follow it
    with the relation phrase that predicts the answer (399 of the 500 ROME templates start
    with ``{}``; none repeats the subject), and a later occurrence is far more often part of
    another name ("Norway" in "Denmark-Norway") than the subject again. The whole-word
    preference keeps "Rome" from matching inside "Romeo".
    """
    pattern = re.escape(subject)
    for flags in (0, re.IGNORECASE):
        spans = [m.span() for m in re.finditer(pattern, filled, flags)]
        for start, end in spans:
            before = filled[start - 1] if start > 0 else " "
            after = filled[end] if end < len(filled) else " "
            if not before.isalnum() and not after.isalnum():
                return start, end
        if spans:
            return spans[0]
    return None


def template_from_filled(filled: str, subject: str) -> tuple[str, str] | None:
    """Turn a filled prompt back into ``(template, subject as spelled in the prompt)``.

    The subject is located as described in :func:`_locate_subject`; on a case-insensitive
    match the prompt's own spelling becomes the subject, so ``template.replace("{}",
    subject)`` reproduces ``filled`` exactly. Returns ``None`` when the subject is absent.
    """
    if not subject:
        return None
    span = _locate_subject(filled, subject)
    if span is None:
        return None
    start, end = span
    return filled[:start] + "{}" + filled[end:], filled[start:end]


def _template_or_report(
    checker: _Checker, filled: str | None, subject: str | None, path: str
) -> tuple[str | None, str | None]:
    if filled is None or subject is None:
        return None, subject
    found = template_from_filled(filled, subject)
    if found is None:
        checker.add(
            "subject_not_found", path, f"subject {subject!r} does not occur in {path} {filled!r}"
        )
        return None, subject
    return found


def _neighbours_from_pairs(
    checker: _Checker, prompt: Any, target: Any, prompt_path: str, target_path: str
) -> tuple[NeighbourhoodPrompt, ...] | None:
    """One optional (prompt, target) neighbour; both or neither must be present."""
    if prompt is _MISSING and target is _MISSING:
        return ()
    if prompt is _MISSING or target is _MISSING:
        absent = prompt_path if prompt is _MISSING else target_path
        checker.add("missing_field", absent, f"{absent} is missing (needed with its partner)")
        return None
    text, answer = checker.text(prompt, prompt_path), checker.text(target, target_path)
    if text is None or answer is None:
        return None
    return (NeighbourhoodPrompt(text, answer),)


# --------------------------------------------------------------------------------------
# CounterFact, ROME layout
# --------------------------------------------------------------------------------------


def _rome_record(record: Mapping[str, Any], c: _Checker) -> EditRequest | None:
    case_id = c.benchmark_case_id(record)
    rewrite = c.get(record, "requested_rewrite", "requested_rewrite", required=True)
    if rewrite is _MISSING or c.mapping(rewrite, "requested_rewrite") is None:
        return None
    rw = "requested_rewrite"
    prompt = c.text(c.get(rewrite, "prompt", f"{rw}.prompt", True), f"{rw}.prompt")
    subject = c.text(c.get(rewrite, "subject", f"{rw}.subject", True), f"{rw}.subject")
    targets: dict[str, str | None] = {}
    for key in ("target_new", "target_true"):
        value = c.get(rewrite, key, f"{rw}.{key}", True)
        if value is _MISSING:
            targets[key] = None
        elif isinstance(value, str):  # tolerate a bare string instead of {"str": ...}
            targets[key] = c.text(value, f"{rw}.{key}")
        elif c.mapping(value, f"{rw}.{key}") is None:
            targets[key] = None
        else:
            targets[key] = c.text(c.get(value, "str", f"{rw}.{key}.str", True), f"{rw}.{key}.str")
    relation = c.get(rewrite, "relation_id", f"{rw}.relation_id", False)
    relation_id: str | None = ""
    if relation is not _MISSING:
        if isinstance(relation, str):
            relation_id = relation.strip()
        else:
            c.add("wrong_type", f"{rw}.relation_id", f"{rw}.relation_id must be a string")
            relation_id = None
    paraphrases = c.texts(c.get(record, "paraphrase_prompts", "", False), "paraphrase_prompts")
    generations = c.texts(c.get(record, "generation_prompts", "", False), "generation_prompts")
    neighbours: tuple[NeighbourhoodPrompt, ...] | None = None
    raw = c.sequence(c.get(record, "neighborhood_prompts", "", False), "neighborhood_prompts")
    if raw is not None:
        items: list[NeighbourhoodPrompt | None] = []
        for i, item in enumerate(raw):
            path = f"neighborhood_prompts[{i}]"
            if isinstance(item, Mapping):  # some exports store {"prompt": ..., "target": ...}
                text = c.text(c.get(item, "prompt", f"{path}.prompt", True), f"{path}.prompt")
                answer = item.get("target", targets["target_true"])
                answer = c.text(answer, f"{path}.target") if answer is not None else None
            else:
                text, answer = c.text(item, path), targets["target_true"]
            ok = text is not None and answer is not None
            items.append(NeighbourhoodPrompt(text, answer) if ok else None)  # type: ignore[arg-type]
        if all(item is not None for item in items):
            neighbours = tuple(items)  # type: ignore[arg-type]
    return c.finish(
        case_id,
        prompt,
        subject,
        targets["target_new"],
        targets["target_true"],
        relation_id,
        paraphrases,
        neighbours,
        generations,
        paths={"prompt": f"{rw}.prompt", "target_new": f"{rw}.target_new.str"},
    )


def from_counterfact_rome(records: Sequence[Mapping[str, Any]]) -> ConversionReport:
    """Convert CounterFact records in the original ROME layout.

    Reads ``case_id`` and ``requested_rewrite`` (``prompt`` with ``{}``, ``subject``,
    ``target_new.str``, ``target_true.str``, ``relation_id``) plus the optional lists
    ``paraphrase_prompts``, ``neighborhood_prompts`` (their answer is ``target_true``) and
    ``generation_prompts``. ``attribute_prompts`` (answer ``target_new``: not a locality
    check) and other keys are ignored. Targets lose their leading space.
    """
    return _convert(_records(records), _rome_record, strict=False)


# --------------------------------------------------------------------------------------
# CounterFact, EasyEdit layout
# --------------------------------------------------------------------------------------


def _easyedit_record(record: Mapping[str, Any], c: _Checker) -> EditRequest | None:
    case_id = c.benchmark_case_id(record)
    filled = c.text(c.get(record, "prompt", "prompt", True), "prompt")
    subject = c.text(c.get(record, "subject", "subject", True), "subject")
    target_new = c.text(c.get(record, "target_new", "target_new", True), "target_new")
    target_true = c.text(c.get(record, "ground_truth", "ground_truth", True), "ground_truth")
    template, subject = _template_or_report(c, filled, subject, "prompt")
    rephrase = c.get(record, "rephrase_prompt", "rephrase_prompt", False)
    paraphrases: tuple[str, ...] | None = ()
    if isinstance(rephrase, (list, tuple)):
        paraphrases = c.texts(rephrase, "rephrase_prompt")
    elif rephrase is not _MISSING:
        text = c.text(rephrase, "rephrase_prompt")
        paraphrases = None if text is None else (text,)
    neighbours = _neighbours_from_pairs(
        c,
        c.get(record, "locality_prompt", "locality_prompt", False),
        c.get(record, "locality_ground_truth", "locality_ground_truth", False),
        "locality_prompt",
        "locality_ground_truth",
    )
    return c.finish(
        case_id,
        template,
        subject,
        target_new,
        target_true,
        "",
        paraphrases,
        neighbours,
        (),
        paths={"paraphrase_prompts": "rephrase_prompt"},
    )


def from_counterfact_easyedit(records: Sequence[Mapping[str, Any]]) -> ConversionReport:
    """Convert CounterFact records in the EasyEdit/MEND layout.

    Reads ``case_id``, ``prompt`` (filled), ``subject``, ``target_new``, ``ground_truth``
    and the optional ``rephrase_prompt`` (one paraphrase) and ``locality_prompt`` /
    ``locality_ground_truth`` (one neighbourhood prompt). The template is rebuilt by
    locating the subject in the filled prompt (see :func:`template_from_filled`: first
    whole-word exact match, then any exact match, then case-insensitively); a record whose
    subject cannot be found fails with ``subject_not_found``. The layout has no relation id.
    """
    return _convert(_records(records), _easyedit_record, strict=False)


# --------------------------------------------------------------------------------------
# zsRE, MEND layout
# --------------------------------------------------------------------------------------


def _zsre_record(record: Mapping[str, Any], c: _Checker) -> EditRequest | None:
    c.case_id = f"zsre-{c.position}"
    subject = c.text(c.get(record, "subject", "subject", True), "subject")
    question = c.text(c.get(record, "src", "src", True), "src")
    target_new = c.text(c.get(record, "alt", "alt", True), "alt")
    template, subject = _template_or_report(c, question, subject, "src")
    answers = c.get(record, "answers", "answers", False)
    target_true: str | None = None
    if answers is not _MISSING:
        items = c.sequence(answers, "answers")
        if items is not None and len(items) > 0:
            target_true = c.text(items[0], "answers[0]")
        elif items is not None:
            c.add("empty_field", "answers", "answers is an empty list")
    elif "pred" in record:
        target_true = c.text(record["pred"], "pred")
    else:
        c.add("missing_field", "answers", "answers is missing (and there is no pred)")
    rephrase = c.get(record, "rephrase", "rephrase", False)
    paraphrases: tuple[str, ...] | None = ()
    if rephrase is not _MISSING:
        text = c.text(rephrase, "rephrase")
        paraphrases = None if text is None else (text,)
    neighbours = _neighbours_from_pairs(
        c,
        c.get(record, "loc", "loc", False),
        c.get(record, "loc_ans", "loc_ans", False),
        "loc",
        "loc_ans",
    )
    return c.finish(
        c.case_id,
        template,
        subject,
        target_new,
        target_true,
        "",
        paraphrases,
        neighbours,
        (),
        paths={"prompt": "src", "target_new": "alt", "paraphrase_prompts": "rephrase"},
    )


def from_zsre_mend(records: Sequence[Mapping[str, Any]]) -> ConversionReport:
    """Convert zsRE records in the MEND layout.

    ``src`` (the question) becomes the template by replacing the subject with ``{}``
    (located like :func:`from_counterfact_easyedit`); the question is kept as is, so the
    answer follows its ``?`` after the space the tokenisation code adds. ``alt`` is the
    new answer, ``answers[0]`` the true one (``pred``, the MEND base model's prediction,
    only when ``answers`` is absent), ``rephrase`` the paraphrase, ``loc`` / ``loc_ans``
    the neighbourhood prompt. Case ids are ``"zsre-{index}"`` with the 0-based index in
    ``records`` (so pass the whole file to keep ids stable). ``cond`` is ignored.
    """
    return _convert(_records(records), _zsre_record, strict=False)


# --------------------------------------------------------------------------------------
# The project's fact-batch schema
# --------------------------------------------------------------------------------------


def _fact_record(record: Mapping[str, Any], c: _Checker) -> EditRequest | None:
    raw_id = record.get("case_id", _MISSING)
    if isinstance(raw_id, str) and raw_id.strip():
        c.case_id = raw_id
    for key in sorted((k for k in record if k not in _FACT_FIELDS), key=str):
        name = key if isinstance(key, str) else repr(key)
        c.add("unknown_field", name, f"unknown field {name!r} (allowed: {sorted(_FACT_FIELDS)})")

    case_id: str | None = None
    value = c.get(record, "case_id", "case_id", True)
    if value is not _MISSING:
        if not isinstance(value, str):
            c.add("wrong_type", "case_id", f"case_id must be a string, got {_type_name(value)}")
        elif not value.strip():
            c.add("empty_field", "case_id", "case_id is empty")
        elif not CASE_ID_PATTERN.fullmatch(value):
            c.add(
                "invalid_case_id",
                "case_id",
                f"case_id {value!r} must match {CASE_ID_PATTERN.pattern}",
            )
        else:
            case_id = value

    def required(key: str) -> str | None:
        return c.text(c.get(record, key, key, True), key)

    prompt, subject = required("prompt"), required("subject")
    target_new, target_true = required("target_new"), required("target_true")
    relation = c.get(record, "relation_id", "relation_id", False)
    relation_id = "" if relation is _MISSING else c.text(relation, "relation_id")
    p = c.policy
    paraphrases = c.texts(c.get(record, "paraphrase_prompts", "", False), "paraphrase_prompts", p.max_paraphrases)
    generations = c.texts(c.get(record, "generation_prompts", "", False), "generation_prompts",
                          p.max_generation_prompts)
    neighbours = _fact_neighbours(record, c)
    return c.finish(
        case_id,
        prompt,
        subject,
        target_new,
        target_true,
        relation_id,
        paraphrases,
        neighbours,
        generations,
    )


def _fact_neighbours(record: Mapping[str, Any], c: _Checker) -> tuple[NeighbourhoodPrompt, ...] | None:
    """The neighbourhood prompts of a fact record: unknown keys and wrong types refuse the
    record; an empty or invisible prompt or target leaves that pair out (a warning)."""
    raw = c.sequence(c.get(record, "neighbourhood_prompts", "", False), "neighbourhood_prompts")
    if raw is None:
        return None
    n_refused = len(c.problems)
    items: list[NeighbourhoodPrompt] = []
    for i, item in enumerate(c.bounded(raw, "neighbourhood_prompts", c.policy.max_neighbourhood_prompts)):
        path = f"neighbourhood_prompts[{i}]"
        entry = c.mapping(item, path)
        if entry is None:
            continue
        for key in sorted((k for k in entry if k not in _NEIGHBOUR_FIELDS), key=str):
            name = key if isinstance(key, str) else repr(key)
            c.add("unknown_field", f"{path}.{name}", f"unknown field {name!r} in {path}")
        text, answer = (c.get(entry, key, f"{path}.{key}", True) for key in _NEIGHBOUR_FIELDS)
        if text is _MISSING or answer is _MISSING:
            continue
        text, answer = c.eval_text(text, f"{path}.prompt"), c.eval_text(answer, f"{path}.target")
        if text is not None and answer is not None:
            items.append(NeighbourhoodPrompt(text, answer))
    return None if len(c.problems) > n_refused else tuple(items)


def from_fact_records(records: Sequence[Mapping[str, Any]], policy: SchemaPolicy | None = None) -> ConversionReport:
    """Validate and convert records of the project's fact-batch schema.

    See ``docs/FACT_SCHEMA.md``. Required: ``case_id``, ``prompt`` (template with exactly
    one ``{}``), ``subject``, ``target_new``, ``target_true``; optional: ``relation_id``,
    ``paraphrase_prompts``, ``neighbourhood_prompts`` (``{"prompt", "target"}`` objects),
    ``generation_prompts``. Unknown keys, wrong types, empty or over-long
    (:data:`MAX_TEXT_CHARS`) texts, control characters, a bad case id, equal targets,
    and repeated case ids are all reported; evaluation-only texts are lenient (see
    :data:`RULE_SEVERITY`) and bounded by ``policy``.
    """
    return _convert(_records(records), _fact_record, strict=True, policy=policy)


class _DuplicateKeyError(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def parse_fact_jsonl(text: str, policy: SchemaPolicy | None = None) -> ConversionReport:
    """Parse the decoded text of a fact-batch ``.jsonl`` file and convert it.

    One JSON object per line; blank lines are skipped; a leading byte-order mark is
    ignored. Problem positions are 0-based line indices (line number minus one). A line
    that is not JSON fails with ``malformed_json``, one that is not an object with
    ``wrong_type``, an object repeating a key with ``duplicate_field``; the others go
    through :func:`from_fact_records`. ``total`` counts the non-blank lines.
    """
    if not isinstance(text, str):
        raise RequestError(f"expected decoded text, got {_type_name(text)}")
    text = text.removeprefix("\ufeff")
    items: list[tuple[int, Any]] = []
    problems: list[RecordProblem] = []
    for index, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            items.append((index, json.loads(line, object_pairs_hook=_unique_object)))
        except _DuplicateKeyError as exc:
            problems.append(
                RecordProblem(index, None, "duplicate_field", f"key {exc.args[0]!r} appears twice")
            )
        except json.JSONDecodeError as exc:
            problems.append(
                RecordProblem(
                    index,
                    None,
                    "malformed_json",
                    f"line {index + 1}: {exc.msg} (column {exc.colno})",
                )
            )
        except (ValueError, RecursionError) as exc:  # e.g. absurd nesting or huge numbers
            problems.append(
                RecordProblem(index, None, "malformed_json", f"line {index + 1}: {exc}")
            )
    return _convert(items, _fact_record, strict=True, extra_problems=problems, policy=policy)


def to_fact_record(request: EditRequest) -> dict[str, Any]:
    """The fact-batch record of ``request`` (the inverse of :func:`from_fact_records`).

    Optional fields are written only when non-empty. This does not validate: a request
    from a benchmark may hold texts the schema rejects (CounterFact paraphrases contain
    newlines), which :func:`from_fact_records` then reports.
    """
    record: dict[str, Any] = {
        "case_id": request.case_id,
        "prompt": request.prompt,
        "subject": request.subject,
        "target_new": request.target_new,
        "target_true": request.target_true,
    }
    if request.relation_id:
        record["relation_id"] = request.relation_id
    if request.paraphrase_prompts:
        record["paraphrase_prompts"] = list(request.paraphrase_prompts)
    if request.neighbourhood_prompts:
        record["neighbourhood_prompts"] = [
            {"prompt": n.prompt, "target": n.target} for n in request.neighbourhood_prompts
        ]
    if request.generation_prompts:
        record["generation_prompts"] = list(request.generation_prompts)
    return record


def check_request(request: EditRequest) -> tuple[RecordProblem, ...]:
    """The fact-schema problems of an already built request (empty when it is valid).

    Runs the same rules as :func:`from_fact_records` on ``to_fact_record(request)``;
    positions are 0.
    """
    return from_fact_records([to_fact_record(request)]).problems


__all__ = [
    "CASE_ID_PATTERN",
    "MAX_TEXT_CHARS",
    "RULES",
    "RULE_SEVERITY",
    "SEVERITIES",
    "ConversionReport",
    "EditRequest",
    "NeighbourhoodPrompt",
    "RecordProblem",
    "RequestError",
    "SchemaPolicy",
    "check_request",
    "from_counterfact_easyedit",
    "from_counterfact_rome",
    "from_fact_records",
    "from_zsre_mend",
    "parse_fact_jsonl",
    "template_from_filled",
    "to_fact_record",
]
