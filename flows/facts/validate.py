"""Fact-batch validation for the nightly flow: every problem of a batch, all-or-nothing acceptance.

A batch is one ``.jsonl`` file in the fact schema (``docs/FACT_SCHEMA.md``).
:func:`validate_batch` runs the checks below and returns a
:class:`~flows.facts.batch.BatchValidation` that lists *every* problem, each as a
:class:`~nas_core.formats.RecordProblem` naming the record (0-based line index), its case id
where readable, and a rule. Each rule is checked in one place only, so one fault is reported
once:

1. **Decoding**: the bytes must be UTF-8 (a byte-order mark is allowed); each line that is
   not is reported as ``not_utf8`` with its byte offset.
2. **Schema**: :func:`nas_core.formats.parse_fact_jsonl` owns every record-level schema rule
   (``malformed_json``, ``missing_field``, ``template_placeholder_count``, ...).
3. **Great Expectations** (:mod:`flows.facts.gx_suite`, run in a child process by
   :mod:`flows.facts.gx_process`): what the parser cannot check, the number of records and the
   night's length bounds (``gx:row_count``, ``gx:prompt_length``, ...).
4. **Tokenizer** (:mod:`flows.facts.tokenizer_checks`) and **ledger**
   (:mod:`flows.facts.ledger_checks`) checks, on the records the parser accepted.

The batch passes only when no problem refuses a record or the batch: a partly bad batch is
quarantined whole (:mod:`flows.facts.quarantine`), with its reports (:mod:`flows.facts.report`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from flows.config.validation import ValidationSettings
from flows.facts.batch import BatchNameError, BatchValidation, batch_id_for, fallback_batch_id
from flows.facts.gx_process import GXProcess, shared_suite
from flows.facts.gx_suite import ExpectationOutcome, FactBatchSuite
from flows.facts.inbox import BatchSnapshot, take_snapshot
from flows.facts.ledger_checks import ledger_problems
from flows.facts.rules import BATCH_POSITION, severity_of
from flows.facts.tokenizer_checks import subject_problems, target_problems, unencodable_problems
from flows.ledger.facts import LedgerFact
from nas_core.formats import RecordProblem, parse_fact_jsonl
from nas_core.requests import EditRequest


def _decode(data: bytes) -> tuple[str, list[RecordProblem]]:
    """UTF-8 text of ``data``, line by line; undecodable lines become empty lines.

    Blanking (rather than dropping) a bad line keeps every other line at its position, so the
    rest of the batch is still checked and reported. A newline byte never occurs inside a
    multi-byte UTF-8 sequence, so splitting the bytes first is exact.
    """
    lines: list[str] = []
    problems: list[RecordProblem] = []
    offset = 0
    for index, raw in enumerate(data.split(b"\n")):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad = raw[exc.start : exc.start + 4]
            problems.append(
                RecordProblem(
                    index,
                    None,
                    "not_utf8",
                    f"line {index + 1} is not valid UTF-8: {exc.reason} at byte offset {offset + exc.start} "
                    f"of the file (bytes {bad!r})",
                )
            )
            lines.append("")
        offset += len(raw) + 1
    return "\n".join(lines), problems


def _text_records(text: str) -> list[int]:
    """Line indices of the non-blank lines of ``text``: its records, numbered as the parser numbers them."""
    return [index for index, line in enumerate(text.removeprefix("\ufeff").split("\n")) if line.strip()]


def _record_problems(
    tokenizer: Any, placed: Sequence[tuple[int, EditRequest]], settings: ValidationSettings
) -> list[RecordProblem]:
    """The tokenizer checks of the accepted ``(position, request)`` pairs (encodable texts first)."""
    problems: list[RecordProblem] = []
    tokenisable: list[tuple[int, EditRequest]] = []
    for position, request in placed:
        found = unencodable_problems(request, position)
        problems += found
        if not found:
            tokenisable.append((position, request))
    problems += target_problems(tokenizer, tokenisable, settings)
    problems += subject_problems(tokenizer, tokenisable)
    return problems


def validate_batch(
    source: Path | BatchSnapshot,
    tokenizer: Any,
    ledger: Sequence[LedgerFact] = (),
    settings: ValidationSettings = ValidationSettings(),
    suite: FactBatchSuite | GXProcess | None = None,
) -> BatchValidation:
    """Validate one batch; all-or-nothing (see the module docstring for the checks).

    ``source`` is the night's :class:`~flows.facts.inbox.BatchSnapshot` (the bytes that will be
    edited and stored) or a path, which is read once here. ``suite`` runs the GX suite
    (default: the process's GX child, :func:`~flows.facts.gx_process.shared_suite`; a
    :class:`FactBatchSuite` runs it in this process).
    Problems with the content or name never raise: they are reported. Only I/O errors propagate.
    """
    snap = source if isinstance(source, BatchSnapshot) else take_snapshot(Path(source), settings.max_file_bytes)
    problems: list[RecordProblem] = []
    try:
        batch_id = batch_id_for(snap.path)
    except BatchNameError as exc:
        batch_id = fallback_batch_id(snap.sha256)
        problems.append(RecordProblem(BATCH_POSITION, None, "invalid_batch_name", str(exc)))
    if snap.data is None or snap.size > settings.max_file_bytes:
        problems.append(RecordProblem(
            BATCH_POSITION, None, "file_too_large",
            f"the file has {snap.size} bytes (at most {settings.max_file_bytes}); it was not read"))
        return _finish(batch_id, snap, 0, problems, (), [], (), settings)

    text, decode_problems = _decode(snap.data)
    report = parse_fact_jsonl(text, settings.schema_policy())
    problems += [*decode_problems, *report.problems, *report.warnings]
    # parse_fact_jsonl keeps no positions for its requests; they are the records without
    # refusing problems, in order (a line that is not a JSON object always has one).
    lines = _text_records(text)
    refused = {p.position for p in report.problems}
    placed = list(zip([p for p in lines if p not in refused], report.requests, strict=True))
    records = sorted([*lines, *(p.position for p in decode_problems)])
    outcomes, gx_problems = (suite or shared_suite()).run(records, dict(placed), settings)
    problems += gx_problems
    problems += _record_problems(tokenizer, placed, settings)
    found, superseded = ledger_problems(placed, ledger, settings)
    problems += found
    return _finish(batch_id, snap, len(records), problems, report.requests, superseded, outcomes, settings)


def _cap(problems: Sequence[RecordProblem], limit: int) -> tuple[list[RecordProblem], dict[str, int]]:
    """At most ``limit`` problems per rule, in order, and the count left out per rule."""
    kept: list[RecordProblem] = []
    seen: dict[str, int] = {}
    for problem in problems:
        seen[problem.rule] = seen.get(problem.rule, 0) + 1
        if seen[problem.rule] <= limit:
            kept.append(problem)
    return kept, {rule: n - limit for rule, n in seen.items() if n > limit}


def _finish(
    batch_id: str,
    snap: BatchSnapshot,
    n_records: int,
    problems: list[RecordProblem],
    requests: Sequence[EditRequest],
    superseded: Sequence[LedgerFact],
    outcomes: Sequence[ExpectationOutcome],
    settings: ValidationSettings,
) -> BatchValidation:
    """Grade, order and cap the problems and decide the verdict."""
    # Every problem gets its rule's severity; stable sort: within a record, problems keep
    # the order of the layers that found them.
    graded = sorted((dataclasses.replace(p, severity=severity_of(p.rule)) for p in problems), key=lambda p: p.position)
    refusing, omitted = _cap([p for p in graded if p.severity != "warn"], settings.max_problems_per_rule)
    warnings, omitted_warnings = _cap([p for p in graded if p.severity == "warn"], settings.max_problems_per_rule)
    passed = not refusing and all(o.success for o in outcomes)
    return BatchValidation(
        batch_id=batch_id,
        path=snap.path,
        sha256=snap.sha256,
        n_records=n_records,
        passed=passed,
        problems=tuple(refusing),
        requests=tuple(requests) if passed else (),
        superseded=tuple(superseded) if passed else (),
        expectations=tuple(outcomes),
        settings=settings,
        warnings=tuple(warnings),
        omitted=MappingProxyType({**omitted, **omitted_warnings}),
        link_target=snap.link_target,
    )


__all__ = ["validate_batch"]
