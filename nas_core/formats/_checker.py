"""The per-record checking machinery every converter of :mod:`nas_core.formats` shares.

Internal to the package: converters read each record through a :class:`RecordChecker`
(which collects that record's problems) and run a whole batch through :func:`convert`;
nothing outside ``nas_core.formats`` should use these names.

Normalisation shared by all converters: every text is stripped of surrounding whitespace,
case ids become strings. ``strict`` (the fact-batch schema, written by people) adds the
length and control-character rules; the benchmark layouts are lenient (CounterFact
paraphrases contain newlines).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nas_core.formats.report import (
    MAX_TEXT_CHARS,
    RULE_SEVERITY,
    ConversionReport,
    RecordProblem,
    RequestError,
    SchemaPolicy,
)
from nas_core.requests import EditRequest, NeighbourhoodPrompt
from nas_core.text import fold, has_visible

#: What :meth:`RecordChecker.get` returns for an absent key (``None`` is a JSON value).
MISSING = object()

_LINE_SEPARATORS = frozenset("\u2028\u2029")

# Bidirectional embeddings/overrides/isolates: "\u202eacirfA" displays as "Africa" but is another text.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def type_name(value: Any) -> str:
    """The JSON-ish name of ``value``'s type for messages (``"null"`` for ``None``)."""
    if value is None:
        return "null"
    return type(value).__name__


def bad_character(text: str) -> tuple[int, str] | None:
    """First control character (Unicode category Cc, a line/paragraph separator, or a bidi control)."""
    for index, char in enumerate(text):
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F or char in _LINE_SEPARATORS or char in _BIDI_CONTROLS:
            return index, char
    return None


class RecordChecker:
    """Collects the problems of one record; ``strict`` adds the fact-schema text rules.

    An instance lives for one record only. Readers return the value or ``None`` after
    reporting why not, so a converter reads every field and reports every problem.
    """

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
        """``record[key]``, or :data:`MISSING` (reported as ``missing_field`` when required)."""
        if key in record:
            return record[key]
        if required:
            self.add("missing_field", path, f"{path} is missing")
        return MISSING

    def mapping(self, value: Any, path: str) -> Mapping[str, Any] | None:
        """``value`` when it is an object, else ``None`` (reported as ``wrong_type``)."""
        if isinstance(value, Mapping):
            return value
        self.add("wrong_type", path, f"{path} must be an object, got {type_name(value)}")
        return None

    def text(self, value: Any, path: str) -> str | None:
        """A stripped non-empty string, or ``None`` after reporting why not."""
        if value is MISSING:
            return None
        if not isinstance(value, str):
            self.add("wrong_type", path, f"{path} must be a string, got {type_name(value)}")
            return None
        if self.strict:
            self._check_strict_text(value, path)
        stripped = value.strip()
        # Only invisible characters (zero-width joiners, Hangul fillers, a braille blank,
        # combining marks alone...) is as empty as no text at all.
        if not has_visible(stripped):
            self.add("empty_field", path, f"{path} is empty or has no visible character")
            return None
        return stripped

    def _check_strict_text(self, value: str, path: str) -> None:
        """The fact-schema rules on an edit text: its length and its characters."""
        if len(value) > MAX_TEXT_CHARS:
            self.add(
                "text_too_long",
                path,
                f"{path} has {len(value)} characters (at most {MAX_TEXT_CHARS})",
            )
        bad = bad_character(value)
        if bad is not None:
            index, char = bad
            self.add(
                "control_character",
                path,
                f"{path} contains control character U+{ord(char):04X} at index {index}",
            )

    def eval_text(self, value: Any, path: str) -> str | None:
        """An evaluation-only text: like :meth:`text`, but what would only weaken the
        evaluation is a warning; ``None`` means "leave this item out" (also reported)."""
        if not isinstance(value, str):
            self.add("wrong_type", path, f"{path} must be a string, got {type_name(value)}")
            return None
        stripped = value.strip()
        if not has_visible(stripped) or (self.strict and len(value) > MAX_TEXT_CHARS):
            why = "is empty or invisible" if not has_visible(stripped) else f"has {len(value)} characters"
            self.add("eval_text_dropped", path, f"{path} {why}: left out of the evaluation")
            return None
        bad = bad_character(value) if self.strict else None
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
        if value is MISSING:
            return ()
        if isinstance(value, (list, tuple)):
            return value
        self.add("wrong_type", path, f"{path} must be a list, got {type_name(value)}")
        return None

    def single_text(self, value: Any, path: str) -> tuple[str, ...] | None:
        """An optional text as a list of at most one: ``()`` when absent, ``None`` when bad."""
        if value is MISSING:
            return ()
        text = self.text(value, path)
        return None if text is None else (text,)

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
        if value is MISSING:
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
                "wrong_type", key, f"{key} must be an int or a string, got {type_name(value)}"
            )
        return None

    def neighbour_pair(
        self, prompt: Any, target: Any, prompt_path: str, target_path: str
    ) -> tuple[NeighbourhoodPrompt, ...] | None:
        """One optional (prompt, target) neighbour; both or neither must be present."""
        if prompt is MISSING and target is MISSING:
            return ()
        if prompt is MISSING or target is MISSING:
            absent = prompt_path if prompt is MISSING else target_path
            self.add("missing_field", absent, f"{absent} is missing (needed with its partner)")
            return None
        text, answer = self.text(prompt, prompt_path), self.text(target, target_path)
        if text is None or answer is None:
            return None
        return (NeighbourhoodPrompt(text, answer),)

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
        """Run the semantic rules on the parts and build the request if all is well.

        A ``None`` part is one whose reading already failed. ``paths`` names the fields in
        problems where a layout spells them differently (``{"prompt": "src"}``).
        """
        path = {
            "prompt": "prompt",
            "target_new": "target_new",
            "paraphrase_prompts": "paraphrase_prompts",
            **(paths or {}),
        }
        self._check_template(prompt, path["prompt"])
        self._check_targets_differ(target_new, target_true, path["target_new"])
        self._check_paraphrases_mention(subject, paraphrases, path["paraphrase_prompts"])
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

    def _check_template(self, prompt: str | None, path: str) -> None:
        """A template holds exactly one ``{}`` and no other brace."""
        if prompt is not None and prompt.count("{}") != 1:
            self.add(
                "template_placeholder_count",
                path,
                f"{path} must contain exactly one '{{}}', found "
                f"{prompt.count('{}')}: {prompt!r}",
            )
        elif prompt is not None and ("{" in prompt.replace("{}", "", 1) or "}" in prompt.replace("{}", "", 1)):
            self.add(
                "template_stray_brace",
                path,
                f"{path} may hold braces only in its one '{{}}': {prompt!r}",
            )

    def _check_targets_differ(self, target_new: str | None, target_true: str | None, path: str) -> None:
        """The new target differs from the true one after :func:`nas_core.text.fold`."""
        confusables = self.policy.fold_confusables
        if (
            target_new is not None
            and target_true is not None
            and fold(target_new, confusables) == fold(target_true, confusables)
        ):
            self.add(
                "target_equals_true",
                path,
                f"target_new {target_new!r} equals target_true {target_true!r} (after Unicode normalisation)",
            )

    def _check_paraphrases_mention(
        self, subject: str | None, paraphrases: tuple[str, ...] | None, path: str
    ) -> None:
        """Every paraphrase mentions the subject (a warning: it only weakens the evaluation)."""
        if subject is not None and paraphrases:
            confusables = self.policy.fold_confusables
            folded = fold(subject, confusables)
            for i, text in enumerate(paraphrases):
                if folded not in fold(text, confusables):
                    field = f"{path}[{i}]"
                    self.add(
                        "subject_not_in_prompt",
                        field,
                        f"{field} does not mention the subject {subject!r}: {text!r}",
                    )


#: A layout's reader of one record: the request, or ``None`` with the problems in the checker.
RecordFn = Callable[[Mapping[str, Any], RecordChecker], "EditRequest | None"]


def convert(
    items: Sequence[tuple[int, Any]],
    convert_one: RecordFn,
    strict: bool,
    extra_problems: Sequence[RecordProblem] = (),
    total: int | None = None,
    policy: SchemaPolicy | None = None,
) -> ConversionReport:
    """Convert ``(position, record)`` pairs; later records reusing a case id fail.

    ``extra_problems`` are problems found before conversion (a JSONL line that did not
    parse); each of their positions counts as one more input record in ``total``.
    """
    requests: list[EditRequest] = []
    problems: list[RecordProblem] = list(extra_problems)
    warnings: list[RecordProblem] = []
    first_seen: dict[str, int] = {}
    for position, record in items:
        checker = RecordChecker(position, strict, policy)
        if not isinstance(record, Mapping):
            checker.add("wrong_type", "", f"record must be an object, got {type_name(record)}")
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


def as_records(records: Any) -> list[tuple[int, Any]]:
    """``(position, record)`` pairs of a list of records; anything else is a :class:`RequestError`."""
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise RequestError(f"expected a list of records, got {type_name(records)}")
    return list(enumerate(records))
