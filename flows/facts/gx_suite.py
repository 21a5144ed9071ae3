"""The Great Expectations suite ``fact_batch``: only what the fact-schema parser cannot check.

The parser (:func:`nas_core.formats.parse_fact_jsonl`) owns every record-level schema rule
(required fields, types, empty texts, the 1000-character bound, the placeholder, case ids,
equal targets), so GX does not check them again: one bad record is reported once. GX checks
the batch as a table (its number of records) and the night's own length bounds
(``validation.max_*_chars``), which the parser does not know.

The suite runs on one row per record (every non-blank line, readable or not); the text
columns hold the texts of the records the parser accepted and are null for the others, so a
record the parser refused is reported by the parser alone. Every unexpected row becomes a
problem with rule ``gx:<name>``; the row count is reported at
:data:`~flows.facts.rules.BATCH_POSITION`.

GX runs on an in-memory (ephemeral) Data Context with progress bars off: it writes no files
and makes no network calls. It is imported on first use because its import takes seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from flows.config.validation import ValidationSettings
from flows.facts.rules import BATCH_POSITION, short
from nas_core.formats import RecordProblem
from nas_core.requests import EditRequest

#: Name of the Great Expectations suite run on every batch.
SUITE_NAME = "fact_batch"

_TEXT_COLUMNS = ("prompt", "subject", "target_new", "target_true")


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one expectation of the GX suite.

    Attributes:
        name: short name (the problem rule is ``"gx:" + name``).
        success: whether the expectation held.
        unexpected_count: number of rows that broke it (0 for the table-level row count).
        unexpected_examples: up to five offending values, as short reprs.
        expectation_type: the GX expectation, e.g. ``expect_column_value_lengths_to_be_between``.
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


@dataclass(frozen=True)
class _Spec:
    """One expectation of the suite: its short name, the record field it reports, and how to build it."""

    name: str
    field: str  # "" for table-level expectations
    description: str
    build: Callable[[Any], Any]  # the gx.expectations module -> an Expectation


def _suite_specs(s: ValidationSettings) -> tuple[_Spec, ...]:
    """The expectations of the ``fact_batch`` suite for settings ``s``, in report order."""
    specs = [
        _Spec(
            "row_count",
            "",
            f"the batch has between {s.min_records} and {s.max_records} records",
            lambda E: E.ExpectTableRowCountToBeBetween(min_value=s.min_records, max_value=s.max_records),
        )
    ]
    # Only the upper bound: an empty text is the parser's empty_field, and a text over
    # MAX_TEXT_CHARS its text_too_long (that record's texts are null here).
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
                f"{column} has at most {limit} characters",
                lambda E, c=column, n=limit: E.ExpectColumnValueLengthsToBeBetween(column=c, max_value=n),
            )
        )
    return tuple(specs)


#: Short name -> what each expectation of the suite checks (with the default settings).
EXPECTATIONS: Mapping[str, str] = MappingProxyType(
    {spec.name: spec.description for spec in _suite_specs(ValidationSettings())}
)


def _frame(positions: Sequence[int], accepted: Mapping[int, EditRequest]) -> Any:
    """One row per record, indexed by line position; the texts of accepted records, else nulls."""
    import pandas as pd

    rows = []
    for position in positions:
        request = accepted.get(position)
        # A lone surrogate (a valid JSON escape) makes pandas/pyarrow raise inside GX; "?"
        # keeps the length. The record fails ``unencodable_text`` anyway.
        rows.append({column: None if request is None else
                     getattr(request, column).encode("utf-8", "replace").decode("utf-8")
                     for column in _TEXT_COLUMNS})
    # object dtype keeps None as None (pandas 3 would infer a string dtype with NaN); the
    # index is the line position, so GX reports unexpected rows by it.
    return pd.DataFrame(rows, columns=list(_TEXT_COLUMNS), index=list(positions), dtype=object)


def _batch_definition() -> Any:
    """A whole-dataframe batch definition on a new private in-memory GX context."""
    import great_expectations as gx
    from great_expectations.data_context import project_manager, set_context
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.exceptions import DataContextRequiredError

    config = DataContextConfig(
        # init_temp_docs_sites=False: the default ephemeral config creates (and removes) a
        # temporary data-docs folder; we render our own report.
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        # tqdm bars would write to stderr on every validation.
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    # get_context() also makes the new context the process-wide "current" one; hand that
    # role back to whatever context the rest of the process had, if any. Our objects are
    # bound to their own context, so they do not need to be current.
    try:
        previous = project_manager.get_current_project()
    except DataContextRequiredError:
        previous = None
    context = gx.get_context(mode="ephemeral", project_config=config)
    if previous is not None:
        set_context(previous)
    asset = context.data_sources.add_pandas("fact_batches").add_dataframe_asset("records")
    return asset.add_batch_definition_whole_dataframe("whole_batch")


class FactBatchSuite:
    """The ``fact_batch`` suite on its own GX context, built on first use and kept by its owner.

    Share one instance to validate many batches (a night, ``nas validate``): the context is
    built once. GX does not document thread safety, so one instance runs one validation at a
    time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batch_definition: Any = None

    def run(
        self, positions: Sequence[int], accepted: Mapping[int, EditRequest], settings: ValidationSettings
    ) -> tuple[tuple[ExpectationOutcome, ...], list[RecordProblem]]:
        """Run the suite on the records at ``positions`` (``accepted``: the parser's requests by
        position); the outcome of every expectation and one problem per unexpected row."""
        import great_expectations as gx

        frame = _frame(positions, accepted)
        specs = _suite_specs(settings)
        with self._lock:
            # Expectations go through the constructor, not add_expectation(): the latter looks
            # for a saved suite of the same name in the *current* context's store (and would
            # save into it), which may be another component's context.
            suite = gx.ExpectationSuite(name=SUITE_NAME, expectations=[spec.build(gx.expectations) for spec in specs])
            for spec, expectation in zip(specs, suite.expectations, strict=True):
                expectation.meta = {"name": spec.name}
            if self._batch_definition is None:
                self._batch_definition = _batch_definition()
            batch = self._batch_definition.get_batch(batch_parameters={"dataframe": frame})
            result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
        by_name = {r.expectation_config.meta.get("name"): r for r in result.results}
        case_ids = {position: request.case_id for position, request in accepted.items()}
        outcomes: list[ExpectationOutcome] = []
        problems: list[RecordProblem] = []
        for spec in specs:
            outcome, found = _judge(spec, by_name.get(spec.name), case_ids)
            outcomes.append(outcome)
            problems += found
        return tuple(outcomes), problems


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


def _judge(
    spec: _Spec, res: Any, case_ids: Mapping[int, str]
) -> tuple[ExpectationOutcome, list[RecordProblem]]:
    """The outcome of one expectation and its problems: one per unexpected row, or one for the
    batch when it failed as a table (or could not be evaluated)."""
    rule = f"gx:{spec.name}"
    if res is None:  # fail closed: an expectation GX did not evaluate did not pass
        outcome = ExpectationOutcome(spec.name, False, 0, (), "", spec.description, "not evaluated")
        return outcome, [RecordProblem(BATCH_POSITION, None, rule, f"{spec.description}: not evaluated by GX")]
    details = dict(res.result or {})
    error = _exception_message(res.exception_info)
    indexes = list(details.get("unexpected_index_list") or [])
    values = list(details.get("unexpected_list") or [])
    observed = details.get("observed_value")
    outcome = ExpectationOutcome(
        name=spec.name,
        success=bool(res.success),
        unexpected_count=int(details.get("unexpected_count") or 0),
        unexpected_examples=tuple(short(v) for v in values[:5]),
        expectation_type=res.expectation_config.type,
        description=spec.description,
        observed=error or ("" if observed is None else str(observed)),
    )
    if res.success:
        return outcome, []
    if error or not spec.field or not indexes:
        detail = f"GX could not evaluate it: {error}" if error else f"observed {observed}"
        return outcome, [RecordProblem(BATCH_POSITION, None, rule, f"expected: {spec.description}; {detail}")]
    padded = values + [None] * (len(indexes) - len(values))
    return outcome, [
        RecordProblem(int(index), case_ids.get(int(index)), rule,
                      f"expected: {spec.description}; got {short(value)}", spec.field)
        for index, value in zip(indexes, padded, strict=True)
    ]


__all__ = ["EXPECTATIONS", "SUITE_NAME", "ExpectationOutcome", "FactBatchSuite"]
