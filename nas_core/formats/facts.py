"""The project's own fact-batch schema (``docs/FACT_SCHEMA.md``): JSONL written by people.

Strict where the benchmark layouts are lenient: unknown keys, over-long texts, control
characters and bad case ids refuse a fact; texts that only evaluate an edit (paraphrase,
neighbourhood and generation prompts) warn and are bounded by a
:class:`~nas_core.formats.report.SchemaPolicy`. :func:`to_fact_record` is the inverse, so any
request (a benchmark's too) can be written as a fact and checked (:func:`check_request`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from nas_core.formats._checker import MISSING, RecordChecker, as_records, convert, type_name
from nas_core.formats.report import ConversionReport, RecordProblem, RequestError, SchemaPolicy
from nas_core.requests import EditRequest, NeighbourhoodPrompt

#: Case ids in the fact-batch schema: 1 to 64 letters, digits, ``.``, ``_`` or ``-``.
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")

_FACT_REQUIRED = ("case_id", "prompt", "subject", "target_new", "target_true")
_FACT_OPTIONAL = (
    "relation_id",
    "paraphrase_prompts",
    "neighbourhood_prompts",
    "generation_prompts",
)
_FACT_FIELDS = frozenset(_FACT_REQUIRED + _FACT_OPTIONAL)
_NEIGHBOUR_FIELDS = ("prompt", "target")


def _fact_record(record: Mapping[str, Any], c: RecordChecker) -> EditRequest | None:
    """One fact record: unknown keys, the case id, the edit texts, the evaluation lists."""
    raw_id = record.get("case_id", MISSING)
    if isinstance(raw_id, str) and raw_id.strip():
        c.case_id = raw_id
    for key in sorted((k for k in record if k not in _FACT_FIELDS), key=str):
        name = key if isinstance(key, str) else repr(key)
        c.add("unknown_field", name, f"unknown field {name!r} (allowed: {sorted(_FACT_FIELDS)})")
    case_id = _fact_case_id(record, c)

    def required(key: str) -> str | None:
        return c.text(c.get(record, key, key, True), key)

    prompt, subject = required("prompt"), required("subject")
    target_new, target_true = required("target_new"), required("target_true")
    relation = c.get(record, "relation_id", "relation_id", False)
    relation_id = "" if relation is MISSING else c.text(relation, "relation_id")
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


def _fact_case_id(record: Mapping[str, Any], c: RecordChecker) -> str | None:
    """The case id as written (not stripped), when it matches :data:`CASE_ID_PATTERN`."""
    value = c.get(record, "case_id", "case_id", True)
    if value is MISSING:
        return None
    if not isinstance(value, str):
        c.add("wrong_type", "case_id", f"case_id must be a string, got {type_name(value)}")
    elif not value.strip():
        c.add("empty_field", "case_id", "case_id is empty")
    elif not CASE_ID_PATTERN.fullmatch(value):
        c.add(
            "invalid_case_id",
            "case_id",
            f"case_id {value!r} must match {CASE_ID_PATTERN.pattern}",
        )
    else:
        return value
    return None


def _fact_neighbours(record: Mapping[str, Any], c: RecordChecker) -> tuple[NeighbourhoodPrompt, ...] | None:
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
        if text is MISSING or answer is MISSING:
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
    (:data:`~nas_core.formats.report.MAX_TEXT_CHARS`) texts, control characters, a bad
    case id, equal targets, and repeated case ids are all reported; evaluation-only texts
    are lenient (see :data:`~nas_core.formats.report.RULE_SEVERITY`) and bounded by ``policy``.
    """
    return convert(as_records(records), _fact_record, strict=True, policy=policy)


# --------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` object hook that refuses a key repeated in one object."""
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
        raise RequestError(f"expected decoded text, got {type_name(text)}")
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
    return convert(items, _fact_record, strict=True, extra_problems=problems, policy=policy)


# --------------------------------------------------------------------------------------
# Requests back to facts
# --------------------------------------------------------------------------------------


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
