"""Fact-batch validation for the nightly flow: all-or-nothing acceptance, reports, quarantine.

A batch is one ``.jsonl`` file in the fact schema (``docs/FACT_SCHEMA.md``).
:func:`validate_batch` runs four layers of checks and returns a :class:`BatchValidation`
that lists *every* problem, each as a :class:`~nas_core.requests.RecordProblem` naming the
record (0-based line index), its case id where readable, and a rule:

1. **Decoding**: the bytes must be UTF-8 (a byte-order mark is allowed); each line that is
   not is reported as ``not_utf8`` with its byte offset. Then
   :func:`nas_core.requests.parse_fact_jsonl` applies the schema rules
   (``malformed_json``, ``missing_field``, ``template_placeholder_count``, ...).
2. **Great Expectations**: the suite ``fact_batch`` (see :data:`EXPECTATIONS`) runs on a pandas
   DataFrame with one row per line that parsed as a JSON object. Every unexpected row of a
   failing expectation becomes a problem with rule ``gx:<name>``; the row-count expectation
   is table-level and reported at position :data:`BATCH_POSITION`.
3. **Tokenizer**: targets must tokenise (with their leading space) to at least one real token
   and to at most ``max_target_tokens``; the subject's last token must be locatable in the
   filled prompt.
4. **Ledger**: facts already written by earlier batches. The same fact with another answer is
   a ``ledger_conflict`` (policy ``"reject"``) or supersedes the ledger fact (``"supersede"``);
   the same answer again is ``already_applied``; two records of one batch about the same fact
   are ``duplicate_fact``.

The batch passes only when there is no problem at all: a partly bad batch is quarantined whole,
so nothing the user sent is silently dropped. :func:`write_report` writes ``validation.json``
and a self-contained ``validation.html``; :func:`quarantine` moves the batch file, unchanged,
into its own folder next to its reports and a ``reason.json``. Nothing is ever deleted or
overwritten.

Great Expectations runs on an in-memory (ephemeral) Data Context with progress bars off: it
writes no files and makes no network calls. It is imported on first use because its import
takes seconds.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from flows.config.validation import ValidationSettings
from flows.facts.inbox import BatchSnapshot, release, store, take_snapshot
from flows.io import atomic_write_bytes
from flows.ledger.facts import LedgerFact
from flows.ledger.identity import FactIdentity, identity_of, last_match
from nas_core.formats import (
    CASE_ID_PATTERN,
    RULE_SEVERITY,
    RecordProblem,
    parse_fact_jsonl,
)
from nas_core.prompts import SubjectNotFoundError, subject_last_token
from nas_core.requests import EditRequest
from nas_core.text import fold

#: Name of the Great Expectations suite run on every batch.
SUITE_NAME = "fact_batch"

#: ``RecordProblem.position`` of a problem that concerns the whole batch (row count, file
#: size, file name) rather than one record.
BATCH_POSITION = -1

#: A batch id (the file stem): a letter or digit, then up to 63 of ``A-Z a-z 0-9 . _ -``.
#: It names the batch's quarantine folder, so it must be one harmless path component.
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: The whole file name (stem plus suffix) may only use the same characters.
_FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


#: Rules this module adds to :data:`nas_core.requests.RULES` (``gx:`` rules are in
#: :data:`EXPECTATIONS`).
RULES: Mapping[str, str] = MappingProxyType(
    {
        "not_utf8": "a line of the file is not valid UTF-8 (the message gives the byte offset)",
        "file_too_large": "the file is larger than ValidationSettings.max_file_bytes; it was not parsed",
        "invalid_batch_name": "the file name is not a valid batch id (see BATCH_ID_PATTERN)",
        "unencodable_text": "a text holds a lone surrogate (a JSON escape such as \\ud800) that no tokenizer accepts",
        "target_no_tokens": "target_new or target_true tokenises, with its leading space, to no real token",
        "target_too_many_tokens": "a target tokenises to more than ValidationSettings.max_target_tokens tokens",
        "subject_not_located": "the subject's last token cannot be located in the tokenised filled prompt",
        "ledger_conflict": "an earlier batch wrote the same fact with another answer (policy 'reject')",
        "already_applied": "an earlier batch wrote the same fact with the same answer",
        "duplicate_fact": "an earlier record of the same batch is about the same fact (flows.ledger.identity)",
        "relation_id_missing": "the record has no relation_id: its fact is recognised by subject and template only",
    }
)

#: Severities of :data:`RULES` (``gx:`` rules: ``gx:row_count`` is ``batch``, the others ``record``).
FLOW_RULE_SEVERITY: Mapping[str, str] = MappingProxyType(
    {
        rule: "batch" if rule in {"file_too_large", "invalid_batch_name"} else
        "warn" if rule == "relation_id_missing" else "record"
        for rule in RULES
    }
)


def severity_of(rule: str) -> str:
    """The severity of any rule the night reports (unknown rules refuse: fail closed)."""
    if rule.startswith("gx:"):
        return "batch" if rule == "gx:row_count" else "record"
    return FLOW_RULE_SEVERITY.get(rule) or RULE_SEVERITY.get(rule, "record")


class BatchNameError(ValueError):
    """A batch file name is not a valid batch id; the message names the file and the rule."""


# --------------------------------------------------------------------------------------
# Outcome types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one expectation of the GX suite.

    Attributes:
        name: short name (the problem rule is ``"gx:" + name``).
        success: whether the expectation held.
        unexpected_count: number of rows that broke it (0 for the table-level row count).
        unexpected_examples: up to five offending values, as short reprs.
        expectation_type: the GX expectation, e.g. ``expect_column_values_to_be_unique``.
        description: what it checks, in words.
        observed: the observed value of a table-level expectation (the row count), or an
            error message when GX could not evaluate the expectation.
    """

    name: str
    success: bool
    unexpected_count: int
    unexpected_examples: tuple[str, ...] = ()
    expectation_type: str = ""
    description: str = ""
    observed: str = ""


def _problem_dict(problem: RecordProblem) -> dict[str, Any]:
    return {
        "position": problem.position,
        "line": problem.position + 1 if problem.position >= 0 else None,
        "case_id": problem.case_id,
        "rule": problem.rule,
        "severity": problem.severity,
        "field": problem.field,
        "message": problem.message,
    }


def _count(problems: Sequence[RecordProblem], omitted: Mapping[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.rule] = counts.get(problem.rule, 0) + 1
    for rule in counts:
        counts[rule] += omitted.get(rule, 0)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _where(problem: RecordProblem) -> str:
    if problem.position < 0:
        return "batch"
    return f"line {problem.position + 1}" + (f" (case {problem.case_id!r})" if problem.case_id else "")


@dataclass(frozen=True)
class BatchValidation:
    """The outcome of :func:`validate_batch` for one batch file.

    Attributes:
        batch_id: the file stem (:func:`batch_id_for`), or ``invalid-name-<sha8>`` when the
            name is not a valid batch id (then a problem says so).
        path: the file that was validated.
        sha256: hex digest of the bytes validated (the night's snapshot of the file).
        n_records: non-blank lines (each is one record, valid or not).
        passed: True when no problem refuses a record or the batch (warnings do not).
        problems: every refusing problem, ordered by position (batch-level ones first), at
            most ``settings.max_problems_per_rule`` of each rule (see ``omitted``).
        requests: the accepted requests in file order; empty when the batch failed.
        superseded: ledger facts this batch overrides (policy ``"supersede"``); empty when
            the batch failed, since a failed batch applies nothing.
        expectations: the outcome of every expectation of the GX suite (empty when the file
            could not be read as text, e.g. too large).
        settings: the settings used.
    """

    batch_id: str
    path: Path
    sha256: str
    n_records: int
    passed: bool
    problems: tuple[RecordProblem, ...]
    requests: tuple[EditRequest, ...]
    superseded: tuple[LedgerFact, ...]
    expectations: tuple[ExpectationOutcome, ...]
    settings: ValidationSettings = ValidationSettings()
    warnings: tuple[RecordProblem, ...] = ()
    omitted: Mapping[str, int] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    link_target: str | None = None

    @property
    def failed_positions(self) -> tuple[int, ...]:
        """Positions of the records with at least one problem (batch-level excluded)."""
        return tuple(sorted({p.position for p in self.problems if p.position >= 0}))

    def problems_by_rule(self) -> dict[str, int]:
        """Number of refusing problems per rule (omitted ones included), the most frequent first."""
        return _count(self.problems, self.omitted)

    def warnings_by_rule(self) -> dict[str, int]:
        """Number of warnings per rule (omitted ones included), the most frequent first."""
        return _count(self.warnings, self.omitted)

    def summary(self, max_examples: int = 3) -> str:
        """One readable paragraph: verdict, counts, failing expectations, first problems."""
        head = f"Batch {self.batch_id!r} ({self.n_records} records, sha256 {self.sha256[:12]}):"
        if self.passed:
            text = f"{head} PASSED; {len(self.requests)} edit requests accepted"
            if self.superseded:
                listed = ", ".join(f"{f.case_id!r} of batch {f.batch_id!r}" for f in self.superseded)
                text += f", superseding {len(self.superseded)} earlier facts ({listed})"
            return text + "."
        by_rule = self.problems_by_rule()
        rules = ", ".join(f"{rule} x{n}" for rule, n in by_rule.items())
        bad_records = len(self.failed_positions)
        text = (
            f"{head} FAILED and is rejected whole; {sum(by_rule.values())} problems in {bad_records}"
            f"{'+' if self.omitted else ''} of {self.n_records} records ({rules})."
        )
        failed = [e.name for e in self.expectations if not e.success]
        if self.expectations:
            text += f" GX suite {SUITE_NAME!r}: {len(failed)} of {len(self.expectations)} expectations failed"
            text += f" ({', '.join(failed)})." if failed else "."
        examples = "; ".join(f"{_where(p)}: [{p.rule}] {p.message}" for p in self.problems[:max_examples])
        more = len(self.problems) - max_examples
        text += f" First problems: {examples}" + (f"; and {more} more." if more > 0 else ".")
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able account of the validation (the content of ``validation.json``)."""
        return {
            "batch_id": self.batch_id,
            "path": str(self.path),
            "sha256": self.sha256,
            "n_records": self.n_records,
            "passed": self.passed,
            "verdict": "passed" if self.passed else "failed",
            "summary": self.summary(),
            "n_problems": sum(self.problems_by_rule().values()),
            "problems_by_rule": self.problems_by_rule(),
            "problems": [_problem_dict(p) for p in self.problems],
            "n_warnings": sum(self.warnings_by_rule().values()),
            "warnings_by_rule": self.warnings_by_rule(),
            "warnings": [_problem_dict(p) for p in self.warnings],
            "omitted_by_rule": dict(self.omitted),
            "symlink_target": self.link_target,
            "accepted_case_ids": [r.case_id for r in self.requests],
            "superseded": [asdict(f) for f in self.superseded],
            "suite": SUITE_NAME,
            "expectations": [asdict(e) for e in self.expectations],
            "settings": asdict(self.settings),
        }


# --------------------------------------------------------------------------------------
# Batch names
# --------------------------------------------------------------------------------------


def batch_id_for(path: Path | str) -> str:
    """The batch id of a batch file: its stem, e.g. ``"2025-01-31"`` for ``inbox/2025-01-31.jsonl``.

    Only the file name counts (the folders are where the file lies, not part of its id). The
    stem must match :data:`BATCH_ID_PATTERN` and the whole name may only use the same
    characters, so the id is always one harmless path component: no ``..``, no slash or
    backslash, no space, no control character, no hidden-file dot.

    Raises:
        BatchNameError: naming the file and the rule it breaks.
    """
    path = Path(path)
    name, stem = path.name, path.stem
    if not BATCH_ID_PATTERN.fullmatch(stem) or not _FILE_NAME_PATTERN.fullmatch(name):
        raise BatchNameError(
            f"batch file {name!r} (in {str(path.parent)!r}): the name must match "
            f"{_FILE_NAME_PATTERN.pattern} and its stem {BATCH_ID_PATTERN.pattern} "
            "(letters, digits, '.', '_', '-'; starting with a letter or digit; stem at most 64 characters)"
        )
    return stem


def _fallback_batch_id(sha256: str) -> str:
    return f"invalid-name-{sha256[:8]}"


# --------------------------------------------------------------------------------------
# Reading and decoding
# --------------------------------------------------------------------------------------


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


class _DuplicateKey(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _json_objects(text: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line index, object)`` of every line that is a JSON object without repeated keys.

    The same line split and the same leniency as :func:`parse_fact_jsonl`, so the GX rows and
    the parser's positions agree.
    """
    out: list[tuple[int, dict[str, Any]]] = []
    for index, line in enumerate(text.removeprefix("\ufeff").split("\n")):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=_unique_object)
        except (ValueError, RecursionError):  # reported by the parser
            continue
        if isinstance(value, dict):
            out.append((index, value))
    return out


# --------------------------------------------------------------------------------------
# The Great Expectations suite
# --------------------------------------------------------------------------------------

_TEXT_COLUMNS = ("case_id", "prompt", "subject", "target_new", "target_true", "relation_id")
_COLUMNS = (*_TEXT_COLUMNS, "n_placeholders", "targets_differ")


def _frame_rows(
    objects: list[tuple[int, dict[str, Any]]], confusables: bool = True
) -> tuple[list[int], list[dict[str, Any]]]:
    """One row per record: texts stripped as the request would hold them, plus derived columns.

    A field that is absent or not a string is null (the parser reports which). ``case_id`` is
    kept unstripped because the schema checks it as written.
    """
    positions: list[int] = []
    rows: list[dict[str, Any]] = []
    for position, record in objects:
        row: dict[str, Any] = {}
        for column in _TEXT_COLUMNS:
            value = record.get(column)
            if isinstance(value, str):
                # A lone surrogate (a valid JSON escape) makes pandas/pyarrow raise inside GX;
                # "?" keeps the length. The record fails ``unencodable_text`` anyway.
                value = value.encode("utf-8", "replace").decode("utf-8")
                row[column] = value if column == "case_id" else value.strip()
            else:
                row[column] = None
        prompt, new, true = row["prompt"], row["target_new"], row["target_true"]
        # Derived columns are null when their inputs are missing or empty, so one missing
        # field is reported once (by its own expectations), not again here.
        row["n_placeholders"] = prompt.count("{}") if prompt else None
        row["targets_differ"] = fold(new, confusables) != fold(true, confusables) if new and true else None
        positions.append(position)
        rows.append(row)
    return positions, rows


@dataclass(frozen=True)
class _Spec:
    """One expectation of the suite: its short name, the record field it reports, and how to build it."""

    name: str
    field: str  # "" for table-level expectations
    description: str
    build: Callable[[Any], Any]  # the gx.expectations module -> an Expectation


def _suite_specs(s: ValidationSettings) -> tuple[_Spec, ...]:
    """The expectations of the ``fact_batch`` suite for settings ``s``, in report order."""
    specs: list[_Spec] = [
        _Spec(
            "row_count",
            "",
            f"the batch has between {s.min_records} and {s.max_records} records",
            lambda E: E.ExpectTableRowCountToBeBetween(min_value=s.min_records, max_value=s.max_records),
        )
    ]
    for column in ("case_id", "prompt", "subject", "target_new", "target_true"):
        specs.append(
            _Spec(
                f"{column}_not_null",
                column,
                f"{column} is present and a string",
                lambda E, c=column: E.ExpectColumnValuesToNotBeNull(column=c),
            )
        )
    specs += [
        _Spec(
            "case_id_unique",
            "case_id",
            "case_id is unique within the batch",
            lambda E: E.ExpectColumnValuesToBeUnique(column="case_id"),
        ),
        _Spec(
            "case_id_format",
            "case_id",
            f"case_id matches {CASE_ID_PATTERN.pattern}",
            lambda E: E.ExpectColumnValuesToMatchRegex(column="case_id", regex=rf"^{CASE_ID_PATTERN.pattern}\Z"),
        ),
        _Spec(
            "prompt_one_placeholder",
            "prompt",
            "prompt contains exactly one {} placeholder",
            lambda E: E.ExpectColumnValuesToBeBetween(column="n_placeholders", min_value=1, max_value=1),
        ),
        _Spec(
            "targets_differ",
            "target_new",
            "target_new differs from target_true (after Unicode normalisation and casefolding)",
            lambda E: E.ExpectColumnValuesToBeInSet(column="targets_differ", value_set=[True]),
        ),
    ]
    # One expectation per text gives both the non-empty check (min 1) and the length bound:
    # every expectation costs GX some 40 ms whatever the batch size. An empty case_id
    # fails case_id_format.
    for column, limit in (
        ("prompt", s.max_prompt_chars),
        ("subject", s.max_subject_chars),
        ("target_new", s.max_target_chars),
        ("target_true", s.max_target_chars),
    ):
        specs.append(
            _Spec(
                f"{column}_length",
                column,
                f"{column} is not empty and has at most {limit} characters",
                lambda E, c=column, n=limit: E.ExpectColumnValueLengthsToBeBetween(column=c, min_value=1, max_value=n),
            )
        )
    return tuple(specs)


#: Short name -> what each expectation of the suite checks (with the default settings).
EXPECTATIONS: Mapping[str, str] = MappingProxyType(
    {spec.name: spec.description for spec in _suite_specs(ValidationSettings())}
)

# GX keeps process-wide state (the current Data Context) and does not document thread
# safety, so one validation runs at a time and the context is built once per process.
_GX_LOCK = threading.Lock()
_GX_STATE: dict[str, Any] = {}


def _gx_runtime() -> tuple[Any, Any]:
    """``(great_expectations, batch definition)`` on a private in-memory context, built once.

    Call with :data:`_GX_LOCK` held.
    """
    if not _GX_STATE:
        # GX logs its own start-up at INFO ("Skipping registering function ...", dozens of
        # lines per context): keep its warnings, drop that noise from the night's log.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.data_context import context_factory
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )
        from great_expectations.exceptions import DataContextRequiredError

        config = DataContextConfig(
            # init_temp_docs_sites=False: the default ephemeral config creates (and removes)
            # a temporary data-docs folder; we render our own report.
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            # tqdm bars would write to stderr on every validation.
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        )
        # get_context() also makes the new context the process-wide "current" one; hand
        # that role back to whatever context the rest of the process had, if any. Our
        # objects are bound to their own context, so they do not need to be current.
        try:
            previous = context_factory.project_manager.get_current_project()
        except DataContextRequiredError:
            previous = None
        context = gx.get_context(mode="ephemeral", project_config=config)
        if previous is not None:
            context_factory.set_context(previous)
        asset = context.data_sources.add_pandas("fact_batches").add_dataframe_asset("records")
        _GX_STATE["gx"] = gx
        _GX_STATE["batch_definition"] = asset.add_batch_definition_whole_dataframe("whole_batch")
    return _GX_STATE["gx"], _GX_STATE["batch_definition"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _exception_message(info: Any) -> str | None:
    """The error GX recorded for an expectation, if any.

    ``exception_info`` is either ``{"raised_exception": ..., "exception_message": ...}`` or,
    when a metric failed, a dict of such dicts keyed by metric id.
    """
    if not isinstance(info, Mapping):
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message") or "error") if info.get("raised_exception") else None
    for nested in info.values():
        message = _exception_message(nested)
        if message:
            return message
    return None


def _run_suite(
    objects: list[tuple[int, dict[str, Any]]], settings: ValidationSettings
) -> tuple[tuple[ExpectationOutcome, ...], list[RecordProblem]]:
    """Run the ``fact_batch`` suite on the records; outcomes and one problem per unexpected row."""
    import pandas as pd

    positions, rows = _frame_rows(objects, settings.fold_confusables)
    # object dtype keeps None as None and bools as bools (pandas 3 would infer a string
    # dtype with NaN); the index is the line position, so GX reports unexpected rows by it.
    frame = pd.DataFrame(rows, columns=list(_COLUMNS), index=positions, dtype=object)
    case_ids = {p: r["case_id"] for p, r in zip(positions, rows, strict=True)}
    specs = _suite_specs(settings)
    with _GX_LOCK:
        gx, batch_definition = _gx_runtime()
        # Expectations go through the constructor, not add_expectation(): the latter looks
        # for a saved suite of the same name in the *current* context's store (and would
        # save into it), which may be another component's context.
        suite = gx.ExpectationSuite(
            name=SUITE_NAME,
            expectations=[spec.build(gx.expectations) for spec in specs],
        )
        for spec, expectation in zip(specs, suite.expectations, strict=True):
            expectation.meta = {"name": spec.name}
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    by_name = {r.expectation_config.meta.get("name"): r for r in result.results}

    outcomes: list[ExpectationOutcome] = []
    problems: list[RecordProblem] = []
    for spec in specs:
        rule = f"gx:{spec.name}"
        res = by_name.get(spec.name)
        if res is None:  # fail closed: an expectation GX did not evaluate did not pass
            outcomes.append(ExpectationOutcome(spec.name, False, 0, (), "", spec.description, "not evaluated"))
            problems.append(RecordProblem(BATCH_POSITION, None, rule, f"{spec.description}: not evaluated by GX"))
            continue
        details = dict(res.result or {})
        error = _exception_message(res.exception_info)
        indexes = list(details.get("unexpected_index_list") or [])
        values = list(details.get("unexpected_list") or [])
        observed = details.get("observed_value")
        outcomes.append(
            ExpectationOutcome(
                name=spec.name,
                success=bool(res.success),
                unexpected_count=int(details.get("unexpected_count") or 0),
                unexpected_examples=tuple(_short(v) for v in values[:5]),
                expectation_type=res.expectation_config.type,
                description=spec.description,
                observed=error or ("" if observed is None else str(observed)),
            )
        )
        if res.success:
            continue
        if error or not spec.field or not indexes:
            detail = f"GX could not evaluate it: {error}" if error else f"observed {observed}"
            problems.append(RecordProblem(BATCH_POSITION, None, rule, f"expected: {spec.description}; {detail}"))
            continue
        padded = values + [None] * (len(indexes) - len(values))
        lines_of: dict[str, list[int]] = {}  # for uniqueness: which lines share each value
        for index, value in zip(indexes, padded, strict=True):
            lines_of.setdefault(repr(value), []).append(int(index) + 1)
        for index, value in zip(indexes, padded, strict=True):
            position = int(index)
            message = f"expected: {spec.description}; got {_short(value)}"
            if spec.name == "case_id_unique":
                message += f" (on lines {', '.join(map(str, lines_of[repr(value)]))})"
            problems.append(RecordProblem(position, case_ids.get(position), rule, message, spec.field))
    return tuple(outcomes), problems


# --------------------------------------------------------------------------------------
# Tokenizer and ledger checks
# --------------------------------------------------------------------------------------


def _texts(request: EditRequest) -> list[tuple[str, str]]:
    out = [(name, getattr(request, name)) for name in _TEXT_COLUMNS]
    out += [(f"paraphrase_prompts[{i}]", t) for i, t in enumerate(request.paraphrase_prompts)]
    for i, n in enumerate(request.neighbourhood_prompts):
        out += [(f"neighbourhood_prompts[{i}].prompt", n.prompt), (f"neighbourhood_prompts[{i}].target", n.target)]
    out += [(f"generation_prompts[{i}]", t) for i, t in enumerate(request.generation_prompts)]
    return out


def _unencodable(request: EditRequest, position: int) -> list[RecordProblem]:
    """Lone surrogates: valid JSON escapes that Python keeps but tokenizers reject with a TypeError."""
    problems = []
    for name, text in _texts(request):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            problems.append(
                RecordProblem(
                    position,
                    request.case_id,
                    "unencodable_text",
                    f"{name} holds the lone surrogate U+{ord(text[exc.start]):04X} at index {exc.start}",
                    name,
                )
            )
    return problems


def _special_ids(tok: Any) -> frozenset[int]:
    return frozenset(int(i) for i in getattr(tok, "all_special_ids", ()) or ())


def _real_token(tok: Any, token_id: int, special: frozenset[int]) -> bool:
    """Not a special token and not pure whitespace (the separate leading-space token of some BPEs)."""
    return token_id not in special and bool(tok.decode([token_id]).strip())


def _target_problems(tok: Any, placed: Sequence[tuple[int, EditRequest]], s: ValidationSettings) -> list[RecordProblem]:
    """``target_no_tokens`` and ``target_too_many_tokens`` for both targets of every record.

    The ids are those of ``nas_core.prompts.target_ids`` (one leading space, no special
    tokens), computed for all targets in one batched call: one call per target took a
    quarter of a second per 1000 records.
    """
    special = _special_ids(tok)
    fields = [(position, request, name) for position, request in placed for name in ("target_new", "target_true")]
    texts = [" " + getattr(request, name).strip() for _, request, name in fields]
    encoded = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    problems = []
    for (position, request, name), ids in zip(fields, encoded, strict=True):
        text = getattr(request, name)
        if not any(_real_token(tok, i, special) for i in ids):
            problems.append(
                RecordProblem(
                    position,
                    request.case_id,
                    "target_no_tokens",
                    f"{name} {_short(text)} tokenises (with its leading space) to no real token: ids {list(ids)}",
                    name,
                )
            )
        elif len(ids) > s.max_target_tokens:
            problems.append(
                RecordProblem(
                    position,
                    request.case_id,
                    "target_too_many_tokens",
                    f"{name} {_short(text)} is {len(ids)} tokens long (at most {s.max_target_tokens})",
                    name,
                )
            )
    return problems


def _subject_problems(tok: Any, placed: Sequence[tuple[int, EditRequest]]) -> list[RecordProblem]:
    """``subject_not_located`` for every record whose subject's last token cannot be found.

    The filled prompt goes through ``nas_core.prompts.subject_last_token`` (what the editors
    call), catching its error. That helper only fails when the subject span encodes to
    nothing, so where the tokenizer reports character offsets (fast tokenizers) the token it
    picks must also overlap the subject: a normaliser that drops the subject's characters
    makes it pick the BOS or a prompt token. The bare prompt is the hardest case: the
    editors' context prefixes only put more text before the subject.
    """
    special = _special_ids(tok)
    backend = getattr(tok, "backend_tokenizer", None)
    texts = [request.filled_prompt for _, request in placed]
    # The Rust backend encodes the whole list at once; same ids as tok(...), plus offsets.
    encoded = backend.encode_batch(texts, add_special_tokens=True) if backend is not None and texts else None
    problems = []
    for n, (position, request) in enumerate(placed):
        start = request.prompt.index("{}")  # the parser guarantees exactly one
        end = start + len(request.subject)
        why: str | None = None
        try:
            index = subject_last_token(tok, texts[n], end)
        except SubjectNotFoundError as exc:
            why = str(exc)
        else:
            if encoded is not None:
                ids, offsets = encoded[n].ids, encoded[n].offsets
                first, last = offsets[index] if 0 <= index < len(offsets) else (0, 0)
                if not 0 <= index < len(ids) or ids[index] in special or not (first < end and last > start):
                    why = f"the token subject_last_token picks (index {index}) lies outside the subject"
        if why is not None:
            problems.append(
                RecordProblem(
                    position,
                    request.case_id,
                    "subject_not_located",
                    f"subject {_short(request.subject)} cannot be located in {_short(texts[n], 100)}: {why}",
                    "subject",
                )
            )
    return problems


def _ledger_problems(
    requests: Sequence[tuple[int, EditRequest]], ledger: Sequence[LedgerFact], s: ValidationSettings
) -> tuple[list[RecordProblem], list[LedgerFact]]:
    """``duplicate_fact``, ``already_applied``, ``ledger_conflict`` and ``relation_id_missing``
    problems, and the superseded facts; identity is :mod:`flows.ledger.identity`'s."""
    conf = s.fold_confusables
    # Ledger order is application order: the last matching entry is what the model holds.
    known = [(fact.identity(conf), fact) for fact in ledger]
    problems: list[RecordProblem] = []
    superseded: list[LedgerFact] = []
    seen: list[tuple[FactIdentity, tuple[int, str]]] = []
    for position, request in requests:
        key = identity_of(request.subject, request.relation_id, request.prompt, conf)
        if not request.relation_id:
            problems.append(RecordProblem(position, request.case_id, "relation_id_missing",
                                          "no relation_id: this fact is recognised by its subject and prompt template "
                                          "only, so a rephrased template of it would not be", "relation_id", "warn"))
        first = last_match(key, seen)
        if first is not None:
            problems.append(RecordProblem(
                position, request.case_id, "duplicate_fact",
                f"record on line {first[0] + 1} (case {first[1]!r}) is already about this fact ({key.describe()})",
                "subject"))
        seen.append((key, (position, request.case_id)))
        earlier = last_match(key, known)
        if earlier is None:
            continue
        where = f"case {earlier.case_id!r} of batch {earlier.batch_id!r}"
        if fold(earlier.target_new, conf) == fold(request.target_new, conf):
            problems.append(RecordProblem(
                position, request.case_id, "already_applied",
                f"{where} already wrote {earlier.target_new!r} for this fact; applying it twice would edit the model "
                "again for nothing", "target_new"))
        elif s.conflict_policy == "reject":
            problems.append(RecordProblem(
                position, request.case_id, "ledger_conflict",
                f"{where} wrote {earlier.target_new!r} for this fact; this record says {request.target_new!r} "
                "(conflict_policy 'reject')", "target_new"))
        elif earlier not in superseded:
            superseded.append(earlier)
    return problems, superseded


# --------------------------------------------------------------------------------------
# validate_batch
# --------------------------------------------------------------------------------------


def validate_batch(
    source: Path | BatchSnapshot,
    tokenizer: Any,
    ledger: Sequence[LedgerFact] = (),
    settings: ValidationSettings = ValidationSettings(),
) -> BatchValidation:
    """Validate one batch; all-or-nothing (see the module docstring for the checks).

    ``source`` is the night's :class:`~flows.facts.inbox.BatchSnapshot` (the bytes that will be
    edited and stored) or a path, which is read once here. Problems with the content or
    name never raise: they are reported. Only I/O errors propagate.
    """
    snap = source if isinstance(source, BatchSnapshot) else take_snapshot(Path(source), settings.max_file_bytes)
    path, sha256 = snap.path, snap.sha256
    problems: list[RecordProblem] = []
    try:
        batch_id = batch_id_for(path)
    except BatchNameError as exc:
        batch_id = _fallback_batch_id(sha256)
        problems.append(RecordProblem(BATCH_POSITION, None, "invalid_batch_name", str(exc)))

    if snap.data is None or snap.size > settings.max_file_bytes:
        problems.append(RecordProblem(
            BATCH_POSITION, None, "file_too_large",
            f"the file has {snap.size} bytes (at most {settings.max_file_bytes}); it was not read"))
        return _finish(batch_id, snap, 0, problems, (), [], (), settings)

    text, decode_problems = _decode(snap.data)
    problems += decode_problems
    n_records = sum(1 for line in text.removeprefix("\ufeff").split("\n") if line.strip()) + len(decode_problems)
    report = parse_fact_jsonl(text, settings.schema_policy())
    problems += report.problems
    problems += report.warnings
    objects = _json_objects(text)
    outcomes, gx_problems = _run_suite(objects, settings)
    problems += gx_problems

    # parse_fact_jsonl keeps no positions for its requests; they are the lines of the
    # records without refusing problems, in order.
    bad = {p.position for p in report.problems}
    good_positions = [p for p, _ in objects if p not in bad]
    placed = list(zip(good_positions, report.requests, strict=True))
    tokenisable: list[tuple[int, EditRequest]] = []
    for position, request in placed:
        found = _unencodable(request, position)
        problems += found
        if not found:
            tokenisable.append((position, request))
    problems += _target_problems(tokenizer, tokenisable, settings)
    problems += _subject_problems(tokenizer, tokenisable)
    ledger_problems, superseded = _ledger_problems(placed, ledger, settings)
    problems += ledger_problems
    return _finish(batch_id, snap, n_records, problems, report.requests, superseded, outcomes, settings)


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


# --------------------------------------------------------------------------------------
# Reports and quarantine
# --------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``flows.io``)."""
    # backslashreplace: a lone surrogate from a JSON escape cannot be written as UTF-8.
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } code { font-size: .95em; }
.passed { color: #106b21; font-weight: bold; } .failed { color: #b00020; font-weight: bold; }
td.msg { white-space: pre-wrap; word-break: break-word; max-width: 60em; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    def cell(i: int, value: Any) -> str:
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        return f"<td{cls}>{html.escape('' if value is None else str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>\n" if headers else ""
    body = "\n".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>\n{thead}<tbody>\n{body}\n</tbody>\n</table>"


def render_html(validation: BatchValidation) -> str:
    """A self-contained HTML page for ``validation``; every user string is escaped."""
    v = validation
    e = html.escape
    verdict = "passed" if v.passed else "failed"
    def rows(items: Sequence[RecordProblem]) -> str:
        return _table(
            ("line", "case id", "rule", "severity", "field", "message"),
            [
                ("batch" if p.position < 0 else p.position + 1, p.case_id or "", p.rule, p.severity, p.field,
                 p.message)
                for p in items
            ],
            ("", "", "", "", "", "msg"),
        )

    problems, warnings = rows(v.problems), rows(v.warnings)
    omitted = "".join(f"<p>{n} more <code>{e(rule)}</code> not listed (at most "
                      f"{v.settings.max_problems_per_rule} per rule).</p>" for rule, n in v.omitted.items())
    expectations = _table(
        ("expectation", "GX type", "checks", "result", "unexpected", "examples / observed"),
        [
            (
                x.name,
                x.expectation_type,
                x.description,
                "ok" if x.success else "FAILED",
                x.unexpected_count,
                ", ".join(x.unexpected_examples) or x.observed,
            )
            for x in v.expectations
        ],
        ("", "", "", "", "", "msg"),
    )
    superseded = _table(
        ("subject", "relation", "old target", "case id", "batch"),
        [(f.subject, f.relation, f.target_new, f.case_id, f.batch_id) for f in v.superseded],
    )
    settings = _table(("setting", "value"), list(asdict(v.settings).items()))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Fact batch {e(v.batch_id)}: {verdict}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>Fact batch <code>{e(v.batch_id)}</code>: <span class="{verdict}">{verdict.upper()}</span></h1>',
        _table(
            (),
            [
                ("file", str(v.path)),
                ("sha256", v.sha256),
                ("records", v.n_records),
                ("symlink target", v.link_target or "(not a symlink)"),
                ("accepted edit requests", len(v.requests)),
                ("problems", sum(v.problems_by_rule().values())),
                ("warnings", sum(v.warnings_by_rule().values())),
            ],
        ),
        f"<p>{e(v.summary())}</p>",
        f"<h2>Problems ({sum(v.problems_by_rule().values())})</h2>",
        problems if v.problems else "<p>None.</p>",
        f"<h2>Warnings ({sum(v.warnings_by_rule().values())}; the records are kept)</h2>",
        warnings if v.warnings else "<p>None.</p>",
        omitted,
        f"<h2>Great Expectations suite <code>{e(SUITE_NAME)}</code></h2>",
        expectations if v.expectations else "<p>Not run (the file could not be read).</p>",
    ]
    if v.superseded:
        parts += [f"<h2>Superseded ledger facts ({len(v.superseded)})</h2>", superseded]
    parts += ["<h2>Settings</h2>", settings, "</body></html>", ""]
    return "\n".join(parts)


def write_report(validation: BatchValidation, out_dir: Path) -> dict[str, Path]:
    """Write ``validation.json`` and ``validation.html`` into ``out_dir`` (created), atomically.

    Returns ``{"json": path, "html": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "validation.json", "html": out_dir / "validation.html"}
    # ensure_ascii: lone surrogates become \\udXXX escapes, which stay valid JSON.
    _atomic_write(paths["json"], json.dumps(validation.to_dict(), indent=2, ensure_ascii=True) + "\n")
    _atomic_write(paths["html"], render_html(validation))
    return paths


def _claim_folder(root: Path, batch_id: str) -> Path:
    """Create and return ``root/batch_id``, or ``-2``, ``-3``, ... when taken (never reuses one)."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        folder = root / (batch_id if n == 1 else f"{batch_id}-{n}")
        try:
            folder.mkdir()  # atomic: two quarantines of one name cannot get the same folder
        except FileExistsError:
            continue
        return folder
    raise RuntimeError(f"no free quarantine folder for {batch_id!r} under {root}")


def quarantine(
    source: Path | BatchSnapshot,
    validation: BatchValidation | None,
    quarantine_root: Path,
    reason: Mapping[str, Any],
    max_bytes: int = ValidationSettings.max_file_bytes,
) -> Path:
    """Keep the batch's bytes in their own folder under ``quarantine_root`` and clear the inbox entry.

    The folder is ``quarantine_root/BATCH_ID`` (``BATCH_ID-2``, ``-3``, ... when a batch of
    the same name was quarantined before; nothing is overwritten). It receives the bytes the
    night read (``source``'s snapshot: never a link, never bytes written after the night
    read them) under the file's name (``BATCH_ID.jsonl`` when the name is invalid), the
    reports of ``validation`` when given and ``reason.json`` (reason, time, sha256, original
    name and, for a symlink, what it pointed to). The inbox entry is then removed unless it
    was rewritten meanwhile (:func:`flows.facts.inbox.release`). Returns the folder.

    Raises:
        ValueError: ``validation`` is about other bytes than ``source``.
    """
    snap = source if isinstance(source, BatchSnapshot) else take_snapshot(Path(source), max_bytes)
    if validation is not None and validation.sha256 != snap.sha256:
        raise ValueError(f"validation is about sha256 {validation.sha256[:12]}, not the bytes of {snap.name!r}")
    try:
        batch_id, valid_name = batch_id_for(snap.path), True
    except BatchNameError:
        batch_id, valid_name = _fallback_batch_id(snap.sha256), False
    folder = _claim_folder(Path(quarantine_root), batch_id)
    target = folder / (snap.name if valid_name else f"{batch_id}.jsonl")
    stored = store(snap, target)
    left = release(snap)
    if validation is not None:
        write_report(validation, folder)
    record = {
        "reason": dict(reason),
        "quarantined_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "batch_id": batch_id,
        "original_name": snap.name,
        "original_path": str(snap.path),
        "symlink_target": snap.link_target,
        "file": target.name,
        "sha256": stored,
        "validated_sha256": None if validation is None else validation.sha256,
        "inbox_entry_kept": left,
        "passed": None if validation is None else validation.passed,
    }
    # default=str: a reason may carry paths or timestamps from the flow.
    _atomic_write(folder / "reason.json", json.dumps(record, indent=2, ensure_ascii=True, default=str) + "\n")
    return folder


__all__ = [
    "BATCH_ID_PATTERN",
    "BATCH_POSITION",
    "EXPECTATIONS",
    "RULES",
    "SUITE_NAME",
    "BatchNameError",
    "BatchValidation",
    "ExpectationOutcome",
    "batch_id_for",
    "severity_of",
    "quarantine",
    "render_html",
    "validate_batch",
    "write_report",
]
